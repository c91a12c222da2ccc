"""Baseline methods ([train] methods) through the pipeline: fit on the corpus per layer, scored like SAE latents,
reported by reduce; refusals before anything runs."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from saev import best, methods
from saev.data.shards import Shards
from stages import pipeline as pl
from tests.helpers import launch, run, write_tiny_config

METHODS = """n_train = 8192
batch_size = 512
n_eval = 256
seed = 0

[method]
kind = ["kmeans", "pca", "neurons"]
k = 8
"""


def methods_config(tmp_path, text: str = METHODS):
    cfg = write_tiny_config(tmp_path)
    (tmp_path / "methods.toml").write_text(text)
    cfg.write_text(
        cfg.read_text().replace('sweep = "tiny-sweep.toml"', 'sweep = "tiny-sweep.toml"\nmethods = "methods.toml"')
    )
    return cfg


def test_methods_are_fit_scored_and_reported_like_saes(tmp_path):
    cfg = methods_config(tmp_path)
    assert run(cfg) == 0
    plan = pl.make_plan(pl.load(cfg))
    kinds = {}
    for art in plan["train"].artifacts:
        info = plan["train"].info[art.key]
        if hasattr(info.config, "method"):
            kinds[info.config.method.kind] = (art, info)
    assert sorted(kinds) == ["kmeans", "neurons", "pca"]
    assert [kinds[k][1].d_sae for k in ("kmeans", "pca", "neurons")] == [8, 8, 64]
    result = best.read(plan["reduce"].artifacts[0].dpath / "best.json")
    (dump_art,) = plan["dump"].artifacts
    shards = Shards(dump_art.dpath)
    keep = np.load(plan["mask"].artifacts[0].dpath / "keep.npy")
    labels = np.asarray(shards.labels).reshape(-1)[keep]
    for kind, (art, info) in kinds.items():
        entry = result.per_sae[art.key]
        assert entry.config.startswith(kind) and entry.health == ()
        assert {"nmse", "l0", "dead_frac", "dense_frac"} <= set(entry.metrics)
        method = methods.load_encoder(art.dpath)
        acts = torch.from_numpy(shards.patches_flat(info.layer, keep))
        codes = method.encode_block(acts, 0, method.n_latents).numpy()
        for c, sae_class in enumerate(entry.classes):  # each latent's AP as scikit-learn computes it on its codes
            if sae_class.ap is None:
                continue
            want = max(average_precision_score(labels == c, codes[:, k]) for k in range(method.n_latents))
            assert sae_class.ap == pytest.approx(want, rel=1e-9), (kind, c)
    # k-means: one non-zero code per row, 1 / (1 + distance) at the nearest centre
    assert result.per_sae[kinds["kmeans"][0].key].metrics["l0"] == 1.0
    assert result.per_sae[kinds["neurons"][0].key].metrics["nmse"] == 0.0
    # --export writes the SAEs in saev's format; the baselines have none and are left out
    proc = launch(cfg, "--export", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = {p.parent.name for p in (tmp_path / "out" / "saev" / "saes").glob("*/sae.pt")}
    saes = {a.key for a in plan["train"].artifacts if not hasattr(plan["train"].info[a.key].config, "method")}
    assert exported == saes and len(saes) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            METHODS.replace('kind = ["kmeans", "pca", "neurons"]\nk = 8', 'kind = "kmeans"\nk = 100000'),
            "kmeans with 100000 latents",
        ),
        (
            METHODS.replace('kind = ["kmeans", "pca", "neurons"]\nk = 8', 'kind = "pca"\nk = 65'),
            "pca k=65 components is above the activation width 64",
        ),
        (METHODS.replace("k = 8", "k = 8\ntop_n = 2").replace('"kmeans", "pca", "neurons"', '"kmeans"'), "not read by"),
    ],
    ids=["kmeans-k-above-corpus", "pca-above-width", "option-not-read"],
)
def test_method_settings_that_cannot_hold_are_refused_before_anything_runs(tmp_path, text, message):
    proc = launch(methods_config(tmp_path, text), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
