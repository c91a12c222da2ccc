"""Benchmark saev.ap.average_precision against scikit-learn's average_precision_score, in the same run.

Scores are ReLU-like (about 90% exact zeros) float32 [N, K]; each column k leans towards one class so APs are
not all near prevalence. scikit-learn is looped over (column, class) on the first few columns only (it needs
~1.6 s per column at C=151), and both are compared per prototype column. The last line is machine-readable:

    RESULT ratio_c10=<x> ratio_c151=<y> max_abs_diff=<z>

Run: uv run python benchmarks/ap.py [--device cuda] [--n 100000] [--k 256]
"""

import argparse
import ctypes
import os
import pathlib
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import average_precision_score

# A script run as a file gets benchmarks/ on sys.path, not the repository root that holds saev/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from saev.ap import average_precision  # noqa: E402


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine runs")
    parser.add_argument("--n", type=int, default=100_000, help="examples (rows)")
    parser.add_argument("--k", type=int, default=256, help="prototypes (columns)")
    parser.add_argument("--sk-cols-c10", type=int, default=8, help="columns scikit-learn scores at C=10")
    parser.add_argument("--sk-cols-c151", type=int, default=2, help="columns scikit-learn scores at C=151")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_data(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU-like scores_NK (float32, ~90% zeros) and int labels over 151 classes (~2% ignored as -1)."""
    gen = torch.Generator().manual_seed(seed)
    # Skewed class frequencies, like segmentation classes.
    weights_C = torch.rand(151, generator=gen) ** 3 + 0.01
    labels_N = torch.multinomial(weights_C, n, replacement=True, generator=gen)
    labels_N[torch.rand(n, generator=gen) < 0.02] = -1
    scores_NK = torch.randn(n, k, generator=gen)
    # Column k fires more for class k % 151: a real but imperfect detector.
    prefers_NK = labels_N[:, None] == (torch.arange(k) % 151)[None, :]
    scores_NK += 2.5 * prefers_NK
    scores_NK -= 1.2816  # the 90th percentile of a standard normal
    scores_NK.clamp_(min=0.0)
    return scores_NK, labels_N


class RssPeak:
    """Peak resident set size of this process above its starting value while in the block.

    A separate process polls /proc/<pid>/statm every 2 ms: a polling thread would contend for the GIL and slow
    the engine down by an order of magnitude, so timings are taken in a separate call without this.
    """

    # Polls until a line arrives on stdin, then prints the peak in pages.
    POLL = """
import select, sys, time
path, peak = f"/proc/{sys.argv[1]}/statm", 0
while not select.select([sys.stdin], [], [], 0)[0]:
    with open(path) as fd:
        peak = max(peak, int(fd.read().split()[1]))
    time.sleep(0.002)
print(peak)
"""

    def __enter__(self) -> "RssPeak":
        self.page = os.sysconf("SC_PAGE_SIZE")
        # Hand freed heap back to the OS first, so memory the allocator kept from earlier work is not reused unseen.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = self._rss()
        argv = [sys.executable, "-c", self.POLL, str(os.getpid())]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)  # let the poller start before the work does
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self.proc.communicate("stop\n")
        self.peak = max(int(out) * self.page, self.start)

    def _rss(self) -> int:
        with open("/proc/self/statm") as fd:
            return int(fd.read().split()[1]) * self.page

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def time_engine(
    scores_NK: torch.Tensor, labels_N: torch.Tensor, n_classes: int, repeats: int = 3
) -> tuple[np.ndarray, float]:
    """Median over `repeats` calls of the engine's seconds per column over all K columns, and its AP [C, K]."""
    average_precision(scores_NK[:, :4], labels_N, n_classes)  # warm up (lazy init, first-call checks)
    times = []
    for _ in range(repeats):
        if scores_NK.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ap_CK = average_precision(scores_NK, labels_N, n_classes)
        if scores_NK.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return ap_CK.cpu().numpy(), float(np.median(times)) / scores_NK.shape[1]


def time_sklearn(scores_NK: np.ndarray, labels_N: np.ndarray, n_classes: int, n_cols: int) -> tuple[np.ndarray, float]:
    """Seconds per column of scikit-learn looped over (column, class) on the first n_cols columns, and its AP."""
    keep_N = labels_N >= 0
    scores_NK, labels_N = scores_NK[keep_N], labels_N[keep_N]
    ap_CK = np.full((n_classes, n_cols), np.nan)
    start = time.perf_counter()
    for k in range(n_cols):
        for c in range(n_classes):
            positive_N = labels_N == c
            if positive_N.any():
                ap_CK[c, k] = average_precision_score(positive_N, scores_NK[:, k])
        print(f"  sklearn column {k + 1}/{n_cols} done, {time.perf_counter() - start:.1f} s so far", flush=True)
    return ap_CK, (time.perf_counter() - start) / n_cols


def main() -> None:
    args = get_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    warnings.filterwarnings("ignore", message="No positive class found")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}", flush=True)
    scores_NK, labels151_N = make_data(args.n, args.k, args.seed)
    # C=10 labels are a coarsening of the 151, so the same columns stay informative.
    labels10_N = torch.where(labels151_N >= 0, labels151_N % 10, -1)
    zero_frac = (scores_NK == 0).double().mean().item()
    print(f"data: N={args.n} K={args.k} float32, {zero_frac:.1%} exact zeros, {(labels151_N < 0).sum()} ignored")

    scores_np, ratios, max_diff = scores_NK.numpy(), {}, 0.0
    scores_dev = scores_NK.to(args.device)
    for n_classes, labels_N, sk_cols in [(10, labels10_N, args.sk_cols_c10), (151, labels151_N, args.sk_cols_c151)]:
        print(f"C={n_classes}: engine on all {args.k} columns ...", flush=True)
        ap_CK, engine_s = time_engine(scores_dev, labels_N.to(args.device), n_classes)
        print(f"C={n_classes}: engine {engine_s:.5f} s/column (median of 3 calls)", flush=True)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with RssPeak() as rss:
            average_precision(scores_dev, labels_N.to(args.device), n_classes)
        mem = f"host RSS peak +{rss.increase_mb:.0f} MB over the call's start (polled /proc/PID/statm)"
        if args.device == "cuda":
            mem += f"; CUDA max allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
        print(f"C={n_classes}: engine memory (separate untimed call): {mem}", flush=True)

        sk_cols = min(sk_cols, args.k)
        print(f"C={n_classes}: sklearn on the first {sk_cols} columns ...", flush=True)
        ref_CK, sk_s = time_sklearn(scores_np, labels_N.numpy(), n_classes, sk_cols)
        both = ~np.isnan(ref_CK)
        assert np.array_equal(both, ~np.isnan(ap_CK[:, :sk_cols])), "NaN pattern differs"
        diff = float(np.abs(ap_CK[:, :sk_cols][both] - ref_CK[both]).max())
        max_diff, ratios[n_classes] = max(max_diff, diff), sk_s / engine_s
        print(f"C={n_classes}: sklearn {sk_s:.4f} s/column; ratio {sk_s / engine_s:.1f}x; max |dAP| {diff:.3g}")
        print(f"C={n_classes}: AP range over all columns {np.nanmin(ap_CK):.4f} .. {np.nanmax(ap_CK):.4f}")

    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS (resource.getrusage ru_maxrss, whole run incl. data): {maxrss_mb:.0f} MB")
    print(f"RESULT ratio_c10={ratios[10]:.1f} ratio_c151={ratios[151]:.1f} max_abs_diff={max_diff:.3g}")


if __name__ == "__main__":
    main()
