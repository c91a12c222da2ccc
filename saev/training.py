"""Training sparse autoencoders on an in-memory or memory-mapped activation matrix, alone or as a batched group.

`train_group(cfgs, acts_ND)` is the job body of the train stage for a group of SAEs that share one shape, one
objective and one data stream (`get_group_key`; `saev.sweep.group` splits a sweep into such groups):

1. Check the data (width, finiteness of every row, enough rows) and, in the same single pass, compute the
   activation scale (mean L2 norm of scaled training rows = sqrt(d_vit)) and the mean training row.
2. Train every SAE of the group at once (a `GroupTrainer`: stacked weights, batched matmuls) with Adam on scaled,
   shuffled minibatches from rows [0, N - n_eval). Every SAE sees the same batches. Decoder rows stay unit norm
   and the gradient component parallel to them is removed before each step.
3. Fold the scale into the weights (the returned SAEs read RAW activations) and measure `Metrics` in float64 on
   the held-out rows [N - n_eval, N), which are never trained on (nor used for the scale or b_dec).

`train(cfg, acts_ND)` is `train_group([cfg], acts_ND)[0]`: one implementation, so an SAE trained alone and the same
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
import logging
import math
import pathlib
import time
import typing
from collections.abc import Iterator, Sequence

import beartype
import numpy as np
import torch
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from saev import artifacts, checkpoint, nn

_LOGGER_NAME = "saev.training"
_STATS_CHUNK_ROWS = 8192
_EVAL_CHUNK_ROWS = 1024
_DENSE_THRESHOLD = 0.1
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_THRESHOLD_WINDOW = 1000
"""BatchTopK's threshold is the running mean of each batch's minimum positive activation over the first this-many
batches, then an exponential moving average with this window (so it tracks the end of training)."""
_CHECKPOINT_KIND = "saev.training.GroupTrainer"
_CHECKPOINT_VERSION = 1


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
    """Seed of the data order (the shuffling of training rows)."""
    n_eval: int = 4096
    """Held-out examples for `Metrics`: the LAST n_eval rows of the activations, never trained on."""

    def __post_init__(self):
        for name in ("n_train", "batch_size", "n_eval", "k", "aux_k", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
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


class Preempted(Exception):
    """Training stopped because `request_checkpoint()` was called; rerun the same call to resume."""

    def __init__(self, step: int, n_steps: int, checkpoint_fpath: pathlib.Path | None):
        self.step = step
        """Steps done (and saved, if there is a checkpoint file)."""
        self.n_steps = n_steps
        """Steps of the whole run."""
        self.checkpoint_fpath = checkpoint_fpath
        """Where the state was saved; None if the run had no checkpoint file (nothing was saved)."""
        where = f"state saved to {checkpoint_fpath}" if checkpoint_fpath else "no checkpoint file, nothing saved"
        super().__init__(f"training preempted after step {step}/{n_steps} ({where})")


_checkpoint_requested = False
"""Set by `request_checkpoint`, cleared by the training loop that handles it. A plain bool: assigning it is
atomic, so a signal handler can set it at any point (a threading.Event's lock could deadlock there)."""


def request_checkpoint(*_: object) -> None:
    """Ask the running (or next) training loop to save its checkpoint at the end of the current step and raise
    `Preempted`. Safe to call from a signal handler; its signature fits one directly:
    `signal.signal(signal.SIGUSR2, training.request_checkpoint)`. The request stays pending until a loop handles it.
    """
    global _checkpoint_requested
    _checkpoint_requested = True


def _take_checkpoint_request() -> bool:
    global _checkpoint_requested
    if not _checkpoint_requested:
        return False
    _checkpoint_requested = False
    return True


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
    """Mean number of active latents per example."""
    f_SBK: Tensor
    """The batch's latents [S, B, d_sae], detached (for dead-latent counts and thresholds)."""


class Objective:
    """A training loss for a group of stacked SAEs, and the inference activation rule it gives each trained SAE.

    Subclasses register in `OBJECTIVES` under `name`. An instance is built for one group (`cfgs`) and may hold
    per-SAE statistics gathered during training (`state_dict`, saved in checkpoints).
    """

    name: typing.ClassVar[str]

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device):
        self.cfgs = tuple(cfgs)
        self.device = device

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Raise ValueError if `cfg`'s fields for this objective are invalid."""

    @classmethod
    def group_key(cls, cfg: TrainConfig) -> dict[str, object]:
        """Fields of this objective that SAEs trained together must share, beyond `get_group_key`'s."""
        return {}

    def __call__(self, stack: nn.SaeStack, x_BD: Tensor, step: int, dead_SK: Tensor) -> Loss:
        """Loss of every SAE on the scaled batch `x_BD` at 0-based `step`; `dead_SK` marks dead latents."""
        raise NotImplementedError

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


def _mse_S(x_hat_SBD: Tensor, x_BD: Tensor) -> Tensor:
    return (x_hat_SBD - x_BD).pow(2).mean(dim=(1, 2))


def _l0_S(f_SBK: Tensor) -> Tensor:
    return (f_SBK > 0).sum(dim=2).float().mean(dim=1)


def _keep_top(values_SN: Tensor, n_S: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per SAE s, the n_S[s] largest entries of values_SN[s] through a ReLU, as (values, indices) [S, max n_S];
    entries beyond an SAE's own n are zeroed. With one n for all SAEs this is a plain (unsorted) topk."""
    n_max = max(n_S)
    uniform = all(n == n_max for n in n_S)
    vals_SJ, idx_SJ = values_SN.topk(n_max, dim=-1, sorted=not uniform)
    vals_SJ = torch.relu(vals_SJ)
    if not uniform:
        n_S1 = torch.tensor(n_S, device=values_SN.device).unsqueeze(1)
        vals_SJ = vals_SJ * (torch.arange(n_max, device=values_SN.device) < n_S1)
    return vals_SJ, idx_SJ


@beartype.beartype
class ReluL1Objective(Objective):
    """ReLU latents with an L1 penalty weighted by decoder-row norm (Anthropic, April 2024 update); the L1
    coefficient rises linearly over `warmup_steps`, which keeps latents from dying early. Inference: ReLU."""

    name = "relu_l1"

    def __call__(self, stack: nn.SaeStack, x_BD: Tensor, step: int, dead_SK: Tensor) -> Loss:
        f_SBK = torch.relu(stack.pre_acts(x_BD))
        x_hat_SBD = stack.decode(f_SBK)
        mse_S = _mse_S(x_hat_SBD, x_BD)
        l1_S = (f_SBK * stack.W_dec.norm(dim=2).unsqueeze(1)).sum(dim=2).mean(dim=1)
        coeffs = [cfg.l1_coeff * _warmup(step, cfg.warmup_steps) for cfg in self.cfgs]
        sparsity_S = torch.tensor(coeffs, device=x_BD.device) * l1_S
        zero_S = torch.zeros_like(mse_S)
        with torch.no_grad():
            l0_S = _l0_S(f_SBK)
        return Loss(mse_S + sparsity_S, mse_S, sparsity_S, zero_S, l0_S, f_SBK.detach())

    def get_activation(self, s: int) -> nn.Activation:
        return nn.Relu()


class _TopKFamily(Objective):
    """Shared by the top-k objectives: k and AuxK settings, the loss skeleton (select latents, reconstruct, AuxK)."""

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        if cfg.k > cfg.sae.d_sae:
            raise ValueError(f"k={cfg.k} is larger than d_sae={cfg.sae.d_sae}")

    def __init__(self, cfgs: Sequence[TrainConfig], device: torch.device):
        super().__init__(cfgs, device)
        d_sae = cfgs[0].sae.d_sae
        self.k_S = [cfg.k for cfg in cfgs]
        self.aux_k_S = [min(cfg.aux_k, d_sae) for cfg in cfgs]
        self.aux_coeff_S = torch.tensor([cfg.aux_coeff for cfg in cfgs], device=device)
        self.use_aux = any(cfg.aux_coeff > 0 for cfg in cfgs)

    def select(self, pre_SBK: Tensor) -> Tensor:
        """Latents f [S, B, K] from pre-activations."""
        raise NotImplementedError

    def reconstruct(self, stack: nn.SaeStack, x_BD: Tensor, f_SBK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction loss [S], mse of the full reconstruction [S], full reconstruction [S, B, D])."""
        x_hat_SBD = stack.decode(f_SBK)
        mse_S = _mse_S(x_hat_SBD, x_BD)
        return mse_S, mse_S, x_hat_SBD

    def __call__(self, stack: nn.SaeStack, x_BD: Tensor, step: int, dead_SK: Tensor) -> Loss:
        pre_SBK = stack.pre_acts(x_BD)
        f_SBK = self.select(pre_SBK)
        recon_S, mse_S, x_hat_SBD = self.reconstruct(stack, x_BD, f_SBK)
        aux_S = self.auxk(stack, x_BD, x_hat_SBD, pre_SBK, dead_SK)
        with torch.no_grad():
            l0_S = _l0_S(f_SBK)
        loss_S = recon_S + self.aux_coeff_S * aux_S
        return Loss(loss_S, mse_S, torch.zeros_like(mse_S), aux_S, l0_S, f_SBK.detach())

    def auxk(self, stack: nn.SaeStack, x_BD: Tensor, x_hat_SBD: Tensor, pre_SBK: Tensor, dead_SK: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the top-aux_k DEAD latents of each example reconstruct the residual x - x_hat
        (detached, no decoder bias); the loss is that error's sum of squares over the residual's total variance.
        Dead latents with a positive pre-activation get gradient and can come back to life. 0 where no latent is
        dead."""
        n_dead_S = dead_SK.sum(dim=1)
        if not self.use_aux or not bool((n_dead_S > 0).any()):  # one device sync per step
            return torch.zeros(stack.n_saes, device=x_BD.device)
        S, B, K = pre_SBK.shape
        masked_SBK = pre_SBK.masked_fill(~dead_SK.unsqueeze(1), -math.inf)
        vals_SJ, idx_SJ = _keep_top(masked_SBK.reshape(S * B, K), [n for n in self.aux_k_S for _ in range(B)])
        f_aux_SBK = torch.zeros_like(masked_SBK.reshape(S * B, K)).scatter(-1, idx_SJ, vals_SJ).reshape(S, B, K)
        e_hat_SBD = torch.bmm(f_aux_SBK, stack.W_dec)
        e_SBD = (x_BD - x_hat_SBD).detach()
        total_var_S = (e_SBD - e_SBD.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
        aux_S = (e_hat_SBD - e_SBD).pow(2).sum(dim=(1, 2)) / total_var_S.clamp_min(1e-12)
        return torch.where(n_dead_S > 0, aux_S, torch.zeros_like(aux_S))


@beartype.beartype
class TopKObjective(_TopKFamily):
    """TopK (Gao et al. 2024): each example keeps its k largest pre-activations (through a ReLU), so at most k
    latents fire, exactly k when the k-th is positive; + AuxK. Inference: the same TopK(k)."""

    name = "topk"

    def select(self, pre_SBK: Tensor) -> Tensor:
        S, B, K = pre_SBK.shape
        pre_NK = pre_SBK.reshape(S * B, K)
        vals_NJ, idx_NJ = _keep_top(pre_NK, [k for k in self.k_S for _ in range(B)])
        return torch.zeros_like(pre_NK).scatter(-1, idx_NJ, vals_NJ).reshape(S, B, K)

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

    def select(self, pre_SBK: Tensor) -> Tensor:
        S, B, K = pre_SBK.shape
        pre_SN = pre_SBK.reshape(S, B * K)
        vals_SJ, idx_SJ = _keep_top(pre_SN, [k * B for k in self.k_S])
        return torch.zeros_like(pre_SN).scatter(-1, idx_SJ, vals_SJ).reshape(S, B, K)

    @torch.no_grad()
    def observe_(self, loss: Loss) -> None:
        f_SBK = loss.f_SBK
        min_pos_S = f_SBK.masked_fill(f_SBK <= 0, math.inf).amin(dim=(1, 2)).double()
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

    def reconstruct(self, stack: nn.SaeStack, x_BD: Tensor, f_SBK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_hat_SBD = stack.b_dec.unsqueeze(1)
        recon_S, start = 0.0, 0
        for stop in self.prefixes:
            x_hat_SBD = torch.baddbmm(x_hat_SBD, f_SBK[:, :, start:stop], stack.W_dec[:, start:stop])
            mse_S = _mse_S(x_hat_SBD, x_BD)
            recon_S, start = recon_S + mse_S, stop
        return recon_S, mse_S, x_hat_SBD


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


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup factor in (0, 1] for 0-based `step`."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


##########
# Groups #
##########


@beartype.beartype
def get_group_key(cfg: TrainConfig) -> dict[str, object]:
    """What SAEs trained together must share: one shape and objective (stacked weights, one loss) and one data
    stream (batch_size, n_train, seed, n_eval). Everything else (lr, l1_coeff, k, sae.seed, ...) may differ."""
    return {
        "sae.d_vit": cfg.sae.d_vit,
        "d_sae": cfg.sae.d_sae,
        "objective": cfg.objective,
        "batch_size": cfg.batch_size,
        "n_train": cfg.n_train,
        "seed": cfg.seed,
        "n_eval": cfg.n_eval,
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


@beartype.beartype
def batch_indices(
    n_rows: int, batch_size: int, n_steps: int, seed: int, start_step: int = 0
) -> Iterator[Int[np.ndarray, " B"]]:
    """Row indices of training batches start_step, ..., n_steps - 1: the concatenation of seeded permutations of
    range(n_rows) (one per epoch), cut into consecutive batches.

    A batch that straddles two epochs takes the end of one permutation and the start of the next. Indices within a
    batch are sorted (faster reads from a memmap; the batch is the same set). Only rows < n_rows are ever yielded.
    Batch t depends only on (n_rows, batch_size, seed, t): a run resumed at `start_step` sees the batches an
    uninterrupted run would (skipping costs one permutation per skipped epoch).
    """
    if not 1 <= batch_size <= n_rows:
        raise ValueError(f"batch_size={batch_size} must be in [1, n_rows={n_rows}]")
    if not 0 <= start_step <= n_steps:
        raise ValueError(f"start_step={start_step} must be in [0, n_steps={n_steps}]")
    rng = np.random.default_rng(seed)
    epoch, pos = divmod(start_step * batch_size, n_rows)
    perm_R = rng.permutation(n_rows)
    for _ in range(epoch):
        perm_R = rng.permutation(n_rows)
    for _ in range(start_step, n_steps):
        if pos + batch_size <= n_rows:
            idx_B = perm_R[pos : pos + batch_size]
            pos += batch_size
        else:
            rest = perm_R[pos:]
            perm_R = rng.permutation(n_rows)
            pos = batch_size - len(rest)
            idx_B = np.concatenate([rest, perm_R[:pos]])
        yield np.sort(idx_B)


class DataStats(typing.NamedTuple):
    """Statistics of the training rows, from one pass over the data."""

    scale: float
    """Multiplier making the mean L2 norm of training rows sqrt(d_vit)."""
    mean_D: np.ndarray
    """Mean raw training row (float64)."""


@beartype.beartype
def get_data_stats(acts_ND: np.ndarray, n_train_rows: int) -> DataStats:
    """Check every row is finite and compute `DataStats` over rows [0, n_train_rows), in chunks (memmap friendly).

    Raises:
        ValueError: a row (of the whole matrix, held-out rows included) contains NaN or inf; the message names it.
    """
    n, d = acts_ND.shape
    norm_sum, sum_D = 0.0, np.zeros(d, dtype=np.float64)
    for start in range(0, n, _STATS_CHUNK_ROWS):
        chunk_CD = np.asarray(acts_ND[start : start + _STATS_CHUNK_ROWS], dtype=np.float64)
        finite_C = np.isfinite(chunk_CD).all(axis=1)
        if not finite_C.all():
            row = start + int(np.argmin(finite_C))
            raise ValueError(f"activations row {row} contains NaN or inf")
        train_CD = chunk_CD[: max(0, n_train_rows - start)]
        norm_sum += float(np.linalg.norm(train_CD, axis=1).sum())
        sum_D += train_CD.sum(axis=0)
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
    SAE), how many examples each latent has gone without firing, the objective's statistics and the step count.
    `train_group` drives it; it is public for benchmarks and tests that step SAEs by hand.
    """

    def __init__(
        self, cfgs: Sequence[TrainConfig], b_dec_D: np.ndarray, *, device: str | torch.device = "cpu"
    ):
        """`b_dec_D` is the initial decoder bias of every SAE, in scaled units (the scaled mean training row)."""
        check_group(cfgs)
        self.cfgs = tuple(cfgs)
        self.device = torch.device(device)
        stack = nn.SaeStack([cfg.sae for cfg in cfgs])
        with torch.no_grad():
            stack.b_dec.copy_(torch.from_numpy(np.asarray(b_dec_D)).expand_as(stack.b_dec))
        self.stack = stack.to(self.device)
        self.objective = OBJECTIVES[cfgs[0].objective](cfgs, self.device)
        self.exp_avg = {name: torch.zeros_like(p) for name, p in self.stack.named_parameters()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in self.stack.named_parameters()}
        d_sae = cfgs[0].sae.d_sae
        self.tokens_since_fired_SK = torch.zeros(len(cfgs), d_sae, dtype=torch.int64, device=self.device)
        self.dead_tokens_S = torch.tensor([cfg.dead_tokens for cfg in cfgs], device=self.device)
        self.step = 0
        """Optimisation steps taken."""

    def step_(self, x_BD: Tensor) -> Loss:
        """One optimisation step of every SAE on the scaled batch `x_BD` (on the trainer's device)."""
        loss = self.objective(self.stack, x_BD, self.step, self.dead_mask())
        for p in self.stack.parameters():
            p.grad = None
        # The SAEs' parameters are disjoint, so the gradient of the sum is each SAE's own gradient, exactly.
        loss.loss.sum().backward()
        self.stack.remove_parallel_grads_()
        self._adam_step_()
        self.stack.normalize_decoder_()
        with torch.no_grad():
            fired_SK = (loss.f_SBK > 0).any(dim=1)
            self.tokens_since_fired_SK = torch.where(fired_SK, 0, self.tokens_since_fired_SK + x_BD.shape[0])
        self.objective.observe_(loss)
        self.step += 1
        return loss

    @torch.no_grad()
    def _adam_step_(self) -> None:
        beta1, beta2 = _ADAM_BETAS
        t = self.step + 1
        bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
        lrs = [cfg.lr * _warmup(self.step, cfg.warmup_steps) / bias1 for cfg in self.cfgs]
        step_size_S = torch.tensor(lrs, device=self.device)
        for name, p in self.stack.named_parameters():
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(_ADAM_EPS)
            step_size = step_size_S.view(-1, *[1] * (p.dim() - 1))
            p.sub_(step_size * exp_avg / denom)

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


@beartype.beartype
def train(
    cfg: TrainConfig,
    acts_ND: Float[np.ndarray, "N D"],
    *,
    device: str | torch.device = "cpu",
    log_every: int = 100,
    logger: logging.Logger | None = None,
    checkpoint_fpath: pathlib.Path | None = None,
    checkpoint_every: int = 1000,
) -> TrainResult:
    """Train one SAE: `train_group([cfg], ...)[0]` (see `train_group` for everything else)."""
    (result,) = train_group(
        [cfg], acts_ND, device=device, log_every=log_every, logger=logger,
        checkpoint_fpath=checkpoint_fpath, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    return result


@beartype.beartype
def train_group(
    cfgs: Sequence[TrainConfig],
    acts_ND: Float[np.ndarray, "N D"],
    *,
    device: str | torch.device = "cpu",
    log_every: int = 100,
    logger: logging.Logger | None = None,
    checkpoint_fpath: pathlib.Path | None = None,
    checkpoint_every: int = 1000,
) -> list[TrainResult]:
    """Train a group of SAEs together on `acts_ND` (float32 [N, D], may be a np.memmap), one result per config.

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
    n, d = acts_ND.shape
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
    stats = get_data_stats(acts_ND, n_train_rows)
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
    start, start_step = time.perf_counter(), trainer.step
    for idx_B in batch_indices(n_train_rows, cfg.batch_size, n_steps, cfg.seed, start_step=trainer.step):
        x_BD = torch.from_numpy(np.asarray(acts_ND[idx_B], dtype=np.float32)).to(device) * stats.scale
        loss = trainer.step_(x_BD)

        done = trainer.step
        if done % log_every == 0 or done == n_steps:
            elapsed = time.perf_counter() - start
            _log_progress(logger, loss, done, n_steps, done - start_step, cfg.batch_size, elapsed)
        preempted = _take_checkpoint_request()
        if checkpoint_fpath is not None and (preempted or done % checkpoint_every == 0):
            checkpoint.save(checkpoint_fpath, trainer.state_dict(), kind=_CHECKPOINT_KIND,
                            version=_CHECKPOINT_VERSION, meta={**meta, "step": done})  # fmt: skip
        if preempted:
            logger.warning("checkpoint requested: stopping after step %d/%d", done, n_steps)
            raise Preempted(done, n_steps, checkpoint_fpath)

    results = []
    for s, sae in enumerate(trainer.get_saes(stats.scale)):
        metrics = get_metrics(sae, acts_ND[n_train_rows:], n_steps=n_steps)
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
    logger: logging.Logger, loss: Loss, done: int, n_steps: int, steps_here: int, batch_size: int, elapsed: float
):
    """Log one progress line; `steps_here` steps (of `batch_size` examples) took `elapsed` seconds in this run."""
    loss_S = loss.loss.tolist()  # .tolist() syncs the device, which is why this runs only every log_every steps.
    for s, value in enumerate(loss_S):
        if not math.isfinite(value):
            which = f"SAE {s} of the group" if len(loss_S) > 1 else "the SAE"
            raise FloatingPointError(f"training diverged at step {done}: loss of {which} is {value}; try a lower lr")
    elapsed = max(elapsed, 1e-9)
    rate = steps_here * batch_size / elapsed
    eta = (n_steps - done) * elapsed / max(steps_here, 1)
    logger.info(
        "step %d/%d | %.0f ex/s | ETA %s | loss %s | mse %s | l0 %s",
        done, n_steps, rate, _fmt_seconds(eta), _fmt_values(loss_S), _fmt_values(loss.mse.tolist()),
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
