"""saev.scoring's reader of the score partials (`scoring.read_partials`): every way a hostile or unlucky user could
break a partial is refused with an error naming the file, never a silent wrong result. The same damage through the
launcher, on a finished run, is in tests/cli/test_validation.py."""

import pathlib
import re

import numpy as np
import pytest
import safetensors.numpy

from saev import artifacts, scoring

SAE = "a" * 16
N_CLASSES, D_SAE, BLOCK = 3, 10, 4  # blocks [0, 4), [4, 8), [8, 10)
COUNTS_C = np.array([5, 0, 7])  # class 1 has no kept patch: its AP row is NaN


def good_block(block: int, sae: str = SAE) -> dict[str, np.ndarray]:
    k_start, k_stop = block * BLOCK, min(D_SAE, (block + 1) * BLOCK)
    width = k_stop - k_start
    rng = np.random.default_rng(block)
    ap_CK = rng.random((N_CLASSES, width))
    ap_CK[1] = np.nan
    low = rng.normal(size=width).astype(np.float32)
    return {
        "ap_CK": ap_CK,
        "min_K": low,
        "max_K": low + np.float32(1.0),
        "k_range": np.array([k_start, k_stop], dtype=np.int64),
        "w_CK": rng.normal(size=(N_CLASSES, width)),
        "b_CK": rng.normal(size=(N_CLASSES, width)),
        "loss_CK": rng.random((N_CLASSES, width)),
        "converged_CK": np.ones((N_CLASSES, width), dtype=np.uint8),
    }


def save(art: artifacts.Artifact, block: int, tensors: dict, sae: str = SAE) -> pathlib.Path:
    fpath = scoring.partial_fpath(art, block)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(fpath), metadata={"sae": sae, "matmul_precision": "highest"})
    return fpath


@pytest.fixture
def art(tmp_path) -> artifacts.Artifact:
    """A score artifact with three good partials."""
    art = artifacts.Artifact(tmp_path, "score", "b" * 16)
    for block in range(3):
        save(art, block, good_block(block))
    return art


def read(art: artifacts.Artifact, counts_C=COUNTS_C) -> scoring.Partials:
    return scoring.read_partials(art, D_SAE, BLOCK, SAE, counts_C)


def test_good_partials_are_concatenated(art):
    partials = read(art)
    assert partials.ap_CK.shape == (N_CLASSES, D_SAE) and partials.min_K.shape == (D_SAE,)
    np.testing.assert_array_equal(partials.ap_CK[:, 4:8], good_block(1)["ap_CK"])


def test_stray_files_in_partials_are_ignored_not_read(art):
    partials_dpath = art.dpath / "partials"
    (partials_dpath / "block00003.safetensors").write_bytes(b"junk")  # a block this artifact does not have
    (partials_dpath / "block1.safetensors").write_bytes(b"junk")
    (partials_dpath / "blockXYZ.safetensors").write_bytes(b"junk")
    (partials_dpath / "notes.txt").write_text("hello")
    (partials_dpath / "block00000.safetensors.bak").write_bytes(b"junk")
    (partials_dpath / "subdir.safetensors").mkdir()
    np.testing.assert_array_equal(read(art).min_K[:4], good_block(0)["min_K"])


def _drop(name):
    def mutate(t):
        del t[name]

    return mutate


def _set(name, value):
    def mutate(t):
        t[name] = value(t) if callable(value) else value

    return mutate


def _ap_at(value, c=0, k=1):
    def mutate(t):
        t["ap_CK"][c, k] = value

    return mutate


def _nan_row_for_class_with_patches(t):
    t["ap_CK"][2] = np.nan


def _numbers_for_class_without_patches(t):
    t["ap_CK"][1] = 0.5


def _one_number_for_class_without_patches(t):
    t["ap_CK"][1, 2] = 0.25


# (id, mutation of block 1's tensors, message after the file name)
BAD_PARTIALS = [
    (
        "missing-tensor",
        _drop("max_K"),
        "holds tensors ['ap_CK', 'b_CK', 'converged_CK', 'k_range', 'loss_CK', 'min_K', 'w_CK'], expected",
    ),
    (
        "missing-probe",
        _drop("loss_CK"),
        "holds tensors ['ap_CK', 'b_CK', 'converged_CK', 'k_range', 'max_K', 'min_K', 'w_CK'], expected",
    ),
    ("extra-tensor", _set("extra", np.zeros(2)), "holds tensors ['ap_CK', 'b_CK', 'converged_CK', 'extra', 'k_range',"),
    (
        "nan-probe-loss",
        _set("loss_CK", np.full((N_CLASSES, BLOCK), np.nan)),
        "a probe has a non-finite or negative value",
    ),
    ("ap-float32", _set("ap_CK", lambda t: t["ap_CK"].astype(np.float32)), "ap_CK has dtype float32, expected float64"),
    ("min-float64", _set("min_K", lambda t: t["min_K"].astype(np.float64)), "min_K has dtype float64, expected"),
    ("k-range-int32", _set("k_range", np.array([4, 8], dtype=np.int32)), "k_range has dtype int32, expected int64"),
    ("column-short", _set("ap_CK", lambda t: t["ap_CK"][:, :3].copy()), "ap_CK has shape [3, 3], expected [3, 4]"),
    ("class-short", _set("ap_CK", lambda t: t["ap_CK"][:2].copy()), "ap_CK has shape [2, 4], expected [3, 4]"),
    ("max-short", _set("max_K", lambda t: t["max_K"][:3].copy()), "max_K has shape [3], expected [4]"),
    ("k-range-shifted", _set("k_range", np.array([5, 9], dtype=np.int64)), "k_range is [5, 9], expected [4, 8]"),
    ("ap-above-1", _ap_at(1.5), "AP 1.5 of class 0, latent 5 is not within [0, 1]"),
    ("ap-negative", _ap_at(-0.25, c=2, k=3), "AP -0.25 of class 2, latent 7 is not within [0, 1]"),
    ("ap-inf", _ap_at(np.inf), "AP inf of class 0, latent 5 is not within [0, 1]"),
    ("one-nan-ap", _ap_at(np.nan, c=0, k=2), "AP of class 0, latent 6 is NaN but the class has 5 kept patches"),
    ("nan-row-with-patches", _nan_row_for_class_with_patches, "AP of class 2, latent 4 is NaN but the class has 7"),
    (
        "numbers-without-patches",
        _numbers_for_class_without_patches,
        "class 1 has no kept patches but latent 4 has AP 0.5",
    ),
    ("one-number-without-patches", _one_number_for_class_without_patches, "class 1 has no kept patches but latent 6"),
    ("min-above-max", _set("min_K", lambda t: t["max_K"] + np.float32(1)), "latent 4 has min"),
    ("min-nan", _set("min_K", lambda t: np.full(4, np.nan, np.float32)), "latent 4 has min nan"),
    ("max-inf", _set("max_K", lambda t: np.full(4, np.inf, np.float32)), "latent 4 has min"),
]


@pytest.mark.parametrize("mutate,message", [r[1:] for r in BAD_PARTIALS], ids=[r[0] for r in BAD_PARTIALS])
def test_bad_partials_are_refused_naming_the_file(art, mutate, message):
    tensors = good_block(1)
    mutate(tensors)
    fpath = save(art, 1, tensors)
    with pytest.raises(scoring.PartialError, match=re.escape(f"{fpath}: {message}")):
        read(art)


def test_a_partial_of_another_sae_is_refused(art):
    fpath = save(art, 2, good_block(2), sae="c" * 16)
    msg = f"{fpath}: scores SAE '{'c' * 16}', expected '{SAE}' (a partial of another SAE)"
    with pytest.raises(scoring.PartialError, match=re.escape(msg)):
        read(art)


def test_a_partial_without_metadata_is_refused(art):
    fpath = scoring.partial_fpath(art, 0)
    safetensors.numpy.save_file(good_block(0), str(fpath))
    with pytest.raises(scoring.PartialError, match=re.escape(f"{fpath}: scores SAE None")):
        read(art)


def _truncate(fpath):
    fpath.write_bytes(fpath.read_bytes()[:-10])


def _garble_header(fpath):
    raw = bytearray(fpath.read_bytes())
    raw[8:20] = b"\xff" * 12  # same size, the JSON header is no longer JSON
    fpath.write_bytes(bytes(raw))


def _huge_header_length(fpath):
    raw = bytearray(fpath.read_bytes())
    raw[:8] = (2**40).to_bytes(8, "little")
    fpath.write_bytes(bytes(raw))


def _empty(fpath):
    fpath.write_bytes(b"")


def _text(fpath):
    fpath.write_text("not a tensor file")


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _garble_header, _huge_header_length, _empty, _text],
    ids=["truncated", "garbled-header", "huge-header-length", "empty", "text"],
)
def test_unreadable_partials_are_named(art, corrupt):
    fpath = scoring.partial_fpath(art, 1)
    corrupt(fpath)
    with pytest.raises(scoring.PartialError, match=re.escape(f"{fpath} is not a readable safetensors file")):
        read(art)


def test_a_missing_partial_is_named(art):
    fpath = scoring.partial_fpath(art, 2)
    fpath.unlink()
    with pytest.raises(scoring.PartialError, match=re.escape(f"{fpath} is missing; rerun `--stage score`")):
        read(art)
    assert issubclass(scoring.PartialError, artifacts.IncompleteArtifactError)


def test_a_directory_in_place_of_a_partial_is_named(art):
    fpath = scoring.partial_fpath(art, 0)
    fpath.unlink()
    fpath.mkdir()
    with pytest.raises(scoring.PartialError, match=re.escape(f"{fpath} is missing")):
        read(art)


def test_partials_scored_without_probes_are_read_as_such(tmp_path):
    art = artifacts.Artifact(tmp_path, "score", "c" * 16)
    for block in range(3):
        tensors = {k: v for k, v in good_block(block).items() if k in ("ap_CK", "min_K", "max_K", "k_range")}
        save(art, block, tensors)
    partials = scoring.read_partials(art, D_SAE, BLOCK, SAE, COUNTS_C, probes=False)
    assert partials.w_CK is None and partials.ap_CK.shape == (N_CLASSES, D_SAE)
    with pytest.raises(scoring.PartialError, match="holds tensors"):  # asked for probes the partials do not have
        read(art)
