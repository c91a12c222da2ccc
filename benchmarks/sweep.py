"""Benchmark batched sweep training: S same-shape SAEs stepped together (one GroupTrainer, batched matmuls) against
the same S SAEs stepped one after the other in a Python loop (S single-SAE GroupTrainers), on the same batches.

Both sides do the same work per batch (every SAE takes one optimisation step); a "step" below is one batch for all
S SAEs. Rounds alternate batched/loop (and which goes first) so background load hits both alike; each side reports
the median over rounds. The SAEs differ in init seed and learning rate, as in a real sweep. After the timed rounds the two sides
have trained on identical batches, and the largest weight difference between them is printed ("alone" and "in a
group" share one implementation: 0 on CPU at the default shape; at larger shapes batched and single-SAE kernels
may split their sums differently, e.g. 1.3e-4 after 9 steps at d_vit=768). The last line is machine-readable:

    RESULT batched_vs_loop=<loop seconds per step / batched seconds per step>

Run: uv run python benchmarks/sweep.py [--device cuda] [--n-saes 8] [--d-vit 256] [--exp-factor 8]
"""

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

# A script run as a file gets benchmarks/ on sys.path, not the repository root that holds saev/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from saev import nn, objectives, training  # noqa: E402


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--n-saes", type=int, default=8, help="SAEs in the group (S)")
    parser.add_argument("--d-vit", type=int, default=256, help="activation width")
    parser.add_argument("--exp-factor", type=int, default=8, help="d_sae = d_vit * exp_factor")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--objective", default="relu_l1", choices=list(objectives.KINDS))
    parser.add_argument("--k", type=int, default=32, help="k of the top-k objectives")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating batched/loop rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the rounds")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = get_args()
    device = torch.device(args.device)
    base = training.TrainConfig(
        sae=nn.SaeConfig(d_vit=args.d_vit, exp_factor=args.exp_factor),
        objective=(
            objectives.ReluL1()
            if args.objective == "relu_l1"  # dead_tokens: so that AuxK runs in the top-k objectives
            else objectives.KINDS[args.objective](k=args.k, dead_tokens=args.batch_size * 2)
        ),
        n_train=args.batch_size,
        batch_size=args.batch_size,
        warmup_steps=0,
    )
    cfgs = [
        dataclasses.replace(base, sae=dataclasses.replace(base.sae, seed=s), lr=1e-3 * (1 + s / args.n_saes))
        for s in range(args.n_saes)
    ]
    n_batches = args.warmup + args.rounds * args.steps
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, args.d_vit, generator=gen).to(device) for _ in range(n_batches)]
    b_dec_D = np.zeros(args.d_vit)

    batched = training.GroupTrainer(cfgs, b_dec_D, device=device)
    looped = [training.GroupTrainer([cfg], b_dec_D, device=device) for cfg in cfgs]

    # As in train_group between logging steps: no l0 statistic.
    def step_batched(x_BD: torch.Tensor) -> None:
        batched.step_(x_BD, with_l0=False)

    def step_loop(x_BD: torch.Tensor) -> None:
        for trainer in looped:
            trainer.step_(x_BD, with_l0=False)

    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} S={args.n_saes} "
        f"d_vit={args.d_vit} d_sae={base.sae.d_sae} batch={args.batch_size} objective={args.objective}"
        + (f" k={args.k}" if args.objective != "relu_l1" else ""),
        flush=True,
    )
    for x_BD in batches[: args.warmup]:
        step_batched(x_BD)
        step_loop(x_BD)
    sync(device)

    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for r in range(args.rounds):
        round_batches = batches[args.warmup + r * args.steps : args.warmup + (r + 1) * args.steps]
        order = (("batched", step_batched), ("loop", step_loop))
        for name, step in order if r % 2 == 0 else order[::-1]:  # ABBA: neither side always goes first
            start = time.perf_counter()
            for x_BD in round_batches:
                step(x_BD)
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {r}: batched {times['batched'][-1]:.3f} s/step | loop {times['loop'][-1]:.3f} s/step", flush=True)

    per_step = {name: statistics.median(ts) for name, ts in times.items()}
    for name, seconds in per_step.items():
        sae_steps = args.n_saes / seconds
        print(f"{name:8s} {1 / seconds:7.2f} steps/s  ({sae_steps:7.1f} SAE-steps/s, {seconds:.3f} s/step)")
    max_diff = max(
        (getattr(batched.stack, name)[s] - getattr(trainer.stack, name)[0]).abs().max().item()
        for s, trainer in enumerate(looped)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    print(f"max |batched - loop| weight difference after {n_batches} steps: {max_diff:.3g}")
    print(f"RESULT batched_vs_loop={per_step['loop'] / per_step['batched']:.3f}")


if __name__ == "__main__":
    main()
