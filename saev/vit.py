"""Vision transformers (open_clip, or timm through saev.vit_timm): residual-stream activations of chosen layers.

Layers are 0-based block indices, negatives counting from the end: the output of block i (its residual stream, before
the final norm). A paper's 1-based "block 24" of a 24-block ViT-L is index 23 (or -1). CLS and register tokens are
never stored as patches; the CLS token is stored first when `cls_token` is true.

`saev-tiny-vit` (image 64 px, patch 8, width 64, 4 blocks) is registered on import for demos and tests; any open_clip
model name works for real use, and any timm ViT as `timm:<name>` (saev.vit_timm: its weights, and the tiny
`timm:saev-tiny-dinov2-reg` and `timm:saev-tiny-dinov3`). open_clip weights: `pretrained = ""` gives random weights
seeded by `init_seed` (deterministic across processes); otherwise a local checkpoint file, or an open_clip pretrained
tag whose weights are already in the local cache (compute nodes usually have no internet: fetch weights on a login
node first, or point at the file; set HF_HUB_OFFLINE=1 so nothing tries the network).
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import pathlib

import beartype
import numpy as np
import torch
from jaxtyping import Float, UInt8, jaxtyped
from PIL import Image
from torch import Tensor

from saev import artifacts, configs, vit_timm
from saev.data import datasets

logger = logging.getLogger("saev.vit")

TINY_MODEL = "saev-tiny-vit"
_OWN_CONFIGS = pathlib.Path(__file__).parent / "model_configs"


@functools.cache
def _open_clip():
    """open_clip, imported on first use (it is most of the import time: planning reads model configs without it) and
    with our model configs registered."""
    import open_clip

    open_clip.add_model_config(_OWN_CONFIGS)
    return open_clip


def _read_model_config(model: str) -> dict | None:
    """A model's open_clip config read from the JSON files (ours, then open_clip's own), without importing open_clip;
    None if there is no such file (then open_clip itself is asked)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = [_OWN_CONFIGS]
    if spec is not None and spec.submodule_search_locations:
        dirs.append(pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_configs")
    for dpath in dirs:
        fpath = dpath / f"{model}.json"
        if fpath.is_file():
            try:
                return json.loads(fpath.read_text())
            except (OSError, ValueError):
                return None
    return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FAMILIES = ("clip", "siglip", "dinov2", "dinov3")


@dataclasses.dataclass(frozen=True)
class VitConfig:
    """Which vision transformer and which of its layers."""

    family: str = "clip"
    """Model family recorded in the shard metadata: "clip", "siglip", "dinov2" or "dinov3"."""
    model: str = TINY_MODEL
    """An open_clip model name (`open_clip.list_models()`), e.g. "ViT-B-16", "ViT-L-14", "ViT-B-16-SigLIP"; or a timm
    model as "timm:<name>" (`timm.list_models()`), e.g. "timm:vit_large_patch16_dinov3",
    "timm:vit_large_patch14_reg4_dinov2", "timm:vit_large_patch16_siglip_256"."""
    pretrained: str = ""
    """"" = random weights; a checkpoint file path (timm: safetensors or a .pth/.bin state dict); or a pretrained tag
    whose weights are in the local cache (open_clip's, or timm's Hugging Face cache, e.g. "lvd1689m"); never
    downloaded."""
    init_seed: int = 0
    """Seed of the random weights when `pretrained` is empty."""
    layers: tuple[int, ...] = (-1,)
    """Residual blocks whose outputs are recorded; negative indices count from the end."""
    cls_token: bool = True
    """Record the CLS token too (first token of each image); must be false for models without one (SigLIP)."""
    dtype: str = "float32"
    """Inference dtype: "float32", "bfloat16" or "float16"; activations are stored as float32."""
    img_size: int | None = artifacts.hashed_if_set(None)
    """timm models only: input size in pixels (e.g. 256 for a /16 DINOv3 or 224 for DINOv2/14: a 16 x 16 grid);
    unset: the model's own default (that of its pretrained config)."""

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ValueError(f"vit.family must be one of {', '.join(map(repr, _FAMILIES))}, got {self.family!r}")
        if self.img_size is not None and not vit_timm.is_timm(self.model):
            raise ValueError(f'vit.img_size applies to timm models only (model = "timm:..."), not {self.model!r}')
        if self.img_size is not None and self.img_size <= 0:
            raise ValueError(f"vit.img_size must be positive, got {self.img_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"vit.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not self.layers:
            raise ValueError("vit.layers must name at least one layer")


def _is_timm_name(model: str) -> bool:
    """Whether timm has a model of this name (for the hint that timm models take the `timm:` prefix)."""
    import timm

    return timm.is_model(model)


@functools.cache
def _shape_info(model: str) -> tuple[int, int, int, int]:
    """(d_vit, n_blocks, img_size, patch_size) of an open_clip model, from its config when possible."""
    cfg = _read_model_config(model)
    if cfg is None or "timm_model_name" in cfg.get("vision_cfg", {}):
        open_clip = _open_clip()
        cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = [m for m in _open_clip().list_models() if m.lower().startswith(model.lower()[:5])][:8]
        hint = f"; a timm model is named 'timm:{model}'" if _is_timm_name(model) else ""
        raise configs.ConfigError(
            f"unknown open_clip model {model!r}; similar names: {', '.join(known) or 'none'}{hint}"
        )
    vision = cfg["vision_cfg"]
    if "timm_model_name" not in vision:
        size = vision["image_size"]
        size = size if isinstance(size, int) else size[0]
        return vision["width"], vision["layers"], size, vision["patch_size"]
    # timm towers (SigLIP): their config names a timm model, so build it on the meta device (no memory, no weights,
    # no RNG draws; a fraction of a second even for SO400M) and read its shape.
    with _quiet_root_logger(), torch.device("meta"):
        trunk = _open_clip().create_model(model, pretrained=None, device="meta").visual.trunk
    size = trunk.patch_embed.img_size[0]
    return trunk.embed_dim, len(trunk.blocks), size, trunk.patch_embed.patch_size[0]


def _shape(vit: "VitConfig | str") -> tuple[int, int, int, int]:
    """(d_vit, n_blocks, img_size, patch_size) of a config's model, or of a model name at its default input size."""
    cfg = VitConfig(model=vit) if isinstance(vit, str) else vit
    if not vit_timm.is_timm(cfg.model):
        return _shape_info(cfg.model)
    shape = vit_timm.get_shape(cfg.model, vit_timm.get_tag(cfg.pretrained), cfg.img_size)
    return shape.d_vit, shape.n_blocks, shape.img_size, shape.patch_size


def get_d_vit(vit: "VitConfig | str") -> int:
    """Activation width of a model (a config, or a model name), without loading weights."""
    return _shape(vit)[0]


def get_n_layers(vit: "VitConfig | str") -> int:
    """Number of residual blocks of a model's vision tower (a config, or a model name), without loading weights."""
    return _shape(vit)[1]


def get_patch_grid(vit: "VitConfig | str") -> tuple[int, int]:
    """(input size in pixels, patches per side) of a config's model (its `img_size` when set); a bare model name:
    at the model's default input size."""
    _, _, size, patch = _shape(vit)
    return size, size // patch


def resolve_layers(vit: "VitConfig | str", layers: tuple[int, ...]) -> tuple[int, ...]:
    """Layer indices (0-based blocks, negatives from the end) as non-negative block indices; out-of-range indices are
    an error."""
    model = vit if isinstance(vit, str) else vit.model
    n = get_n_layers(vit)
    out = []
    for layer in layers:
        if not -n <= layer < n:
            raise configs.ConfigError(f"layer {layer} is out of range for {model} ({n} blocks)")
        out.append(layer % n)
    if len(set(out)) != len(out):
        raise configs.ConfigError(f"layers {list(layers)} name the same block twice")
    return tuple(out)


@contextlib.contextmanager
def _quiet_root_logger():
    """Silence open_clip's root-logger warning that no weights were loaded: random weights are what we asked for."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def get_norm_stats(model: str, pretrained: str, visual: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that normalise the model's input images.

    timm models: those of their pretrained config (of the tag, or the default one for random weights or a file).
    open_clip sets them from the pretrained tag; for random weights or a checkpoint file it falls back to OpenAI's
    values, which are wrong for e.g. SigLIP (0.5, 0.5), so those take the values of the model's first known tag.
    """
    if vit_timm.is_timm(model):
        shape = vit_timm.get_shape(model, vit_timm.get_tag(pretrained))
        return shape.mean, shape.std
    open_clip = _open_clip()
    pp = getattr(visual, "preprocess_cfg", None) or {}
    if not pretrained or os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        pp = open_clip.get_pretrained_cfg(model, tags[0]) if tags else {}
    mean = tuple(pp.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pp.get("std") or open_clip.OPENAI_DATASET_STD)
    return mean, std


class _Stop(Exception):
    """Raised by the last hook to skip the rest of the forward pass."""


def _tower_tokens(visual: torch.nn.Module) -> tuple[torch.nn.ModuleList, int, bool, bool]:
    """(blocks, prefix tokens, whether the first is CLS, batch first) of a timm model, an open_clip tower with a timm
    trunk (SigLIP), or an open_clip VisionTransformer."""
    trunk = getattr(visual, "trunk", visual)
    if hasattr(trunk, "num_prefix_tokens"):  # timm: CLS (when it has one) first, then the registers
        return trunk.blocks, int(trunk.num_prefix_tokens), getattr(trunk, "cls_token", None) is not None, True
    return visual.transformer.resblocks, 1, True, getattr(visual.transformer, "batch_first", True)


class Vit(torch.nn.Module):
    """A vision tower (open_clip or timm) that returns the residual stream after each recorded block."""

    def __init__(self, cfg: VitConfig, visual: torch.nn.Module, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.visual = visual
        self.device = device
        self.blocks, self.n_prefix, has_cls, self.batch_first = _tower_tokens(visual)
        if cfg.cls_token and not has_cls:
            raise configs.ConfigError(f"{cfg.model} has no CLS token; set vit.cls_token = false")
        self.d_vit, _, self.img_size, patch = _shape(cfg)
        self.n_side = self.img_size // patch
        self.n_patches_per_img = self.n_side * self.n_side
        self.layers = resolve_layers(cfg, cfg.layers)
        self.mean, self.std = get_norm_stats(cfg.model, cfg.pretrained, visual)
        mean, std = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
        self._scale_311 = (1 / (255 * std)).float().to(device)[:, None, None]
        self._shift_311 = (-mean / std).float().to(device)[:, None, None]
        self._outputs: dict[int, Tensor] = {}
        for layer in self.layers:
            self.blocks[layer].register_forward_hook(self._make_hook(layer))

    def _make_hook(self, layer: int):
        last = max(self.layers)

        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            self._outputs[layer] = out if self.batch_first else out.transpose(0, 1)
            if layer == last:
                raise _Stop

        return hook

    def preprocess(self, image: Image.Image) -> Float[Tensor, "3 S S"]:
        """One image as the model's input: resized to S x S (bicubic, no crop: masks are resized the same way) and
        normalised, on the model's device."""
        return self.normalize(datasets.resize_image(image, self.img_size)[None])[0]

    @jaxtyped(typechecker=beartype.beartype)
    def normalize(self, images_B3SS: UInt8[np.ndarray, "B 3 S S"]) -> Float[Tensor, "B 3 S S"]:
        """uint8 RGB images at the input size (channels first) as the model's normalised float input, on its device."""
        # Moved as uint8 (a quarter of the bytes of float32); (x / 255 - mean) / std as one multiply that converts to
        # float32 and one in-place add.
        x_B3SS = torch.mul(torch.from_numpy(images_B3SS).to(self.device), self._scale_311).contiguous()
        return x_B3SS.add_(self._shift_311)

    @torch.inference_mode()
    def forward(self, x_B3SS: Float[Tensor, "B 3 S S"]) -> Float[Tensor, "B L T D"]:
        """Residual stream after each recorded block: [batch, layer, token, dim], CLS first when recorded."""
        self._outputs = {}
        try:
            self.visual(x_B3SS.to(self.device, _DTYPES[self.cfg.dtype]))
        except _Stop:
            pass
        acts = torch.stack([self._outputs[layer] for layer in self.layers], dim=1)
        patches = acts[:, :, self.n_prefix :, :]  # drops CLS and any register tokens (they come first)
        if self.cfg.cls_token:
            patches = torch.cat([acts[:, :, :1, :], patches], dim=2)
        self._outputs = {}
        expected = self.n_patches_per_img + int(self.cfg.cls_token)
        if patches.shape[2] != expected:
            raise RuntimeError(f"{self.cfg.model}: got {patches.shape[2]} tokens per image, expected {expected}")
        return patches.float()


@beartype.beartype
def make_vit(cfg: VitConfig, device: torch.device | str = "cpu") -> Vit:
    """Build the model in eval mode (random weights seeded by `init_seed` when `pretrained` is empty)."""
    device = torch.device(device)
    # Fail on an unknown model name or a bad layer with a short ValueError, before building or loading anything.
    resolve_layers(cfg, cfg.layers)
    if vit_timm.is_timm(cfg.model):
        net = vit_timm.make_model(cfg.model, cfg.pretrained, cfg.init_seed, cfg.img_size)
        return Vit(cfg, net.to(device, _DTYPES[cfg.dtype]), device)
    open_clip = _open_clip()
    if cfg.pretrained:
        if os.path.sep in cfg.pretrained and not os.path.isfile(cfg.pretrained):
            raise FileNotFoundError(f"pretrained weights file not found: {cfg.pretrained}")
        model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, require_pretrained=True)
    else:
        # fork_rng: seed the weights without resetting the caller's global torch RNG.
        with _quiet_root_logger(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = open_clip.create_model(cfg.model, pretrained=None)
    visual = model.visual.to(device, _DTYPES[cfg.dtype]).eval()
    del model
    return Vit(cfg, visual, device)
