"""Benchmark saev.ap.average_precision against one sort of the same entries, and against scikit-learn, in one run.

Scores are ReLU-like (about 90% exact zeros) float32 [N, K]; each column k leans towards one class so APs are
not all near prevalence. For C=10 and C=151 classes:
- the floor: one `torch.sort` (stable, PyTorch's radix sort on CPU) of the block's ranked entries' int64 keys, one
  key per entry above the minimum (ignored rows left out) packing (column, the score's 32-bit order key, class),
  all K columns in one sort. Any exact sort-based AP sorts these entries at least once.
- the engine on all K columns. `ap_vs_sort` = floor time / engine time, taken within each round and reported as
  the median over rounds: a round times both back to back (alternating which goes first), so a ratio is far less
  sensitive to the machine's load than either time alone.
- scikit-learn looped over (column, class) on the first few columns only (it needs ~1.6 s per column at C=151),
  compared with the engine per prototype column, once.
`--rounds` defaults to 15: a round costs about a quarter of a second on a quiet 2-CPU machine, so all rounds of
both C take seconds beside scikit-learn's ~20 s; the median of 15 ignores up to 7 disturbed rounds, and the printed
range (min-max of the per-round ratio) says whether the run was quiet enough: on a busy machine it is wide (0.21-0.61
at a load average of 8.7 on 2 CPUs), so rerun there with more rounds or not at all. Conditions (CPUs, torch
threads, load) are printed before and after.
The last line is machine-readable:

    RESULT ap_vs_sort=<min over C of the median ratio> ap_vs_sort_c10=<x> ap_vs_sort_c151=<y>
           ratio_c10=<sklearn / engine> ratio_c151=<...> max_abs_diff=<z>

Run: uv run python benchmarks/ap.py [--device cuda] [--n 100000] [--k 256] [--rounds 15]
"""

import argparse
import ctypes
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import average_precision_score

# A script run as a file gets benchmarks/ on sys.path, not the repository root that holds saev/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conditions  # noqa: E402
from saev.ap import average_precision  # noqa: E402


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine runs")
    parser.add_argument("--n", type=int, default=100_000, help="examples (rows)")
    parser.add_argument("--k", type=int, default=256, help="prototypes (columns)")
    parser.add_argument("--sk-cols-c10", type=int, default=8, help="columns scikit-learn scores at C=10")
    parser.add_argument("--sk-cols-c151", type=int, default=2, help="columns scikit-learn scores at C=151")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of engine and floor sort")
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


def floor_keys(scores_NK: torch.Tensor, labels_N: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The block's ranked entries as int64 keys (column, 32-bit order key of the score, class), one per entry above
    the minimum in a row that is not ignored: what an exact sort-based AP of the whole block sorts at least once."""
    ranked_NK = (scores_NK > scores_NK.min()) & (labels_N >= 0)[:, None]
    row_E, col_E = ranked_NK.nonzero(as_tuple=True)
    bits_E = (scores_NK[row_E, col_E] + 0.0).view(torch.int32)  # the engine's order key for any sign
    bits_E = (bits_E ^ ((bits_E >> 31) & 0x7FFFFFFF)).to(torch.int64) + 2**31
    class_bits = max(1, (n_classes - 1).bit_length())
    return (((col_E << 32) | bits_E) << class_bits) | labels_N[row_E]


def timed(fn, cuda: bool) -> float:
    """Seconds one call of `fn` takes (synchronised on CUDA)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_engine_and_floor(
    scores_NK: torch.Tensor, labels_N: torch.Tensor, n_classes: int, rounds: int
) -> tuple[np.ndarray, int, list[float], list[float]]:
    """The engine's AP [C, K], the floor's number of keys, and per round the engine's and the floor sort's seconds."""
    keys_E = floor_keys(scores_NK, labels_N, n_classes)
    calls = {
        "engine": lambda: average_precision(scores_NK, labels_N, n_classes),
        "floor": lambda: torch.sort(keys_E, stable=True),
    }
    ap_CK = calls["engine"]()  # warm up (lazy init, first-call checks)
    calls["floor"]()
    times = {"engine": [], "floor": []}
    for r in range(rounds):
        for name in ("engine", "floor") if r % 2 == 0 else ("floor", "engine"):
            times[name].append(timed(calls[name], scores_NK.is_cuda))
    return ap_CK.cpu().numpy(), keys_E.numel(), times["engine"], times["floor"]


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

    scores_np, ratios, ap_vs_sort, max_diff = scores_NK.numpy(), {}, {}, 0.0
    scores_dev = scores_NK.to(args.device)
    print(conditions.describe("before"), flush=True)
    for n_classes, labels_N, sk_cols in [(10, labels10_N, args.sk_cols_c10), (151, labels151_N, args.sk_cols_c151)]:
        print(f"C={n_classes}: engine on all {args.k} columns and the floor sort, {args.rounds} rounds ...", flush=True)
        labels_dev = labels_N.to(args.device)
        ap_CK, n_keys, engine, floor = time_engine_and_floor(scores_dev, labels_dev, n_classes, args.rounds)
        ratio_R = [f / e for e, f in zip(engine, floor, strict=True)]
        ap_vs_sort[n_classes] = statistics.median(ratio_R)
        print(
            f"C={n_classes}: engine {conditions.spread([1e3 * t for t in engine], '{:.1f}')} ms; floor sort of "
            f"{n_keys:,} int64 keys {conditions.spread([1e3 * t for t in floor], '{:.1f}')} ms"
        )
        print(f"C={n_classes}: ap_vs_sort (floor / engine, per round) {conditions.spread(ratio_R, '{:.3f}')}")
        engine_s = statistics.median(engine) / args.k
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

    print(conditions.describe("after"))
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS (resource.getrusage ru_maxrss, whole run incl. data): {maxrss_mb:.0f} MB")
    print(
        f"RESULT ap_vs_sort={min(ap_vs_sort.values()):.3f} ap_vs_sort_c10={ap_vs_sort[10]:.3f} "
        f"ap_vs_sort_c151={ap_vs_sort[151]:.3f} ratio_c10={ratios[10]:.1f} ratio_c151={ratios[151]:.1f} "
        f"max_abs_diff={max_diff:.3g}"
    )


if __name__ == "__main__":
    main()
