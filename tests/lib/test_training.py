"""Training one SAE: it learns a sparse dictionary, is deterministic, never trains on held-out rows, and refuses
bad data with a clear message."""

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from saev import nn, objectives, training
from saev.objectives import BatchTopK, Matryoshka, ReluL1, TopK


def make_sparse_acts(n: int, d: int = 32, n_atoms: int = 64, k: int = 3, seed: int = 0) -> np.ndarray:
    """Rows that are sums of k of n_atoms random unit directions with positive weights, plus a constant offset."""
    rng = np.random.default_rng(seed)
    atoms_AD = rng.standard_normal((n_atoms, d))
    atoms_AD /= np.linalg.norm(atoms_AD, axis=1, keepdims=True)
    codes_NA = np.zeros((n, n_atoms))
    for i in range(n):
        codes_NA[i, rng.choice(n_atoms, size=k, replace=False)] = rng.uniform(1, 3, size=k)
    return (codes_NA @ atoms_AD + 0.5).astype(np.float32)


TINY = training.TrainConfig(
    sae=nn.SaeConfig(d_vit=8, exp_factor=2), n_train=640, batch_size=64, warmup_steps=3, n_eval=88
)


@pytest.fixture(scope="module")
def tiny_acts() -> np.ndarray:
    return make_sparse_acts(600, d=8, n_atoms=12, k=2, seed=1)


def weights(sae: nn.SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_same_weights(a: nn.SparseAutoencoder, b: nn.SparseAutoencoder):
    for name, tensor in weights(a).items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_relu_l1_learns_a_sparse_dictionary():
    acts = make_sparse_acts(9216)
    cfg = training.TrainConfig(
        sae=nn.SaeConfig(d_vit=32, exp_factor=4),
        objective=ReluL1(l1_coeff=0.03),
        lr=3e-3,
        n_train=200_000,
        batch_size=256,
        warmup_steps=50,
        n_eval=1024,
    )
    metrics = training.train(cfg, acts).metrics
    assert metrics.nmse < 0.3
    assert metrics.l0 < cfg.sae.d_sae / 4
    assert metrics.n_steps == 781


def test_training_is_deterministic(tiny_acts):
    a = training.train(TINY, tiny_acts)
    b = training.train(TINY, tiny_acts)
    assert_same_weights(a.sae, b.sae)
    assert a.metrics == b.metrics


TINY_TOPK = dataclasses.replace(TINY, objective=TopK(k=1, aux_k=2, dead_tokens=64))
TINY_MATRYOSHKA = dataclasses.replace(TINY, objective=Matryoshka(k=3, prefixes=(4,)))


def with_obj(cfg: training.TrainConfig, **changes) -> dict[str, object]:
    """A `dataclasses.replace` change of the objective's own fields."""
    return {"objective": dataclasses.replace(cfg.objective, **changes)}


TINY_WINDOWED = dataclasses.replace(TINY, chunk_rows=32, buffer_rows=128)  # 4 windows per epoch of 512 rows

CHANGES = {
    "sae.d_vit": None,  # fixed by the data; a mismatch is an error (test_width_mismatch_is_refused)
    "sae.exp_factor": (TINY, {"sae": nn.SaeConfig(d_vit=8, exp_factor=3)}),
    "sae.seed": (TINY, {"sae": nn.SaeConfig(d_vit=8, exp_factor=2, seed=1)}),
    "sae.latents": (TINY, {"sae": nn.SaeConfig(d_vit=8, exp_factor=2, latents=13)}),  # not a multiple of d_vit
    "objective": (TINY, {"objective": TopK(k=3)}),
    "objective.l1_coeff": (TINY, with_obj(TINY, l1_coeff=0.1)),
    "objective.k": (TINY_TOPK, with_obj(TINY_TOPK, k=2)),
    "objective.aux_k": (TINY_TOPK, with_obj(TINY_TOPK, aux_k=1)),
    "objective.aux_coeff": (TINY_TOPK, with_obj(TINY_TOPK, aux_coeff=0.5)),
    "objective.dead_tokens": (TINY_TOPK, with_obj(TINY_TOPK, dead_tokens=2 * 64)),
    "objective.prefixes": (TINY_MATRYOSHKA, with_obj(TINY_MATRYOSHKA, prefixes=(8,))),
    "lr": (TINY, {"lr": 3e-3}),
    "n_train": (TINY, {"n_train": 704}),
    "batch_size": (TINY, {"batch_size": 32}),
    "warmup_steps": (TINY, {"warmup_steps": 1}),
    "seed": (TINY, {"seed": 1}),
    "n_eval": (TINY, {"n_eval": 100}),
    "chunk_rows": (TINY_WINDOWED, {"chunk_rows": 16}),
    "buffer_rows": (TINY_WINDOWED, {"buffer_rows": 256}),
}
"""A change of each TrainConfig field (by dotted name) from a base config where that field matters."""


def test_changes_cover_every_config_field():
    names = {f.name for f in dataclasses.fields(training.TrainConfig)} - {"sae"}
    names |= {"sae." + f.name for f in dataclasses.fields(nn.SaeConfig)}
    names |= {"objective." + f.name for cls in objectives.CONFIGS for f in dataclasses.fields(cls)}
    assert set(CHANGES) == names


@pytest.mark.parametrize("name", [name for name, change in CHANGES.items() if change is not None])
def test_every_config_field_changes_the_weights(tiny_acts, name):
    base_cfg, change = CHANGES[name]
    base = training.train(base_cfg, tiny_acts).sae
    other = training.train(dataclasses.replace(base_cfg, **change), tiny_acts).sae
    assert base.W_enc.shape != other.W_enc.shape or not torch.equal(base.W_enc, other.W_enc)


##########
# Groups #
##########

GROUP_PAIRS = {
    "relu_l1": (
        TINY,
        dataclasses.replace(TINY, objective=ReluL1(l1_coeff=0.02), lr=3e-3, sae=dataclasses.replace(TINY.sae, seed=1)),
    ),
    "topk": (TINY_TOPK, dataclasses.replace(TINY_TOPK, **with_obj(TINY_TOPK, k=3, aux_coeff=0.1), warmup_steps=1)),
    "batchtopk": (
        dataclasses.replace(TINY_TOPK, objective=BatchTopK(k=1, aux_k=2, dead_tokens=64)),
        dataclasses.replace(TINY_TOPK, objective=BatchTopK(k=2, aux_k=2, dead_tokens=128), lr=2e-3),
    ),
    "matryoshka": (
        TINY_MATRYOSHKA,
        dataclasses.replace(TINY_MATRYOSHKA, **with_obj(TINY_MATRYOSHKA, k=2, aux_k=1, dead_tokens=64)),
    ),
}
"""Two configs per objective that differ in every field a group lets differ (seed, lr, k, AuxK settings...)."""


def test_group_pairs_cover_every_objective():
    assert set(GROUP_PAIRS) == set(objectives.KINDS)


@pytest.mark.parametrize("objective", list(GROUP_PAIRS))
def test_group_trains_each_sae_bit_identically_to_training_it_alone(tiny_acts, objective):
    """CPU, float32: torch.equal on every weight, and equal metrics (train() is train_group([cfg]))."""
    cfgs = GROUP_PAIRS[objective]
    grouped = training.train_group(list(cfgs), tiny_acts)
    for cfg, result in zip(cfgs, grouped, strict=True):
        alone = training.train(cfg, tiny_acts)
        assert_same_weights(result.sae, alone.sae)
        assert result.sae.activation == alone.sae.activation
        assert result.metrics == alone.metrics
    assert not torch.equal(grouped[0].sae.W_enc, grouped[1].sae.W_enc)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("batch_size", {"batch_size": 32}),
        ("n_train", {"n_train": 704}),
        ("seed", {"seed": 1}),
        ("n_eval", {"n_eval": 100}),
        ("d_sae", {"sae": nn.SaeConfig(d_vit=8, exp_factor=3)}),
        ("objective", {"objective": TopK(k=2)}),
    ],
)
def test_group_refuses_configs_that_cannot_share_a_data_stream_or_shape(tiny_acts, field, change):
    other = dataclasses.replace(TINY, **change)
    with pytest.raises(ValueError, match=rf"must share {field} .*config 0 has .*config 1 has .*saev.training.group"):
        training.train_group([TINY, other], tiny_acts)


def test_group_refuses_matryoshka_configs_with_different_prefixes(tiny_acts):
    other = dataclasses.replace(TINY_MATRYOSHKA, **with_obj(TINY_MATRYOSHKA, prefixes=(8,)))
    with pytest.raises(ValueError, match="must share matryoshka prefixes"):
        training.train_group([TINY_MATRYOSHKA, other], tiny_acts)


def test_empty_group_is_refused(tiny_acts):
    with pytest.raises(ValueError, match="at least one TrainConfig"):
        training.train_group([], tiny_acts)


@pytest.mark.parametrize(
    ("cfg", "activation"),
    [
        (TINY, nn.Relu()),
        (TINY_TOPK, nn.TopK(1)),
        (dataclasses.replace(TINY_TOPK, objective=BatchTopK(k=1, aux_k=2, dead_tokens=64)), nn.JumpRelu),
        (TINY_MATRYOSHKA, nn.JumpRelu),
    ],
)
def test_trained_sae_is_saved_with_its_inference_rule(tiny_acts, tmp_path, cfg, activation):
    result = training.train(cfg, tiny_acts)
    nn.save(result.sae, tmp_path)
    loaded = nn.load(tmp_path)
    if isinstance(activation, type):
        assert isinstance(loaded.activation, activation) and loaded.activation.threshold > 0
    else:
        assert loaded.activation == activation
    held_out = tiny_acts[-TINY.n_eval :]
    assert training.get_metrics(loaded, held_out, n_steps=cfg.n_steps) == result.metrics


def test_group_progress_lines_list_every_sae(tiny_acts, caplog):
    with caplog.at_level(logging.INFO, logger="saev.training"):
        training.train_group(list(GROUP_PAIRS["topk"]), tiny_acts, log_every=5)
    step_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["5/10", "10/10"]
    fields = dict(part.strip().split(" ", 1) for part in step_lines[0].split("|")[3:])
    values = {name: [float(v) for v in fields[name].split(",")] for name in ("loss", "mse", "l0")}
    assert [len(v) for v in values.values()] == [2, 2, 2]
    assert all(math.isfinite(v) and v > 0 for vs in values.values() for v in vs)


def test_held_out_rows_do_not_influence_training(tiny_acts):
    n_train_rows = len(tiny_acts) - TINY.n_eval
    other = tiny_acts.copy()
    other[n_train_rows:] = np.random.default_rng(5).standard_normal(other[n_train_rows:].shape) * 100
    a = training.train(TINY, tiny_acts)
    b = training.train(TINY, other)
    assert_same_weights(a.sae, b.sae)
    assert a.metrics != b.metrics  # ...while the metrics are measured on exactly those rows


def test_memmap_input_gives_the_same_sae_as_an_array(tiny_acts, tmp_path):
    fpath = tmp_path / "acts.bin"
    mm = np.memmap(fpath, dtype=np.float32, mode="w+", shape=tiny_acts.shape)
    mm[:] = tiny_acts
    mm.flush()
    from_disk = np.memmap(fpath, dtype=np.float32, mode="r", shape=tiny_acts.shape)
    assert_same_weights(training.train(TINY, tiny_acts).sae, training.train(TINY, from_disk).sae)


def test_trained_sae_reads_raw_activations(tiny_acts):
    """The scale is folded in: decoder rows all have norm 1/scale, and the latents of raw rows are the training ones."""
    result = training.train(TINY, tiny_acts)
    n_train_rows = len(tiny_acts) - TINY.n_eval
    scale = training.get_data_stats(tiny_acts, n_train_rows).scale
    norms_S = result.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms_S, torch.full_like(norms_S, 1 / scale))
    assert result.sae.W_enc.device == torch.device("cpu")


def test_scale_makes_mean_norm_sqrt_d_vit(tiny_acts):
    stats = training.get_data_stats(tiny_acts * 7, n_train_rows=500)
    mean_norm = np.linalg.norm(tiny_acts[:500].astype(np.float64) * 7, axis=1).mean()
    assert stats.scale * mean_norm == pytest.approx(math.sqrt(8))
    np.testing.assert_allclose(stats.mean_D, tiny_acts[:500].astype(np.float64).mean(axis=0) * 7, rtol=1e-6)


def test_metrics_of_an_sae_with_no_active_latents():
    """Nothing fires, so x_hat = b_dec: with b_dec the mean, nmse is 1, l0 0, every latent dead, none dense."""
    acts = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=4, exp_factor=2))
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
        sae.b_dec.copy_(torch.from_numpy(acts.astype(np.float64).mean(axis=0)))
    metrics = training.get_metrics(sae, acts, n_steps=0)
    assert metrics.nmse == pytest.approx(1.0, rel=1e-6)
    assert (metrics.l0, metrics.dead_frac, metrics.dense_frac) == (0.0, 1.0, 0.0)
    assert metrics.mse == pytest.approx(acts.astype(np.float64).var(axis=0).mean(), rel=1e-6)


def test_metrics_count_dense_latents():
    """Latent 0 fires on every row, the others never: l0 1, dense 1/8, dead 7/8."""
    acts = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=4, exp_factor=2))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_enc[0] = 1.0
    metrics = training.get_metrics(sae, acts, n_steps=0)
    assert (metrics.l0, metrics.dense_frac, metrics.dead_frac) == (1.0, 1 / 8, 7 / 8)


def test_metrics_count_negative_values_of_a_topk_that_keeps_them():
    """An imported saev TopK SAE keeps its k largest pre-activations even when negative: those latents are active
    (its own rule). Here nearly every pre-activation is negative: l0 is k, few latents are dead, and `sae_health`
    does not call it a failed SAE (counting only positive values, l0 would be ~0 and every latent dead)."""
    from stages import reduce

    acts = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=8), nn.TopK(2, keep_negative=True))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))
        sae.b_enc.fill_(-20.0)
    with torch.no_grad():
        f_NS = sae.encode(torch.from_numpy(acts))
    assert (f_NS > 0).sum() < 10 and ((f_NS != 0).sum(dim=1) == 2).all()
    metrics = training.get_metrics(sae, acts, n_steps=0)
    freq_S = (f_NS != 0).double().mean(dim=0)
    assert metrics.l0 == 2.0
    assert metrics.dead_frac == float((freq_S == 0).double().mean()) < reduce.MAX_DEAD_FRAC
    assert metrics.dense_frac == float((freq_S > 0.1).double().mean())
    assert not [why for why in reduce.sae_health({**dataclasses.asdict(metrics), "nmse": 0.5}) if "dead" in why]


def test_progress_is_logged_at_most_every_log_every_steps(tiny_acts, caplog):
    with caplog.at_level(logging.INFO, logger="saev.training"):
        training.train(TINY, tiny_acts, log_every=4)
    step_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["4/10", "8/10", "10/10"]
    assert all(w in step_lines[0] for w in ("ex/s", "ETA", "loss", "mse", "l0"))


@pytest.mark.parametrize("row", [7, 590])
def test_nan_activations_are_refused_naming_the_row(tiny_acts, row):
    bad = tiny_acts.copy()
    bad[row, 3] = np.nan
    with pytest.raises(ValueError, match=f"row {row} contains NaN or inf"):
        training.train(TINY, bad)


def test_inf_activations_are_refused(tiny_acts):
    bad = tiny_acts.copy()
    bad[11, 0] = np.inf
    with pytest.raises(ValueError, match="row 11 contains NaN or inf"):
        training.train(TINY, bad)


def test_width_mismatch_is_refused(tiny_acts):
    with pytest.raises(ValueError, match="SAE expects d_vit=8 but activations have width 9"):
        training.train(TINY, np.zeros((600, 9), dtype=np.float32))


def test_too_few_training_rows_is_refused(tiny_acts):
    with pytest.raises(ValueError, match=r"only 62 training rows \(N=150 minus n_eval=88\) for batch_size=64"):
        training.train(TINY, tiny_acts[:150])


def test_config_rejects_n_train_below_one_batch():
    with pytest.raises(ValueError, match="n_train"):
        dataclasses.replace(TINY, n_train=10)


def test_training_from_shards_on_disk_equals_training_from_the_array(tiny_acts, tmp_path):
    """The train stage streams a dump's layer from disk (loader.ShardRows); same rows, same SAE."""
    from saev.data import loader
    from saev.data.shards import Shards
    from tests.lib.data.test_shards import make_md, write_dump

    md = make_md(n_imgs=150, n_patches=4, cls_token=True, layers=(2, 5), d_vit=8, budget=4 * 5 * 2 * 16)
    acts_NLTD = np.zeros((md.n_imgs, 2, 5, 8), dtype=np.float32)
    acts_NLTD[:, 1, 1:] = tiny_acts.reshape(150, 4, 8)  # layer 5's patches are tiny_acts; CLS and layer 2 are not
    acts_NLTD[:, 0] = -1.0
    write_dump(tmp_path, md, acts_NLTD, batch_sizes=(7,))
    cfg = dataclasses.replace(TINY_WINDOWED, chunk_rows=24)  # chunks straddle images and shards
    from_disk = training.train(cfg, loader.ShardRows(Shards(tmp_path), 5))
    in_ram = training.train(cfg, tiny_acts)
    assert_same_weights(from_disk.sae, in_ram.sae)
    assert from_disk.metrics == in_ram.metrics


@pytest.mark.parametrize("objective", list(GROUP_PAIRS))
def test_a_group_computed_in_tiles_equals_the_group_computed_at_once(tiny_acts, monkeypatch, objective):
    """On CPU large groups are computed a few SAEs at a time (objectives.get_tile_size); same weights, metrics and
    inference thresholds."""
    cfgs = list(GROUP_PAIRS[objective]) + [dataclasses.replace(GROUP_PAIRS[objective][0], lr=5e-3)]
    at_once = training.train_group(cfgs, tiny_acts)
    monkeypatch.setattr(objectives, "_CPU_TILE_BYTES", 2 * TINY.batch_size * cfgs[0].sae.d_sae * 4)  # tiles of 2, 1
    assert isinstance(training.GroupTrainer(cfgs, np.zeros(8)).objective, objectives.TiledObjective)
    tiled = training.train_group(cfgs, tiny_acts)
    for a, b in zip(at_once, tiled, strict=True):
        assert_same_weights(a.sae, b.sae)
        assert a.metrics == b.metrics
        assert a.sae.activation == b.sae.activation


def test_a_config_carries_only_the_fields_of_its_objective():
    """What get_canonical did by resetting ignored fields, the types now do: each objective has its own fields."""
    assert {f.name for f in dataclasses.fields(ReluL1)} == {"l1_coeff"}
    assert {f.name for f in dataclasses.fields(TopK)} == {"k", "aux_k", "aux_coeff", "dead_tokens"}
    assert {f.name for f in dataclasses.fields(Matryoshka)} == {"k", "aux_k", "aux_coeff", "dead_tokens", "prefixes"}
    assert not any(f.name in {"l1_coeff", "k"} for f in dataclasses.fields(training.TrainConfig))


def test_group_adam_equals_torch_adam_per_sae():
    """The batched Adam update (one learning rate per SAE) is torch.optim.Adam's, SAE by SAE: same moments, same bias
    correction and epsilon, over several steps with fresh gradients."""
    cfgs = [dataclasses.replace(TINY, warmup_steps=0, lr=lr) for lr in (1e-3, 3e-2)]
    trainer = training.GroupTrainer(cfgs, np.zeros(8))
    names = [name for name, _ in trainer.stack.named_parameters()]
    refs = [
        {name: p.detach()[s].clone().requires_grad_(True) for name, p in trainer.stack.named_parameters()}
        for s in range(len(cfgs))
    ]
    optims = [
        torch.optim.Adam(list(ref.values()), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
        for ref, cfg in zip(refs, cfgs, strict=True)
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for name, p in trainer.stack.named_parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            for s, ref in enumerate(refs):
                ref[name].grad = p.grad[s].clone()
        trainer._adam_step_()
        trainer.step += 1
        for optim in optims:
            optim.step()
        for name, p in trainer.stack.named_parameters():
            for s, ref in enumerate(refs):
                torch.testing.assert_close(p.detach()[s], ref[name].detach(), rtol=1e-6, atol=1e-7, msg=f"{name}[{s}]")
    assert names == ["W_enc", "b_enc", "W_dec", "b_dec"]
