"""Sparse autoencoders (SAEs): the model, its invariants, and its checkpoint format.

A `SparseAutoencoder` maps a ViT activation x (width d_vit) to d_sae non-negative latents f and back:

    f     = relu((x - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec

Training (saev.training) runs on activations multiplied by a scalar `scale` (so their mean L2 norm is sqrt(d_vit))
with unit-norm decoder rows. Before saving, `fold_scale_` rewrites the weights so that the saved SAE takes RAW
activations and gives raw-space reconstructions, with latents identical to the ones seen in training. After folding
the decoder rows have norm 1/scale, not 1.

A checkpoint is a directory with `sae.safetensors` (the four weight tensors) and `sae.json` (the `SaeConfig`).
Nothing is unpickled on load.
"""

import dataclasses
import json
import math
import pathlib
import typing

import beartype
import safetensors
import safetensors.torch
import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saev import artifacts

WEIGHTS_FNAME = "sae.safetensors"
"""File name of the weights inside a checkpoint directory."""

CONFIG_FNAME = "sae.json"
"""File name of the `SaeConfig` (as JSON) inside a checkpoint directory."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class SaeConfig:
    """Shape and initialisation of a ReLU sparse autoencoder."""

    d_vit: int
    """Width of the ViT activations the SAE reads and reconstructs."""
    exp_factor: int = 8
    """Expansion factor: the SAE has d_sae = d_vit * exp_factor latents."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self):
        if self.d_vit < 1:
            raise ValueError(f"d_vit must be positive, got {self.d_vit}")
        if self.exp_factor < 1:
            raise ValueError(f"exp_factor must be positive, got {self.exp_factor}")

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.d_vit * self.exp_factor


class SaeOutput(typing.NamedTuple):
    """What a forward pass of a `SparseAutoencoder` returns."""

    x_hat_BD: Tensor
    """Reconstructions, in the same space as the inputs."""
    f_BS: Tensor
    """Latent activations (non-negative)."""


class SparseAutoencoder(torch.nn.Module):
    """ReLU sparse autoencoder with a decoder bias subtracted before encoding.

    Parameters: `W_enc` [d_vit, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_vit] (one dictionary atom per row, unit
    norm while training), `b_dec` [d_vit]. The initialisation is a deterministic function of `cfg.seed`: random
    unit decoder rows, `W_enc = W_dec.T`, zero biases (training sets `b_dec` from the data).
    """

    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_vit, generator=gen, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_vit))

    @jaxtyped(typechecker=beartype.beartype)
    def pre_acts(self, x_BD: Float[Tensor, "B D"], latents: slice | None = None) -> Float[Tensor, "B K"]:
        """Latent pre-activations, before the ReLU: all of them, or only those in `latents`."""
        if x_BD.shape[-1] != self.cfg.d_vit:
            raise ValueError(f"SAE expects d_vit={self.cfg.d_vit} but activations have width {x_BD.shape[-1]}")
        W_enc_DK, b_enc_K = self.W_enc, self.b_enc
        if latents is not None:
            W_enc_DK, b_enc_K = W_enc_DK[:, latents], b_enc_K[latents]
        return (x_BD - self.b_dec) @ W_enc_DK + b_enc_K

    @jaxtyped(typechecker=beartype.beartype)
    def encode(self, x_BD: Float[Tensor, "B D"], latents: slice | None = None) -> Float[Tensor, "B K"]:
        """Latent activations f = relu((x - b_dec) @ W_enc + b_enc), shape [B, d_sae].

        With `latents` (e.g. slice(k_start, k_stop)) only those columns are computed, shape [B, len(range)]; their
        values equal the same columns of the full encoding, without materialising all d_sae latents.
        """
        return torch.relu(self.pre_acts(x_BD, latents))

    @jaxtyped(typechecker=beartype.beartype)
    def decode(self, f_BS: Float[Tensor, "B S"]) -> Float[Tensor, "B D"]:
        """Reconstruction x_hat_BD = f @ W_dec + b_dec."""
        return f_BS @ self.W_dec + self.b_dec

    @jaxtyped(typechecker=beartype.beartype)
    def forward(self, x_BD: Float[Tensor, "B D"]) -> SaeOutput:
        """Encode then decode a batch; returns reconstructions and latents."""
        f_BS = self.encode(x_BD)
        return SaeOutput(x_hat_BD=self.decode(f_BS), f_BS=f_BS)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row (dictionary atom) to unit L2 norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad the component parallel to each decoder row, in place.

        With unit-norm rows that component only changes the row norms, which `normalize_decoder_` undoes anyway;
        removing it keeps Adam's statistics about the directions that matter. Call between backward() and step().
        """
        if self.W_dec.grad is None:
            return
        W_dec_SD = self.W_dec
        parallel_S = (self.W_dec.grad * W_dec_SD).sum(dim=1) / (W_dec_SD * W_dec_SD).sum(dim=1)
        self.W_dec.grad.sub_(parallel_S[:, None] * W_dec_SD)

    @torch.no_grad()
    def fold_scale_(self, scale: float) -> None:
        """Rewrite the weights, in place, so the SAE takes raw activations instead of `raw * scale`.

        Afterwards `encode(raw)` equals the old `encode(raw * scale)` (up to float rounding) and `decode` returns
        raw-space reconstructions (the old reconstruction divided by `scale`). Decoder rows then have norm
        1/scale, so do not call `normalize_decoder_` after folding.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        # (raw - b_dec/s) @ (s W_enc) == (s raw - b_dec) @ W_enc, and (f @ W_dec + b_dec) / s.
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)


@beartype.beartype
def save(sae: SparseAutoencoder, dpath: pathlib.Path | str) -> None:
    """Write `sae` to the directory `dpath` as `sae.safetensors` (weights) and `sae.json` (config).

    Each file is written atomically (temp file + rename). The directory is created if needed.
    """
    dpath = pathlib.Path(dpath)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in sae.state_dict().items()}
    with artifacts.atomic_path(dpath / WEIGHTS_FNAME) as tmp_fpath:
        safetensors.torch.save_file(tensors, str(tmp_fpath))
    artifacts.atomic_write_json(dpath / CONFIG_FNAME, dataclasses.asdict(sae.cfg))


@beartype.beartype
def load(dpath: pathlib.Path | str, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE written by `save` from the directory `dpath`.

    Raises:
        FileNotFoundError: `sae.json` or `sae.safetensors` is missing (the message names the file).
        ValueError: the JSON is not a valid `SaeConfig`, or the tensors' names or shapes disagree with it.
    """
    dpath = pathlib.Path(dpath)
    cfg_fpath, weights_fpath = dpath / CONFIG_FNAME, dpath / WEIGHTS_FNAME
    for fpath in (cfg_fpath, weights_fpath):
        if not fpath.is_file():
            raise FileNotFoundError(f"SAE checkpoint file {fpath} is missing")

    try:
        cfg = SaeConfig(**json.loads(cfg_fpath.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg_fpath} is not a valid SaeConfig: {err}") from err

    sae = SparseAutoencoder(cfg)
    expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    try:
        tensors = safetensors.torch.load_file(str(weights_fpath), device="cpu")
    except safetensors.SafetensorError as err:
        raise ValueError(f"{weights_fpath} is not a readable safetensors file: {err}") from err
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        raise ValueError(
            f"{weights_fpath} holds tensors {got}, but {cfg_fpath} ({cfg}) needs {expected}"
        )
    sae.load_state_dict(tensors)
    return sae.to(device)
