"""Dump throughput vs the bare ViT forward pass on the same images, measured in one run.

    uv run python benchmarks/dump.py                       # tiny demo model, 64 px synthetic images
    uv run python benchmarks/dump.py --model ViT-B-16 --n-imgs 64 --batch-size 16

(a) the dump stage's job body (`stages.pipeline.run_pieces`) over n images: dataset generation, preprocessing,
    patch labels, the forward pass, shard and label writes; the model build, timed separately, is subtracted;
(b) the bare forward on the same images, already preprocessed into one tensor, in the same batches.
Last line: RESULT dump_vs_forward=<a/b> images_per_s=<a>.
"""

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from saev import vit  # noqa: E402
from saev.data import datasets  # noqa: E402
from stages import dump as dump_stage  # noqa: E402
from stages import pipeline as pl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=vit.TINY_MODEL, help="open_clip model name (random weights)")
    parser.add_argument("--n-imgs", type=int, default=8192, help="images to dump (a few seconds of work: shorter runs are noisy)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    img_size, _ = vit.get_patch_grid(args.model)
    data = datasets.Synthetic(n_imgs=args.n_imgs, img_size=img_size, seed=0)
    vit_cfg = vit.VitConfig(model=args.model, layers=(-1,))
    print(f"model {args.model} ({img_size} px), {args.n_imgs} images, batch {args.batch_size}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        dump_cfg = dump_stage.Config(
            data=data,
            vit=vit_cfg,
            max_patches_per_shard=10**9,
            batch_size=args.batch_size,
            n_workers=args.n_workers,
            device=args.device,
        )
        configs_dpath = pathlib.Path(__file__).resolve().parent.parent / "configs"  # the demo sweep, to plan
        pipeline = dataclasses.replace(pl.Pipeline(), root=pathlib.Path(tmp), dump=dump_cfg, config_dpath=configs_dpath)
        plan = pl.make_plan(pipeline)

        start = time.perf_counter()
        model = vit.make_vit(vit_cfg, args.device)
        build_s = time.perf_counter() - start

        start = time.perf_counter()
        pl.run_pieces(pipeline, "dump", [piece.id for piece in plan["dump"].pieces])
        dump_s = time.perf_counter() - start - build_s
        assert plan["dump"].artifacts[0].is_done()
        dump_rate = args.n_imgs / dump_s
        print(f"dump:    {dump_rate:9.1f} images/s ({dump_s:.2f} s for {args.n_imgs} images, model build "
              f"{build_s:.2f} s subtracted)", flush=True)

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
    print(f"RESULT dump_vs_forward={dump_rate / forward_rate:.3f} images_per_s={dump_rate:.1f}")


if __name__ == "__main__":
    main()
