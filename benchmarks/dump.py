"""Dump throughput vs the bare ViT forward pass on the same images, measured in one run.

    uv run python benchmarks/dump.py                       # tiny demo model, 64 px synthetic images
    uv run python benchmarks/dump.py --model ViT-B-16 --n-imgs 64 --batch-size 16

(a) the dump stage's job body (`stages.pipeline.run_pieces`) over n images: dataset generation, preprocessing,
    patch labels, the forward pass, shard and label writes; the model build, timed separately, is subtracted;
(b) the bare forward on the same images, already preprocessed into one tensor, in the same batches;
(c) the dump again with its shards written without checksums (they are hashed while written, XXH3-128), to measure
    what hashing costs; (a) and (c) alternate for `--rounds` rounds and their medians are compared.
Last line: RESULT dump_vs_forward=<a/b> hashed_vs_unhashed=<a/c> images_per_s=<a>.
"""

import argparse
import dataclasses
import functools
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from saev import vit  # noqa: E402
from saev.data import datasets, shards  # noqa: E402
from stages import dump as dump_stage  # noqa: E402
from stages import pipeline as pl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=vit.TINY_MODEL, help="open_clip model name (random weights)")
    parser.add_argument("--n-imgs", type=int, default=8192, help="images to dump (a few seconds of work: shorter runs are noisy)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=4, help="dumps with and without checksums, alternating")
    args = parser.parse_args()

    img_size, _ = vit.get_patch_grid(args.model)
    data = datasets.Synthetic(n_imgs=args.n_imgs, img_size=img_size, seed=0)
    vit_cfg = vit.VitConfig(model=args.model, layers=(-1,))
    print(f"model {args.model} ({img_size} px), {args.n_imgs} images, batch {args.batch_size}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads", flush=True)

    dump_cfg = dump_stage.Config(
        data=data,
        vit=vit_cfg,
        max_patches_per_shard=10**9,
        batch_size=args.batch_size,
        n_workers=args.n_workers,
        device=args.device,
    )
    configs_dpath = pathlib.Path(__file__).resolve().parent.parent / "configs"  # the demo sweep, to plan
    real_init = shards.ShardWriter.__init__

    def dump_once(checksum: bool) -> tuple[float, float, object]:
        """One whole dump into a fresh directory: (seconds without the model build, build seconds, model)."""
        shards.ShardWriter.__init__ = functools.partialmethod(real_init, checksum=checksum)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                pipeline = dataclasses.replace(
                    pl.Pipeline(), root=pathlib.Path(tmp), dump=dump_cfg, config_dpath=configs_dpath
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

    vit.make_vit(vit_cfg, args.device)  # one-time costs (imports, first allocations) stay out of the rounds
    hashed, unhashed = [], []
    for r in range(args.rounds):  # ABBA: neither variant always runs first
        for checksum in (True, False) if r % 2 == 0 else (False, True):
            seconds, build_s, model = dump_once(checksum)
            (hashed if checksum else unhashed).append(seconds)
            print(f"round {r + 1} {'hashed  ' if checksum else 'unhashed'}: {args.n_imgs / seconds:9.1f} images/s "
                  f"({seconds:.2f} s, model build {build_s:.2f} s subtracted)", flush=True)
    dump_s = statistics.median(hashed)
    dump_rate = args.n_imgs / dump_s
    spread = f"{args.n_imgs / max(hashed):.0f} to {args.n_imgs / min(hashed):.0f}"
    print(f"dump:    {dump_rate:9.1f} images/s (median of {len(hashed)}, range {spread}); without checksums "
          f"{args.n_imgs / statistics.median(unhashed):.1f} images/s", flush=True)

    dataset = datasets.make_dataset(data)
    x_N3SS = torch.stack([model.preprocess(dataset[i].image) for i in range(args.n_imgs)])
    model(x_N3SS[: args.batch_size])  # warm up
    start = time.perf_counter()
    for b in range(0, args.n_imgs, args.batch_size):
        model(x_N3SS[b : b + args.batch_size]).cpu()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    forward_rate = args.n_imgs / forward_s
    print(f"forward: {forward_rate:9.1f} images/s ({forward_s:.2f} s, inputs preprocessed beforehand)", flush=True)
    ratio_hash = statistics.median(unhashed) / dump_s
    print(f"RESULT dump_vs_forward={dump_rate / forward_rate:.3f} hashed_vs_unhashed={ratio_hash:.3f} "
          f"images_per_s={dump_rate:.1f}")


if __name__ == "__main__":
    main()
