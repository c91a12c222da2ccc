"""Exact average precision (AP) of every prototype column for every class, fast enough for all of K.

AP here is exactly scikit-learn's `average_precision_score(labels == c, scores[:, k])`, ties included: examples
with equal scores form one threshold, so with P_c positives of class c

    AP_c = (1 / P_c) * sum over positives i of class c of  TP_c(score >= s_i) / #(score >= s_i).

See shared/notes/average-precision.md for why (ReLU latents are mostly exact zeros, one huge tie group).

How it is computed, per block of J columns at once (one implementation for CPU and CUDA):
1. The block's minimum, where a column has it, is that column's bottom tie group: each positive there has
   precision P_c / N, so only entries above it (the nonzeros of a ReLU latent) are ranked. Rows labelled -1 are
   set to the minimum in the block's copy, so they are never ranked either.
2. Sort 1, of one int64 key per entry packing (column, score, class), gives #(score >= s_i) for each entry: the
   entries of its column from where its tie group (a run of equal column and score) starts to the column's end.
3. Sort 2, by (column, class, score), puts each class's entries of a column together in score order, so
   TP_c(score >= s_i) is the segment's end minus where the entry's tie group starts in the segment.
   Neither sort grows with C, and there is no [N, C] one-hot.
Scores enter the keys as 32-bit order-preserving integers: float32 bits (float16/bfloat16 widened exactly), or
for float64 the dense rank among the block's entries. Integer keys let PyTorch radix-sort on CPU. Counts are int64;
ratios and sums are float64. Multi-hot labels share step 1 and sort 1, then take one pass per class.

Shape suffixes: N examples (rows), K prototypes (columns), C classes, J columns of the current block,
E ranked entries of the block (above the block's minimum), S (column, class) segments of the block.
"""

import math

import beartype
import numpy as np
import torch
from jaxtyping import Bool, Float, Float64, Int, Int64, jaxtyped
from torch import Tensor

# Temporary memory one block may use, and what one score of a block costs at worst (every score ranked): the
# block's copy plus about a dozen int64 tensors over the ranked entries. Measured: a dense float32 block of
# N=100,000 peaked ~290 MB above the start of the call; ReLU-like (90% zeros) blocks ~40 MB.
_BLOCK_BYTES = 256 * 2**20
_BYTES_PER_SCORE = 192

Scores = Float[Tensor, "N K"] | Float[np.ndarray, "N K"]
Labels = Int[Tensor, " N"] | Bool[Tensor, "N C"] | Int[np.ndarray, " N"] | Bool[np.ndarray, "N C"]


@torch.no_grad()
@jaxtyped(typechecker=beartype.beartype)
def average_precision(
    scores_NK: Scores, labels: Labels, n_classes: int | None = None, *, chunk: int | None = None
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
        chunk: how many prototype columns are ranked together. Default: as many as fit about 256 MB of temporary
            memory in the worst case (every score distinct). Results do not depend on it, bit for bit.

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
    if chunk is None:
        chunk = max(1, _BLOCK_BYTES // (_BYTES_PER_SCORE * max(n, 1)))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}.")
    # Sort keys pack (column, 32-bit score key, class) and (column, class, rank) into 63 bits.
    chunk = min(chunk, 2 ** (31 - class_bits), max(1, (2**31 - 1) // max(n, 1)))

    ap_CK = torch.full((n_c, k), torch.nan, dtype=torch.float64, device=device)
    bad_cols: list[Tensor] = []
    for start in range(0, k if n else 0, chunk):
        end = min(start + chunk, k)
        # One row-major copy of the block: the passes below are several times faster on it than on a strided view.
        block_NJ = scores_NK[:, start:end]
        block_NJ = block_NJ.contiguous() if ignored_I is None else block_NJ.clone(memory_format=torch.contiguous_format)
        # NaN propagates through min and max, so one scalar pass checks the block; columns are named only on failure.
        low, high = (float(x) for x in torch.aminmax(block_NJ))
        if not (math.isfinite(low) and math.isfinite(high)):
            bad_cols.append((~torch.isfinite(block_NJ).all(dim=0)).nonzero().squeeze(1) + start)
        if bad_cols or n_kept == 0 or n_c == 0:
            continue  # after the first bad column, only check the rest so the error can list them all
        if labels.dtype == torch.bool:
            ap_CK[:, start:end] = _ap_multi_hot(block_NJ, low, labels_CN, n_positives_C)
        else:
            if ignored_I is not None:
                # At the block's minimum, ignored rows are never ranked; that costs far less than gathering the rest.
                block_NJ.index_fill_(0, ignored_I, low)
            ap_CK[:, start:end] = _ap_class_ids(block_NJ, low, labels_N, n_positives_C, n_kept)

    if bad_cols:
        cols = torch.cat(bad_cols).tolist()
        msg = f"scores contain NaN or +-inf in {len(cols)} prototype column(s); first: {cols[:10]}."
        raise ValueError(msg)
    return ap_CK


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
    labels_N: Int64[Tensor, " N"],
    n_positives_C: Int64[Tensor, " C"],
    n_kept: int,
) -> Float64[Tensor, "C J"]:
    """AP of one block for int labels. Rows to ignore must already hold `low` (they are then never ranked)."""
    j, n_c = block_NJ.shape[1], n_positives_C.numel()
    row_E, col_E, key32_E = _entries_above(block_NJ, low)
    n_e = row_E.numel()
    class_bits = max(1, (n_c - 1).bit_length())
    class_mask = (1 << class_bits) - 1

    # Sort 1, by (column, score, class): the class rides along in the low bits, so no gather by sort order is
    # needed, and it does not split a tie group, which is a run of equal (column, score).
    key_E = (((col_E << 32) | key32_E) << class_bits) | labels_N.index_select(0, row_E)
    key_E = torch.sort(key_E, stable=True).values  # stable: PyTorch radix-sorts 1-D integers on CPU only then
    col_score_E = key_E >> class_bits
    group_E = _run_starts(_changes(col_score_E))
    col_E = col_score_E >> 32
    count_J = torch.bincount(col_E, minlength=j)
    at_or_above_E = _repeat(torch.cumsum(count_J, dim=0), count_J, n_e) - group_E

    # Sort 2, by (column, class, score): within a column, n_e - #(score >= s) grows with the score and is one
    # value per tie group, so it orders each (column, class) segment by score and carries #(score >= s) along.
    seg_E = col_E * n_c + (key_E & class_mask)
    count_S = torch.bincount(seg_E, minlength=j * n_c)
    rank_bits = n_e.bit_length()
    key_E = torch.sort((seg_E << rank_bits) | (n_e - at_or_above_E), stable=True).values
    at_or_above_E = n_e - (key_E & ((1 << rank_bits) - 1))
    # TP_c(score >= s_i): the class-c entries of the column from the start of i's tie group to the segment's end.
    tp_E = _repeat(torch.cumsum(count_S, dim=0), count_S, n_e) - _run_starts(_changes(key_E))
    precision_E = tp_E.double() / at_or_above_E.double()
    # segment_reduce sums each segment in order on CPU and CUDA, so equal columns give bit-identical AP.
    sum_S = torch.segment_reduce(precision_E, "sum", lengths=count_S)
    return _finish(sum_S.view(j, n_c).T, count_S.view(j, n_c).T, n_positives_C, n_kept)


@jaxtyped(typechecker=beartype.beartype)
def _ap_multi_hot(
    block_NJ: Float[Tensor, "N J"], low: float, labels_CN: Bool[Tensor, "C N"], n_positives_C: Int64[Tensor, " C"]
) -> Float64[Tensor, "C J"]:
    """AP of one block for multi-hot labels; all rows count."""
    n, j = block_NJ.shape
    row_E, col_E, key32_E = _entries_above(block_NJ, low)
    n_e = row_E.numel()
    key_E, order_E = torch.sort((col_E << 32) | key32_E, stable=True)
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
    block_NJ: Float[Tensor, "N J"], low: float
) -> tuple[Int64[Tensor, " E"], Int64[Tensor, " E"], Int64[Tensor, " E"]]:
    """Row, column and order-preserving 32-bit key of the score, for every entry of the block above `low`.

    `low` is the block's minimum. Entries equal to it are each column's bottom tie group where they occur, so they
    need no ranking; a column whose own minimum is higher simply has all its entries ranked. Exact either way, and
    one scalar minimum per block is much cheaper than a per-column one over a row-major block.
    """
    j = block_NJ.shape[1]
    flat_E = (block_NJ > low).view(-1).nonzero().squeeze(1)
    row_E = flat_E // j
    score_E = block_NJ.view(-1).index_select(0, flat_E)
    return row_E, flat_E - row_E * j, _order_key(score_E)


@jaxtyped(typechecker=beartype.beartype)
def _order_key(score_E: Float[Tensor, " E"]) -> Int64[Tensor, " E"]:
    """Integers in [0, 2^32) ordered as the scores are, equal exactly where the scores are (-0.0 == +0.0)."""
    if score_E.dtype != torch.float64:
        bits_E = (score_E.float() + 0.0).view(torch.int32)  # float16/bfloat16 -> float32 is exact; + 0.0 maps -0.0
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
