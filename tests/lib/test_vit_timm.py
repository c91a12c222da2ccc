"""timm vision transformers (DINOv2 with registers, DINOv3): residual-stream activations equal timm's own intermediate
outputs without CLS and registers, the model's own input statistics, seeded random weights, weights from a file or the
local Hugging Face cache, one-line config errors, and a dump through the launcher. Tiny random-weight models only."""

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from saev import configs, vit_timm
from saev import vit as vits
from saev.data import datasets
from saev.data.shards import Shards
from saev.vit import VitConfig, get_d_vit, get_n_layers, get_patch_grid, make_vit, resolve_layers
from tests.helpers import EPS32, launch, write_tiny_config

TINY = [vit_timm.TINY_DINOV2_REG, vit_timm.TINY_DINOV3]  # 64 px, patch 8 -> 8 x 8, width 32, 4 blocks, CLS + 4 regs
ARCH = {vit_timm.TINY_DINOV2_REG: "vit_small_patch14_reg4_dinov2", vit_timm.TINY_DINOV3: "vit_small_patch16_dinov3"}


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def timm_twin(model: vits.Vit) -> torch.nn.Module:
    """timm's own model of the same architecture with the same weights (without our recording hooks)."""
    arch, args = vit_timm._TINY[model.cfg.model.removeprefix(vit_timm.PREFIX)]
    twin = timm.create_model(arch, pretrained=False, **args).eval()
    twin.load_state_dict(model.visual.state_dict())
    return twin


def assert_close_f32(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 agreement to a few ulps of the values' magnitude (the same kernels, maybe another summation order)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=16 * EPS32 * float(want.abs().max()))


##########
# Shapes #
##########


@pytest.mark.parametrize("model", TINY)
def test_tiny_models_have_an_8x8_grid_of_width_32_and_4_blocks(model):
    assert (get_d_vit(model), get_n_layers(model), get_patch_grid(model)) == (32, 4, (64, 8))
    shape = vit_timm.get_shape(model)
    assert (shape.n_prefix, shape.has_cls) == (5, True)  # CLS + 4 registers


def test_img_size_sets_the_grid_of_real_architectures_without_weights():
    dinov3 = "timm:vit_large_patch16_dinov3"
    assert (get_d_vit(dinov3), get_n_layers(dinov3), get_patch_grid(dinov3)) == (1024, 24, (256, 16))
    dinov2 = "timm:vit_large_patch14_reg4_dinov2"
    assert get_patch_grid(dinov2) == (518, 37)  # its own default input size
    assert get_patch_grid(VitConfig(model=dinov2, img_size=224)) == (224, 16)
    assert vit_timm.get_shape(dinov2).n_prefix == 5


def test_layers_are_0_based_blocks_negatives_from_the_end():
    # The paper's 1-based "block 24" of ViT-L is index 23 (or -1); its "block 14" is 13.
    assert resolve_layers("timm:vit_large_patch16_dinov3", (13, -1, -24)) == (13, 23, 0)


##########################
# Activations vs. timm's #
##########################


@pytest.mark.parametrize("model", TINY)
def test_activations_equal_timms_intermediates_without_cls_and_registers(model, images):
    vit = make_vit(VitConfig(model=model, layers=(2, 0, -1), cls_token=False))
    out = vit(images)
    assert out.shape == (3, 3, 64, 32) and out.dtype == torch.float32
    with torch.no_grad():
        want = timm_twin(vit).forward_intermediates(
            images, indices=[2, 0, 3], norm=False, output_fmt="NLC", intermediates_only=True
        )
    for li, want_BPD in enumerate(want):
        assert_close_f32(out[:, li], want_BPD)


@pytest.mark.parametrize("model", TINY)
def test_cls_token_is_kept_first_when_asked(model, images):
    vit = make_vit(VitConfig(model=model, layers=(1,), cls_token=True))
    out = vit(images)
    assert out.shape == (3, 1, 65, 32)
    with torch.no_grad():
        ((patches, prefix),) = timm_twin(vit).forward_intermediates(
            images, indices=[1], norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
    assert prefix.shape[1] == 5
    assert_close_f32(out[:, 0, 0], prefix[:, 0])  # CLS, not a register
    assert_close_f32(out[:, 0, 1:], patches)


@pytest.mark.parametrize("model", TINY)
def test_inputs_are_normalised_with_the_models_own_statistics(model):
    vit = make_vit(VitConfig(model=model))
    data = timm.data.resolve_data_config({}, model=vit.visual)
    assert (vit.mean, vit.std) == (tuple(data["mean"]), tuple(data["std"]))
    assert vit.mean == (0.485, 0.456, 0.406)  # ImageNet's (DINO), not OpenAI's
    assert vit.img_size == 64


def test_a_tags_statistics_are_the_tags():
    assert vits.get_norm_stats("timm:vit_base_patch16_siglip_256", "v2_webli", torch.nn.Module()) == (
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    )


###########
# Weights #
###########


def test_same_init_seed_builds_the_same_model_and_leaves_the_global_rng_alone(images):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = make_vit(VitConfig(model=vit_timm.TINY_DINOV3, init_seed=3))(images)
    assert torch.equal(torch.rand(4), expected)
    b = make_vit(VitConfig(model=vit_timm.TINY_DINOV3, init_seed=3))(images)
    c = make_vit(VitConfig(model=vit_timm.TINY_DINOV3, init_seed=4))(images)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_load_from_a_local_file(tmp_path, images, suffix):
    source = make_vit(VitConfig(model=vit_timm.TINY_DINOV2_REG, init_seed=7))
    fpath = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.visual.state_dict().items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(fpath))
    else:
        torch.save(state, fpath)
    loaded = make_vit(VitConfig(model=vit_timm.TINY_DINOV2_REG, pretrained=str(fpath)))
    assert torch.equal(loaded(images), source(images))


def test_a_checkpoint_loads_at_another_input_size_with_resampled_position_embeddings(tmp_path):
    """DINOv2 checkpoints are 518 px (37 x 37): at img_size 224 timm resamples the position embeddings as it loads."""
    source = make_vit(VitConfig(model=vit_timm.TINY_DINOV2_REG, init_seed=7)).visual
    fpath = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(fpath))
    small = make_vit(VitConfig(model=vit_timm.TINY_DINOV2_REG, pretrained=str(fpath), img_size=32))
    assert (small.img_size, small.n_side) == (32, 4)
    want = timm.layers.resample_abs_pos_embed(source.pos_embed.detach(), (4, 4), num_prefix_tokens=0)
    assert_close_f32(small.visual.pos_embed.detach(), want)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 1, 4 * 4 + 1, 32)


def test_a_tag_resolves_to_the_file_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--vit_small_patch16_dinov3.lvd1689m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    got = vit_timm.cached_weights_file("timm:vit_small_patch16_dinov3", "lvd1689m")
    assert got == str(repo / "snapshots" / "abc123" / "model.safetensors")


def test_a_tag_not_in_the_cache_is_one_line_saying_to_fetch_it_on_a_login_node(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = VitConfig(model="timm:vit_small_patch16_dinov3", pretrained="lvd1689m")
    with pytest.raises(configs.ConfigError, match="not in the local Hugging Face cache.*login node") as err:
        make_vit(cfg)
    assert "\n" not in str(err.value)


#################
# Config errors #
#################


def one_line_config_error(fn, match: str) -> None:
    with pytest.raises(configs.ConfigError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_unknown_model_is_a_one_line_config_error_with_close_names():
    one_line_config_error(lambda: get_d_vit("timm:vit_large_patch16_dinov4"), "unknown timm model.*dinov3")
    one_line_config_error(lambda: make_vit(VitConfig(model="timm:nope")), "unknown timm model 'nope'")
    one_line_config_error(lambda: get_d_vit("vit_large_patch16_dinov3"), "named 'timm:vit_large_patch16_dinov3'")


@pytest.mark.parametrize("layers", [(4,), (-5,)])
def test_layer_out_of_range_is_a_one_line_config_error(layers):
    cfg = VitConfig(model=vit_timm.TINY_DINOV3, layers=layers)
    one_line_config_error(lambda: make_vit(cfg), f"layer {layers[0]} is out of range .*4 blocks")


def test_missing_weights_file_is_a_one_line_config_error(tmp_path):
    fpath = tmp_path / "dinov3.safetensors"
    cfg = VitConfig(model=vit_timm.TINY_DINOV3, pretrained=str(fpath))
    one_line_config_error(lambda: make_vit(cfg), f"weights file not found: {fpath}")


def test_weights_of_another_model_are_a_one_line_config_error(tmp_path):
    fpath = tmp_path / "other.safetensors"
    state = make_vit(VitConfig(model=vit_timm.TINY_DINOV3)).visual.state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(fpath))
    cfg = VitConfig(model=vit_timm.TINY_DINOV2_REG, pretrained=str(fpath))
    one_line_config_error(lambda: make_vit(cfg), "does not fit timm:saev-tiny-dinov2-reg")


def test_unknown_tag_is_a_one_line_config_error_listing_the_tags():
    cfg = VitConfig(model="timm:vit_small_patch16_dinov3", pretrained="lvd9")
    one_line_config_error(lambda: get_patch_grid(cfg), "'lvd9' is not a timm tag.*lvd1689m")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": 224}, "vit.img_size applies to timm models only"),
        ({"model": vit_timm.TINY_DINOV3, "img_size": 0}, "vit.img_size must be positive"),
        ({"family": "dino"}, "vit.family"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VitConfig(**kwargs)


def test_a_model_without_cls_refuses_cls_token(images):
    cfg = VitConfig(model="timm:vit_base_patch16_siglip_256", family="siglip")
    assert not vit_timm.get_shape(cfg.model).has_cls
    with torch.device("meta"):  # the check needs the tower only, not its weights
        net = timm.create_model("vit_base_patch16_siglip_256")
    one_line_config_error(lambda: vits.Vit(cfg, net, torch.device("cpu")), "has no CLS token")


def test_img_size_leaves_the_key_of_configs_without_it_unchanged():
    from saev import artifacts

    assert "img_size" not in artifacts.hashed_params(VitConfig())
    assert artifacts.hashed_params(VitConfig(model=vit_timm.TINY_DINOV3, img_size=32))["img_size"] == 32


########
# Dump #
########


def test_dump_through_the_launcher_stores_a_tiny_dinov3s_patches(tmp_path):
    cfg_fpath = write_tiny_config(tmp_path)
    text = cfg_fpath.read_text().replace('model = "saev-tiny-vit"', f'model = "{vit_timm.TINY_DINOV3}"')
    cfg_fpath.write_text(text.replace("[dump.vit]\n", '[dump.vit]\nfamily = "dinov3"\n'))
    proc = launch(cfg_fpath, "--stage", "dump", "--only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (dump_dpath,) = (tmp_path / "runs" / "dump").glob("*")
    shards = Shards(dump_dpath)
    md = shards.metadata
    assert (md.d_vit, md.n_patches_per_img, md.layers, md.cls_token) == (32, 64, (2, 3), True)
    assert md.vit_family == "dinov3" and md.vit_ckpt.startswith(vit_timm.TINY_DINOV3)
    model = make_vit(VitConfig(model=vit_timm.TINY_DINOV3, layers=(-2, -1)))
    dataset = datasets.make_dataset(datasets.Synthetic(n_imgs=48, img_size=64, seed=1))
    want = model(model.preprocess(dataset[0].image)[None])[0]
    assert_close_f32(torch.from_numpy(np.array(shards.shard(0)[0])), want)
