"""Small shared utilities: log-friendly progress reporting, logging setup, device choice, malloc tuning, and the one
bounded reader of files a user names."""

import contextlib
import ctypes
import logging
import math
import os
import pathlib
import stat
import sys
import time
import typing
from collections.abc import Iterable, Iterator

import beartype

if typing.TYPE_CHECKING:
    import torch

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (it may be replaced, e.g. by pytest)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Plain log lines on stderr (Slurm logs are files, not terminals: no control codes)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


@beartype.beartype
def format_duration(seconds: float) -> str:
    """'42s', '3m05s' or '2h07m'; '?' for a duration that is not finite (an ETA at a rate of zero)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, round(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Progress:
    """Log progress of a long loop as plain lines with rate and ETA, at most every `every_s` seconds.

    Use either as an iterable wrapper (`for x in Progress(it, desc=...)`) or manually with `update(n)`.
    """

    def __init__(
        self,
        it: Iterable | None = None,
        *,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        every_s: float = 10.0,
        logger: logging.Logger | None = None,
    ):
        self.it = it
        self.desc = desc
        self.unit = unit
        self.every_s = every_s
        self.logger = logger or logging.getLogger("saev.progress")
        if total is None and it is not None and hasattr(it, "__len__"):
            total = len(it)  # type: ignore[arg-type]
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.last_log = self.start

    def __iter__(self) -> Iterator:
        assert self.it is not None, "Progress without an iterable: call update() instead"
        for obj in self.it:
            yield obj
            self.update(1)
        self.finish()

    def update(self, n: int = 1) -> None:
        """Count `n` more units done; log when `every_s` seconds passed since the last line."""
        self.done += n
        now = time.perf_counter()
        if now - self.last_log >= self.every_s:
            self.last_log = now
            self.logger.info(self.line(now))

    def finish(self) -> None:
        """Log the final line (total, elapsed, mean rate)."""
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        self.logger.info(
            "%s: done %d %s in %s (%.1f %s/s)",
            self.desc,
            self.done,
            self.unit,
            format_duration(elapsed),
            rate,
            self.unit,
        )

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta_s = format_duration((self.total - self.done) / rate if rate > 0 else math.inf)
            pct = 100.0 * self.done / self.total
            return (
                f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.1f}%) "
                f"| {rate:.1f} {self.unit}/s | ETA {eta_s}"
            )
        return f"{self.desc}: {self.done} {self.unit} | {rate:.1f} {self.unit}/s"


MAX_TEXT_BYTES = 16 << 20
"""Largest config, sweep, JSON metadata or class-names file read: far above any real one (a shards.json listing
100,000 shards is 4 MiB), far below what would exhaust memory."""

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


@beartype.beartype
def check_regular_file(
    fpath: pathlib.Path, *, what: str, max_bytes: int | None, error: type[Exception] = ValueError
) -> int:
    """The size of `fpath` after checking, without opening it, that it is a regular file (a symbolic link is followed;
    its target must be one) of at most `max_bytes` bytes (None: the caller compares the size itself); otherwise
    `error` with one line naming the file, `what` names the kind of file ("config", "SAE checkpoint", ...).

    Raises:
        error: missing, a directory, a FIFO, device or socket (reading one could block forever or never end), larger
            than `max_bytes`, or any other OSError of `stat`.
    """
    try:
        st = fpath.stat()
    except FileNotFoundError:
        raise error(f"{what} file not found: {fpath}") from None
    except OSError as err:
        raise error(f"cannot read {what} file {fpath}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} path is a directory, not a file: {fpath}")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        link = f" (a link to {os.path.realpath(fpath)})" if fpath.is_symlink() else ""
        raise error(f"{what} file {fpath}{link} is {kind}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(
            f"{what} file {fpath} has {st.st_size} bytes, more than a {what} file can hold ({max_bytes} at most)"
        )
    return st.st_size


@contextlib.contextmanager
def open_regular_file(
    fpath: pathlib.Path, *, what: str, max_bytes: int | None, error: type[Exception] = ValueError
) -> Iterator[tuple[typing.BinaryIO, int]]:
    """Open `fpath` for reading after `check_regular_file`; yields the open file and its size. The file is opened
    without blocking and checked again through the open descriptor, so one swapped for a FIFO or a larger file in
    between is refused too. Read at most the size yielded.

    Raises:
        error: as `check_regular_file`; also a file that is not readable (permission denied or another OSError).
    """
    check_regular_file(fpath, what=what, max_bytes=max_bytes, error=error)
    try:
        fd = os.open(fpath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise error(f"{what} file is not readable (permission denied): {fpath}") from None
    except OSError as err:
        raise error(f"cannot read {what} file {fpath}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as fobj:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes):
            raise error(f"{what} file {fpath} changed while it was opened (no longer a regular file, or larger)")
        os.set_blocking(fd, True)
        yield fobj, st.st_size


@beartype.beartype
def read_regular_file(
    fpath: pathlib.Path, *, what: str, max_bytes: int = MAX_TEXT_BYTES, error: type[Exception] = ValueError
) -> bytes:
    """The bytes of `fpath`, read only after `check_regular_file` (see `open_regular_file`); the one reader of files a
    user names (configs, sweeps, SAE files, adopted metadata, class names).

    Raises:
        error: as `open_regular_file`, or a read that fails (e.g. EIO on a flaky mount); one line naming the file.
    """
    with open_regular_file(fpath, what=what, max_bytes=max_bytes, error=error) as (fobj, size):
        try:
            return fobj.read(size)
        except OSError as err:
            raise error(f"cannot read {what} file {fpath}: {err.strerror or err}") from None


def get_device(name: str) -> "torch.device":
    """'auto' -> CUDA when available, else CPU; any other name is passed to torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel (no-op elsewhere).

    By default, blocks over 128 KiB are mapped fresh and unmapped on free, and a freed heap top is trimmed, so a loop
    that allocates the same few-MiB arrays every batch touches new pages each time; each costs a page fault (about a
    microsecond on a VM), which for work on small images costs more than the arithmetic. Up to 32 MiB blocks come
    from the heap and up to 512 MiB of freed heap is kept.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


def allocated_cpus() -> tuple[int, str]:
    """How many CPUs this process was given, and where that figure comes from: its CPU affinity (what `taskset`,
    cgroups-aware launchers and Slurm's task binding allow), capped by Slurm's per-task allocation when set. Never
    the node's core count: a 4-core job on a 64-core node that starts 64 threads runs far slower than with 4."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = f"CPU affinity {n}"
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm_cpus.isdigit() and 0 < int(slurm_cpus) < n:
        n, why = int(slurm_cpus), f"SLURM_CPUS_PER_TASK={slurm_cpus}, {why}"
    return max(1, n), why


def use_allocated_cpus(logger: logging.Logger | None = None) -> int:
    """Set torch's thread counts to `allocated_cpus()` and log the figure; returns it. Inter-op threads can only be
    set before torch's first parallel work: afterwards that call is skipped."""
    import torch

    n, why = allocated_cpus()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    (logger or logging.getLogger("saev.helpers")).info("torch threads: %d (%s)", torch.get_num_threads(), why)
    return n


def set_torch_threads(n: int | None, *, force: bool = False) -> int:
    """Set the calling thread's torch CPU threads to `n` (None, or its count already and not `force`: nothing is
    done, so that a repeated call costs nothing: each change rebuilds torch's thread pools); returns the count it had.

    OpenMP's count is per thread, so a helper thread beside a forward pass that already uses every allocated CPU can
    run its own torch work on one (its own team would oversubscribe the cores, and the forward's team waits at each
    barrier for a thread that lost its core) while the other threads keep theirs. torch also keeps the last count set
    as the count of threads that start later: set it back when done (`force`: the calling thread may still have it).
    """
    import torch

    before = torch.get_num_threads()
    if n is not None and (n != before or force):
        torch.set_num_threads(n)
    return before
