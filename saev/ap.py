"""Exact average precision (AP) of every prototype column for every class, fast enough for all of K.

AP here is exactly scikit-learn's `average_precision_score(labels == c, scores[:, k])`, ties included: examples
with equal scores form one threshold, so with P_c positives of class c

    AP_c = (1 / P_c) * sum over positives i of class c of  TP_c(score >= s_i) / #(score >= s_i).

See shared/notes/average-precision.md for why (ReLU latents are mostly exact zeros, one huge tie group).

How it is computed, per block of J columns at once (one implementation for CPU and CUDA):
1. The minimum of all scores, where a column has it, is that column's bottom tie group: each positive there has
   precision P_c / N, so only entries above it (the nonzeros of a ReLU latent) are ranked; rows labelled -1 are
   never ranked either. A row-major copy of the block, a mask and one nonzero (numpy's on CPU) find them.
2. Sort 1, of one int64 key per entry packing (column, score, class), puts each column in score order; a tie group
   is a run of equal (column, score), and #(score >= s_i) is the column's count minus where i's group starts.
3. Sort 2, by (column, class, where the group starts), puts each class's entries of a column together in score
   order, ties still together; it is usually a 32-bit key, about twice as fast to sort. A run of equal keys is one
   class's entries in one tie group, sharing TP_c(score >= s_i): the segment's end minus where the run starts. Each
   run adds size * TP_c(score >= s_i) / #(score >= s_i) to its segment's sum.
   Neither sort grows with C, and there is no [N, C] one-hot.
Scores enter the keys as 32-bit order-preserving integers: float32 bits (float16/bfloat16 widened exactly), or
for float64 the dense rank among the block's entries. Integer keys sort fast: on CPU with numpy's vectorised
quicksort (`_sorted`), on CUDA with torch's radix sort. Counts are int64;
ratios and sums are float64. Multi-hot labels share step 1 and sort 1, then take one pass per class.
Blocks are sized for memory (about 256 MB at worst) and in practice for cache: a block's sorts of a few hundred
thousand entries run several times faster per entry than one sort of millions (benchmarks/ap.py). On CPU, blocks
are ranked side by side, as many as torch has threads, each block's ops on one thread (see `_on_threads`). Each
block is computed alone, so results never depend on the block width or on how many blocks run at once.

Shape suffixes: N examples (rows), K prototypes (columns), C classes, J columns of the current block,
E ranked entries of the block (above the minimum), S (column, class) segments of the block, R runs of equal sort-2
keys, I ignored rows.
"""

import concurrent.futures
import math
import typing

import beartype
import numpy as np
import torch
from jaxtyping import Bool, Float, Float64, Int, Int64, jaxtyped
from torch import Tensor

from saev.helpers import set_torch_threads

# Temporary memory the blocks in flight may use together, and what one score of a block costs at worst (every score
# ranked, all distinct): the block's copy and mask, then about seven 8-byte values per ranked entry at the peak.
# Measured with N=100,000 and 32 columns a block, one at a time: dense float32 scores peaked 209-268 MB above the
# start of the call (55 bytes a score of live tensors, the rest the allocator's), ReLU-like (90% zeros) ones 31-40 MB.
# Two blocks of 16 side by side: dense 418-421 MB, of which 153 MB remain with glibc's mmap threshold fixed at 1 MiB
# (MALLOC_MMAP_THRESHOLD_): the rest is freed memory each thread's malloc arena keeps; ReLU-like ones 7-8 MB.
_BLOCK_BYTES = 256 * 2**20
_BYTES_PER_SCORE = 80

Scores = Float[Tensor, "N K"] | Float[np.ndarray, "N K"]
Labels = Int[Tensor, " N"] | Bool[Tensor, "N C"] | Int[np.ndarray, " N"] | Bool[np.ndarray, "N C"]


@torch.no_grad()
@jaxtyped(typechecker=beartype.beartype)
def average_precision(
    scores_NK: Scores,
    labels: Labels,
    n_classes: int | None = None,
    *,
    chunk: int | None = None,
    workers: int | None = None,
) -> Float64[Tensor, "C K"]:
    """Average precision of every prototype column of `scores_NK` for every class, equal to scikit-learn's.

    Args:
        scores_NK: one score per example (row) and prototype (column); any float dtype; torch tensor (CPU or CUDA)
            or numpy array. Must be finite.
        labels: either int class ids [N] in [0, C), where -1 marks an example to ignore (removed before ranking
            and before counting positives), or bool multi-hot [N, C], where each column is its own binary problem
            over all rows.
        n_classes: C. For int labels it defaults to max label + 1; for multi-hot labels it must equal the number
            of label columns if given.
        chunk: how many prototype columns are ranked together. Default: the largest power of two that fits about 256 MB
            of temporary memory in the worst case (every score distinct), shared by the `workers` blocks in flight,
            and gives each worker a block where K allows. Results do not depend on it, bit for bit.
        workers: how many blocks are ranked at once on CPU, each on its own thread with one torch thread. Default:
            the calling thread's torch thread count (`torch.get_num_threads()`). On CUDA blocks go one at a time.
            Results do not depend on it, bit for bit.

    Returns:
        AP [C, K] as float64 on the scores' device. NaN for a class with no positives (scikit-learn would return
        0.0 with a warning).

    Raises:
        ValueError: NaN or +-inf anywhere in scores_NK, ignored rows included (the message names the prototype
            columns), an int label below -1 or >= n_classes, or mismatched shapes.
    """
    scores_NK = torch.from_numpy(scores_NK) if isinstance(scores_NK, np.ndarray) else scores_NK
    labels = torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels
    n, k = scores_NK.shape
    device = scores_NK.device
    labels = labels.to(device)
    if labels.shape[0] != n:
        raise ValueError(f"scores have {n} rows but labels have {labels.shape[0]}.")

    ignored_I = None  # rows to leave out of ranking
    if labels.dtype == torch.bool:
        if n_classes is not None and n_classes != labels.shape[1]:
            raise ValueError(f"n_classes={n_classes} but multi-hot labels have {labels.shape[1]} columns.")
        labels_CN = labels.T.contiguous()  # one class's labels per row, read once per class and block
        n_positives_C = labels_CN.sum(dim=1)
        n_kept, class_bits = n, 0
    else:
        labels_N = labels.to(torch.int64)
        if n and int(labels_N.min()) < -1:
            raise ValueError(f"int labels must be class ids >= 0 or -1 (ignore); got {int(labels_N.min())}.")
        max_label = int(labels_N.max()) if n else -1
        if n_classes is None:
            n_classes = max_label + 1
        if max_label >= n_classes:
            raise ValueError(f"label {max_label} is out of range for n_classes={n_classes}.")
        if n_classes > 2**30:
            raise ValueError(f"n_classes={n_classes} is too many: class ids must fit 30 bits of a sort key.")
        ignored_I = (labels_N < 0).nonzero().squeeze(1)
        ignored_I = ignored_I if ignored_I.numel() else None
        n_positives_C = torch.bincount(labels_N[labels_N >= 0], minlength=n_classes)
        n_kept, class_bits = int(n_positives_C.sum()), max(1, (n_classes - 1).bit_length())
    if n >= 2**31:
        raise ValueError(f"{n} rows are too many for one call (at most 2^31 - 1); split the rows.")

    n_c = n_positives_C.numel()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}.")
    workers = (workers or torch.get_num_threads()) if device.type == "cpu" else 1
    if chunk is None:
        # A power of two: whole cache lines of each row per block, and rows and columns from shifts. At most
        # ceil(K / workers) columns, so that every worker has a block where K allows.
        fits = _BLOCK_BYTES // (workers * _BYTES_PER_SCORE * max(n, 1))
        chunk = 1 << (max(1, min(fits, -(-k // workers))).bit_length() - 1)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}.")
    # Sort keys pack (column, 32-bit score key, class) and (column, class, rank) into 63 bits.
    chunk = min(chunk, 2 ** (31 - class_bits), max(1, (2**31 - 1) // max(n, 1)))

    ap_CK = torch.full((n_c, k), torch.nan, dtype=torch.float64, device=device)
    if n == 0 or k == 0:
        return ap_CK
    # NaN propagates through min and max, so one pass over all scores checks them; columns are named only on failure.
    # The overall minimum is every column's bottom tie group where the column has it (see `_entries_above`); one
    # value for all blocks also makes the ranked entries, and so the AP's bits, independent of `chunk`.
    low, high = (float(x) for x in torch.aminmax(scores_NK))
    if not (math.isfinite(low) and math.isfinite(high)):
        finite_K = torch.cat([torch.isfinite(scores_NK[:, s : s + chunk]).all(dim=0) for s in range(0, k, chunk)])
        cols = (~finite_K).nonzero().squeeze(1).tolist()
        raise ValueError(f"scores contain NaN or +-inf in {len(cols)} prototype column(s); first: {cols[:10]}.")
    if n_kept == 0 or n_c == 0:
        return ap_CK

    def rank(start: int) -> Float64[Tensor, "C J"]:
        block_NJ = scores_NK[:, start : start + chunk]  # a view: the callees copy it and free what they make as they go
        if labels.dtype == torch.bool:
            return _ap_multi_hot(block_NJ, low, labels_CN, n_positives_C)
        return _ap_class_ids(block_NJ, low, ignored_I, labels_N, n_positives_C, n_kept)

    starts = range(0, k, chunk)
    # Written here, not by the workers: `ap_CK` is an inference tensor when the caller is in inference mode.
    blocks = map(rank, starts) if workers == 1 or len(starts) == 1 else _on_threads(rank, starts, workers)
    for start, ap_CJ in zip(starts, blocks, strict=True):
        ap_CK[:, start : start + chunk] = ap_CJ
    return ap_CK


def _on_threads(fn: typing.Callable[[int], Tensor], items: range, workers: int) -> typing.Iterator[Tensor]:
    """`fn(item)` for every item, in order, on `workers` threads of one torch thread each, without autograd; the
    calling thread's torch thread count is kept.

    A block's many small ops (its mask, nonzero, sorts of a few hundred thousand keys, copies) each start and join
    a team of torch threads; blocks side by side, one thread each, join nothing. On a quiet 2-CPU machine that is
    only 1-3% faster (N=100,000, K=256), but with other processes on the cores a team waits, spinning, at each join
    for a thread that lost its core: in the same interleaved rounds at a load of about 3, the blocks one at a time
    on 2 torch threads used 651-671 ms of CPU a call, side by side 179-189 ms. torch ops release the GIL, as do numpy's
    flatnonzero and sort used on CPU.
    OpenMP's thread count is per thread, but torch keeps the last count set as the count of threads that start
    later, so each worker sets the caller's count back, to the value read here.
    """
    n_threads = torch.get_num_threads()

    def one(item: int) -> Tensor:
        set_torch_threads(1, force=True)
        try:
            with torch.no_grad():  # grad mode is per thread: the caller's no_grad does not reach here
                return fn(item)
        finally:
            set_torch_threads(n_threads, force=True)

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="saev-ap") as pool:
        yield from pool.map(one, items)  # in order; re-raises a worker's exception here


@jaxtyped(typechecker=beartype.beartype)
def best_per_class(ap_CK: Float[Tensor, "C K"]) -> tuple[Float64[Tensor, " C"], Int64[Tensor, " C"]]:
    """Best AP of each class over the K prototypes, and that prototype's index.

    Equal APs go to the lowest index. A class whose APs are all NaN (no positives) gets AP NaN and index -1.
    NaN entries inside an otherwise valid row are skipped.
    """
    ap_CK = ap_CK.to(torch.float64)
    n_c, k = ap_CK.shape
    best_C = torch.full((n_c,), torch.nan, dtype=torch.float64, device=ap_CK.device)
    index_C = torch.full((n_c,), -1, dtype=torch.int64, device=ap_CK.device)
    if k == 0:
        return best_C, index_C
    valid_CK = ~torch.isnan(ap_CK)
    filled_CK = torch.where(valid_CK, ap_CK, -torch.inf)
    max_C = filled_CK.amax(dim=1)
    # Spelled out rather than trusting argmax's tie rule, which is not documented for every backend.
    is_best_CK = valid_CK & (filled_CK == max_C[:, None])
    k_K = torch.arange(k, device=ap_CK.device)
    first_C = torch.where(is_best_CK, k_K, k).amin(dim=1)
    has_C = valid_CK.any(dim=1)
    best_C = torch.where(has_C, max_C, best_C)
    index_C = torch.where(has_C, first_C, index_C)
    return best_C, index_C


@jaxtyped(typechecker=beartype.beartype)
def _ap_class_ids(
    block_NJ: Float[Tensor, "N J"],
    low: float,
    ignored_I: Int64[Tensor, " I"] | None,
    labels_N: Int64[Tensor, " N"],
    n_positives_C: Int64[Tensor, " C"],
    n_kept: int,
) -> Float64[Tensor, "C J"]:
    """AP of one block for int labels; rows in `ignored_I` are left out."""
    j, n_c, device = block_NJ.shape[1], n_positives_C.numel(), block_NJ.device
    row_E, col_E, key32_E = _entries_above(block_NJ, low, ignored_I)
    class_bits = max(1, (n_c - 1).bit_length())
    col_shift = 32 + class_bits  # sort-1 keys hold the column above 32 bits of score and the class bits

    # Sort 1, by [column | score | class]: a tie group is a run of equal (column, score).
    key_E = torch.add(labels_N.index_select(0, row_E), key32_E, alpha=1 << class_bits).add_(col_E, alpha=1 << col_shift)
    del row_E, col_E, key32_E
    key_E = _sorted(key_E)
    group_E, size_G = torch.unique_consecutive(key_E >> class_bits, return_inverse=True, return_counts=True)[1:]
    col_end_J = torch.searchsorted(key_E, torch.arange(1, j + 1, device=device) << col_shift)
    count_J = torch.diff(col_end_J, prepend=col_end_J.new_zeros(1))
    # Where each entry's tie group starts within its column: #(score >= s_i) is the column's count minus that.
    start_E = torch.cumsum(size_G, dim=0).sub_(size_G).index_select(0, group_E)
    del group_E, size_G
    col_E = key_E >> col_shift
    start_E.sub_((col_end_J - count_J).index_select(0, col_E))

    # Sort 2, by [column | class | group start]: each (column, class) segment in score order, ties still together,
    # so a run of equal keys is one class's entries in one tie group. The three fit 31 bits unless a block holds
    # many classes or columns with very many ranked entries, and 32-bit keys sort about twice as fast.
    start_bits = max(1, int(count_J.max()).bit_length())
    seg_shift = start_bits + class_bits
    dtype = torch.int32 if j.bit_length() + seg_shift <= 31 else torch.int64
    key_E = start_E.to(dtype).add_(key_E.bitwise_and_((1 << class_bits) - 1), alpha=1 << start_bits)
    key_E = _sorted(key_E.add_(col_E, alpha=1 << seg_shift))
    del start_E, col_E
    run_R, size_R = torch.unique_consecutive(key_E, return_counts=True)
    # Where each (column, class) segment ends: the first key of the next class (the next column, after the last).
    bound_S = (torch.arange(j, device=device)[:, None] << seg_shift) + (
        torch.arange(1, n_c + 1, device=device) << start_bits
    )
    bound_S = bound_S.view(-1).to(dtype)
    end_S = torch.searchsorted(key_E, bound_S)
    del key_E
    n_runs_S = torch.diff(torch.searchsorted(run_R, bound_S), prepend=end_S.new_zeros(1))
    # TP_c(score >= s_i): the segment's entries from the start of i's run to the segment's end.
    tp_R = torch.repeat_interleave(end_S, n_runs_S, output_size=run_R.numel())
    tp_R.sub_(torch.cumsum(size_R, dim=0)).add_(size_R)
    above_R = count_J.index_select(0, run_R >> seg_shift).sub_(run_R.bitwise_and_((1 << start_bits) - 1))
    del run_R
    precision_R = size_R.mul_(tp_R).double().div_(above_R)  # the sum of the precisions of the run's entries
    # segment_reduce sums each segment in order on CPU and CUDA, so equal columns give bit-identical AP.
    sum_S = torch.segment_reduce(precision_R, "sum", lengths=n_runs_S)
    count_S = torch.diff(end_S, prepend=end_S.new_zeros(1))
    return _finish(sum_S.view(j, n_c).T, count_S.view(j, n_c).T, n_positives_C, n_kept)


@jaxtyped(typechecker=beartype.beartype)
def _ap_multi_hot(
    block_NJ: Float[Tensor, "N J"], low: float, labels_CN: Bool[Tensor, "C N"], n_positives_C: Int64[Tensor, " C"]
) -> Float64[Tensor, "C J"]:
    """AP of one block for multi-hot labels; all rows count."""
    n, j = block_NJ.shape
    row_E, col_E, key32_E = _entries_above(block_NJ, low, None)
    n_e = row_E.numel()
    key_E, order_E = torch.sort(torch.add(key32_E, col_E, alpha=1 << 32), stable=True)
    row_E = row_E.index_select(0, order_E)
    col_E = key_E >> 32
    group_E = _run_starts(_changes(key_E))  # unique per (column, score)
    count_J = torch.bincount(col_E, minlength=j)
    at_or_above_E = _repeat(torch.cumsum(count_J, dim=0), count_J, n_e) - group_E

    # Classes overlap, so one class at a time: its positives, taken in sorted order, are already sorted.
    sums, counts = [], []
    for labels_N in labels_CN:
        pos_P = labels_N.index_select(0, row_E).nonzero().squeeze(1)
        col_P, group_P = col_E.index_select(0, pos_P), group_E.index_select(0, pos_P)
        count_Jc = torch.bincount(col_P, minlength=j)
        tp_P = _repeat(torch.cumsum(count_Jc, dim=0), count_Jc, pos_P.numel()) - _run_starts(_changes(group_P))
        precision_P = tp_P.double() / at_or_above_E.index_select(0, pos_P).double()
        sums.append(torch.segment_reduce(precision_P, "sum", lengths=count_Jc))
        counts.append(count_Jc)
    return _finish(torch.stack(sums), torch.stack(counts), n_positives_C, n)


@jaxtyped(typechecker=beartype.beartype)
def _entries_above(
    block_NJ: Float[Tensor, "N J"], low: float, ignored_I: Int64[Tensor, " I"] | None
) -> tuple[Int64[Tensor, " E"], Int64[Tensor, " E"], Int[Tensor, " E"]]:
    """Row, column and order key (`_order_key`) of every entry of the block above `low`, rows in `ignored_I` left out.

    `low` is the minimum of all scores. Entries equal to it are each column's bottom tie group where they occur, so
    they need no ranking; a column whose own minimum is higher simply has all its entries ranked. Exact either way,
    and one scalar minimum is much cheaper than a per-column one over a row-major block.
    """
    # One row-major copy of the block: the passes below are several times faster on it than on a strided view.
    block_NJ = block_NJ.contiguous()
    above_NJ = block_NJ > low
    if ignored_I is not None:
        above_NJ.index_fill_(0, ignored_I, False)
    j = block_NJ.shape[1]
    if above_NJ.device.type == "cpu":
        # numpy's flatnonzero finds the same ascending indices about 4x faster than torch's nonzero on CPU (0.5 vs
        # 2.2 ms for a block of 16 x 100,000 at one thread, torch 2.15), where nonzero was a quarter of a block's time.
        flat_E = torch.from_numpy(np.flatnonzero(above_NJ.numpy()))
    else:
        flat_E = above_NJ.view(-1).nonzero().squeeze(1)  # faster than a 2-D nonzero
    del above_NJ
    shift = j.bit_length() - 1
    if j == 1 << shift:  # the default chunk is a power of two: shifts instead of (slow) int64 division
        row_E, col_E = flat_E >> shift, flat_E & (j - 1)
    else:
        row_E = torch.div(flat_E, j, rounding_mode="floor")
        col_E = flat_E - row_E * j
    return row_E, col_E, _order_key(block_NJ.view(-1).index_select(0, flat_E), low)


@jaxtyped(typechecker=beartype.beartype)
def _order_key(score_E: Float[Tensor, " E"], low: float) -> Int[Tensor, " E"]:
    """Integers in [0, 2^32) ordered as the scores (all above `low`) are, equal exactly where they are (-0.0 == +0.0).

    int32 when every score is positive (ReLU-like latents: their bits already order them), else int64.
    """
    if score_E.dtype != torch.float64:
        score_E = score_E.float()  # float16/bfloat16 -> float32 is exact
        if low >= 0:
            return score_E.view(torch.int32)  # positive floats order as their bits; -0.0 is not above low
        bits_E = (score_E + 0.0).view(torch.int32)  # + 0.0 maps -0.0 to +0.0
        # Negative floats order backwards in their bits: flip all but the sign bit, then offset to unsigned.
        bits_E = bits_E ^ ((bits_E >> 31) & 0x7FFFFFFF)
        return bits_E.to(torch.int64) + 2**31
    # float64 does not fit 32 bits: use its dense rank among the block's entries instead (one comparison sort).
    sorted_E, order_E = torch.sort(score_E)
    rank_E = torch.cumsum(_changes(sorted_E), dim=0) - 1
    return torch.empty_like(rank_E).index_copy_(0, order_E, rank_E)


@jaxtyped(typechecker=beartype.beartype)
def _finish(
    ranked_sum_CJ: Float64[Tensor, "C J"],
    ranked_count_CJ: Int64[Tensor, "C J"],
    n_positives_C: Int64[Tensor, " C"],
    n_rows: int,
) -> Float64[Tensor, "C J"]:
    """Add the positives in each column's bottom tie group (precision P_c / N each) and divide by P_c."""
    p_C1 = n_positives_C[:, None]
    bottom_CJ = p_C1 - ranked_count_CJ
    sum_CJ = ranked_sum_CJ + (bottom_CJ * p_C1).double() / n_rows
    return torch.where(p_C1 > 0, sum_CJ / p_C1.double(), torch.nan)


@jaxtyped(typechecker=beartype.beartype)
def _sorted(key_E: Int[Tensor, " E"]) -> Int[Tensor, " E"]:
    """The keys in ascending order. Only the values are kept, and equal keys are identical, so any sort gives the same
    result: on CPU numpy's (vectorised quicksort), 2.5-2.7x faster than torch's radix sort on a block's 160,000 keys at
    one thread (int64 0.53 vs 1.37 ms, int32 0.29 vs 0.79 ms; numpy 2.4, torch 2.15)."""
    if key_E.device.type == "cpu":
        return torch.from_numpy(np.sort(key_E.numpy()))
    return torch.sort(key_E).values


@jaxtyped(typechecker=beartype.beartype)
def _changes(x_E: Tensor) -> Bool[Tensor, " E"]:
    """True where a run of equal values starts (always at 0)."""
    new_E = torch.ones(x_E.shape, dtype=torch.bool, device=x_E.device)
    new_E[1:] = x_E[1:] != x_E[:-1]
    return new_E


@jaxtyped(typechecker=beartype.beartype)
def _run_starts(new_E: Bool[Tensor, " E"]) -> Int64[Tensor, " E"]:
    """For each position, the index where its run starts (runs begin where `new_E` is True)."""
    idx_E = torch.arange(new_E.numel(), device=new_E.device)
    return torch.cummax(torch.where(new_E, idx_E, 0), dim=0).values


@jaxtyped(typechecker=beartype.beartype)
def _repeat(value_S: Int64[Tensor, " S"], count_S: Int64[Tensor, " S"], n_e: int) -> Int64[Tensor, " E"]:
    """Each segment's value once per entry of the (contiguous, in order) segment."""
    return torch.repeat_interleave(value_S, count_S, output_size=n_e)
