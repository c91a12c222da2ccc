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
    ignore: int,
    prefer_fg: bool = False,
    background: int | None = 0,
) -> Int[np.ndarray, " n_patches"]:
    """Class id of each of the n_side * n_side patches (row-major).

    Args:
        mask_HW: class ids per pixel (any integer dtype); negative values mean "unlabelled" and vote for nothing.
        n_side: patches per side of the model input.
        img_size: model input side in pixels (a multiple of n_side).
        n_classes: class ids are in [0, n_classes).
        ignore: label written for a patch without any labelled pixel.
        prefer_fg: label a patch with its most common non-background class when it has any foreground pixel.
        background: the background class id (only used with prefer_fg).

    Ties go to the lowest class id.
    """
    if img_size % n_side:
        raise ValueError(f"img_size={img_size} is not a multiple of n_side={n_side}")
    if 0 <= ignore < n_classes:
        raise ValueError(f"ignore={ignore} is a class id (classes are 0..{n_classes - 1}); pick a value outside them")
    if prefer_fg and background is not None and not 0 <= background < n_classes:
        raise ValueError(f"background={background} is not a class id (classes are 0..{n_classes - 1})")
    p = img_size // n_side
    # int64 first: unsigned masks (uint8 PNGs) can hold neither the -1 below nor the vote offsets.
    mask = resize_nearest(mask_HW, img_size).astype(np.int64)
    if mask.max(initial=-1) >= n_classes:
        raise ValueError(f"mask has class id {int(mask.max())} but there are only {n_classes} classes")
    patches_PX = mask.reshape(n_side, p, n_side, p).transpose(0, 2, 1, 3).reshape(n_side * n_side, p * p)
    # Count class votes per patch with one bincount; unlabelled pixels go to an extra column that never wins.
    votes = np.where(patches_PX < 0, n_classes, patches_PX)
    offsets = np.arange(len(votes))[:, None] * (n_classes + 1)
    counts_PC = np.bincount((votes + offsets).ravel(), minlength=len(votes) * (n_classes + 1))
    counts_PC = counts_PC.reshape(len(votes), n_classes + 1)[:, :n_classes]
    labels = counts_PC.argmax(axis=1)
    if prefer_fg and background is not None:
        fg_PC = counts_PC.copy()
        fg_PC[:, background] = 0
        has_fg = fg_PC.sum(axis=1) > 0
        labels = np.where(has_fg, fg_PC.argmax(axis=1), labels)
    labels = np.where(counts_PC.sum(axis=1) == 0, ignore, labels)
    return labels.astype(np.int64)
