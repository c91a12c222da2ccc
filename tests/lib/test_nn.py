"""The SAE model: its formula, its decoder invariants, folding the activation scale, and its checkpoint files."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saev import nn


def make_sae(d_vit: int = 8, exp_factor: int = 4, seed: int = 0) -> nn.SparseAutoencoder:
    """An SAE with every parameter randomised (not just the init), so no term of the formula is trivially zero."""
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=d_vit, exp_factor=exp_factor, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def test_d_sae_is_d_vit_times_exp_factor():
    assert nn.SaeConfig(d_vit=6, exp_factor=3).d_sae == 18


def test_parameter_shapes():
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=5, exp_factor=2))
    assert {k: tuple(v.shape) for k, v in sae.state_dict().items()} == {
        "W_enc": (5, 10),
        "b_enc": (10,),
        "W_dec": (10, 5),
        "b_dec": (5,),
    }


def test_init_is_a_function_of_the_seed():
    a, b, c = (nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.W_dec, c.W_dec)


def test_init_has_unit_decoder_rows_and_tied_encoder():
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=4))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_encode_and_decode_follow_the_formula():
    sae = make_sae()
    x_BD = torch.randn(5, 8)
    out = sae(x_BD)
    f_BS = torch.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.f_BS, f_BS)
    torch.testing.assert_close(out.x_hat_BD, f_BS @ sae.W_dec + sae.b_dec)
    assert (out.f_BS >= 0).all() and (out.f_BS == 0).any()


def test_encoding_a_block_of_latents_equals_those_columns_of_the_full_encoding():
    sae = make_sae(d_vit=8, exp_factor=4)
    x_BD = torch.randn(5, 8)
    block_BK = sae.encode(x_BD, latents=slice(8, 20))
    assert block_BK.shape == (5, 12)
    torch.testing.assert_close(block_BK, sae.encode(x_BD)[:, 8:20])


def test_encode_rejects_wrong_width():
    sae = make_sae(d_vit=8)
    with pytest.raises(ValueError, match="SAE expects d_vit=8 but activations have width 9"):
        sae.encode(torch.randn(2, 9))


def test_decoder_rows_are_unit_norm_after_an_optimizer_step():
    sae = make_sae()
    sae.normalize_decoder_()
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    x_hat_BD, f_BS = sae(torch.randn(16, 8))
    (x_hat_BD.pow(2).sum() + f_BS.sum()).backward()
    opt.step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))  # the step did move the norms
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_remove_parallel_grads_leaves_only_the_orthogonal_part():
    sae = make_sae().double()  # float64 so that rounding cannot hide a wrong projection
    sae.normalize_decoder_()
    x_hat_BD, _ = sae(torch.randn(16, 8, dtype=torch.float64))
    x_hat_BD.pow(2).sum().backward()
    grad_SD = sae.W_dec.grad.clone()
    sae.remove_parallel_grads_()
    W_SD = sae.W_dec.detach()
    # No component along each row remains...
    residual_S = (sae.W_dec.grad * W_SD).sum(dim=1).abs() / grad_SD.norm(dim=1).clamp_min(1e-12)
    assert (residual_S < 1e-12).all()
    # ...and what was removed is exactly that component.
    parallel_SD = (grad_SD * W_SD).sum(dim=1, keepdim=True) * W_SD
    torch.testing.assert_close(sae.W_dec.grad, grad_SD - parallel_SD)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_folded_sae_on_raw_acts_matches_unfolded_sae_on_scaled_acts(scale, seed):
    unfolded = make_sae(seed=seed).double()
    folded = make_sae(seed=seed).double()
    folded.fold_scale_(scale)
    raw_BD = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10

    f_folded_BS = folded.encode(raw_BD)
    f_unfolded_BS = unfolded.encode(raw_BD * scale)
    torch.testing.assert_close(f_folded_BS, f_unfolded_BS, rtol=1e-9, atol=1e-9 * max(scale, 1.0) * 100)
    torch.testing.assert_close(folded.decode(f_folded_BS), unfolded.decode(f_unfolded_BS) / scale)


def test_fold_scale_in_float32_keeps_latents():
    sae = make_sae()
    folded = make_sae()
    folded.fold_scale_(3.7)
    raw_BD = torch.randn(64, 8)
    torch.testing.assert_close(folded.encode(raw_BD), sae.encode(raw_BD * 3.7), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_fold_scale_rejects_non_positive_or_non_finite(scale):
    with pytest.raises(ValueError, match="scale"):
        make_sae().fold_scale_(scale)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    sae = make_sae(d_vit=8, exp_factor=2, seed=3)
    nn.save(sae, tmp_path / "ckpt")
    loaded = nn.load(tmp_path / "ckpt")
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_save_writes_exactly_the_weights_and_the_config_as_json(tmp_path):
    sae = make_sae(d_vit=8, exp_factor=2, seed=3)
    nn.save(sae, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["sae.json", "sae.safetensors"]
    assert json.loads((tmp_path / "sae.json").read_text()) == {
        "d_vit": 8,
        "exp_factor": 2,
        "seed": 3,
        "activation": {"kind": "relu"},
    }


def test_load_moves_to_the_requested_device(tmp_path):
    nn.save(make_sae(), tmp_path)
    assert nn.load(tmp_path, device="cpu").W_enc.device == torch.device("cpu")


@pytest.mark.parametrize("fname", ["sae.json", "sae.safetensors"])
def test_load_names_the_missing_file(tmp_path, fname):
    nn.save(make_sae(), tmp_path)
    (tmp_path / fname).unlink()
    with pytest.raises(FileNotFoundError, match=fname):
        nn.load(tmp_path)


def test_load_rejects_weights_whose_shapes_disagree_with_the_config(tmp_path):
    nn.save(make_sae(d_vit=8), tmp_path)
    (tmp_path / "sae.json").write_text(json.dumps({"d_vit": 16, "exp_factor": 4, "seed": 0}))
    with pytest.raises(ValueError, match=r"sae\.safetensors.*sae\.json"):
        nn.load(tmp_path)


def test_load_rejects_a_config_with_unknown_fields(tmp_path):
    nn.save(make_sae(), tmp_path)
    (tmp_path / "sae.json").write_text(json.dumps({"d_vit": 8, "exp_factor": 4, "seed": 0, "k": 3}))
    with pytest.raises(ValueError, match=r"sae\.json is not a valid SaeConfig"):
        nn.load(tmp_path)


@pytest.mark.parametrize("field,value", [("d_vit", "8"), ("seed", 1.5), ("keep_negative", "yes")])
def test_load_names_the_file_and_a_field_of_the_wrong_type(tmp_path, field, value):
    """A mistyped field is a ValueError (one line, naming the file and the field), not beartype's own violation."""
    nn.save(make_sae(d_vit=8), tmp_path)
    fields = {"d_vit": 8, "exp_factor": 4, "seed": 0, "activation": {"kind": "topk", "k": 3}}
    if field == "keep_negative":
        fields["activation"][field] = value
    else:
        fields[field] = value
    (tmp_path / "sae.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError) as info:
        nn.load(tmp_path)
    msg = str(info.value)
    assert type(info.value) is ValueError and "\n" not in msg, msg
    assert f"{tmp_path / 'sae.json'} is not a valid SaeConfig" in msg and f"{field}={value!r}" in msg, msg


def test_saved_file_is_plain_safetensors(tmp_path):
    """The weights file is readable without torch pickles (numpy loader), i.e. no code runs on load."""
    from safetensors.numpy import load_file

    sae = make_sae()
    nn.save(sae, tmp_path)
    arrays = load_file(str(tmp_path / "sae.safetensors"))
    np.testing.assert_array_equal(arrays["W_enc"], sae.W_enc.detach().numpy())


####################
# Activation rules #
####################


def test_topk_activation_keeps_the_k_largest_of_each_example_through_a_relu():
    pre_BS = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, 1.0, -0.5]])
    f_BS = nn.TopK(2)(pre_BS)
    assert torch.equal(f_BS, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))


def test_jumprelu_activation_zeroes_pre_activations_at_or_below_the_threshold():
    pre_BS = torch.tensor([[0.5, 0.25, -1.0, 2.0]])
    assert torch.equal(nn.JumpRelu(0.25)(pre_BS), torch.tensor([[0.5, 0.0, 0.0, 2.0]]))


@pytest.mark.parametrize(
    ("make", "msg"), [(lambda: nn.TopK(0), "k must be positive"), (lambda: nn.JumpRelu(-0.1), "threshold")]
)
def test_activation_parameters_are_checked(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


@pytest.mark.parametrize("activation", [nn.Relu(), nn.TopK(3), nn.JumpRelu(0.3)])
def test_encoding_a_block_equals_those_columns_for_every_activation(activation):
    sae = make_sae(d_vit=8, exp_factor=4)
    sae.activation = activation
    x_BD = torch.randn(16, 8)
    full_BS = sae.encode(x_BD)
    for block in (slice(0, 8), slice(8, 20), slice(20, 32)):
        torch.testing.assert_close(sae.encode(x_BD, latents=block), full_BS[:, block])


def test_topk_sae_has_at_most_k_active_latents_per_example():
    sae = make_sae(d_vit=8, exp_factor=4)
    sae.activation = nn.TopK(3)
    f_BS = sae.encode(torch.randn(64, 8))
    assert (f_BS > 0).sum(dim=1).max() <= 3 and (f_BS > 0).sum(dim=1).max() == 3


@pytest.mark.parametrize("activation", [nn.TopK(3), nn.JumpRelu(0.3)])
def test_folding_the_scale_keeps_the_activation_rule_valid(activation):
    """Folding preserves pre-activations, so k and the threshold mean the same on raw activations."""
    unfolded, folded = make_sae().double(), make_sae().double()
    unfolded.activation = folded.activation = activation
    folded.fold_scale_(3.7)
    raw_BD = torch.randn(64, 8, dtype=torch.float64)
    torch.testing.assert_close(folded.encode(raw_BD), unfolded.encode(raw_BD * 3.7))


@pytest.mark.parametrize(
    ("activation", "saved"),
    [
        (nn.Relu(), {"kind": "relu"}),
        (nn.TopK(3), {"kind": "topk", "k": 3}),
        (nn.JumpRelu(0.125), {"kind": "jumprelu", "threshold": 0.125}),
    ],
)
def test_save_load_round_trip_keeps_the_activation_rule(tmp_path, activation, saved):
    sae = make_sae()
    sae.activation = activation
    nn.save(sae, tmp_path)
    assert json.loads((tmp_path / "sae.json").read_text())["activation"] == saved
    loaded = nn.load(tmp_path)
    assert loaded.activation == activation
    x_BD = torch.randn(8, 8)
    assert torch.equal(loaded.encode(x_BD), sae.encode(x_BD))


def test_config_without_an_activation_loads_as_relu(tmp_path):
    """SAE directories written before activation rules existed stay readable."""
    nn.save(make_sae(), tmp_path)
    (tmp_path / "sae.json").write_text(json.dumps({"d_vit": 8, "exp_factor": 4, "seed": 0}))
    assert nn.load(tmp_path).activation == nn.Relu()


@pytest.mark.parametrize(
    ("activation", "msg"),
    [({"kind": "gelu"}, "unknown activation kind 'gelu'"), ({"kind": "topk"}, "invalid topk"), ("relu", "object")],
)
def test_load_refuses_a_bad_activation(tmp_path, activation, msg):
    nn.save(make_sae(), tmp_path)
    (tmp_path / "sae.json").write_text(json.dumps({"d_vit": 8, "exp_factor": 4, "seed": 0, "activation": activation}))
    with pytest.raises(ValueError, match=rf"sae\.json is not a valid SaeConfig: .*{msg}"):
        nn.load(tmp_path)


#############
# SAE stack #
#############


def test_stack_slices_are_initialised_like_single_saes():
    cfgs = [nn.SaeConfig(d_vit=8, exp_factor=2, seed=s) for s in (0, 1, 2)]
    stack = nn.SaeStack(cfgs)
    for s, cfg in enumerate(cfgs):
        for name, tensor in nn.SparseAutoencoder(cfg).state_dict().items():
            assert torch.equal(getattr(stack, name)[s], tensor), (s, name)


def test_stack_encodes_and_decodes_each_sae_like_the_single_sae():
    cfgs = [nn.SaeConfig(d_vit=8, exp_factor=2, seed=s) for s in (0, 1)]
    stack = nn.SaeStack(cfgs)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape))
    x_BD = torch.randn(5, 8)
    pre_SBK = stack.pre_acts(x_BD)
    x_hat_SBD = stack.decode(torch.relu(pre_SBK))
    for s in range(2):
        sae = stack.get_sae(s)
        torch.testing.assert_close(pre_SBK[s], sae.pre_acts(x_BD))
        torch.testing.assert_close(x_hat_SBD[s], sae(x_BD).x_hat_BD)


def test_stack_refuses_saes_of_different_shapes():
    with pytest.raises(ValueError, match="must share d_vit and d_sae"):
        nn.SaeStack([nn.SaeConfig(d_vit=8, exp_factor=2), nn.SaeConfig(d_vit=8, exp_factor=4)])


def test_topk_keeps_exactly_k_latents_even_with_ties():
    """Exactly k selected per example (as training's top-k and saev's TopK); ties at the k-th: torch.topk picks."""
    pre_BS = torch.tensor([[1.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, -1.0], [-1.0, -2.0, 0.5, -3.0]])
    f_BS = nn.TopK(2)(pre_BS)
    assert (f_BS != 0).sum(dim=1).tolist() == [2, 2, 1]  # the third row's second largest is negative: ReLU'd to 0
    assert torch.equal(f_BS[0], torch.tensor([0.0, 2.0, 2.0, 0.0])) and set(f_BS[1].tolist()) == {0.0, 3.0}
    assert torch.equal(nn.TopK(2, keep_negative=True)(pre_BS)[2], torch.tensor([-1.0, 0.0, 0.5, 0.0]))


def test_a_topk_block_given_each_rows_selected_latents_computes_only_its_columns(monkeypatch):
    sae = make_sae(d_vit=8, exp_factor=4)
    sae.activation = nn.TopK(3)
    x_BD = torch.randn(16, 8)
    blocks = (slice(0, 8), slice(8, 20), slice(20, 32))
    pre_BS = torch.cat([sae.pre_acts(x_BD, block) for block in blocks], dim=1)
    top_Bk = sae.activation.top_latents(pre_BS)
    full_BS = sae.activation.select(pre_BS, top_Bk)
    assert torch.equal(full_BS, sae.activation(pre_BS))
    asked = []
    pre_acts = sae.pre_acts
    monkeypatch.setattr(sae, "pre_acts", lambda x, latents=None: asked.append(latents) or pre_acts(x, latents))
    for block in blocks:
        assert torch.equal(sae.encode(x_BD, latents=block, top_Bk=top_Bk), full_BS[:, block])
    assert asked == list(blocks)


def test_selected_latents_are_refused_for_a_per_latent_activation():
    sae = make_sae(d_vit=8, exp_factor=4)
    with pytest.raises(ValueError, match="top_Bk only applies to a TopK SAE"):
        sae.encode(torch.randn(2, 8), latents=slice(0, 4), top_Bk=torch.zeros(2, 1, dtype=torch.int64))


@pytest.mark.parametrize(
    "activation", [nn.Relu(), nn.JumpRelu(0.05), nn.TopK(3), nn.TopK(3, keep_negative=True)], ids=repr
)
def test_encode_into_writes_what_encode_returns_bit_for_bit(activation):
    """Scoring's in-place block encode (matmul into the output, bias and rule in place) equals `encode`."""
    sae = make_sae(d_vit=8, exp_factor=4)
    sae.activation = activation
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x_BD = torch.randn(40, 8)
    block = slice(8, 20)
    top_Bk = activation.top_latents(sae.pre_acts(x_BD)) if isinstance(activation, nn.TopK) else None
    out_BK = torch.full((40, 12), float("nan"))
    sae.encode_into(x_BD, out_BK, block, top_Bk)
    with torch.no_grad():
        want_BK = sae.encode(x_BD, latents=block, top_Bk=top_Bk)
    assert torch.equal(out_BK, want_BK) and not torch.equal(want_BK, torch.zeros_like(want_BK))
    if isinstance(activation, nn.TopK):  # without the selection: the full encode, sliced
        sae.encode_into(x_BD, out_BK, block)
        assert torch.equal(out_BK, sae.encode(x_BD).detach()[:, block])
