"""Shuffled-loader throughput vs a raw sequential read of the same shard files vs a naive random-access loader.

    uv run python benchmarks/loader.py                  # writes 8 GiB of shards to a temp dir under /tmp
    uv run python benchmarks/loader.py --gb 8 --dpath /scratch/me/loader-bench --keep

Writes a dump in the shard protocol (one layer, CLS token, 256 patches of width 1024 per image: ViT-L/14 at 224 px)
unless --dpath already holds one of the requested size, then measures, each from a cold page cache:

(a) raw: every byte of the shard files read front to back in 64 MB blocks, as one stream and as --n-read-threads
    streams over contiguous parts (virtual and network disks are faster with several reads in flight; the loader
    keeps that many in flight); the faster counts. It also reads the CLS rows, which the others skip;
(b) loader: `saev.data.loader.ShuffledLoader` over the layer's patch rows (`ShardRows`), one full epoch of shuffled
    batches with the training defaults (`TrainConfig.chunk_rows`, `TrainConfig.buffer_rows`), first window
    included;
(c) naive: upstream saev's pattern, a map-style torch Dataset whose item memory-maps its shard and copies one row,
    batched by torch's DataLoader (shuffle=True, --naive-workers worker processes), for --naive-s seconds.

The cache is dropped before each with `echo 1 > /proc/sys/vm/drop_caches` when that is allowed (root), and always
with posix_fadvise(DONTNEED) on every shard file; the method used is printed. Examples are patch rows. Raw and
loader alternate --repeats times and the best of each is compared (virtual disks vary from run to run).
Last line: RESULT loader_vs_raw=<b/a> loader_vs_naive=<b/c> examples_per_s=<b>.
"""

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from saev import training  # noqa: E402
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
    parser.add_argument("--repeats", type=int, default=3, help="alternating raw/loader measurements (best kept)")
    parser.add_argument("--naive-s", type=float, default=20.0, help="seconds of naive loading to time")
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
        if time.perf_counter() - start > args.naive_s:
            break
    return time.perf_counter() - start, n_examples


def main() -> None:
    args = get_args()
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
            f"{args.batch_size}, chunk_rows {args.chunk_rows}, buffer_rows {args.buffer_rows}", flush=True,
        )

        how = drop_cache(fpaths)
        print(f"page cache dropped before each measurement with {how}", flush=True)
        raw_rates, loader_rates = [], []
        for _ in range(args.repeats):  # alternating, so a slow spell of the disk hits both
            for n_streams in sorted({1, args.n_read_threads}):
                drop_cache(fpaths)
                raw_s, raw_bytes = time_raw(fpaths, n_streams)
                raw_rates.append(rows.n_rows / raw_s)
                print(f"raw ({n_streams} stream{'s' if n_streams > 1 else ''}): {raw_rates[-1]:12.0f} examples/s "
                      f"({raw_bytes / raw_s / 1e9:.2f} GB/s, {raw_s:.2f} s)", flush=True)  # fmt: skip

            drop_cache(fpaths)
            loader_s, n, stats = time_loader(rows, args)
            loader_rates.append(n / loader_s)
            print(
                f"loader:         {loader_rates[-1]:12.0f} examples/s ({n * rows.d * 4 / loader_s / 1e9:.2f} GB/s, "
                f"{loader_s:.2f} s; reading {stats.read_s:.2f} s on the background thread, consumer waited "
                f"{stats.wait_s:.2f} s)", flush=True,
            )  # fmt: skip
        raw_rate, loader_rate = max(raw_rates), max(loader_rates)
        print(f"best of {args.repeats}: raw {raw_rate:.0f}, loader {loader_rate:.0f} examples/s", flush=True)

        drop_cache(fpaths)
        naive_s, n = time_naive(args.dpath, md, args)
        naive_rate = n / naive_s
        print(f"naive:          {naive_rate:12.0f} examples/s ({n} examples in {naive_s:.1f} s)", flush=True)
        print(
            f"RESULT loader_vs_raw={loader_rate / raw_rate:.3f} loader_vs_naive={loader_rate / naive_rate:.1f} "
            f"examples_per_s={loader_rate:.0f}"
        )
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
