"""The shipped example configs plan as documented, with their cluster paths swapped for tiny local stand-ins."""

import re
import shutil

import numpy as np
from PIL import Image

from stages import pipeline as pl
from tests.helpers import REPO, launch, make_folder_dataset


def test_ade20k_dinov3_plans_the_protocol_with_local_stand_ins(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for synset in ("n01", "n02"):
            (tmp_path / "imagenet" / split / synset).mkdir(parents=True)
            for i in range(2):
                image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / "imagenet" / split / synset / f"{i}.JPEG")
    for split in ("train", "val"):
        make_folder_dataset(tmp_path / "ade20k" / split, n_imgs=3, classes=("other", "wall", "floor"))
    (tmp_path / "sweeps").mkdir()
    shutil.copy(REPO / "configs" / "sweeps" / "ade20k-dinov3.toml", tmp_path / "sweeps")
    text = (REPO / "configs" / "ade20k-dinov3.toml").read_text()
    text = text.replace("/fs/ess/PAS1234/datasets", str(tmp_path)).replace("/fs/scratch/PAS1234", str(tmp_path))
    text = re.sub(r'pretrained = "[^"]*"', 'pretrained = ""', text)  # random weights: no file to read
    cfg = tmp_path / "ade20k.toml"
    cfg.write_text(text)

    proc = launch(cfg, "--dry-run", "--executor", "local", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = pl.make_plan(pl.load(cfg))
    roles = sorted(plan["dump"].info[art.key].roles for art in plan["dump"].artifacts)
    assert roles == [("corpus",), ("corpus_eval",), ("report",), ("select",)]
    (record,) = {plan["dump"].info[art.key].layers for art in plan["dump"].artifacts}
    assert record == (13, 15, 17, 19, 21, 23)
    assert {plan["dump"].info[art.key].d_vit for art in plan["dump"].artifacts} == {1024}
    layers = [plan["train"].info[art.key].layer for art in plan["train"].artifacts]
    assert sorted(set(layers)) == [13, 15, 17, 19, 21, 23] and len(layers) == 6 * 21
    assert {plan["train"].info[art.key].d_sae for art in plan["train"].artifacts} == {16384}
    assert not (tmp_path / "saev-runs").exists()  # a dry run writes nothing
