"""Datasets by role ([data.corpus], [data.select], [data.report], [data.corpus_eval]) and layer sweeps: which dump
each stage reads, dumps shared by key, the report split's figures, and the refusals before anything runs."""

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from saev import best, nn, training
from saev.data.shards import Shards
from stages import pipeline as pl
from stages import train as train_stage
from tests.helpers import launch, make_folder_dataset, run, write_tiny_config

ROLES_TEXT = """
[data.corpus]
kind = "synthetic"
n_imgs = 48
img_size = 64
seed = 1
labelled = false

[data.select]
kind = "synthetic"
n_imgs = 32
img_size = 64
seed = 2

[data.report]
kind = "synthetic"
n_imgs = 24
img_size = 64
seed = 3
"""


def roles_config(tmp_path: pathlib.Path, extra: str = ROLES_TEXT, *, layers: str | None = None) -> pathlib.Path:
    """The tiny config with its one dataset replaced by `extra` (roles), and nothing held out of the select split."""
    cfg = write_tiny_config(tmp_path)
    text = cfg.read_text()
    start, end = text.index("[dump.data]"), text.index("[dump.vit]")
    text = text[:start] + text[end:] + extra
    text = text.replace("n_keep = 2000\nn_heldout = 500", 'n_keep = "all"')
    if layers is not None:
        text = text.replace("layer = -1", f"layers = {layers}")
    cfg.write_text(text)
    return cfg


def dump_roles(plan) -> dict[str, tuple[str, ...]]:
    return {art.key: plan["dump"].info[art.key].roles for art in plan["dump"].artifacts}


def test_one_dataset_is_every_role_and_holds_out_patches_to_report(tmp_path):
    plan = pl.make_plan(pl.load(write_tiny_config(tmp_path)))
    ((key, roles),) = dump_roles(plan).items()
    assert roles == ("corpus", "select", "report")
    (reduce_art,) = plan["reduce"].artifacts
    refs = plan["reduce"].inputs[reduce_art.key]
    assert "report" not in refs and refs["dump"] == f"dump/{key}"


def test_roles_are_three_dumps_each_read_by_the_stages_of_its_role(tmp_path):
    plan = pl.make_plan(pl.load(roles_config(tmp_path)))
    by_role = {role: key for key, roles in dump_roles(plan).items() for role in roles}
    assert sorted(by_role) == ["corpus", "report", "select"] and len(set(by_role.values())) == 3
    for art in plan["train"].artifacts:
        assert plan["train"].inputs[art.key] == {"dump": f"dump/{by_role['corpus']}"}
    (mask_art,) = plan["mask"].artifacts
    assert plan["mask"].inputs[mask_art.key]["dump"] == f"dump/{by_role['select']}"
    for stage in ("kept", "score"):
        for art in plan[stage].artifacts:
            assert plan[stage].inputs[art.key]["dump"] == f"dump/{by_role['select']}"
    (reduce_art,) = plan["reduce"].artifacts
    refs = plan["reduce"].inputs[reduce_art.key]
    assert refs["dump"] == f"dump/{by_role['select']}" and refs["report"] == f"dump/{by_role['report']}"


def test_corpus_eval_is_an_input_of_every_sae_only_when_given(tmp_path):
    extra = ROLES_TEXT + '\n[data.corpus_eval]\nkind = "synthetic"\nn_imgs = 16\nimg_size = 64\nseed = 4\n'
    without = pl.make_plan(pl.load(roles_config(tmp_path)))
    (tmp_path / "b").mkdir()
    plan = pl.make_plan(pl.load(roles_config(tmp_path / "b", extra)))
    eval_key = next(key for key, roles in dump_roles(plan).items() if roles == ("corpus_eval",))
    for art in plan["train"].artifacts:
        assert plan["train"].inputs[art.key]["corpus_eval"] == f"dump/{eval_key}"
    # The metrics come from elsewhere: new SAE keys; the dumps of the other roles are the same.
    assert {a.key for a in plan["train"].artifacts}.isdisjoint(a.key for a in without["train"].artifacts)
    assert set(dump_roles(without)) < set(dump_roles(plan))


def test_a_dataset_is_one_dump_shared_by_key_between_configs_and_roles(tmp_path):
    (tmp_path / "one").mkdir()
    one = write_tiny_config(tmp_path / "one")  # [dump.data]: synthetic seed 1, 48 images: the roles' corpus, labelled
    one.write_text(one.read_text().replace("seed = 1\n", "seed = 1\nlabelled = false\n", 1))
    (tmp_path / "roles").mkdir()
    roles = roles_config(tmp_path / "roles")
    one_key = next(iter(dump_roles(pl.make_plan(pl.load(one)))))
    plan = pl.make_plan(pl.load(roles))
    corpus_key = next(key for key, r in dump_roles(plan).items() if "corpus" in r)
    assert corpus_key == one_key
    # The corpus also used as the select split is one dump playing both roles.
    (tmp_path / "shared").mkdir()
    text = ROLES_TEXT.replace("labelled = false\n", "").replace(
        "n_imgs = 32\nimg_size = 64\nseed = 2", "n_imgs = 48\nimg_size = 64\nseed = 1"
    )
    shared = pl.make_plan(pl.load(roles_config(tmp_path / "shared", text)))
    assert sorted(dump_roles(shared).values()) == [("corpus", "select"), ("report",)]


@pytest.fixture(scope="module")
def roles_done(tmp_path_factory) -> pathlib.Path:
    """A roles config with an unlabelled image-folder corpus, folder select and report splits, two layers: run."""
    tmp = tmp_path_factory.mktemp("roles")
    corpus = tmp / "corpus"
    rng = np.random.default_rng(0)
    for sub in ("a", "b/c"):
        (corpus / sub).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(corpus / sub / f"{i}.png")
    select = make_folder_dataset(tmp / "select", n_imgs=24)
    report = make_folder_dataset(tmp / "report", n_imgs=12)
    extra = (
        f'\n[data.corpus]\nkind = "imagefolder"\nroot = "{corpus}"\n'
        f'\n[data.select]\nkind = "segfolder"\nroot = "{select}"\n'
        f'\n[data.report]\nkind = "segfolder"\nroot = "{report}"\n'
    )
    cfg = roles_config(tmp, extra, layers="[-2, -1]")
    proc = launch(cfg, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "report AP by layer" in proc.stdout
    return cfg


def test_unlabelled_corpus_trains_and_the_sweep_runs_on_every_layer(roles_done):
    plan = pl.make_plan(pl.load(roles_done))
    corpus_art = next(a for a in plan["dump"].artifacts if "corpus" in plan["dump"].info[a.key].roles)
    shards = Shards(corpus_art.dpath)
    assert shards.metadata.class_names == () and shards.metadata.n_imgs == 24
    assert (np.asarray(shards.labels) == shards.metadata.labels_ignore).all()
    layers = [plan["train"].info[a.key].layer for a in plan["train"].artifacts]
    assert sorted(set(layers)) == [2, 3] and layers.count(2) == layers.count(3) == 2
    result = best.read(plan["reduce"].artifacts[0].dpath / "best.json")
    assert [entry.layer for entry in result.layers] == [2, 3]
    assert {entry.layer for entry in result.per_sae.values()} == {2, 3}
    page = (plan["reduce"].artifacts[0].dpath / "report" / "index.html").read_text()
    assert 'id="layer-table"' in page and "<th>layer 2</th><th>layer 3</th>" in page
    for c, row in enumerate(result.classes):  # the best over layers is the best of the layers' bests, by select AP
        layer_rows = [entry.classes[c] for entry in result.layers]
        assert row.ap == max(r.ap for r in layer_rows if r.ap is not None)
        assert row.layer == next(entry.layer for entry in result.layers if entry.classes[c].ap == row.ap)


def test_reported_ap_is_scikit_learns_on_the_report_split(roles_done):
    plan = pl.make_plan(pl.load(roles_done))
    result = best.read(plan["reduce"].artifacts[0].dpath / "best.json")
    report_art = next(a for a in plan["dump"].artifacts if plan["dump"].info[a.key].roles == ("report",))
    assert result.report_dump == report_art.key
    shards = Shards(report_art.dpath)
    labels = np.asarray(shards.labels).reshape(-1)
    idx = np.flatnonzero(labels != shards.metadata.labels_ignore)
    assert result.n_heldout == len(idx)
    checked = 0
    for entries in [result.classes, *(entry.classes for entry in result.layers)]:
        for c, row in enumerate(entries):
            if row.sae is None or not (labels[idx] == c).any():
                continue
            sae = nn.load(plan["train"].by_key(row.sae).dpath)
            with torch.inference_mode():
                acts = torch.from_numpy(shards.patches_flat(row.layer, idx))
                scores = sae.encode(acts, latents=torch.tensor([row.prototype]))[:, 0].numpy()
            want = average_precision_score(labels[idx] == c, scores)
            assert row.heldout_ap == pytest.approx(want, rel=1e-12)
            assert row.heldout_n_patches == int((labels[idx] == c).sum())
            checked += 1
    assert checked >= 4


def test_corpus_eval_rows_measure_the_metrics(tmp_path):
    extra = ROLES_TEXT + '\n[data.corpus_eval]\nkind = "synthetic"\nn_imgs = 16\nimg_size = 64\nseed = 4\n'
    cfg = roles_config(tmp_path, extra)
    assert run(cfg, stage="dump", only=True) == 0
    assert run(cfg, stage="train", only=True) == 0
    plan = pl.make_plan(pl.load(cfg))
    eval_art = next(a for a in plan["dump"].artifacts if plan["dump"].info[a.key].roles == ("corpus_eval",))
    for art in plan["train"].artifacts:
        info = plan["train"].info[art.key]
        rows = train_stage.read_eval_rows(eval_art, info.layer, info.config.n_eval)
        assert len(rows) == min(info.config.n_eval, 16 * 64)
        want = training.get_metrics(nn.load(art.dpath), rows, n_steps=info.config.n_steps)
        got = (art.dpath / "metrics.json").read_text()
        assert best_metrics(got) == pytest.approx(vars(want), rel=1e-12)


def best_metrics(text: str) -> dict:
    import json

    return json.loads(text)


BAD_ROLES = {
    "role-missing": (
        ROLES_TEXT[: ROLES_TEXT.index("[data.report]")],
        "missing required key(s): 'data.report",
    ),
    "dataset-twice": (
        ROLES_TEXT + '\n[dump.data]\nkind = "synthetic"\n',
        "[dump.data] and [data.*] roles both name datasets",
    ),
    "select-is-report": (
        ROLES_TEXT.replace("n_imgs = 24\nimg_size = 64\nseed = 3", "n_imgs = 32\nimg_size = 64\nseed = 2"),
        "data.select and data.report are the same dataset",
    ),
    "report-unlabelled": (
        ROLES_TEXT.replace("seed = 3\n", "seed = 3\nlabelled = false\n"),
        "data.report (synthetic shapes (24 images, seed 3)) has no labels",
    ),
    "unknown-role": (ROLES_TEXT + '\n[data.train]\nkind = "synthetic"\n', "data.train"),
}


@pytest.mark.parametrize("name", list(BAD_ROLES))
def test_bad_roles_are_refused_with_one_line_before_anything_runs(tmp_path, name):
    extra, message = BAD_ROLES[name]
    cfg = roles_config(tmp_path, extra)
    proc = launch(cfg, "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_select_and_report_with_other_classes_are_refused(tmp_path):
    select = make_folder_dataset(tmp_path / "select", n_imgs=4)
    report = make_folder_dataset(tmp_path / "report", n_imgs=4, classes=("background", "fin", "fish"))
    extra = ROLES_TEXT[: ROLES_TEXT.index("[data.select]")] + (
        f'[data.select]\nkind = "segfolder"\nroot = "{select}"\n\n[data.report]\nkind = "segfolder"\nroot = "{report}"\n'
    )
    proc = launch(roles_config(tmp_path, extra), "--dry-run")
    assert proc.returncode == 2
    assert "class 1 is 'fish' in select, 'fin' in report" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('n_keep = "all"', 'n_keep = "all"\nn_heldout = 10'), "mask.n_heldout = 10"),
        (lambda t: t.replace("layers = [2, 3]", "layers = [1, 3]"), "train.layers=1 (block 1) is not among the dumped"),
        (
            lambda t: t.replace("layers = [2, 3]", "layer = 3\nlayers = [2, 3]"),
            "train.layer (one layer) or train.layers",
        ),
        (
            lambda t: t[: t.index("[dump]")] + '[dump.adopt]\nshards = "elsewhere"\n\n' + t[t.index("[train]") :],
            "[data.*] roles and [dump.adopt] cannot be combined",
        ),
    ],
    ids=["heldout-with-report", "layer-not-dumped", "layer-and-layers", "adopt-with-roles"],
)
def test_role_settings_that_cannot_hold_are_refused(tmp_path, edit, message):
    cfg = roles_config(tmp_path, layers="[2, 3]")
    cfg.write_text(edit(cfg.read_text()))
    proc = launch(cfg, "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr


def test_an_unlabelled_one_dataset_config_trains_but_cannot_be_scored(tmp_path):
    cfg = write_tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("seed = 1\n", "seed = 1\nlabelled = false\n", 1))
    proc = launch(cfg, "--dry-run")
    assert proc.returncode == 2 and "has no labels" in proc.stderr and "--stage train --only" in proc.stderr
    assert launch(cfg, "--dry-run", "--stage", "train", "--only").returncode == 0
