"""timm vision transformers (DINOv2 with registers, DINOv3, SigLIP2, any timm ViT with `.blocks`): shapes without
weights, input mean/std and size from timm's pretrained config, and the model with its weights.

A config names one as `model = "timm:<timm model name>"` (`timm.list_models()`), e.g. "timm:vit_large_patch16_dinov3".
Two tiny random-weight models are registered for tests and demos: `timm:saev-tiny-dinov2-reg` (timm's DINOv2 with 4
registers) and `timm:saev-tiny-dinov3` (timm's DINOv3, 4 registers): image 64 px, patch 8 (an 8 x 8 grid), width 32,
4 blocks. Weights (`pretrained`): "" = random, seeded; a local file (safetensors, or a .pth/.bin/.pt state dict; the
original DINOv2/DINOv3 checkpoints too: timm converts their keys); or a timm pretrained tag (e.g. "lvd1689m") whose
weights are already in the local Hugging Face cache: nothing is ever downloaded (compute nodes have no internet).
"""

import dataclasses
import difflib
import functools
import os

import torch

from saev import configs

PREFIX = "timm:"
"""How a config's `model` names a timm model."""
TINY_DINOV2_REG = "timm:saev-tiny-dinov2-reg"
TINY_DINOV3 = "timm:saev-tiny-dinov3"

_TINY_ARGS = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2)
_TINY = {
    "saev-tiny-dinov2-reg": ("vit_small_patch14_reg4_dinov2", _TINY_ARGS),
    "saev-tiny-dinov3": ("vit_small_patch16_dinov3", _TINY_ARGS),
}
"""Our tiny models: a timm architecture and the arguments that shrink it (its registers and mean/std stay)."""

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_timm(model: str) -> bool:
    """Whether a config's `model` names a timm model (the `timm:` prefix)."""
    return model.startswith(PREFIX)


def is_weights_file(pretrained: str) -> bool:
    """Whether `pretrained` names a local file (a path, or a weights file name) rather than a pretrained tag."""
    return os.path.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES)


def get_tag(pretrained: str) -> str | None:
    """The timm pretrained tag that `pretrained` names; None for random weights or a file."""
    return pretrained if pretrained and not is_weights_file(pretrained) else None


@functools.cache
def _timm():
    """timm, imported on first use (planning an open_clip dump never needs it)."""
    import timm

    return timm


def _arch(model: str) -> tuple[str, dict]:
    """(timm architecture, arguments) of a `timm:` model name; a ConfigError for an unknown one."""
    name = model.removeprefix(PREFIX)
    if name in _TINY:
        return _TINY[name]
    timm = _timm()
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, [*timm.list_models(), *_TINY], n=5, cutoff=0.6)
        raise configs.ConfigError(f"unknown timm model {name!r}; similar names: {', '.join(close) or 'none'}")
    return name, {}


@dataclasses.dataclass(frozen=True)
class Shape:
    """What planning needs of a timm model, read from it built on the meta device (no weights, no memory)."""

    d_vit: int
    """Width of the residual stream."""
    n_blocks: int
    """Number of transformer blocks."""
    img_size: int
    """Input size in pixels (square)."""
    patch_size: int
    """Patch size in pixels."""
    n_prefix: int
    """Tokens before the patches: CLS (first, when the model has one) and registers."""
    has_cls: bool
    """Whether the first token is a CLS token."""
    mean: tuple[float, ...]
    """Input mean (RGB, on 0..1 pixels) of the model's pretrained config."""
    std: tuple[float, ...]
    """Input standard deviation (RGB) of the model's pretrained config."""


def _create(model: str, tag: str | None, img_size: int | None, **kwargs) -> torch.nn.Module:
    """timm.create_model for a `timm:` name, a pretrained tag (which sets the default input size), an input size."""
    arch, args = _arch(model)
    if tag is not None:
        if model.removeprefix(PREFIX) in _TINY:
            raise configs.ConfigError(f'{model} has random weights only: set vit.pretrained to "" or a file')
        tags = [n.split(".", 1)[1] for n in _timm().list_pretrained(arch) if "." in n]
        if tag not in tags:
            raise configs.ConfigError(
                f"vit.pretrained = {tag!r} is not a timm tag of {arch} (tags: {', '.join(tags) or 'none'}); "
                "a weights file needs a path"
            )
        arch = f"{arch}.{tag}"
    args = {**args, **({"img_size": img_size} if img_size is not None else {}), **kwargs}
    return _timm().create_model(arch, **args)


@functools.cache
def get_shape(model: str, tag: str | None = None, img_size: int | None = None) -> Shape:
    """Shape, prefix tokens and input statistics of a `timm:` model, without weights (a fraction of a second even
    for ViT-L); `img_size` None: the model's own default input size (that of the tag, when given)."""
    # The meta device allocates nothing and draws no random numbers.
    with torch.device("meta"):
        net = _create(model, tag, img_size, pretrained=False)
    if not hasattr(net, "blocks") or not hasattr(net, "patch_embed"):
        raise configs.ConfigError(f"{model} is not a vision transformer with .blocks and .patch_embed")
    size, patch = net.patch_embed.img_size, net.patch_embed.patch_size
    if size[0] != size[1] or patch[0] != patch[1]:
        raise configs.ConfigError(f"{model}: only square inputs and patches are supported, got {size} / {patch}")
    data = _timm().data.resolve_data_config({}, model=net)
    return Shape(
        d_vit=int(net.embed_dim),
        n_blocks=len(net.blocks),
        img_size=int(size[0]),
        patch_size=int(patch[0]),
        n_prefix=int(net.num_prefix_tokens),
        has_cls=getattr(net, "cls_token", None) is not None,
        mean=tuple(float(x) for x in data["mean"]),
        std=tuple(float(x) for x in data["std"]),
    )


def cached_weights_file(model: str, tag: str) -> str:
    """The weights file of a timm pretrained tag in the local Hugging Face cache; a ConfigError saying how to fetch
    it when it is not there (nothing is downloaded: compute nodes have no internet)."""
    import huggingface_hub

    arch, _ = _arch(model)
    cfg = _timm().models.get_pretrained_cfg(f"{arch}.{tag}")
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise configs.ConfigError(
            f"vit.pretrained = {tag!r}: {arch}.{tag} has no Hugging Face weights; download them and set "
            "vit.pretrained to the file"
        )
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        fpath = huggingface_hub.try_to_load_from_cache(hub_id, name)
        if isinstance(fpath, str):
            return fpath
    raise configs.ConfigError(
        f"vit.pretrained = {tag!r}: {hub_id} is not in the local Hugging Face cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE}); fetch it on a login node: "
        f"python -c \"import timm; timm.create_model('{arch}.{tag}', pretrained=True)\""
    )


def check_weights(model: str, pretrained: str) -> None:
    """A ConfigError now if the weights `pretrained` names cannot be found (a missing file, a tag not in the
    cache), so that a job does not fail on it later."""
    if pretrained and is_weights_file(pretrained):
        if not os.path.isfile(pretrained):
            raise configs.ConfigError(f"vit.pretrained: weights file not found: {pretrained}")
    elif pretrained:
        get_shape(model, pretrained)  # a known tag
        cached_weights_file(model, pretrained)


def make_model(model: str, pretrained: str, init_seed: int, img_size: int | None) -> torch.nn.Module:
    """The timm model with its weights, on the CPU, in eval mode (see the module docstring for `pretrained`)."""
    check_weights(model, pretrained)
    tag = get_tag(pretrained)
    kwargs: dict = {"pretrained": bool(pretrained)}
    if pretrained:
        fpath = pretrained if tag is None else cached_weights_file(model, tag)
        # Loading through timm (not load_state_dict) converts original checkpoints and resizes position embeddings.
        kwargs["pretrained_cfg_overlay"] = dict(file=fpath)
    # fork_rng: seed the weights (random, or those a checkpoint leaves out) without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            net = _create(model, tag, img_size, **kwargs)
        except RuntimeError as err:  # a state dict of another model (missing, unexpected or mis-shaped keys)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise configs.ConfigError(f"vit.pretrained: {pretrained} does not fit {model}: {first}") from err
    return net.eval()
