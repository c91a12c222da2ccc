"""Seeded, exact-size keep-masks over labelled patches, and a disjoint held-out set.

The masks are a function of (which patches are labelled, sizes, seed) only: never of loader order, batch size or the
number of jobs, so every stage that reads them sees the same patches. Both come from one seeded permutation of the
labelled patches: the first `n_keep` are kept, the next `n_heldout` are held out, so they never overlap and the
kept set does not depend on `n_heldout`.
"""

import pathlib
import typing

import beartype
import numpy as np
import torch
from jaxtyping import Bool, Int64, jaxtyped

from saev import errors, helpers
from saev.data.shards import Shards


class KeepMaskError(errors.UserConfigError, ValueError):
    """The requested masks cannot be drawn (e.g. more patches than are labelled)."""


class Masks(typing.NamedTuple):
    """Sorted int64 global patch indices (image * n_patches_per_img + patch)."""

    keep: Int64[np.ndarray, " n_keep"]
    """Patches that select the best latent."""
    heldout: Int64[np.ndarray, " n_heldout"]
    """Disjoint patches that report the chosen latent's AP."""


@beartype.beartype
def check_sizes(n_keep: int | None, n_heldout: int, n_available: int, what: str) -> None:
    """Refuse mask sizes that cannot be drawn from `n_available` patches: n_keep = "all" (None) with a held-out set,
    or more kept plus held-out patches than there are.

    Args:
        n_keep: patches to keep; None keeps all of them.
        n_heldout: patches to hold out.
        n_available: patches to draw from.
        what: what those patches are, for the message (e.g. "labelled patches").

    Raises:
        KeepMaskError: naming the config keys and the sizes.
    """
    if n_keep is None:
        if n_heldout:
            raise KeepMaskError('mask.n_keep = "all" leaves no patches for mask.n_heldout; set n_heldout = 0')
        return
    if n_keep + n_heldout > n_available:
        raise KeepMaskError(
            f"mask.n_keep={n_keep} + mask.n_heldout={n_heldout} is more than the {n_available} {what}; "
            'lower them (or use n_keep = "all")'
        )


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
    if n_keep is not None and n_keep <= 0:
        raise KeepMaskError(f"mask.n_keep must be positive, got {n_keep}")
    check_sizes(n_keep, n_heldout, n_labelled, "labelled patches")
    if n_keep is None:
        return Masks(labelled_idx, np.zeros(0, dtype=np.int64))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(n_labelled, generator=generator).numpy()
    keep = np.sort(labelled_idx[order[:n_keep]])
    heldout = np.sort(labelled_idx[order[n_keep : n_keep + n_heldout]])
    return Masks(keep, heldout)


_NPY_HEADER_BYTES = 1 << 16
"""A .npy header's largest size (numpy writes 64 to a few hundred bytes)."""


class MaskFileError(KeepMaskError):
    """A keep.npy or heldout.npy of the mask stage cannot be read or holds invalid indices; the message names it."""

    kind: typing.ClassVar[errors.Kind] = "input"


@beartype.beartype
def load_mask_file(fpath: pathlib.Path, n_patches: int) -> np.ndarray:
    """Read one mask file (a plain .npy array; pickles are refused) without casting it; a file larger than an index
    array of `n_patches` 8-byte integers (plus its header) is refused unread.

    Raises:
        MaskFileError: the file is missing, not a regular file, too large, truncated, corrupt, not a .npy file, or a
            pickled object array.
    """
    if not fpath.exists():
        raise MaskFileError(f"{fpath} is missing; rerun the mask stage")
    helpers.check_regular_file(fpath, what="mask", max_bytes=8 * n_patches + _NPY_HEADER_BYTES, error=MaskFileError)
    try:
        return np.load(fpath, allow_pickle=False)
    except FileNotFoundError:
        raise MaskFileError(f"{fpath} is missing; rerun the mask stage") from None
    except (ValueError, OSError, EOFError) as err:
        raise MaskFileError(f"{fpath} is not a readable .npy array ({err}); rerun the mask stage") from None


@beartype.beartype
def check_mask(
    idx: np.ndarray, *, n_patches: int, labelled_N: np.ndarray | None = None, fpath: pathlib.Path | str
) -> None:
    """Check one array of global patch indices as the mask stage writes it.

    It must be a 1-D array of an integer dtype (a float array is refused, not cast), strictly increasing (sorted,
    no duplicates), within [0, n_patches), and (when `labelled_N` is given) select labelled patches only.

    Args:
        idx: the array read from `fpath`.
        n_patches: patches of the dump (images x patches per image).
        labelled_N: bool [n_patches], which patches have a class label; None skips that check.
        fpath: the file the array came from, named in every error.

    Raises:
        MaskFileError: naming `fpath` and the first bad value.
    """
    if not np.issubdtype(idx.dtype, np.integer):
        raise MaskFileError(f"{fpath}: dtype {idx.dtype} is not an integer type (expected int64 patch indices)")
    if idx.ndim != 1:
        raise MaskFileError(f"{fpath}: shape {idx.shape} is not 1-D (expected a flat list of patch indices)")
    if not idx.size:
        return
    idx = idx.astype(np.int64, copy=False)
    steps = np.diff(idx)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        if steps[i] == 0:
            raise MaskFileError(f"{fpath}: index {int(idx[i])} appears twice (positions {i} and {i + 1})")
        raise MaskFileError(
            f"{fpath}: indices are not sorted: {int(idx[i])} at position {i} is followed by {int(idx[i + 1])}"
        )
    if idx[0] < 0 or idx[-1] >= n_patches:
        bad = int(idx[0] if idx[0] < 0 else idx[-1])
        raise MaskFileError(f"{fpath}: index {bad} is outside [0, {n_patches}) (the patches of the dump)")
    if labelled_N is not None:
        if labelled_N.shape != (n_patches,):
            raise ValueError(f"labelled_N has shape {labelled_N.shape}, expected ({n_patches},)")
        unlabelled = ~labelled_N[idx]
        if unlabelled.any():
            bad = int(idx[np.flatnonzero(unlabelled)[0]])
            raise MaskFileError(
                f"{fpath}: index {bad} is an unlabelled patch ({int(unlabelled.sum())} of {len(idx)} are); "
                "the mask does not belong to this dump"
            )


@beartype.beartype
def check_masks(
    keep: np.ndarray,
    heldout: np.ndarray,
    *,
    n_patches: int,
    labelled_N: np.ndarray | None = None,
    fpaths: tuple[pathlib.Path | str, pathlib.Path | str] = ("keep.npy", "heldout.npy"),
) -> None:
    """Check the kept and held-out indices (see `check_mask`) and that no patch is in both.

    Raises:
        MaskFileError: naming the file at fault (for an overlap, both files and the first shared index).
    """
    check_mask(keep, n_patches=n_patches, labelled_N=labelled_N, fpath=fpaths[0])
    check_mask(heldout, n_patches=n_patches, labelled_N=labelled_N, fpath=fpaths[1])
    shared = np.intersect1d(keep, heldout, assume_unique=True)
    if shared.size:
        raise MaskFileError(
            f"{fpaths[1]}: index {int(shared[0])} is also in {fpaths[0]} ({shared.size} shared); "
            "kept and held-out patches must be disjoint"
        )


@beartype.beartype
def load_masks(dpath: pathlib.Path, *, n_patches: int, labelled_N: np.ndarray | None = None) -> Masks:
    """Read and check `keep.npy` and `heldout.npy` of a mask artifact (see `check_masks`), as int64 arrays.

    Raises:
        MaskFileError: a file is missing, unreadable or holds invalid indices; the message names it.
    """
    fpaths = (dpath / "keep.npy", dpath / "heldout.npy")
    keep, heldout = (load_mask_file(fpath, n_patches) for fpath in fpaths)
    check_masks(keep, heldout, n_patches=n_patches, labelled_N=labelled_N, fpaths=fpaths)
    return Masks(keep.astype(np.int64, copy=False), heldout.astype(np.int64, copy=False))


@beartype.beartype
def load_for_dump(dpath: pathlib.Path, shards: Shards) -> Masks:
    """The masks of the mask artifact in `dpath`, read and checked against the dump `shards` (`load_masks`):
    integer, 1-D, strictly increasing, within the dump's patches, labelled, and disjoint.

    Raises:
        MaskFileError: a file is missing, unreadable or holds invalid indices; the message names it.
    """
    md = shards.metadata
    labelled_N = np.asarray(shards.labels).reshape(-1) != md.labels_ignore  # labels are checked when first read
    return load_masks(pathlib.Path(dpath), n_patches=md.n_imgs * md.n_patches_per_img, labelled_N=labelled_N)


def load_keep(dpath: pathlib.Path, shards: Shards) -> np.ndarray:
    """The sorted global indices of the kept patches of the mask artifact in `dpath` (both files are read and
    checked, see `load_for_dump`)."""
    return load_for_dump(dpath, shards).keep


def load_heldout(dpath: pathlib.Path, shards: Shards) -> np.ndarray:
    """The sorted global indices of the held-out patches (disjoint from the kept ones; may be empty), checked as
    in `load_keep`."""
    return load_for_dump(dpath, shards).heldout
