"""Seeded, exact-size keep-masks over labelled patches, and a disjoint held-out set.

The masks are a function of (which patches are labelled, sizes, seed) only: never of loader order, batch size or the
number of jobs, so every stage that reads them sees the same patches. Both come from one seeded permutation of the
labelled patches: the first `n_keep` are kept, the next `n_heldout` are held out, so they never overlap and the
kept set does not depend on `n_heldout`.
"""

import typing

import beartype
import numpy as np
import torch
from jaxtyping import Bool, Int64, jaxtyped


class KeepMaskError(ValueError):
    """The requested masks cannot be drawn (e.g. more patches than are labelled)."""


class Masks(typing.NamedTuple):
    """Sorted int64 global patch indices (image * n_patches_per_img + patch)."""

    keep: Int64[np.ndarray, " n_keep"]
    """Patches that select the best latent."""
    heldout: Int64[np.ndarray, " n_heldout"]
    """Disjoint patches that report the chosen latent's AP."""


@jaxtyped(typechecker=beartype.beartype)
def make_masks(labelled_N: Bool[np.ndarray, " N"], n_keep: int | None, n_heldout: int, seed: int) -> Masks:
    """Draw `n_keep` kept and `n_heldout` held-out labelled patches, uniformly without replacement.

    Args:
        labelled_N: which patches have a label (flattened [image, patch]).
        n_keep: how many to keep; None keeps every labelled patch (then n_heldout must be 0).
        n_heldout: how many to hold out, disjoint from the kept ones.
        seed: the draw depends only on this seed and `labelled_N`.
    """
    labelled_idx = np.flatnonzero(labelled_N).astype(np.int64)
    n_labelled = len(labelled_idx)
    if n_heldout < 0:
        raise KeepMaskError(f"mask.n_heldout must be >= 0, got {n_heldout}")
    if n_keep is None:
        if n_heldout:
            raise KeepMaskError('mask.n_keep = "all" leaves no patches for mask.n_heldout; set n_heldout = 0')
        return Masks(labelled_idx, np.zeros(0, dtype=np.int64))
    if n_keep <= 0:
        raise KeepMaskError(f"mask.n_keep must be positive, got {n_keep}")
    if n_keep + n_heldout > n_labelled:
        raise KeepMaskError(
            f"mask.n_keep={n_keep} + mask.n_heldout={n_heldout} is more than the {n_labelled} labelled patches; "
            'lower them (or use n_keep = "all")'
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(n_labelled, generator=generator).numpy()
    keep = np.sort(labelled_idx[order[:n_keep]])
    heldout = np.sort(labelled_idx[order[n_keep : n_keep + n_heldout]])
    return Masks(keep, heldout)
