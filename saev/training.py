"""Training one sparse autoencoder on an in-memory or memory-mapped activation matrix.

`train(cfg, acts_ND)` is the whole job body of the train stage for one SAE:

1. Check the data (width, finiteness of every row, enough rows) and, in the same single pass, compute the
   activation scale (mean L2 norm of scaled training rows = sqrt(d_vit)) and the mean training row.
2. Train with Adam on scaled, shuffled minibatches from rows [0, N - n_eval). Decoder rows stay unit norm and
   the gradient component parallel to them is removed before each step.
3. Fold the scale into the weights (the returned SAE reads RAW activations) and measure `Metrics` in float64 on the
   held-out rows [N - n_eval, N), which are never trained on (nor used for the scale or b_dec).

The loss is chosen from `OBJECTIVES`, a small registry of objectives (only ReLU + L1 today); TopK, BatchTopK or
Matryoshka objectives register there, and a batched sweep can reuse `batch_indices` so that many SAEs see one
data stream.
"""

import dataclasses
import logging
import math
import time
import typing
from collections.abc import Iterator

import beartype
import numpy as np
import torch
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from saev import nn

_LOGGER_NAME = "saev.training"
_STATS_CHUNK_ROWS = 8192
_EVAL_CHUNK_ROWS = 1024
_DENSE_THRESHOLD = 0.1


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained SAE (given the activations)."""

    sae: nn.SaeConfig
    """Shape and initialisation seed of the SAE."""
    l1_coeff: float = 4e-3
    """Weight of the L1 penalty sum_s f_s * ||W_dec[s]|| (summed over latents, averaged over the batch); the
    reconstruction term is the per-element mean squared error on scaled activations."""
    lr: float = 1e-3
    """Adam learning rate after warmup."""
    n_train: int = 1_000_000
    """Training examples seen in total (rounded down to whole batches); rows are revisited when it exceeds them."""
    batch_size: int = 1024
    """Examples per optimisation step."""
    warmup_steps: int = 100
    """Steps over which the learning rate and the L1 coefficient rise linearly from ~0 to their values."""
    seed: int = 0
    """Seed of the data order (the shuffling of training rows)."""
    n_eval: int = 4096
    """Held-out examples for `Metrics`: the LAST n_eval rows of the activations, never trained on."""

    def __post_init__(self):
        for name in ("n_train", "batch_size", "n_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_train < self.batch_size:
            raise ValueError(f"n_train={self.n_train} is smaller than one batch (batch_size={self.batch_size})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.l1_coeff) and self.l1_coeff >= 0):
            raise ValueError(f"l1_coeff must be a non-negative finite number, got {self.l1_coeff}")

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
    """What `train` returns."""

    sae: nn.SparseAutoencoder
    """The trained SAE on cpu, with the activation scale folded in: it reads RAW activations."""
    metrics: Metrics
    """Held-out quality of `sae`."""


##############
# Objectives #
##############


class Loss(typing.NamedTuple):
    """Loss terms of one training batch: 0-d tensors on the training device."""

    loss: Tensor
    """What is minimised: mse + sparsity."""
    mse: Tensor
    """Per-element mean squared error on scaled activations."""
    sparsity: Tensor
    """Weighted sparsity penalty (already multiplied by its coefficient)."""
    l0: Tensor
    """Mean number of active latents per example."""


@typing.runtime_checkable
class Objective(typing.Protocol):
    """A training loss for an SAE. Objectives are built from a `TrainConfig` through `OBJECTIVES`."""

    def __call__(self, sae: nn.SparseAutoencoder, x_BD: Tensor, step: int) -> Loss:
        """Loss of `sae` on the scaled batch `x_BD` at optimisation step `step` (0-based; for schedules)."""
        ...


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class ReluL1:
    """ReLU latents with an L1 penalty weighted by decoder-row norm (Anthropic, April 2024 update)."""

    l1_coeff: float
    """Weight of sum_s f_s * ||W_dec[s]||."""
    warmup_steps: int
    """The coefficient rises linearly over these steps, which keeps latents from dying early."""

    @jaxtyped(typechecker=beartype.beartype)
    def __call__(self, sae: nn.SparseAutoencoder, x_BD: Float[Tensor, "B D"], step: int) -> Loss:
        x_hat_BD, f_BS = sae(x_BD)
        mse = (x_hat_BD - x_BD).pow(2).mean()
        l1 = (f_BS * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
        coeff = self.l1_coeff * _warmup(step, self.warmup_steps)
        sparsity = coeff * l1
        l0 = (f_BS > 0).sum(dim=1).float().mean()
        return Loss(loss=mse + sparsity, mse=mse, sparsity=sparsity, l0=l0)


OBJECTIVES: dict[str, typing.Callable[[TrainConfig], Objective]] = {
    "relu_l1": lambda cfg: ReluL1(l1_coeff=cfg.l1_coeff, warmup_steps=cfg.warmup_steps),
}
"""Objective name -> constructor from a TrainConfig. `train` uses "relu_l1"; new objectives register here."""


@beartype.beartype
def make_objective(cfg: TrainConfig, name: str = "relu_l1") -> Objective:
    """The objective `name` from `OBJECTIVES`, configured by `cfg`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](cfg)


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup factor in (0, 1] for 0-based `step`."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


########
# Data #
########


@beartype.beartype
def batch_indices(n_rows: int, batch_size: int, n_steps: int, seed: int) -> Iterator[Int[np.ndarray, " B"]]:
    """Row indices of each training batch: epochs of seeded permutations of range(n_rows), cut into batches.

    A batch that straddles two epochs takes the end of one permutation and the start of the next. Indices within a
    batch are sorted (faster reads from a memmap; the batch is the same set). Only rows < n_rows are ever yielded.
    """
    if not 1 <= batch_size <= n_rows:
        raise ValueError(f"batch_size={batch_size} must be in [1, n_rows={n_rows}]")
    rng = np.random.default_rng(seed)
    perm_R = rng.permutation(n_rows)
    pos = 0
    for _ in range(n_steps):
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


@beartype.beartype
def train(
    cfg: TrainConfig,
    acts_ND: Float[np.ndarray, "N D"],
    *,
    device: str | torch.device = "cpu",
    log_every: int = 100,
    logger: logging.Logger | None = None,
) -> TrainResult:
    """Train one SAE on `acts_ND` (float32 [N, D], may be a np.memmap) and measure it on the last cfg.n_eval rows.

    Deterministic: the same config and data give bit-identical weights on CPU (same torch build and threads).
    Logs progress lines (step, examples/s, ETA, loss, mse, l0) to `logger` (default "saev.training") at most every
    `log_every` steps and at the last step, plus lines before the data check, before training and with the metrics.
    Before training, one pass over all N rows checks them and computes the scale and mean (chunked; memmap friendly).

    Raises:
        ValueError: width != cfg.sae.d_vit, a NaN/inf row (named), or fewer than batch_size training rows.
        FloatingPointError: the loss became NaN/inf during training (try a lower lr).
    """
    logger = logger or logging.getLogger(_LOGGER_NAME)
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

    logger.info("checking %d activation rows and computing the activation scale", n)
    stats = get_data_stats(acts_ND, n_train_rows)
    sae = nn.SparseAutoencoder(cfg.sae)
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(stats.mean_D * stats.scale))
    sae = sae.to(device)
    objective = make_objective(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)

    n_steps = cfg.n_steps
    logger.info(
        "training SAE d_vit=%d d_sae=%d on %d rows (%d held out): %d steps of %d, scale=%.4g",
        d, cfg.sae.d_sae, n_train_rows, cfg.n_eval, n_steps, cfg.batch_size, stats.scale,
    )  # fmt: skip
    start = time.perf_counter()
    batches = batch_indices(n_train_rows, cfg.batch_size, n_steps, cfg.seed)
    for step, idx_B in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _warmup(step, cfg.warmup_steps)
        x_BD = torch.from_numpy(np.asarray(acts_ND[idx_B], dtype=np.float32)).to(device) * stats.scale
        loss = objective(sae, x_BD, step)
        opt.zero_grad(set_to_none=True)
        loss.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()

        done = step + 1
        if done % log_every == 0 or done == n_steps:
            _log_progress(logger, loss, done, n_steps, cfg.batch_size, time.perf_counter() - start)

    sae.fold_scale_(stats.scale)
    metrics = get_metrics(sae, acts_ND[n_train_rows:], n_steps=n_steps)
    logger.info(
        "done: nmse=%.4f mse=%.4g l0=%.1f dead=%.3f dense=%.3f", metrics.nmse, metrics.mse, metrics.l0,
        metrics.dead_frac, metrics.dense_frac,
    )  # fmt: skip
    return TrainResult(sae=sae.to("cpu"), metrics=metrics)


def _log_progress(logger: logging.Logger, loss: Loss, done: int, n_steps: int, batch_size: int, elapsed: float):
    loss_val = loss.loss.item()  # .item() syncs the device, which is why this runs only every log_every steps.
    if not math.isfinite(loss_val):
        raise FloatingPointError(f"training diverged at step {done}: loss is {loss_val}; try a lower lr")
    rate = done * batch_size / max(elapsed, 1e-9)
    eta = (n_steps - done) * batch_size / rate
    logger.info(
        "step %d/%d | %.0f ex/s | ETA %s | loss %.4g | mse %.4g | l0 %.1f",
        done, n_steps, rate, _fmt_seconds(eta), loss_val, loss.mse.item(), loss.l0.item(),
    )  # fmt: skip


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
@beartype.beartype
def get_metrics(sae: nn.SparseAutoencoder, acts_ND: Float[np.ndarray, "N D"], *, n_steps: int) -> Metrics:
    """`Metrics` of `sae` (reading raw activations) on all rows of `acts_ND`, computed in float64."""
    device = sae.W_enc.device
    sae64 = nn.SparseAutoencoder(sae.cfg).to(device).double()
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
