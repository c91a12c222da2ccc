"""open_clip vision transformers: residual-stream activations of chosen layers.

`saev-tiny-vit` (image 64 px, patch 8, width 64, 4 blocks) is registered on import for demos and tests; any open_clip
model name works for real use. Weights: `pretrained = ""` gives random weights seeded by `init_seed` (deterministic
across processes); otherwise a local checkpoint file, or an open_clip pretrained tag whose weights are already in the
local cache (compute nodes usually have no internet: fetch weights on a login node first, or point at the file;
set HF_HUB_OFFLINE=1 so nothing tries the network).
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

from saev import configs
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


@dataclasses.dataclass(frozen=True)
class VitConfig:
    """Which vision transformer and which of its layers."""

    family: str = "clip"
    """Model family recorded in the shard metadata: "clip" or "siglip"."""
    model: str = TINY_MODEL
    """Any open_clip model name (`open_clip.list_models()`), e.g. "ViT-B-16", "ViT-L-14", "ViT-B-16-SigLIP"."""
    pretrained: str = ""
    """"" = random weights; a checkpoint file path; or an open_clip pretrained tag found in the local cache."""
    init_seed: int = 0
    """Seed of the random weights when `pretrained` is empty."""
    layers: tuple[int, ...] = (-1,)
    """Residual blocks whose outputs are recorded; negative indices count from the end."""
    cls_token: bool = True
    """Record the CLS token too (first token of each image); must be false for models without one (SigLIP)."""
    dtype: str = "float32"
    """Inference dtype: "float32", "bfloat16" or "float16"; activations are stored as float32."""

    def __post_init__(self):
        if self.family not in ("clip", "siglip"):
            raise ValueError(f"vit.family must be 'clip' or 'siglip', got {self.family!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"vit.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not self.layers:
            raise ValueError("vit.layers must name at least one layer")


@functools.cache
def _shape_info(model: str) -> tuple[int, int, int, int]:
    """(d_vit, n_blocks, img_size, patch_size) of an open_clip model, from its config when possible."""
    cfg = _read_model_config(model)
    if cfg is None or "timm_model_name" in cfg.get("vision_cfg", {}):
        open_clip = _open_clip()
        cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = [m for m in _open_clip().list_models() if m.lower().startswith(model.lower()[:5])][:8]
        raise configs.ConfigError(f"unknown open_clip model {model!r}; similar names: {', '.join(known) or 'none'}")
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


def get_d_vit(model: str) -> int:
    """Activation width of an open_clip model (without loading weights)."""
    return _shape_info(model)[0]


def get_n_layers(model: str) -> int:
    """Number of residual blocks of an open_clip model's vision tower."""
    return _shape_info(model)[1]


def get_patch_grid(model: str) -> tuple[int, int]:
    """(input size in pixels, patches per side)."""
    _, _, size, patch = _shape_info(model)
    return size, size // patch


def resolve_layers(model: str, layers: tuple[int, ...]) -> tuple[int, ...]:
    """Layer indices as non-negative block indices; out-of-range indices are an error."""
    n = get_n_layers(model)
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

    open_clip sets them from the pretrained tag; for random weights or a checkpoint file it falls back to OpenAI's
    values, which are wrong for e.g. SigLIP (0.5, 0.5), so those take the values of the model's first known tag.
    """
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


class Vit(torch.nn.Module):
    """An open_clip vision tower that returns the residual stream after each recorded block."""

    def __init__(self, cfg: VitConfig, visual: torch.nn.Module, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.visual = visual
        self.device = device
        if hasattr(visual, "trunk"):  # timm tower
            self.blocks = visual.trunk.blocks
            self.n_prefix = int(getattr(visual.trunk, "num_prefix_tokens", 0))
            self.batch_first = True
        else:
            self.blocks = visual.transformer.resblocks
            self.n_prefix = 1
            self.batch_first = getattr(visual.transformer, "batch_first", True)
        if cfg.cls_token and self.n_prefix == 0:
            raise ValueError(f"{cfg.model} has no CLS token; set vit.cls_token = false")
        self.d_vit, _, self.img_size, patch = _shape_info(cfg.model)
        self.n_side = self.img_size // patch
        self.n_patches_per_img = self.n_side * self.n_side
        self.layers = resolve_layers(cfg.model, cfg.layers)
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
        patches = acts[:, :, self.n_prefix :, :]  # drops CLS and any register tokens
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
    open_clip = _open_clip()
    # Fail on an unknown model name or a bad layer with a short ValueError, before building or loading anything.
    resolve_layers(cfg.model, cfg.layers)
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
