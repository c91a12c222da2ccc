"""Checksums of written files: XXH3-128 hashed while writing, recorded beside each file, checked cheaply by size and
stat signature or fully by content.

`saev.artifacts` writes every file through `atomic_path`, which records the file's size, checksum and stat signature
(`stat_sig`, taken once the file is in place) in a hidden side file (`.<name>.sum`). A file piece counts as written
when its size matches that record (`is_intact`, a cheap check for planning); the record's checksum is trusted only
while the file's stat signature is the recorded one (`current_checksum`): any write since changes it, and such a file
is hashed again before anything (a manifest, an export check) relies on it.
"""

import json
import os
import pathlib
import typing
from collections.abc import Callable

import beartype
import xxhash

TMP_MARK = ".tmp-"
"""Marks a temporary file of an atomic write (`saev.atomic.atomic_path`); never part of an artifact."""

CHECKSUM = "xxh3_128"
"""The checksum recorded for every file of an artifact (xxHash's XXH3, 128 bits: about 20 GB/s on one core, so
hashing while writing costs next to nothing; it detects corruption, it is not a cryptographic signature)."""

_SUM_SUFFIX = ".sum"
_READ_CHUNK = 16 << 20


class Record(typing.NamedTuple):
    """What was recorded beside a file when it was written (`write_record`)."""

    size: int
    """Its size in bytes."""
    digest: str
    """Its checksum (`CHECKSUM`)."""
    sig: list[int] | None
    """Its stat signature (`stat_sig`) once in place; None when unknown (recorded before the file was renamed into
    place, or by an earlier version): then the checksum is trusted only after hashing the file again."""


def new_hasher() -> "xxhash.xxh3_128":
    """A fresh incremental hasher of the artifact checksum (`CHECKSUM`)."""
    return xxhash.xxh3_128()


class HashingFile:
    """A binary file opened for writing that hashes every byte written (no second read of large files)."""

    def __init__(self, fpath: pathlib.Path):
        self.fpath = fpath
        self.hasher = new_hasher()
        self._fd = open(fpath, "wb")

    def write(self, data) -> int:
        self.hasher.update(data)
        return self._fd.write(data)

    def close(self) -> str:
        """Close the file and return its checksum."""
        self._fd.close()
        return self.hasher.hexdigest()


def bytes_checksum(data: bytes) -> str:
    """XXH3-128 of bytes held in memory."""
    return xxhash.xxh3_128_hexdigest(data)


def file_checksum(fpath: pathlib.Path | str, on_bytes: Callable[[int], None] | None = None) -> str:
    """XXH3-128 of a file's contents, read in 16 MiB chunks (`on_bytes(n)` after each, e.g. for progress)."""
    hasher = new_hasher()
    with open(fpath, "rb") as fd:
        while chunk := fd.read(_READ_CHUNK):
            hasher.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return hasher.hexdigest()


def sum_fpath(fpath: pathlib.Path) -> pathlib.Path:
    return fpath.with_name(f".{fpath.name}{_SUM_SUFFIX}")


def write_record(
    fpath: pathlib.Path, size: int, digest: str, sig: list[int] | None = None, *, sync: bool = True
) -> None:
    """Write the side file holding `fpath`'s size, checksum and stat signature `sig` (None: not known yet; see
    `Record`), atomically (temp file + rename; fsynced unless `sync` is False)."""
    record_fpath = sum_fpath(fpath)
    tmp = record_fpath.with_name(f"{record_fpath.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as fd:
        json.dump({"size": size, CHECKSUM: digest, **({"stat": sig} if sig is not None else {})}, fd)
        if sync:
            fd.flush()
            os.fsync(fd.fileno())
    os.replace(tmp, record_fpath)


def read_record(fpath: pathlib.Path) -> Record | None:
    """What was recorded when `fpath` was written (`write_record`), or None if there is no readable record."""
    try:
        with open(sum_fpath(fpath)) as fd:
            obj = json.load(fd)
        sig = obj.get("stat")
        if not (isinstance(sig, list) and len(sig) == 4 and all(type(x) is int for x in sig)):
            sig = None  # anything else: unknown, the file is hashed before its checksum is trusted
        return Record(int(obj["size"]), str(obj[CHECKSUM]), sig)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def recorded_checksum(fpath: pathlib.Path) -> tuple[int, str] | None:
    """(size, checksum) recorded when `fpath` was written by `atomic_path`, or None if there is no readable record.
    Says what was written, not what the file holds now: see `current_checksum`."""
    record = read_record(fpath)
    return None if record is None else (record.size, record.digest)


def current_checksum(fpath: pathlib.Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The checksum of `fpath` as it is now: the recorded one while the file's stat signature is the one recorded
    with it (it was not written since), else the file hashed now."""
    sig = stat_sig(fpath.stat())
    record = read_record(fpath)
    if record is not None and record.sig == sig:
        return record.digest
    return file_checksum(fpath, on_bytes)


@beartype.beartype
def is_intact(fpath: pathlib.Path) -> bool:
    """Cheap check of one written file (a piece of an artifact): present, with the size recorded when it was written.
    Enough to plan with; what the file holds is checked before it is sealed into a manifest (a piece edited since it
    was written is hashed again there, and recomputed if it changed)."""
    try:
        size = fpath.stat().st_size
    except OSError:
        return False
    record = recorded_checksum(fpath)
    return record is not None and record[0] == size


def stat_sig(st: os.stat_result) -> list[int]:
    """What identifies a file's current contents without reading it: any write changes the ctime."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
