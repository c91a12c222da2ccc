"""Bad input gets a clear error naming the file, key or value, a non-zero exit, and nothing marked done.

Each row of BAD_CONFIGS changes a fresh copy of tests/tiny.toml (or its sweep, or a folder dataset) and runs the
launcher; errors in the config are caught before anything runs. BAD_ARTIFACTS corrupt a finished run and rerun a
stage, which must refuse or fail without marking anything done.
"""

import json
import math
import pathlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import folder, manifests, run


def edit(old: str, new: str, fname: str = "tiny.toml"):
    def mutate(cfg: pathlib.Path) -> None:
        fpath = cfg.parent / fname
        text = fpath.read_text()
        assert old in text, f"{old!r} not in {fname}"
        fpath.write_text(text.replace(old, new, 1))

    return mutate


def append(extra: str):
    def mutate(cfg: pathlib.Path) -> None:
        cfg.write_text(cfg.read_text() + "\n" + extra + "\n")

    return mutate


def _drop_mask(data):
    (data / "masks" / "img3.png").unlink()


def _empty_images(data):
    for p in (data / "images").iterdir():
        p.unlink()


def _bad_class_id(data):
    Image.fromarray(np.full((40, 48), 7, dtype=np.uint8)).save(data / "masks" / "img2.png")


def _wrong_mask_size(data):
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(data / "masks" / "img1.png")


def _no_classes_file(data):
    (data / "classes.txt").unlink()


# (id, mutation, exit code, message regex)
BAD_CONFIGS = [
    ("toml-syntax", edit("[mask]", "[mask"), 2, r"TOML syntax error in .*tiny.toml.*line \d+"),
    (
        "unknown-key",
        edit("n_keep = 2000", "n_kep = 2000"),
        2,
        r"tiny.toml: unknown key 'mask.n_kep'; did you mean 'mask.n_keep'\?",
    ),
    (
        "unknown-section",
        append("[scoer]\nblock_size = 4"),
        2,
        r"tiny.toml: unknown key 'scoer'; did you mean 'score'\?",
    ),
    (
        "wrong-type",
        edit("block_size = 64", 'block_size = "big"'),
        2,
        r"block_size' expects int or 'auto', got str 'big'",
    ),
    ("block-size-zero", edit("block_size = 64", "block_size = 0"), 2, r"score.block_size must be positive"),
    ("negative-heldout", edit("n_heldout = 500", "n_heldout = -1"), 2, r"mask.n_heldout must be >= 0"),
    ("keep-too-large", edit("n_keep = 2000", "n_keep = 2000000"), 2, r"n_keep=2000000 .* more than the 3072 patches"),
    ("bad-data-kind", edit('kind = "synthetic"', 'kind = "synthetik"'), 2, r"did you mean 'synthetic'"),
    ("unknown-model", edit('model = "saev-tiny-vit"', 'model = "ViT-Q-99"'), 2, r"unknown open_clip model 'ViT-Q-99'"),
    (
        "layer-out-of-range",
        edit("layers = [-2, -1]", "layers = [-2, 9]"),
        2,
        r"layer 9 is out of range for saev-tiny-vit",
    ),
    (
        "shard-budget-below-one-image",
        edit("max_patches_per_shard = 1024", "max_patches_per_shard = 10"),
        2,
        r"max_patches_per_shard=10 is smaller than one image",
    ),
    ("train-layer-not-dumped", edit("layer = -1", "layer = 1"), 2, r"train.layer=1 .* not among the dumped layers"),
    (
        "sweep-missing",
        edit('sweep = "tiny-sweep.toml"', 'sweep = "/nonexistent/sweep.toml"'),
        2,
        r"sweep file not found: /nonexistent/sweep.toml",
    ),
    (
        "sweep-unknown-key",
        edit("lr = 3e-3", "learning_rate = 3e-3", "tiny-sweep.toml"),
        2,
        r"tiny-sweep.toml: .*unknown key 'learning_rate'",
    ),
    ("sweep-wrong-type", edit("lr = 3e-3", 'lr = "fast"', "tiny-sweep.toml"), 2, r"tiny-sweep.toml: .*'lr'.*str"),
    ("missing-dataset-dir", folder(lambda d: shutil.rmtree(d)), 2, r"dataset directory not found: .*data"),
    ("no-classes-file", folder(_no_classes_file), 2, r"class-names file not found: .*classes.txt"),
    ("empty-dataset", folder(_empty_images), 2, r"no images .* in .*images"),
    ("image-without-mask", folder(_drop_mask), 2, r"1 image\(s\) have no mask; expected e.g. .*img3.png"),
    ("mask-class-out-of-range", folder(_bad_class_id), 1, r"mask .*img2.png has class id 7, outside the 3 classes"),
    ("mask-size-mismatch", folder(_wrong_mask_size), 1, r"mask .*img1.png is 10x10 but image .*img1.png is 48x40"),
]


@pytest.mark.parametrize("mutate,code,message", [row[1:] for row in BAD_CONFIGS], ids=[row[0] for row in BAD_CONFIGS])
def test_bad_config_is_refused_with_a_clear_message(tiny_config, capsys, mutate, code, message):
    mutate(tiny_config)
    assert run(tiny_config) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert "Traceback" not in err
    assert manifests(tiny_config.parent / "runs") == set()
    if code == 2:  # config errors are found before anything runs
        assert not (tiny_config.parent / "runs").exists()


def test_class_without_patches_is_reported_not_a_crash(tiny_config, capsys):
    folder(classes=("background", "fish", "fin", "never-seen"))(tiny_config)
    assert run(tiny_config) == 0
    best_fpath = next((tiny_config.parent / "runs").glob("reduce/*/best.json"))
    rows = {row["name"]: row for row in json.loads(best_fpath.read_text())["classes"]}
    assert rows["never-seen"]["ap"] is None and rows["never-seen"]["prototype"] == -1
    assert rows["never-seen"]["n_patches"] == 0
    assert rows["fish"]["ap"] is not None and not math.isnan(rows["fish"]["ap"])


def _truncate_shard(root):
    fpath = next(root.glob("dump/*/acts000000.bin"))
    with open(fpath, "r+b") as fd:
        fd.truncate(1000)
    return "acts000000.bin has 1000 bytes"


def _delete_shard(root):
    next(root.glob("dump/*/acts000001.bin")).unlink()
    return "acts000001.bin is missing"


def _nan_activations(root):
    fpath = next(root.glob("dump/*/acts000000.bin"))
    acts = np.memmap(fpath, dtype=np.float32, mode="r+")
    acts[5000] = np.nan  # same size, so only the values are wrong
    acts.flush()
    return "acts000000.bin does not match its checksum"  # caught before the values are used


def _delete_sae(root):
    next(root.glob("train/*/sae.safetensors")).unlink()
    return "sae.safetensors is missing"


BAD_ARTIFACTS = [
    ("truncated-shard", _truncate_shard, "train"),
    ("missing-shard", _delete_shard, "mask"),
    ("nan-activations", _nan_activations, "train"),
    ("missing-sae-weights", _delete_sae, "score"),
]


@pytest.mark.parametrize("corrupt,rerun", [r[1:] for r in BAD_ARTIFACTS], ids=[r[0] for r in BAD_ARTIFACTS])
def test_corrupt_inputs_are_refused_and_nothing_is_marked_done(copy_of_done, capsys, corrupt, rerun):
    root = copy_of_done.parent / "runs"
    message = corrupt(root)
    for dpath in root.glob(f"{rerun}/*"):  # so that the stage runs again, reading the corrupt input
        shutil.rmtree(dpath)
    before = manifests(root)
    assert run(copy_of_done, stage=rerun) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert manifests(root) <= before


def _duplicate_class(data):
    (data / "classes.txt").write_text("background\nfish\nfish\n")


def _latin1_classes(data):
    (data / "classes.txt").write_bytes("background\nfish\nfin d\u00e9\n".encode("latin-1"))


def _not_an_image(data):
    (data / "images" / "img5.png").write_text("not an image")


def _float_image(data):
    Image.fromarray(np.zeros((40, 48), np.float32)).save(data / "images" / "img4.png", format="TIFF")


def folder_with(line: str):
    """A folder dataset whose [dump.data] table has one more line."""

    def mutate(cfg: pathlib.Path) -> None:
        folder()(cfg)
        cfg.write_text(cfg.read_text().replace('kind = "segfolder"\n', f'kind = "segfolder"\n{line}\n', 1))

    return mutate


# Image files and class-names files (same columns as BAD_CONFIGS).
BAD_DATA_FILES = [
    ("classes-duplicate", folder(_duplicate_class), 2, r"classes.txt names class 'fish' twice: lines 2 and 3"),
    ("classes-not-utf8", folder(_latin1_classes), 2, r"classes.txt is not UTF-8: byte 21 \(line 3\)"),
    ("corrupt-image", folder(_not_an_image), 1, r"cannot read image .*img5.png: UnidentifiedImageError"),
    ("float-image", folder(_float_image), 1, r"image .*img4.png has mode F \(floating-point pixels\)"),
    (
        "image-over-pixel-limit",
        folder_with("max_image_pixels = 100"),
        1,
        r"image .*img\d+.png is 48x40 = 1,920 pixels, over the limit of 100",
    ),
    ("max-image-pixels-zero", folder_with("max_image_pixels = 0"), 2, r"max_image_pixels must be positive, got 0"),
]


@pytest.mark.parametrize("mutate,code,message", [r[1:] for r in BAD_DATA_FILES], ids=[r[0] for r in BAD_DATA_FILES])
def test_bad_data_file_is_refused_with_a_clear_message(tiny_config, capsys, mutate, code, message):
    test_bad_config_is_refused_with_a_clear_message(tiny_config, capsys, mutate, code, message)
