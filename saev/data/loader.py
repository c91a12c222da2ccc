"""A shuffled minibatch loader over activation rows that reads the disk in large contiguous chunks.

Training an SAE reads one layer's patch activations as rows (image * n_patches + patch) in a shuffled order.
Reading each example from a memory map one by one costs a random 4 KB read per example; this loader instead:

1. cuts the rows [0, n_rows) into chunks of `chunk_rows` consecutive rows (megabytes each: a contiguous read),
2. for every epoch, permutes the chunks with a seeded generator and groups consecutive chunks of that order into
   windows of `buffer_rows // chunk_rows` chunks,
3. reads a window into a RAM buffer on a background thread (its chunks in file order, `n_read_threads` reads in
   flight: network and virtual disks need several to reach their speed), while the consumer takes batches from the
   previous window (two buffers: about 2 * buffer_rows * d * 4 bytes),
4. shuffles each window's rows with a seeded permutation and gathers batches from it. Batch t is rows
   [t * batch_size, (t + 1) * batch_size) of the stream formed by the windows in order; a batch may straddle two
   windows or two epochs. Every epoch visits every row exactly once.

The stream depends only on (n_rows, chunk_rows, buffer_rows, seed), never on thread timing, so a run is
deterministic and `batches(start_step, n_steps)` resumes at any step without replaying earlier windows (a resumed
training run sees exactly the batches an uninterrupted one would). Mixing is as good as the buffer is large: a batch
draws from the `buffer_rows // chunk_rows` chunks of its window, which come from random places in the data; when
the buffer holds every row, each epoch is a full permutation.

Sources of rows (`Rows`): `ArrayRows` (an in-memory array or np.memmap) and `ShardRows` (one layer of a dump
directory, read with positioned reads straight into the buffer; CLS tokens and other layers are skipped).
"""

import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
import typing
from collections.abc import Iterator

import beartype
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .shards import Shards, shard_name

_POLL_S = 0.1
"""How often a blocked background thread checks whether the loader was closed."""


@typing.runtime_checkable
class Rows(typing.Protocol):
    """A [n_rows, d] float32 matrix that can copy a contiguous range of rows into a buffer."""

    n_rows: int
    d: int

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows [start, stop) into `out` (float32 [stop - start, d], C-contiguous). Must be thread-safe."""
        ...


class ArrayRows:
    """Rows of a float32 [N, D] array (in memory or a np.memmap)."""

    @beartype.beartype
    def __init__(self, acts_ND: Float[np.ndarray, "N D"]):
        self.acts_ND = acts_ND
        self.n_rows, self.d = acts_ND.shape

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        np.copyto(out, self.acts_ND[start:stop], casting="same_kind")


class ShardRows:
    """Patch-token rows of one layer of a dump directory: row = image * n_patches_per_img + patch.

    Reads with os.preadv straight into the caller's buffer (no page-by-page memory-map faults). With one layer
    dumped, a range of rows is one contiguous span of the shard file: one read per shard, scattering each image's
    CLS row (if any) into a scratch row. With several layers, one read per image (the other layers are skipped).
    """

    @beartype.beartype
    def __init__(self, shards: Shards, layer: int):
        md = shards.metadata
        self.dpath = shards.dpath
        self.metadata = md
        self.layer = layer
        self.layer_index = shards.layer_index(layer)
        self.n_patches = md.n_patches_per_img
        self.n_rows = md.n_imgs * md.n_patches_per_img
        self.d = md.d_vit
        self.row_bytes = md.d_vit * 4
        # With one layer, consecutive images' tokens are contiguous in the file (CLS rows in between, if any).
        self.one_layer = len(md.layers) == 1

    def _offset(self, img_in_shard: int, patch: int) -> int:
        md = self.metadata
        token = int(md.cls_token) + patch
        return ((img_in_shard * len(md.layers) + self.layer_index) * md.n_tokens_per_img + token) * self.row_bytes

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) are not within [0, {self.n_rows})")
        if out.shape != (stop - start, self.d) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {(stop - start, self.d)}, got {out.dtype} {out.shape}")
        md, p = self.metadata, self.n_patches
        per_shard_rows = md.n_imgs_per_shard * p
        row = start
        while row < stop:
            shard = row // per_shard_rows
            shard_stop = min(stop, (shard + 1) * per_shard_rows)
            fd = os.open(self.dpath / shard_name(shard), os.O_RDONLY)
            try:
                while row < shard_stop:
                    img, patch = divmod(row - shard * per_shard_rows, p)
                    # One layer: the rest of the shard's range in one read; several: the rest of this image.
                    take = shard_stop - row if self.one_layer else min(shard_stop - row, p - patch)
                    views = self._views(out[row - start : row - start + take], patch)
                    _pread_scattered(fd, views, self._offset(img, patch))
                    row += take
            finally:
                os.close(fd)

    def _views(self, out: np.ndarray, first_patch: int) -> list[memoryview]:
        """Byte views that a contiguous read of rows `out` (starting at patch `first_patch` of an image) fills in
        file order: runs of patch rows, with a scratch row for each CLS token in between (one image's rows: one run)."""
        flat = memoryview(out).cast("B")
        if not self.metadata.cls_token or len(out) <= self.n_patches - first_patch:
            return [flat]
        scratch = memoryview(bytearray(self.row_bytes))
        views, done, n, run = [], 0, len(out), self.n_patches - first_patch
        while done < n:
            take = min(run, n - done)
            views.append(flat[done * self.row_bytes : (done + take) * self.row_bytes])
            done += take
            run = self.n_patches
            if done < n:
                views.append(scratch)
        return views


_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16


def _pread_scattered(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill the byte `views`, in order, from consecutive bytes of `fd` at `offset` (a few preadv calls: at most
    IOV_MAX views each, and positioned reads may return short)."""
    i, skip = 0, 0  # the next view to fill and the bytes of it already filled
    while i < len(views):
        batch = [views[i][skip:], *views[i + 1 : i + _IOV_MAX]]
        n = os.preadv(fd, batch, offset)
        if n == 0:
            raise EOFError(f"unexpected end of file at byte {offset} (file descriptor {fd})")
        offset += n
        n += skip
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        skip = n


@beartype.beartype
def _gather(rows_ND: Tensor, index_B: Tensor, out_BD: Tensor) -> None:
    """out_BD = rows_ND[index_B], on the calling thread alone.

    A gather of whole rows is bound by memory, not arithmetic: a second thread barely speeds it up, but torch's
    OpenMP team waits at a barrier for its slowest thread, and while windows are read that thread shares the cores
    with the reading threads (copying from the page cache). On 2 cores, the 2-thread gather made a cold epoch 0.34-0.63x
    the raw read, the 1-thread gather 0.78-1.11x (interleaved, same run). Setting the count costs well under a
    microsecond, and it is restored before the caller's own work (the training step) runs.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.index_select(rows_ND, 0, index_B, out=out_BD)
    finally:
        torch.set_num_threads(n_threads)


@dataclasses.dataclass(frozen=True)
class Window:
    """A run of chunks read together and shuffled together."""

    epoch: int
    index: int
    """Position of the window within its epoch."""
    chunks: tuple[tuple[int, int], ...]
    """(start, stop) row ranges, in the order they are laid out in the buffer."""

    @property
    def n_rows(self) -> int:
        return sum(stop - start for start, stop in self.chunks)


@beartype.beartype
def get_windows(n_rows: int, chunk_rows: int, buffer_rows: int, seed: int, epoch: int) -> list[Window]:
    """The windows of one epoch: a seeded permutation of the chunks, cut into groups of buffer_rows // chunk_rows."""
    n_chunks = -(-n_rows // chunk_rows)
    per_window = max(1, buffer_rows // chunk_rows)
    order = np.random.default_rng([seed, epoch]).permutation(n_chunks)
    windows = []
    for w, first in enumerate(range(0, n_chunks, per_window)):
        starts = [int(c) * chunk_rows for c in order[first : first + per_window]]
        chunks = tuple((start, min(n_rows, start + chunk_rows)) for start in starts)
        windows.append(Window(epoch, w, chunks))
    return windows


def get_window_perm(n_rows: int, seed: int, window: Window) -> np.ndarray:
    """The seeded shuffle of a window's buffer rows."""
    return np.random.default_rng([seed, window.epoch, window.index, 1]).permutation(n_rows)


class LoaderStats(typing.NamedTuple):
    """What the loader has done so far."""

    n_batches: int
    """Batches yielded."""
    read_bytes: int
    """Bytes read from the source."""
    read_s: float
    """Seconds the background thread spent reading."""
    wait_s: float
    """Seconds the consumer spent waiting for a window (data-bound time)."""


class ShuffledLoader:
    """Shuffled batches of rows [0, n_rows) of a `Rows` source (see the module docstring for the order).

    Use as `with loader.batches(start_step, n_steps) as it: for x_BD in it: ...`; batches are new float32 CPU
    tensors the caller may keep. Errors on the reading thread are raised in the consumer.
    """

    @beartype.beartype
    def __init__(
        self,
        rows: Rows,
        *,
        n_rows: int | None = None,
        batch_size: int,
        seed: int,
        chunk_rows: int,
        buffer_rows: int,
        n_read_threads: int = 4,
    ):
        """Batches of rows [0, n_rows) (default: all) of `rows`. The order depends on (n_rows, batch_size, seed,
        chunk_rows, buffer_rows) only; `n_read_threads` (concurrent chunk reads) changes speed, not results."""
        self.rows = rows
        self.n_rows = rows.n_rows if n_rows is None else n_rows
        if not 1 <= self.n_rows <= rows.n_rows:
            raise ValueError(f"n_rows={self.n_rows} must be in [1, {rows.n_rows}] (the rows of the source)")
        if not 1 <= batch_size <= self.n_rows:
            raise ValueError(f"batch_size={batch_size} must be in [1, n_rows={self.n_rows}]")
        if chunk_rows < 1 or buffer_rows < chunk_rows:
            raise ValueError(f"need 1 <= chunk_rows ({chunk_rows}) <= buffer_rows ({buffer_rows})")
        if n_read_threads < 1:
            raise ValueError(f"n_read_threads must be positive, got {n_read_threads}")
        self.n_read_threads = n_read_threads
        self.batch_size = batch_size
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.buffer_rows = buffer_rows

    def windows_from(self, epoch: int) -> Iterator[Window]:
        """Every window from the start of `epoch` on, epoch after epoch."""
        while True:
            yield from get_windows(self.n_rows, self.chunk_rows, self.buffer_rows, self.seed, epoch)
            epoch += 1

    def batches(self, start_step: int, n_steps: int) -> "Batches":
        """Batches start_step, ..., n_steps - 1 of the stream."""
        if not 0 <= start_step <= n_steps:
            raise ValueError(f"start_step={start_step} must be in [0, n_steps={n_steps}]")
        return Batches(self, start_step, n_steps)


class Batches:
    """An iterator over a range of batches with its reading thread; close it (or use `with`) to stop the thread."""

    def __init__(self, loader: ShuffledLoader, start_step: int, n_steps: int):
        self.loader = loader
        self.start_step = start_step
        self.n_steps = n_steps
        b = loader.batch_size
        epoch, offset = divmod(start_step * b, loader.n_rows)
        windows = loader.windows_from(epoch)
        first = next(windows)
        while offset >= first.n_rows:  # skip the windows before start_step without reading them
            offset -= first.n_rows
            first = next(windows)
        self._skip = offset
        self._n_needed = offset + (n_steps - start_step) * b  # rows of the stream this range consumes from `first`
        self._first = first
        self._windows = windows
        self._filled: queue.Queue = queue.Queue(maxsize=1)
        self._free: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._n_batches, self._read_bytes, self._read_s, self._wait_s = 0, 0, 0.0, 0.0
        self._thread: threading.Thread | None = None
        self._iter = self._generate()

    # The reading thread.

    def _produce(self) -> None:
        loader, rows = self.loader, self.loader.rows
        capacity = min(loader.n_rows, max(1, loader.buffer_rows // loader.chunk_rows) * loader.chunk_rows)
        for _ in range(2):
            self._free.put(np.empty((capacity, rows.d), dtype=np.float32))
        window, produced = self._first, 0
        pool = concurrent.futures.ThreadPoolExecutor(loader.n_read_threads, thread_name_prefix="saev-loader-read")
        try:
            while produced < self._n_needed:
                buf = self._get(self._free)
                if buf is None:
                    return
                start = time.perf_counter()
                n = window.n_rows
                # Chunks go to their buffer position in window order, but are read in file order.
                positions = np.cumsum([0] + [stop - begin for begin, stop in window.chunks])
                reads = [
                    pool.submit(rows.read, begin, stop, buf[positions[i] : positions[i] + stop - begin])
                    for i, (begin, stop) in sorted(enumerate(window.chunks), key=lambda item: item[1][0])
                ]
                for read in reads:
                    read.result()
                perm = torch.from_numpy(get_window_perm(n, loader.seed, window))
                self._read_s += time.perf_counter() - start
                self._read_bytes += n * rows.d * 4
                if not self._put((buf, n, perm)):
                    return
                produced += n
                window = next(self._windows)
        except BaseException as err:  # re-raised in the consumer
            self._put(err)
        finally:
            pool.shutdown(cancel_futures=True)

    def _get(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        return None

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._filled.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    # The consumer.

    def _next_window(self) -> tuple[Tensor, int, Tensor]:
        start = time.perf_counter()
        item = self._filled.get()
        self._wait_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        buf, n, perm = item
        return buf, torch.from_numpy(buf[:n]), perm

    def _generate(self) -> Iterator[Tensor]:
        b = self.loader.batch_size
        if self.start_step == self.n_steps:
            return
        self._thread = threading.Thread(target=self._produce, name="saev-loader", daemon=True)
        self._thread.start()
        buf, rows_t, perm = self._next_window()
        pos = self._skip
        for _ in range(self.start_step, self.n_steps):
            x_BD = torch.empty((b, rows_t.shape[1]), dtype=torch.float32)
            filled = 0
            while filled < b:
                if pos == len(perm):
                    self._free.put(buf)
                    buf, rows_t, perm = self._next_window()
                    pos = 0
                take = min(b - filled, len(perm) - pos)
                _gather(rows_t, perm[pos : pos + take], x_BD[filled : filled + take])
                filled += take
                pos += take
            self._n_batches += 1
            yield x_BD

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        return next(self._iter)

    def close(self) -> None:
        """Stop the reading thread and free the buffers."""
        self._stop.set()
        self._iter.close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Batches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> LoaderStats:
        return LoaderStats(self._n_batches, self._read_bytes, self._read_s, self._wait_s)
