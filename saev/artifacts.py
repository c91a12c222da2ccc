"""Content-hashed artifacts: keys, atomic writes, manifests and completeness checks.

Every stage output is a directory `<root>/<stage>/<key>/`. The key is a hash of a canonical JSON of
{stage, format version, every result-changing config field, the keys of the inputs}, so the keys of a whole
graph are known before anything runs. `manifest.json` is written last, atomically: no manifest means not done.
Every other file is written atomically too (temp file in the same directory, fsync, rename), so a killed job
leaves either a whole file or none, never a torn one.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator, Mapping

import beartype

MANIFEST = "manifest.json"
"""Name of the file whose presence marks an artifact as done."""

_TMP_MARK = ".tmp-"


class IncompleteArtifactError(RuntimeError):
    """An artifact that a stage needs is missing, has no manifest, or lost a file."""


class ArtifactBusyError(RuntimeError):
    """Another process holds the lock of this artifact (it is being written now)."""


class WriteError(OSError):
    """Writing a piece of an artifact failed (disk full, permissions); nothing was marked done."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


###############
# Hashed keys #
###############


def unhashed(default: object = dataclasses.MISSING, **kwargs: object) -> typing.Any:
    """A dataclass field that does not change a stage's output (devices, batch sizes, log paths).

    Such fields are left out of artifact keys, so changing them recomputes nothing.
    """
    metadata = {"hashed": False}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@beartype.beartype
def hashed_params(obj: object) -> object:
    """The result-changing part of a config as plain JSON types.

    Dataclasses become dicts without their `unhashed` fields (plus a `__class__` entry so that two config classes
    with the same fields never collide); tuples become lists; everything else must already be JSON-serialisable.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, object] = {"__class__": type(obj).__name__}
        for field in dataclasses.fields(obj):
            if field.metadata.get("hashed", True):
                out[field.name] = hashed_params(getattr(obj, field.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [hashed_params(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): hashed_params(v) for k, v in obj.items()}
    if isinstance(obj, pathlib.Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot hash config value of type {type(obj).__name__}: {obj!r}")


@beartype.beartype
def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no whitespace; NaN/inf are refused so that keys are portable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@beartype.beartype
def get_key(stage: str, version: int, params: object, inputs: Mapping[str, str]) -> str:
    """Content key of an artifact: 16 hex chars of sha256 over stage, format version, params and input keys.

    Args:
        stage: stage name, e.g. "train".
        version: the stage's output format version; bump it when the format or algorithm changes.
        params: result-changing parameters (see `hashed_params`).
        inputs: input name -> "stage/key" of each input artifact.
    """
    payload = {"stage": stage, "version": version, "params": params, "inputs": dict(inputs)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:16]


#################
# Atomic writes #
#################


@contextlib.contextmanager
def atomic_path(fpath: pathlib.Path | str) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `fpath`; on success fsync it and rename it onto `fpath`.

    On any exception the temporary file is removed and `fpath` is left untouched. A full disk or a permission
    problem surfaces as `WriteError` naming the file.
    """
    fpath = pathlib.Path(fpath)
    tmp_fpath = fpath.with_name(f".{fpath.name}{_TMP_MARK}{os.getpid()}")
    try:
        fpath.parent.mkdir(parents=True, exist_ok=True)
        yield tmp_fpath
        with open(tmp_fpath, "rb") as fd:
            os.fsync(fd.fileno())
        os.replace(tmp_fpath, fpath)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp_fpath.unlink(missing_ok=True)
        if isinstance(err, WriteError):
            raise
        hint = " (disk full?)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise WriteError(err.errno, f"could not write {fpath}{hint}: {err.strerror or err}") from err
    except BaseException:
        tmp_fpath.unlink(missing_ok=True)
        raise
    _fsync_dir(fpath.parent)


def _fsync_dir(dpath: pathlib.Path) -> None:
    try:
        fd = os.open(dpath, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@beartype.beartype
def atomic_write_bytes(fpath: pathlib.Path | str, data: bytes) -> None:
    """Write `data` to `fpath` atomically."""
    with atomic_path(fpath) as tmp_fpath:
        with open(tmp_fpath, "wb") as fd:
            fd.write(data)


@beartype.beartype
def atomic_write_json(fpath: pathlib.Path | str, obj: object) -> None:
    """Write `obj` as indented JSON to `fpath` atomically; NaN/inf are refused (use None)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(fpath, text.encode("utf-8"))


def atomic_save_npy(fpath: pathlib.Path | str, array: "np.ndarray") -> None:
    """Save a numpy array as .npy atomically (no pickled objects)."""
    import numpy as np

    with atomic_path(fpath) as tmp_fpath:
        with open(tmp_fpath, "wb") as fd:
            np.save(fd, array, allow_pickle=False)


@beartype.beartype
def remove_temp_files(dpath: pathlib.Path, name: str = "*") -> int:
    """Delete leftover temporary files of `atomic_path` for `name` (default: every file) directly in `dpath`.

    Only call it while holding the lock that covers those files: a killed job leaves its temp file behind, a
    running one still needs it. Returns how many were removed.
    """
    n = 0
    for fpath in dpath.glob(f".{name}{_TMP_MARK}*"):
        fpath.unlink(missing_ok=True)
        n += 1
    return n


@beartype.beartype
def is_temp(fpath: pathlib.Path) -> bool:
    """Whether `fpath` is a leftover temporary file of `atomic_path` (never part of an artifact)."""
    return _TMP_MARK in fpath.name


#############
# Artifacts #
#############


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Artifact:
    """One stage output directory `<root>/<stage>/<key>/`."""

    root: pathlib.Path
    """Root of the artifact store (e.g. `runs/`)."""
    stage: str
    """Stage that writes it."""
    key: str
    """Content key (see `get_key`)."""

    @property
    def dpath(self) -> pathlib.Path:
        return self.root / self.stage / self.key

    @property
    def ref(self) -> str:
        """Short reference used in manifests and messages: `stage/key`."""
        return f"{self.stage}/{self.key}"

    @property
    def manifest_fpath(self) -> pathlib.Path:
        return self.dpath / MANIFEST

    def is_done(self) -> bool:
        """Cheap check: the manifest exists (it is written last, atomically)."""
        return self.manifest_fpath.is_file()

    def read_manifest(self) -> dict[str, typing.Any]:
        """The parsed manifest; `IncompleteArtifactError` if it is missing or unreadable."""
        try:
            with open(self.manifest_fpath) as fd:
                return json.load(fd)
        except FileNotFoundError:
            raise IncompleteArtifactError(
                f"{self.ref} is not done: {self.manifest_fpath} is missing"
            ) from None
        except (OSError, json.JSONDecodeError) as err:
            raise IncompleteArtifactError(f"{self.ref}: cannot read {self.manifest_fpath}: {err}") from err

    def verify(self) -> dict[str, typing.Any]:
        """Check the artifact is complete: manifest present and every listed file present with its size.

        Returns the manifest. Raises `IncompleteArtifactError` naming the first problem found.
        """
        manifest = self.read_manifest()
        for rel, size in manifest.get("files", {}).items():
            fpath = self.dpath / rel
            try:
                actual = fpath.stat().st_size
            except FileNotFoundError:
                raise IncompleteArtifactError(
                    f"{self.ref} is incomplete: {fpath} is missing (scratch purged?); rerun its stage"
                ) from None
            if actual != size:
                raise IncompleteArtifactError(
                    f"{self.ref} is incomplete: {fpath} has {actual} bytes, the manifest says {size}; rerun its stage"
                )
        return manifest

    def list_files(self) -> dict[str, int]:
        """Relative path -> size of every file in the directory except the manifest, locks and temp files."""
        files = {}
        if not self.dpath.is_dir():
            return files
        for fpath in sorted(self.dpath.rglob("*")):
            if not fpath.is_file() or fpath.name == MANIFEST or fpath.name.startswith("."):
                continue
            files[fpath.relative_to(self.dpath).as_posix()] = fpath.stat().st_size
        return files

    def write_manifest(
        self,
        *,
        params: object,
        inputs: Mapping[str, str],
        started: str,
        extra: Mapping[str, object] | None = None,
    ) -> dict[str, typing.Any]:
        """Mark the artifact done: write `manifest.json` (atomically, last) listing every file with its size."""
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "params": params,
            "inputs": dict(inputs),
            "files": self.list_files(),
            "started": started,
            "finished": now(),
            "host": socket.gethostname(),
            "slurm_job_id": _slurm_job_id(),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "git_commit": _git_commit(),
            "versions": _versions(),
            **dict(extra or {}),
        }
        atomic_write_json(self.manifest_fpath, manifest)
        return manifest

    @contextlib.contextmanager
    def lock(
        self, part: str = "", *, wait: bool = False, on_wait: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold an exclusive lock while writing this artifact (or one part of it, e.g. one K-block).

        If another process holds it: raise `ArtifactBusyError`, or with `wait` call `on_wait` (e.g. to log) and
        block until it is released. The lock is an flock on `<dpath>/.lock[-part]`, released when the process dies,
        so a killed job never leaves a stale lock behind.
        """
        self.dpath.mkdir(parents=True, exist_ok=True)
        lock_fpath = self.dpath / (f".lock-{part}" if part else ".lock")
        fd = os.open(lock_fpath, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise ArtifactBusyError(
                        f"{self.ref} is being written by another process (lock {lock_fpath})"
                    ) from None
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@beartype.beartype
def now() -> str:
    """Current UTC time in ISO 8601, seconds precision."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _slurm_job_id() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=pathlib.Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "open_clip"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions
