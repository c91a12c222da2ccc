"""Benchmark saev.probe.fit_probes against scikit-learn's LogisticRegression and against the AP engine, in one run.

    uv run python benchmarks/probe.py                          # N=100,000, K=4,096, C=151: a few minutes
    uv run python benchmarks/probe.py --n 20000 --k 256        # a quick run

Data (seeded, as benchmarks/ap.py makes it): ReLU-like float32 scores (about 10% non-zero), each column leaning
towards one class, and int labels over 151 skewed classes with ~2% of rows ignored (-1).
- fit_probes and the AP engine (`saev.ap.average_precision`) on the same block, in `--rounds` interleaved rounds
  (alternating which goes first); probe_vs_ap = the median over rounds of probe time / AP time.
- scikit-learn: `LogisticRegression(solver="newton-cholesky", C=1 / (ridge * n), tol=1e-10)` on `--sk-pairs`
  sampled (column, class) pairs, each a 1-feature dense fit over the kept rows, timed per pair and extrapolated to
  all K x C pairs: probe_vs_sklearn = sklearn's extrapolated time / fit_probes's median time. newton-cholesky is
  the fastest of sklearn's exact solvers here (lbfgs took ~5x longer per pair at this tolerance). sklearn's
  objective is C * sum BCE + 0.5 * w^2 with the intercept not penalised, i.e. ours divided by ridge without the
  0.5 * ridge * (b - b0)^2 term (a 1e-8 weight). So both solutions are scored under OUR objective's loss:
  max_rel_loss_diff = max over sampled pairs of |our mean BCE - sklearn's mean BCE at its (w, b)| / sklearn's.
- converged = share of the non-degenerate pairs (`Probes.degenerate_CK` False) whose `converged_CK` is True.
`--rounds` defaults to 1: one fit_probes call at the defaults takes about 2 minutes on 2 CPUs at a load of 5 (AP
about 3 s), so more rounds cost minutes each; use 3 or more on a quiet machine for a median with a spread.
Conditions (CPUs, torch threads, load) are printed before and after; on a loaded machine the times are noisy.
Last line: RESULT probe_vs_sklearn=<x> probe_vs_ap=<y> max_rel_loss_diff=<z> converged=<share>
"""

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conditions  # noqa: E402
from ap import make_data, timed  # noqa: E402
from saev.ap import average_precision  # noqa: E402
from saev.probe import fit_probes  # noqa: E402


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=100_000, help="rows (patches)")
    parser.add_argument("--k", type=int, default=4096, help="latent columns")
    parser.add_argument("--sk-pairs", type=int, default=24, help="(column, class) pairs scikit-learn fits")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of fit_probes and AP (1: minutes)")
    parser.add_argument("--ridge", type=float, default=1e-8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def bce(z_N: np.ndarray, y_N: np.ndarray, w: float, b: float) -> float:
    """Mean binary cross-entropy of sigmoid(b + w z), dense float64."""
    t_N = b + w * z_N
    return float(np.mean(np.logaddexp(0, t_N) - y_N * t_N))


def main() -> None:
    args = get_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    n_classes = 151
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}", flush=True)
    scores_NK, labels_N = make_data(args.n, args.k, args.seed)
    nonzero = float((scores_NK > 0).double().mean())
    print(f"data: N={args.n} K={args.k} C={n_classes} float32, {nonzero:.1%} non-zero, {(labels_N < 0).sum()} ignored")
    print(conditions.describe("before"), flush=True)
    scores_dev, labels_dev = scores_NK.to(args.device), labels_N.to(args.device)
    cuda = args.device == "cuda"

    probes = None

    def probe() -> None:
        nonlocal probes
        probes = fit_probes(scores_dev, labels_dev, n_classes, ridge=args.ridge)

    calls = {"probe": probe, "ap": lambda: average_precision(scores_dev, labels_dev, n_classes)}
    times: dict[str, list[float]] = {"probe": [], "ap": []}
    for r in range(args.rounds):
        for name in ("probe", "ap") if r % 2 == 0 else ("ap", "probe"):
            times[name].append(timed(calls[name], cuda))
        print(f"round {r + 1}: probe {times['probe'][-1]:.2f} s, AP {times['ap'][-1]:.2f} s", flush=True)
    ratio_R = [p / a for p, a in zip(times["probe"], times["ap"], strict=True)]
    probe_s = statistics.median(times["probe"])
    print(
        f"fit_probes {conditions.spread(times['probe'], '{:.2f}')} s; AP {conditions.spread(times['ap'], '{:.2f}')} s"
    )
    print(f"probe_vs_ap (probe / AP, per round) {conditions.spread(ratio_R, '{:.2f}')}")

    w_CK, b_CK, loss_CK = (x.cpu().numpy() for x in probes[:3])
    converged_CK, degenerate_CK = probes.converged_CK.cpu().numpy(), probes.degenerate_CK.cpu().numpy()
    steps_CK = probes.iterations_CK.cpu().numpy()
    good_CK = ~degenerate_CK
    converged = float(converged_CK[good_CK].mean())
    print(f"pairs: {degenerate_CK.sum()} degenerate of {degenerate_CK.size}; converged (non-degenerate) {converged:.6f}, "
          f"(degenerate) {converged_CK[degenerate_CK].mean() if degenerate_CK.any() else float('nan'):.4f}; "
          f"Newton steps mean {steps_CK.mean():.2f}, max {steps_CK.max()}")  # fmt: skip

    keep_N = labels_N.numpy() >= 0
    z_NK, y_N = scores_NK.numpy()[keep_N], labels_N.numpy()[keep_N]
    n = int(keep_N.sum())
    rng = np.random.default_rng(args.seed)
    # Half the sample: each sampled column with the class it leans towards (informative pairs); half at random.
    cols = rng.integers(0, args.k, args.sk_pairs)
    classes = np.where(np.arange(args.sk_pairs) % 2 == 0, cols % n_classes, rng.integers(0, n_classes, args.sk_pairs))
    sk_times, rel_diffs = [], []
    for k, c in zip(cols, classes, strict=True):
        x_N1, t_N = z_NK[:, k : k + 1].astype(np.float64), (y_N == c)
        model = LogisticRegression(C=1 / (args.ridge * n), solver="newton-cholesky", tol=1e-10, max_iter=1000)
        start = time.perf_counter()
        model.fit(x_N1, t_N)
        sk_times.append(time.perf_counter() - start)
        sk_loss = bce(x_N1[:, 0], t_N, float(model.coef_[0, 0]), float(model.intercept_[0]))
        ours = bce(x_N1[:, 0], t_N, float(w_CK[c, k]), float(b_CK[c, k]))
        assert abs(ours - loss_CK[c, k]) <= 1e-9 * ours, "loss_CK disagrees with a dense evaluation"
        rel_diffs.append(abs(loss_CK[c, k] - sk_loss) / sk_loss)
    sk_pair_s = statistics.median(sk_times)
    sk_all_s = sk_pair_s * args.k * n_classes
    print(f"sklearn: {sk_pair_s * 1e3:.1f} ms per pair (median of {len(sk_times)}; range "
          f"{min(sk_times) * 1e3:.1f}-{max(sk_times) * 1e3:.1f}), all {args.k * n_classes:,} pairs ~{sk_all_s:.0f} s; "
          f"max rel loss diff {max(rel_diffs):.3g}")  # fmt: skip
    print(conditions.describe("after"))
    print(f"RESULT probe_vs_sklearn={sk_all_s / probe_s:.1f} probe_vs_ap={statistics.median(ratio_R):.2f} "
          f"max_rel_loss_diff={max(rel_diffs):.3g} converged={converged:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
