"""Inputs are checked where they are read: a bad file is an error naming it, never a silent wrong result.

The score partials are checked directly (`scoring.read_partials`) against every way a hostile or unlucky user could
break one; then a finished tiny run is corrupted at the same file sizes (so the artifact store's size check passes and
the readers' own checks must catch it) and a stage is rerun through the launcher: one error line naming the file, a
non-zero exit, nothing newly marked done.
"""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy

from saev import artifacts, checksums, scoring
from tests.helpers import manifests, reseal, run

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
    ("missing-tensor", _drop("max_K"), "holds tensors ['ap_CK', 'k_range', 'min_K'], expected"),
    ("extra-tensor", _set("extra", np.zeros(2)), "holds tensors ['ap_CK', 'extra', 'k_range', 'max_K', 'min_K']"),
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
    ("numbers-without-patches", _numbers_for_class_without_patches, "class 1 has no kept patches but latent 4 has AP 0.5"),
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
    "corrupt", [_truncate, _garble_header, _huge_header_length, _empty, _text],
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


#################################################
# Through the launcher, on a corrupted tiny run #
#################################################


def _resave_npy(root, name, change):
    fpath = next(root.glob(f"mask/*/{name}"))
    arr = np.load(fpath)
    new = change(arr)
    before = fpath.stat().st_size
    np.save(fpath, new, allow_pickle=False)
    assert fpath.stat().st_size == before, "the corruption must keep the size (the manifest checks sizes)"
    return fpath


def _keep_duplicate(root):
    def change(a):
        a = a.copy()
        a[6] = a[5]
        return a

    fpath = _resave_npy(root, "keep.npy", change)
    return rf"{re.escape(str(fpath))}: index \d+ appears twice"


def _keep_float(root):
    fpath = _resave_npy(root, "keep.npy", lambda a: a.astype(np.float64))
    return re.escape(f"{fpath}: dtype float64 is not an integer type")


def _keep_out_of_range(root):
    def change(a):
        a = a.copy()
        a[-1] = 10**9
        return a

    fpath = _resave_npy(root, "keep.npy", change)
    return re.escape(f"{fpath}: index 1000000000 is outside [0, 3072)")


def _overlap(root):
    keep = np.load(next(root.glob("mask/*/keep.npy")))

    def change(h):
        h = h.copy()
        h[0] = keep[0]
        return np.sort(h)

    fpath = _resave_npy(root, "heldout.npy", change)
    return re.escape(f"{fpath}: index {int(keep[0])} is also in")


def _keep_header_garbled(root):
    fpath = next(root.glob("mask/*/keep.npy"))
    raw = bytearray(fpath.read_bytes())
    raw[:6] = b"GARBLE"
    fpath.write_bytes(bytes(raw))
    return re.escape(f"{fpath} is not a readable .npy array")


def _label_out_of_range(root):
    fpath = next(root.glob("dump/*/labels.bin"))
    raw = bytearray(fpath.read_bytes())
    raw[100] = 9  # 6 classes in the synthetic data; 255 is the ignore label
    fpath.write_bytes(bytes(raw))
    return re.escape(f"{fpath}: class id 9 at image 1, patch 36 is not in [0, 6)")


def _nan_in_a_kept_patch(root):
    """NaN in the activation of the first kept patch at the SAE's layer (the last dumped one)."""
    dump_dpath = next(root.glob("dump/*"))
    md = json.loads((dump_dpath / "metadata.json").read_text())
    keep = np.load(next(root.glob("mask/*/keep.npy")))
    img, patch = divmod(int(keep[0]), md["n_patches_per_img"])
    n_imgs_per_shard = md["max_patches_per_shard"] // ((md["n_patches_per_img"] + md["cls_token"]) * len(md["layers"]))
    shard, local = divmod(img, n_imgs_per_shard)
    tokens = md["n_patches_per_img"] + int(md["cls_token"])
    fpath = dump_dpath / f"acts{shard:06d}.bin"
    acts = np.memmap(fpath, dtype=np.float32, mode="r+").reshape(-1, len(md["layers"]), tokens, md["d_vit"])
    acts[local, len(md["layers"]) - 1, int(md["cls_token"]) + patch, 0] = np.nan
    acts.flush()
    return re.escape(f"{fpath}: NaN/inf activation at image {img}, patch {patch}, layer {md['layers'][-1]}")


def _partial_of_the_other_sae(root):
    a, b = sorted(root.glob("score/*/partials/block00000.safetensors"))
    assert a.stat().st_size == b.stat().st_size
    shutil.copy(b, a)
    return re.escape(f"{a}: scores SAE ") + ".*a partial of another SAE"


def _partial_header_garbled(root):
    fpath = sorted(root.glob("score/*/partials/block00001.safetensors"))[0]
    raw = bytearray(fpath.read_bytes())
    raw[8:20] = b"\xff" * 12
    fpath.write_bytes(bytes(raw))
    return re.escape(f"{fpath} is not a readable safetensors file")


def _partial_nan_ap(root):
    fpath = sorted(root.glob("score/*/partials/block00000.safetensors"))[0]
    tensors = safetensors.numpy.load_file(str(fpath))
    with safetensors.safe_open(str(fpath), framework="numpy") as fd:
        metadata = fd.metadata()
    c = int(np.flatnonzero(~np.isnan(tensors["ap_CK"]).all(axis=1))[0])  # a class with kept patches
    tensors["ap_CK"][c, 3] = np.nan
    before = fpath.stat().st_size
    safetensors.numpy.save_file(tensors, str(fpath), metadata=metadata)
    assert fpath.stat().st_size == before
    return re.escape(f"{fpath}: AP of class {c}, latent 3 is NaN but the class has")


def _stray_partials(root):
    for dpath in root.glob("score/*/partials"):
        (dpath / "block00099.safetensors").write_bytes(b"junk")
        (dpath / "block_old.safetensors").write_bytes(b"junk")
        (dpath / "README").write_text("mine")
    return None


# (id, corruption -> message regex (None: the rerun succeeds), stage to rerun)
CORRUPTIONS = [
    ("keep-duplicate", _keep_duplicate, "score"),
    ("keep-float", _keep_float, "score"),
    ("keep-out-of-range", _keep_out_of_range, "score"),
    ("keep-heldout-overlap", _overlap, "reduce"),
    ("keep-header-garbled", _keep_header_garbled, "score"),
    ("label-out-of-range", _label_out_of_range, "mask"),
    ("nan-activation-in-a-kept-patch", _nan_in_a_kept_patch, "kept"),  # the kept stage gathers the rows
    ("partial-of-another-sae", _partial_of_the_other_sae, "reduce"),
    ("partial-header-garbled", _partial_header_garbled, "reduce"),
    ("partial-nan-ap", _partial_nan_ap, "reduce"),
    ("stray-files-in-partials", _stray_partials, "reduce"),
]


@pytest.mark.parametrize("corrupt,rerun", [r[1:] for r in CORRUPTIONS], ids=[r[0] for r in CORRUPTIONS])
def test_corrupt_files_at_the_same_size_are_caught_by_their_checksums(copy_of_done, capsys, corrupt, rerun):
    root = copy_of_done.parent / "runs"
    before_files = {p: p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    message = corrupt(root)
    changed = [
        p for p, size in before_files.items() if p.exists() and p.stat().st_mtime_ns and p.stat().st_size == size
        and checksums.recorded_checksum(p) and checksums.recorded_checksum(p)[1] != checksums.file_checksum(p)
    ]
    for dpath in root.glob(f"{rerun}/*"):
        shutil.rmtree(dpath)
    code = run(copy_of_done, stage=rerun, only=True)
    err = capsys.readouterr().err
    if message is None:  # stray files: not part of any artifact, ignored
        assert code == 0, err
        return
    assert changed, "the corruption should change a file at the same size"
    # Refused naming the file (exit 1), or repaired on the way when the file can be remade from its pieces (labels.bin).
    assert code in (0, 1) and "Traceback" not in err, err
    assert changed[0].name in err and "does not match its checksum" in err, err


@pytest.mark.parametrize("corrupt,rerun", [r[1:] for r in CORRUPTIONS], ids=[r[0] for r in CORRUPTIONS])
def test_corrupt_files_at_the_same_size_are_named_by_the_stage_that_reads_them(copy_of_done, capsys, corrupt, rerun):
    root = copy_of_done.parent / "runs"
    message = corrupt(root)
    reseal(root)
    for dpath in root.glob(f"{rerun}/*"):  # so that the stage runs again, reading the corrupt input
        shutil.rmtree(dpath)
    before = manifests(root)
    code = run(copy_of_done, stage=rerun, only=True)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err
    assert manifests(root) <= before
