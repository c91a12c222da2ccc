"""Per-patch class labels from a segmentation mask.

The mask is resized with nearest-neighbour to the model's input size (images are resized the same way, without a
crop, so pixels and patches line up), split into the ViT's patch grid (row-major, the ViT's token order), and each
patch gets the majority class of its pixels.
"""

import beartype
import numpy as np
from jaxtyping import Int, Integer, jaxtyped


@jaxtyped(typechecker=beartype.beartype)
def resize_nearest(mask_HW: Integer[np.ndarray, "H W"], size: int) -> Integer[np.ndarray, "size size"]:
    """Nearest-neighbour resize sampling each output pixel's centre (exact, no interpolation of ids)."""
    h, w = mask_HW.shape
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return mask_HW[rows[:, None], cols[None, :]]


@jaxtyped(typechecker=beartype.beartype)
def pool_patch_labels(
    mask_HW: Integer[np.ndarray, "H W"],
    *,
    n_side: int,
    img_size: int,
    n_classes: int,
    ignore: int = 255,
    prefer_fg: bool = False,
    background: int | None = 0,
    min_frac: float = 0.0,
) -> Int[np.ndarray, " n_patches"]:
    """Class id of each of the n_side * n_side patches (row-major, the ViT's token order).

    Args:
        mask_HW: class ids per pixel (any integer dtype). Negative pixels and pixels equal to `ignore` are
            unlabelled: they vote for nothing. Any other id outside [0, n_classes) is a ValueError.
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

    Ties go to the lowest class id.
    """
    if img_size % n_side:
        raise ValueError(f"img_size={img_size} is not a multiple of n_side={n_side}")
    if 0 <= ignore < n_classes:
        raise ValueError(f"ignore={ignore} is a class id (classes are 0..{n_classes - 1}); pick a value outside them")
    if prefer_fg and background is not None and not 0 <= background < n_classes:
        raise ValueError(f"background={background} is not a class id (classes are 0..{n_classes - 1})")
    if not 0.0 <= min_frac <= 1.0:
        raise ValueError(f"min_frac={min_frac} is not a fraction in [0, 1]")
    p = img_size // n_side
    # int64 first: unsigned masks (uint8 PNGs) can hold neither the vote offsets nor negative ids.
    mask = resize_nearest(mask_HW, img_size).astype(np.int64)
    unlabelled = (mask < 0) | (mask == ignore)
    bad = ~unlabelled & (mask >= n_classes)
    if bad.any():
        raise ValueError(f"mask has class id {int(mask[bad].max())} but there are only {n_classes} classes")
    patches_PX = mask.reshape(n_side, p, n_side, p).transpose(0, 2, 1, 3).reshape(n_side * n_side, p * p)
    unlabelled_PX = unlabelled.reshape(n_side, p, n_side, p).transpose(0, 2, 1, 3).reshape(n_side * n_side, p * p)
    # Count class votes per patch with one bincount; unlabelled pixels go to an extra column that never wins.
    votes = np.where(unlabelled_PX, n_classes, patches_PX)
    offsets = np.arange(len(votes))[:, None] * (n_classes + 1)
    counts_PC = np.bincount((votes + offsets).ravel(), minlength=len(votes) * (n_classes + 1))
    counts_PC = counts_PC.reshape(len(votes), n_classes + 1)[:, :n_classes]
    n_valid_P = counts_PC.sum(axis=1)
    # Compare count / n with min_frac (not count with min_frac * n): the quotient is the correctly rounded fraction,
    # so a count of exactly min_frac of the pixels (3 of 10 at 0.3) passes.
    denom_P = np.maximum(n_valid_P, 1)
    labels = counts_PC.argmax(axis=1)
    labels = np.where(counts_PC.max(axis=1) / denom_P >= min_frac, labels, ignore)
    if prefer_fg and background is not None:
        fg_PC = counts_PC.copy()
        fg_PC[:, background] = 0
        n_fg_P = fg_PC.max(axis=1)
        fg_wins = (n_fg_P > 0) & (n_fg_P / denom_P >= min_frac)
        labels = np.where(fg_wins, fg_PC.argmax(axis=1), labels)
    labels = np.where(n_valid_P == 0, ignore, labels)
    return labels.astype(np.int64)
