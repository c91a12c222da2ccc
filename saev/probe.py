"""Every (latent, class) 1-D logistic probe, fit exactly and fast by exploiting sparse latents.

For every prototype column k and class c, `fit_probes` minimises the published objective (research protocol)

    f(w, b) = mean_n BCE(y_nc, sigmoid(b + w z_nk)) + 0.5 * ridge * (w^2 + (b - b0_c)^2),
    b0_c = logit(prevalence of c, clipped to [prevalence_clip, 1 - prevalence_clip]),

starting from w = 0, b = b0_c. With ridge > 0 f is strictly convex, so the minimiser is unique and any start
reaches the same one; the start matters only for how many iterations it takes.

Method: Newton's method on the 2x2 problem of each pair, all classes of a column at once, damped by a step length
that needs no evaluation of the loss. Along the Newton direction d, each row's logit changes by
delta_n = d_b + d_w z_n, and the logistic loss satisfies |l'''| <= l'', so with M = max_n |delta_n| (reached at the
column's minimum or maximum) the curvature along d grows at most like exp(M * alpha). Integrating twice bounds the
objective, and the step alpha = 1 where M <= 1, else log(1 + M) / M, decreases it by at least
lambda^2 * (M - log(1 + M)) / M^2 > 0, lambda^2 = g^T H^{-1} g the Newton decrement (the damped Newton step of
generalised self-concordant functions, Bach 2010). That step is short where a few extreme entries make M large (a
heavy-tailed column, a nearly separated class) though the objective would allow a much longer one, and Newton then
crawls (hundreds of steps); so where M > 4 the step is the longest of 1, 1/4, 1/16, ... (at most 8, each longer than
the bound's) that decreases the objective by Armijo's 1e-4 * alpha * lambda^2, each tried with one loss pass, else
the bound's step. Far from the optimum the steps are damped; near it M -> 0 and the full steps converge
quadratically. A pair is **converged** when lambda^2 / 2 <= `tol` (for a quadratic model, the objective is then
within `tol` of its minimum; in practice far closer, as one more step would square it), checked with the gradient
and Hessian of its current (w, b): its reported (w, b) are the ones checked.

Sparsity: the rows of a column equal to its minimum (the zeros of a ReLU latent) share one logit per class, so
they enter the loss, gradient and Hessian through one count (how many there are) and per class the sum of the
labels among them; only the E entries above the minimum are visited, for every active class: an iteration costs
O(E) per class, about 1.7 ns per (class, entry) on one CPU thread in float64 (sigmoid, three sums, three
matrix-vector products), and the loss, evaluated once at the end, about 3 ns (log-add-exp). Pairs leave the
iteration as they converge.

Degenerate pairs: when a class's positives and negatives are weakly separated by the column (every positive <= every negative, or >=; this includes a constant or all-zero
column, a class with no positives and a class of every row), the unpenalised problem has no minimiser and only the
ridge bounds w. These pairs are fit all the same (they end finite, never NaN; |w| may be large and convergence slow)
and flagged in `degenerate_CK`; `converged_CK` says independently whether they reached `tol`.

Labels are as in `saev.ap.average_precision`: int class ids [N] with -1 for rows to ignore (left out of every
mean), or multi-hot [N, C] (bool or uint8), each column its own binary problem over all rows.

CPU and CUDA tensors run the same code. Columns are taken in chunks whose copy fits `chunk_mib`; on CPU the columns
of a chunk are fit side by side on `workers` threads of one torch thread each (as in `saev.ap`). Each column is fit
alone, in an order of operations that depends only on its own values, so results never depend on the chunk size or
the number of workers, bit for bit.

Shape suffixes: N rows, K prototype columns, C classes, E entries of a column above its minimum, S the classes
still iterating, J columns of a chunk.
"""

import math
import typing

import beartype
import numpy as np
import torch
from jaxtyping import Bool, Float, Float64, Int, Int32, UInt8, jaxtyped
from torch import Tensor

from saev.ap import _on_threads

Scores = Float[Tensor, "N K"] | Float[np.ndarray, "N K"]
Labels = (
    Int[Tensor, " N"]
    | Bool[Tensor, "N C"]
    | UInt8[Tensor, "N C"]
    | Int[np.ndarray, " N"]
    | Bool[np.ndarray, "N C"]
    | UInt8[np.ndarray, "N C"]
)

# How many (class, entry) values one pass over a column holds at once: small enough for a core's L2 cache on CPU
# (two float64 arrays of this size), where the pass is several times faster than over arrays in main memory.
_CPU_BLOCK = 2**16
_CUDA_BLOCK = 2**24
# Newton steps whose largest logit change m exceeds this try longer steps than the bound's (module docstring), at
# most _TRIALS. Not from m > 1: a loss pass costs about twice a Newton pass, and slightly damped steps converge about
# as fast (benchmarks/probe.py data, N=100,000, K=96: from m > 4 as fast as without a search, from m > 1 25% slower).
_SEARCH_ABOVE = 4.0
_TRIALS = 8


class Probes(typing.NamedTuple):
    """The fitted probes of every (class, prototype column) pair; all [C, K] on the scores' device."""

    w_CK: Float64[Tensor, "C K"]
    """Weight of the latent."""
    b_CK: Float64[Tensor, "C K"]
    """Intercept."""
    loss_CK: Float64[Tensor, "C K"]
    """Mean binary cross-entropy at (w, b) over the rows fit on, without the ridge term."""
    converged_CK: Bool[Tensor, "C K"]
    """True where the Newton decrement reached `tol` within `max_iter` iterations."""
    degenerate_CK: Bool[Tensor, "C K"]
    """True where the column weakly separates the class (constant column, no positives, no negatives included):
    the unpenalised problem has no minimiser and only the ridge bounds w."""
    iterations_CK: Int32[Tensor, "C K"]
    """Newton steps taken (0: the start was already optimal to `tol`)."""


class _Targets(typing.NamedTuple):
    """The labels in the form every column uses."""

    kept_I: Tensor | None
    """Rows fit on (int labels with ignored rows), else None: all rows."""
    classes_N: Tensor | None
    """int64 class id of every kept row (int labels), else None."""
    multi_NC: Tensor | None
    """bool multi-hot labels of every row (multi-hot labels), else None."""
    n_positives_C: Tensor
    """int64 positives of every class among the kept rows."""
    n_rows: int
    """Kept rows: the denominator of every mean."""


class _Column(typing.NamedTuple):
    """One column's sufficient statistics: its entries above the minimum, and per-class label sums."""

    z_E: Tensor
    """float64 values of the entries above the minimum."""
    zz_E: Tensor
    """Their squares."""
    z1_2E: Tensor
    """The values and ones, [2, E]: the logits of (w, b) are [w, b] @ z1_2E."""
    moments: tuple[float, float, float]
    """Sums over the entries of 1, z and z^2: every pass at w = 0 (the start) from these alone."""
    low: float
    """The column's minimum (over the kept rows)."""
    high: float
    """Its maximum."""
    n_bottom: int
    """Rows at the minimum."""
    zpos_C: Tensor
    """float64 sum of z over each class's positive rows (bottom rows included)."""
    degenerate_C: Tensor
    """bool, see `Probes.degenerate_CK`."""


@torch.no_grad()
@jaxtyped(typechecker=beartype.beartype)
def fit_probes(
    scores_NK: Scores,
    labels: Labels,
    n_classes: int | None = None,
    *,
    ridge: float = 1e-8,
    tol: float = 1e-18,
    max_iter: int = 100,
    prevalence_clip: float = 1e-12,
    chunk_mib: float = 256,
    workers: int | None = None,
) -> Probes:
    """Fit the 1-D logistic probe of every (class, prototype column) pair (module docstring: objective and method).

    Args:
        scores_NK: one score per row and prototype; any float dtype (computed in float64); torch tensor (CPU or
            CUDA) or numpy array. Must be finite.
        labels: int class ids [N] in [0, C) with -1 for rows to ignore, or multi-hot [N, C] bool or uint8.
        n_classes: C; for int labels it defaults to max label + 1; for multi-hot labels it must equal the number
            of label columns if given.
        ridge: the penalty's weight; must be > 0 (it bounds w where the data do not).
        tol: converged when half the squared Newton decrement is at most this (objective units: mean nats). Far
            below the loss's own precision on purpose: along a direction only the ridge holds (a class of nearly
            every row, a column of tiny values; curvature about `ridge`), an objective within d of its minimum can
            leave the cross-entropy off by about |w| * sqrt(2 * d * ridge): at 1e-14 that was 5e-8 relative (|w| ~
            60). The decrement's rounding floor is far lower (about 1e-24); 1e-18 costs about 5% more time.
        max_iter: Newton steps at most per pair; a pair that has not converged by then is flagged, not an error.
        prevalence_clip: the prevalence in b0 = logit(prevalence) is clipped to [clip, 1 - clip].
        chunk_mib: memory for the copy of a chunk of columns; results do not depend on it, bit for bit.
        workers: CPU threads fitting columns side by side (default: torch's thread count); results do not depend
            on it, bit for bit. On CUDA columns go one at a time.

    Raises:
        ValueError: NaN or +-inf scores, bad labels or shapes, ridge <= 0, or no rows left to fit on.
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (it bounds w where the data do not); got {ridge}.")
    if not 0 < prevalence_clip < 0.5:
        raise ValueError(f"prevalence_clip must be in (0, 0.5); got {prevalence_clip}.")
    scores_NK, targets = _prepare(scores_NK, labels, n_classes)
    n = targets.n_rows
    prevalence_C = (targets.n_positives_C.double() / n).clamp(prevalence_clip, 1 - prevalence_clip)
    b0_C = torch.log(prevalence_C) - torch.log1p(-prevalence_C)

    def fit(z_N: Tensor) -> tuple[Tensor, ...]:
        col = _column(z_N, targets)
        w_C, b_C, converged_C, iterations_C = _newton(col, targets, b0_C, ridge, tol, max_iter)
        loss_C = _loss(col, targets, w_C, b_C)
        return w_C, b_C, loss_C, converged_C, col.degenerate_C, iterations_C

    out = _over_columns(scores_NK, targets, fit, chunk_mib, workers)
    return Probes(*out[:5], out[5].to(torch.int32))


@torch.no_grad()
@jaxtyped(typechecker=beartype.beartype)
def probe_loss(
    scores_NK: Scores,
    labels: Labels,
    w_CK: Float[Tensor, "C K"],
    b_CK: Float[Tensor, "C K"],
    n_classes: int | None = None,
    *,
    only_CK: Bool[Tensor, "C K"] | None = None,
    chunk_mib: float = 256,
    workers: int | None = None,
) -> Float64[Tensor, "C K"]:
    """Mean binary cross-entropy of the given probes (e.g. fit on another split) on these rows and labels: the
    same sparse evaluation as `fit_probes`'s `loss_CK`. [C, K] float64 on the scores' device; arguments as there.

    `only_CK`: evaluate only these pairs (e.g. each class with its selected latent, for Probe R), NaN elsewhere;
    a pair costs its column's entries whether or not others of the column are evaluated."""
    scores_NK, targets = _prepare(scores_NK, labels, n_classes)
    n_c, k = targets.n_positives_C.numel(), scores_NK.shape[1]
    if w_CK.shape != (n_c, k) or b_CK.shape != (n_c, k):
        raise ValueError(f"w and b must be [C={n_c}, K={k}]; got {tuple(w_CK.shape)} and {tuple(b_CK.shape)}.")
    w_KC = w_CK.to(scores_NK.device, torch.float64).T.contiguous()
    b_KC = b_CK.to(scores_NK.device, torch.float64).T.contiguous()
    if not (torch.isfinite(w_KC).all() and torch.isfinite(b_KC).all()):
        raise ValueError("w and b must be finite.")

    only_KC = None if only_CK is None else only_CK.to(scores_NK.device).T.contiguous()
    if only_KC is not None and only_KC.shape != (k, n_c):
        raise ValueError(f"only_CK must be [C={n_c}, K={k}]; got {tuple(only_CK.shape)}.")

    def loss(z_N: Tensor, j: int) -> tuple[Tensor, ...]:
        if only_KC is None:
            return (_loss(_column(z_N, targets), targets, w_KC[j], b_KC[j]),)
        out_C = torch.full((n_c,), torch.nan, dtype=torch.float64, device=z_N.device)
        classes_S = only_KC[j].nonzero().squeeze(1)
        if classes_S.numel():
            w_S, b_S = w_KC[j, classes_S], b_KC[j, classes_S]
            out_C[classes_S] = _loss(_column(z_N, targets), targets, w_S, b_S, classes_S)
        return (out_C,)

    return _over_columns(scores_NK, targets, loss, chunk_mib, workers, with_index=True)[0]


def _prepare(scores_NK: Scores, labels: Labels, n_classes: int | None) -> tuple[Tensor, _Targets]:
    """Scores as a tensor (checked finite) and the labels as `_Targets`."""
    scores_NK = torch.from_numpy(scores_NK) if isinstance(scores_NK, np.ndarray) else scores_NK
    labels = torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels
    n = scores_NK.shape[0]
    device = scores_NK.device
    labels = labels.to(device)
    if labels.shape[0] != n:
        raise ValueError(f"scores have {n} rows but labels have {labels.shape[0]}.")
    # NaN propagates through min and max, so one pass checks every score; columns are named only on failure.
    if scores_NK.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(scores_NK)):
        cols = (~torch.isfinite(scores_NK).all(dim=0)).nonzero().squeeze(1).tolist()
        raise ValueError(f"scores contain NaN or +-inf in {len(cols)} prototype column(s); first: {cols[:10]}.")
    if labels.ndim == 2:
        if labels.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"multi-hot labels must be bool or uint8; got {labels.dtype}.")
        if labels.dtype == torch.uint8 and labels.numel() and int(labels.max()) > 1:
            raise ValueError("uint8 multi-hot labels must be 0 or 1.")
        if n_classes is not None and n_classes != labels.shape[1]:
            raise ValueError(f"n_classes={n_classes} but multi-hot labels have {labels.shape[1]} columns.")
        multi_NC = labels.bool()
        targets = _Targets(None, None, multi_NC, multi_NC.sum(dim=0), n)
    else:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class-id labels must be integers; got {labels.dtype}.")
        labels_N = labels.to(torch.int64)
        if n and int(labels_N.min()) < -1:
            raise ValueError(f"int labels must be class ids >= 0 or -1 (ignore); got {int(labels_N.min())}.")
        max_label = int(labels_N.max()) if n else -1
        n_classes = max_label + 1 if n_classes is None else n_classes
        if max_label >= n_classes:
            raise ValueError(f"label {max_label} is out of range for n_classes={n_classes}.")
        kept_I = (labels_N >= 0).nonzero().squeeze(1)
        if kept_I.numel() == n:
            kept_I = None
        else:
            labels_N = labels_N.index_select(0, kept_I)
        counts_C = torch.bincount(labels_N, minlength=n_classes)
        targets = _Targets(kept_I, labels_N, None, counts_C, labels_N.numel())
    if targets.n_rows == 0:
        raise ValueError("no rows to fit on: every row is ignored (label -1), or there are none.")
    return scores_NK, targets


def _over_columns(
    scores_NK: Tensor,
    targets: _Targets,
    fn: typing.Callable[..., tuple[Tensor, ...]],
    chunk_mib: float,
    workers: int | None,
    with_index: bool = False,
) -> list[Tensor]:
    """`fn(z_N)` (or `fn(z_N, k)`) of every column's kept rows, each output [C] stacked into [C, K]."""
    n, k = targets.n_rows, scores_NK.shape[1]
    device = scores_NK.device
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}.")
    if not chunk_mib > 0:
        raise ValueError(f"chunk_mib must be > 0; got {chunk_mib}.")
    workers = (workers or torch.get_num_threads()) if device.type == "cpu" else 1
    chunk = max(1, int(chunk_mib * 2**20) // (n * scores_NK.element_size()))
    outs: list[list[Tensor]] = []
    for start in range(0, k, chunk):
        block_NJ = scores_NK[:, start : start + chunk]
        if targets.kept_I is not None:
            block_NJ = block_NJ.index_select(0, targets.kept_I)
        block_JN = block_NJ.T.contiguous()  # one column's rows contiguous: the passes below read them many times
        del block_NJ

        def one(j: int, block_JN: Tensor = block_JN, start: int = start) -> tuple[Tensor, ...]:
            return fn(block_JN[j], start + j) if with_index else fn(block_JN[j])

        cols = range(block_JN.shape[0])
        results = map(one, cols) if workers == 1 or len(cols) == 1 else _on_threads(one, cols, workers)
        outs.extend(list(r) for r in results)
    n_c = targets.n_positives_C.numel()
    if not outs:
        return [torch.zeros((n_c, 0), dtype=torch.float64, device=device)] * 6
    return [torch.stack([o[i] for o in outs], dim=1) for i in range(len(outs[0]))]


def _column(z_N: Tensor, targets: _Targets) -> _Column:
    """A column's entries above its minimum and its per-class statistics."""
    low, high = (float(x) for x in torch.aminmax(z_N))
    above_N = z_N > low
    if above_N.device.type == "cpu":
        idx_E = torch.from_numpy(np.flatnonzero(above_N.numpy()))  # about 4x faster than torch's nonzero (saev.ap)
    else:
        idx_E = above_N.nonzero().squeeze(1)
    z_E = z_N.index_select(0, idx_E).double()
    n, e = targets.n_rows, idx_E.numel()
    n_bottom = n - e
    p_C = targets.n_positives_C
    inf = torch.tensor(math.inf, dtype=torch.float64, device=z_E.device)
    if targets.classes_N is not None:
        n_c = p_C.numel()
        class_E = targets.classes_N.index_select(0, idx_E)
        above_C = torch.bincount(class_E, minlength=n_c)
        zsum_C = torch.zeros(n_c, dtype=torch.float64, device=z_E.device).index_add_(0, class_E, z_E)
        # Per class, the extreme entries of its own rows; a class's negatives are every other class's rows.
        max_C = torch.full((n_c,), -math.inf, dtype=torch.float64, device=z_E.device)
        max_C = max_C.scatter_reduce(0, class_E, z_E, "amax")
        min_C = torch.full_like(max_C, math.inf).scatter_reduce(0, class_E, z_E, "amin")
        neg_max_C, neg_min_C = _others(max_C, torch.max), _others(min_C, torch.min)
        pos_max_C, pos_min_C = max_C, min_C
    else:
        y_EC = targets.multi_NC.index_select(0, idx_E)
        above_C = y_EC.sum(dim=0)
        zsum_C = z_E @ y_EC.double() if e else torch.zeros(p_C.numel(), dtype=torch.float64, device=z_E.device)
        z_E1 = z_E[:, None]
        pos_max_C = torch.where(y_EC, z_E1, -inf).amax(dim=0) if e else -inf.expand(p_C.numel())
        pos_min_C = torch.where(y_EC, z_E1, inf).amin(dim=0) if e else inf.expand(p_C.numel())
        neg_max_C = torch.where(y_EC, -inf, z_E1).amax(dim=0) if e else -inf.expand(p_C.numel())
        neg_min_C = torch.where(y_EC, inf, z_E1).amin(dim=0) if e else inf.expand(p_C.numel())
    # Rows at the minimum: their positives and negatives put the minimum among each side's values.
    bottom_pos_C = p_C - above_C
    bottom_neg_C = n_bottom - bottom_pos_C
    low_t = torch.tensor(low, dtype=torch.float64, device=z_E.device)
    pos_min_C = torch.where(bottom_pos_C > 0, low_t, pos_min_C)
    pos_max_C = torch.where((above_C == 0) & (bottom_pos_C > 0), low_t, pos_max_C)
    neg_min_C = torch.where(bottom_neg_C > 0, low_t, neg_min_C)
    neg_max_C = torch.where((neg_max_C == -math.inf) & (bottom_neg_C > 0), low_t, neg_max_C)
    # Weakly separated (including no positives: pos_max = -inf, or no negatives: neg_min = +inf).
    degenerate_C = (pos_max_C <= neg_min_C) | (neg_max_C <= pos_min_C)
    zpos_C = zsum_C + low * bottom_pos_C.double()
    zz_E = z_E * z_E
    z1_2E = torch.stack([z_E, torch.ones_like(z_E)])
    moments = (float(e), float(z_E.sum()), float(zz_E.sum()))
    return _Column(z_E, zz_E, z1_2E, moments, low, high, n_bottom, zpos_C, degenerate_C)


def _others(x_C: Tensor, pick: typing.Callable) -> Tensor:
    """For each class, `pick` (torch.max or torch.min) of x over all other classes (the identity where there are none)."""
    n_c = x_C.numel()
    if n_c < 2:
        return torch.full_like(x_C, -math.inf if pick is torch.max else math.inf)
    values, order = torch.topk(x_C, 2, largest=pick is torch.max)
    return torch.where(torch.arange(n_c, device=x_C.device) == order[0], values[1], values[0])


def _newton(
    col: _Column, targets: _Targets, b0_C: Tensor, ridge: float, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Damped Newton on every class of one column (module docstring); (w, b, converged, steps) per class."""
    n_c, device = b0_C.numel(), b0_C.device
    n = targets.n_rows
    p_C = targets.n_positives_C.double()
    w_C = torch.zeros(n_c, dtype=torch.float64, device=device)
    b_C = b0_C.clone()
    converged_C = torch.zeros(n_c, dtype=torch.bool, device=device)
    steps_C = torch.zeros(n_c, dtype=torch.int64, device=device)
    active_S = torch.arange(n_c, device=device)
    for it in range(max_iter + 1):
        if active_S.numel() == 0:
            break
        w_S, b_S = w_C[active_S], b_C[active_S]
        if it == 0:  # w = 0: every entry has the same p, so the sums follow from the column's moments
            p_S = torch.sigmoid(b_S)
            q_S = p_S * torch.sigmoid(-b_S)
            s0, s1, h0, h1, h2 = (x * m for x in (p_S, q_S) for m in col.moments[: 2 if x is p_S else 3])
        else:
            s0, s1, h0, h1, h2 = _entry_sums(col, w_S, b_S)
        t_low = b_S + w_S * col.low
        p_low = torch.sigmoid(t_low)
        q_low = p_low * torch.sigmoid(-t_low)
        nb = float(col.n_bottom)
        g_w = (s1 + nb * col.low * p_low - col.zpos_C[active_S]) / n + ridge * w_S
        g_b = (s0 + nb * p_low - p_C[active_S]) / n + ridge * (b_S - b0_C[active_S])
        # The data's Hessian is positive semi-definite: its determinant, clamped at 0 against rounding, plus the
        # ridge's share keeps H's determinant positive.
        h_ww = (h2 + nb * col.low**2 * q_low) / n
        h_wb = (h1 + nb * col.low * q_low) / n
        h_bb = (h0 + nb * q_low) / n
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min_(0) + ridge * (h_ww + h_bb) + ridge * ridge
        h_ww, h_bb = h_ww + ridge, h_bb + ridge
        d_w = (h_wb * g_b - h_bb * g_w) / det
        d_b = (h_wb * g_w - h_ww * g_b) / det
        decrement = -(g_w * d_w + g_b * d_b)
        done_S = decrement <= 2 * tol
        converged_C[active_S[done_S]] = True
        if it == max_iter:
            break
        go_S = ~done_S
        active_S, d_w, d_b = active_S[go_S], d_w[go_S], d_b[go_S]
        # The largest change of any row's logit along d: at the column's minimum or maximum.
        m = torch.maximum((d_b + d_w * col.low).abs(), (d_b + d_w * col.high).abs())
        alpha = torch.where(m <= 1, 1.0, torch.log1p(m) / m)
        # The bound's step is short where a few extreme entries make m large (a heavy tail, near separation), though
        # the objective may take a much longer one: try longer steps there (`_line_search`).
        long_S = (m > _SEARCH_ABOVE).nonzero().squeeze(1)
        if long_S.numel():
            lam2_S = decrement[go_S][long_S]
            step = (d_w[long_S], d_b[long_S], lam2_S, alpha[long_S])
            alpha[long_S] = _line_search(col, targets, active_S[long_S], w_C, b_C, b0_C, ridge, step)
        w_C[active_S] += alpha * d_w
        b_C[active_S] += alpha * d_b
        steps_C[active_S] += 1
    return w_C, b_C, converged_C, steps_C


def _line_search(
    col: _Column,
    targets: _Targets,
    classes_S: Tensor,
    w_C: Tensor,
    b_C: Tensor,
    b0_C: Tensor,
    ridge: float,
    step: tuple[Tensor, Tensor, Tensor, Tensor],
) -> Tensor:
    """Step lengths along the Newton directions `step` = (d_w, d_b, lambda^2, the bound's step) of these classes: the
    longest of 1, 1/4, 1/16, ... (`_TRIALS` at most, each longer than the bound's step) whose objective decreases by
    Armijo's 1e-4 * alpha * lambda^2, else the bound's step, which always decreases it. Each trial is one loss pass."""
    d_w, d_b, lam2_S, safe_S = step
    w_S, b_S, center_S = w_C[classes_S], b_C[classes_S], b0_C[classes_S]

    def objective(i: Tensor, alpha: float) -> Tensor:
        w, b = w_S[i] + alpha * d_w[i], b_S[i] + alpha * d_b[i]
        return _loss(col, targets, w, b, classes_S[i]) + 0.5 * ridge * (w * w + (b - center_S[i]) ** 2)

    pending = torch.arange(classes_S.numel(), device=w_S.device)
    f0_S = objective(pending, 0.0)
    alpha_S = safe_S.clone()
    alpha = 1.0
    for _ in range(_TRIALS):
        pending = pending[safe_S[pending] < alpha]
        if pending.numel() == 0:
            break
        ok = objective(pending, alpha) <= f0_S[pending] - 1e-4 * alpha * lam2_S[pending]
        alpha_S[pending[ok]] = alpha
        pending = pending[~ok]
        alpha /= 4
    return alpha_S


def _blocks(col: _Column, n_s: int) -> typing.Iterator[slice]:
    """Slices of the classes whose pass over the column's entries fits one block of (class, entry) values."""
    size = _CPU_BLOCK if col.z_E.device.type == "cpu" else _CUDA_BLOCK
    rows = max(1, size // max(1, col.z_E.numel()))
    return (slice(s, s + rows) for s in range(0, n_s, rows))


def _entry_sums(col: _Column, w_S: Tensor, b_S: Tensor) -> tuple[Tensor, ...]:
    """Over the column's entries, per class: sum p, sum p z, sum q, sum q z, sum q z^2; p = sigmoid(b + w z),
    q = p (1 - p)."""
    outs: list[list[Tensor]] = [[] for _ in range(5)]
    z_E, zz_E = col.z_E, col.zz_E
    wb_S2 = torch.stack([w_S, b_S], dim=1)
    for sl in _blocks(col, w_S.numel()):
        # The logits as a product with [z; 1]: a matrix product writes them about 3x faster than a broadcast.
        p_SE = torch.mm(wb_S2[sl], col.z1_2E).sigmoid_()
        q_SE = torch.addcmul(p_SE, p_SE, p_SE, value=-1.0)
        for out, x in zip(outs, (p_SE.sum(1), p_SE.mv(z_E), q_SE.sum(1), q_SE.mv(z_E), q_SE.mv(zz_E)), strict=True):
            out.append(x)
    empty = w_S.new_zeros(w_S.shape)
    return tuple(torch.cat(o) if o else empty for o in outs)


def _loss(col: _Column, targets: _Targets, w_C: Tensor, b_C: Tensor, classes_C: Tensor | None = None) -> Tensor:
    """Mean BCE of (w, b) per class on one column: sum_n softplus(t_n) - sum over positives of t_n, over n.
    `classes_C`: the classes that w and b are of (default: all)."""
    parts = []
    wb_C2 = torch.stack([w_C, b_C], dim=1)
    for sl in _blocks(col, w_C.numel()):
        # softplus(t) = max(t, 0) - log(sigmoid(|t|)), sigmoid(|t|) in [1/2, 1]: never 0, and each term is within
        # a few ulps of 1 in absolute error; about twice as fast as torch.logaddexp(t, 0) on CPU.
        t_SE = torch.mm(wb_C2[sl], col.z1_2E)
        relu_S = t_SE.clamp_min(0).sum(1)
        parts.append(relu_S - t_SE.abs_().sigmoid_().log_().sum(1))
    entries_C = torch.cat(parts) if parts else torch.zeros_like(w_C)
    t_low = b_C + w_C * col.low
    zero = torch.zeros((), dtype=torch.float64, device=w_C.device)
    softplus_C = entries_C + col.n_bottom * torch.logaddexp(t_low, zero)
    p_C, zpos_C = targets.n_positives_C.double(), col.zpos_C
    if classes_C is not None:
        p_C, zpos_C = p_C[classes_C], zpos_C[classes_C]
    linear_C = p_C * b_C + w_C * zpos_C
    # A cross-entropy is never negative; the difference of two large sums (a nearly separable pair) can round below 0.
    return ((softplus_C - linear_C) / targets.n_rows).clamp_min_(0)
