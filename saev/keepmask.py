"""Seeded, exact-size keep-masks over labelled patches.

The mask is a function of (which patches are labelled, n_keep, seed) only: never of loader order, batch size or
the number of jobs, so every stage that reads it sees the same patches.
"""

import beartype
import numpy as np
import torch
from jaxtyping import Bool, Int64, jaxtyped


class KeepMaskError(ValueError):
    """The requested keep-mask cannot be drawn (e.g. more patches than are labelled)."""


@jaxtyped(typechecker=beartype.beartype)
def make_keep_indices(
    labelled_N: Bool[np.ndarray, " N"], n_keep: int | None, seed: int
) -> Int64[np.ndarray, " n_keep"]:
    """Global indices of exactly `n_keep` labelled patches, drawn uniformly without replacement, sorted.

    Args:
        labelled_N: which patches have a label (flattened [image, patch]).
        n_keep: how many to keep; None keeps every labelled patch.
        seed: the draw depends only on this seed and `labelled_N`.
    """
    labelled_idx = np.flatnonzero(labelled_N).astype(np.int64)
    n_labelled = len(labelled_idx)
    if n_keep is None:
        return labelled_idx
    if n_keep <= 0:
        raise KeepMaskError(f"n_keep must be positive, got {n_keep}")
    if n_keep > n_labelled:
        raise KeepMaskError(
            f"n_keep={n_keep} is larger than the {n_labelled} labelled patches; lower mask.n_keep or use \"all\""
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(n_labelled, generator=generator).numpy()
    return np.sort(labelled_idx[order[:n_keep]])
