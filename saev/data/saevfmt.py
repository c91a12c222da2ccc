"""The saev library's shard layouts: read a v1 (protocol "1.0.0") or 2.x (protocol "2.1") shard directory so that it
can be adopted as a dump artifact in place, and export a dump in the 2.x layout.

Facts (shared/notes/saev-formats.md, and the saev source): v1 metadata.json has `vit_family, vit_ckpt, layers,
n_patches_per_img, cls_token, d_vit, n_imgs, max_patches_per_shard, data, dtype, protocol` and shards.json entries
`{name, n_imgs}`. 2.x (the released saev 2.1 `Metadata`, a frozen dataclass refusing unknown keys) has `family,
ckpt, layers, content_tokens_per_example, cls_token, d_model, n_examples, max_tokens_per_shard, data, dataset,
pixel_agg, dtype, protocol` and entries `{name, n_examples}`; `content_tokens_per_example` is patches per example
(CLS excluded), `max_tokens_per_shard` the shard budget in activation vectors, `pixel_agg` a string or null. The older
spellings `patches_per_ex` and `patches_per_shard` (shared/notes/saev-formats.md) are still read; exports use the
released names. Every shard file has the full shard size (the last one padded), trailing entries of 0 examples may
follow, and `labels.bin` is uint8 [examples, patches] with no class names and no ignore value in the metadata. `data`
is a base64 pickle in 2.x: it is kept as opaque text, never unpickled.

An adopted directory is never copied or written: the dump artifact holds our translated `metadata.json`,
`labels.json` and `shards.json`, a `source.json` (where it came from, and its metadata and shard list verbatim), and
symbolic links to the source's shard files and labels.bin. Each link's target is hashed once when adopted and its
checksum recorded in the artifact, so a later change of the source file is caught like any damaged file.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import typing

import beartype
import numpy as np

from saev import artifacts, atomic, checksums, helpers
from saev.data import shards as shards_
from saev.data.shards import Metadata, ShardError, ShardValueError

V2_PROTOCOL = "2.1"
"""The 2.x protocol string we read and write."""
SOURCE_PROTOCOLS = ("1.0.0", "1.1.0", V2_PROTOCOL)
"""Protocols of shard directories that can be adopted ("1.1.0": dumps of earlier versions of this pipeline)."""
V2_KEYS = ("family", "ckpt", "layers", "content_tokens_per_example", "cls_token", "d_model", "n_examples",
           "max_tokens_per_shard", "data", "dataset", "pixel_agg", "dtype", "protocol")  # fmt: skip
"""The fields of a 2.1 metadata.json, in the released `Metadata`'s order (all written; pixel_agg may be null)."""
V2_ALIASES = {"patches_per_ex": "content_tokens_per_example", "patches_per_shard": "max_tokens_per_shard"}
"""Older spellings of 2.x fields (still read) -> the released name, which exports write."""
V2_DATA_CLASS = "Saev2Data"
"""`__class__` of the `data` entry of an adopted 2.x dump: its `data`, `dataset` and `pixel_agg`, kept verbatim."""
SOURCE_JSON = "source.json"
"""In an adopted dump artifact: the source directory, its metadata.json and shards.json as they were read."""
LABELS_BIN = "labels.bin"


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Source:
    """A saev shard directory read and checked (sizes and shapes; nothing but the two JSON files is read)."""

    dpath: pathlib.Path
    """The directory (absolute, resolved)."""
    protocol: str
    """Its protocol string."""
    metadata: Metadata
    """Its metadata translated to ours, with the label fields given to `read_source`."""
    raw_metadata: dict[str, typing.Any]
    """metadata.json as read."""
    raw_shards: list[typing.Any]
    """shards.json as read."""
    n_listed: int
    """Shard files listed (trailing entries of 0 images included)."""
    has_labels: bool
    """Whether it holds labels.bin (checked for size)."""

    @property
    def linked(self) -> list[str]:
        """The files `adopt` links into the artifact: every listed shard, then labels.bin if present."""
        return [shards_.shard_name(s) for s in range(self.n_listed)] + ([LABELS_BIN] if self.has_labels else [])

    @property
    def read_names(self) -> list[str]:
        """Every file of the directory that adopting it reads or links (labels.json: a dump of this pipeline's)."""
        own = [shards_.LABELS_JSON] if self.protocol == "1.0.0" and (self.dpath / shards_.LABELS_JSON).is_file() else []
        return ["metadata.json", "shards.json", *own, *self.linked]


@beartype.beartype
def read_source(dpath: pathlib.Path, *, class_names: tuple[str, ...] = (), ignore: int | None = None) -> Source:
    """Read and check a saev shard directory (v1 or 2.x layout): metadata.json, shards.json against the shard sizing,
    every listed shard file at the full shard size, labels.bin's size if present. The label fields are
    `class_names` and `ignore` (`dump.adopt.ignore`; None: not set, 255). A dump of this pipeline (labels.json, or
    protocol "1.1.0") keeps its labels dtype, its class names when `class_names` is empty, and its ignore value unless
    `ignore` is set (so an int16 dump keeps -1).

    Raises:
        ShardError: one line naming the file and field: not a shard directory, a protocol we do not know, a missing
            or malformed field (integers must be real integers, not true or 2.0), a shard list that disagrees with
            the metadata, a missing or truncated shard file, a malformed labels.json field, an ignore value that
            is a class id or does not fit the labels dtype.
    """
    dpath = dpath.expanduser().resolve()
    md_fpath, list_fpath = dpath / "metadata.json", dpath / "shards.json"
    if not dpath.is_dir():
        raise ShardError(f"{dpath} is not a directory of saev shards (metadata.json, shards.json, acts000000.bin...)")
    for fpath in (md_fpath, list_fpath):
        if not fpath.exists():
            raise ShardError(f"{fpath} is missing: {dpath} is not a saev shard directory")
    obj, listed = _read_json(md_fpath), _read_json(list_fpath)
    if not isinstance(obj, dict):
        raise ShardError(f"{md_fpath} is not a JSON object of metadata fields")
    protocol = obj.get("protocol")
    if protocol not in SOURCE_PROTOCOLS:
        raise ShardError(
            f"{md_fpath}: field 'protocol' is {protocol!r}, not one we know ({', '.join(SOURCE_PROTOCOLS)})"
        )
    labels_dtype, has_own_labels = "uint8", False
    if protocol == V2_PROTOCOL:
        obj2 = dict(obj)
        for alias, name in V2_ALIASES.items():
            if alias in obj2:
                if name in obj2:
                    raise ShardError(f"{md_fpath}: fields '{alias}' and '{name}' are the same field; keep one")
                obj2[name] = obj2.pop(alias)
        keys, count_key = V2_KEYS, "n_examples"
    else:
        obj2, keys, count_key = obj, shards_.V1_KEYS, "n_imgs"
    extra = sorted(set(obj2) - set(keys) - (set(shards_.LABEL_KEYS) if protocol == "1.1.0" else set()))
    missing = [k for k in keys if k not in obj2]
    if missing:
        raise ShardError(f"{md_fpath}: field '{missing[0]}' is missing (protocol {protocol} needs {', '.join(keys)})")
    if extra:
        raise ShardError(f"{md_fpath}: field '{extra[0]}' is not a field of protocol {protocol}")
    if protocol == V2_PROTOCOL:
        field = shards_.check_field
        md = Metadata(
            vit_family=field(obj2, "family", str, md_fpath),
            vit_ckpt=field(obj2, "ckpt", str, md_fpath),
            layers=tuple(field(obj2, "layers", list, md_fpath)),
            n_patches_per_img=field(obj2, "content_tokens_per_example", int, md_fpath),
            cls_token=field(obj2, "cls_token", bool, md_fpath),
            d_vit=field(obj2, "d_model", int, md_fpath),
            n_imgs=field(obj2, "n_examples", int, md_fpath),
            max_patches_per_shard=field(obj2, "max_tokens_per_shard", int, md_fpath),
            data={
                "__class__": V2_DATA_CLASS,
                "data": field(obj2, "data", str, md_fpath),
                "dataset": field(obj2, "dataset", str, md_fpath),
                "pixel_agg": field(obj2, "pixel_agg", (str, type(None)), md_fpath),  # kept verbatim, null included
            },
            dtype=field(obj2, "dtype", str, md_fpath),
            protocol=protocol,
        )
    else:
        for name, tp in shards_.V1_TYPES.items():
            shards_.check_field(obj2, name, tp, md_fpath)
        own_fpath = dpath / shards_.LABELS_JSON  # a dump of this pipeline: its label fields beside metadata.json
        own = _read_json(own_fpath) if protocol == "1.0.0" and own_fpath.exists() else None
        if own is not None and not isinstance(own, dict):
            raise ShardError(f"{own_fpath} is not a JSON object of label fields")
        shards_.check_label_fields(own if own is not None else obj2, own_fpath if own is not None else md_fpath)
        md = Metadata.from_json(obj2, own)
        labels_dtype = md.labels_dtype
        has_own_labels = protocol == "1.1.0" or own is not None
    for name, value in (("layers", len(md.layers)), ("patches per image", md.n_patches_per_img),
                        ("d_model", md.d_vit), ("examples", md.n_imgs)):  # fmt: skip
        if value < 1:
            raise ShardError(f"{md_fpath}: {name} must be at least 1, got {value}")
    twice = sorted({layer for layer in md.layers if md.layers.count(layer) > 1})
    if twice:  # each slot of a shard holds one layer: `train.layer` would read only the first of the same name
        raise ShardError(f"{md_fpath}: field 'layers' lists layer {twice[0]} more than once ({list(md.layers)})")
    if md.dtype != "float32":
        raise ShardError(f"{md_fpath}: field 'dtype' is {md.dtype!r}; only 'float32' is supported")
    # Our own dumps name their classes and ignore value; the config's class names and ignore value, when given, win.
    own_ignore = has_own_labels and ignore is None
    md = dataclasses.replace(
        md,
        labels_dtype=labels_dtype,
        labels_ignore=md.labels_ignore if own_ignore else 255 if ignore is None else ignore,
        class_names=md.class_names if has_own_labels and not class_names else class_names,
    )
    where = (f"{dpath / shards_.LABELS_JSON if protocol == '1.0.0' else md_fpath}: field 'labels_ignore'" if own_ignore
             else "dump.adopt.ignore" if ignore is not None else "the default ignore value (dump.adopt.ignore)")  # fmt: skip
    shards_.check_ignore(md.labels_ignore, labels_dtype, len(md.class_names), where)
    try:
        _ = md.n_shards
    except ShardValueError as err:
        raise ShardValueError(f"{md_fpath}: {err}") from None
    n_listed = shards_.check_shard_list(listed, md, list_fpath, md_fpath, count_key)
    hint = f"; saev writes every shard of {dpath} at full size: is the directory complete?"
    for shard in range(n_listed):  # only our own earlier dumps ("1.1.0") truncated the last shard
        shards_.check_shard_file(dpath, md, shard, hint, allow_truncated=protocol == "1.1.0")
    labels_fpath = dpath / LABELS_BIN
    if labels_fpath.exists():
        expected = md.n_imgs * md.n_patches_per_img * np.dtype(labels_dtype).itemsize
        size = helpers.check_regular_file(labels_fpath, what="labels", max_bytes=None, error=ShardError)
        if size != expected:
            raise ShardError(
                f"{labels_fpath} has {size} bytes, expected {expected} ({labels_dtype} [examples, patches])"
            )
    return Source(dpath, protocol, md, obj, listed, n_listed, labels_fpath.exists())


def _read_json(fpath: pathlib.Path) -> typing.Any:
    """A JSON file of a source directory (bounded: `helpers.read_regular_file`), or `ShardError` naming it."""
    data = helpers.read_regular_file(fpath, what="metadata", error=ShardError)
    try:
        return json.loads(data)
    except ValueError as err:  # also UnicodeDecodeError
        raise ShardError(f"{fpath}: cannot read it: not JSON ({err})") from None


@beartype.beartype
def check_source_labels(source: Source) -> None:
    """Read the source's labels.bin once and refuse a class id that is neither a class of `metadata.class_names`
    nor the ignore value (`ShardValueError` naming the file, the first bad patch and the class count)."""
    md = source.metadata
    fpath = source.dpath / LABELS_BIN
    labels = np.memmap(fpath, dtype=md.labels_dtype, mode="r", shape=(md.n_imgs, md.n_patches_per_img))
    shards_.check_labels(labels, md, fpath)


@beartype.beartype
def adopt(source: Source, dpath: pathlib.Path) -> None:
    """Fill the artifact directory `dpath` with links to the source's files and our translated JSON files.

    Each link is made atomically (a temporary link renamed onto its name) and its target hashed once, the checksum
    recorded beside the link (`checksums.write_record`), so the manifest and every later check cover the external
    files. The source is only read.
    """
    dpath.mkdir(parents=True, exist_ok=True)
    for name in source.linked:
        link = dpath / name
        link_atomically(source.dpath / name, link)
        st = link.stat()  # the target's, taken before hashing: a write during it shows as a change later
        checksums.write_record(link, st.st_size, checksums.file_checksum(link), checksums.stat_sig(st))
    md = source.metadata
    listed = [{"name": shards_.shard_name(s), "n_imgs": md.shard_n_imgs(s) if s < md.n_shards else 0}
              for s in range(source.n_listed)]  # fmt: skip
    atomic.atomic_write_json(dpath / SOURCE_JSON, {
        "dpath": str(source.dpath), "protocol": source.protocol,
        "metadata": source.raw_metadata, "shards": source.raw_shards,
    })  # fmt: skip
    atomic.atomic_write_json(dpath / "shards.json", listed)
    atomic.atomic_write_json(dpath / shards_.LABELS_JSON, md.labels_json())
    atomic.atomic_write_json(dpath / "metadata.json", md.to_json())


def link_atomically(target: pathlib.Path, link: pathlib.Path) -> None:
    """Make `link` a symbolic link to `target`: a temporary link renamed onto it, so that it replaces only our own
    link (or a leftover of ours), never the target."""
    tmp = link.with_name(f".{link.name}{checksums.TMP_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def v2_hash(metadata: dict[str, typing.Any]) -> str:
    """saev's name for a 2.x shard directory: the first 8 hex characters of the sha256 of metadata.json's fields as
    compact JSON with sorted keys (no spaces, non-ASCII characters as UTF-8, not escaped; as orjson's OPT_SORT_KEYS)."""
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


SHARDS_SUBDIR = ("saev", "shards")
"""Where saev keeps its shard directories under its scratch root: its 2.x readers refuse a directory whose path does
not end in `saev/shards/<dir>`, so an export is written as `OUT/saev/shards/<HASH>/`."""
CLASSES_TXT = "classes.txt"
"""In an exported shard directory: the dump's class names, one a line (saev's metadata holds none)."""


class Export(typing.NamedTuple):
    """An export of a dump, planned and checked against what is already there (`plan_export`)."""

    dpath: pathlib.Path
    """`OUT/saev/shards/<HASH>`."""
    texts: dict[str, str]
    """The text files written beside the shards: classes.txt (when the dump names classes), shards.json, then
    metadata.json (last: a directory with metadata.json is complete)."""
    exists: bool
    """An earlier export left exactly these files there: nothing to write."""


@beartype.beartype
def plan_export(shards: shards_.Shards, out_dpath: pathlib.Path, *, dataset: str, pixel_agg: str | None) -> Export:
    """Plan writing the dump `shards` in the 2.x layout as `out_dpath/saev/shards/<HASH>/`, and check what is there.

    metadata.json has the fields of the released saev 2.1 `Metadata` (`content_tokens_per_example`,
    `max_tokens_per_shard`; `data` is the JSON of our dataset config as text, or an adopted 2.x dump's own `data`,
    `dataset` and `pixel_agg`, verbatim), shards.json entries `{name, n_examples}`, every shard at full size (the last
    padded with zeros), labels.bin as uint8, classes.txt the class names. HASH covers the metadata only
    (`v2_hash`), so a directory of that name that already exists (an earlier export) is reused only if it holds
    exactly what would be written (file names, sizes, checksums: `check_export`). Nothing is written.

    Raises:
        ShardError: the labels need int16 (255 classes or more): saev's labels.bin is uint8 (`check_exportable`);
            or an earlier export of the same metadata holds other files or contents (the message names the file).
    """
    check_exportable(shards)
    md = shards.metadata
    if md.data.get("__class__") == V2_DATA_CLASS:  # adopted from 2.x: its own fields, verbatim (pixel_agg may be null)
        data, dataset, pixel_agg = md.data["data"], md.data["dataset"], md.data["pixel_agg"]
    else:
        data = artifacts.canonical_json(md.data)
    meta = {
        "family": md.vit_family, "ckpt": md.vit_ckpt, "layers": list(md.layers),
        "content_tokens_per_example": md.n_patches_per_img, "cls_token": md.cls_token, "d_model": md.d_vit,
        "n_examples": md.n_imgs, "max_tokens_per_shard": md.max_patches_per_shard, "data": data, "dataset": dataset,
        "pixel_agg": pixel_agg, "dtype": "float32", "protocol": V2_PROTOCOL,
    }  # fmt: skip
    listed = [{"name": shards_.shard_name(s), "n_examples": md.shard_n_imgs(s)} for s in range(md.n_shards)]
    texts = {CLASSES_TXT: "".join(f"{n}\n" for n in md.class_names)} if md.class_names else {}
    texts |= {"shards.json": json.dumps(listed, indent=2) + "\n", "metadata.json": json.dumps(meta, indent=2) + "\n"}
    final = out_dpath.joinpath(*SHARDS_SUBDIR, v2_hash(meta))
    if final.exists() or final.is_symlink():
        check_export(shards, final, texts)
        return Export(final, texts, True)
    return Export(final, texts, False)


@beartype.beartype
def write_export(shards: shards_.Shards, export: Export) -> None:
    """Write a planned export (nothing if `export.exists`): into a temporary directory beside it, renamed at the end.

    Every shard's blocks are reserved before it is copied (`os.posix_fallocate`): a full disk fails there, as an
    error, and the padding of the last shard is real zeros, not a hole: saev's readers memory-map every shard at full
    size, and reading a hole through a memory map on a full tmpfs kills the reader with SIGBUS.

    Raises:
        WriteError: a file could not be written (disk full, permissions); the message names it. The temporary
            directory is removed.
        ShardError: another export of the same metadata appeared meanwhile and differs (`check_export`).
    """
    if export.exists:
        return
    md, final = shards.metadata, export.dpath
    names = [shards_.shard_name(s) for s in range(md.n_shards)]
    names += [LABELS_BIN] if (shards.dpath / LABELS_BIN).exists() else []
    tmp = final.with_name(f".{final.name}{checksums.TMP_MARK}{os.getpid()}")
    name = ""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in names:
            with open(shards.dpath / name, "rb") as src, open(tmp / name, "wb") as dst:
                size = md.shard_bytes if name != LABELS_BIN else (shards.dpath / name).stat().st_size
                if size:
                    os.posix_fallocate(dst.fileno(), 0, size)  # a truncated last shard (earlier versions): zeros
                shutil.copyfileobj(src, dst, 16 << 20)
        for name, text in export.texts.items():  # metadata.json last
            (tmp / name).write_text(text, encoding="utf-8")
        name = ""
        os.rename(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not name and final.is_dir():  # another export of the same metadata won the race: it must be identical
            check_export(shards, final, export.texts)
            return
        raise atomic.write_error(err, final / name if name else final) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@beartype.beartype
def export(shards: shards_.Shards, out_dpath: pathlib.Path, *, dataset: str, pixel_agg: str | None) -> pathlib.Path:
    """Write the dump `shards` in the 2.x layout as `out_dpath/saev/shards/<HASH>/` (`plan_export`, `write_export`),
    or reuse an identical earlier export; return that directory."""
    planned = plan_export(shards, out_dpath, dataset=dataset, pixel_agg=pixel_agg)
    write_export(shards, planned)
    return planned.dpath


@beartype.beartype
def check_exportable(shards: shards_.Shards) -> None:
    """Refuse a dump whose labels cannot be written in saev's layout (int16: 255 classes or more; saev's labels.bin is
    uint8), with a one-line `ShardError` naming labels.json and its field. Nothing is read but the metadata."""
    md = shards.metadata
    if (shards.dpath / LABELS_BIN).exists() and md.labels_dtype != "uint8":
        raise ShardError(
            f"{shards.dpath / shards_.LABELS_JSON}: labels_dtype is {md.labels_dtype!r} ({len(md.class_names)} "
            "classes); saev's labels.bin is uint8 (at most 255 classes, 255 unlabelled): cannot export these labels"
        )


def check_export(shards: shards_.Shards, final: pathlib.Path, texts: dict[str, str]) -> None:
    """An earlier export `final` of the same metadata must hold exactly what `export` would write: the same file
    names, `texts` (classes.txt, shards.json, metadata.json) byte for byte, each shard and labels.bin at its size and with the
    checksum of the dump's file (recorded at dump or adopt time; a truncated last shard is hashed with its padding).
    Sizes are compared first; the export's files are then read once.

    Raises:
        ShardError: one line naming the differing file, what differs, and what to do (remove it, or export elsewhere).
    """
    md = shards.metadata
    names = [shards_.shard_name(s) for s in range(md.n_shards)]
    names += [LABELS_BIN] if (shards.dpath / LABELS_BIN).exists() else []
    sizes = {name: md.shard_bytes for name in names} | ({LABELS_BIN: (shards.dpath / LABELS_BIN).stat().st_size}
                                                        if LABELS_BIN in names else {})  # fmt: skip
    todo = (f"it was exported from other data or class names with the same metadata (e.g. labels edited in place): "
            f"remove {final} or export to another directory")  # fmt: skip
    if final.is_symlink() or not final.is_dir():
        raise ShardError(f"{final} is not a directory (an export writes one there); {todo}")
    present = sorted(p.name for p in final.iterdir())
    if present != sorted([*names, *texts]):
        extra = sorted(set(present) - set(names) - set(texts)) or ["-"]
        missing = sorted((set(names) | set(texts)) - set(present)) or ["-"]
        raise ShardError(
            f"{final}: an earlier export holds other files (extra: {extra[0]}, missing: {missing[0]}); {todo}"
        )
    for name, text in texts.items():
        if (final / name).read_bytes() != text.encode():
            raise ShardError(f"{final / name} differs from what this export writes; {todo}")
    for name in names:
        size = (final / name).stat().st_size
        if size != sizes[name]:
            raise ShardError(f"{final / name} has {size} bytes, this export writes {sizes[name]}; {todo}")
    for name in names:
        if checksums.file_checksum(final / name) != _padded_checksum(shards.dpath / name, sizes[name]):
            raise ShardError(f"{final / name} does not have the checksum of {shards.dpath / name}; {todo}")


def _padded_checksum(fpath: pathlib.Path, size: int) -> str:
    """Checksum of `fpath` zero-padded to `size` bytes: when it has that size already, its current checksum (the one
    recorded beside it while the file is unchanged since: a dump's files are hashed as written, adopted ones when
    linked), else read and hashed."""
    if fpath.stat().st_size == size:
        return checksums.current_checksum(fpath)
    hasher, n = checksums.new_hasher(), 0
    with open(fpath, "rb") as fd:
        while chunk := fd.read(16 << 20):
            hasher.update(chunk)
            n += len(chunk)
    while n < size:
        pad = min(size - n, 16 << 20)
        hasher.update(bytes(pad))
        n += pad
    return hasher.hexdigest()
