"""Atomic, checksummed writes: every file of an artifact is written to a temporary file in the same directory,
fsynced, its checksum recorded (`saev.checksums`) and renamed into place, so a killed job leaves either a whole file
or none, never a torn one, and every file carries the checksum it had when written.
"""

import contextlib
import errno
import json
import os
import pathlib
import typing
from collections.abc import Iterator

import beartype

from saev import checksums, errors

if typing.TYPE_CHECKING:
    import numpy as np

TMP_MARK = checksums.TMP_MARK
"""What names a temporary file of `atomic_path` (`.<name><TMP_MARK><pid>`)."""


class WriteError(errors.UserEnvironmentError, OSError):
    """Writing a piece of an artifact failed (disk full, permissions); nothing was marked done."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


@contextlib.contextmanager
def atomic_path(fpath: pathlib.Path | str) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `fpath`; on success fsync it, record its checksum and rename it onto `fpath`.

    The checksum goes to a hidden side file `.<name>.sum` (size and XXH3-128), written before the rename and again
    after it with the file's stat signature in place, so every file of an artifact carries the checksum it had when
    written; `Artifact.write_manifest` collects them (trusting one only while the file keeps that signature). Writers
    that stream large files hash while writing (`HashingFile`, `set_digest`); otherwise the temporary file is read
    back once (small files). On any exception the temporary file is removed and `fpath` is left untouched. A full
    disk or a permission problem surfaces as `WriteError` naming the file. Files follow the umask (0666 & ~umask).
    """
    fpath = pathlib.Path(fpath)
    tmp_fpath = fpath.with_name(f".{fpath.name}{TMP_MARK}{os.getpid()}")
    try:
        fpath.parent.mkdir(parents=True, exist_ok=True)
        yield tmp_fpath
        with open(tmp_fpath, "rb") as fd:
            os.fsync(fd.fileno())
        digest = _DIGESTS.pop(str(tmp_fpath), None)
        if digest is None:
            digest = checksums.file_checksum(tmp_fpath)
        tmp_st = tmp_fpath.stat()
        if digest:  # "" = deliberately unhashed (benchmarks measuring the cost of hashing)
            # Recorded before the rename, with no stat signature: if the job dies before the signature is added
            # below, the file is hashed before its checksum is trusted.
            checksums.write_record(fpath, tmp_st.st_size, digest)
        os.replace(tmp_fpath, fpath)
        if digest:
            # The signature of the file in place (the rename changes its ctime): while the file keeps it, the
            # checksum recorded here is what it holds. Not fsynced: losing it only means hashing the file again.
            st = fpath.stat()
            if (st.st_ino, st.st_size, st.st_mtime_ns) == (tmp_st.st_ino, tmp_st.st_size, tmp_st.st_mtime_ns):
                checksums.write_record(fpath, st.st_size, digest, checksums.stat_sig(st), sync=False)
    except OSError as err:
        _DIGESTS.pop(str(tmp_fpath), None)
        with contextlib.suppress(OSError):
            tmp_fpath.unlink(missing_ok=True)
        if isinstance(err, WriteError):
            raise
        raise write_error(err, fpath) from err
    except BaseException:
        _DIGESTS.pop(str(tmp_fpath), None)
        tmp_fpath.unlink(missing_ok=True)
        raise
    _fsync_dir(fpath.parent)


def write_error(err: OSError, fpath: pathlib.Path) -> WriteError:
    """`err`, raised while writing `fpath`, as the `WriteError` that names it ("could not write FPATH (disk full?):
    ..." for ENOSPC and EDQUOT)."""
    hint = " (disk full?)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return WriteError(err.errno, f"could not write {fpath}{hint}: {err.strerror or err}")


_DIGESTS: dict[str, str] = {}
"""Temporary path -> checksum of its contents, set by writers that hashed while writing (see `set_digest`)."""


def set_digest(tmp_fpath: pathlib.Path, digest: str) -> None:
    """Tell the enclosing `atomic_path` the checksum of what was written to `tmp_fpath`, so it need not read it back
    ("" records none: only for measuring what hashing costs)."""
    _DIGESTS[str(tmp_fpath)] = digest


@contextlib.contextmanager
def atomic_file(fpath: pathlib.Path | str) -> Iterator[checksums.HashingFile]:
    """`atomic_path`, yielding a file object that hashes while writing; closed (and checksummed) on success."""
    with atomic_path(fpath) as tmp_fpath:
        fd = checksums.HashingFile(tmp_fpath)
        try:
            yield fd
        finally:
            digest = fd.close()
        set_digest(tmp_fpath, digest)


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
        set_digest(tmp_fpath, checksums.bytes_checksum(data))


@beartype.beartype
def atomic_write_json(fpath: pathlib.Path | str, obj: object) -> None:
    """Write `obj` as indented JSON to `fpath` atomically; NaN/inf are refused (use None)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(fpath, text.encode("utf-8"))


def atomic_save_npy(fpath: pathlib.Path | str, array: "np.ndarray") -> None:
    """Save a numpy array as .npy atomically (no pickled objects)."""
    import numpy as np

    with atomic_file(fpath) as fd:
        np.save(fd, array, allow_pickle=False)


@beartype.beartype
def remove_temp_files(dpath: pathlib.Path, name: str = "*") -> int:
    """Delete leftover temporary files of `atomic_path` for `name` (default: every file) directly in `dpath`.

    Only call it while holding the lock that covers those files: a killed job leaves its temp file behind, a
    running one still needs it. Returns how many were removed.
    """
    n = 0
    for fpath in dpath.glob(f".{name}{TMP_MARK}*"):
        fpath.unlink(missing_ok=True)
        n += 1
    return n


@beartype.beartype
def is_temp(fpath: pathlib.Path) -> bool:
    """Whether `fpath` is a leftover temporary file of `atomic_path` (never part of an artifact)."""
    return TMP_MARK in fpath.name
