"""The shuffled loader (saev/data/loader.py): its order is a pure function of the seed and the step, every epoch
visits every row once, resuming at a step gives the rest of the stream, and shard rows are read correctly."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saev.data import loader
from saev.data.shards import Shards
from tests.lib.data.test_shards import logical_tensor, make_md, write_dump


def index_rows(n: int, d: int = 3) -> loader.ArrayRows:
    """Rows whose every value is the row's index, so a batch tells which rows it holds."""
    return loader.ArrayRows(np.repeat(np.arange(n, dtype=np.float32)[:, None], d, axis=1))


def take(ld: loader.ShuffledLoader, start: int, stop: int) -> list[np.ndarray]:
    """Row indices of batches [start, stop)."""
    with ld.batches(start, stop) as batches:
        return [x_BD[:, 0].numpy().astype(np.int64) for x_BD in batches]


def make_loader(n_rows=100, batch_size=30, seed=0, chunk_rows=8, buffer_rows=32, n_source=None):
    rows = index_rows(n_source or n_rows)
    return loader.ShuffledLoader(
        rows, n_rows=n_rows, batch_size=batch_size, seed=seed, chunk_rows=chunk_rows, buffer_rows=buffer_rows
    )


loader_params = {
    "n_rows": st.integers(1, 60),
    "batch_size": st.integers(1, 60),
    "chunk_rows": st.integers(1, 20),
    "buffer_factor": st.integers(1, 5),
    "seed": st.integers(0, 3),
}


@settings(max_examples=60, deadline=None)
@given(**loader_params, n_epochs=st.integers(1, 3))
def test_every_epoch_visits_every_row_exactly_once(n_rows, batch_size, chunk_rows, buffer_factor, seed, n_epochs):
    batch_size = min(batch_size, n_rows)
    ld = make_loader(n_rows, batch_size, seed, chunk_rows, chunk_rows * buffer_factor, n_source=n_rows + 5)
    n_steps = -(-n_epochs * n_rows // batch_size)
    batches = take(ld, 0, n_steps)
    assert all(len(b) == batch_size for b in batches)
    stream = np.concatenate(batches)
    for epoch in range(n_epochs):
        assert sorted(stream[epoch * n_rows : (epoch + 1) * n_rows]) == list(range(n_rows))  # never the extra 5 rows


@settings(max_examples=60, deadline=None)
@given(**loader_params, n_steps=st.integers(0, 12), data=st.data())
def test_batches_from_a_start_step_are_the_rest_of_the_full_sequence(
    n_rows, batch_size, chunk_rows, buffer_factor, seed, n_steps, data
):
    batch_size = min(batch_size, n_rows)
    ld = make_loader(n_rows, batch_size, seed, chunk_rows, chunk_rows * buffer_factor)
    start = data.draw(st.integers(0, n_steps))
    full, rest = take(ld, 0, n_steps), take(ld, start, n_steps)
    assert len(rest) == n_steps - start
    assert all(np.array_equal(a, b) for a, b in zip(full[start:], rest, strict=True))


def test_order_depends_on_the_seed_and_nothing_else():
    a, b = take(make_loader(seed=0), 0, 5), take(make_loader(seed=0), 0, 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = take(make_loader(seed=1), 0, 5)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


class SlowRows:
    """Index rows whose reads take a while (the consumer waits on the reading thread)."""

    def __init__(self, n: int, delay_s: float):
        self.inner, self.delay_s = index_rows(n), delay_s
        self.n_rows, self.d = n, 3

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        time.sleep(self.delay_s)
        self.inner.read(start, stop, out)


def test_order_does_not_depend_on_reading_speed():
    fast = take(make_loader(), 0, 12)
    slow_ld = loader.ShuffledLoader(SlowRows(100, 0.01), batch_size=30, seed=0, chunk_rows=8, buffer_rows=32)
    slow = take(slow_ld, 0, 12)
    assert all(np.array_equal(x, y) for x, y in zip(fast, slow, strict=True))


def test_a_batch_mixes_the_chunks_of_its_window():
    """With 1000 rows, chunks of 10 and windows of 20 chunks, a batch of 50 holds rows of many chunks, from all
    over the data, not one contiguous run."""
    ld = make_loader(n_rows=1000, batch_size=50, chunk_rows=10, buffer_rows=200)
    for batch in take(ld, 0, 20):
        assert len(set(batch // 10)) >= 10
        assert batch.max() - batch.min() > 200


def test_a_buffer_that_holds_every_row_shuffles_the_whole_epoch():
    ld = make_loader(n_rows=100, batch_size=100, chunk_rows=8, buffer_rows=1000)
    (batch,) = take(ld, 0, 1)
    windows = loader.get_windows(100, 8, 1000, seed=0, epoch=0)
    assert len(windows) == 1 and sorted(batch) == list(range(100))


class FailingRows:
    n_rows, d = 100, 3

    def __init__(self):
        self.n_reads = 0

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        self.n_reads += 1
        if self.n_reads > 4:
            raise OSError("disk went away")
        out[:] = 0


def test_a_read_error_is_raised_in_the_consumer():
    ld = loader.ShuffledLoader(FailingRows(), batch_size=10, seed=0, chunk_rows=8, buffer_rows=32)
    with pytest.raises(OSError, match="disk went away"), ld.batches(0, 100) as batches:
        for _ in batches:
            pass


def test_closing_early_stops_the_reading_thread():
    ld = loader.ShuffledLoader(SlowRows(1000, 0.001), batch_size=10, seed=0, chunk_rows=8, buffer_rows=32)
    with ld.batches(0, 1000) as batches:
        next(batches)
        next(batches)
    assert not any(t.name.startswith("saev-loader") and t.is_alive() for t in threading.enumerate())


def test_only_the_windows_a_range_needs_are_read():
    rows = SlowRows(1000, 0.0)
    reads = []
    rows.read = lambda start, stop, out, inner=rows.inner: (reads.append(start), inner.read(start, stop, out))
    ld = loader.ShuffledLoader(rows, batch_size=10, seed=0, chunk_rows=10, buffer_rows=100)
    take(ld, 50, 52)  # rows 500..519 of the stream: within window 5 of epoch 0
    assert len(reads) == 10  # one window of 10 chunks
    assert sorted(reads) == sorted(start for start, _ in loader.get_windows(1000, 10, 100, 0, 0)[5].chunks)


def test_loader_stats_count_batches_and_bytes():
    ld = make_loader(n_rows=100, batch_size=10, chunk_rows=10, buffer_rows=50)
    with ld.batches(0, 10) as batches:
        list(batches)
        stats = batches.stats
    assert stats.n_batches == 10
    assert stats.read_bytes == 100 * 3 * 4
    assert stats.wait_s >= 0 and stats.read_s >= 0


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 101}, "batch_size"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": 64, "buffer_rows": 32}, "buffer_rows"),
        ({"n_rows": 101}, "n_rows"),
    ],
)
def test_bad_loader_settings_are_clear_errors(bad, match):
    kwargs = {"n_rows": 100, "batch_size": 10, "seed": 0, "chunk_rows": 8, "buffer_rows": 32} | bad
    with pytest.raises(ValueError, match=match):
        loader.ShuffledLoader(index_rows(100), **kwargs)


##############
# Shard rows #
##############


@pytest.mark.parametrize("cls_token, layers", [(True, (1, 3)), (False, (1, 3)), (True, (2,)), (False, (2,))], ids=str)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_shard_rows_read_any_range_like_the_reader(tmp_path_factory, cls_token, layers, data):
    md = make_md(n_imgs=7, n_patches=4, cls_token=cls_token, layers=layers)
    dpath = tmp_path_factory.mktemp("dump")
    write_dump(dpath, md, logical_tensor(md))
    shards = Shards(dpath)
    layer = data.draw(st.sampled_from(layers))
    rows = loader.ShardRows(shards, layer)
    expected_ND = shards.patches(layer, 0, md.n_imgs).reshape(-1, md.d_vit)
    assert (rows.n_rows, rows.d) == expected_ND.shape
    start = data.draw(st.integers(0, rows.n_rows))
    stop = data.draw(st.integers(start, rows.n_rows))
    out = np.empty((stop - start, rows.d), dtype=np.float32)
    rows.read(start, stop, out)
    np.testing.assert_array_equal(out, expected_ND[start:stop])


def test_shard_rows_reject_a_range_outside_the_dump(tmp_path):
    md = make_md()
    write_dump(tmp_path, md, logical_tensor(md))
    rows = loader.ShardRows(Shards(tmp_path), 1)
    with pytest.raises(IndexError, match="not within"):
        rows.read(0, rows.n_rows + 1, np.empty((rows.n_rows + 1, rows.d), dtype=np.float32))


def test_loader_over_shards_gives_the_same_batches_as_over_the_array(tmp_path):
    md = make_md(n_imgs=7, n_patches=4, cls_token=True, layers=(1, 3))
    write_dump(tmp_path, md, logical_tensor(md))
    shards = Shards(tmp_path)
    acts_ND = shards.patches(3, 0, md.n_imgs).reshape(-1, md.d_vit)
    kwargs = {"n_rows": 25, "batch_size": 6, "seed": 2, "chunk_rows": 4, "buffer_rows": 8}
    on_disk = loader.ShuffledLoader(loader.ShardRows(shards, 3), **kwargs)
    in_ram = loader.ShuffledLoader(loader.ArrayRows(acts_ND), **kwargs)
    with on_disk.batches(0, 9) as a, in_ram.batches(0, 9) as b:
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
