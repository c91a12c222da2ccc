"""saev.results: a finished run read back as a notebook would, and the README's example run as a script (in this
process, and outside the repository in a fresh environment that installs the clone)."""

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from saev import keepmask, nn, scoring
from stages import pipeline, results
from tests.helpers import REPO as REPO_DPATH

EXAMPLE_MARKER = "<!-- notebook example:"


def readme_example() -> str:
    """The code block of README.md that follows the notebook-example marker."""
    text = (REPO_DPATH / "README.md").read_text()
    match = re.search(re.escape(EXAMPLE_MARKER) + r".*?-->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md has no ```python block after {EXAMPLE_MARKER!r}"
    return match.group(1)


def reduce_dpath(cfg: pathlib.Path) -> pathlib.Path:
    return pipeline.make_plan(pipeline.load(cfg))["reduce"].artifacts[0].dpath


def kept_scores(run: results.Results, proto: results.Prototype, idx: np.ndarray) -> np.ndarray:
    """The prototype's activation on the dump patches `idx`, computed here from the shards and the SAE."""
    acts = run.shards().patches_flat(proto.layer, idx)
    k = proto.latent
    return scoring.encode_block(proto.sae, acts, k, k + 1, batch_size=1024, device=torch.device("cpu"))[:, 0].numpy()


def test_a_config_and_its_reduce_directory_give_the_same_results(done_config):
    by_config = results.load(done_config)
    by_dpath = results.load(reduce_dpath(done_config))
    assert by_config == by_dpath


def test_results_hold_best_json_as_records_and_the_artifacts_of_the_plan(done_config):
    run = results.load(done_config)
    plan = pipeline.make_plan(pipeline.load(done_config))
    best = json.loads(run.best_fpath.read_text())
    rows = [{**row, "index": c, "sae_unhealthy": tuple(row["sae_unhealthy"])} for c, row in enumerate(best["classes"])]
    assert [dataclasses.asdict(row) for row in run.classes] == rows
    assert (run.n_patches, run.n_heldout) == (best["n_patches"], best["n_heldout"])
    assert run.reduce == plan["reduce"].artifacts[0]
    assert (run.dump, run.mask) == (plan["dump"].artifacts[0], plan["mask"].artifacts[0])
    assert run.saes == plan["train"].artifacts
    assert run.layers == {key: info.layer for key, info in plan["train"].info.items()}
    cfg = pipeline.load(done_config)
    assert (run.vit, run.data) == (cfg.dump.vit, cfg.dump.data)
    assert run.report_fpath.is_file()


def test_a_class_is_found_by_name_or_id_and_a_misspelt_one_is_named(done_config):
    run = results.load(done_config)
    assert run.get_class("circle") == run.get_class(1) == run.classes[1]
    with pytest.raises(KeyError, match="did you mean 'circle'"):
        run.get_class("circel")


def test_the_prototype_is_the_chosen_latent_of_the_chosen_sae(done_config):
    run = results.load(done_config)
    row = run.get_class("circle")
    proto = results.get_prototype(run, "circle")
    assert (proto.cls, proto.latent, proto.layer) == (row, row.prototype, run.layers[row.sae])
    saved = nn.load(run.reduce.root / "train" / row.sae)
    assert all(
        torch.equal(a, b) for a, b in zip(proto.sae.state_dict().values(), saved.state_dict().values(), strict=True)
    )


def test_activations_on_the_dump_images_are_the_activations_the_dump_holds(done_config, tmp_path):
    run = results.load(done_config)
    proto = results.get_prototype(run, "circle")
    dataset = run.dataset()
    images = [dataset[i].image for i in range(5)]
    got = results.activations(run, "circle", images, batch_size=2)
    md = run.shards().metadata
    idx = np.arange(5 * md.n_patches_per_img)
    side = int(md.n_patches_per_img**0.5)
    np.testing.assert_allclose(got, kept_scores(run, proto, idx).reshape(5, side, side), rtol=1e-5, atol=1e-5)
    # An image file gives what the same image does.
    images[0].save(tmp_path / "a.png")
    np.testing.assert_array_equal(results.activations(run, "circle", [tmp_path / "a.png"]), got[:1])


def test_top_patches_are_the_highest_kept_patches_highest_first(done_config):
    run = results.load(done_config)
    proto = results.get_prototype(run, "circle")
    shards = run.shards()
    keep = keepmask.load_keep(run.mask.dpath, shards)
    scores = kept_scores(run, proto, keep)
    top = results.top_patches(run, "circle", k=5)
    side = int(shards.metadata.n_patches_per_img**0.5)
    flat = [p.image * side * side + p.row * side + p.col for p in top]
    assert set(flat) <= set(keep.tolist())
    # float32 scores summed in another order: a few float32 ulps of the scores' magnitude apart at most.
    tol = {"rel": 1e-5, "abs": 1e-5 * float(np.abs(scores).max())}
    assert [p.activation for p in top] == pytest.approx(sorted(scores, reverse=True)[:5], **tol)
    assert [p.activation for p in top] == pytest.approx(kept_scores(run, proto, np.array(flat)).tolist(), **tol)
    labels = np.asarray(shards.labels).reshape(-1)
    assert [p.label for p in top] == [run.classes[labels[i]].name for i in flat]
    assert [p.name for p in top] == [f"synthetic-{p.image:06d}" for p in top]


def test_top_patches_of_the_held_out_and_of_all_patches(done_config):
    run = results.load(done_config)
    shards = run.shards()
    heldout = set(keepmask.load_heldout(run.mask.dpath, shards).tolist())
    side = int(shards.metadata.n_patches_per_img**0.5)
    top_heldout = results.top_patches(run, "circle", k=3, patches="heldout", names=False)
    assert {p.image * side * side + p.row * side + p.col for p in top_heldout} <= heldout
    assert all(p.name is None for p in top_heldout)
    top_all = results.top_patches(run, "circle", k=1, patches="all")[0]
    assert top_all.activation >= max(results.top_patches(run, "circle", k=1)[0].activation, top_heldout[0].activation)


def test_a_config_that_has_not_run_is_refused_naming_the_command(tiny_config):
    with pytest.raises(results.ResultsError, match=r"not done \(run `uv run launch.py --config"):
        results.load(tiny_config)


def test_the_readme_example_runs(done_config, monkeypatch):
    monkeypatch.setenv("SAEV_RESULTS", str(done_config))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # as a notebook cell would run it
        exec(compile(readme_example(), "README.md example", "exec"), {"__name__": "__main__"})
    assert re.search(r"synthetic-\d{6} patch \(\d, \d\): \d+\.\d{3} \[\w+\]", out.getvalue())


@pytest.mark.slow
def test_the_readme_example_runs_outside_the_repository_after_an_editable_install(done_config, tmp_path):
    """What a researcher does: install the clone into a fresh environment, then run the example from elsewhere."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    venv = tmp_path / "venv"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([uv, "venv", "--quiet", str(venv), "--python", version], check=True, env=env)
    python = venv / "bin" / "python"
    install = [uv, "pip", "install", "--quiet", "--python", str(python), "-e", str(REPO_DPATH)]
    subprocess.run(install, check=True, env=env)
    work = tmp_path / "notebook"
    work.mkdir()
    (work / "example.py").write_text(readme_example())
    proc = subprocess.run(
        [str(python), "example.py"],
        cwd=work,
        env={**env, "SAEV_RESULTS": str(done_config)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"synthetic-\d{6} patch \(\d, \d\): \d+\.\d{3} \[\w+\]", proc.stdout), proc.stdout
    # It imported the clone through the install, not through the working directory or PYTHONPATH.
    where = subprocess.run(
        [str(python), "-c", "import saev; print(saev.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip() == str(REPO_DPATH / "saev" / "__init__.py")
