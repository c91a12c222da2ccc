"""The protocol's table (reduce's table.csv/json) recomputed independently from the artifacts a run wrote: the
probes in the score partials, the chosen latents in best.json, the report split's activations and labels."""

import csv
import json
import math

import numpy as np
import pytest
import safetensors
import torch
from sklearn.metrics import average_precision_score

from saev import best, methods, scoring
from saev.data.shards import Shards
from stages import pipeline as pl
from tests.helpers import launch, run, write_tiny_config
from tests.stages.test_roles import roles_config

METHODS = """n_train = 8192
batch_size = 512
n_eval = 256

[method]
kind = ["kmeans", "pca"]
k = 8
"""


@pytest.fixture(scope="module", params=["ap", "probe"])
def done(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"table-{request.param}")
    cfg = roles_config(tmp, layers="[2, 3]")
    (tmp / "methods.toml").write_text(METHODS)
    text = cfg.read_text().replace('sweep = "tiny-sweep.toml"', 'sweep = "tiny-sweep.toml"\nmethods = "methods.toml"')
    cfg.write_text(text.replace("[reduce]\n", f'[reduce]\nselect = "{request.param}"\n'))
    proc = launch(cfg, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the table (report patches" in proc.stdout
    return request.param, cfg


def entropy(p):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def test_every_figure_of_the_table_equals_an_independent_computation(done):
    select, cfg = done
    plan = pl.make_plan(pl.load(cfg))
    reduce_dpath = plan["reduce"].artifacts[0].dpath
    result = best.read(reduce_dpath / "best.json")
    rows = best.read_table(reduce_dpath / "table.json")
    with open(reduce_dpath / "table.csv") as fd:
        assert [r["sae"] for r in csv.DictReader(fd)] == [r.sae for r in rows]
    assert len(rows) == len(plan["train"].artifacts)
    report_art = next(a for a in plan["dump"].artifacts if plan["dump"].info[a.key].roles == ("report",))
    shards = Shards(report_art.dpath)
    flat = np.asarray(shards.labels).reshape(-1)
    idx = np.flatnonzero(flat != shards.metadata.labels_ignore)
    labels = flat[idx].astype(np.int64)
    n_classes = len(shards.metadata.class_names)
    counts_C = np.array([row.n_patches for row in result.classes])
    train_h = entropy(counts_C / counts_C.sum())
    report_h = entropy(np.bincount(labels, minlength=n_classes) / len(labels))
    for row in rows:
        info = plan["train"].info[row.sae]
        score_art = next(a for a in plan["score"].artifacts if plan["score"].info[a.key].train_key == row.sae)
        sinfo = plan["score"].info[score_art.key]
        partials = scoring.read_partials(score_art, sinfo.d_sae, sinfo.block_size, row.sae, counts_C)
        ks = [entry.prototype for entry in result.per_sae[row.sae].classes]
        for c, k in enumerate(ks):  # the rule of `select`, applied to the partials
            want = np.argmin(partials.loss_CK[c]) if select == "probe" else np.nanargmax(partials.ap_CK[c])
            assert k == want or partials.ap_CK[c, k] == partials.ap_CK[c, want]
        encoder = methods.load_encoder(plan["train"].by_key(row.sae).dpath)
        with torch.inference_mode():
            acts = torch.from_numpy(shards.patches_flat(info.layer, idx))
            z_NC = np.stack([encoder.encode_block(acts, k, k + 1)[:, 0].numpy() for k in ks], axis=1).astype(np.float64)
        w_C = np.array([partials.w_CK[c, k] for c, k in enumerate(ks)])
        b_C = np.array([partials.b_CK[c, k] for c, k in enumerate(ks)])
        logit_NC = w_C * z_NC + b_C
        y_NC = labels[:, None] == np.arange(n_classes)
        ce_C = np.mean(np.logaddexp(0, logit_NC) - y_NC * logit_NC, axis=0)  # mean BCE, stable
        assert row.probe_r == pytest.approx(1 - ce_C.mean() / report_h.mean(), rel=1e-6)
        ap_C = np.array(
            [average_precision_score(y_NC[:, c], np.sign(w_C[c]) * z_NC[:, c]) if y_NC[:, c].any() else 0.0
             for c in range(n_classes)]
        )  # fmt: skip
        assert row.map == pytest.approx(ap_C.mean(), rel=1e-9)
        assert row.coverage == pytest.approx((ap_C > 0.3).mean())
        purity = []
        for c in range(n_classes):
            order = np.argsort(-z_NC[:, c], kind="stable")[:16]
            top = order[z_NC[order, c] != 0]
            purity.append(np.bincount(labels[top]).max() / 16 if len(top) else 0.0)
        assert row.purity == pytest.approx(np.mean(purity), rel=1e-9)
        train_ce = np.array([partials.loss_CK[c, k] for c, k in enumerate(ks)])
        assert row.train_probe_r == pytest.approx(1 - train_ce.mean() / train_h.mean(), rel=1e-9)
        metrics = json.loads((plan["train"].by_key(row.sae).dpath / "metrics.json").read_text())
        assert (row.l0, row.nmse) == (metrics["l0"], metrics["nmse"])
        assert row.map_lo <= row.map <= row.map_hi and row.probe_r_lo <= row.probe_r <= row.probe_r_hi
        assert 0 < row.map_p <= 1 and not math.isnan(row.map_null)
    for method in {row.method for row in rows}:
        mine = [row for row in rows if row.method == method]
        assert [row.best for row in mine].count(True) == 1
        assert next(row for row in mine if row.best).train_probe_r == max(row.train_probe_r for row in mine)
    assert {row.method for row in rows} == {"relu_l1", "kmeans", "pca"}
    page = (reduce_dpath / "report" / "index.html").read_text()
    assert 'id="protocol-table"' in page and page.index('id="protocol-table"') < page.index('id="summary"')
    assert '<img src="layers.png"' in page and (reduce_dpath / "report" / "layers.png").stat().st_size > 1000


def test_bootstrap_intervals_are_reproducible_from_the_seed(done):
    _, cfg = done
    plan = pl.make_plan(pl.load(cfg))
    first = (plan["reduce"].artifacts[0].dpath / "table.json").read_bytes()
    for fpath in plan["reduce"].artifacts[0].dpath.glob("*"):
        if fpath.is_file():
            fpath.unlink()
    proc = launch(cfg, "--stage", "reduce", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (plan["reduce"].artifacts[0].dpath / "table.json").read_bytes() == first


def test_without_probes_blocks_score_ap_only_and_select_probe_is_refused(tmp_path):
    cfg = write_tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[score]\n", "[score]\nprobes = false\n"))
    assert run(cfg) == 0
    plan = pl.make_plan(pl.load(cfg))
    for fpath in plan["score"].artifacts[0].dpath.glob("partials/*.safetensors"):
        with safetensors.safe_open(str(fpath), framework="numpy") as fd:
            assert sorted(fd.keys()) == ["ap_CK", "k_range", "max_K", "min_K"]
    assert best.read_table(plan["reduce"].artifacts[0].dpath / "table.json") == []
    cfg.write_text(cfg.read_text().replace("[reduce]\n", '[reduce]\nselect = "probe"\n'))
    proc = launch(cfg, "--dry-run")
    assert proc.returncode == 2 and 'select = "probe"' in proc.stderr and "probes = false" in proc.stderr, proc.stderr
