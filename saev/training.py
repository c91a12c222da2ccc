"""Training sparse autoencoders on activation rows (an array, a memmap or a dump directory's layer), alone or as a
batched group.

`train_group(cfgs, data)` is the job body of the train stage for a group of SAEs that share one shape, one
objective and one data stream (`get_group_key`; `saev.sweep.group` splits a sweep into such groups):

1. Check the data (width, finiteness of every row, enough rows) and, in the same single pass, compute the
   activation scale (mean L2 norm of scaled training rows = sqrt(d_vit)) and the mean training row.
2. Train every SAE of the group at once (a `GroupTrainer`: stacked weights, batched matmuls, a hand-written
   backward pass, see `Objective`) with Adam (one learning rate per SAE) on scaled, shuffled minibatches from rows
   [0, N - n_eval), read by `saev.data.loader.ShuffledLoader` (large contiguous reads, shuffled in RAM, on a
   background thread). Every SAE sees the same batches. Decoder rows stay unit norm and the gradient component
   parallel to them is removed before each step.
3. Fold the scale into the weights (the returned SAEs read RAW activations) and measure `Metrics` in float64 on
   the held-out rows [N - n_eval, N), which are never trained on (nor used for the scale or b_dec).

`train(cfg, data)` is `train_group([cfg], data)[0]`: one implementation, so an SAE trained alone and the same
SAE trained in a group end with the same weights (bit-identical on CPU in our tests; on GPU batched kernels may
round differently).

Objectives (`OBJECTIVES`, selected by `TrainConfig.objective`): "relu_l1" (ReLU + decoder-norm-weighted L1), "topk"
(exactly the k largest pre-activations per example), "batchtopk" (the k * batch_size largest over the batch, with
a threshold estimated during training for inference), "matryoshka" (BatchTopK whose nested dictionary prefixes
each reconstruct). The top-k objectives add AuxK: dead latents (not fired for `dead_tokens` examples) learn to
reconstruct the residual.

Checkpoints: with `checkpoint_fpath`, the whole training state (weights, Adam moments, dead-latent counters,
objective statistics, step) is saved atomically every `checkpoint_every` steps, and training resumes from it when
the file exists; the data order is a function of (seed, step), so a resumed run ends bit-identical (CPU) to an
uninterrupted one. `request_checkpoint()` (safe in a signal handler, e.g. Slurm's pre-timeout SIGUSR2) makes the
running loop save at the end of the current step and raise `Preempted`.
"""

import dataclasses
import itertools
import logging
import math
import pathlib
import time
import typing
from collections.abc import Sequence

import beartype
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev import artifacts, checkpoint, helpers, nn
from saev.data import loader

_LOGGER_NAME = "saev.training"
_STATS_CHUNK_ROWS = 16384
_EVAL_CHUNK_ROWS = 1024
_DENSE_THRESHOLD = 0.1
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_CPU_TILE_BYTES = 8 * 2**20
"""On CPU, a group's loss is computed for as many SAEs at a time as keep one [tile, B, d_sae] float32 buffer
under this size (`get_tile_size`)."""
_THRESHOLD_WINDOW = 1000
"""BatchTopK's threshold is the running mean of each batch's minimum positive activation over the first this-many
batches, then an exponential moving average with this window (so it tracks the end of training)."""
_CHECKPOINT_KIND = "saev.training.GroupTrainer"
_CHECKPOINT_VERSION = 2


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained SAE (given the activations)."""

    sae: nn.SaeConfig
    """Shape and initialisation seed of the SAE."""
    objective: str = "relu_l1"
    """Training objective and inference activation: "relu_l1", "topk", "batchtopk" or "matryoshka" (see
    `OBJECTIVES`)."""
    l1_coeff: float = 4e-3
    """relu_l1 only: weight of the L1 penalty sum_s f_s * ||W_dec[s]|| (summed over latents, averaged over the
    batch); the reconstruction term is the per-element mean squared error on scaled activations."""
    k: int = 32
    """topk: active latents per example; batchtopk and matryoshka: average active latents per example (the
    k * batch_size largest activations of each batch are kept)."""
    aux_k: int = 512
    """Top-k objectives: dead latents (at most d_sae) used by the AuxK loss to reconstruct the residual."""
    aux_coeff: float = 1 / 32
    """Top-k objectives: weight of the AuxK loss (normalised MSE of the residual); 0 disables it."""
    dead_tokens: int = 10_000_000
    """Top-k objectives: a latent is dead (AuxK trains it) after not firing on this many training examples."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """matryoshka: sizes of the nested dictionary prefixes that each reconstruct, strictly increasing; d_sae is
    added as the last one if missing. Empty means (d_sae // 16, d_sae // 4, d_sae)."""
    lr: float = 1e-3
    """Adam learning rate after warmup."""
    n_train: int = 1_000_000
    """Training examples seen in total (rounded down to whole batches); rows are revisited when it exceeds them."""
    batch_size: int = 1024
    """Examples per optimisation step."""
    warmup_steps: int = 100
    """Steps over which the learning rate (and relu_l1's L1 coefficient) rise linearly from ~0 to their values."""
    seed: int = 0
    """Seed of the data order (the shuffling of training rows, see `saev.data.loader`)."""
    chunk_rows: int = 16_384
    """Rows read from disk as one contiguous chunk (64 MB at width 1024: large reads reach the disk's streaming
    speed); part of the data order."""
    buffer_rows: int = 262_144
    """Rows shuffled together in RAM: a window of buffer_rows // chunk_rows chunks from random places in the data
    (16 by default). The loader holds two such buffers (2 GiB at width 1024, less when the data is smaller). Larger
    mixes better; part of the data order."""
    n_eval: int = 4096
    """Held-out examples for `Metrics`: the LAST n_eval rows of the activations, never trained on."""

    def __post_init__(self):
        for name in ("n_train", "batch_size", "n_eval", "k", "aux_k", "dead_tokens", "chunk_rows", "buffer_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.buffer_rows < self.chunk_rows:
            raise ValueError(f"buffer_rows={self.buffer_rows} is smaller than chunk_rows={self.chunk_rows}")
        if self.n_train < self.batch_size:
            raise ValueError(f"n_train={self.n_train} is smaller than one batch (batch_size={self.batch_size})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        for name in ("l1_coeff", "aux_coeff"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; known: {', '.join(OBJECTIVES)}")
        OBJECTIVES[self.objective].check(self)

    @property
    def n_steps(self) -> int:
        """Number of optimisation steps: n_train // batch_size."""
        return self.n_train // self.batch_size


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Metrics:
    """Quality of a trained SAE on the held-out rows, computed in float64 on raw (unscaled) activations."""

    mse: float
    """Mean squared reconstruction error per element, in raw activation units."""
    nmse: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over held-out rows."""
    l0: float
    """Mean number of active (> 0) latents per held-out example."""
    dead_frac: float
    """Fraction of latents never active on the held-out rows."""
    dense_frac: float
    """Fraction of latents active on more than 10% of the held-out rows."""
    n_steps: int
    """Optimisation steps taken."""


class TrainResult(typing.NamedTuple):
    """What `train` returns (and `train_group`, one per config)."""

    sae: nn.SparseAutoencoder
    """The trained SAE on cpu, with the activation scale folded in (it reads RAW activations) and the inference
    activation rule of its objective (ReLU, TopK(k) or JumpReLU(threshold))."""
    metrics: Metrics
    """Held-out quality of `sae`."""


from saev.preemption import Preempted, request_checkpoint, take_checkpoint_request  # noqa: E402, F401


##############
# Objectives #
##############


class Loss(typing.NamedTuple):
    """Loss terms of one training batch for every SAE of a group: [S] tensors on the training device."""

    loss: Tensor
    """What is minimised (each SAE its own): reconstruction + sparsity + aux_coeff * aux."""
    mse: Tensor
    """Per-element mean squared error of the full reconstruction, on scaled activations."""
    sparsity: Tensor
    """Weighted sparsity penalty (relu_l1; 0 for the top-k objectives, whose sparsity is a constraint)."""
    aux: Tensor
    """AuxK loss, before its coefficient (0 when no latent is dead or the objective has no AuxK)."""
    l0: Tensor
    """Mean number of active latents per example (NaN when the call was made without `with_l0`)."""
    fired_SK: Tensor
    """[S, d_sae] bool: latents active on at least one example of the batch."""
    f_SBK: Tensor | None
    """The batch's latents [S, B, d_sae]: a reused buffer, valid until the objective's next call (None when the
    group was computed in several tiles, see `get_tile_size`)."""


class Objective:
    """A training loss for a group of stacked SAEs with its gradient, and the inference activation rule it gives each
    trained SAE. Subclasses register in `OBJECTIVES` under `name` and differ only in a few hooks (`select_`,
    `prefixes`, `sparsity`, AuxK); an instance is built for one group and may keep per-SAE statistics gathered
    during training (`state_dict`, saved in checkpoints).

    Calling an objective runs the forward pass AND writes every stack parameter's `.grad`, with a hand-written
    backward pass: all SAE formulas share the form f = pre * mask (mask = f > 0), so the backward is a few
    batched matmuls. Unlike autograd it reuses its [S, B, d_sae] buffers from step to step (on CPU, fresh
    allocations of that size are page-faulted anew every step, which cost as much as the matmuls) and skips the
    matmul that autograd would spend on the gradient of b_dec through the encoder (a matrix-vector product
    suffices). tests/test_objectives.py checks these gradients against autograd.
    """

    name: typing.ClassVar[str]
    uses: typing.ClassVar[tuple[str, ...]] = ()
    """The objective-specific `TrainConfig` fields (of `OBJECTIVE_FIELDS`) this objective reads."""

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device):
        self.cfgs = tuple(cfgs)
        self.device = device
        self.prefixes: tuple[int, ...] = (cfgs[0].sae.d_sae,)
        """Nested dictionary sizes that each reconstruct the input (just d_sae, except for matryoshka)."""
        self._buffers: dict[str, Tensor] = {}

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Raise ValueError if `cfg`'s fields for this objective are invalid."""

    @classmethod
    def group_key(cls, cfg: TrainConfig) -> dict[str, object]:
        """Fields of this objective that SAEs trained together must share, beyond `get_group_key`'s."""
        return {}

    def select_(self, pre_SBK: Tensor) -> None:
        """Turn pre-activations into latents, in place; every latent must be 0 or its pre-activation."""
        raise NotImplementedError

    def sparsity(self, W_dec_SKD: Tensor, fsum_SK: Tensor, B: int, step: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """A sparsity penalty that is a function of each latent's batch sum and decoder row: (penalty [S], its
        gradient w.r.t. every latent [S, K] (the same for every example), c [S, K] such that its gradient w.r.t.
        W_dec is c[:, :, None] * W_dec); None if there is none."""
        return None

    def observe_(self, loss: Loss) -> None:
        """Update training statistics after an optimisation step (default: none)."""

    def get_activation(self, s: int) -> nn.Activation:
        """The inference activation rule of SAE `s` (as trained so far)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """Training statistics to checkpoint (default: none)."""
        return {}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore `state_dict()`."""

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return buf

    def _select_aux(self, pre_SBK: Tensor, dead_SK: Tensor, scratch_SBK: Tensor) -> tuple[Tensor, ...] | None:
        """AuxK's latents among the dead ones (values, indices [S, B, aux_k], has-dead [S]) or None (`_TopKFamily`)."""
        return None

    @torch.no_grad()
    def __call__(
        self, stack: "nn.SaeStack | StackSlice", x_BD: Tensor, step: int, dead_SK: Tensor, *, with_l0: bool = True
    ) -> Loss:
        """Loss of every SAE on the scaled batch `x_BD` at 0-based `step` (`dead_SK` marks dead latents); sets the
        gradient of every parameter of `stack`. Without `with_l0`, `Loss.l0` (an extra pass) is NaN."""
        W_enc, b_enc, W_dec, b_dec = stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec
        for p in (W_enc, b_enc, W_dec, b_dec):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        (S, D, K), B = W_enc.shape, x_BD.shape[0]
        x_BD = x_BD.to(W_enc.dtype)

        # Forward: pre-activations, the auxiliary selection (needs them), latents in place.
        f_SBK = self._buffer("f", (S, B, K), W_enc)
        grad_SBK = self._buffer("grad", (S, B, K), W_enc)
        xc_SBD = x_BD.unsqueeze(0) - b_dec.unsqueeze(1)
        torch.baddbmm(b_enc.unsqueeze(1), xc_SBD, W_enc, out=f_SBK)
        aux_sel = self._select_aux(f_SBK, dead_SK, scratch_SBK=grad_SBK)
        self.select_(f_SBK)
        fsum_SK = f_SBK.sum(dim=1)

        # Reconstruction by each nested prefix; g_j = d mse_j / d x_hat_j, and the gradient reaching the latents of
        # chunk j is the suffix sum h_j = g_j + g_{j+1} + ... (prefix j and every larger one contain chunk j).
        x_hat_SBD, recon_S, g_SBDs, start = b_dec.unsqueeze(1), 0.0, [], 0
        for stop in self.prefixes:
            x_hat_SBD = torch.baddbmm(x_hat_SBD, f_SBK[:, :, start:stop], W_dec[:, start:stop])
            r_SBD = x_hat_SBD - x_BD
            mse_S = r_SBD.pow(2).mean(dim=(1, 2))
            recon_S, start = recon_S + mse_S, stop
            g_SBDs.append(r_SBD.mul_(2 / (B * D)))
        h_SBDs = list(itertools.accumulate(reversed(g_SBDs), torch.add))[::-1]

        # Backward of the decoder: d/d f (into grad_SBK) and d/d W_dec, chunk by chunk.
        start = 0
        for stop, h_SBD in zip(self.prefixes, h_SBDs, strict=True):
            if (start, stop) == (0, K):
                torch.bmm(h_SBD, W_dec.transpose(1, 2), out=grad_SBK)
                torch.bmm(f_SBK.transpose(1, 2), h_SBD, out=W_dec.grad)
            else:
                grad_SBK[:, :, start:stop] = torch.bmm(h_SBD, W_dec[:, start:stop].transpose(1, 2))
                W_dec.grad[:, start:stop] = torch.bmm(f_SBK[:, :, start:stop].transpose(1, 2), h_SBD)
            start = stop
        grad_b_dec_SD = h_SBDs[0].sum(dim=1)

        zero_S = torch.zeros(S, dtype=W_enc.dtype, device=W_enc.device)
        penalty = self.sparsity(W_dec, fsum_SK, B, step)
        sparsity_S = zero_S
        if penalty is not None:
            sparsity_S, grad_f_SK, grad_W_dec_scale_SK = penalty
            grad_SBK.add_(grad_f_SK.unsqueeze(1))
            W_dec.grad.addcmul_(grad_W_dec_scale_SK.unsqueeze(2), W_dec)

        # Through the activation: only active latents (f > 0) pass gradient. In place, without a mask tensor.
        torch.ops.aten.threshold_backward.grad_input(grad_SBK, f_SBK, 0, grad_input=grad_SBK)
        aux_S = zero_S
        if aux_sel is not None:
            aux_S = self._aux_backward_(stack, x_BD - x_hat_SBD, aux_sel, grad_SBK)

        # Backward of the encoder; b_dec's gradient through it is -(sum over the batch) @ W_enc^T, a mat-vec.
        torch.bmm(xc_SBD.transpose(1, 2), grad_SBK, out=W_enc.grad)
        grad_pre_SK = grad_SBK.sum(dim=1)
        b_enc.grad.copy_(grad_pre_SK)
        torch.sub(grad_b_dec_SD, torch.bmm(grad_pre_SK.unsqueeze(1), W_enc.transpose(1, 2)).squeeze(1), out=b_dec.grad)

        aux_coeff_S = torch.tensor([cfg.aux_coeff for cfg in self.cfgs], dtype=W_enc.dtype, device=W_enc.device)
        return Loss(
            loss=recon_S + sparsity_S + aux_coeff_S * aux_S,
            mse=mse_S,
            sparsity=sparsity_S,
            aux=aux_S,
            l0=self._count_active_S(f_SBK) / B if with_l0 else torch.full_like(zero_S, math.nan),
            fired_SK=fsum_SK > 0,  # latents are non-negative: one fired iff its batch sum is positive
            f_SBK=f_SBK,
        )

    def _count_active_S(self, f_SBK: Tensor) -> Tensor:
        """Number of positive latents of each SAE, without an [S, B, K] integer copy: the bool mask is summed as
        uint8 in blocks of at most 255 entries (no overflow), then the block sums in int64."""
        S = f_SBK.shape[0]
        active_SN = torch.gt(f_SBK, 0, out=self._buffer("active", tuple(f_SBK.shape), f_SBK, torch.bool)).view(S, -1)
        n = active_SN.shape[1]
        block = max(b for b in range(1, 256) if n % b == 0)
        per_block = active_SN.view(torch.uint8).view(S, n // block, block).sum(dim=2, dtype=torch.uint8)
        return per_block.sum(dim=1).to(f_SBK.dtype)

    def _aux_backward_(
        self, stack: "nn.SaeStack | StackSlice", e_SBD: Tensor, aux_sel: tuple[Tensor, ...], grad_SBK: Tensor
    ):
        raise NotImplementedError


def _keep_top(values_SRM: Tensor, n_S: Sequence[int]) -> tuple[Tensor, Tensor]:
    """For SAE s, the n_S[s] largest entries of every row values_SRM[s, r] through a ReLU, as (values, indices)
    [S, R, max n_S]; entries beyond an SAE's own n are zeroed. With one n for all SAEs this is a plain (unsorted)
    topk."""
    n_max = max(n_S)
    uniform = all(n == n_max for n in n_S)
    vals_SRJ, idx_SRJ = values_SRM.topk(n_max, dim=-1, sorted=not uniform)
    vals_SRJ = torch.relu(vals_SRJ)
    if not uniform:
        n_S11 = torch.tensor(n_S, device=values_SRM.device).view(-1, 1, 1)
        vals_SRJ = vals_SRJ * (torch.arange(n_max, device=values_SRM.device) < n_S11)
    return vals_SRJ, idx_SRJ


@beartype.beartype
class ReluL1Objective(Objective):
    """ReLU latents with an L1 penalty weighted by decoder-row norm (Anthropic, April 2024 update): the penalty is
    sum_s f_s * ||W_dec[s]|| summed over latents and averaged over the batch; its coefficient rises linearly over
    `warmup_steps`, which keeps latents from dying early. Inference: ReLU."""

    name = "relu_l1"
    uses = ("l1_coeff",)

    def select_(self, pre_SBK: Tensor) -> None:
        pre_SBK.clamp_(min=0)

    def sparsity(self, W_dec_SKD: Tensor, fsum_SK: Tensor, B: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
        coeffs = [cfg.l1_coeff * _warmup(step, cfg.warmup_steps) / B for cfg in self.cfgs]
        coeff_S1 = torch.tensor(coeffs, dtype=W_dec_SKD.dtype, device=W_dec_SKD.device).unsqueeze(1)
        norm_SK = W_dec_SKD.norm(dim=2)
        penalty_S = (coeff_S1 * fsum_SK * norm_SK).sum(dim=1)
        return penalty_S, coeff_S1 * norm_SK, coeff_S1 * fsum_SK / norm_SK

    def get_activation(self, s: int) -> nn.Activation:
        return nn.Relu()


class _TopKFamily(Objective):
    """Shared by the top-k objectives: k and AuxK settings.

    AuxK (Gao et al. 2024): the top-aux_k DEAD latents of each example reconstruct the residual e = x - x_hat
    (treated as a constant, no decoder bias); the loss is that error's sum of squares over the residual's total
    variance (0 for an SAE without dead latents). Dead latents with a positive pre-activation get gradient and can
    come back to life.
    """

    uses = ("k", "aux_k", "aux_coeff", "dead_tokens")

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        if cfg.k > cfg.sae.d_sae:
            raise ValueError(f"k={cfg.k} is larger than d_sae={cfg.sae.d_sae}")

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device):
        super().__init__(cfgs, device)
        d_sae = cfgs[0].sae.d_sae
        self.k_S = [cfg.k for cfg in cfgs]
        self.aux_k_S = [min(cfg.aux_k, d_sae) for cfg in cfgs]
        self.use_aux = any(cfg.aux_coeff > 0 for cfg in cfgs)

    def _select_aux(self, pre_SBK: Tensor, dead_SK: Tensor, scratch_SBK: Tensor) -> tuple[Tensor, ...] | None:
        if not self.use_aux or not bool(dead_SK.any()):  # one device sync per step
            return None
        minus_inf = torch.tensor(-math.inf, dtype=pre_SBK.dtype)
        masked_SBK = torch.where(dead_SK.unsqueeze(1), pre_SBK, minus_inf, out=scratch_SBK)
        vals_SBJ, idx_SBJ = _keep_top(masked_SBK, self.aux_k_S)
        return vals_SBJ, idx_SBJ, dead_SK.any(dim=1)

    def _aux_backward_(
        self, stack: "nn.SaeStack | StackSlice", e_SBD: Tensor, aux_sel: tuple[Tensor, ...], grad_SBK: Tensor
    ):
        """AuxK loss [S]; adds its gradients to W_dec.grad and to `grad_SBK` (the gradient w.r.t. pre-activations)."""
        vals_SBJ, idx_SBJ, has_dead_S = aux_sel
        S, B, K = grad_SBK.shape
        W_dec = stack.W_dec
        f_aux_SBK = self._buffer("aux", (S, B, K), W_dec)
        f_aux_SBK.zero_().scatter_(2, idx_SBJ, vals_SBJ)
        diff_SBD = torch.bmm(f_aux_SBK, W_dec).sub_(e_SBD)
        total_var_S = (e_SBD - e_SBD.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
        aux_S = torch.where(has_dead_S, diff_SBD.pow(2).sum(dim=(1, 2)) / total_var_S, 0.0)
        coeffs = torch.tensor([cfg.aux_coeff for cfg in self.cfgs], dtype=W_dec.dtype, device=W_dec.device)
        g_SBD = diff_SBD.mul_((2 * coeffs * has_dead_S / total_var_S)[:, None, None])
        W_dec.grad.baddbmm_(f_aux_SBK.transpose(1, 2), g_SBD)
        torch.bmm(g_SBD, W_dec.transpose(1, 2), out=f_aux_SBK)  # the buffer now holds d aux / d f_aux
        g_SBJ = f_aux_SBK.gather(2, idx_SBJ).mul_(vals_SBJ > 0)
        grad_SBK.scatter_add_(2, idx_SBJ, g_SBJ)
        return aux_S


@beartype.beartype
class TopKObjective(_TopKFamily):
    """TopK (Gao et al. 2024): each example keeps its k largest pre-activations (through a ReLU), so at most k
    latents fire, exactly k when the k-th is positive; + AuxK. Inference: the same TopK(k)."""

    name = "topk"

    def select_(self, pre_SBK: Tensor) -> None:
        vals_SBJ, idx_SBJ = _keep_top(pre_SBK, self.k_S)
        pre_SBK.zero_().scatter_(2, idx_SBJ, vals_SBJ)

    def get_activation(self, s: int) -> nn.Activation:
        return nn.TopK(self.k_S[s])


@beartype.beartype
class BatchTopKObjective(_TopKFamily):
    """BatchTopK (Bussmann et al. 2024): the k * batch_size largest pre-activations of the whole batch are kept
    (through a ReLU), so examples share a budget of k on average; + AuxK. The inference threshold is the running
    mean (then moving average, see `_THRESHOLD_WINDOW`) of each batch's minimum positive kept activation.
    Inference: JumpReLU(threshold), a per-latent rule."""

    name = "batchtopk"

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device):
        super().__init__(cfgs, device)
        self.threshold_S = torch.zeros(len(cfgs), dtype=torch.float64, device=device)
        self.n_observed_S = torch.zeros(len(cfgs), dtype=torch.int64, device=device)
        self._min_positive_S: Tensor | None = None

    def select_(self, pre_SBK: Tensor) -> None:
        S, B, K = pre_SBK.shape
        pre_S1N = pre_SBK.view(S, 1, B * K)
        vals_S1J, idx_S1J = _keep_top(pre_S1N, [k * B for k in self.k_S])
        pre_S1N.zero_().scatter_(2, idx_S1J, vals_S1J)
        self._min_positive_S = vals_S1J.masked_fill(vals_S1J <= 0, math.inf).amin(dim=(1, 2)).double()

    @torch.no_grad()
    def observe_(self, loss: Loss) -> None:
        min_pos_S = self._min_positive_S
        seen_S = torch.isfinite(min_pos_S)
        self.n_observed_S += seen_S
        rate_S = 1.0 / self.n_observed_S.clamp(1, _THRESHOLD_WINDOW).double()
        updated_S = self.threshold_S + rate_S * (min_pos_S - self.threshold_S)
        self.threshold_S = torch.where(seen_S, updated_S, self.threshold_S)

    def get_activation(self, s: int) -> nn.Activation:
        return nn.JumpRelu(float(self.threshold_S[s]))

    def state_dict(self) -> dict[str, Tensor]:
        return {"threshold_S": self.threshold_S, "n_observed_S": self.n_observed_S}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.threshold_S = tensors["threshold_S"].to(self.device)
        self.n_observed_S = tensors["n_observed_S"].to(self.device)


@beartype.beartype
class MatryoshkaObjective(BatchTopKObjective):
    """Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): latents as in BatchTopK, and every nested
    prefix of the dictionary (`matryoshka_prefixes`) reconstructs the input on its own: the loss is the sum over
    prefix sizes m of the MSE of f[:, :m] @ W_dec[:m] + b_dec; + AuxK. Inference: JumpReLU(threshold)."""

    name = "matryoshka"
    uses = (*_TopKFamily.uses, "matryoshka_prefixes")

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        super().check(cfg)
        prefixes = cfg.matryoshka_prefixes
        if any(m < 1 for m in prefixes) or any(a >= b for a, b in zip(prefixes, prefixes[1:])):
            raise ValueError(f"matryoshka_prefixes must be positive and strictly increasing, got {prefixes}")
        if prefixes and prefixes[-1] > cfg.sae.d_sae:
            raise ValueError(f"matryoshka_prefixes {prefixes} exceed d_sae={cfg.sae.d_sae}")

    @classmethod
    def group_key(cls, cfg: TrainConfig) -> dict[str, object]:
        return {"matryoshka_prefixes (resolved)": get_matryoshka_prefixes(cfg)}

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device):
        super().__init__(cfgs, device)
        self.prefixes = get_matryoshka_prefixes(cfgs[0])


@beartype.beartype
def get_matryoshka_prefixes(cfg: TrainConfig) -> tuple[int, ...]:
    """The prefix sizes a matryoshka config trains: its `matryoshka_prefixes` (default d_sae/16, d_sae/4) ending
    with d_sae."""
    d_sae = cfg.sae.d_sae
    prefixes = cfg.matryoshka_prefixes or tuple(m for m in (d_sae // 16, d_sae // 4) if m >= 1)
    prefixes = tuple(sorted(set(prefixes)))
    return prefixes if prefixes[-1:] == (d_sae,) else (*prefixes, d_sae)


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (ReluL1Objective, TopKObjective, BatchTopKObjective, MatryoshkaObjective)
}
"""Objective name (`TrainConfig.objective`) -> its class."""


OBJECTIVE_FIELDS = ("l1_coeff", "k", "aux_k", "aux_coeff", "dead_tokens", "matryoshka_prefixes")
"""`TrainConfig` fields that only some objectives read (see `Objective.uses`)."""


@beartype.beartype
def get_canonical(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the objective-specific fields its objective does not read reset to their defaults, so configs that
    train the same SAE are equal (and hash alike): e.g. sweeping `k` over relu_l1 SAEs gives one SAE, not copies."""
    unused = set(OBJECTIVE_FIELDS) - set(OBJECTIVES[cfg.objective].uses)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in unused}
    return dataclasses.replace(cfg, **defaults)


class StackSlice(typing.NamedTuple):
    """SAEs [start, stop) of a stack: parameter views that share storage with the stack and whose `.grad` are views
    of the stack's gradients (an objective called on a slice writes the stack's gradients of those SAEs)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor


def get_stack_slice(stack: nn.SaeStack, start: int, stop: int) -> StackSlice:
    views = []
    for name in StackSlice._fields:
        p = getattr(stack, name)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        view = p.detach()[start:stop]
        view.grad = p.grad[start:stop]
        views.append(view)
    return StackSlice(*views)


def get_tile_size(n_saes: int, batch_size: int, d_sae: int, device: torch.device) -> int:
    """SAEs whose loss and gradients are computed together. On a GPU, the whole group (one set of batched kernels).
    On a CPU, as many as keep one [tile, B, d_sae] float32 buffer within `_CPU_TILE_BYTES`: each SAE's latents and
    gradients then stay in the cache between the passes over them (the matmuls cost the same either way; with the
    whole group at once the elementwise passes stream from memory, measured 5% slower at B=1024, d_sae=2048)."""
    if device.type != "cpu":
        return n_saes
    return max(1, min(n_saes, _CPU_TILE_BYTES // (batch_size * d_sae * 4)))


class TiledObjective:
    """An objective computed tile by tile over a group's SAEs (see `get_tile_size`), with the interface of
    `Objective`: one objective instance per tile, called on `StackSlice`s; losses are concatenated (`Loss.f_SBK` is
    None: there is no [S, B, d_sae] tensor) and statistics checkpointed as if one objective kept them."""

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device, tile: int):
        self.bounds = [(start, min(start + tile, len(cfgs))) for start in range(0, len(cfgs), tile)]
        self.tiles = [OBJECTIVES[cfgs[0].objective](cfgs[a:b], device) for a, b in self.bounds]
        self._losses: list[Loss] = []

    def __call__(self, stack: nn.SaeStack, x_BD: Tensor, step: int, dead_SK: Tensor, *, with_l0: bool = True) -> Loss:
        self._losses = [
            objective(get_stack_slice(stack, a, b), x_BD, step, dead_SK[a:b], with_l0=with_l0)
            for objective, (a, b) in zip(self.tiles, self.bounds, strict=True)
        ]
        fields = {name: torch.cat([getattr(loss, name) for loss in self._losses]) for name in Loss._fields[:-1]}
        return Loss(**fields, f_SBK=None)

    def observe_(self, loss: Loss) -> None:
        for objective, tile_loss in zip(self.tiles, self._losses, strict=True):
            objective.observe_(tile_loss)

    def get_activation(self, s: int) -> nn.Activation:
        for objective, (a, b) in zip(self.tiles, self.bounds, strict=True):
            if a <= s < b:
                return objective.get_activation(s - a)
        raise IndexError(f"SAE {s} is not in this group of {self.bounds[-1][1]}")

    def state_dict(self) -> dict[str, Tensor]:
        states = [objective.state_dict() for objective in self.tiles]
        return {name: torch.cat([state[name] for state in states]) for name in states[0]}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for objective, (a, b) in zip(self.tiles, self.bounds, strict=True):
            objective.load_state_dict({name: t[a:b] for name, t in tensors.items()})


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup factor in (0, 1] for 0-based `step`."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


##########
# Groups #
##########


@beartype.beartype
def get_group_key(cfg: TrainConfig) -> dict[str, object]:
    """What SAEs trained together must share: one shape and objective (stacked weights, one loss) and one data
    stream (batch_size, n_train, seed, n_eval, chunk_rows, buffer_rows). Everything else (lr, l1_coeff, k,
    sae.seed, ...) may differ."""
    return {
        "sae.d_vit": cfg.sae.d_vit,
        "d_sae": cfg.sae.d_sae,
        "objective": cfg.objective,
        "batch_size": cfg.batch_size,
        "n_train": cfg.n_train,
        "seed": cfg.seed,
        "n_eval": cfg.n_eval,
        "chunk_rows": cfg.chunk_rows,
        "buffer_rows": cfg.buffer_rows,
        **OBJECTIVES[cfg.objective].group_key(cfg),
    }


@beartype.beartype
def check_group(cfgs: Sequence[TrainConfig]) -> None:
    """Raise ValueError naming the first field on which a config differs from the first one (see get_group_key)."""
    if not cfgs:
        raise ValueError("a training group needs at least one TrainConfig")
    first = get_group_key(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], start=1):
        key = get_group_key(cfg)
        for name, value in first.items():
            if key.get(name) != value:
                raise ValueError(
                    f"configs trained as one group must share {name} (one shape, one objective, one data stream): "
                    f"config 0 has {value!r}, config {i} has {key.get(name)!r}; split the sweep with "
                    "saev.sweep.group"
                )


########
# Data #
########


class DataStats(typing.NamedTuple):
    """Statistics of the training rows, from one pass over the data."""

    scale: float
    """Multiplier making the mean L2 norm of training rows sqrt(d_vit)."""
    mean_D: np.ndarray
    """Mean raw training row (float64)."""


@beartype.beartype
def get_data_stats(
    data: "np.ndarray | loader.Rows", n_train_rows: int, *, logger: logging.Logger | None = None
) -> DataStats:
    """Check every row is finite and compute `DataStats` over rows [0, n_train_rows), in one sequential pass of
    chunks (an array, a memmap or any `loader.Rows`, e.g. a dump directory's layer). Progress lines (every 10 s,
    and a last one) go to `logger` (default "saev.training").

    Raises:
        ValueError: a row (of the whole matrix, held-out rows included) contains NaN or inf; the message names it.
    """
    rows = _as_rows(data)
    n, d = rows.n_rows, rows.d
    norm_sum, sum_D = 0.0, np.zeros(d, dtype=np.float64)
    buf_CD = np.empty((min(n, _STATS_CHUNK_ROWS), d), dtype=np.float32)
    progress = helpers.Progress(
        desc="checking activations", total=n, unit="rows", logger=logger or logging.getLogger(_LOGGER_NAME)
    )
    for start in range(0, n, _STATS_CHUNK_ROWS):
        stop = min(n, start + _STATS_CHUNK_ROWS)
        rows.read(start, stop, buf_CD[: stop - start])
        chunk_CD = buf_CD[: stop - start].astype(np.float64)
        finite_C = np.isfinite(chunk_CD).all(axis=1)
        if not finite_C.all():
            row = start + int(np.argmin(finite_C))
            raise ValueError(f"activations row {row} contains NaN or inf")
        train_CD = chunk_CD[: max(0, n_train_rows - start)]
        norm_sum += float(np.linalg.norm(train_CD, axis=1).sum())
        sum_D += train_CD.sum(axis=0)
        progress.update(stop - start)
    progress.finish()
    mean_norm = norm_sum / n_train_rows
    if mean_norm == 0.0:
        raise ValueError("all training activations are zero; cannot scale them")
    return DataStats(scale=math.sqrt(d) / mean_norm, mean_D=sum_D / n_train_rows)


############
# Training #
############


class GroupTrainer:
    """The training state of a group of same-shape SAEs (see `check_group`) and one optimisation step.

    Holds the stacked weights (`nn.SaeStack`), Adam's moments (betas 0.9/0.999, eps 1e-8, one learning rate per
    SAE), how many examples each latent has gone without firing, the objective (which computes the gradients and
    keeps [S, B, d_sae] work buffers: about 13 bytes per element, the group's main memory cost besides the weights;
    on CPU it runs in tiles of a few SAEs, see `get_tile_size`, and keeps buffers per tile) and the step count.
    Everything else (Adam, decoder normalisation, dead-latent counters) is batched over the whole group.
    `train_group` drives it; it is public for benchmarks and tests that step SAEs by hand.
    """

    def __init__(self, cfgs: Sequence[TrainConfig], b_dec_D: np.ndarray, *, device: str | torch.device = "cpu"):
        """`b_dec_D` is the initial decoder bias of every SAE, in scaled units (the scaled mean training row)."""
        check_group(cfgs)
        self.cfgs = tuple(cfgs)
        self.device = torch.device(device)
        stack = nn.SaeStack([cfg.sae for cfg in cfgs])
        with torch.no_grad():
            stack.b_dec.copy_(torch.from_numpy(np.asarray(b_dec_D)).expand_as(stack.b_dec))
        self.stack = stack.to(self.device)
        tile = get_tile_size(len(cfgs), cfgs[0].batch_size, cfgs[0].sae.d_sae, self.device)
        self.objective: Objective | TiledObjective = (
            OBJECTIVES[cfgs[0].objective](cfgs, self.device) if tile == len(cfgs)
            else TiledObjective(cfgs, self.device, tile)
        )  # fmt: skip
        self.exp_avg = {name: torch.zeros_like(p) for name, p in self.stack.named_parameters()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in self.stack.named_parameters()}
        self._update = {name: torch.empty_like(p) for name, p in self.stack.named_parameters()}
        d_sae = cfgs[0].sae.d_sae
        self.tokens_since_fired_SK = torch.zeros(len(cfgs), d_sae, dtype=torch.int64, device=self.device)
        self.dead_tokens_S = torch.tensor([cfg.dead_tokens for cfg in cfgs], device=self.device)
        self.step = 0
        """Optimisation steps taken."""

    def step_(self, x_BD: Tensor, *, with_l0: bool = True) -> Loss:
        """One optimisation step of every SAE on the scaled batch `x_BD` (on the trainer's device). Without
        `with_l0`, the returned `Loss.l0` is NaN (it costs a pass over the latents; only logging needs it)."""
        loss = self.objective(self.stack, x_BD, self.step, self.dead_mask(), with_l0=with_l0)  # also sets gradients
        self.stack.remove_parallel_grads_()
        self._adam_step_()
        self.stack.normalize_decoder_()
        with torch.no_grad():
            self.tokens_since_fired_SK = torch.where(loss.fired_SK, 0, self.tokens_since_fired_SK + x_BD.shape[0])
        self.objective.observe_(loss)
        self.step += 1
        return loss

    @torch.no_grad()
    def _adam_step_(self) -> None:
        beta1, beta2 = _ADAM_BETAS
        t = self.step + 1
        bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
        step_sizes = [cfg.lr * _warmup(self.step, cfg.warmup_steps) / bias1 for cfg in self.cfgs]
        step_size_S = torch.tensor(step_sizes, dtype=self.stack.W_enc.dtype, device=self.device)
        for name, p in self.stack.named_parameters():
            exp_avg, exp_avg_sq, update = self.exp_avg[name], self.exp_avg_sq[name], self._update[name]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            torch.sqrt(exp_avg_sq, out=update).div_(bias2_sqrt).add_(_ADAM_EPS)
            torch.div(exp_avg, update, out=update).mul_(step_size_S.view(-1, *[1] * (p.dim() - 1)))
            p.sub_(update)  # one learning rate per SAE, through step_size_S

    def dead_mask(self) -> Tensor:
        """[S, d_sae] bool: latents that have not fired for their config's `dead_tokens` examples."""
        return self.tokens_since_fired_SK >= self.dead_tokens_S.unsqueeze(1)

    def get_saes(self, scale: float) -> list[nn.SparseAutoencoder]:
        """Copies of the SAEs with `scale` folded in (they read raw activations) and their inference activations."""
        saes = [self.stack.get_sae(s, self.objective.get_activation(s)) for s in range(self.stack.n_saes)]
        for sae in saes:
            sae.fold_scale_(scale)
        return saes

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the training state (the step is `self.step`)."""
        tensors = {f"stack.{name}": p.detach() for name, p in self.stack.named_parameters()}
        tensors |= {f"adam.exp_avg.{name}": t for name, t in self.exp_avg.items()}
        tensors |= {f"adam.exp_avg_sq.{name}": t for name, t in self.exp_avg_sq.items()}
        tensors |= {f"objective.{name}": t for name, t in self.objective.state_dict().items()}
        tensors["tokens_since_fired_SK"] = self.tokens_since_fired_SK
        return tensors

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, Tensor], step: int) -> None:
        """Restore `state_dict()` and the step count. Raises ValueError if names, shapes or dtypes differ."""
        expected = {name: (tuple(t.shape), t.dtype) for name, t in self.state_dict().items()}
        got = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
        if got != expected:
            raise ValueError(f"checkpoint tensors {got} do not match this group's training state {expected}")
        for name, p in self.stack.named_parameters():
            p.copy_(tensors[f"stack.{name}"])
            self.exp_avg[name].copy_(tensors[f"adam.exp_avg.{name}"])
            self.exp_avg_sq[name].copy_(tensors[f"adam.exp_avg_sq.{name}"])
        prefix = "objective."
        self.objective.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.tokens_since_fired_SK = tensors["tokens_since_fired_SK"].to(self.device)
        self.step = step


def _as_rows(data: "np.ndarray | loader.Rows") -> loader.Rows:
    return loader.ArrayRows(data) if isinstance(data, np.ndarray) else data


@beartype.beartype
def train(
    cfg: TrainConfig,
    data: "Float[np.ndarray, 'N D'] | loader.Rows",
    *,
    device: str | torch.device = "cpu",
    log_every: int = 100,
    logger: logging.Logger | None = None,
    checkpoint_fpath: pathlib.Path | None = None,
    checkpoint_every: int = 1000,
) -> TrainResult:
    """Train one SAE: `train_group([cfg], ...)[0]` (see `train_group` for everything else)."""
    (result,) = train_group(
        [cfg], data, device=device, log_every=log_every, logger=logger,
        checkpoint_fpath=checkpoint_fpath, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    return result


@beartype.beartype
def train_group(
    cfgs: Sequence[TrainConfig],
    data: "Float[np.ndarray, 'N D'] | loader.Rows",
    *,
    device: str | torch.device = "cpu",
    log_every: int = 100,
    logger: logging.Logger | None = None,
    checkpoint_fpath: pathlib.Path | None = None,
    checkpoint_every: int = 1000,
) -> list[TrainResult]:
    """Train a group of SAEs together on the rows of `data`, one result per config.

    `data` is a float32 [N, D] array (in memory or a np.memmap) or any `loader.Rows`, e.g. `loader.ShardRows` (one
    layer of a dump directory, read from disk as training goes). Batches come from `loader.ShuffledLoader` (large
    contiguous reads on a background thread, shuffled in a RAM buffer of `buffer_rows` rows).

    The configs must share a shape, an objective and a data stream (`check_group`); each SAE then ends with the
    same weights as when trained alone. Metrics are measured on the last n_eval rows.
    Deterministic: the same configs and data give bit-identical weights on CPU (same torch build and threads).
    Logs progress lines (step, examples/s, ETA, then loss, mse and l0 of each SAE, comma-separated) to `logger`
    (default "saev.training") at most every `log_every` steps and at the last step, plus lines before the data
    check, before training and with the metrics. Before training, one pass over all N rows checks them and
    computes the scale and mean (chunked; memmap friendly).

    Checkpoints: with `checkpoint_fpath` (a .safetensors file), the training state is saved there atomically every
    `checkpoint_every` steps, and if the file exists when training starts it is resumed from (after checking that
    it belongs to these configs and data). A resumed run ends bit-identical to an uninterrupted one on CPU. The file
    is left in place at the end: delete it once the results are saved. If `request_checkpoint()` was called, the
    state is saved at the end of the current step (if there is a file) and `Preempted` is raised.

    Raises:
        ValueError: configs that cannot share a group, width != d_vit, a NaN/inf row (named), fewer than batch_size
            training rows, or a checkpoint made for other configs or data.
        FloatingPointError: the loss of an SAE became NaN/inf during training (try a lower lr).
        Preempted: a checkpoint was requested; rerun the same call to resume.
    """
    logger = logger or logging.getLogger(_LOGGER_NAME)
    check_group(cfgs)
    cfg = cfgs[0]
    rows = _as_rows(data)
    n, d = rows.n_rows, rows.d
    if d != cfg.sae.d_vit:
        raise ValueError(f"SAE expects d_vit={cfg.sae.d_vit} but activations have width {d}")
    n_train_rows = n - cfg.n_eval
    if n_train_rows < cfg.batch_size:
        raise ValueError(
            f"only {max(n_train_rows, 0)} training rows (N={n} minus n_eval={cfg.n_eval}) "
            f"for batch_size={cfg.batch_size}; need at least one full batch"
        )
    if log_every < 1:
        raise ValueError(f"log_every must be positive, got {log_every}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")

    logger.info("checking %d activation rows and computing the activation scale", n)
    stats = get_data_stats(rows, n_train_rows, logger=logger)
    trainer = GroupTrainer(cfgs, stats.mean_D * stats.scale, device=device)
    n_steps = cfg.n_steps
    meta = {
        "configs": [artifacts.hashed_params(c) for c in cfgs],
        "n_rows": n,
        "scale": stats.scale,
        "n_steps": n_steps,
    }
    if checkpoint_fpath is not None and checkpoint_fpath.exists():
        _resume(trainer, checkpoint_fpath, meta)
        logger.info("resumed from %s at step %d/%d", checkpoint_fpath, trainer.step, n_steps)

    logger.info(
        "training %d SAE(s) (%s) d_vit=%d d_sae=%d on %d rows (%d held out): %d steps of %d, scale=%.4g",
        len(cfgs), cfg.objective, d, cfg.sae.d_sae, n_train_rows, cfg.n_eval, n_steps, cfg.batch_size, stats.scale,
    )  # fmt: skip
    data_loader = loader.ShuffledLoader(
        rows, n_rows=n_train_rows, batch_size=cfg.batch_size, seed=cfg.seed,
        chunk_rows=cfg.chunk_rows, buffer_rows=cfg.buffer_rows,
    )  # fmt: skip
    start, start_step = time.perf_counter(), trainer.step
    with data_loader.batches(trainer.step, n_steps) as batches:
        for x_BD in batches:
            x_BD = x_BD.to(device) * stats.scale
            done = trainer.step + 1
            log_now = done % log_every == 0 or done == n_steps
            loss = trainer.step_(x_BD, with_l0=log_now)
            if log_now:
                elapsed = time.perf_counter() - start
                wait = batches.stats.wait_s / max(elapsed, 1e-9)
                _log_progress(logger, loss, done, n_steps, done - start_step, cfg.batch_size, elapsed, wait)
            preempted = take_checkpoint_request()
            if checkpoint_fpath is not None and (preempted or done % checkpoint_every == 0):
                checkpoint.save(checkpoint_fpath, trainer.state_dict(), kind=_CHECKPOINT_KIND,
                                version=_CHECKPOINT_VERSION, meta={**meta, "step": done})  # fmt: skip
            if preempted:
                logger.warning("checkpoint requested: stopping after step %d/%d", done, n_steps)
                raise Preempted(done, n_steps, checkpoint_fpath)

    eval_ND = np.empty((cfg.n_eval, d), dtype=np.float32)
    rows.read(n_train_rows, n, eval_ND)
    results = []
    for s, sae in enumerate(trainer.get_saes(stats.scale)):
        metrics = get_metrics(sae, eval_ND, n_steps=n_steps)
        logger.info(
            "done%s: nmse=%.4f mse=%.4g l0=%.1f dead=%.3f dense=%.3f", f" (SAE {s})" if len(cfgs) > 1 else "",
            metrics.nmse, metrics.mse, metrics.l0, metrics.dead_frac, metrics.dense_frac,
        )  # fmt: skip
        results.append(TrainResult(sae=sae.to("cpu"), metrics=metrics))
    return results


def _resume(trainer: GroupTrainer, fpath: pathlib.Path, meta: dict[str, object]) -> None:
    tensors, saved = checkpoint.load(fpath, kind=_CHECKPOINT_KIND, version=_CHECKPOINT_VERSION)
    for name, value in meta.items():
        if saved.get(name) != value:
            raise ValueError(
                f"checkpoint {fpath} was made for other {name} ({saved.get(name)!r}, now {value!r}); "
                "delete it to start over"
            )
    step = saved.get("step")
    if not (isinstance(step, int) and 0 <= step <= trainer.cfgs[0].n_steps):
        raise ValueError(f"checkpoint {fpath} has an invalid step {step!r}")
    try:
        trainer.load_state_dict(tensors, step)
    except ValueError as err:
        raise ValueError(f"checkpoint {fpath}: {err}") from err


def _log_progress(
    logger: logging.Logger,
    loss: Loss,
    done: int,
    n_steps: int,
    steps_here: int,
    batch_size: int,
    elapsed: float,
    wait_frac: float,
):
    """Log one progress line; `steps_here` steps (of `batch_size` examples) took `elapsed` seconds in this run, a
    `wait_frac` fraction of which went to waiting for data."""
    loss_S = loss.loss.tolist()  # .tolist() syncs the device, which is why this runs only every log_every steps.
    for s, value in enumerate(loss_S):
        if not math.isfinite(value):
            which = f"SAE {s} of the group" if len(loss_S) > 1 else "the SAE"
            raise FloatingPointError(f"training diverged at step {done}: loss of {which} is {value}; try a lower lr")
    elapsed = max(elapsed, 1e-9)
    rate = steps_here * batch_size / elapsed
    eta = (n_steps - done) * elapsed / max(steps_here, 1)
    logger.info(
        "step %d/%d | %.0f ex/s | ETA %s | data wait %.0f%% | loss %s | mse %s | l0 %s",
        done, n_steps, rate, _fmt_seconds(eta), 100 * wait_frac, _fmt_values(loss_S), _fmt_values(loss.mse.tolist()),
        ",".join(f"{v:.1f}" for v in loss.l0.tolist()),
    )  # fmt: skip


def _fmt_values(values: list[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
@beartype.beartype
def get_metrics(sae: nn.SparseAutoencoder, acts_ND: Float[np.ndarray, "N D"], *, n_steps: int) -> Metrics:
    """`Metrics` of `sae` (reading raw activations, with its activation rule) on all rows of `acts_ND`, in float64."""
    device = sae.W_enc.device
    sae64 = nn.SparseAutoencoder(sae.cfg, sae.activation).to(device).double()
    sae64.load_state_dict({k: v.double() for k, v in sae.state_dict().items()})
    x_ND = torch.from_numpy(np.asarray(acts_ND, dtype=np.float64)).to(device)
    n = x_ND.shape[0]

    sq_err, active_S = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    for start in range(0, n, _EVAL_CHUNK_ROWS):
        x_BD = x_ND[start : start + _EVAL_CHUNK_ROWS]
        x_hat_BD, f_BS = sae64(x_BD)
        sq_err += (x_hat_BD - x_BD).pow(2).sum().item()
        active_S += (f_BS > 0).sum(dim=0)
    total_var = (x_ND - x_ND.mean(dim=0)).pow(2).sum().item()
    freq_S = active_S / n
    return Metrics(
        mse=sq_err / x_ND.numel(),
        nmse=sq_err / total_var if total_var > 0 else math.nan,
        l0=active_S.sum().item() / n,
        dead_frac=(freq_S == 0).double().mean().item(),
        dense_frac=(freq_S > _DENSE_THRESHOLD).double().mean().item(),
        n_steps=n_steps,
    )
