"""PCA as a baseline: the top-k eigenvectors of the corpus covariance; a row's codes are its centred coordinates
along them (dense and signed).

Fit: one streamed pass accumulates, in float64, the row count, and the sum and the sum of outer products of the rows
minus a shift (the first batch's mean, which keeps the sums small for activations far from the origin). Then
mean = shift + sum / n, covariance = (sum of outer products - n m m^T) / (n - 1) with m = sum / n, and
`torch.linalg.eigh` (float64) gives its eigenvalues and eigenvectors; the k largest, in decreasing order, are kept.

Sign: an eigenvector's sign is arbitrary (LAPACK builds differ). With `sign = "max-loading"` (the default) each
component is flipped so that its largest-magnitude coordinate (the first such on ties) is positive, a rule that
depends on the component alone. (The mean code over the fit data is 0 by construction, so it cannot orient a
component; orienting by the skew of the codes would need a second pass over the corpus.) `sign = "eigh"` keeps the
signs eigh returned.

Codes: z = (x - mean) @ components, all k of them (L0 = k); with `top_n`, only each row's n largest |z| are kept
(the others 0; L0 = n, torch.topk picks among ties). A row is reconstructed as mean + z_kept @ components^T.
"""

import dataclasses
import typing

import beartype
import torch
from torch import Tensor

from saev import methods


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class PcaConfig:
    """PCA from the streamed covariance (see the module docstring)."""

    k: int
    """Components kept (latents), the largest eigenvalues first."""
    top_n: int | None = None
    """Keep only each row's n largest |code| (the rest 0); None: all k (dense)."""
    sign: typing.Literal["max-loading", "eigh"] = "max-loading"
    """How each component's sign is chosen: its largest-|loading| coordinate positive, or as eigh returned it."""

    kind: typing.ClassVar[str] = "pca"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.top_n is not None and not 1 <= self.top_n <= self.k:
            raise ValueError(f"top_n must be in [1, k={self.k}], got {self.top_n}")


class PcaFitter:
    """A PCA fit in progress (`saev.methods.Fitter`): float64 accumulators of the rows' first two moments."""

    def __init__(self, cfg: PcaConfig, d_vit: int):
        if cfg.k > d_vit:
            raise methods.MethodConfigError(f"PCA k={cfg.k} components is above the activation width {d_vit}; lower k")
        self.cfg, self.d_vit = cfg, d_vit
        self.batches_seen = 0
        self.n = 0
        self.shift_D: Tensor | None = None
        self.sum_D = torch.zeros(d_vit, dtype=torch.float64)
        self.sum_DD = torch.zeros((d_vit, d_vit), dtype=torch.float64)

    def update(self, x_BD: Tensor) -> None:
        x64_BD = x_BD.detach().double()
        if self.shift_D is None:
            self.shift_D = x64_BD.mean(dim=0)
        device = x_BD.device
        self.shift_D, self.sum_D, self.sum_DD = (t.to(device) for t in (self.shift_D, self.sum_D, self.sum_DD))
        y_BD = x64_BD - self.shift_D
        self.sum_D += y_BD.sum(dim=0)
        self.sum_DD.addmm_(y_BD.T, y_BD)
        self.n += len(x_BD)
        self.batches_seen += 1

    def state_dict(self) -> dict[str, Tensor]:
        state = {
            "batches_seen": torch.tensor(self.batches_seen, dtype=torch.int64),
            "n": torch.tensor(self.n, dtype=torch.int64),
            "sum_D": self.sum_D,
            "sum_DD": self.sum_DD,
        }
        if self.shift_D is not None:
            state["shift_D"] = self.shift_D
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self.batches_seen, self.n = int(state.pop("batches_seen")), int(state.pop("n"))
        self.sum_D, self.sum_DD = state.pop("sum_D").clone(), state.pop("sum_DD").clone()
        shift = state.pop("shift_D", None)
        self.shift_D = None if shift is None else shift.clone()
        d = self.d_vit
        if state or self.sum_D.shape != (d,) or self.sum_DD.shape != (d, d):
            raise ValueError(f"unexpected tensors {sorted(state)} or accumulators of another width than {d}")

    def covariance(self) -> tuple[Tensor, Tensor]:
        """The mean (float64 [D]) and covariance (float64 [D, D], divided by n - 1) of the rows taken so far."""
        if self.n < 2 or self.shift_D is None:
            raise methods.MethodConfigError(f"PCA needs at least 2 corpus rows, the stream had {self.n}")
        m_D = self.sum_D / self.n
        cov_DD = (self.sum_DD - self.n * torch.outer(m_D, m_D)) / (self.n - 1)
        return self.shift_D + m_D, (cov_DD + cov_DD.T) / 2

    def finish(self) -> "Pca":
        mean_D, cov_DD = self.covariance()
        values_D, vectors_DD = torch.linalg.eigh(cov_DD)
        order = torch.argsort(values_D, descending=True, stable=True)[: self.cfg.k]
        values_K, vectors_DK = values_D[order], vectors_DD[:, order]
        if self.cfg.sign == "max-loading":
            vectors_DK = vectors_DK * orientation(vectors_DK)
        tensors = {"mean_D": mean_D.float(), "components_DK": vectors_DK.float(), "eigenvalues_K": values_K}
        return Pca(self.cfg, self.d_vit, {name: t.cpu() for name, t in tensors.items()})


def orientation(vectors_DK: Tensor) -> Tensor:
    """+1 or -1 per column [K]: the sign of its largest-magnitude coordinate (the first such on ties)."""
    top_K = vectors_DK.abs().argmax(dim=0)  # argmax returns the first maximal index
    signs_K = torch.sign(vectors_DK.gather(0, top_K.unsqueeze(0)).squeeze(0))
    return torch.where(signs_K < 0, -1.0, 1.0).to(vectors_DK.dtype)


class Pca(torch.nn.Module):
    """Fitted PCA (`saev.methods.Encoder`): dense signed codes, or each row's top n by magnitude."""

    def __init__(self, cfg: PcaConfig, d_vit: int, tensors: dict[str, Tensor]):
        super().__init__()
        methods.check_tensors(tensors, {"mean_D": (d_vit,), "components_DK": (d_vit, cfg.k), "eigenvalues_K": (cfg.k,)})
        self.cfg = cfg
        self.register_buffer("mean_D", tensors["mean_D"].float())
        self.register_buffer("components_DK", tensors["components_DK"].float())
        self.register_buffer("eigenvalues_K", tensors["eigenvalues_K"].double())

    @property
    def d_vit(self) -> int:
        return self.mean_D.shape[0]

    @property
    def n_latents(self) -> int:
        return self.cfg.k

    def tensors(self) -> dict[str, Tensor]:
        return {"mean_D": self.mean_D, "components_DK": self.components_DK, "eigenvalues_K": self.eigenvalues_K}

    @torch.inference_mode()
    def codes(self, x_BD: Tensor) -> Tensor:
        """Every code of each row, float32 [B, k] (the top-n rule applied). Always all k columns, so a block's
        codes are the same bits whatever the block."""
        z_BK = (x_BD - self.mean_D) @ self.components_DK
        if self.cfg.top_n is not None and self.cfg.top_n < self.cfg.k:
            keep_Bn = z_BK.abs().topk(self.cfg.top_n, dim=1, sorted=False).indices
            z_BK = torch.zeros_like(z_BK).scatter_(1, keep_Bn, z_BK.gather(1, keep_Bn))
        return z_BK

    def encode_block(self, x_BD: Tensor, start: int, stop: int) -> Tensor:
        return self.codes(x_BD)[:, start:stop].contiguous()

    def reconstruct(self, x_BD: Tensor) -> Tensor:
        return self.codes(x_BD) @ self.components_DK.T + self.mean_D

    def count_nonzero(self, x_BD: Tensor) -> Tensor:
        return (self.codes(x_BD) != 0).sum(dim=1)
