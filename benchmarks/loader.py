"""Shuffled-loader throughput vs a raw sequential read of the same shard files vs a naive random-access loader.

    uv run python benchmarks/loader.py                  # writes 8 GiB of shards to a temp dir under /tmp
    uv run python benchmarks/loader.py --gb 8 --dpath /scratch/me/loader-bench --keep

Writes a dump in the shard protocol (one layer, CLS token, 256 patches of width 1024 per image: ViT-L/14 at 224 px)
unless --dpath already holds one of the requested size, then, after a warm-up round that is not counted, runs
--rounds rounds of:

(a) raw: every byte of the shard files read front to back in 64 MB blocks, as one stream and as --n-read-threads
    streams over contiguous parts (virtual and network disks are faster with several reads in flight; the loader
    keeps that many in flight); the faster of the two is the reference. It also reads the CLS rows, which the
    others skip;
(b) loader: `saev.data.loader.ShuffledLoader` over the layer's patch rows (`ShardRows`), one full epoch of shuffled
    batches with the training defaults (`TrainConfig.chunk_rows`, `TrainConfig.buffer_rows`), first window
    included;
(c) naive: upstream saev's pattern, a map-style torch Dataset whose item memory-maps its shard and copies one row,
    batched by torch's DataLoader (shuffle=True, --naive-workers worker processes), for --naive-s seconds.

After a warm-up round that is not counted, the order is R L R L ... R (--rounds loader epochs): each epoch is
compared with the mean time of the raw reads just before and after it; then --naive-rounds naive runs. Every
measurement starts from a cold page cache (training reads dumps larger than RAM): `echo 1 > /proc/sys/vm/drop_caches`
when allowed (root), and always posix_fadvise(DONTNEED) on every shard file; the method is printed. torch threads
are set as a training job sets them (the CPUs this process may use); the loader's gather runs on one thread by
design. Printed: the conditions (CPUs and where that figure comes from, threads, load average at the start and the
end), the disk's cold read speed (1 stream, every round), and every measurement. Examples are patch rows.
Last line: RESULT loader_vs_raw=<b/a> loader_vs_naive=<b/c> examples_per_s=<b>, medians over the rounds.
"""

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import conditions  # noqa: E402
from saev import helpers, training  # noqa: E402
from saev.data import loader  # noqa: E402
from saev.data.shards import Metadata, Shards, ShardWriter, shard_name  # noqa: E402

_BLOCK_BYTES = 64 * 2**20


def get_args() -> argparse.Namespace:
    defaults = training.TrainConfig(sae=training.nn.SaeConfig(d_vit=1))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=8.0, help="size of the dump in GiB")
    parser.add_argument("--dpath", type=pathlib.Path, default=None, help="dump directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the dump for the next run")
    parser.add_argument("--d-vit", type=int, default=1024)
    parser.add_argument("--n-patches", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=defaults.chunk_rows)
    parser.add_argument("--buffer-rows", type=int, default=defaults.buffer_rows)
    parser.add_argument("--n-read-threads", type=int, default=4, help="the loader's concurrent reads")
    parser.add_argument(
        "--rounds", type=int, default=5, help="loader epochs, each bracketed by raw reads (medians reported)"
    )
    parser.add_argument("--naive-rounds", type=int, default=3, help="naive runs, after the loader's rounds")
    parser.add_argument(
        "--naive-s", type=float, default=10.0, help="seconds of naive loading to time per round (two batches at least)"
    )
    parser.add_argument("--naive-workers", type=int, default=2, help="DataLoader worker processes of the naive loader")
    return parser.parse_args()


def make_metadata(args: argparse.Namespace) -> Metadata:
    bytes_per_img = (args.n_patches + 1) * args.d_vit * 4
    n_imgs = int(args.gb * 2**30) // bytes_per_img
    return Metadata(
        vit_family="clip",
        vit_ckpt="benchmark",
        layers=(23,),
        n_patches_per_img=args.n_patches,
        cls_token=True,
        d_vit=args.d_vit,
        n_imgs=n_imgs,
        max_patches_per_shard=2_400_000,  # saev's default: ~2.4 GB shards at width 1024
        data={"benchmark": "loader"},
    )


def write_dump(dpath: pathlib.Path, md: Metadata) -> None:
    try:
        if Shards(dpath).metadata == md:
            print(f"reusing the dump in {dpath}", flush=True)
            return
    except Exception:
        pass
    print(f"writing {md.n_imgs} images ({md.n_imgs * md.bytes_per_img / 2**30:.2f} GiB) to {dpath}", flush=True)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    block = rng.standard_normal((64, 1, md.n_tokens_per_img, md.d_vit), dtype=np.float32)
    with ShardWriter(dpath, md) as writer:
        for i in range(0, md.n_imgs, len(block)):
            n = min(len(block), md.n_imgs - i)
            writer.write(block[:n] + np.float32(i))  # distinct values per batch, cheap to make
        writer.close()
    print(f"  written in {time.perf_counter() - start:.1f} s", flush=True)


def drop_cache(fpaths: list[pathlib.Path]) -> str:
    """Evict the files from the page cache; returns how."""
    os.sync()
    how = "posix_fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fd:
            fd.write("1\n")
        how = "drop_caches + " + how
    except OSError:
        pass
    for fpath in fpaths:
        fd = os.open(fpath, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def time_raw(fpaths: list[pathlib.Path], n_streams: int) -> tuple[float, int]:
    """Read every byte of the files in 64 MB blocks: the bytes are cut into `n_streams` contiguous parts, each read
    front to back by its own thread (1: a plain sequential read)."""
    spans, n_bytes = [], 0
    for fpath in fpaths:
        size = fpath.stat().st_size
        spans += [(fpath, s * size // n_streams, (s + 1) * size // n_streams) for s in range(n_streams)]
        n_bytes += size

    def read(fpath: pathlib.Path, begin: int, end: int) -> None:
        view = memoryview(bytearray(_BLOCK_BYTES))
        fd = os.open(fpath, os.O_RDONLY)
        try:
            while begin < end:
                begin += os.preadv(fd, [view[: min(_BLOCK_BYTES, end - begin)]], begin)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_streams) as pool:
        for _ in pool.map(lambda span: read(*span), spans):
            pass
    return time.perf_counter() - start, n_bytes


def time_loader(rows: loader.ShardRows, args: argparse.Namespace) -> tuple[float, int, loader.LoaderStats]:
    ld = loader.ShuffledLoader(
        rows, batch_size=args.batch_size, seed=0, chunk_rows=args.chunk_rows, buffer_rows=args.buffer_rows,
        n_read_threads=args.n_read_threads,
    )  # fmt: skip
    n_steps = rows.n_rows // args.batch_size
    checksum = 0.0
    start = time.perf_counter()
    with ld.batches(0, n_steps) as batches:
        for x_BD in batches:
            checksum += float(x_BD[0, 0])  # touch every batch
        stats = batches.stats
    return time.perf_counter() - start, n_steps * args.batch_size, stats


class NaiveDataset(torch.utils.data.Dataset):
    """Upstream saev's pattern: a map-style dataset whose item i memory-maps its shard and copies one row."""

    def __init__(self, dpath: pathlib.Path, md: Metadata):
        self.dpath, self.md = dpath, md

    def __len__(self) -> int:
        return self.md.n_imgs * self.md.n_patches_per_img

    def __getitem__(self, i: int) -> dict[str, object]:
        md = self.md
        img, patch = divmod(i, md.n_patches_per_img)
        shard, pos = divmod(img, md.n_imgs_per_shard)
        shape = (md.shard_n_imgs(shard), len(md.layers), md.n_tokens_per_img, md.d_vit)
        acts = np.memmap(self.dpath / shard_name(shard), mode="r", dtype=np.float32, shape=shape)
        act = torch.from_numpy(np.array(acts[pos, 0, int(md.cls_token) + patch]))
        return {"act": act, "image_i": img, "patch_i": patch}


def time_naive(dpath: pathlib.Path, md: Metadata, args: argparse.Namespace) -> tuple[float, int]:
    dataloader = torch.utils.data.DataLoader(
        NaiveDataset(dpath, md), batch_size=args.batch_size, shuffle=True, num_workers=args.naive_workers,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    n_examples = 0
    start = time.perf_counter()
    for batch in dataloader:
        n_examples += len(batch["act"])
        if time.perf_counter() - start > args.naive_s and n_examples >= 2 * args.batch_size:
            break  # at least two batches: the first one also starts the workers
    return time.perf_counter() - start, n_examples


def main() -> None:
    args = get_args()
    helpers.use_allocated_cpus()  # as a training job does: torch threads = the CPUs this process may use
    md = make_metadata(args)
    tmp = None
    if args.dpath is None:
        tmp = tempfile.mkdtemp(prefix="saev-loader-bench-", dir="/tmp")
        args.dpath = pathlib.Path(tmp)
    try:
        write_dump(args.dpath, md)
        shards = Shards(args.dpath)
        fpaths = [args.dpath / shard_name(s) for s in range(md.n_shards)]
        rows = loader.ShardRows(shards, 23)
        gib = rows.n_rows * rows.d * 4 / 2**30
        print(
            f"{rows.n_rows} patch rows of width {rows.d} ({gib:.2f} GiB) in {md.n_shards} shards; batch "
            f"{args.batch_size}, chunk_rows {args.chunk_rows}, buffer_rows {args.buffer_rows}",
            flush=True,
        )
        fs = os.statvfs(args.dpath)
        print(f"{conditions.describe('start')}; loader read threads {args.n_read_threads}, naive workers "
              f"{args.naive_workers}; shards in {args.dpath} ({fs.f_bavail * fs.f_frsize / 2**30:.0f} GiB free there)",
              flush=True)  # fmt: skip
        how = drop_cache(fpaths)
        print(
            f"page cache: every measurement starts cold (dropped with {how}); the dump is larger than a "
            f"window, so the loader's first window is read before its first batch, as in training",
            flush=True,
        )

        def measure_raw(n_streams: int) -> float:
            drop_cache(fpaths)
            raw_s, raw_bytes = time_raw(fpaths, n_streams)
            print(f"  raw ({n_streams} stream{'s' if n_streams > 1 else ''}): {rows.n_rows / raw_s:12.0f} examples/s "
                  f"({raw_bytes / raw_s / 1e9:.2f} GB/s, {raw_s:.2f} s)", flush=True)  # fmt: skip
            return rows.n_rows / raw_s

        def measure_loader() -> float:
            drop_cache(fpaths)
            loader_s, n, stats = time_loader(rows, args)
            print(
                f"  loader:         {n / loader_s:12.0f} examples/s ({n * rows.d * 4 / loader_s / 1e9:.2f} GB/s, "
                f"{loader_s:.2f} s; reading {stats.read_s:.2f} s on the background thread, consumer waited "
                f"{stats.wait_s:.2f} s)", flush=True,
            )  # fmt: skip
            return n / loader_s

        def measure_naive() -> float:
            drop_cache(fpaths)
            naive_s, n = time_naive(args.dpath, md, args)
            print(f"  naive:          {n / naive_s:12.0f} examples/s ({n} examples in {naive_s:.1f} s)", flush=True)
            return n / naive_s

        def measure_reference() -> tuple[float, float]:
            """The faster of a 1-stream and an n-stream raw read (the true bare cost), and the 1-stream rate."""
            rates = {n: measure_raw(n) for n in sorted({1, args.n_read_threads})}
            return max(rates.values()), rates[1]

        print("warm-up round (not counted):", flush=True)
        measure_reference(), measure_loader()
        # Raw reads bracket every loader epoch (R L R L ... R): each epoch is compared with the mean time of the raw
        # reads just before and after it, so a disk that speeds up or slows down during the run (a shared or virtual
        # disk) moves both sides of a ratio alike.
        raw_rates, disk_1, loader_rates = [], [], []
        for r in range(args.rounds + 1):
            print(f"round {r + 1}:" if r < args.rounds else "closing raw read:", flush=True)
            raw_rate, one_stream = measure_reference()
            raw_rates.append(raw_rate)
            disk_1.append(one_stream * rows.d * 4 / 1e9)
            if r < args.rounds:
                loader_rates.append(measure_loader())
        vs_raw = [rate * (1 / raw_rates[r] + 1 / raw_rates[r + 1]) / 2 for r, rate in enumerate(loader_rates)]
        # The naive loader's random reads leave this kind of virtual disk slow for a while (raw reads right after
        # one ran at 0.37-0.58 GB/s, 0.7-1.4 before), so its runs come after the bracketed ones, not between them.
        print("naive runs:", flush=True)
        naive_rates = [measure_naive() for _ in range(args.naive_rounds)]
        raw_gbs = [rate * rows.d * 4 / 1e9 for rate in raw_rates]
        print(f"disk read speed of {args.dpath} (cold, whole files): 1 stream {conditions.spread(disk_1, '{:.2f}')} "
              f"GB/s; raw reference {conditions.spread(raw_gbs, '{:.2f}')} GB/s", flush=True)  # fmt: skip
        print(f"loader {conditions.spread(loader_rates)} examples/s; vs raw {conditions.spread(vs_raw, '{:.3f}')}; "
              f"naive {conditions.spread(naive_rates)} examples/s", flush=True)  # fmt: skip
        loader_vs_naive = statistics.median(loader_rates) / statistics.median(naive_rates)
        print(conditions.describe("end"), flush=True)
        print(
            f"RESULT loader_vs_raw={statistics.median(vs_raw):.3f} loader_vs_naive={loader_vs_naive:.1f} "
            f"examples_per_s={statistics.median(loader_rates):.0f}"
        )
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
