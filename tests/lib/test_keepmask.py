"""Keep-mask and held-out set: exact sizes, disjoint, seeded, independent of anything but their inputs."""

import pathlib
import re

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


###########################################################
# Mask files checked where they are read (hostile inputs) #
###########################################################


def write_masks(dpath: pathlib.Path, keep, heldout) -> pathlib.Path:
    np.save(dpath / "keep.npy", np.asarray(keep), allow_pickle=False)
    np.save(dpath / "heldout.npy", np.asarray(heldout), allow_pickle=False)
    return dpath


def load(dpath, n_patches=100, labelled_N=None):
    return keepmask.load_masks(dpath, n_patches=n_patches, labelled_N=labelled_N)


def test_good_masks_load_as_int64(tmp_path):
    write_masks(tmp_path, np.array([1, 5, 9], dtype=np.int32), np.array([2, 3], dtype=np.int64))
    masks = load(tmp_path)
    assert masks.keep.dtype == np.int64 and masks.keep.tolist() == [1, 5, 9] and masks.heldout.tolist() == [2, 3]
    write_masks(tmp_path, np.array([1, 5], dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert load(tmp_path).heldout.size == 0


BAD_MASKS = [
    # (id, keep, heldout, file at fault, message)
    ("float", np.array([1.0, 2.0]), [3], "keep.npy", "dtype float64 is not an integer type"),
    ("bool", np.array([True, False]), [3], "keep.npy", "dtype bool is not an integer type"),
    ("2-d", np.array([[1, 2], [3, 4]]), [5], "keep.npy", "shape (2, 2) is not 1-D"),
    ("duplicate", np.array([1, 5, 5, 7]), [3], "keep.npy", "index 5 appears twice (positions 1 and 2)"),
    ("unsorted", np.array([1, 7, 5]), [3], "keep.npy", "indices are not sorted: 7 at position 1 is followed by 5"),
    ("negative", np.array([-1, 5]), [3], "keep.npy", "index -1 is outside [0, 100)"),
    ("too-large", np.array([1, 100]), [3], "keep.npy", "index 100 is outside [0, 100)"),
    ("heldout-duplicate", np.array([1]), np.array([3, 3]), "heldout.npy", "index 3 appears twice"),
    ("heldout-out-of-range", np.array([1]), np.array([3, 1000]), "heldout.npy", "index 1000 is outside [0, 100)"),
    ("overlap", np.array([1, 3, 8]), np.array([2, 8]), "heldout.npy", "index 8 is also in "),
]


@pytest.mark.parametrize("keep,heldout,fname,message", [r[1:] for r in BAD_MASKS], ids=[r[0] for r in BAD_MASKS])
def test_bad_mask_files_are_refused_naming_the_file_and_value(tmp_path, keep, heldout, fname, message):
    write_masks(tmp_path, keep, np.asarray(heldout, dtype=np.int64) if isinstance(heldout, list) else heldout)
    with pytest.raises(keepmask.MaskFileError, match=re.escape(f"{tmp_path / fname}: {message}")):
        load(tmp_path)


def test_an_unlabelled_index_is_refused(tmp_path):
    labelled_N = np.ones(100, dtype=bool)
    labelled_N[42] = False
    write_masks(tmp_path, np.array([1, 2]), np.array([42, 50]))
    msg = f"{tmp_path / 'heldout.npy'}: index 42 is an unlabelled"
    with pytest.raises(keepmask.MaskFileError, match=re.escape(msg)):
        load(tmp_path, labelled_N=labelled_N)


def corrupt_truncate(fpath):
    fpath.write_bytes(fpath.read_bytes()[:-8])


def corrupt_header_same_size(fpath):
    raw = bytearray(fpath.read_bytes())
    raw[:6] = b"NOTNPY"
    fpath.write_bytes(bytes(raw))


def corrupt_pickle(fpath):
    np.save(fpath, np.array([1, "x", None], dtype=object), allow_pickle=True)


def corrupt_text(fpath):
    fpath.write_text("1,2,3\n")


def corrupt_empty(fpath):
    fpath.write_bytes(b"")


def corrupt_missing(fpath):
    fpath.unlink()


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (corrupt_truncate, "is not a readable .npy array"),
        (corrupt_header_same_size, "is not a readable .npy array"),
        (corrupt_pickle, "is not a readable .npy array"),
        (corrupt_text, "is not a readable .npy array"),
        (corrupt_empty, "is not a readable .npy array"),
        (corrupt_missing, "is missing; rerun the mask stage"),
    ],
    ids=["truncated", "header-same-size", "pickle", "text", "empty", "missing"],
)
@pytest.mark.parametrize("fname", ["keep.npy", "heldout.npy"])
def test_unreadable_mask_files_are_named(tmp_path, corrupt, message, fname):
    write_masks(tmp_path, np.arange(0, 20, 2), np.arange(1, 11, 2))
    corrupt(tmp_path / fname)
    with pytest.raises(keepmask.MaskFileError, match=re.escape(f"{tmp_path / fname} {message}")):
        load(tmp_path)


def test_mask_file_error_is_a_keep_mask_error_and_a_value_error():
    assert issubclass(keepmask.MaskFileError, keepmask.KeepMaskError)
    assert issubclass(keepmask.MaskFileError, ValueError)  # the launcher reports it as one error line


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31), data=st.data())
def test_masks_that_make_masks_draws_always_pass_the_check(n, seed, data):
    lab = np.random.default_rng(seed).random(n) < 0.5
    n_lab = int(lab.sum())
    if not n_lab:
        return
    n_keep = data.draw(st.integers(1, n_lab))
    masks = keepmask.make_masks(lab, n_keep, data.draw(st.integers(0, n_lab - n_keep)), seed)
    keepmask.check_masks(masks.keep, masks.heldout, n_patches=n, labelled_N=lab)
