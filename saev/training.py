"""Training sparse autoencoders on activation rows (an array, a memmap or a dump directory's layer), alone or as a
batched group.

`train_group(cfgs, data)` is the job body of the train stage for a group of SAEs that share one shape, one
objective and one data stream (`get_group_key`; `group` splits a sweep into such groups):

1. Check the data (width, finiteness of every row, enough rows) and, in the same single pass, compute the
   activation scale (mean L2 norm of scaled training rows = sqrt(d_vit)) and the mean training row.
2. Train every SAE of the group at once (a `GroupTrainer`: stacked weights, batched matmuls, a hand-written
   backward pass, see `saev.objectives`) with Adam (one learning rate per SAE) on scaled, shuffled minibatches from rows
   [0, N - n_eval), read by `saev.data.loader.ShuffledLoader` (large contiguous reads, shuffled in RAM, on a
   background thread). Every SAE sees the same batches. Decoder rows stay unit norm and the gradient component
   parallel to them is removed before each step.
3. Fold the scale into the weights (the returned SAEs read RAW activations) and measure `Metrics` in float64 on
   the held-out rows [N - n_eval, N), which are never trained on (nor used for the scale or b_dec).

`train(cfg, data)` is `train_group([cfg], data)[0]`: one implementation, so an SAE trained alone and the same
SAE trained in a group end with the same weights (bit-identical on CPU in our tests; on GPU batched kernels may
round differently).

The objective (`TrainConfig.objective`: a `saev.objectives` config, e.g. `ReluL1(l1_coeff=4e-3)` or `TopK(k=32)`)
computes the loss and gradients; that module owns the objectives, this one the loop, the groups and the metrics.

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
from collections.abc import Sequence

import beartype
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev import artifacts, checkpoint, helpers, nn
from saev import objectives as objs
from saev.data import loader
from saev.objectives import Loss, warmup

_LOGGER_NAME = "saev.training"
_STATS_CHUNK_ROWS = 16384
_EVAL_CHUNK_ROWS = 1024
_DENSE_THRESHOLD = 0.1
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_CHECKPOINT_KIND = "saev.training.GroupTrainer"
_CHECKPOINT_VERSION = 2


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained SAE (given the activations)."""

    sae: nn.SaeConfig
    """Shape and initialisation seed of the SAE."""
    objective: objs.ObjectiveConfig = objs.ReluL1()
    """Training objective and inference activation, with its own fields: `ReluL1(l1_coeff)`, `TopK(k, aux_k,
    aux_coeff, dead_tokens)`, `BatchTopK(...)` or `Matryoshka(..., prefixes)` (see `saev.objectives`)."""
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

    aliases: typing.ClassVar[dict[str, str]] = {
        "l1_coeff": "objective.l1_coeff",
        "k": "objective.k",
        "aux_k": "objective.aux_k",
        "aux_coeff": "objective.aux_coeff",
        "dead_tokens": "objective.dead_tokens",
        "matryoshka_prefixes": "objective.prefixes",
    }
    """Sweep keys of earlier versions (top-level objective fields) -> where they live now (see `saev.sweep`)."""

    def __post_init__(self):
        for name in ("n_train", "batch_size", "n_eval", "chunk_rows", "buffer_rows"):
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
        self.objective.check(self.sae.d_sae)

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
    """Mean number of active latents per held-out example: non-zero, the SAE's own rule (an imported saev TopK SAE
    keeps negative values, so "positive" would miss its active latents)."""
    dead_frac: float
    """Fraction of latents never active (never non-zero) on the held-out rows."""
    dense_frac: float
    """Fraction of latents active (non-zero) on more than 10% of the held-out rows."""
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

##########
# Groups #
##########


@beartype.beartype
def get_group_key(cfg: TrainConfig) -> dict[str, object]:
    """What SAEs trained together must share: one shape and objective (stacked weights, one loss) and one data
    stream (batch_size, n_train, seed, n_eval, chunk_rows, buffer_rows). Everything else (lr, the objective's
    fields such as l1_coeff or k, sae.seed, ...) may differ."""
    return {
        "sae.d_vit": cfg.sae.d_vit,
        "d_sae": cfg.sae.d_sae,
        "objective": cfg.objective.kind,
        "batch_size": cfg.batch_size,
        "n_train": cfg.n_train,
        "seed": cfg.seed,
        "n_eval": cfg.n_eval,
        "chunk_rows": cfg.chunk_rows,
        "buffer_rows": cfg.buffer_rows,
        **objs.IMPLEMENTATIONS[type(cfg.objective)].group_key(cfg.objective, cfg.sae.d_sae),
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
                    "saev.training.group"
                )


@beartype.beartype
def group(cfgs: Sequence[TrainConfig], *, max_size: int | None = None) -> list[list[TrainConfig]]:
    """Split a sweep into groups that can be trained together on one data stream (`train_group`).

    Configs with the same `get_group_key` (d_vit, d_sae, objective kind and its shape fields, batch_size, n_train,
    seed, n_eval, loader sizes) form a group. Deterministic: groups are ordered by their first config in `cfgs`, and
    configs keep their sweep order within a group. With `max_size`, a larger group is cut into consecutive chunks of
    at most that many configs (e.g. to fit GPU memory).

    Raises:
        ValueError: `max_size` is not positive.
    """
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    by_key: dict[tuple, list[TrainConfig]] = {}
    for cfg in cfgs:
        by_key.setdefault(tuple(get_group_key(cfg).items()), []).append(cfg)
    groups = list(by_key.values())
    if max_size is None:
        return groups
    return [g[i : i + max_size] for g in groups for i in range(0, len(g), max_size)]


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
    on CPU it runs in tiles of a few SAEs, see `objectives.get_tile_size`, and keeps buffers per tile) and the step count.
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
        d_sae = cfgs[0].sae.d_sae
        tile = objs.get_tile_size(len(cfgs), cfgs[0].batch_size, d_sae, self.device)
        self.objective = objs.make_objective(
            [cfg.objective for cfg in cfgs], d_sae, [cfg.warmup_steps for cfg in cfgs], self.device, tile
        )
        self.exp_avg = {name: torch.zeros_like(p) for name, p in self.stack.named_parameters()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in self.stack.named_parameters()}
        self._update = {name: torch.empty_like(p) for name, p in self.stack.named_parameters()}
        d_sae = cfgs[0].sae.d_sae
        self.tokens_since_fired_SK = torch.zeros(len(cfgs), d_sae, dtype=torch.int64, device=self.device)
        self.dead_tokens_S = torch.tensor([objs.dead_tokens(cfg.objective) for cfg in cfgs], device=self.device)
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
        step_sizes = [cfg.lr * warmup(self.step, cfg.warmup_steps) / bias1 for cfg in self.cfgs]
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
def train(cfg: TrainConfig, data: "Float[np.ndarray, 'N D'] | loader.Rows", **kwargs: typing.Any) -> TrainResult:
    """Train one SAE: `train_group([cfg], data, **kwargs)[0]` (see `train_group` for the keyword arguments)."""
    (result,) = train_group([cfg], data, **kwargs)
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
        len(cfgs), cfg.objective.kind, d, cfg.sae.d_sae, n_train_rows, cfg.n_eval, n_steps, cfg.batch_size, stats.scale,
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
            raise checkpoint.CheckpointError(
                f"checkpoint {fpath} was made for other {name} ({saved.get(name)!r}, now {value!r}); "
                "delete it to start over"
            )
    step = saved.get("step")
    if not (isinstance(step, int) and 0 <= step <= trainer.cfgs[0].n_steps):
        raise checkpoint.CheckpointError(f"checkpoint {fpath} has an invalid step {step!r}")
    try:
        trainer.load_state_dict(tensors, step)
    except ValueError as err:
        raise checkpoint.CheckpointError(f"checkpoint {fpath}: {err}") from err


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
        done, n_steps, rate, helpers.format_duration(eta), 100 * wait_frac, _fmt_values(loss_S), _fmt_values(loss.mse.tolist()),
        ",".join(f"{v:.1f}" for v in loss.l0.tolist()),
    )  # fmt: skip


def _fmt_values(values: list[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


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
        active_S += (f_BS != 0).sum(dim=0)  # non-zero, not positive: TopK(keep_negative) keeps negative values
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
