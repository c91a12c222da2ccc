"""Sparse autoencoders (SAEs): the model, its activation rules, its decoder invariants, and its checkpoint format.

A `SparseAutoencoder` maps a ViT activation x (width d_vit) to d_sae latents f (non-negative, except for an imported
saev TopK SAE, see `TopK.keep_negative`) and back:

    pre   = (x - b_dec) @ W_enc + b_enc
    f     = activation(pre)
    x_hat = f @ W_dec + b_dec

The activation rule is one of `ACTIVATIONS` and is saved with the SAE:

- `Relu`: f = relu(pre) (SAEs trained with the "relu_l1" objective).
- `TopK(k)`: the k largest pre-activations of each example, through a ReLU, the rest 0 ("topk" objective);
  `TopK(k, keep_negative=True)` keeps them as they are (saev's rule, for imported SAEs, see `saev.sae_files`).
- `JumpRelu(threshold)`: f = pre * (pre > threshold) with one global threshold (what "batchtopk" and "matryoshka"
  SAEs use at inference: the threshold is estimated during training).

`Relu` and `JumpRelu` are per-latent rules: latent j depends on pre[:, j] only, so `encode(x, latents=slice(a, b))`
computes just those columns. `TopK` is not: which latents an example keeps depends on all of them. Given each
example's selected latent indices (`encode(..., top_Bk=...)`, from `TopK.top_latents` over all latents), a block
computes just its columns too; without them a block encode computes all d_sae pre-activations and returns the
requested columns.

Training (saev.training) runs on activations multiplied by a scalar `scale` (so their mean L2 norm is sqrt(d_vit))
with unit-norm decoder rows. Before saving, `fold_scale_` rewrites the weights so that the saved SAE takes RAW
activations and gives raw-space reconstructions, with pre-activations (hence latents and thresholds) identical to
the ones seen in training. After folding the decoder rows have norm 1/scale, not 1.

A checkpoint is a directory with `sae.safetensors` (the four weight tensors) and `sae.json` (the `SaeConfig` fields
plus an "activation" entry, e.g. {"kind": "topk", "k": 32}; a JSON without it is a ReLU SAE). Nothing is unpickled
on load.

`SaeStack` holds S same-shape SAEs as stacked parameters (a leading SAE axis) so that a sweep trains them with
batched matmuls on one data stream.
"""

import dataclasses
import json
import math
import pathlib
import typing
from collections.abc import Mapping, Sequence

import beartype
import safetensors
import safetensors.torch
import torch
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from saev import artifacts, atomic

WEIGHTS_FNAME = "sae.safetensors"
"""File name of the weights inside a checkpoint directory."""

CONFIG_FNAME = "sae.json"
"""File name of the `SaeConfig` (as JSON, plus the activation rule) inside a checkpoint directory."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class SaeConfig:
    """Shape and initialisation of a sparse autoencoder."""

    d_vit: int
    """Width of the ViT activations the SAE reads and reconstructs."""
    exp_factor: int = 8
    """Expansion factor: the SAE has d_sae = d_vit * exp_factor latents (unless `latents` is given)."""
    seed: int = 0
    """Seed of the weight initialisation."""
    latents: int | None = artifacts.hashed_if_set(None)
    """Number of latents when it is not d_vit * exp_factor (e.g. an imported SAE with 1000 latents on width 768);
    None: d_vit * exp_factor. Left out of artifact keys while None, so earlier keys are unchanged."""

    def __post_init__(self):
        if self.d_vit < 1:
            raise ValueError(f"d_vit must be positive, got {self.d_vit}")
        if self.exp_factor < 1:
            raise ValueError(f"exp_factor must be positive, got {self.exp_factor}")
        if self.latents is not None and self.latents < 1:
            raise ValueError(f"latents must be positive, got {self.latents}")

    @property
    def d_sae(self) -> int:
        """Number of latents: `latents`, or d_vit * exp_factor."""
        return self.d_vit * self.exp_factor if self.latents is None else self.latents


####################
# Activation rules #
####################


@typing.runtime_checkable
class Activation(typing.Protocol):
    """How latents follow from pre-activations, at inference. Frozen dataclasses registered in `ACTIVATIONS`."""

    kind: typing.ClassVar[str]
    """Name in `ACTIVATIONS` and in the saved JSON."""
    per_latent: typing.ClassVar[bool]
    """Whether latent j depends on pre-activation j only (then a block of latents can be encoded alone)."""

    def __call__(self, pre_BS: Tensor) -> Tensor:
        """Latents from pre-activations of ALL latents (or, if `per_latent`, of any subset), same shape."""
        ...


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Relu:
    """f = relu(pre)."""

    kind: typing.ClassVar[str] = "relu"
    per_latent: typing.ClassVar[bool] = True

    def __call__(self, pre_BS: Tensor) -> Tensor:
        return torch.relu(pre_BS)

    def apply_(self, pre_BS: Tensor) -> Tensor:
        """`self(pre_BS)` computed in place (same values, bit for bit); returns pre_BS."""
        return pre_BS.relu_()


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class TopK:
    """The k largest pre-activations of each example (last axis), through a ReLU; every other latent is 0.

    Exactly k latents are selected per example (`top_latents`; among values tied at the k-th, torch.topk picks);
    at most k are non-zero, exactly k when the k-th largest pre-activation is positive. `select` applies the rule to
    any block of columns given each example's selected latent indices, so a block of an SAE's latents can be
    encoded without computing the others (`saev.scoring.topk_latents` finds the indices once per SAE). With
    `keep_negative` the kept values are not passed through the ReLU (the saev library's rule, used for SAEs imported
    from its files): a row with fewer than k positive pre-activations keeps some negative values.
    """

    k: int
    """Latents kept per example."""
    keep_negative: bool = artifacts.hashed_if_set(False)
    """Keep the k largest pre-activations as they are, even negative ones (saev's TopK); False: through a ReLU."""

    kind: typing.ClassVar[str] = "topk"
    per_latent: typing.ClassVar[bool] = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be positive, got {self.k}")

    def __call__(self, pre_BS: Tensor) -> Tensor:
        return self.select(pre_BS, self.top_latents(pre_BS))

    def top_latents(self, pre_BS: Tensor) -> Tensor:
        """Indices (int64, shape pre_BS.shape[:-1] + (k,), in no particular order) of each example's k largest
        values along the last axis."""
        if self.k > pre_BS.shape[-1]:
            raise ValueError(f"TopK keeps k={self.k} latents but there are only {pre_BS.shape[-1]}")
        return pre_BS.topk(self.k, dim=-1, sorted=False).indices

    def select(self, pre_BK: Tensor, top_Bk: Tensor, offset: int = 0) -> Tensor:
        """f = relu(pre) (pre itself with `keep_negative`) at each example's selected latents, 0 elsewhere, for the
        block of columns [offset, offset + K) of an SAE's pre-activations, given the example's selected latent
        indices over ALL latents (`top_latents`; indices outside the block select nothing in it)."""
        return self.select_(pre_BK.clone(), top_Bk, offset)

    def select_(self, pre_BK: Tensor, top_Bk: Tensor, offset: int = 0) -> Tensor:
        """`select` computed in place in pre_BK (same values, bit for bit); returns pre_BK."""
        pos_Bk = top_Bk.to(device=pre_BK.device, dtype=torch.int64) - offset
        # Gather the k selected values, zero the block, put them back: k values per example are read and written,
        # not a mask of the block's size.
        where = ((pos_Bk >= 0) & (pos_Bk < pre_BK.shape[-1])).nonzero(as_tuple=True)
        index = (*where[:-1], pos_Bk[where])
        kept_E = pre_BK[index] if self.keep_negative else pre_BK[index].relu_()
        return pre_BK.zero_().index_put_(index, kept_E)


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class JumpRelu:
    """f = pre * (pre > threshold), one threshold for all latents (BatchTopK's inference rule)."""

    threshold: float
    """Pre-activations at or below it give 0; non-negative."""

    kind: typing.ClassVar[str] = "jumprelu"
    per_latent: typing.ClassVar[bool] = True

    def __post_init__(self):
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a non-negative finite number, got {self.threshold}")

    def __call__(self, pre_BS: Tensor) -> Tensor:
        return pre_BS * (pre_BS > self.threshold)

    def apply_(self, pre_BS: Tensor) -> Tensor:
        """`self(pre_BS)` computed in place (same values, bit for bit); returns pre_BS."""
        return pre_BS.mul_(pre_BS > self.threshold)


ACTIVATIONS: dict[str, type] = {cls.kind: cls for cls in (Relu, TopK, JumpRelu)}
"""Activation kind (as saved in sae.json) -> its class."""


def _fields_json(obj: object) -> dict[str, object]:
    """The fields of a config dataclass for `sae.json`, without those added later (`artifacts.hashed_if_set`) that
    are at their default: what earlier versions wrote, they still write."""
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.metadata.get("hashed") != "unless-default" or getattr(obj, f.name) != f.default
    }


@beartype.beartype
def activation_to_json(activation: Activation) -> dict[str, object]:
    """{"kind": ..., **fields}, what `sae.json` stores under "activation"."""
    return {"kind": activation.kind, **_fields_json(activation)}


@beartype.beartype
def activation_from_json(obj: object) -> Activation:
    """Inverse of `activation_to_json`. Raises ValueError for an unknown kind or bad fields."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("kind"), str):
        raise ValueError(f"activation must be an object with a string 'kind', got {obj!r}")
    fields = dict(obj)
    kind = fields.pop("kind")
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation kind {kind!r}; known: {sorted(ACTIVATIONS)}")
    try:
        return ACTIVATIONS[kind](**fields)
    except TypeError as err:
        raise ValueError(f"invalid {kind} activation {obj!r}: {err}") from err


###########
# Decoder #
###########


@torch.no_grad()
def normalize_rows_(W_dec_SD: Tensor) -> None:
    """Rescale every row (last axis; any leading axes) to unit L2 norm, in place."""
    W_dec_SD.div_(W_dec_SD.norm(dim=-1, keepdim=True))


@torch.no_grad()
def remove_parallel_grads_(W_dec_SD: Tensor) -> None:
    """Remove from W_dec.grad the component parallel to each row (last axis; any leading axes), in place."""
    if W_dec_SD.grad is None:
        return
    # einsum and addcmul_ make no temporary of W's size (which, for a big stack, costs page faults every step).
    dot_S = torch.einsum("...d,...d->...", W_dec_SD.grad, W_dec_SD)
    parallel_S1 = (dot_S / W_dec_SD.norm(dim=-1).square()).unsqueeze(-1)
    W_dec_SD.grad.addcmul_(parallel_S1, W_dec_SD, value=-1)


#######
# SAE #
#######


class SaeOutput(typing.NamedTuple):
    """What a forward pass of a `SparseAutoencoder` returns."""

    x_hat_BD: Tensor
    """Reconstructions, in the same space as the inputs."""
    f_BS: Tensor
    """Latent activations (non-negative, except for `TopK(keep_negative=True)`)."""


class SparseAutoencoder(torch.nn.Module):
    """Sparse autoencoder with a decoder bias subtracted before encoding and an `Activation` rule.

    Parameters: `W_enc` [d_vit, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_vit] (one dictionary atom per row, unit
    norm while training), `b_dec` [d_vit]. The initialisation is a deterministic function of `cfg.seed`: random
    unit decoder rows, `W_enc = W_dec.T`, zero biases (training sets `b_dec` from the data).
    """

    def __init__(self, cfg: SaeConfig, activation: Activation = Relu()):
        super().__init__()
        if not isinstance(activation, Activation):
            raise TypeError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.cfg = cfg
        self.activation = activation
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_vit, generator=gen, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_vit))

    @jaxtyped(typechecker=beartype.beartype)
    def pre_acts(
        self, x_BD: Float[Tensor, "B D"], latents: slice | Int[Tensor, " K"] | None = None
    ) -> Float[Tensor, "B K"]:
        """Latent pre-activations, before the activation rule: all of them, or only those in `latents` (a slice, or
        a 1-D tensor of latent indices)."""
        if x_BD.shape[-1] != self.cfg.d_vit:
            raise ValueError(f"SAE expects d_vit={self.cfg.d_vit} but activations have width {x_BD.shape[-1]}")
        W_enc_DK, b_enc_K = self.W_enc, self.b_enc
        if latents is not None:
            W_enc_DK, b_enc_K = W_enc_DK[:, latents], b_enc_K[latents]
        return (x_BD - self.b_dec) @ W_enc_DK + b_enc_K

    @jaxtyped(typechecker=beartype.beartype)
    def encode(
        self,
        x_BD: Float[Tensor, "B D"],
        latents: slice | Int[Tensor, " K"] | None = None,
        top_Bk: Int[Tensor, "B k"] | None = None,
    ) -> Float[Tensor, "B K"]:
        """Latent activations f = activation((x - b_dec) @ W_enc + b_enc), shape [B, d_sae].

        With `latents` (e.g. slice(k_start, k_stop), or a 1-D tensor of latent indices) only those columns are
        returned, shape [B, K]; their values equal the same columns of the full encoding (up to the last bit: a
        matmul over other columns may round differently). For per-latent rules (ReLU, JumpReLU) only those
        columns are computed. For TopK, given `top_Bk` (each example's selected latents over all latents,
        `TopK.top_latents`) only those columns are computed too (`TopK.select`); without it the full encoding is
        computed and sliced.
        """
        if top_Bk is not None:
            if not isinstance(self.activation, TopK):
                raise ValueError(f"top_Bk only applies to a TopK SAE, not to {self.activation!r}")
            if not isinstance(latents, slice | None):
                raise ValueError("top_Bk needs latents as a slice (a block of columns)")
            offset = 0 if latents is None else range(self.cfg.d_sae)[latents].start
            return self.activation.select(self.pre_acts(x_BD, latents), top_Bk, offset)
        if latents is None or self.activation.per_latent:
            return self.activation(self.pre_acts(x_BD, latents))
        return self.activation(self.pre_acts(x_BD))[:, latents]

    @torch.no_grad()
    def encode_into(self, x_BD: Tensor, out_BK: Tensor, latents: slice, top_Bk: Tensor | None = None) -> None:
        """`out_BK[:] = encode(x_BD, latents, top_Bk)`, the same values bit for bit, without temporaries the size of
        out_BK: the encoder matmul writes into out_BK (a contiguous float32 [B, K] tensor), then the bias and the
        activation rule are applied in place. What scoring does for every block of latents."""
        if x_BD.shape[-1] != self.cfg.d_vit:
            raise ValueError(f"SAE expects d_vit={self.cfg.d_vit} but activations have width {x_BD.shape[-1]}")
        activation = self.activation
        if top_Bk is None and not activation.per_latent:
            out_BK.copy_(self.encode(x_BD, latents))
            return
        torch.matmul(x_BD - self.b_dec, self.W_enc[:, latents], out=out_BK)
        self.activate_(out_BK, latents, top_Bk)

    @torch.no_grad()
    def activate_(self, pre_BK: Tensor, latents: slice, top_Bk: Tensor | None = None) -> None:
        """Turn `(x - b_dec) @ W_enc[:, latents]` (the encoder matmul of a block of latents, before the bias) into
        `encode(x, latents, top_Bk)` in place, bit for bit: add the bias, apply the activation rule (a per-latent
        rule, or TopK given `top_Bk`). Rows are independent, so any run of rows may be done alone."""
        activation = self.activation
        if top_Bk is None and not activation.per_latent:
            raise ValueError(f"{activation!r} needs each example's selected latents (top_Bk) to encode a block")
        pre_BK.add_(self.b_enc[latents])
        if top_Bk is not None:
            if not isinstance(activation, TopK):
                raise ValueError(f"top_Bk only applies to a TopK SAE, not to {activation!r}")
            activation.select_(pre_BK, top_Bk, range(self.cfg.d_sae)[latents].start)
        else:
            activation.apply_(pre_BK)

    @jaxtyped(typechecker=beartype.beartype)
    def decode(self, f_BS: Float[Tensor, "B S"]) -> Float[Tensor, "B D"]:
        """Reconstruction x_hat_BD = f @ W_dec + b_dec."""
        return f_BS @ self.W_dec + self.b_dec

    @jaxtyped(typechecker=beartype.beartype)
    def forward(self, x_BD: Float[Tensor, "B D"]) -> SaeOutput:
        """Encode then decode a batch; returns reconstructions and latents."""
        f_BS = self.encode(x_BD)
        return SaeOutput(x_hat_BD=self.decode(f_BS), f_BS=f_BS)

    # The `saev.methods.Encoder` interface, through which scoring and the metrics see every method.

    @property
    def d_vit(self) -> int:
        return self.cfg.d_vit

    @property
    def n_latents(self) -> int:
        return self.cfg.d_sae

    def encode_block(self, x_BD: Tensor, start: int, stop: int) -> Tensor:
        """`encode(x_BD, slice(start, stop))`."""
        return self.encode(x_BD, slice(start, stop))

    def reconstruct(self, x_BD: Tensor) -> Tensor:
        """`forward(x_BD).x_hat_BD`."""
        return self.forward(x_BD).x_hat_BD

    def count_nonzero(self, x_BD: Tensor) -> Tensor:
        """int64 [B]: each row's non-zero latents."""
        return (self.encode(x_BD) != 0).sum(dim=1)

    def normalize_decoder_(self) -> None:
        """Rescale every decoder row (dictionary atom) to unit L2 norm, in place."""
        normalize_rows_(self.W_dec)

    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad the component parallel to each decoder row, in place.

        With unit-norm rows that component only changes the row norms, which `normalize_decoder_` undoes anyway;
        removing it keeps Adam's statistics about the directions that matter. Call between backward() and step().
        """
        remove_parallel_grads_(self.W_dec)

    @torch.no_grad()
    def fold_scale_(self, scale: float) -> None:
        """Rewrite the weights, in place, so the SAE takes raw activations instead of `raw * scale`.

        Afterwards `pre_acts(raw)` and `encode(raw)` equal the old ones of `raw * scale` (up to float rounding), so
        the activation rule (k, threshold) is unchanged, and `decode` returns raw-space reconstructions (the old
        reconstruction divided by `scale`). Decoder rows then have norm 1/scale: do not normalize after folding.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        # (raw - b_dec/s) @ (s W_enc) == (s raw - b_dec) @ W_enc, and (f @ W_dec + b_dec) / s.
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)


class SaeStack(torch.nn.Module):
    """S SAEs of one shape as stacked parameters with a leading SAE axis, for batched training.

    Parameters: `W_enc` [S, d_vit, d_sae], `b_enc` [S, d_sae], `W_dec` [S, d_sae, d_vit], `b_dec` [S, d_vit]; slice
    s is initialised exactly like `SparseAutoencoder(cfgs[s])`. Every SAE reads the same input batch.
    `pre_acts` and `decode` are the plain (autograd-friendly) formulas; the training step (saev.objectives.Objective)
    computes the same ones with reused buffers and hand-written gradients.
    """

    def __init__(self, cfgs: Sequence[SaeConfig]):
        super().__init__()
        if not cfgs:
            raise ValueError("an SaeStack needs at least one SaeConfig")
        shapes = {(cfg.d_vit, cfg.d_sae) for cfg in cfgs}
        if len(shapes) != 1:
            raise ValueError(f"SAEs in a stack must share d_vit and d_sae, got (d_vit, d_sae) in {sorted(shapes)}")
        self.cfgs = tuple(cfgs)
        saes = [SparseAutoencoder(cfg) for cfg in cfgs]
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            stacked = torch.stack([getattr(sae, name).detach() for sae in saes])
            self.register_parameter(name, torch.nn.Parameter(stacked))

    @property
    def n_saes(self) -> int:
        """S, the number of stacked SAEs."""
        return len(self.cfgs)

    @jaxtyped(typechecker=beartype.beartype)
    def pre_acts(self, x_BD: Float[Tensor, "B D"]) -> Float[Tensor, "S B K"]:
        """Pre-activations of every SAE on the shared batch: (x - b_dec[s]) @ W_enc[s] + b_enc[s]."""
        x_SBD = x_BD.unsqueeze(0) - self.b_dec.unsqueeze(1)
        return torch.baddbmm(self.b_enc.unsqueeze(1), x_SBD, self.W_enc)

    @jaxtyped(typechecker=beartype.beartype)
    def decode(self, f_SBK: Float[Tensor, "S B K"]) -> Float[Tensor, "S B D"]:
        """Reconstructions of every SAE: f[s] @ W_dec[s] + b_dec[s]."""
        return torch.baddbmm(self.b_dec.unsqueeze(1), f_SBK, self.W_dec)

    def normalize_decoder_(self) -> None:
        """Rescale every decoder row of every SAE to unit L2 norm, in place."""
        normalize_rows_(self.W_dec)

    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad the component parallel to each decoder row, in place (see SparseAutoencoder)."""
        remove_parallel_grads_(self.W_dec)

    @torch.no_grad()
    def get_sae(self, s: int, activation: Activation = Relu()) -> SparseAutoencoder:
        """A copy of SAE `s` as a `SparseAutoencoder` with the given inference `activation`, on the same device."""
        sae = SparseAutoencoder(self.cfgs[s], activation).to(self.W_enc.device)
        sae.load_state_dict({name: getattr(self, name)[s] for name in ("W_enc", "b_enc", "W_dec", "b_dec")})
        return sae


###############
# Checkpoints #
###############


@beartype.beartype
def save(sae: SparseAutoencoder, dpath: pathlib.Path | str) -> None:
    """Write `sae` to the directory `dpath` as `sae.safetensors` (weights) and `sae.json` (config + activation).

    Each file is written atomically (temp file + rename) with mode 0666 & ~umask; the weights are serialised in
    memory first (safetensors' `save_file` would create a 0600 file and report a full disk as `SafetensorError`).
    The directory is created if needed.

    Raises:
        atomic.WriteError: a file could not be written (disk full, permissions); the message names it.
    """
    dpath = pathlib.Path(dpath)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in sae.state_dict().items()}
    atomic.atomic_write_bytes(dpath / WEIGHTS_FNAME, safetensors.torch.save(tensors))
    config = {**_fields_json(sae.cfg), "activation": activation_to_json(sae.activation)}
    atomic.atomic_write_json(dpath / CONFIG_FNAME, config)


@beartype.beartype
def load(dpath: pathlib.Path | str, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE written by `save` from the directory `dpath` (a JSON without "activation" means ReLU).

    Raises:
        FileNotFoundError: `sae.json` or `sae.safetensors` is missing (the message names the file).
        PermissionError: a file is not readable by this user (the error names the file).
        ValueError: the JSON is not a valid `SaeConfig` + activation (a missing, unknown or mistyped field), or the
            tensors' names or shapes disagree with it.
    """
    dpath = pathlib.Path(dpath)
    cfg_fpath, weights_fpath = dpath / CONFIG_FNAME, dpath / WEIGHTS_FNAME
    for fpath in (cfg_fpath, weights_fpath):
        if not fpath.is_file():
            raise FileNotFoundError(f"SAE checkpoint file {fpath} is missing")

    try:
        fields = json.loads(cfg_fpath.read_text())
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object, got {type(fields).__name__}")
        activation = activation_from_json(fields.pop("activation", {"kind": Relu.kind}))
        cfg = SaeConfig(**fields)
    # A field of the wrong type ("d_vit": "8") is refused by beartype, whose violation is not a TypeError.
    except (json.JSONDecodeError, TypeError, ValueError, beartype.roar.BeartypeCallHintViolation) as err:
        raise ValueError(f"{cfg_fpath} is not a valid SaeConfig: {err}") from err

    sae = SparseAutoencoder(cfg, activation)
    expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    # safetensors reports an unreadable file as "No such file or directory": open it ourselves first.
    with open(weights_fpath, "rb"):
        pass
    try:
        tensors = safetensors.torch.load_file(str(weights_fpath), device="cpu")
    except safetensors.SafetensorError as err:
        raise ValueError(f"{weights_fpath} is not a readable safetensors file: {err}") from err
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        raise ValueError(f"{weights_fpath} holds tensors {got}, but {cfg_fpath} ({cfg}) needs {expected}")
    sae.load_state_dict(tensors)
    return sae.to(device)
