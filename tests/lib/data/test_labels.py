"""Per-patch labels: nearest resize of the mask, then the majority class of each patch, in the ViT's token order."""

import collections

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from saev import vit as vits
from saev.data.labels import pool_patch_labels, resize_nearest

IGNORE = 255


def pool(mask, *, n_side=1, n_classes=4, **kwargs):
    """Labels of a mask already at the model's input size (no resize)."""
    mask = np.asarray(mask, dtype=np.int64)
    return pool_patch_labels(mask, n_side=n_side, img_size=len(mask), n_classes=n_classes, ignore=IGNORE, **kwargs)


##########
# Resize #
##########


def test_resize_samples_each_output_pixel_centre_from_a_non_multiple_size():
    # Output centres (i + 0.5) * 10 / 4 = 1.25, 3.75, 6.25, 8.75 -> source 1, 3, 6, 8 (rows and columns alike).
    mask = np.arange(100).reshape(10, 10)
    np.testing.assert_array_equal(resize_nearest(mask, 4), mask[np.ix_([1, 3, 6, 8], [1, 3, 6, 8])])


def test_resize_of_a_non_square_mask_scales_each_axis_on_its_own():
    mask = np.arange(3 * 5).reshape(3, 5)
    # rows: (i + 0.5) * 3 / 2 -> 0, 2; cols: (i + 0.5) * 5 / 2 -> 1, 3.
    np.testing.assert_array_equal(resize_nearest(mask, 2), [[1, 3], [11, 13]])


@settings(max_examples=40, deadline=None)
@given(side=st.integers(1, 7), k=st.integers(1, 4), data=st.data())
def test_resize_by_an_integer_factor_repeats_pixels_and_back_is_identity(side, k, data):
    mask = data.draw(hnp.arrays(np.int64, (side, side), elements=st.integers(-1, 9)))
    up = resize_nearest(mask, len(mask) * k)
    np.testing.assert_array_equal(up, mask.repeat(k, axis=0).repeat(k, axis=1))
    np.testing.assert_array_equal(resize_nearest(up, len(mask)), mask)


###########
# Pooling #
###########


def test_each_patch_gets_the_majority_class_of_its_pixels():
    mask = [
        [1, 1, 2, 2],
        [1, 3, 2, 0],
        [0, 0, 3, 3],
        [0, 2, 3, 1],
    ]
    np.testing.assert_array_equal(pool(mask, n_side=2), [1, 2, 0, 3])


def test_a_tie_goes_to_the_lowest_class_id():
    np.testing.assert_array_equal(pool([[3, 2], [2, 3]]), [2])
    np.testing.assert_array_equal(pool([[0, 1], [1, 0]]), [0])


def test_prefer_foreground_labels_a_patch_with_its_most_common_non_background_class():
    mask = [[0, 0, 0], [0, 0, 2], [3, 3, 0]]
    np.testing.assert_array_equal(pool(mask), [0])
    np.testing.assert_array_equal(pool(mask, prefer_fg=True), [3])
    np.testing.assert_array_equal(pool(mask, prefer_fg=True, background=3), [0])


def test_prefer_foreground_keeps_an_all_background_patch_as_background():
    np.testing.assert_array_equal(pool([[0, 0], [0, 0]], prefer_fg=True), [0])


def test_prefer_foreground_without_a_background_class_is_plain_majority():
    np.testing.assert_array_equal(pool([[0, 0], [0, 2]], prefer_fg=True, background=None), [0])


def test_negative_pixels_vote_for_nothing():
    np.testing.assert_array_equal(pool([[-1, -1], [-1, 2]]), [2])
    np.testing.assert_array_equal(pool([[-1, -1, -1], [1, 2, 2], [-1, 1, 1]]), [1])


def test_pixels_equal_to_the_ignore_value_vote_for_nothing():
    mask = np.array([[255, 255], [255, 2]], dtype=np.uint8)  # e.g. the "void" pixels of VOC-style masks
    np.testing.assert_array_equal(pool(mask), [2])
    np.testing.assert_array_equal(pool(np.full((2, 2), 255, np.uint8)), [IGNORE])


def test_the_default_ignore_value_is_255():
    mask = np.array([[255, 1], [1, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(pool_patch_labels(mask, n_side=1, img_size=2, n_classes=4), [1])
    np.testing.assert_array_equal(pool_patch_labels(np.full((2, 2), -1), n_side=1, img_size=2, n_classes=4), [255])


def test_min_frac_gives_patches_without_a_clear_majority_the_ignore_value():
    mask = [[1, 1], [2, 3]]  # class 1 covers half the patch
    np.testing.assert_array_equal(pool(mask, min_frac=0.5), [1])
    np.testing.assert_array_equal(pool(mask, min_frac=0.6), [IGNORE])


def test_min_frac_counts_only_labelled_pixels():
    np.testing.assert_array_equal(pool([[-1, -1, -1], [-1, -1, -1], [-1, 2, 2]], n_classes=3, min_frac=1.0), [2])


def test_min_frac_with_prefer_foreground_falls_back_to_the_majority():
    mask = [[0, 0, 0], [0, 0, 0], [0, 0, 2]]  # foreground is 1/9 of the patch
    np.testing.assert_array_equal(pool(mask, prefer_fg=True, min_frac=0.1), [2])
    np.testing.assert_array_equal(pool(mask, prefer_fg=True, min_frac=0.2), [0])
    np.testing.assert_array_equal(pool(mask, prefer_fg=True, min_frac=0.9), [IGNORE])


def test_a_patch_without_a_labelled_pixel_gets_the_ignore_value():
    mask = [[-1, -1, 1, 1], [-1, -1, 1, 1], [0, 0, -1, -1], [0, 0, -1, -1]]
    np.testing.assert_array_equal(pool(mask, n_side=2), [IGNORE, 1, 0, IGNORE])
    np.testing.assert_array_equal(pool([[-1, -1], [-1, -1]], prefer_fg=True), [IGNORE])


def test_patches_are_numbered_row_major():
    # Patch (row r, column c) of a 3 x 3 grid of 4 x 4-pixel patches holds the class r * n_side + c.
    n_side, p = 3, 4
    ids_RC = np.arange(n_side * n_side).reshape(n_side, n_side)
    mask = ids_RC.repeat(p, axis=0).repeat(p, axis=1)
    labels = pool_patch_labels(mask, n_side=n_side, img_size=n_side * p, n_classes=n_side * n_side, ignore=-1)
    np.testing.assert_array_equal(labels, np.arange(n_side * n_side))


def test_patch_order_matches_the_vit_token_order():
    """A patch-sized square in image and mask lands on the same token index in the ViT as in the labels."""
    model = vits.make_vit(vits.VitConfig())
    n_side, s = model.n_side, model.img_size
    p = s // n_side
    r, c = 2, 5
    x = torch.zeros(1, 3, s, s)
    x[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = 1.0
    mask = np.zeros((s, s), dtype=np.int64)
    mask[r * p : (r + 1) * p, c * p : (c + 1) * p] = 1
    labels = pool_patch_labels(mask, n_side=n_side, img_size=s, n_classes=2, ignore=IGNORE)
    with torch.no_grad():
        # conv1 has no bias: only the token of the lit patch is non-zero; open_clip flattens its grid to tokens.
        tokens_TD = model.visual.conv1(x).flatten(2)[0].T
    np.testing.assert_array_equal(np.flatnonzero(tokens_TD.abs().sum(dim=1).numpy()), np.flatnonzero(labels))
    assert np.flatnonzero(labels).tolist() == [r * n_side + c]


def test_a_mask_of_another_size_is_resized_before_pooling():
    # 6 x 6 mask -> 4 x 4 input (rows/cols 0, 2, 3, 5), 2 x 2 patches of 2 x 2 pixels.
    mask = np.zeros((6, 6), dtype=np.int64)
    mask[:3, 3:] = 2  # sampled rows 0, 2 and cols 3, 5: the whole top-right patch
    mask[5, 0] = 1  # one sampled pixel of the bottom-left patch: loses to background
    labels = pool_patch_labels(mask, n_side=2, img_size=4, n_classes=3, ignore=IGNORE)
    np.testing.assert_array_equal(labels, [0, 2, 0, 0])


def test_an_unsigned_mask_is_pooled_like_a_signed_one():
    mask = np.array([[1, 1, 2, 2], [1, 0, 2, 2], [0, 0, 3, 3], [0, 0, 3, 1]], dtype=np.uint8)
    got = pool_patch_labels(mask, n_side=2, img_size=4, n_classes=4, ignore=IGNORE)
    np.testing.assert_array_equal(got, pool(mask, n_side=2))


def test_a_class_id_beyond_the_classes_is_an_error():
    with pytest.raises(ValueError, match="class id 4 but there are only 4 classes"):
        pool([[0, 4], [1, 1]])


def test_an_input_size_that_is_not_a_multiple_of_the_grid_is_an_error():
    with pytest.raises(ValueError, match="img_size=10 is not a multiple of n_side=3"):
        pool_patch_labels(np.zeros((10, 10), np.int64), n_side=3, img_size=10, n_classes=2, ignore=IGNORE)


def test_an_ignore_value_that_is_a_class_id_is_an_error():
    with pytest.raises(ValueError, match="ignore=1 is a class id"):
        pool_patch_labels(np.zeros((4, 4), np.int64), n_side=2, img_size=4, n_classes=2, ignore=1)


@pytest.mark.parametrize("min_frac", [-0.1, 1.5])
def test_min_frac_outside_zero_to_one_is_an_error(min_frac):
    with pytest.raises(ValueError, match=f"min_frac={min_frac} is not a fraction"):
        pool([[0, 1], [1, 1]], min_frac=min_frac)


def test_prefer_foreground_with_a_background_outside_the_classes_is_an_error():
    with pytest.raises(ValueError, match="background=4 is not a class id"):
        pool([[0, 1], [1, 1]], prefer_fg=True, background=4)


######################
# Reference property #
######################


def reference_labels(mask_HW, n_side, img_size, n_classes, ignore, prefer_fg, background, min_frac):
    """Slow, obvious version: sample each input pixel's centre, then count each patch's pixels with a Counter."""
    h, w = mask_HW.shape
    p = img_size // n_side
    out = []
    for pr in range(n_side):
        for pc in range(n_side):
            votes = collections.Counter()
            for y in range(pr * p, (pr + 1) * p):
                for x in range(pc * p, (pc + 1) * p):
                    # Exact integer form of floor((y + 0.5) * h / img_size).
                    v = int(mask_HW[(2 * y + 1) * h // (2 * img_size), (2 * x + 1) * w // (2 * img_size)])
                    if v >= 0 and v != ignore:
                        votes[v] += 1
            total = sum(votes.values())

            def winner(candidates):
                best = max(candidates.values())
                return min(c for c, n in candidates.items() if n == best) if best / total >= min_frac else None  # noqa: B023 -- called within the loop

            fg = {c: n for c, n in votes.items() if c != background}
            label = winner(fg) if prefer_fg and background is not None and fg else None
            if label is None and votes:
                label = winner(votes)
            out.append(ignore if label is None else label)
    return np.array(out)


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    n_side=st.integers(1, 5),
    p=st.integers(1, 4),
    n_classes=st.integers(1, 5),
    prefer_fg=st.booleans(),
    background=st.one_of(st.none(), st.integers(0, 4)),
    ignore_above=st.one_of(st.none(), st.integers(0, 3)),
    min_frac=st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0)),
    data=st.data(),
)
def test_pooling_matches_a_per_patch_counter(
    h, w, n_side, p, n_classes, prefer_fg, background, ignore_above, min_frac, data
):
    background = None if background is None else background % n_classes
    ignore = -1 if ignore_above is None else n_classes + ignore_above
    pixels = st.one_of(st.integers(-2, n_classes - 1), st.just(ignore))
    mask = data.draw(hnp.arrays(np.int64, (h, w), elements=pixels))
    kwargs = dict(
        n_side=n_side,
        img_size=n_side * p,
        n_classes=n_classes,
        ignore=ignore,
        prefer_fg=prefer_fg,
        background=background,
        min_frac=min_frac,
    )
    np.testing.assert_array_equal(pool_patch_labels(mask, **kwargs), reference_labels(mask, **kwargs))


#########
# Batch #
#########


@settings(max_examples=60, deadline=None)
@given(
    n_imgs=st.integers(1, 5),
    h=st.integers(1, 12),
    n_side=st.integers(1, 4),
    p=st.integers(1, 3),
    n_classes=st.integers(1, 5),
    prefer_fg=st.booleans(),
    min_frac=st.sampled_from([0.0, 0.5]),
    dtype=st.sampled_from([np.uint8, np.int16, np.int64]),
    data=st.data(),
)
def test_a_batch_of_masks_is_pooled_like_each_mask_alone(
    n_imgs, h, n_side, p, n_classes, prefer_fg, min_frac, dtype, data
):
    ignore = n_classes + 1
    low = -1 if np.issubdtype(dtype, np.signedinteger) else 0
    masks = data.draw(
        hnp.arrays(dtype, (n_imgs, h, h), elements=st.one_of(st.integers(low, n_classes - 1), st.just(ignore)))
    )
    kwargs = dict(
        n_side=n_side, img_size=n_side * p, n_classes=n_classes, ignore=ignore, prefer_fg=prefer_fg, min_frac=min_frac
    )
    batch = pool_patch_labels(masks, **kwargs)
    assert batch.shape == (n_imgs, n_side * n_side)
    for i in range(n_imgs):
        np.testing.assert_array_equal(batch[i], pool_patch_labels(masks[i], **kwargs))


def test_a_batch_may_have_several_leading_dimensions():
    masks = np.random.default_rng(0).integers(0, 3, size=(2, 3, 8, 8))
    labels = pool_patch_labels(masks, n_side=2, img_size=8, n_classes=3)
    assert labels.shape == (2, 3, 4)
    np.testing.assert_array_equal(labels[1, 2], pool_patch_labels(masks[1, 2], n_side=2, img_size=8, n_classes=3))
