"""Activation shards in saev's sharded-activation protocol v1, plus per-patch labels.

A dump directory holds `metadata.json`, `shards.json`, `acts000000.bin`, ..., `labels.bin` and `labels.json`. The
logical tensor is float32 [n_imgs, n_layers, n_tokens_per_img, d_vit], C-order, CLS first when `cls_token` is true,
split along images into shards of `n_imgs_per_shard = max_patches_per_shard // (n_tokens_per_img * n_layers)` images.

What saev's own readers need, and we write: `metadata.json` holds exactly the v1 keys with protocol "1.0.0" (the v1
reader rejects unknown keys and any other protocol string), and every shard file, the last included, has the full
`n_imgs_per_shard` size (the last one padded with zeros; `shards.json` says how many of its images are real), since
saev's readers memory-map every shard at full size. `labels.bin` is [n_imgs, n_patches_per_img] of `labels_dtype`
with `labels_ignore` for unlabelled patches; those and the class names are in the side file `labels.json`.

Read back as well: dumps of earlier versions (protocol "1.1.0": the label keys inside metadata.json, the last shard
truncated to its real images), and shard lists with trailing entries of 0 images (saev 2.x leaves one when the image
count is a multiple of the shard size). Other saev layouts are translated by `saev.data.saevfmt`.
"""

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import pathlib
import typing

import beartype
import numpy as np

from saev import atomic, checksums, errors, helpers
from saev.data import labels as labels_

PROTOCOL = "1.0.0"
"""The protocol string written: saev's v1 reader accepts only this one."""
READ_PROTOCOLS = ("1.0.0", "1.1.0")
"""Protocol strings read: "1.1.0" is what earlier versions wrote (label keys in metadata.json, last shard truncated)."""
LABELS_JSON = "labels.json"
"""Side file with the label fields (labels_dtype, labels_ignore, class_names), kept out of metadata.json."""
V1_KEYS = ("vit_family", "vit_ckpt", "layers", "n_patches_per_img", "cls_token", "d_vit", "n_imgs",
           "max_patches_per_shard", "data", "dtype", "protocol")  # fmt: skip
"""Exactly the keys of the v1 metadata.json (saev's v1 `Metadata` refuses any other)."""
LABEL_KEYS = ("labels_dtype", "labels_ignore", "class_names")
V1_TYPES = {"vit_family": str, "vit_ckpt": str, "layers": list, "n_patches_per_img": int, "cls_token": bool,
            "d_vit": int, "n_imgs": int, "max_patches_per_shard": int, "data": dict, "dtype": str, "protocol": str}  # fmt: skip
"""The JSON type of each v1 metadata.json field (`list`: a list of integers)."""
LABELS_DTYPES = {"uint8": (0, 255), "int16": (-32768, 32767)}
"""labels.bin dtypes -> the range of values they hold."""


class ShardError(errors.UserInputError, ValueError):
    """A dump directory is missing a file or a file has the wrong size; the message names it."""


class ShardValueError(ShardError, ValueError):
    """A dump holds a bad value (NaN/inf activations, a label outside the classes) or is sized impossibly (a shard
    smaller than one image); the message names the file or setting and the value. Also a ValueError, so that the
    launcher reports it as an error line rather than a traceback."""


@dataclasses.dataclass(frozen=True)
class Metadata:
    """The contents of metadata.json."""

    vit_family: str
    """"clip" or "siglip"."""
    vit_ckpt: str
    """Model identifier (open_clip name and weights)."""
    layers: tuple[int, ...]
    """Residual-block indices recorded, in order."""
    n_patches_per_img: int
    """Image patches per image (excluding CLS)."""
    cls_token: bool
    """Whether token 0 of each image is the CLS token."""
    d_vit: int
    """Activation width."""
    n_imgs: int
    """Images in the dataset."""
    max_patches_per_shard: int
    """Budget of activation vectors per shard."""
    data: dict[str, typing.Any]
    """Opaque dataset description."""
    dtype: str = "float32"
    """Activation dtype (only float32)."""
    protocol: str = PROTOCOL
    """Protocol version."""
    labels_dtype: str = "uint8"
    """dtype of labels.bin ("uint8" or "int16")."""
    labels_ignore: int = 255
    """Label of patches without a class."""
    class_names: tuple[str, ...] = ()
    """Class names; label i is class_names[i]."""

    @property
    def n_tokens_per_img(self) -> int:
        return self.n_patches_per_img + int(self.cls_token)

    @property
    def n_imgs_per_shard(self) -> int:
        n = self.max_patches_per_shard // (self.n_tokens_per_img * len(self.layers))
        if n < 1:
            raise ShardValueError(
                f"max_patches_per_shard={self.max_patches_per_shard} is smaller than one image "
                f"({self.n_tokens_per_img} tokens x {len(self.layers)} layers = "
                f"{self.n_tokens_per_img * len(self.layers)} activation vectors); raise dump.max_patches_per_shard"
            )
        return n

    @property
    def n_shards(self) -> int:
        return -(-self.n_imgs // self.n_imgs_per_shard)

    def shard_n_imgs(self, shard: int) -> int:
        """Images in shard `shard` (the last one may hold fewer)."""
        return min(self.n_imgs_per_shard, self.n_imgs - shard * self.n_imgs_per_shard)

    @property
    def bytes_per_img(self) -> int:
        return len(self.layers) * self.n_tokens_per_img * self.d_vit * 4

    @property
    def shard_bytes(self) -> int:
        """Size of every shard file as written (the last one padded): saev's readers map each at this size."""
        return self.n_imgs_per_shard * self.bytes_per_img

    def to_json(self) -> dict[str, typing.Any]:
        """metadata.json: exactly the v1 keys (the label fields go to `labels_json`), protocol "1.0.0"."""
        out = {k: getattr(self, k) for k in V1_KEYS}
        out["layers"] = list(self.layers)
        out["protocol"] = PROTOCOL
        return out

    def labels_json(self) -> dict[str, typing.Any]:
        """labels.json: the label fields."""
        return {
            "labels_dtype": self.labels_dtype,
            "labels_ignore": self.labels_ignore,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, obj: dict[str, typing.Any], labels: dict[str, typing.Any] | None = None) -> "Metadata":
        """From metadata.json and labels.json (None: the label fields come from metadata.json, as earlier versions
        wrote them, or take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in obj.items() if k in known}
        if labels is not None:
            kwargs.update({k: v for k, v in labels.items() if k in LABEL_KEYS})
        kwargs["layers"] = tuple(kwargs["layers"])
        kwargs["class_names"] = tuple(kwargs.get("class_names", ()))
        return cls(**kwargs)

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of metadata.json, as in the protocol."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_field(obj: dict, name: str, tp: type | tuple[type, ...], fpath: pathlib.Path | str) -> typing.Any:
    """`obj[name]`, refused unless of JSON type `tp`: `int` means a real integer (not a bool, not 2.0), `list` a list
    of integers, `type(None)` null. `ShardError` naming the file and field otherwise."""
    value, tps = obj[name], tp if isinstance(tp, tuple) else (tp,)
    ok = any(type(value) is t or (t is dict and isinstance(value, dict)) for t in tps)
    if list in tps and isinstance(value, list):
        ok = all(type(v) is int for v in value)
    if not ok:
        want = " or ".join(
            "a list of integers" if t is list else "null" if t is type(None) else t.__name__ for t in tps
        )
        raise ShardError(f"{fpath}: field '{name}' must be {want}, got {value!r}")
    return value


def check_label_fields(obj: dict[str, typing.Any], fpath: pathlib.Path | str) -> None:
    """Refuse label fields (labels.json, or metadata.json of protocol "1.1.0") of the wrong type or value, one line
    naming the file and field: `labels_dtype` "uint8" or "int16", `labels_ignore` an integer that dtype holds and not
    a class id (within [0, len(class_names))), `class_names` a list of strings. Absent fields take their defaults."""
    dtype = obj.get("labels_dtype", "uint8")
    if type(dtype) is not str or dtype not in LABELS_DTYPES:
        raise ShardError(f"{fpath}: field 'labels_dtype' must be 'uint8' or 'int16', got {dtype!r}")
    names = obj.get("class_names", [])
    if not (isinstance(names, list) and all(type(n) is str for n in names)):
        raise ShardError(f"{fpath}: field 'class_names' must be a list of strings, got {names!r}")
    if fault := labels_.class_names_fault(names):
        raise ShardError(f"{fpath}: field 'class_names' {fault}")
    ignore = obj.get("labels_ignore", 255)
    check_ignore(ignore, dtype, len(names), f"{fpath}: field 'labels_ignore'")


def check_ignore(ignore: object, dtype: str, n_classes: int, where: str) -> None:
    """Refuse an ignore label that is not an integer, does not fit the labels dtype, or is a class id (unlabelled
    patches would silently count as that class); `where` starts the one-line `ShardError` (file and field)."""
    lo, hi = LABELS_DTYPES[dtype]
    if type(ignore) is not int or not lo <= ignore <= hi:
        raise ShardError(f"{where} must be an integer within [{lo}, {hi}] (labels.bin is {dtype}), got {ignore!r}")
    if 0 <= ignore < n_classes:
        raise ShardError(
            f"{where} is {ignore}, a class id (classes are 0..{n_classes - 1}): unlabelled patches would count as "
            f"that class; pick a value outside them ({hi if dtype == 'uint8' else -1} is usual)"
        )


_WRITEBACK_BYTES = 16 << 20
"""A shard being written asks the kernel to start writing its data to disk every this many bytes (see
`_start_writeback`)."""


def _load_sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # from fcntl.h: start writeback of the range's dirty pages, do not wait


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing [offset, offset + length) of a file to disk without waiting for it (Linux; a no-op elsewhere):
    the kernel writes while the dump computes, so the fsync that closes the shard waits only for the last few MiB,
    not for the whole shard (which otherwise sits in the page cache until then: gigabytes below the dirty limits)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only leaves it to the fsync


def shard_name(shard: int) -> str:
    return f"acts{shard:06d}.bin"


class ShardWriter:
    """Appends activations image by image; each shard is streamed to a temp file and renamed when full.

    Memory stays at one batch whatever the shard size. `start_shard` resumes a dump: the writer expects images from
    `start_shard * n_imgs_per_shard` on, and earlier shards must already be complete on disk (unless
    `check_earlier` is off: a parallel dump's jobs each write their own range of shards). Each shard is hashed as
    it is written (`checksum`; off only to measure what hashing costs) and its checksum recorded beside it. The last
    shard is padded with zeros to the full `n_imgs_per_shard` size (written by whichever job writes its last image:
    each chunk of a parallel dump owns its shards, padding included).
    """

    @beartype.beartype
    def __init__(
        self,
        dpath: pathlib.Path | str,
        md: Metadata,
        *,
        start_shard: int = 0,
        check_earlier: bool = True,
        checksum: bool = True,
    ):
        self.dpath = pathlib.Path(dpath)
        self.md = md
        self.dpath.mkdir(parents=True, exist_ok=True)
        if not 0 <= start_shard <= md.n_shards:
            raise ValueError(f"start_shard={start_shard} outside [0, {md.n_shards}]")
        for shard in range(start_shard if check_earlier else 0):
            check_shard_file(self.dpath, md, shard)
        self.shard = start_shard
        self.checksum = checksum
        self._hasher = None
        self._tmp_fpath = None
        # min(): resuming after the last shard (start_shard == n_shards) means every image is already written.
        self.n_written = min(start_shard * md.n_imgs_per_shard, md.n_imgs)
        self._in_shard = 0
        self._ctx = None
        self._fd = None
        self._aborted = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On an exception, drop the shard being written (whole shards stay); otherwise do nothing (call `close`)."""
        if exc_type is not None:
            self.abort()

    def _open(self) -> None:
        self._ctx = atomic.atomic_path(self.dpath / shard_name(self.shard))
        self._tmp_fpath = self._ctx.__enter__()
        self._fd = open(self._tmp_fpath, "wb")
        self._hasher = checksums.new_hasher() if self.checksum else None
        self._in_shard = 0
        self._synced = 0  # bytes of the shard whose writeback was started

    def _finish_shard(self) -> None:
        assert self._fd is not None and self._ctx is not None
        pad = (self.md.n_imgs_per_shard - self._in_shard) * self.md.bytes_per_img
        if pad:
            # The last shard: zeros up to the full size saev's readers map, as a hole (no disk space and nothing
            # written: a small dump's last shard would otherwise cost up to a whole shard budget of zeros), hashed
            # like the rest from memory.
            self._fd.truncate(self._fd.tell() + pad)
            zeros = memoryview(bytes(min(pad, 16 << 20)))
            while pad and self._hasher is not None:
                chunk = zeros[: min(pad, len(zeros))]
                self._hasher.update(chunk)
                pad -= len(chunk)
        self._fd.close()
        # Hashed while writing: no second read of the shard.
        atomic.set_digest(self._tmp_fpath, self._hasher.hexdigest() if self._hasher is not None else "")
        self._ctx.__exit__(None, None, None)  # fsync, checksum record, rename
        self._fd = self._ctx = None
        self.shard += 1

    def write(self, acts_BLTD: np.ndarray) -> None:
        """Append a batch of images' activations (float32 [B, n_layers, n_tokens_per_img, d_vit])."""
        if self._aborted:
            raise ValueError("this ShardWriter was aborted; start a new one (with start_shard) to resume")
        expected = (len(self.md.layers), self.md.n_tokens_per_img, self.md.d_vit)
        if acts_BLTD.ndim != 4 or acts_BLTD.shape[1:] != expected:
            raise ValueError(f"activations have shape {acts_BLTD.shape}, expected [B, {', '.join(map(str, expected))}]")
        # Convert before checking: float64 values beyond the float32 range would become inf on disk.
        with np.errstate(over="ignore"):  # reported below as inf, naming the image
            acts_BLTD = np.ascontiguousarray(acts_BLTD, dtype=np.float32)
        # min and max are NaN when any value is, and infinite when any value is: two passes, no temporary array.
        if acts_BLTD.size and not (np.isfinite(acts_BLTD.min()) and np.isfinite(acts_BLTD.max())):
            bad = int(np.flatnonzero(~np.isfinite(acts_BLTD).reshape(len(acts_BLTD), -1).all(axis=1))[0])
            raise ValueError(f"NaN/inf activations for image {self.n_written + bad}; check the model dtype")
        if self.n_written + len(acts_BLTD) > self.md.n_imgs:
            raise ValueError(f"writing past n_imgs={self.md.n_imgs}")
        i = 0
        while i < len(acts_BLTD):
            if self._fd is None:
                self._open()
            take = min(len(acts_BLTD) - i, self.md.shard_n_imgs(self.shard) - self._in_shard)
            try:
                view = acts_BLTD[i : i + take].data  # C-contiguous: its bytes, without a copy
                self._fd.write(view)
                if self._hasher is not None:
                    self._hasher.update(view)
                written = (self._in_shard + take) * self.md.bytes_per_img
                last = self._in_shard + take == self.md.shard_n_imgs(self.shard)  # closed with an fsync right after
                if written - self._synced >= _WRITEBACK_BYTES and not last:
                    self._fd.flush()
                    _start_writeback(self._fd.fileno(), self._synced, written - self._synced)
                    self._synced = written
            except OSError as err:
                # Route through atomic_path: it removes the temp file and raises a WriteError naming the shard.
                ctx, self._ctx = self._ctx, None
                with contextlib.suppress(OSError):
                    self._fd.close()
                self._fd, self._aborted = None, True
                ctx.__exit__(type(err), err, err.__traceback__)
                raise
            self._in_shard += take
            self.n_written += take
            i += take
            if self._in_shard == self.md.shard_n_imgs(self.shard):
                self._finish_shard()

    def abort(self) -> None:
        """Drop the shard being written (its temp file is removed); finished shards stay. The writer is unusable after."""
        self._aborted = True
        if self._fd is not None and self._ctx is not None:
            self._fd.close()
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
            self._fd = self._ctx = None

    def write_labels(self, labels_NP: np.ndarray) -> None:
        """Write labels.bin ([n_imgs, n_patches_per_img]) atomically."""
        expected = (self.md.n_imgs, self.md.n_patches_per_img)
        if labels_NP.shape != expected:
            raise ValueError(f"labels have shape {labels_NP.shape}, expected {expected}")
        data = np.ascontiguousarray(labels_NP, dtype=self.md.labels_dtype).tobytes()
        atomic.atomic_write_bytes(self.dpath / "labels.bin", data)

    def close(self) -> None:
        """Check every image was written, then write shards.json, labels.json and metadata.json."""
        if self.n_written != self.md.n_imgs:
            self.abort()
            raise ValueError(f"wrote {self.n_written} images, metadata says {self.md.n_imgs}")
        shards = [{"name": shard_name(s), "n_imgs": self.md.shard_n_imgs(s)} for s in range(self.md.n_shards)]
        atomic.atomic_write_json(self.dpath / "shards.json", shards)
        atomic.atomic_write_json(self.dpath / LABELS_JSON, self.md.labels_json())
        atomic.atomic_write_json(self.dpath / "metadata.json", self.md.to_json())


def check_shard_file(
    dpath: pathlib.Path, md: Metadata, shard: int, hint: str = "; rerun the dump stage", *, allow_truncated: bool = True
) -> None:
    """A shard file has the full shard size; with `allow_truncated`, the last shard with images may instead hold only
    its images (dumps of earlier versions truncated it). `ShardError` naming the file otherwise (`hint` ends the
    message)."""
    fpath = dpath / shard_name(shard)
    expected = md.shard_bytes
    if not fpath.exists():
        raise ShardError(f"shard file missing: {fpath} (expected {expected} bytes){hint}")
    actual = helpers.check_regular_file(fpath, what="shard", max_bytes=None, error=ShardError)
    truncated = md.shard_n_imgs(shard) * md.bytes_per_img
    if actual != expected and not (allow_truncated and shard == md.n_shards - 1 and actual == truncated):
        raise ShardError(f"shard file {fpath} has {actual} bytes, expected {expected}{hint}")


def check_shard_list(
    listed: object, md: Metadata, fpath: pathlib.Path, md_fpath: pathlib.Path, count_key: str = "n_imgs"
) -> int:
    """Check a parsed shards.json against the shard sizing of the metadata; returns how many shards it lists.

    Entry i is `{"name": "acts%06d.bin" % i, count_key: images}`: every shard holds `n_imgs_per_shard` images but the
    last with images, and trailing entries of 0 images are allowed (saev 2.x leaves one). `ShardError` naming `fpath`
    and the first entry that disagrees.
    """
    if not isinstance(listed, list):
        raise ShardError(f"{fpath} is not a valid shard list: a JSON list of {{name, {count_key}}} expected")
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict) or set(entry) != {"name", count_key}:
            raise ShardError(f"{fpath} is not a valid shard list: entry {i} is {entry!r}, not {{name, {count_key}}}")
        if type(entry["name"]) is not str or type(entry[count_key]) is not int:  # not true or 2.0, which equal 1 and 2
            raise ShardError(
                f"{fpath}: entry {i} field '{count_key}' must be an integer and 'name' a string, got {entry!r}"
            )
    if len(listed) < md.n_shards:
        raise ShardError(
            f"{fpath} does not match the shard sizing of {md_fpath}: it lists {len(listed)} shards, {md.n_shards} needed"
        )
    for i, entry in enumerate(listed):
        expected = {"name": shard_name(i), count_key: md.shard_n_imgs(i) if i < md.n_shards else 0}
        if entry != expected:
            raise ShardError(
                f"{fpath} does not match the shard sizing of {md_fpath}: entry {i} is {entry!r}, expected {expected!r}"
            )
    return len(listed)


class Shards:
    """Read-only view of a dump directory, validated up front (every file present with the size the metadata implies)."""

    @beartype.beartype
    def __init__(self, dpath: pathlib.Path | str):
        self.dpath = pathlib.Path(dpath)
        md_fpath = self.dpath / "metadata.json"
        labels_json_fpath = self.dpath / LABELS_JSON
        try:
            obj = json.loads(md_fpath.read_text())
            labels = json.loads(labels_json_fpath.read_text()) if labels_json_fpath.exists() else None
            if labels is not None and not isinstance(labels, dict):
                raise ShardError(f"{labels_json_fpath} is not a JSON object of label fields")
            if not isinstance(obj, dict):
                raise ShardError(f"{md_fpath} is not a JSON object of metadata fields")
            for name, tp in V1_TYPES.items():
                if name in obj:
                    check_field(obj, name, tp, md_fpath)
            check_label_fields(
                labels if labels is not None else obj, labels_json_fpath if labels is not None else md_fpath
            )
            self.metadata = Metadata.from_json(obj, labels)
        except FileNotFoundError:
            raise ShardError(f"{md_fpath} is missing; is {self.dpath} a finished dump?") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ShardError(f"{md_fpath} is not valid shard metadata: {err}") from err
        md = self.metadata
        if md.protocol not in READ_PROTOCOLS:
            raise ShardError(
                f"{md_fpath}: protocol {md.protocol!r} is not one this reader knows ({', '.join(READ_PROTOCOLS)}); "
                "other saev layouts are adopted with [dump.adopt]"
            )
        if md.dtype != "float32":
            raise ShardError(f"{md_fpath}: dtype {md.dtype!r} is not supported (protocol v1 stores float32)")
        shards_fpath = self.dpath / "shards.json"
        try:
            listed = json.loads(shards_fpath.read_text())
        except FileNotFoundError:
            raise ShardError(f"{shards_fpath} is missing") from None
        except json.JSONDecodeError as err:
            raise ShardError(f"{shards_fpath} is not a valid shard list: {err}") from err
        try:
            _ = md.n_shards
        except ShardValueError as err:
            raise ShardValueError(f"{md_fpath}: {err}") from None
        n_listed = check_shard_list(listed, md, shards_fpath, md_fpath)
        for shard in range(n_listed):
            check_shard_file(self.dpath, md, shard)
        labels_fpath = self.dpath / "labels.bin"
        self._labels = None
        if labels_fpath.exists():
            expected = md.n_imgs * md.n_patches_per_img * np.dtype(md.labels_dtype).itemsize
            if labels_fpath.stat().st_size != expected:
                raise ShardError(f"{labels_fpath} has {labels_fpath.stat().st_size} bytes, expected {expected}")
        self._mmaps: dict[int, np.memmap] = {}

    @property
    def n_imgs(self) -> int:
        return self.metadata.n_imgs

    @property
    def labels(self) -> np.ndarray:
        """Per-patch class ids [n_imgs, n_patches_per_img] (memory-mapped), checked on first read.

        Every id is `labels_ignore` or within [0, len(class_names)) (only >= 0 when the metadata names no classes);
        otherwise a `ShardValueError` names labels.bin and the first bad (image, patch, value).
        """
        if self._labels is None:
            fpath = self.dpath / "labels.bin"
            if not fpath.exists():
                raise ShardError(f"{fpath} is missing: this dump has no labels")
            md = self.metadata
            labels = np.memmap(fpath, dtype=md.labels_dtype, mode="r", shape=(md.n_imgs, md.n_patches_per_img))
            check_labels(labels, md, fpath)
            self._labels = labels
        return self._labels

    def shard(self, shard: int) -> np.memmap:
        """Memory map of one shard, [n_imgs_in_shard, n_layers, n_tokens_per_img, d_vit]."""
        if shard not in self._mmaps:
            md = self.metadata
            shape = (md.shard_n_imgs(shard), len(md.layers), md.n_tokens_per_img, md.d_vit)
            self._mmaps[shard] = np.memmap(self.dpath / shard_name(shard), dtype=np.float32, mode="r", shape=shape)
        return self._mmaps[shard]

    def layer_index(self, layer: int) -> int:
        if layer not in self.metadata.layers:
            raise ValueError(f"layer {layer} was not dumped; dumped layers: {list(self.metadata.layers)}")
        return self.metadata.layers.index(layer)

    def patches(self, layer: int, img_start: int, img_stop: int) -> np.ndarray:
        """Patch activations (no CLS) of images [img_start, img_stop) at `layer`: float32 [n, n_patches, d_vit]."""
        md = self.metadata
        if not 0 <= img_start <= img_stop <= md.n_imgs:
            raise IndexError(f"image range [{img_start}, {img_stop}) is not within [0, {md.n_imgs})")
        li, t0 = self.layer_index(layer), int(md.cls_token)
        out = np.empty((img_stop - img_start, md.n_patches_per_img, md.d_vit), dtype=np.float32)
        per = md.n_imgs_per_shard
        i = img_start
        while i < img_stop:
            shard, offset = divmod(i, per)
            take = min(img_stop - i, md.shard_n_imgs(shard) - offset)
            block = out[i - img_start : i - img_start + take]
            block[...] = self.shard(shard)[offset : offset + take, li, t0:, :]
            if not _all_finite(block):
                bad = np.flatnonzero(~np.isfinite(block).reshape(take * md.n_patches_per_img, -1).all(axis=1))[0]
                img, patch = divmod(int(bad), md.n_patches_per_img)
                self._raise_nonfinite(shard, i + img, patch, layer)
            i += take
        return out

    def patches_flat(self, layer: int, idx: np.ndarray) -> np.ndarray:
        """Activations of global patch indices `idx` (image * n_patches + patch) at `layer`: float32 [len(idx), d_vit]."""
        md = self.metadata
        li, t0 = self.layer_index(layer), int(md.cls_token)
        idx = np.asarray(idx, dtype=np.int64)
        n_total = md.n_imgs * md.n_patches_per_img
        if idx.ndim != 1:
            raise ValueError(f"patch indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= n_total):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise IndexError(
                f"patch index {bad} is not within [0, {n_total}) ({md.n_imgs} images x {md.n_patches_per_img} patches)"
            )
        img, patch = np.divmod(idx, md.n_patches_per_img)
        shard_of = img // md.n_imgs_per_shard
        out = np.empty((len(idx), md.d_vit), dtype=np.float32)
        for shard in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == shard)
            local = img[sel] - shard * md.n_imgs_per_shard
            block = self.shard(int(shard))[local, li, t0 + patch[sel], :]
            if not _all_finite(block):
                bad = sel[np.flatnonzero(~np.isfinite(block).all(axis=1))[0]]
                self._raise_nonfinite(int(shard), int(img[bad]), int(patch[bad]), layer)
            out[sel] = block
        return out

    def _raise_nonfinite(self, shard: int, img: int, patch: int, layer: int) -> typing.NoReturn:
        raise ShardValueError(
            f"{self.dpath / shard_name(shard)}: NaN/inf activation at image {img}, patch {patch}, layer {layer}; "
            "the dump is corrupt, delete it and rerun the dump stage"
        )


def _all_finite(x: np.ndarray) -> bool:
    """Whether every value is finite: NaN propagates through min and max, so two passes without a temporary array."""
    return not x.size or bool(np.isfinite(x.min()) and np.isfinite(x.max()))


def check_labels(labels: np.ndarray, md: Metadata, fpath: pathlib.Path | str) -> None:
    """Refuse class ids outside [0, len(md.class_names)) other than `md.labels_ignore` (vectorised, whole array).

    With no class names in the metadata only negative ids (other than the ignore label) are refused.

    Raises:
        ShardValueError: naming `fpath` and the first bad (image, patch, value).
    """
    n_classes = len(md.class_names)
    flat = np.asarray(labels).reshape(-1)
    bad = flat < 0 if not n_classes else (flat < 0) | (flat >= n_classes)
    bad &= flat != md.labels_ignore
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        img, patch = divmod(first, md.n_patches_per_img)
        allowed = f"[0, {n_classes})" if n_classes else ">= 0"
        raise ShardValueError(
            f"{fpath}: class id {int(flat[first])} at image {img}, patch {patch} is not in {allowed} nor the "
            f"ignore label {md.labels_ignore} ({int(bad.sum())} bad patches); the labels do not match the "
            f"{n_classes} classes of the metadata"
        )
