"""Training objectives: what each one is configured by, the loss and hand-written gradients it computes for a
stacked group of SAEs, and the inference activation rule it gives each trained SAE.

Configs (one class per objective, chosen by `kind` in TOML; each holds only the fields its objective reads):
`ReluL1` ("relu_l1": ReLU + decoder-norm-weighted L1), `TopK` ("topk": exactly the k largest pre-activations per
example), `BatchTopK` ("batchtopk": the k * batch_size largest over the batch, with a threshold estimated during
training for inference) and `Matryoshka` ("matryoshka": BatchTopK whose nested dictionary prefixes each
reconstruct). The top-k objectives add AuxK: dead latents (not fired for `dead_tokens` examples) learn to
reconstruct the residual.

Implementations (`Objective` and its subclasses, looked up by config class with `make_objective`) compute a
group's loss and gradients; `TiledObjective` runs one tile of SAEs at a time on CPU (`get_tile_size`).
`saev.training` owns the training loop that uses them.
"""

import dataclasses
import itertools
import math
import typing
from collections.abc import Sequence

import beartype
import torch
from torch import Tensor

from saev import nn

_CPU_TILE_BYTES = 8 * 2**20
"""On CPU, a group's loss is computed for as many SAEs at a time as keep one [tile, B, d_sae] float32 buffer
under this size (`get_tile_size`)."""
_THRESHOLD_WINDOW = 1000
"""BatchTopK's threshold is the running mean of each batch's minimum positive activation over the first this-many
batches, then an exponential moving average with this window (so it tracks the end of training)."""


###########
# Configs #
###########


def _check_finite_nonneg(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class ReluL1:
    """ReLU latents with an L1 penalty weighted by decoder-row norm (Anthropic, April 2024 update). Inference: ReLU."""

    kind: typing.ClassVar[str] = "relu_l1"
    l1_coeff: float = 4e-3
    """Weight of the L1 penalty sum_s f_s * ||W_dec[s]|| (summed over latents, averaged over the batch; it rises
    linearly over the warmup); the reconstruction term is the per-element mean squared error on scaled
    activations."""

    def __post_init__(self):
        _check_finite_nonneg("l1_coeff", self.l1_coeff)

    def check(self, d_sae: int) -> None:
        """Raise ValueError if this objective cannot train an SAE of `d_sae` latents."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class _TopKFields:
    """Fields shared by the top-k objectives (k and AuxK)."""

    k: int = 32
    """topk: active latents per example; batchtopk and matryoshka: average active latents per example (the
    k * batch_size largest activations of each batch are kept)."""
    aux_k: int = 512
    """Dead latents (at most d_sae) used by the AuxK loss to reconstruct the residual."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss (normalised MSE of the residual); 0 disables it."""
    dead_tokens: int = 10_000_000
    """A latent is dead (AuxK trains it) after not firing on this many training examples."""

    def __post_init__(self):
        for name in ("k", "aux_k", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        _check_finite_nonneg("aux_coeff", self.aux_coeff)

    def check(self, d_sae: int) -> None:
        """Raise ValueError if this objective cannot train an SAE of `d_sae` latents."""
        if self.k > d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={d_sae}")


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class TopK(_TopKFields):
    """TopK (Gao et al. 2024): each example keeps its k largest pre-activations; + AuxK. Inference: TopK(k)."""

    kind: typing.ClassVar[str] = "topk"


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class BatchTopK(_TopKFields):
    """BatchTopK (Bussmann et al. 2024): the k * batch_size largest pre-activations of the batch are kept; + AuxK.
    Inference: JumpReLU at a threshold estimated during training."""

    kind: typing.ClassVar[str] = "batchtopk"


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Matryoshka(_TopKFields):
    """Matryoshka BatchTopK (Bussmann et al. 2025): as BatchTopK, and every nested prefix of the dictionary
    reconstructs the input on its own. Inference: JumpReLU at the estimated threshold."""

    kind: typing.ClassVar[str] = "matryoshka"
    prefixes: tuple[int, ...] = ()
    """Sizes of the nested dictionary prefixes that each reconstruct, strictly increasing; d_sae is added as the
    last one if missing. Empty means (d_sae // 16, d_sae // 4, d_sae)."""

    def __post_init__(self):
        super().__post_init__()
        prefixes = self.prefixes
        if any(m < 1 for m in prefixes) or any(a >= b for a, b in zip(prefixes, prefixes[1:], strict=False)):
            raise ValueError(f"prefixes must be positive and strictly increasing, got {prefixes}")

    def check(self, d_sae: int) -> None:
        super().check(d_sae)
        if self.prefixes and self.prefixes[-1] > d_sae:
            raise ValueError(f"prefixes {self.prefixes} exceed d_sae={d_sae}")


ObjectiveConfig = ReluL1 | TopK | BatchTopK | Matryoshka
"""The config of one objective; in TOML `objective = "topk"` or a table `[objective]` with `kind = "topk"` and its
fields."""

CONFIGS: tuple[type, ...] = (ReluL1, TopK, BatchTopK, Matryoshka)
"""Every objective config class, in documentation order."""

KINDS: dict[str, type] = {cls.kind: cls for cls in CONFIGS}
"""`kind` -> objective config class."""


@beartype.beartype
def get_matryoshka_prefixes(obj: Matryoshka, d_sae: int) -> tuple[int, ...]:
    """The prefix sizes a matryoshka objective trains: its `prefixes` (default d_sae/16, d_sae/4) ending with d_sae."""
    prefixes = obj.prefixes or tuple(m for m in (d_sae // 16, d_sae // 4) if m >= 1)
    prefixes = tuple(sorted(set(prefixes)))
    return prefixes if prefixes[-1:] == (d_sae,) else (*prefixes, d_sae)


@beartype.beartype
def dead_tokens(obj: ObjectiveConfig) -> int:
    """After how many examples without firing a latent counts as dead (only the top-k objectives' AuxK uses it)."""
    return obj.dead_tokens if isinstance(obj, _TopKFields) else _TopKFields.dead_tokens


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
    trained SAE. Subclasses (one per config class, see `IMPLEMENTATIONS`) differ only in a few hooks (`select_`,
    `prefixes`, `sparsity`, AuxK); an instance is built for one group and may keep per-SAE statistics gathered
    during training (`state_dict`, saved in checkpoints).

    Calling an objective runs the forward pass AND writes every stack parameter's `.grad`, with a hand-written
    backward pass: all SAE formulas share the form f = pre * mask (mask = f > 0), so the backward is a few
    batched matmuls. Unlike autograd it reuses its [S, B, d_sae] buffers from step to step (on CPU, fresh
    allocations of that size are page-faulted anew every step, which cost as much as the matmuls) and skips the
    matmul that autograd would spend on the gradient of b_dec through the encoder (a matrix-vector product
    suffices). tests/lib/test_objectives.py checks these gradients against autograd.
    """

    def __init__(self, objs: Sequence[ObjectiveConfig], d_sae: int, warmup_steps: Sequence[int], device: torch.device):
        """One objective for the SAEs of a group: their objective configs (all of one class), their shared width and
        each one's warmup (relu_l1's L1 coefficient rises over it)."""
        self.objs = tuple(objs)
        self.d_sae = d_sae
        self.warmup_steps = tuple(warmup_steps)
        self.device = device
        self.prefixes: tuple[int, ...] = (d_sae,)
        """Nested dictionary sizes that each reconstruct the input (just d_sae, except for matryoshka)."""
        self._buffers: dict[str, Tensor] = {}

    @classmethod
    def group_key(cls, obj: ObjectiveConfig, d_sae: int) -> dict[str, object]:
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

        aux_coeff_S = torch.tensor(
            [obj.aux_coeff if isinstance(obj, _TopKFields) else 0.0 for obj in self.objs],
            dtype=W_enc.dtype,
            device=W_enc.device,
        )
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

    def select_(self, pre_SBK: Tensor) -> None:
        pre_SBK.clamp_(min=0)

    def sparsity(self, W_dec_SKD: Tensor, fsum_SK: Tensor, B: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
        coeffs = [obj.l1_coeff * warmup(step, w) / B for obj, w in zip(self.objs, self.warmup_steps, strict=True)]
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

    def __init__(self, objs, d_sae, warmup_steps, device):
        super().__init__(objs, d_sae, warmup_steps, device)
        self.k_S = [obj.k for obj in objs]
        self.aux_k_S = [min(obj.aux_k, d_sae) for obj in objs]
        self.use_aux = any(obj.aux_coeff > 0 for obj in objs)

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
        coeffs = torch.tensor([obj.aux_coeff for obj in self.objs], dtype=W_dec.dtype, device=W_dec.device)
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

    def __init__(self, objs, d_sae, warmup_steps, device):
        super().__init__(objs, d_sae, warmup_steps, device)
        self.threshold_S = torch.zeros(len(objs), dtype=torch.float64, device=device)
        self.n_observed_S = torch.zeros(len(objs), dtype=torch.int64, device=device)
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
    prefix of the dictionary (`Matryoshka.prefixes`) reconstructs the input on its own: the loss is the sum over
    prefix sizes m of the MSE of f[:, :m] @ W_dec[:m] + b_dec; + AuxK. Inference: JumpReLU(threshold)."""

    @classmethod
    def group_key(cls, obj: ObjectiveConfig, d_sae: int) -> dict[str, object]:
        return {"matryoshka prefixes (resolved)": get_matryoshka_prefixes(obj, d_sae)}

    def __init__(self, objs, d_sae, warmup_steps, device):
        super().__init__(objs, d_sae, warmup_steps, device)
        self.prefixes = get_matryoshka_prefixes(objs[0], d_sae)


IMPLEMENTATIONS: dict[type, type[Objective]] = {
    ReluL1: ReluL1Objective,
    TopK: TopKObjective,
    BatchTopK: BatchTopKObjective,
    Matryoshka: MatryoshkaObjective,
}
"""Objective config class -> the objective that trains it."""


def make_objective(
    objs: Sequence[ObjectiveConfig],
    d_sae: int,
    warmup_steps: Sequence[int],
    device: torch.device,
    tile: int | None = None,
) -> "Objective | TiledObjective":
    """The objective of a group (every config of one class), computed `tile` SAEs at a time when that is fewer than
    the group (see `get_tile_size`)."""
    kinds = {type(obj) for obj in objs}
    if len(kinds) != 1:
        raise ValueError(f"a group trains one objective, got {sorted(k.kind for k in kinds)}")
    if tile is None or tile >= len(objs):
        return IMPLEMENTATIONS[type(objs[0])](objs, d_sae, warmup_steps, device)
    return TiledObjective(objs, d_sae, warmup_steps, device, tile)


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

    def __init__(
        self, objs: Sequence[ObjectiveConfig], d_sae: int, warmup_steps: Sequence[int], device: torch.device, tile: int
    ):
        self.bounds = [(start, min(start + tile, len(objs))) for start in range(0, len(objs), tile)]
        impl = IMPLEMENTATIONS[type(objs[0])]
        self.tiles = [impl(objs[a:b], d_sae, warmup_steps[a:b], device) for a, b in self.bounds]
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


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup factor in (0, 1] for 0-based `step`."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
