"""open_clip vision transformers: residual-stream activations of chosen layers, with random weights (no network)."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from saev import vit as vits
from saev.vit import VitConfig, get_d_vit, get_n_layers, get_patch_grid, make_vit, resolve_layers

TINY = vits.TINY_MODEL  # image 64 px, patch 8 -> 8 x 8 = 64 patches, width 64, 4 blocks


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return make_vit(VitConfig(layers=(2, 0, -1)))


def manual_residual_stream(visual: torch.nn.Module, x_B3SS: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """open_clip's VisionTransformer._embeds + the first n_blocks residual blocks, spelled out."""
    with torch.no_grad():
        x = visual.conv1(x_B3SS)  # [B, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid*grid, width], row-major patches
        cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for block in visual.transformer.resblocks[:n_blocks]:
            x = block.forward(x)  # .forward: bypass the recording hooks
    return x


##########
# Shapes #
##########


def test_tiny_model_shape_info_comes_from_its_config():
    assert (get_d_vit(TINY), get_n_layers(TINY), get_patch_grid(TINY)) == (64, 4, (64, 8))


def test_output_is_batch_layer_token_dim_with_cls_first(model, images):
    out = model(images)
    assert out.shape == (3, 3, 8 * 8 + 1, 64) and out.dtype == torch.float32
    assert (model.d_vit, model.img_size, model.n_side, model.n_patches_per_img) == (64, 64, 8, 64)


def test_without_cls_the_output_is_the_patch_tokens_only(images):
    with_cls = make_vit(VitConfig(layers=(1,), cls_token=True))(images)
    without = make_vit(VitConfig(layers=(1,), cls_token=False))(images)
    assert without.shape == (3, 1, 64, 64)
    torch.testing.assert_close(without, with_cls[:, :, 1:], rtol=0, atol=0)


def test_negative_layers_count_from_the_end(images):
    assert resolve_layers(TINY, (-1, 0, -3)) == (3, 0, 1)
    torch.testing.assert_close(
        make_vit(VitConfig(layers=(-1,)))(images), make_vit(VitConfig(layers=(3,)))(images), rtol=0, atol=0
    )


def test_layers_are_recorded_in_the_order_given(model):
    assert model.layers == (2, 0, 3)


#####################
# Hooks vs. forward #
#####################


def test_hook_outputs_equal_a_manual_forward_through_the_blocks(model, images):
    out = model(images)
    for li, layer in enumerate(model.layers):
        expected = manual_residual_stream(model.visual, images, layer + 1)
        torch.testing.assert_close(out[:, li], expected, rtol=1e-5, atol=1e-5)


def test_forward_does_not_keep_activations_between_calls(model, images):
    first = model(images[:1])
    model(images[1:])
    torch.testing.assert_close(model(images[:1]), first, rtol=0, atol=0)


###############
# Random init #
###############


def test_same_init_seed_builds_the_same_model(images):
    a = make_vit(VitConfig(init_seed=3))(images)
    b = make_vit(VitConfig(init_seed=3))(images)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_other_init_seed_builds_another_model(images):
    a = make_vit(VitConfig(init_seed=3))(images)
    b = make_vit(VitConfig(init_seed=4))(images)
    assert not torch.allclose(a, b)


def test_building_leaves_the_global_torch_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_vit(VitConfig(init_seed=9))
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_bfloat16_inference_runs_and_returns_float32_close_to_float32(images):
    f32 = make_vit(VitConfig(layers=(0, 3)))(images)
    bf16 = make_vit(VitConfig(layers=(0, 3), dtype="bfloat16"))(images)
    assert bf16.dtype == torch.float32 and bf16.shape == f32.shape and torch.isfinite(bf16).all()
    corr = np.corrcoef(bf16.flatten().numpy(), f32.flatten().numpy())[0, 1]
    assert corr > 0.99


##############
# Preprocess #
##############


def test_preprocess_resizes_without_cropping(model):
    """A 100 x 50 image, white on its left half: after resizing to 64 x 64 the left half is still the bright one."""
    pixels = np.zeros((50, 100, 3), dtype=np.uint8)
    pixels[:, :50] = 255
    x = model.preprocess(Image.fromarray(pixels))
    assert x.shape == (3, 64, 64)
    assert (x[:, :, :31] > 1).all() and (x[:, :, 33:] < -1).all()


def test_a_normalised_batch_equals_each_image_preprocessed_alone(model):
    """The dump normalises whole batches of uint8 images; the result is bit-identical to preprocessing one by one."""
    images_B3SS = np.random.default_rng(0).integers(0, 256, size=(5, 3, 64, 64), dtype=np.uint8)
    batch = model.normalize(images_B3SS)
    assert batch.dtype == torch.float32 and batch.is_contiguous()
    for b in range(5):
        alone = model.preprocess(Image.fromarray(images_B3SS[b].transpose(1, 2, 0)))
        torch.testing.assert_close(batch[b], alone, rtol=0, atol=0)


##########
# Errors #
##########


def test_shape_of_a_big_model_comes_without_building_it(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built a model")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    vits._shape_info.cache_clear()
    assert get_d_vit("ViT-B-16") == 768
    assert get_patch_grid("ViT-B-16") == (224, 14)
    assert get_n_layers("ViT-B-16") == 12


def test_shape_of_a_timm_tower_comes_without_weights_or_global_rng_draws():
    vits._shape_info.cache_clear()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert (get_d_vit("ViT-B-16-SigLIP"), get_n_layers("ViT-B-16-SigLIP")) == (768, 12)
    assert get_patch_grid("ViT-B-16-SigLIP") == (224, 14)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_siglip_inputs_are_normalised_with_siglip_statistics_even_without_its_weights(tmp_path):
    """open_clip only knows SigLIP's (0.5, 0.5) from a pretrained tag; random weights or a file must not get CLIP's."""
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ckpt_fpath = tmp_path / "siglip.pt"
    ckpt_fpath.touch()
    assert vits.get_norm_stats("ViT-B-16-SigLIP", "", torch.nn.Module()) == half
    assert vits.get_norm_stats("ViT-B-16-SigLIP", str(ckpt_fpath), torch.nn.Module()) == half


def test_clip_inputs_are_normalised_with_openai_statistics(model):
    assert (model.mean, model.std) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def test_unknown_model_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        get_d_vit("ViT-Q-99")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        make_vit(VitConfig(model="ViT-Q-99"))


@pytest.mark.parametrize("layers", [(4,), (-5,), (0, 7)])
def test_layer_out_of_range_is_a_value_error(layers):
    bad = [layer for layer in layers if not -4 <= layer < 4][0]
    with pytest.raises(ValueError, match=f"layer {bad} is out of range for {TINY} \\(4 blocks\\)"):
        resolve_layers(TINY, layers)
    with pytest.raises(ValueError, match="out of range"):
        make_vit(VitConfig(layers=layers))


def test_a_block_named_twice_is_a_value_error():
    with pytest.raises(ValueError, match="name the same block twice"):
        resolve_layers(TINY, (3, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"family": "dino"}, "vit.family"), ({"dtype": "float64"}, "vit.dtype"), ({"layers": ()}, "vit.layers")],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VitConfig(**kwargs)


def test_missing_weights_file_is_named(tmp_path):
    fpath = tmp_path / "weights.pt"
    with pytest.raises(FileNotFoundError, match=str(fpath)):
        make_vit(VitConfig(pretrained=str(fpath)))


########
# Slow #
########


@pytest.mark.slow
def test_vit_b_16_with_random_weights_gives_197_tokens_of_768():
    model = make_vit(VitConfig(model="ViT-B-16", layers=(-2,)))
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1, 14 * 14 + 1, 768) and torch.isfinite(out).all()


@pytest.mark.slow
def test_siglip_has_no_cls_token_and_gives_196_patch_tokens_of_768():
    with pytest.raises(ValueError, match="has no CLS token; set vit.cls_token = false"):
        make_vit(VitConfig(family="siglip", model="ViT-B-16-SigLIP"))
    model = make_vit(VitConfig(family="siglip", model="ViT-B-16-SigLIP", cls_token=False, layers=(0, -1)))
    assert (model.mean, model.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 2, 14 * 14, 768) and torch.isfinite(out).all()
