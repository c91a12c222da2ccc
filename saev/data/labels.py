"""Per-patch class labels from a segmentation mask.

The mask is resized with nearest-neighbour to the model's input size (its image is resized the same way, after the
same centre crop when the dataset's `resize` mode is "crop": `datasets.load_batch`, so pixels and patches line up),
split into the ViT's patch grid (row-major, the ViT's token order), and each
patch gets the majority class of its pixels. Masks are pooled one at a time or as a batch, with the same result.
"""

import functools
from collections.abc import Sequence

import beartype
import numpy as np
import torch
from jaxtyping import Int, Integer, jaxtyped


@beartype.beartype
def class_names_fault(names: Sequence[str], *, lines: bool = False) -> str | None:
    """What is wrong with a list of class names, or None: a blank name, one with a line break or surrounding
    whitespace (it would not survive a classes.txt, one stripped name a line), or a name given twice (two classes
    would share a row of every result). The text names the entries (1-based; `lines`: says "line") and the name."""
    one, many = ("line", "lines") if lines else ("entry", "entries")
    first: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if not name.strip():
            return f"{one} {i} is blank ({name!r}); every class needs a name"
        if "\n" in name or "\r" in name or name != name.strip():
            return f"{one} {i} ({name!r}) has a line break or surrounding whitespace"
        if name in first:
            return f"names class {name!r} twice: {many} {first[name]} and {i}"
        first[name] = i
    return None


@jaxtyped(typechecker=beartype.beartype)
def resize_nearest(mask: Integer[np.ndarray, "*batch H W"], size: int) -> Integer[np.ndarray, "*batch size size"]:
    """Nearest-neighbour resize sampling each output pixel's centre (exact, no interpolation of ids)."""
    h, w = mask.shape[-2:]
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return mask[..., rows[:, None], cols[None, :]]


@functools.lru_cache(maxsize=2)
def _cell_of_pixel(n_imgs: int, img_size: int, n_side: int, dtype: torch.dtype) -> torch.Tensor:
    """[n_imgs, img_size, img_size]: image * n_patches + the row-major index of the patch holding the pixel."""
    patch_S = torch.arange(img_size) // (img_size // n_side)
    patch_SS = patch_S[:, None] * n_side + patch_S[None, :]
    return (torch.arange(n_imgs)[:, None, None] * (n_side * n_side) + patch_SS).to(dtype)


@jaxtyped(typechecker=beartype.beartype)
def pool_patch_labels(
    mask: Integer[np.ndarray, "*batch H W"],
    *,
    n_side: int,
    img_size: int,
    n_classes: int,
    ignore: int = 255,
    prefer_fg: bool = False,
    background: int | None = 0,
    min_frac: float = 0.0,
) -> Int[np.ndarray, "*batch n_patches"]:
    """Class id of each of the n_side * n_side patches (row-major, the ViT's token order), of one mask or a batch.

    Args:
        mask: class ids per pixel (any integer dtype), [H, W] or a batch [..., H, W] of same-size masks. Negative
            pixels and pixels equal to `ignore` are unlabelled: they vote for nothing. Any other id outside
            [0, n_classes) is a ValueError.
        n_side: patches per side of the model input.
        img_size: model input side in pixels (a multiple of n_side); the mask is resized to it, nearest-neighbour.
        n_classes: class ids are in [0, n_classes).
        ignore: label of a patch without a winner (no labelled pixel, or none above `min_frac`); must not be a
            class id. 255 suits uint8 labels; use -1 for int16 labels.
        prefer_fg: label a patch with its most common non-background class when it has any foreground pixel.
        background: the background class id (only used with prefer_fg; None = no background class).
        min_frac: the winning class must cover at least this fraction of the patch's labelled pixels, else the patch
            gets `ignore` (e.g. 0.5 keeps only patches with a clear majority). With prefer_fg, a foreground class below
            `min_frac` does not win and the plain majority is used instead (subject to `min_frac` too).

    Ties go to the lowest class id. A batch gives the same labels as its masks pooled one by one.
    """
    if img_size % n_side:
        raise ValueError(f"img_size={img_size} is not a multiple of n_side={n_side}")
    if 0 <= ignore < n_classes:
        raise ValueError(f"ignore={ignore} is a class id (classes are 0..{n_classes - 1}); pick a value outside them")
    if prefer_fg and background is not None and not 0 <= background < n_classes:
        raise ValueError(f"background={background} is not a class id (classes are 0..{n_classes - 1})")
    if not 0.0 <= min_frac <= 1.0:
        raise ValueError(f"min_frac={min_frac} is not a fraction in [0, 1]")
    batch_shape, n_patches = mask.shape[:-2], n_side * n_side
    if n_classes == 0:  # an unlabelled dataset: no class can win anywhere
        return np.full((*batch_shape, n_patches), ignore, dtype=np.int64)
    if mask.shape[-2:] != (img_size, img_size):
        mask = resize_nearest(mask, img_size)
    masks_NSS = mask.reshape(-1, img_size, img_size)
    lo, hi = (int(masks_NSS.min()), int(masks_NSS.max())) if masks_NSS.size else (0, 0)
    if lo < 0 or lo <= ignore <= hi or hi >= n_classes:  # else every pixel holds a class id: nothing to check
        votes = masks_NSS.astype(np.int64)
        unlabelled = (votes < 0) | (votes == ignore)
        bad = ~unlabelled & (votes >= n_classes)
        if bad.any():
            raise ValueError(f"mask has class id {int(votes[bad].max())} but there are only {n_classes} classes")
        np.copyto(votes, n_classes, where=unlabelled)  # an extra class that never wins
        masks_NSS = votes
    elif masks_NSS.dtype not in (np.uint8, np.int8, np.int16, np.int32, np.int64):  # e.g. uint16: no torch arithmetic
        masks_NSS = masks_NSS.astype(np.int64)
    # Count the votes of every (class, image, patch) cell with one bincount over codes class * n_cells + cell, in torch
    # (its kernels are about twice numpy's speed here), class-major so that the reductions over classes below run
    # along whole rows. int32 codes where they fit: half the memory traffic of int64.
    n_cells = len(masks_NSS) * n_patches
    code_dtype = torch.int32 if (n_classes + 1) * n_cells < 2**31 else torch.int64
    cells_NSS = _cell_of_pixel(len(masks_NSS), img_size, n_side, code_dtype)
    codes = torch.add(cells_NSS, torch.from_numpy(np.require(masks_NSS, requirements="CW")), alpha=n_cells)
    counts_CN = torch.bincount(codes.view(-1), minlength=(n_classes + 1) * n_cells).view(n_classes + 1, n_cells)
    counts_CN = counts_CN[:n_classes].numpy()
    n_valid_N = counts_CN.sum(axis=0)
    # Compare count / n with min_frac (not count with min_frac * n): the quotient is the correctly rounded fraction,
    # so a count of exactly min_frac of the pixels (3 of 10 at 0.3) passes.
    denom_N = np.maximum(n_valid_N, 1)
    labels_N = counts_CN.argmax(axis=0)
    if min_frac > 0:
        labels_N = np.where(counts_CN.max(axis=0) / denom_N >= min_frac, labels_N, ignore)
    if prefer_fg and background is not None:
        fg_CN = counts_CN.copy()
        fg_CN[background] = 0
        n_fg_N = fg_CN.max(axis=0)
        fg_wins = (n_fg_N > 0) & (n_fg_N / denom_N >= min_frac)
        labels_N = np.where(fg_wins, fg_CN.argmax(axis=0), labels_N)
    labels_N = np.where(n_valid_N == 0, ignore, labels_N)
    return labels_N.astype(np.int64).reshape(*batch_shape, n_patches)
