"""Training objectives: each keeps its defining property (TopK's k per example, BatchTopK's k * batch_size per batch
and inference threshold, Matryoshka's nested prefixes, AuxK's revival of dead latents, unit decoder rows)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from saev import nn, objectives, training

D_VIT = 8


def make_cfg(objective: str, **kwargs) -> training.TrainConfig:
    """A TrainConfig of the objective kind `objective`; objective fields it does not read (e.g. `k` for relu_l1) are
    left out, so that one call serves every objective (`matryoshka_prefixes` is the matryoshka `prefixes`)."""
    if "matryoshka_prefixes" in kwargs:
        kwargs["prefixes"] = kwargs.pop("matryoshka_prefixes")
    obj_names = {f.name for cls in objectives.CONFIGS for f in dataclasses.fields(cls)}
    cls = objectives.KINDS[objective]
    own = {f.name for f in dataclasses.fields(cls)}
    obj = cls(**{k: v for k, v in kwargs.items() if k in own})
    fields = dict(n_train=64, batch_size=64, warmup_steps=0, n_eval=1, lr=1e-2)
    fields |= {k: v for k, v in kwargs.items() if k not in obj_names}
    return training.TrainConfig(sae=nn.SaeConfig(d_vit=D_VIT, exp_factor=4), objective=obj, **fields)


def make_trainer(*cfgs: training.TrainConfig) -> training.GroupTrainer:
    return training.GroupTrainer(list(cfgs), np.zeros(D_VIT), device="cpu")


def make_batch(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_VIT, generator=torch.Generator().manual_seed(seed))


def no_dead(trainer: training.GroupTrainer) -> torch.Tensor:
    return torch.zeros_like(trainer.dead_mask())


def test_objectives_registry():
    assert list(objectives.KINDS) == ["relu_l1", "topk", "batchtopk", "matryoshka"]
    assert set(objectives.IMPLEMENTATIONS) == set(objectives.CONFIGS)


def test_unknown_objective_is_refused_with_the_known_ones():
    from saev import configs

    with pytest.raises(
        configs.ConfigError,
        match=r"'objective' must be a kind, one of 'relu_l1', 'topk', 'batchtopk', 'matryoshka', got 'jumprelu'",
    ):
        configs.from_dict(training.TrainConfig, {"sae": {"d_vit": 8}, "objective": "jumprelu"}, "t.toml")


def test_an_objective_carries_only_its_own_fields():
    with pytest.raises(TypeError):
        objectives.ReluL1(k=3)
    with pytest.raises(TypeError):
        objectives.TopK(l1_coeff=0.1)


@pytest.mark.parametrize("objective", ["topk", "batchtopk", "matryoshka"])
def test_k_above_d_sae_is_refused(objective):
    with pytest.raises(ValueError, match="k=33 is larger than d_sae=32"):
        make_cfg(objective, k=33)


@pytest.mark.parametrize("objective", list(objectives.KINDS))
def test_decoder_rows_are_unit_norm_after_a_step(objective):
    trainer = make_trainer(make_cfg(objective, k=3))
    before = trainer.stack.W_dec.detach().clone()
    trainer.step_(make_batch())
    W_dec = trainer.stack.W_dec.detach()
    assert not torch.equal(W_dec, before)
    torch.testing.assert_close(W_dec.norm(dim=2), torch.ones(1, 32))


#############
# Gradients #
#############


def reference_loss_S(cfgs, W_enc, b_enc, W_dec, b_dec, x_BD, step, dead_SK) -> torch.Tensor:
    """The objectives written plainly for autograd: the specification the hand-written backward must match."""
    pre_SBK = (x_BD.unsqueeze(0) - b_dec.unsqueeze(1)) @ W_enc + b_enc.unsqueeze(1)
    S, B, K = pre_SBK.shape
    objective = cfgs[0].objective.kind
    fs = []
    for s, cfg in enumerate(cfgs):
        if objective == "relu_l1":
            fs.append(torch.relu(pre_SBK[s]))
        elif objective == "topk":
            vals_BJ, idx_BJ = pre_SBK[s].topk(cfg.objective.k, dim=1)
            fs.append(torch.zeros(B, K, dtype=x_BD.dtype).scatter(1, idx_BJ, torch.relu(vals_BJ)))
        else:
            vals_J, idx_J = pre_SBK[s].reshape(-1).topk(cfg.objective.k * B)
            fs.append(torch.zeros(B * K, dtype=x_BD.dtype).scatter(0, idx_J, torch.relu(vals_J)).view(B, K))
    f_SBK = torch.stack(fs)
    prefixes = objectives.get_matryoshka_prefixes(cfgs[0].objective, K) if objective == "matryoshka" else (K,)
    loss_S = 0.0
    for m in prefixes:
        x_hat_SBD = f_SBK[:, :, :m] @ W_dec[:, :m] + b_dec.unsqueeze(1)
        loss_S = loss_S + (x_hat_SBD - x_BD).pow(2).mean(dim=(1, 2))
    if objective == "relu_l1":
        coeff_S = torch.tensor([c.objective.l1_coeff * min(1.0, (step + 1) / max(c.warmup_steps, 1)) for c in cfgs])
        loss_S = loss_S + coeff_S * (f_SBK * W_dec.norm(dim=2).unsqueeze(1)).sum(dim=2).mean(dim=1)
    else:
        e_SBD = (x_BD - x_hat_SBD).detach()
        for s, cfg in enumerate(cfgs):
            if dead_SK[s].any():
                masked_BK = torch.where(dead_SK[s], pre_SBK[s], -math.inf)
                vals_BJ, idx_BJ = masked_BK.topk(min(cfg.objective.aux_k, K), dim=1)
                f_aux_BK = torch.zeros(B, K, dtype=x_BD.dtype).scatter(1, idx_BJ, torch.relu(vals_BJ))
                err = (f_aux_BK @ W_dec[s] - e_SBD[s]).pow(2).sum()
                aux = err / (e_SBD[s] - e_SBD[s].mean(dim=0)).pow(2).sum()
                loss_S = loss_S + cfg.objective.aux_coeff * aux * torch.eye(S)[s]
    return loss_S


@pytest.mark.parametrize("objective", list(objectives.KINDS))
def test_hand_written_gradients_equal_autograd(objective):
    """float64, a group of two SAEs with different k, aux_k, aux_coeff and l1_coeff, dead latents for AuxK."""
    cfgs = [
        make_cfg(objective, k=3, aux_k=3, aux_coeff=0.5, l1_coeff=0.1, warmup_steps=5, matryoshka_prefixes=(4, 12)),
        make_cfg(objective, k=5, aux_k=2, aux_coeff=0.25, l1_coeff=0.2, matryoshka_prefixes=(4, 12)),
    ]
    stack = nn.SaeStack([cfg.sae for cfg in cfgs]).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x_BD = torch.randn(16, D_VIT, generator=gen, dtype=torch.float64)
    dead_SK = torch.zeros(2, 32, dtype=torch.bool)
    dead_SK[0, [1, 4, 7, 20]] = True
    dead_SK[1, [2, 30]] = True
    objective_fn = objectives.make_objective(
        [c.objective for c in cfgs], 32, [c.warmup_steps for c in cfgs], torch.device("cpu")
    )
    loss = objective_fn(stack, x_BD, 2, dead_SK)

    params = [p.detach().clone().requires_grad_(True) for p in (stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec)]
    expected_S = reference_loss_S(cfgs, *params, x_BD, 2, dead_SK)
    expected_S.sum().backward()
    torch.testing.assert_close(loss.loss, expected_S.detach())
    for name, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), params, strict=True):
        torch.testing.assert_close(getattr(stack, name).grad, ref.grad, msg=name)
    if objective != "relu_l1":
        assert (loss.aux > 0).all()


########
# TopK #
########


def test_topk_keeps_exactly_k_latents_per_example():
    trainer = make_trainer(make_cfg("topk", k=3), make_cfg("topk", k=5))
    with torch.no_grad():
        trainer.stack.b_enc.add_(100.0)  # every pre-activation positive, so the ReLU zeroes none of the kept ones
    x_BD = make_batch()
    loss = trainer.objective(trainer.stack, x_BD, 0, no_dead(trainer))
    counts_SB = (loss.f_SBK > 0).sum(dim=2)
    assert (counts_SB[0] == 3).all() and (counts_SB[1] == 5).all()
    # ...and they are the largest pre-activations, passed through unchanged.
    pre_SBK = trainer.stack.pre_acts(x_BD).detach()
    kept_SBK = loss.f_SBK > 0
    assert torch.equal(loss.f_SBK[kept_SBK], pre_SBK[kept_SBK])
    kth_SB1 = pre_SBK[0].topk(3, dim=1).values[:, -1:]
    assert torch.equal(kept_SBK[0], pre_SBK[0] >= kth_SB1)


def test_topk_keeps_fewer_when_pre_activations_are_negative():
    trainer = make_trainer(make_cfg("topk", k=3))
    with torch.no_grad():
        trainer.stack.b_enc.fill_(-100.0)
        trainer.stack.b_enc[0, 7] = 100.0
    loss = trainer.objective(trainer.stack, make_batch(), 0, no_dead(trainer))
    assert torch.equal((loss.f_SBK > 0).sum(dim=2), torch.ones(1, 64, dtype=torch.long))


def test_topk_sae_encodes_like_it_was_trained():
    trainer = make_trainer(make_cfg("topk", k=4))
    trainer.step_(make_batch(seed=1))
    (sae,) = trainer.get_saes(scale=1.0)
    assert sae.activation == nn.TopK(4)
    x_BD = make_batch(seed=2)
    loss = trainer.objective(trainer.stack, x_BD, 1, no_dead(trainer))
    torch.testing.assert_close(sae.encode(x_BD), loss.f_SBK[0])


#############
# BatchTopK #
#############


def test_batchtopk_keeps_k_times_batch_size_over_the_batch():
    trainer = make_trainer(make_cfg("batchtopk", k=2), make_cfg("batchtopk", k=3))
    with torch.no_grad():
        trainer.stack.b_enc.add_(100.0)
    loss = trainer.objective(trainer.stack, make_batch(), 0, no_dead(trainer))
    counts_SB = (loss.f_SBK > 0).sum(dim=2)
    assert counts_SB.sum(dim=1).tolist() == [2 * 64, 3 * 64]
    assert counts_SB[0].min() != counts_SB[0].max()  # a budget shared by the batch, not k per example


def test_batchtopk_threshold_is_the_running_mean_of_the_minimum_positive_activation():
    trainer = make_trainer(make_cfg("batchtopk", k=2))
    mins = []
    for seed in range(3):
        f_SBK = trainer.step_(make_batch(seed=seed)).f_SBK
        mins.append(f_SBK[f_SBK > 0].min().item())
    assert float(trainer.objective.threshold_S[0]) == pytest.approx(np.mean(mins), rel=1e-12)


def test_batchtopk_sae_uses_its_threshold_at_inference():
    trainer = make_trainer(make_cfg("batchtopk", k=2))
    for seed in range(3):
        trainer.step_(make_batch(seed=seed))
    (sae,) = trainer.get_saes(scale=1.0)
    threshold = float(trainer.objective.threshold_S[0])
    assert sae.activation == nn.JumpRelu(threshold) and threshold > 0
    x_BD = make_batch(seed=9)
    pre_BK = sae.pre_acts(x_BD)
    torch.testing.assert_close(sae.encode(x_BD), pre_BK * (pre_BK > threshold))
    # A per-latent rule: a block of latents is encoded on its own.
    torch.testing.assert_close(sae.encode(x_BD, latents=slice(4, 9)), sae.encode(x_BD)[:, 4:9])


##############
# Matryoshka #
##############


def test_matryoshka_loss_is_the_sum_of_each_prefix_reconstruction_error():
    trainer = make_trainer(make_cfg("matryoshka", k=4, matryoshka_prefixes=(4, 12)))
    stack, x_BD = trainer.stack, make_batch()
    loss = trainer.objective(stack, x_BD, 0, no_dead(trainer))
    f_BK = loss.f_SBK[0]
    expected = 0.0
    for m in (4, 12, 32):
        x_hat_BD = f_BK[:, :m] @ stack.W_dec[0, :m] + stack.b_dec[0]
        expected += (x_hat_BD - x_BD).pow(2).mean()
    torch.testing.assert_close(loss.loss[0], expected)
    torch.testing.assert_close(loss.mse[0], (f_BK @ stack.W_dec[0] + stack.b_dec[0] - x_BD).pow(2).mean())


@pytest.mark.parametrize(
    ("prefixes", "resolved"), [((), (2, 8, 32)), ((4, 12), (4, 12, 32)), ((4, 32), (4, 32)), ((32,), (32,))]
)
def test_matryoshka_prefixes_end_with_the_whole_dictionary(prefixes, resolved):
    cfg = make_cfg("matryoshka", k=2, matryoshka_prefixes=prefixes)
    assert objectives.get_matryoshka_prefixes(cfg.objective, cfg.sae.d_sae) == resolved


@pytest.mark.parametrize(
    ("prefixes", "msg"),
    [((8, 4), "strictly increasing"), ((0, 4), "positive"), ((4, 4), "strictly increasing"), ((64,), "exceed")],
)
def test_matryoshka_refuses_bad_prefixes(prefixes, msg):
    with pytest.raises(ValueError, match=msg):
        make_cfg("matryoshka", k=2, matryoshka_prefixes=prefixes)


def test_matryoshka_first_prefix_reconstructs_better_than_plain_batchtopk():
    """The point of the nesting: the first latents alone must already reconstruct, which BatchTopK does not ask."""
    rng = np.random.default_rng(0)
    atoms_AD = rng.standard_normal((24, D_VIT))
    codes_NA = (rng.random((2048, 24)) < 0.1) * rng.uniform(1, 2, (2048, 24))
    acts_ND = (codes_NA @ atoms_AD).astype(np.float32)

    def prefix_nmse(objective: str) -> float:
        cfg = make_cfg(objective, k=3, matryoshka_prefixes=(4,), lr=3e-3, n_train=64 * 150, n_eval=256)
        sae = training.train(cfg, acts_ND).sae
        x_BD = torch.from_numpy(acts_ND[-256:])
        x_hat_BD = sae.encode(x_BD)[:, :4] @ sae.W_dec[:4] + sae.b_dec
        return ((x_hat_BD - x_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()).item()

    assert prefix_nmse("matryoshka") < 0.9 * prefix_nmse("batchtopk")


########
# AuxK #
########


def make_dead_latent_case(aux_coeff: float) -> training.GroupTrainer:
    """k=1 with hand-set weights on rows x = c * e0 + s * e1 (c in {1, 2}, s = +-1, b_dec = 1.5 e0):

    latents 0 and 2 (+-e0) reconstruct the e0 part perfectly and always win with pre-activation 0.5; the +-e1 part
    is left as residual, which no latent of the main loss can take (s is independent of c). Latent 1 reads 0.3 e1
    (pre-activation +-0.3 < 0.5, so it never fires) and would decode e1: dead, but useful. All others are off.
    """
    cfg = make_cfg("topk", k=1, aux_k=4, aux_coeff=aux_coeff, dead_tokens=3 * 64)
    e0, e1 = torch.eye(D_VIT)[:2]
    trainer = training.GroupTrainer([cfg], (1.5 * e0).numpy(), device="cpu")
    with torch.no_grad():
        W_enc_DK, b_enc_K, W_dec_KD = trainer.stack.W_enc[0], trainer.stack.b_enc[0], trainer.stack.W_dec[0]
        W_enc_DK[:] = -2 * (e0 + e1)[:, None]
        b_enc_K.fill_(-5.0)
        for j, enc_D, dec_D in [(0, e0, e0), (2, -e0, -e0), (1, 0.3 * e1, e1)]:
            W_enc_DK[:, j], W_dec_KD[j], b_enc_K[j] = enc_D, dec_D, 0.0
    return trainer


def fires_of_latent_1(trainer: training.GroupTrainer, n_steps: int) -> list[int]:
    rng = np.random.default_rng(0)
    e0, e1 = torch.eye(D_VIT)[:2]
    fires = []
    for _ in range(n_steps):
        c_B1 = torch.from_numpy(rng.integers(1, 3, (64, 1))).float()
        s_B1 = torch.from_numpy(rng.choice([-1.0, 1.0], (64, 1))).float()
        f_SBK = trainer.step_(c_B1 * e0 + s_B1 * e1).f_SBK
        fires.append(int((f_SBK[0, :, 1] > 0).sum()))
    return fires


def test_without_auxk_a_dead_latent_stays_dead_and_untouched():
    trainer = make_dead_latent_case(aux_coeff=0.0)
    enc_before = trainer.stack.W_enc[0, :, 1].detach().clone()
    assert sum(fires_of_latent_1(trainer, 40)) == 0
    assert torch.equal(trainer.stack.W_enc[0, :, 1], enc_before)
    assert bool(trainer.dead_mask()[0, 1])


def test_auxk_revives_a_dead_latent():
    trainer = make_dead_latent_case(aux_coeff=1 / 32)
    fires = fires_of_latent_1(trainer, 40)
    assert sum(fires[:3]) == 0  # dead from the start: AuxK only starts once it has not fired for dead_tokens
    assert sum(fires[-10:]) > 0 and not bool(trainer.dead_mask()[0, 1])


def test_auxk_is_zero_while_no_latent_is_dead():
    trainer = make_trainer(make_cfg("topk", k=3, dead_tokens=10**6))
    assert trainer.step_(make_batch()).aux.tolist() == [0.0]
    trainer.tokens_since_fired_SK[0, 5] = 10**6  # latent 5 now counts as dead
    assert trainer.step_(make_batch(seed=1)).aux.item() > 0


@pytest.mark.parametrize("objective", ["topk", "batchtopk"])
def test_auxk_loss_is_the_normalised_error_of_dead_latents_on_the_residual(objective):
    trainer = make_trainer(make_cfg(objective, k=3, aux_k=2))
    stack, x_BD = trainer.stack, make_batch()
    dead_SK = torch.zeros(1, 32, dtype=torch.bool)
    dead_SK[0, [1, 5, 9]] = True
    loss = trainer.objective(stack, x_BD, 0, dead_SK)
    pre_BK = stack.pre_acts(x_BD)[0].detach()
    e_BD = x_BD - (loss.f_SBK[0] @ stack.W_dec[0] + stack.b_dec[0]).detach()
    masked_BK = torch.where(dead_SK[0], pre_BK, -math.inf)
    vals_BJ, idx_BJ = masked_BK.topk(2, dim=1)
    f_aux_BK = torch.zeros_like(pre_BK).scatter(1, idx_BJ, torch.relu(vals_BJ))
    expected = (f_aux_BK @ stack.W_dec[0].detach() - e_BD).pow(2).sum() / (e_BD - e_BD.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss.aux[0], expected)
