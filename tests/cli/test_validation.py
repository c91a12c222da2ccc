"""Inputs are checked where they are read: a bad file is an error naming it, never a silent wrong result.

A finished tiny run is corrupted at the same file sizes (so the artifact store's size check passes and the readers'
own checks must catch it) and a stage is rerun through the launcher: one error line naming the file, a non-zero exit,
nothing newly marked done. The score partials' reader on its own is tested in tests/lib/test_scoring.py.
"""

import json
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy

from saev import checksums
from tests.helpers import manifests, reseal, run

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
        p
        for p, size in before_files.items()
        if p.exists()
        and p.stat().st_mtime_ns
        and p.stat().st_size == size
        and checksums.recorded_checksum(p)
        and checksums.recorded_checksum(p)[1] != checksums.file_checksum(p)
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
