"""Baselines without a fitted dictionary: random unit directions, and the ViT's own neurons.

Random directions (`RandomConfig`), scored by the dot product x . w (dense, signed):
- source "gaussian": n rows of `torch.randn(n, D, generator=Generator().manual_seed(seed))`, each divided by its
  norm; no data read.
- source "corpus": n corpus rows drawn uniformly without replacement by a reservoir over the stream (Algorithm R:
  row t >= n, counted from 0 in stream order, replaces reservoir slot j = floor(u_t * (t + 1)) if j < n, u_t uniform
  in [0, 1) from `torch.rand(..., dtype=float64, generator=...)` seeded with `seed`; of several rows of one batch
  drawing the same slot the last wins), each then divided by its norm (an all-zero row stays zero).
A row is reconstructed by its projection on the directions' span (least squares from the codes: x W^T pinv(W^T)).

Neurons (`NeuronsConfig`): latent j is coordinate j of the activation itself; no fit, exact reconstruction, L0 is
the number of non-zero coordinates.
"""

import dataclasses
import typing

import beartype
import numpy as np
import torch
from torch import Tensor

from saev import methods


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class RandomConfig:
    """n random unit directions (see the module docstring)."""

    n: int
    """Number of directions (latents)."""
    source: typing.Literal["gaussian", "corpus"] = "gaussian"
    """Gaussian directions, or corpus rows sampled by a seeded reservoir over the stream."""
    seed: int = 0
    """Seed of the directions (or of the reservoir)."""

    kind: typing.ClassVar[str] = "random"

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be positive, got {self.n}")


class RandomFitter:
    """Random directions in progress (`saev.methods.Fitter`): the reservoir of a "corpus" source (a "gaussian"
    source reads nothing: `update` only counts batches)."""

    def __init__(self, cfg: RandomConfig, d_vit: int):
        self.cfg, self.d_vit = cfg, d_vit
        self.batches_seen = 0
        self.rows_seen = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.reservoir_ND = torch.zeros((cfg.n, d_vit), dtype=torch.float32)

    def update(self, x_BD: Tensor) -> None:
        self.batches_seen += 1
        if self.cfg.source == "gaussian":
            return
        x_BD = x_BD.detach().to("cpu", torch.float32)
        n, t0 = self.cfg.n, self.rows_seen
        fill = max(0, min(len(x_BD), n - t0))  # rows that fill the first empty slots
        self.reservoir_ND[t0 : t0 + fill] = x_BD[:fill]
        rest = len(x_BD) - fill
        if rest:
            t_R = torch.arange(t0 + fill, t0 + len(x_BD), dtype=torch.float64)
            j_R = torch.floor(torch.rand(rest, dtype=torch.float64, generator=self.generator) * (t_R + 1)).long()
            hit_R = (j_R < n).numpy()
            rows = np.flatnonzero(hit_R)[::-1]  # last row first, so np.unique's first occurrence is the last draw
            slots, first = np.unique(j_R.numpy()[rows], return_index=True)
            self.reservoir_ND[torch.from_numpy(slots)] = x_BD[fill + torch.from_numpy(rows[first].copy())]
        self.rows_seen += len(x_BD)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "batches_seen": torch.tensor(self.batches_seen, dtype=torch.int64),
            "rows_seen": torch.tensor(self.rows_seen, dtype=torch.int64),
            "generator": self.generator.get_state(),
            "reservoir_ND": self.reservoir_ND,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"batches_seen", "rows_seen", "generator", "reservoir_ND"}:
            raise ValueError(f"unexpected tensors {sorted(state)}")
        if state["reservoir_ND"].shape != (self.cfg.n, self.d_vit):
            raise ValueError(f"reservoir of shape {list(state['reservoir_ND'].shape)}")
        self.batches_seen, self.rows_seen = int(state["batches_seen"]), int(state["rows_seen"])
        self.generator.set_state(state["generator"])
        self.reservoir_ND = state["reservoir_ND"].clone()

    def finish(self) -> "RandomDirections":
        if self.cfg.source == "gaussian":
            gen = torch.Generator().manual_seed(self.cfg.seed)
            w_KD = torch.randn(self.cfg.n, self.d_vit, generator=gen, dtype=torch.float32)
        elif self.rows_seen < self.cfg.n:
            raise methods.MethodConfigError(
                f"random n={self.cfg.n} corpus directions need at least {self.cfg.n} corpus rows, the stream had "
                f"{self.rows_seen}; lower n"
            )
        else:
            w_KD = self.reservoir_ND.clone()
        norm_K1 = w_KD.norm(dim=1, keepdim=True)
        w_KD = w_KD / torch.where(norm_K1 > 0, norm_K1, 1.0)
        return RandomDirections(self.cfg, self.d_vit, {"directions_KD": w_KD})


class RandomDirections(torch.nn.Module):
    """Fitted random directions (`saev.methods.Encoder`): codes x . w, dense and signed."""

    def __init__(self, cfg: RandomConfig, d_vit: int, tensors: dict[str, Tensor]):
        super().__init__()
        methods.check_tensors(tensors, {"directions_KD": (cfg.n, d_vit)})
        self.cfg = cfg
        self.register_buffer("directions_KD", tensors["directions_KD"].float())
        self._decoder_KD: Tensor | None = None

    @property
    def d_vit(self) -> int:
        return self.directions_KD.shape[1]

    @property
    def n_latents(self) -> int:
        return self.cfg.n

    def tensors(self) -> dict[str, Tensor]:
        return {"directions_KD": self.directions_KD}

    @torch.inference_mode()
    def encode_block(self, x_BD: Tensor, start: int, stop: int) -> Tensor:
        return x_BD @ self.directions_KD[start:stop].T

    @torch.inference_mode()
    def reconstruct(self, x_BD: Tensor) -> Tensor:
        if self._decoder_KD is None or self._decoder_KD.device != x_BD.device:
            # pinv(W^T) [K, D]: the least-squares decoder of the codes, computed once in float64.
            self._decoder_KD = torch.linalg.pinv(self.directions_KD.double().T).float().to(x_BD.device)
        return (x_BD @ self.directions_KD.T) @ self._decoder_KD

    def count_nonzero(self, x_BD: Tensor) -> Tensor:
        return (x_BD @ self.directions_KD.T != 0).sum(dim=1)


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class NeuronsConfig:
    """The ViT's own coordinates as latents (no fit, no options)."""

    kind: typing.ClassVar[str] = "neurons"


class NeuronsFitter:
    """Nothing to fit (`saev.methods.Fitter`): `update` only counts batches."""

    def __init__(self, cfg: NeuronsConfig, d_vit: int):
        self.cfg, self.d_vit, self.batches_seen = cfg, d_vit, 0

    def update(self, x_BD: Tensor) -> None:
        self.batches_seen += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"batches_seen": torch.tensor(self.batches_seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"batches_seen"}:
            raise ValueError(f"unexpected tensors {sorted(state)}")
        self.batches_seen = int(state["batches_seen"])

    def finish(self) -> "Neurons":
        return Neurons(self.cfg, self.d_vit, {})


class Neurons(torch.nn.Module):
    """The identity (`saev.methods.Encoder`): latent j of a row is its coordinate j."""

    def __init__(self, cfg: NeuronsConfig, d_vit: int, tensors: dict[str, Tensor]):
        super().__init__()
        methods.check_tensors(tensors, {})
        self.cfg, self._d_vit = cfg, d_vit

    @property
    def d_vit(self) -> int:
        return self._d_vit

    @property
    def n_latents(self) -> int:
        return self._d_vit

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def encode_block(self, x_BD: Tensor, start: int, stop: int) -> Tensor:
        return x_BD[:, start:stop].float().contiguous()

    def reconstruct(self, x_BD: Tensor) -> Tensor:
        return x_BD.float().clone()

    def count_nonzero(self, x_BD: Tensor) -> Tensor:
        return (x_BD != 0).sum(dim=1)
