"""The protocol's per-method figures on the report split, from each class's selected latent and its probe.

Inputs, all for the report split: `scores_NC` (column c: the activations of class c's selected latent on every
patch), the train-fit probe `w_C`, `b_C` of each class with its latent, int labels [N] (-1: ignored) and
`image_N` (which image each patch comes from, for the bootstrap and the permutation null). Definitions:
shared/notes/research-protocol.md.
- Probe R = 1 - mean_c CE_c / mean_c H(pi_c): a ratio of means; CE_c the mean BCE of (w_c, b_c) on the split
  (`saev.probe.probe_loss`), H the binary entropy of the split's own prevalence clipped to [1e-12, 1 - 1e-12].
- mAP: the exact, tie-aware AP (`saev.ap`) of w_c z + b_c, mean over ALL classes, a class with no positives
  counting 0. AP depends only on the ranking, which is that of sign(w_c) * z (w_c = 0: every patch tied), used
  as the score so that rounding in w z + b cannot merge distinct activations.
- Purity@k: among the k patches of highest activation of class c's latent (zero activations and ignored patches
  skipped; equal activations in row order), the count of the most frequent label (any class, 0 included),
  divided by k; mean over classes. A latent with fewer than k non-zero patches counts the ones it has, over k.
- Coverage@tau: share of all classes whose AP is strictly above tau.
"""

import typing

import beartype
import numpy as np
import torch
from jaxtyping import Float, Float64, Int, jaxtyped
from torch import Tensor

from saev.ap import average_precision
from saev.probe import probe_loss

_CLIP = 1e-12


class Interval(typing.NamedTuple):
    """A point estimate and its bootstrap percentile interval."""

    value: float
    """On the whole split."""
    low: float
    """2.5th percentile over the bootstrap resamples."""
    high: float
    """97.5th percentile."""


@jaxtyped(typechecker=beartype.beartype)
def probe_r(
    scores_NC: Float[Tensor, "N C"], w_C: Float[Tensor, " C"], b_C: Float[Tensor, " C"], labels_N: Int[Tensor, " N"]
) -> float:
    """1 - mean_c CE_c / mean_c H(pi_c) (module docstring)."""
    n_c = w_C.numel()
    only_CC = torch.eye(n_c, dtype=torch.bool, device=scores_NC.device)
    w_CC, b_CC = torch.diag(w_C.double()), torch.diag(b_C.double())
    ce_C = probe_loss(scores_NC, labels_N, w_CC, b_CC, n_c, only_CK=only_CC).diagonal()
    kept_N = labels_N[labels_N >= 0]
    pi_C = (torch.bincount(kept_N, minlength=n_c).double() / kept_N.numel()).clamp(_CLIP, 1 - _CLIP)
    h_C = -(pi_C * torch.log(pi_C) + (1 - pi_C) * torch.log1p(-pi_C))
    return float(1 - ce_C.mean() / h_C.mean())


@jaxtyped(typechecker=beartype.beartype)
def ap_per_class(scores_NC: Float[Tensor, "N C"], w_C: Float[Tensor, " C"], labels_N: Int[Tensor, " N"]) -> Tensor:
    """AP [C] of each class's probe score; 0 for a class with no positives."""
    n_c = w_C.numel()
    ranked_NC = scores_NC * torch.sign(w_C).to(scores_NC.dtype)[None, :] + 0.0  # + 0.0: -0.0 -> 0.0
    ap_C = average_precision(ranked_NC, labels_N, n_c).diagonal()
    return torch.nan_to_num(ap_C, nan=0.0)


@jaxtyped(typechecker=beartype.beartype)
def purity(scores_NC: Float[Tensor, "N C"], labels_N: Int[Tensor, " N"], k: int = 16) -> float:
    """Purity@k (module docstring)."""
    kept_N = labels_N >= 0
    scores_NC, labels_N = scores_NC[kept_N], labels_N[kept_N]
    n_c = scores_NC.shape[1]
    values_NC, order_NC = torch.sort(scores_NC, dim=0, descending=True, stable=True)
    total = 0.0
    for c in range(n_c):
        top = order_NC[:k, c][values_NC[:k, c] != 0]
        if top.numel():
            total += int(torch.bincount(labels_N[top]).max()) / k
    return total / n_c


@beartype.beartype
def table(
    scores_NC: Tensor,
    w_C: Tensor,
    b_C: Tensor,
    labels_N: Tensor,
    image_N: Tensor,
    *,
    k: int = 16,
    tau: float = 0.3,
    n_boot: int = 200,
    n_perm: int = 100,
    seed: int = 0,
) -> dict[str, object]:
    """Probe R, mAP, Purity@k and Coverage@tau, with bootstrap intervals over images for Probe R, mAP and Coverage
    (`n_boot` resamples of the images, with replacement, seeded) and a permutation null for mAP (`n_perm` times the
    images' label blocks permuted among images of the same patch count, seeded): its mean and the p-value
    (1 + #null >= observed) / (1 + n_perm)."""
    point = _three(scores_NC, w_C, b_C, labels_N, tau)
    gen = torch.Generator().manual_seed(seed)
    images, rows_I = _rows_of_images(image_N)
    draws = []
    for _ in range(n_boot):
        pick = torch.randint(len(images), (len(images),), generator=gen)
        idx = torch.cat([rows_I[i] for i in pick.tolist()]).to(scores_NC.device)
        draws.append(_three(scores_NC[idx], w_C, b_C, labels_N[idx], tau))
    out: dict[str, object] = {"purity": purity(scores_NC, labels_N, k)}
    for i, name in enumerate(("probe_r", "map", "coverage")):
        values = np.array([d[i] for d in draws]) if draws else np.array([point[i]])
        out[name] = Interval(point[i], float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
    null = []
    for _ in range(n_perm):
        perm_N = _permuted_labels(labels_N, rows_I, gen)
        null.append(float(ap_per_class(scores_NC, w_C, perm_N).mean()))
    out["map_null_mean"] = float(np.mean(null)) if null else float("nan")
    out["map_p"] = (1 + sum(x >= point[1] for x in null)) / (1 + n_perm)
    return out


def _three(scores_NC: Tensor, w_C: Tensor, b_C: Tensor, labels_N: Tensor, tau: float) -> tuple[float, float, float]:
    """(Probe R, mAP, Coverage@tau) of these rows."""
    ap_C = ap_per_class(scores_NC, w_C, labels_N)
    return probe_r(scores_NC, w_C, b_C, labels_N), float(ap_C.mean()), coverage(ap_C, tau)


def _rows_of_images(image_N: Tensor) -> tuple[list[int], list[Tensor]]:
    """Each image's id and its rows, in the order of the ids."""
    image_N = image_N.cpu()
    order = torch.argsort(image_N, stable=True)
    ids, counts = torch.unique_consecutive(image_N[order], return_counts=True)
    return ids.tolist(), list(torch.split(order, counts.tolist()))


def _permuted_labels(labels_N: Tensor, rows_I: list[Tensor], gen: torch.Generator) -> Tensor:
    """Labels with each image's block moved to another image of the same patch count (a random permutation)."""
    out_N = labels_N.clone()
    sizes = torch.tensor([r.numel() for r in rows_I])
    for size in sizes.unique().tolist():
        group = (sizes == size).nonzero().squeeze(1)
        perm = group[torch.randperm(group.numel(), generator=gen)]
        src = torch.cat([rows_I[i] for i in perm.tolist()]).to(labels_N.device)
        dst = torch.cat([rows_I[i] for i in group.tolist()]).to(labels_N.device)
        out_N[dst] = labels_N[src]
    return out_N


@jaxtyped(typechecker=beartype.beartype)
def coverage(ap_C: Float64[Tensor, " C"], tau: float = 0.3) -> float:
    """Share of classes with AP strictly above tau."""
    return float((ap_C > tau).double().mean())
