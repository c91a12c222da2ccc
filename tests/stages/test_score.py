"""The score stage's block path: TopK blocks computing only their own columns, and kept activations gathered once.

A tiny pipeline with one SAE of each top-k family objective (TopK, BatchTopK, Matryoshka) runs to the score stage;
its partials must equal, bit for bit, those computed from a full encode of the SAE sliced into the same blocks.
"""

import pathlib
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch

import launch
from saev import ap, artifacts, atomic, keepmask, nn, scoring
from saev.data.shards import Shards
from stages import pipeline as pl
from tests.helpers import flip_byte, run, write_tiny_config

TINY_OBJECTIVE = "l1_coeff = [1e-3, 4e-3]"
"""The objective line of tests/tiny-sweep.toml, replaced by one SAE per top-k family objective."""
TOPK_OBJECTIVES = 'objective.kind = ["topk", "batchtopk", "matryoshka"]\nobjective.k = 4'


def write_topk_config(dpath: pathlib.Path) -> pathlib.Path:
    cfg = write_tiny_config(dpath)
    sweep_fpath = dpath / "tiny-sweep.toml"
    assert TINY_OBJECTIVE in sweep_fpath.read_text()
    sweep_fpath.write_text(sweep_fpath.read_text().replace(TINY_OBJECTIVE, TOPK_OBJECTIVES))
    cfg.write_text(cfg.read_text().replace("[reduce]\n", "[reduce]\nreport = false\n"))
    return cfg


def run_score(cfg: pathlib.Path, stage: str = "score") -> None:
    assert run(cfg, stage=stage) == 0


@pytest.fixture(scope="module")
def topk_config(tmp_path_factory) -> pathlib.Path:
    """The tiny pipeline with TopK, BatchTopK and Matryoshka SAEs, run through the score stage."""
    cfg = write_topk_config(tmp_path_factory.mktemp("topk-score"))
    run_score(cfg, "all")
    return cfg


@pytest.fixture
def copy_of_topk(topk_config, tmp_path) -> pathlib.Path:
    """A private copy of the scored run that a test may change."""
    cfg = write_topk_config(tmp_path)
    shutil.copytree(topk_config.parent / "runs", tmp_path / "runs")
    return cfg


def partial_tensors(art: artifacts.Artifact) -> dict[str, dict[str, np.ndarray]]:
    """File name -> the tensors of each partial of a score artifact."""
    return {
        fpath.name: safetensors.numpy.load_file(str(fpath)) for fpath in sorted((art.dpath / "partials").glob("*.safetensors"))
    }  # fmt: skip


def test_partials_of_every_topk_family_sae_equal_a_full_encode_sliced_bit_for_bit(topk_config):
    pipeline = pl.load(topk_config)
    plan = pl.make_plan(pipeline)
    shards = Shards(plan["dump"].artifacts[0].dpath)
    keep = keepmask.load_keep(plan["mask"].artifacts[0].dpath, shards)
    labels_N = torch.from_numpy(np.asarray(shards.labels).reshape(-1)[keep].astype(np.int64))
    n_classes = len(shards.metadata.class_names)
    kinds = set()
    for art in plan["score"].artifacts:
        info = plan["score"].info[art.key]
        sae = nn.load(pipeline.root / "train" / info.train_key)
        kinds.add(sae.activation.kind)
        assert info.d_sae // info.block_size >= 2  # several blocks: a block really is a slice
        with torch.inference_mode():
            full_NS = sae.encode(torch.from_numpy(shards.patches_flat(info.layer, keep)))
        got = partial_tensors(art)
        assert len(got) == info.d_sae // info.block_size
        for name, tensors in got.items():
            k_start, k_stop = (int(x) for x in tensors["k_range"])
            scores_NK = full_NS[:, k_start:k_stop].contiguous()
            ap_CK = ap.average_precision(scores_NK, labels_N, n_classes=n_classes).numpy()
            np.testing.assert_array_equal(tensors["ap_CK"], ap_CK, err_msg=name)  # NaN rows equal NaN rows
            np.testing.assert_array_equal(tensors["min_K"], scores_NK.amin(dim=0).numpy(), err_msg=name)
            np.testing.assert_array_equal(tensors["max_K"], scores_NK.amax(dim=0).numpy(), err_msg=name)
        # Only a TopK SAE needs its selected latents found first.
        assert (art.dpath / scoring.TOPK_FNAME).is_file() == (sae.activation.kind == "topk")
    assert kinds == {"topk", "jumprelu"}


def test_topk_latents_are_each_rows_k_largest_pre_activations(topk_config):
    pipeline = pl.load(topk_config)
    plan = pl.make_plan(pipeline)
    shards = Shards(plan["dump"].artifacts[0].dpath)
    keep = keepmask.load_keep(plan["mask"].artifacts[0].dpath, shards)
    (art,) = [a for a in plan["score"].artifacts if (a.dpath / scoring.TOPK_FNAME).is_file()]
    info = plan["score"].info[art.key]
    sae = nn.load(pipeline.root / "train" / info.train_key)
    top_Nk = scoring.read_topk(
        art.dpath / scoring.TOPK_FNAME, n_rows=len(keep), train_key=info.train_key, k=sae.activation.k,
        d_sae=info.d_sae, matmul_precision=pipeline.score.matmul_precision,
    )  # fmt: skip
    with torch.inference_mode():
        pre_NS = sae.pre_acts(torch.from_numpy(shards.patches_flat(info.layer, keep)))
    want_Nk = sae.activation.top_latents(pre_NS).numpy()
    np.testing.assert_array_equal(np.sort(top_Nk, axis=1), np.sort(want_Nk, axis=1))
    assert "topk_latents.safetensors" in art.read_manifest()["files"]  # part of the sealed, checksummed artifact


def test_a_topk_block_keeps_the_selected_latents_whatever_its_rounding():
    """The selection is indices, not a threshold value: pre-activations that round differently in a block (another
    device, batch size or BLAS path) still keep exactly the latents selected, k per row."""
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=4, seed=1), nn.TopK(3))
    x_ND = torch.randn(50, 8)
    top_Nk = scoring.topk_latents(sae, x_ND.numpy(), 8, batch_size=7, device=torch.device("cpu"))
    with torch.inference_mode():
        nudged = sae.pre_acts(x_ND) * (1 + 1e-7)  # every value one rounding away
    f_NS = sae.activation.select(nudged, top_Nk)
    mask_NS = torch.zeros_like(nudged, dtype=torch.bool).scatter_(1, top_Nk.long(), True)
    assert mask_NS.sum(dim=1).tolist() == [3] * 50
    assert torch.equal(f_NS, torch.where(mask_NS, torch.relu(nudged), 0.0))


def test_gathered_kept_activations_equal_the_rows_the_shards_hold(topk_config):
    pipeline = pl.load(topk_config)
    plan = pl.make_plan(pipeline)
    dump_art, mask_art = plan["dump"].artifact, plan["mask"].artifact
    shards = Shards(dump_art.dpath)
    keep = keepmask.load_keep(mask_art.dpath, shards)
    layer = plan["score"].info[plan["score"].artifacts[0].key].layer
    (kept,) = plan["kept"].artifacts  # one kept artifact for the three SAEs of the layer
    assert plan["kept"].info[kept.key].layer == layer
    assert {plan["score"].info[art.key].kept_key for art in plan["score"].artifacts} == {kept.key}
    kept.verify(params={"layer": layer})
    acts_ND = np.load(kept.dpath / scoring.KEPT_FNAME)
    assert acts_ND.dtype == np.float32
    np.testing.assert_array_equal(acts_ND, shards.patches_flat(layer, keep))
    assert [p.name for p in (pipeline.root / "kept").iterdir()] == [kept.key]


def rescore(cfg: pathlib.Path, stage: str = "score") -> tuple[dict, dict]:
    """Delete every partial (and TopK latents) of the run, run `stage` again; (partials before, partials after)."""
    plan = pl.make_plan(pl.load(cfg))
    before = {art.key: partial_tensors(art) for art in plan["score"].artifacts}
    for art in plan["score"].artifacts:
        shutil.rmtree(art.dpath / "partials")
        (art.dpath / scoring.TOPK_FNAME).unlink(missing_ok=True)
    run_score(cfg, stage)
    after = {art.key: partial_tensors(art) for art in plan["score"].artifacts}
    return before, after


def assert_same_partials(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].keys() == after[key].keys()
        for name in before[key]:
            for tensor in before[key][name]:
                np.testing.assert_array_equal(before[key][name][tensor], after[key][name][tensor])


def test_a_score_task_reads_no_shard_when_the_kept_activations_are_gathered(copy_of_topk, monkeypatch):
    def no_shard_reads(*args, **kwargs):
        raise AssertionError("a score task read a shard")

    monkeypatch.setattr(Shards, "shard", no_shard_reads)
    monkeypatch.setattr(Shards, "patches_flat", no_shard_reads)
    before, after = rescore(copy_of_topk)
    assert_same_partials(before, after)


def zero_half_the_rows(fpath: pathlib.Path) -> None:
    """Change the kept activations in place, at the same size and still a valid .npy: half the rows become zeros."""
    acts_ND = np.load(fpath, mmap_mode="r+")
    acts_ND[: len(acts_ND) // 2] = 0
    acts_ND.flush()
    del acts_ND


def test_kept_activations_changed_in_place_are_found_and_gathered_again(copy_of_topk, capsys):
    """A declared artifact like any other: the run's store check finds the change, the kept stage gathers the rows
    again, and the rescored partials and best.json equal the clean run's."""
    root = copy_of_topk.parent / "runs"
    (kept_dpath,) = (root / "kept").iterdir()
    (best_fpath,) = root.glob("reduce/*/best.json")
    clean_best = best_fpath.read_bytes()
    zero_half_the_rows(kept_dpath / scoring.KEPT_FNAME)
    shutil.rmtree(best_fpath.parent)  # so that the reduce runs again too
    before, after = rescore(copy_of_topk, "all")
    assert_same_partials(before, after)
    assert best_fpath.read_bytes() == clean_best
    err = capsys.readouterr().err
    assert f"kept/{kept_dpath.name} is damaged: {kept_dpath / scoring.KEPT_FNAME} does not match its checksum" in err
    assert artifacts.Artifact(root, "kept", kept_dpath.name).check("all").state == "done"


def test_a_score_task_refuses_kept_activations_changed_in_place(copy_of_topk):
    """The job body checks its inputs itself (a task started without the launcher's store check, e.g. by Slurm)."""
    pipeline = pl.load(copy_of_topk)
    plan = pl.make_plan(pipeline)
    (kept,) = plan["kept"].artifacts
    zero_half_the_rows(kept.dpath / scoring.KEPT_FNAME)
    piece = plan["score"].pieces[0]
    piece.fpath.unlink()
    with pytest.raises(artifacts.IncompleteArtifactError, match=rf"cannot start: input kept/{kept.key} is damaged: "
                       r".*/acts.npy does not match its checksum.*`--stage kept`"):  # fmt: skip
        pl.run_pieces(pipeline, "score", [piece.id])
    assert not kept.is_done() and not piece.fpath.exists()  # unsealed: a rerun gathers the rows again


def test_verify_checks_the_kept_activations_and_names_what_was_made_from_them(copy_of_topk, capsys):
    plan = pl.make_plan(pl.load(copy_of_topk))
    (kept,) = plan["kept"].artifacts
    flip_byte(kept.dpath / scoring.KEPT_FNAME)
    assert launch.main(launch.Args(config=copy_of_topk, verify=True)) == 1
    out = capsys.readouterr().out
    assert f"bad: {kept.dpath / scoring.KEPT_FNAME} does not match its checksum" in out
    made_from = out.split(f"made from {kept.ref}: ")[1].splitlines()[0]
    for art in (*plan["score"].artifacts, plan["reduce"].artifact):
        assert art.ref in made_from


@pytest.mark.parametrize("by", ["launcher", "job"])
def test_damaged_topk_latents_are_computed_again(copy_of_topk, caplog, capsys, by):
    """Found by the launcher's check of the unsealed artifact before the run (moved aside), or, when the job runs
    without it (changed after that check), by the job's read of the file."""
    plan = pl.make_plan(pl.load(copy_of_topk))
    (art,) = [a for a in plan["score"].artifacts if (a.dpath / scoring.TOPK_FNAME).is_file()]
    before = partial_tensors(art)
    art.manifest_fpath.unlink()  # as while its blocks are being scored
    flip_byte(art.dpath / scoring.TOPK_FNAME)
    for fpath in (art.dpath / "partials").iterdir():
        fpath.unlink()
    if by == "launcher":
        run_score(copy_of_topk)
        assert f"{art.dpath / scoring.TOPK_FNAME} changed after its job wrote it" in capsys.readouterr().err
    else:
        pl.run_pieces(pl.load(copy_of_topk), "score", [p.id for p in plan["score"].pieces if p.artifact == art])
        assert "does not match the checksum" in caplog.text and "computing it again" in caplog.text
    assert_same_partials({art.key: before}, {art.key: partial_tensors(art)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda kw: {**kw, "k": 3}, "computed for"),
        (lambda kw: {**kw, "d_sae": 9}, "computed for"),
        (lambda kw: {**kw, "n_rows": 7}, "latents_Nk is int32 [6, 2], expected int32 [7, 2]"),
        (lambda kw: {**kw, "train_key": "other"}, "computed for"),
    ],
)
def test_topk_latents_for_other_rows_or_another_sae_are_refused_naming_the_file(tmp_path, change, message):
    fpath = tmp_path / scoring.TOPK_FNAME
    top_Nk = torch.arange(12, dtype=torch.int32).reshape(6, 2) % 8
    scoring.write_topk(fpath, top_Nk, train_key="sae", d_sae=8, block_size=4, batch_size=3, matmul_precision="highest")
    kw = {"n_rows": 6, "train_key": "sae", "k": 2, "d_sae": 8, "matmul_precision": "highest"}
    np.testing.assert_array_equal(scoring.read_topk(fpath, **kw), top_Nk.numpy())
    with pytest.raises(scoring.TopkError, match=re.escape(f"{fpath}: {message}")):
        scoring.read_topk(fpath, **change(kw))


@pytest.mark.parametrize(
    ("rows", "message"),
    [([[0, 8], [1, 2]], "row 0 holds an index outside"), ([[1, 2], [3, 3]], "row 1 holds an index twice")],
)
def test_topk_latents_out_of_range_or_repeated_are_refused(tmp_path, rows, message):
    fpath = tmp_path / scoring.TOPK_FNAME
    scoring.write_topk(
        fpath, torch.tensor(rows, dtype=torch.int32), train_key="s", d_sae=8, block_size=4, batch_size=2,
        matmul_precision="highest",
    )  # fmt: skip
    with pytest.raises(scoring.TopkError, match=message):
        scoring.read_topk(fpath, n_rows=2, train_key="s", k=2, d_sae=8, matmul_precision="highest")


def test_kept_activations_of_another_shape_are_refused_naming_the_file(tmp_path):
    fpath = tmp_path / scoring.KEPT_FNAME
    scoring.write_kept(fpath, lambda a, b: np.ones((b - a, 3), np.float32), 5, 3)
    assert scoring.read_kept(fpath, 5, 3).shape == (5, 3)
    with pytest.raises(scoring.KeptError, match=rf"{fpath}: holds float32 \[5, 3\], expected float32 \[5, 4\]"):
        scoring.read_kept(fpath, 5, 4)
    atomic.atomic_save_npy(fpath, np.ones((5, 3), np.float64))
    with pytest.raises(scoring.KeptError, match="holds float64"):
        scoring.read_kept(fpath, 5, 3)


def test_kept_activations_are_the_npy_file_np_save_writes(tmp_path):
    """Written with plain writes (not a memory map), in chunks of `_GATHER_ROWS` rows: the same bytes as `np.save`, and
    the checksum recorded beside it is the file's."""
    acts_ND = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    fpath = tmp_path / scoring.KEPT_FNAME
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "_GATHER_ROWS", 3)  # three chunks, the last partial
        scoring.write_kept(fpath, lambda a, b: acts_ND[a:b], 7, 3)
    np.save(tmp_path / "ref.npy", acts_ND, allow_pickle=False)
    assert fpath.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    artifacts.verify_file(fpath)
    with pytest.raises(ValueError, match=r"gather\(0, 7\) returned \[7, 2\], expected \[7, 3\]"):
        scoring.write_kept(tmp_path / "bad.npy", lambda a, b: acts_ND[a:b, :2], 7, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fpath.name, f".{fpath.name}.sum", "ref.npy"])


def make_scored_sae(activation: nn.Activation) -> tuple[nn.SparseAutoencoder, np.ndarray, np.ndarray]:
    """An SAE with biases (about half its ReLU latents fire), 203 rows of activations and int labels of 5 classes."""
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=24, exp_factor=6, seed=3), activation)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=gen)
        sae.b_dec.normal_(0, 0.5, generator=gen)
    acts_ND = torch.randn(203, 24, generator=gen).numpy()
    labels_N = torch.randint(0, 5, (203,), generator=gen).numpy()
    return sae, acts_ND, labels_N


@pytest.mark.parametrize("activation", [nn.Relu(), nn.JumpRelu(0.3), nn.TopK(5)], ids=repr)
@pytest.mark.parametrize("block_size", [1, 7, 13, 64, 100])
def test_blocks_of_any_width_equal_a_full_encode_bit_for_bit(activation, block_size):
    """Blocks narrower than a BLAS's small-matrix paths (1 or 7 latents) and a last batch of 3 rows (203 rows in
    batches of 50) are computed inside `MIN_MATMUL`-wide matmuls, so every score, min, max and AP equals those of a
    full encode of all rows, whatever the block's width."""
    sae, acts_ND, labels_N = make_scored_sae(activation)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        full_NS = sae.encode(torch.from_numpy(acts_ND))
    top_Nk = None
    if isinstance(activation, nn.TopK):
        top_Nk = scoring.topk_latents(sae, acts_ND, block_size, batch_size=50, device=cpu)
        with torch.inference_mode():
            want_Nk = activation.top_latents(sae.pre_acts(torch.from_numpy(acts_ND)))
        np.testing.assert_array_equal(np.sort(top_Nk.numpy(), axis=1), np.sort(want_Nk.numpy(), axis=1))
    d_sae = sae.cfg.d_sae
    for k_start in sorted({0, block_size, d_sae - d_sae % block_size or d_sae - block_size}):
        k_stop = min(d_sae, k_start + block_size)
        want_NK = full_NS[:, k_start:k_stop].contiguous()
        got_NK = scoring.encode_block(sae, acts_ND, k_start, k_stop, batch_size=50, device=cpu, top_Nk=top_Nk)
        assert torch.equal(got_NK, want_NK), (k_start, k_stop)
        got = scoring.score_block(sae, acts_ND, labels_N, 5, k_start, k_stop, batch_size=50, device=cpu, top_Nk=top_Nk)
        assert torch.equal(got.min_K, want_NK.amin(dim=0)) and torch.equal(got.max_K, want_NK.amax(dim=0))
        assert torch.equal(got.ap_CK, ap.average_precision(want_NK, torch.from_numpy(labels_N), n_classes=5))


def test_score_blocks_reuse_one_set_of_buffers_and_leave_nothing_of_the_previous_block():
    sae, acts_ND, labels_N = make_scored_sae(nn.Relu())
    cpu = torch.device("cpu")
    with torch.inference_mode():
        full_NS = sae.encode(torch.from_numpy(acts_ND))
    blocks = [(0, 64), (64, 128), (128, 144), (0, 64)]  # the last block of the SAE is narrower
    got = [scoring.score_block(sae, acts_ND, labels_N, 5, a, b, batch_size=50, device=cpu) for a, b in blocks]
    buffers = scoring.get_block_buffers(len(acts_ND), 24, 16, 50, cpu)
    assert buffers is scoring.get_block_buffers(len(acts_ND), 24, 64, 50, cpu)  # allocated once, for 64 latents
    for (a, b), block in zip(blocks, got, strict=True):
        assert torch.equal(block.max_K, full_NS[:, a:b].amax(dim=0))
        assert torch.equal(block.ap_CK, ap.average_precision(full_NS[:, a:b], torch.from_numpy(labels_N), n_classes=5))
    assert torch.equal(got[0].ap_CK, got[-1].ap_CK)


def test_min_and_max_of_a_block_with_a_nan_score_are_nan():
    """As `amin`/`amax` give them: a NaN input (here a NaN bias) is never hidden by the chunked min and max; the AP
    engine then refuses the block naming the latent."""
    sae, acts_ND, labels_N = make_scored_sae(nn.Relu())
    with torch.no_grad():
        sae.b_enc[3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or \+-inf in 1 prototype column\(s\); first: \[3\]"):
        scoring.score_block(sae, acts_ND, labels_N, 5, 0, 8, batch_size=50, device=torch.device("cpu"))
