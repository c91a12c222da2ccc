"""Keep-mask and held-out set: exact sizes, disjoint, seeded, independent of anything but their inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saev import keepmask


def labelled(n=1000, frac=0.7, seed=0):
    return np.random.default_rng(seed).random(n) < frac


def test_exact_sizes_sorted_labelled_and_disjoint():
    lab = labelled()
    masks = keepmask.make_masks(lab, 300, 200, seed=3)
    assert len(masks.keep) == 300 and len(masks.heldout) == 200
    assert (np.diff(masks.keep) > 0).all() and (np.diff(masks.heldout) > 0).all()
    assert lab[masks.keep].all() and lab[masks.heldout].all()
    assert not set(masks.keep) & set(masks.heldout)


def test_same_seed_same_masks_other_seed_differs():
    lab = labelled()
    a, b = keepmask.make_masks(lab, 100, 50, seed=1), keepmask.make_masks(lab, 100, 50, seed=1)
    np.testing.assert_array_equal(a.keep, b.keep)
    np.testing.assert_array_equal(a.heldout, b.heldout)
    assert not np.array_equal(a.keep, keepmask.make_masks(lab, 100, 50, seed=2).keep)


def test_kept_set_does_not_depend_on_heldout_size():
    lab = labelled()
    np.testing.assert_array_equal(
        keepmask.make_masks(lab, 100, 0, seed=0).keep, keepmask.make_masks(lab, 100, 400, seed=0).keep
    )


def test_all_keeps_every_labelled_patch():
    lab = labelled()
    masks = keepmask.make_masks(lab, None, 0, seed=0)
    np.testing.assert_array_equal(masks.keep, np.flatnonzero(lab))
    with pytest.raises(keepmask.KeepMaskError, match="n_heldout"):
        keepmask.make_masks(lab, None, 10, seed=0)


def test_too_many_patches_is_a_clear_error():
    lab = labelled(100, 0.5)
    n = int(lab.sum())
    with pytest.raises(keepmask.KeepMaskError, match=f"more than the {n} labelled patches"):
        keepmask.make_masks(lab, n, 1, seed=0)
    with pytest.raises(keepmask.KeepMaskError, match="positive"):
        keepmask.make_masks(lab, 0, 0, seed=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31), data=st.data())
def test_masks_are_uniform_subsets(n, seed, data):
    lab = np.random.default_rng(seed).random(n) < 0.5
    n_lab = int(lab.sum())
    n_keep = data.draw(st.integers(1, max(1, n_lab))) if n_lab else None
    if n_keep is None:
        return
    n_heldout = data.draw(st.integers(0, n_lab - n_keep))
    masks = keepmask.make_masks(lab, n_keep, n_heldout, seed)
    assert len(np.union1d(masks.keep, masks.heldout)) == n_keep + n_heldout
