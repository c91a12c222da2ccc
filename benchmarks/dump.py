"""Dump throughput vs the bare ViT forward pass on the same images, measured in one run.

    uv run python benchmarks/dump.py                       # tiny demo model, 64 px synthetic images
    uv run python benchmarks/dump.py --model ViT-B-16 --n-imgs 64 --batch-size 16

(a) the dump stage's job body (`stages.pipeline.run_pieces`) over n images: dataset generation, preprocessing,
    patch labels, the forward pass, shard and label writes (each shard fsynced), sealing; the model build, timed
    separately, is subtracted;
(b) the bare forward on the same images, already preprocessed into one tensor, in the same batches;
(c) the dump again with its shards written without hashing them while they are written (XXH3-128): sealing then
    finds no recorded checksum and hashes each shard by reading it back, as it must before writing the manifest, so
    this compares hashing while writing with hashing afterwards (above 1: the side without checksums is slower);
(d) the dump with `overlap = false` (each batch prepared, computed and written in turn, on one thread), to measure
    what overlapping the preparation and the writes with the forward gains.

After a warm-up round that is not counted, --rounds rounds run (a) to (d), in an order that rotates and reverses
from round to round; each ratio is taken within a round (the machine's speed drifts between rounds) and the medians
are reported with their range. 11 rounds by default: on a quiet machine one side of a round takes about 2.5 s, so
the run takes about 2 minutes, and the median of 11 ratios lies between the 3rd and the 9th smallest with about 93%
confidence whatever their distribution, so one disturbed round barely moves it (7 rounds gave ranges of 0.03 on a
quiet 2-CPU machine, but a single slow round is then a seventh of them). All sides use the same torch threads (set
from the CPUs this process may use, as the dump job sets them). The dump writes to a temp dir (its page cache; the
fsync at the end of a shard waits for the disk); the conditions printed first include that disk's write + fsync and
cold read speeds, the CPUs, threads and load average.
Last line: RESULT dump_vs_forward=<a/b> hashed_vs_unhashed=<a/c> overlap_vs_serial=<a/d> images_per_s=<a> (ratios
of images per second).
"""

import argparse
import dataclasses
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import conditions  # noqa: E402
from saev import helpers, vit  # noqa: E402
from saev.data import datasets, shards  # noqa: E402
from stages import dump as dump_stage  # noqa: E402
from stages import pipeline as pl  # noqa: E402


def measure_disk(dpath: pathlib.Path, n_mib: int = 256) -> str:
    """Write `n_mib` MiB into `dpath` and fsync (as a dump closes a shard), then read them back from a cold page
    cache: a line for the conditions."""
    fpath, block = dpath / "disk-speed.bin", os.urandom(1 << 20)
    start = time.perf_counter()
    with open(fpath, "wb") as fd:
        for _ in range(n_mib):
            fd.write(block)
        fd.flush()
        os.fsync(fd.fileno())
    write_s = time.perf_counter() - start
    fd_r = os.open(fpath, os.O_RDONLY)
    try:
        os.posix_fadvise(fd_r, 0, 0, os.POSIX_FADV_DONTNEED)  # written back by the fsync: clean pages, dropped
        start = time.perf_counter()
        while os.read(fd_r, 64 << 20):
            pass
        read_s = time.perf_counter() - start
    finally:
        os.close(fd_r)
        fpath.unlink()
    mb = n_mib * 2**20 / 1e6
    return (
        f"disk of {dpath.parent}: write + fsync {mb / write_s:.0f} MB/s, cold read {mb / read_s:.0f} MB/s ({mb:.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=vit.TINY_MODEL, help="open_clip model name (random weights)")
    parser.add_argument(
        "--n-imgs", type=int, default=8192, help="images to dump (a few seconds of work: shorter runs are noisy)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--rounds", type=int, default=11, help="rounds of a dump, a forward pass, an unhashed dump and a serial dump"
    )
    args = parser.parse_args()

    img_size, _ = vit.get_patch_grid(args.model)
    data = datasets.Synthetic(n_imgs=args.n_imgs, img_size=img_size, seed=0)
    vit_cfg = vit.VitConfig(model=args.model, layers=(-1,))
    helpers.use_allocated_cpus()  # as the dump job sets them (it does so again in run_pieces): both sides alike
    print(
        f"model {args.model} ({img_size} px), {args.n_imgs} images, batch {args.batch_size}, device {args.device}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{conditions.describe('start')}; {measure_disk(pathlib.Path(tmp))}", flush=True)

    dump_cfg = dump_stage.Config(
        data=data,
        vit=vit_cfg,
        batch_size=args.batch_size,
        n_workers=args.n_workers,
        device=args.device,
    )
    configs_dpath = pathlib.Path(__file__).resolve().parent.parent / "configs"  # the demo sweep, to plan
    real_init = shards.ShardWriter.__init__

    def dump_once(checksum: bool, overlap: bool = True) -> tuple[float, float, object]:
        """One whole dump into a fresh directory: (seconds without the model build, build seconds, model)."""
        shards.ShardWriter.__init__ = functools.partialmethod(real_init, checksum=checksum)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = dataclasses.replace(dump_cfg, overlap=overlap)
                pipeline = dataclasses.replace(
                    pl.Pipeline(), root=pathlib.Path(tmp), dump=cfg, config_dpath=configs_dpath
                )
                plan = pl.make_plan(pipeline)
                start = time.perf_counter()
                model = vit.make_vit(vit_cfg, args.device)
                build_s = time.perf_counter() - start
                start = time.perf_counter()
                pl.run_pieces(pipeline, "dump", [piece.id for piece in plan["dump"].pieces])
                seconds = time.perf_counter() - start - build_s
                assert plan["dump"].artifacts[0].is_done()
        finally:
            shards.ShardWriter.__init__ = real_init
        return seconds, build_s, model

    dataset = datasets.make_dataset(data)
    forward_model = vit.make_vit(vit_cfg, args.device)
    x_N3SS = torch.stack([forward_model.preprocess(dataset[i].image) for i in range(args.n_imgs)])

    def forward_once() -> float:
        """The bare forward pass over the same images, preprocessed beforehand, in the dump's batches: seconds."""
        start = time.perf_counter()
        for b in range(0, args.n_imgs, args.batch_size):
            forward_model(x_N3SS[b : b + args.batch_size]).cpu()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    print("warm-up round (not counted): a dump and a forward pass (first allocations, first-call paths)", flush=True)
    dump_once(True), forward_once()
    sides = ("hashed", "forward", "unhashed", "serial")
    times: dict[str, list[float]] = {side: [] for side in sides}
    hashed, unhashed, forward, serial = times["hashed"], times["unhashed"], times["forward"], times["serial"]
    for r in range(args.rounds):  # the order rotates, so that no side always runs first or after the same one
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order if r % 2 == 0 else order[::-1]:
            if side == "forward":
                seconds, note = forward_once(), "inputs preprocessed beforehand"
            else:
                seconds, build_s, _ = dump_once(side != "unhashed", overlap=side != "serial")
                note = f"model build {build_s:.2f} s subtracted"
            times[side].append(seconds)
            per_s = args.n_imgs / seconds
            print(f"round {r + 1} {side:<8}: {per_s:9.1f} images/s ({seconds:.2f} s, {note})", flush=True)
    vs_forward = [f / d for f, d in zip(forward, hashed, strict=True)]
    hash_ratio = [u / h for u, h in zip(unhashed, hashed, strict=True)]
    overlap_ratio = [s / h for s, h in zip(serial, hashed, strict=True)]
    rate = [args.n_imgs / s for s in hashed]
    print(
        f"dump {conditions.spread(rate, '{:.1f}')} images/s; without checksums "
        f"{conditions.spread([args.n_imgs / s for s in unhashed], '{:.1f}')}; serial "
        f"{conditions.spread([args.n_imgs / s for s in serial], '{:.1f}')}; forward "
        f"{conditions.spread([args.n_imgs / s for s in forward], '{:.1f}')}",
        flush=True,
    )
    print(
        f"dump_vs_forward {conditions.spread(vs_forward, '{:.3f}')}; hashed_vs_unhashed "
        f"{conditions.spread(hash_ratio, '{:.3f}')}; overlap_vs_serial {conditions.spread(overlap_ratio, '{:.3f}')} "
        "(each the ratio within a round)",
        flush=True,
    )
    print(conditions.describe("end"), flush=True)
    print(
        f"RESULT dump_vs_forward={statistics.median(vs_forward):.3f} "
        f"hashed_vs_unhashed={statistics.median(hash_ratio):.3f} overlap_vs_serial={statistics.median(overlap_ratio):.3f} "
        f"images_per_s={statistics.median(rate):.1f}"
    )


if __name__ == "__main__":
    main()
