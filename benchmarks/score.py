"""The score stage's per-block work vs the sum of its two necessary parts measured alone, in one run.

    uv run python benchmarks/score.py                       # N=100,000 kept rows, width 1,024, K=4,096, CPU
    uv run python benchmarks/score.py --device cuda --k 32768

For a ReLU SAE and a TopK SAE (same weights, d_sae = `--blocks` x K latents), one block of K latents:
(a) the stage's block work once its inputs are at hand (`saev.scoring.score_block`: the block's columns of every
    row encoded in the stage's row batches into buffers reused from block to block, as the blocks of one task reuse
    them, min/max, exact AP for every class; then the partial file); for TopK given each row's selected latents,
    which the stage computes once per SAE (`saev.scoring.topk_latents`, timed once and shown as a per-block share);
(b) its parts alone: the bare encoder matmul for those columns (rows minus b_dec computed beforehand, the same row
    batches into one preallocated output, bias added by the matmul) and the AP engine `saev.ap.average_precision`
    on the resulting scores.
One untimed warm-up of each, then `--rounds` rounds (default 7), alternating (a) and (b) within each round so that
a change of the machine's load falls on both; medians and spreads (min to max) are printed with the conditions
(torch threads, CPU affinity, load average before and after, CPU model). Seven rounds: the median of 7 ignores up
to 3 disturbed rounds, and a round takes about 20 s at the defaults on 2 quiet CPUs (3 minutes in all).
(c) a dense block: K random unit directions (`saev.methods.random`, codes x . w, dense and signed like PCA's, every
    entry ranked by the AP engine) scored through the same `score_block`, against the ReLU block.
Last line: RESULT score_vs_parts=<(matmul + AP) / ReLU block> topk_vs_relu=<ReLU block / TopK block>
latents_per_s=<K / the slower of ReLU and TopK block> dense_vs_relu=<dense block / ReLU block>.
"""

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import conditions  # noqa: E402
from saev import ap, methods, nn, scoring  # noqa: E402
from saev.methods import random as random_method  # noqa: E402
from stages import score as score_stage  # noqa: E402


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="kept rows")
    parser.add_argument("--width", type=int, default=1024, help="activation width (d_vit)")
    parser.add_argument("--k", type=int, default=4096, help="latents per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per SAE (d_sae = blocks x k; TopK's k-th pass)")
    parser.add_argument("--topk", type=int, default=32, help="k of the TopK SAE")
    parser.add_argument("--classes", type=int, default=151)
    parser.add_argument("--batch-size", type=int, default=score_stage.Config.batch_size, help="rows per matmul")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (medians of these)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, nn.SparseAutoencoder]:
    """Kept activations float32 [N, width], int labels [N] (skewed classes) and a random SAE whose ReLU latents are
    about 10% non-zero, each leaning towards one class so that APs are not all near prevalence."""
    gen = torch.Generator().manual_seed(args.seed)
    weights_C = torch.rand(args.classes, generator=gen) ** 3 + 0.01
    labels_N = torch.multinomial(weights_C, args.n, replacement=True, generator=gen)
    centers_CD = torch.randn(args.classes, args.width, generator=gen)
    acts_ND = torch.randn(args.n, args.width, generator=gen) + 0.5 * centers_CD[labels_N]
    d_sae = args.blocks * args.k
    if d_sae % args.width:
        sys.exit(f"--blocks x --k = {d_sae} latents must be a multiple of --width {args.width}")
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=args.width, exp_factor=d_sae // args.width, seed=args.seed))
    with torch.no_grad():
        pre_std = float(((acts_ND[:1000] - sae.b_dec) @ sae.W_enc[:, :64]).std())
        sae.b_enc.fill_(-1.2816 * pre_std)  # the 90th percentile of the pre-activations: about 10% fire
    return acts_ND.numpy(), labels_N.numpy(), sae


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def describe(name: str, times: list[float], k: int) -> str:
    med = statistics.median(times)
    return (f"{name:14s} median {med:7.3f} s (range {min(times):.3f} to {max(times):.3f}, {len(times)} rounds), "
            f"{k / med:9.0f} latents/s")  # fmt: skip


def main() -> None:
    args = get_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")
    print(conditions.describe("before"), flush=True)
    acts_ND, labels_N, sae = make_data(args)
    sae = sae.to(device)
    relu, topk = nn.Relu(), nn.TopK(args.topk)
    print(f"N={args.n} width={args.width} block K={args.k} d_sae={args.blocks * args.k} classes={args.classes} "
          f"batch {args.batch_size} device {args.device}; TopK k={args.topk}", flush=True)  # fmt: skip
    k_start, k_stop = 0, args.k
    block = slice(k_start, k_stop)
    dense_cfg = random_method.RandomConfig(n=args.k, seed=args.seed)
    dense = methods.fit(dense_cfg, args.width, lambda start: []).to(device)
    labels_dev = torch.from_numpy(labels_N).to(device)

    sae.activation = topk
    start = time.perf_counter()
    top_Nk = scoring.topk_latents(sae, acts_ND, args.k, batch_size=args.batch_size, device=device)
    pass_s = time.perf_counter() - start
    print(f"TopK latents pass (once per SAE, all {args.blocks} blocks): {pass_s:.2f} s, "
          f"{pass_s / args.blocks:.2f} s per block", flush=True)  # fmt: skip

    W_DK = sae.W_enc.detach()[:, block]
    b_K = sae.b_enc.detach()[block]
    x_ND = torch.from_numpy(acts_ND).to(device) - sae.b_dec.detach()
    out_NK = torch.empty((args.n, args.k), device=device)

    def matmul() -> None:
        for s in range(0, args.n, args.batch_size):
            torch.addmm(b_K, x_ND[s : s + args.batch_size], W_DK, out=out_NK[s : s + args.batch_size])

    with tempfile.TemporaryDirectory() as tmp:
        fpath = pathlib.Path(tmp) / "block00000.safetensors"

        def stage_block(activation: nn.Activation | None) -> Callable[[], None]:
            """A block of the SAE with this activation rule, or of the dense method if None."""

            def go() -> None:
                sae.activation = activation or relu
                with torch.inference_mode():  # what stages.score.run does once its inputs are at hand
                    block_scores = scoring.score_block(
                        sae if activation else dense, acts_ND, labels_N, args.classes, k_start, k_stop, batch_size=args.batch_size,
                        device=device, top_Nk=top_Nk if activation is topk else None,
                    )  # fmt: skip
                    scoring.write_partial(
                        fpath,
                        block_scores,
                        k_start=k_start,
                        k_stop=k_stop,
                        train_key="bench",
                        matmul_precision="highest",
                    )

            return go

        with torch.inference_mode():
            stage_block(topk)()  # warm-up of every timed path (and the blocks' buffers allocated)
            stage_block(relu)()
            stage_block(None)()
            matmul()
            relu_scores_NK = scoring.encode_block(
                sae, acts_ND, k_start, k_stop, batch_size=args.batch_size, device=device
            )
            ap.average_precision(relu_scores_NK, labels_dev, args.classes)
        nonzero = float((relu_scores_NK > 0).float().mean())
        print(f"ReLU block: {nonzero:.1%} non-zero scores", flush=True)
        times: dict[str, list[float]] = {"relu block": [], "topk block": [], "dense block": [], "matmul": [], "ap": []}
        for r in range(args.rounds):
            with torch.inference_mode():
                times["relu block"].append(timed(stage_block(relu), args.device))
                times["topk block"].append(timed(stage_block(topk), args.device))
                times["dense block"].append(timed(stage_block(None), args.device))
                times["matmul"].append(timed(matmul, args.device))
                times["ap"].append(
                    timed(lambda: ap.average_precision(relu_scores_NK, labels_dev, args.classes), args.device)
                )
            print(f"round {r + 1}: " + ", ".join(f"{name} {t[-1]:.3f} s" for name, t in times.items()), flush=True)

    for name, t in times.items():
        print(describe(name, t, args.k))
    med = {name: statistics.median(t) for name, t in times.items()}
    parts = med["matmul"] + med["ap"]
    topk_share = med["topk block"] + pass_s / args.blocks
    print(f"parts (matmul + AP): {parts:.3f} s; TopK block + its share of the latents pass: {topk_share:.3f} s "
          f"(ReLU block / that = {med['relu block'] / topk_share:.3f})")  # fmt: skip
    print(conditions.describe("after"))
    print(f"RESULT score_vs_parts={parts / med['relu block']:.3f} "
          f"topk_vs_relu={med['relu block'] / med['topk block']:.3f} "
          f"latents_per_s={args.k / max(med['relu block'], med['topk block']):.0f} "
          f"dense_vs_relu={med['dense block'] / med['relu block']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
