"""The whole graph on a tiny config: keys, skipping, targeted recomputation, input checks, results."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from saev import artifacts, vit
from saev.data import datasets
from stages import dump as dump_stage
from stages import pipeline as pl
from tests.helpers import REPO, run


def snapshot(root) -> dict[str, int]:
    """Relative path -> mtime_ns of every file under the artifact root."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_whole_graph_writes_every_stage_and_results(done_config):
    pipeline = pl.load(done_config)
    plan = pl.make_plan(pipeline)
    assert all(plan[name].state() == "done" for name in pl.STAGES)
    for name in pl.STAGES:
        for art in plan[name].artifacts:
            art.verify()
    best = json.loads((plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    sae_keys = {art.key for art in plan["train"].artifacts}
    names = [row["name"] for row in best["classes"]]
    assert names[0] == "background" and len(names) == len(set(names)) > 2
    assert set(best["per_sae"]) == sae_keys
    assert best["n_heldout"] == 500
    for row in best["classes"]:
        assert set(row) >= {"name", "prevalence", "ap", "prototype", "sae", "heldout_ap", "dead"}
        if row["ap"] is not None:
            assert row["sae"] in sae_keys and 0 <= row["prototype"]
            assert row["ap"] >= row["prevalence"] - 1e-12  # the best latent is at least as good as chance
    report_dpath = plan["reduce"].artifacts[0].dpath / "report"
    html = (report_dpath / "index.html").read_text()
    for c, row in enumerate(best["classes"]):
        assert row["name"] in html
        if row["ap"] is not None:  # a grid of top-activating images per class with a chosen latent
            assert (report_dpath / f"class{c:04d}-top00.png").is_file()
    csv_lines = (plan["reduce"].artifacts[0].dpath / "best.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,") and len(csv_lines) == len(names) + 1


def test_second_run_does_nothing(copy_of_done, capsys):
    root = copy_of_done.parent / "runs"
    before = snapshot(root)
    assert run(copy_of_done) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: done, skipping" in out for name in pl.STAGES)
    assert snapshot(root) == before


def test_every_stage_module_provides_the_stage_protocol():
    """NAME, VERSION, Config, Inputs, plan, run, and each optional hook declared (None when the stage has none)."""
    from saev.engine.plan import StageModule

    for name in pl.STAGES:
        module = pl.REGISTRY[name]
        assert isinstance(module, StageModule) and module.NAME == name
        for hook in ("check", "finalize", "manifest_extra", "slurm_resources", "explain_key"):
            assert getattr(module, hook) is None or callable(getattr(module, hook))
    assert pl.REGISTRY["dump"].finalize is not None and pl.REGISTRY["reduce"].finalize is None


def test_a_registry_refuses_a_module_missing_a_member_or_reading_a_later_stage():
    import types

    from saev.engine.plan import Registry
    from stages import kept, mask

    partial = types.ModuleType("stages.broken")
    partial.NAME = "broken"
    with pytest.raises(TypeError, match="broken does not provide what `StageModule` declares: .*'VERSION'"):
        Registry([partial])
    with pytest.raises(TypeError, match=r"stage 'mask' reads \['dump'\], which are not stages before it"):
        Registry([mask, kept])


def test_every_stage_reads_upstream_plans_it_declares_and_refs_only_their_artifacts(done_config):
    """Each artifact's input refs name artifacts of the stages its module declares in `Inputs` (no hidden input)."""
    plan = pl.make_plan(pl.load(done_config))
    for name in pl.STAGES:
        declared = set(pl.REGISTRY[name].Inputs._fields)
        planned = {art.ref for upstream in declared for art in plan[upstream].artifacts}
        for refs in plan[name].inputs.values():
            assert set(refs.values()) <= planned, name


def test_the_reduce_declares_every_artifact_it_reads(done_config):
    plan = pl.make_plan(pl.load(done_config))
    refs = set(plan["reduce"].inputs[plan["reduce"].artifact.key].values())
    for name in ("dump", "mask", "train", "score"):
        assert {art.ref for art in plan[name].artifacts} <= refs, name


ENGINE_MODULES = ("saev.engine", "saev.engine.plan", "saev.engine.store", "saev.engine.job", "saev.engine.executors")


def test_the_engine_imports_no_stage_and_no_launcher():
    """The engine knows no stage: importing every engine module in a fresh interpreter loads no `stages` module."""
    script = (
        "import sys, importlib;"
        f"[importlib.import_module(m) for m in {ENGINE_MODULES!r}];"
        "print(sorted(m for m in sys.modules if m == 'launch' or m == 'stages' or m.startswith('stages.')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def keys(config) -> dict[str, set[str]]:
    plan = pl.make_plan(pl.load(config))
    return {name: {a.key for a in plan[name].artifacts} for name in pl.STAGES}


def test_changing_l1_recomputes_only_downstream(copy_of_done):
    before = keys(copy_of_done)
    sweep = copy_of_done.parent / "tiny-sweep.toml"
    text = sweep.read_text()
    assert "l1_coeff = [" in text
    sweep.write_text(text.replace("l1_coeff = [", "l1_coeff = [0.05, ", 1))
    after = keys(copy_of_done)
    assert after["dump"] == before["dump"] and after["mask"] == before["mask"]
    assert before["train"] < after["train"]  # the old SAEs keep their keys; one new SAE
    assert len(after["score"] - before["score"]) == 1
    assert after["reduce"] != before["reduce"]


def test_sweeping_a_field_the_objective_ignores_trains_no_copies(tiny_config, caplog):
    """A field swept alongside objectives that do not all read it applies to those that do: relu_l1 x 2 L1 values and
    topk x 2 values of k plan 4 SAEs (not 8), the relu_l1 ones with the keys of the sweep without topk, and says so."""
    before = keys(tiny_config)
    sweep = tiny_config.parent / "tiny-sweep.toml"
    sweep.write_text(
        sweep.read_text().replace("lr = 3e-3", 'lr = 3e-3\nobjective = ["relu_l1", "topk"]\nk = [8, 16]', 1)
    )
    with caplog.at_level("WARNING", logger="stages.train"):
        after = keys(tiny_config)
    assert before["train"] <= after["train"] and len(after["train"]) == 4
    assert "expands to 8 configs but only 4 distinct SAEs" in caplog.text


def test_a_field_no_chosen_objective_reads_is_an_error(tiny_config, capsys):
    sweep = tiny_config.parent / "tiny-sweep.toml"
    sweep.write_text(sweep.read_text().replace("lr = 3e-3", "lr = 3e-3\nk = [8, 16]", 1))
    assert run(tiny_config, dry_run=True) == 2
    err = capsys.readouterr().err
    assert "key 'objective.k' is not read by objective kind 'relu_l1' (only by 'topk', 'batchtopk'" in err


def test_slurm_only_values_change_no_key(copy_of_done):
    before = keys(copy_of_done)
    text = copy_of_done.read_text()
    text += '\n[slurm]\naccount = "PAS0000"\npartition = "gpu"\n[slurm.train]\nhours = 12.0\ngpus = 2\n'
    text = text.replace("batch_size = 16", "batch_size = 7")  # memory-only knob
    copy_of_done.write_text(text)
    assert keys(copy_of_done) == before


def test_deleted_partial_is_recomputed_alone(copy_of_done):
    root = copy_of_done.parent / "runs"
    partials = sorted(root.glob("score/*/partials/block*.safetensors"))
    assert len(partials) >= 4
    victim = partials[len(partials) // 2]
    victim_tensors = safetensors.numpy.load_file(str(victim))
    victim.unlink()
    before = snapshot(root)
    assert run(copy_of_done, stage="score") == 0
    after = snapshot(root)
    recomputed = safetensors.numpy.load_file(str(victim))
    for name, value in victim_tensors.items():  # deterministic: the same AP as before
        np.testing.assert_array_equal(recomputed[name], value)
    changed = {p for p in after if after[p] != before.get(p)}
    rel_victim = str(victim.relative_to(root))
    score_dir = rel_victim.split("/partials/")[0]
    assert changed == {rel_victim, f"{score_dir}/manifest.json"}


def test_stage_refuses_incomplete_input(copy_of_done, capsys):
    plan = pl.make_plan(pl.load(copy_of_done))
    shard = plan["dump"].artifacts[0].dpath / "acts000000.bin"
    with open(shard, "r+b") as fd:
        fd.truncate(100)
    shutil.rmtree(plan["mask"].artifacts[0].dpath)
    # The job body refuses on its own (afterok alone is not trusted)...
    with pytest.raises(
        artifacts.IncompleteArtifactError, match="cannot start: input dump/.*acts000000.bin has 100 bytes"
    ):
        pl.run_pieces(pl.load(copy_of_done), "mask", [plan["mask"].pieces[0].id])
    assert not plan["mask"].artifacts[0].is_done()
    # ...and the launcher names the damage and the stage that recomputes it.
    assert run(copy_of_done, stage="mask", only=True) == 1
    err = capsys.readouterr().err
    assert "acts000000.bin" in err and "--stage dump" in err
    assert not plan["mask"].artifacts[0].is_done()


def test_dry_run_prints_plan_and_runs_nothing(tiny_config, capsys):
    assert run(tiny_config, dry_run=True) == 0
    out = capsys.readouterr().out
    for name in pl.STAGES:
        assert f"\n{name} " in out
    assert "missing" in out
    assert not (tiny_config.parent / "runs").exists()


def test_stage_without_done_input_is_refused_before_running(tiny_config, capsys):
    assert run(tiny_config, stage="score") == 1
    assert "run `--stage dump`" in capsys.readouterr().err
    assert not (tiny_config.parent / "runs").exists()


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "launch.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for option in ("--stage", "--config", "--dry-run", "--status", "--executor", "--root"):
        assert option in out


def test_heldout_ap_is_sklearn_on_heldout_patches(done_config):
    """The reported AP of each chosen latent is scikit-learn's AP over the held-out patches, none of them kept."""
    import torch
    from sklearn.metrics import average_precision_score

    from saev import keepmask, nn
    from saev.data.shards import Shards

    pipeline = pl.load(done_config)
    plan = pl.make_plan(pipeline)
    best = json.loads((plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    shards = Shards(plan["dump"].artifacts[0].dpath)
    keep = keepmask.load_keep(plan["mask"].artifacts[0].dpath, shards)
    heldout = keepmask.load_heldout(plan["mask"].artifacts[0].dpath, shards)
    assert not set(keep) & set(heldout)
    labels = np.asarray(shards.labels).reshape(-1)[heldout]
    checked = 0
    for c, row in enumerate(best["classes"]):
        if row["heldout_ap"] is None:
            continue
        layer = plan["train"].info[row["sae"]].layer
        sae = nn.load(pipeline.root / "train" / row["sae"])
        with torch.inference_mode():
            scores = sae.encode(torch.from_numpy(shards.patches_flat(layer, heldout)))[:, row["prototype"]]
        expected = average_precision_score(labels == c, scores.numpy())
        assert abs(row["heldout_ap"] - expected) <= 1e-9
        checked += 1
    assert checked >= 3


def test_partials_are_sklearn_ap_over_kept_patches(done_config):
    import torch
    from sklearn.metrics import average_precision_score

    from saev import keepmask, nn, scoring
    from saev.data.shards import Shards

    pipeline = pl.load(done_config)
    plan = pl.make_plan(pipeline)
    shards = Shards(plan["dump"].artifacts[0].dpath)
    keep = keepmask.load_keep(plan["mask"].artifacts[0].dpath, shards)
    labels = np.asarray(shards.labels).reshape(-1)[keep]
    score_art = plan["score"].artifacts[0]
    info = plan["score"].info[score_art.key]
    n_classes = len(shards.metadata.class_names)
    counts_C = np.bincount(labels.astype(np.int64), minlength=n_classes)
    partials = scoring.read_partials(score_art, info.d_sae, info.block_size, info.train_key, counts_C)
    sae = nn.load(pipeline.root / "train" / info.train_key)
    with torch.inference_mode():
        scores = sae.encode(torch.from_numpy(shards.patches_flat(info.layer, keep))).numpy()
    assert partials.ap_CK.shape == (len(shards.metadata.class_names), info.d_sae)
    for k in (0, info.block_size, info.d_sae - 1):  # first, second block, last latent
        for c in range(partials.ap_CK.shape[0]):
            expected = average_precision_score(labels == c, scores[:, k])
            assert abs(partials.ap_CK[c, k] - expected) <= 1e-9
    np.testing.assert_array_equal(partials.max_K, scores.max(axis=0))


def test_auto_block_size_follows_memory_budget():
    from stages import score as score_stage

    small = score_stage.Config(block_size="auto", memory_gb=1.0)
    big = score_stage.Config(block_size="auto", memory_gb=40.0)
    n_small = score_stage.get_block_size(small, 100_000, 32_768)
    n_big = score_stage.get_block_size(big, 100_000, 32_768)
    assert 0 < n_small < n_big <= 32_768
    assert n_small * 100_000 * 4 <= 1.0 * 2**30  # the block's float32 scores fit the budget
    assert score_stage.get_block_size(big, 2_700_000, 32_768) * 2_700_000 * 4 <= 40 * 2**30
    assert score_stage.get_block_size(score_stage.Config(block_size=64), 10, 100) == 64


def test_class_folder_dataset_labels_whole_images(tiny_config):
    from PIL import Image

    from saev.data.shards import Shards

    data = tiny_config.parent / "data"
    for c, name in enumerate(("red", "blue")):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (200, 20, 20) if c == 0 else (20, 20, 200)).save(data / name / f"{i}.jpg")
    text = tiny_config.read_text()
    start, end = text.index("[dump.data]"), text.index("[dump.vit]")
    tiny_config.write_text(text[:start] + f'[dump.data]\nkind = "classfolder"\nroot = "{data}"\n\n' + text[end:])
    assert run(tiny_config, stage="dump", only=True) == 0
    plan = pl.make_plan(pl.load(tiny_config))
    shards = Shards(plan["dump"].artifacts[0].dpath)
    assert shards.metadata.class_names == ("blue", "red")
    np.testing.assert_array_equal(np.asarray(shards.labels), np.repeat([[0], [0], [0], [1], [1], [1]], 64, axis=1))


def test_preempted_training_resumes_to_the_same_weights(copy_of_done, capsys):
    from safetensors.numpy import load_file

    from saev import training

    root = copy_of_done.parent / "runs"
    originals = {p.parent.name: load_file(str(p)) for p in root.glob("train/*/sae.safetensors")}
    for stage in ("train", "score", "reduce"):
        shutil.rmtree(root / stage)
    training.request_checkpoint()  # as Slurm's pre-timeout signal handler does
    assert run(copy_of_done, stage="train", only=True) == 1
    assert "preempted after step 1/" in capsys.readouterr().err
    assert list(root.glob("train/*/.checkpoint.safetensors")) and not list(root.glob("train/*/manifest.json"))
    assert run(copy_of_done) == 0
    assert not list(root.glob("train/*/.checkpoint.safetensors"))
    resumed = {p.parent.name: load_file(str(p)) for p in root.glob("train/*/sae.safetensors")}
    assert resumed.keys() == originals.keys()
    for key, tensors in originals.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(resumed[key][name], value)


def test_dump_bytes_do_not_depend_on_batching_or_grouping(tmp_path):
    """Batch size and how many batches are prepared at a time change memory use only: the files are byte-identical."""

    def dump(root, batch_size, prepare_mib):
        cfg = dump_stage.Config(
            data=datasets.Synthetic(n_imgs=150, seed=3),
            vit=vit.VitConfig(layers=(0, -1)),
            max_patches_per_shard=4000,
            batch_size=batch_size,
            prepare_mib=prepare_mib,
            device="cpu",
        )
        pipeline = dataclasses.replace(pl.Pipeline(), root=root, dump=cfg, config_dpath=pathlib.Path(REPO) / "configs")
        plan = pl.make_plan(pipeline)
        pl.run_pieces(pipeline, "dump", [piece.id for piece in plan["dump"].pieces])
        art = plan["dump"].artifacts[0]
        return {p.name: p.read_bytes() for p in sorted(art.dpath.iterdir()) if p.suffix == ".bin"}

    one_batch_per_group = dump(tmp_path / "a", batch_size=64, prepare_mib=1)  # 64 images of 64 px: 0.75 MiB
    many = dump(tmp_path / "b", batch_size=7, prepare_mib=64)
    assert len(one_batch_per_group) > 2 and one_batch_per_group == many


def test_a_job_uses_as_many_torch_threads_as_cpus_it_was_given(tiny_config):
    """The job body sets torch's threads from the CPU affinity (here one CPU), not the node's cores, and logs it."""
    import subprocess
    import sys

    script = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from stages import pipeline as pl;"
        f"p = pl.load({str(tiny_config)!r});"
        "plan = pl.make_plan(p);"
        "pl.run_pieces(p, 'dump', [plan['dump'].pieces[0].id]);"
        "import torch; print('threads', torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "threads 1" in out.stdout
    assert "torch threads: 1 (CPU affinity 1)" in out.stderr


def test_slurm_submission_waits_on_the_stages_whose_artifacts_each_stage_reads(tiny_config, monkeypatch):
    """afterok follows the declared inputs: the kept activations wait on the dump and the mask, not on training; the
    job body submitted is the stages' `run_pieces` (pickled by reference), one job per missing piece."""
    from saev import slurm
    from saev.engine import executors

    submitted: dict[str, tuple] = {}

    def fake_submit(cfg, stage, fn, args_list, *, after=()):
        submitted[stage] = (fn, len(args_list), list(after))
        return [f"{len(submitted)}_{i}" for i in range(len(args_list))]

    monkeypatch.setattr(slurm, "submit", fake_submit)
    pipeline = dataclasses.replace(pl.load(tiny_config), slurm=slurm.SlurmConfig())
    plan = pl.make_plan(pipeline)
    lines = []
    executors.Slurm(pl.REGISTRY, pl.run_pieces).run(pipeline, plan, pl.STAGES, say=lines.append)
    assert list(submitted) == list(pl.STAGES)
    job_of = {stage: str(i + 1) for i, stage in enumerate(submitted)}
    reads = {"dump": [], "train": ["dump"], "mask": ["dump"], "kept": ["dump", "mask"],
             "score": ["dump", "train", "mask", "kept"], "reduce": ["dump", "train", "mask", "score"]}  # fmt: skip
    for stage, (fn, n_jobs, after) in submitted.items():
        assert fn is pl.run_pieces and n_jobs == len(plan[stage].pieces)
        assert after == [job_of[upstream] for upstream in reads[stage]], stage


def dump_state(root: pathlib.Path, data, *, overlap: bool) -> tuple[dict[str, bytes], BaseException | None]:
    """Dump `data` in pieces of two shards of 5 images each, batches of 4 straddling them: every file the dump
    leaves but the manifest and the stat signatures of verified files (which hold times), by path, and the error it
    raised (None if it finished)."""
    cfg = dump_stage.Config(
        data=data, vit=vit.VitConfig(layers=(0, -1)), max_patches_per_shard=650, shards_per_job=2, batch_size=4,
        prepare_mib=1, overlap=overlap, device="cpu",
    )  # fmt: skip
    pipeline = dataclasses.replace(pl.Pipeline(), root=root, dump=cfg, config_dpath=pathlib.Path(REPO) / "configs")
    plan = pl.make_plan(pipeline)
    error = None
    try:
        pl.run_pieces(pipeline, "dump", [piece.id for piece in plan["dump"].pieces])
    except datasets.DatasetError as err:
        error = err
    dpath = plan["dump"].artifacts[0].dpath
    files = {str(p.relative_to(dpath)): p.read_bytes() for p in sorted(dpath.rglob("*"))
             if p.is_file() and p.name not in ("manifest.json", ".manifest.json.sum", ".verified.json")}  # fmt: skip
    for name in [n for n in files if n.endswith(".sum")]:  # a checksum record's stat (times, inode) is the file's own
        files[name] = json.loads(files[name]).get("xxh3_128")
    return files, error


def test_overlapped_dump_of_the_synthetic_data_writes_the_serial_dumps_files(tmp_path):
    data = datasets.Synthetic(n_imgs=23, seed=5)
    overlapped, _ = dump_state(tmp_path / "a", data, overlap=True)
    serial, _ = dump_state(tmp_path / "b", data, overlap=False)
    assert sum(name.startswith("acts") for name in serial) == 5 and "labels.bin" in serial
    assert overlapped == serial


def test_overlapped_dump_of_a_folder_dataset_writes_the_serial_dumps_files(tmp_path):
    from tests.helpers import make_folder_dataset

    data = datasets.SegFolder(root=str(make_folder_dataset(tmp_path / "data", n_imgs=23)))
    overlapped, _ = dump_state(tmp_path / "a", data, overlap=True)
    serial, _ = dump_state(tmp_path / "b", data, overlap=False)
    assert sum(name.startswith("acts") for name in serial) == 5 and "labels.bin" in serial
    assert overlapped == serial


def test_an_unreadable_image_stops_the_overlapped_dump_with_its_error_and_the_serial_dumps_files(tmp_path):
    """Image 19 (the last batch of the second piece, images 10-19) cannot be decoded: the error names it, the shards
    before it are finished (shard 2 by the batch before), and nothing else differs from what the serial dump leaves."""
    from tests.helpers import make_folder_dataset

    data_dpath = make_folder_dataset(tmp_path / "data", n_imgs=23)
    bad = sorted((data_dpath / "images").iterdir())[19]
    bad.write_bytes(b"not a png")
    data = datasets.SegFolder(root=str(data_dpath))
    overlapped, overlapped_err = dump_state(tmp_path / "a", data, overlap=True)
    serial, serial_err = dump_state(tmp_path / "b", data, overlap=False)
    assert f"cannot read image {bad}" in str(overlapped_err) and str(overlapped_err) == str(serial_err)
    assert overlapped == serial
    assert {"acts000001.bin", "parts/labels000001.npy", "acts000002.bin", "parts/labels000002.npy"} <= set(serial)
    assert "acts000003.bin" not in serial and "labels.bin" not in serial
