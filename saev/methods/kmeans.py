"""k-means as a baseline: k centres fitted by mini-batch updates over the corpus stream; a row's code has one non-zero,
at its nearest centre.

Fit (Sculley 2010, "Web-scale k-means clustering", with per-centre learning rates):
1. Start: the first batches of the stream are held until they have at least `INIT_ROWS_PER_CENTRE` * k rows (or
   the stream ends); the centres start at k of those rows chosen by k-means++ (`init_centres`, seeded with `seed`:
   well spread, so no two centres start in one well-separated cluster). The held batches are then taken in order as
   below. A stream with fewer than k rows is refused.
2. Each batch: every row is assigned to its nearest centre (squared Euclidean distance; first index on ties); a
   centre c that gets n_c rows with sum s_c, having had count_c rows before, moves to
   (count_c * c + s_c) / (count_c + n_c) (float64 arithmetic, stored float32), i.e. each row pulls its centre with
   learning rate 1 / (the centre's count), so a centre is the running mean of the rows it has won.
3. Empty centres: after a batch, every centre that has won no row yet (count 0) is moved to a row of that batch,
   distinct rows chosen by `torch.randperm(B, generator)` (the same seeded generator), so no centre stays stranded.

Codes: "inverse-distance" gives 1 / (1 + ||x - c||) at the nearest centre (the paper's rule), "one-hot" gives 1.0;
every other code is 0, so L0 = 1. A row is reconstructed by its nearest centre (NMSE).
"""

import dataclasses
import typing

import beartype
import torch
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from saev import methods

INIT_ROWS_PER_CENTRE = 4
"""Rows held per centre for the k-means++ start (more spread the start better, and cost k passes over them)."""

_ASSIGN_ELEMENTS = 2**25
"""Distances computed at once when assigning rows (rows x centres): about 128 MB of float32."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class KMeansConfig:
    """k-means centres fitted by mini-batch updates (see the module docstring)."""

    k: int
    """Number of centres (latents)."""
    code: typing.Literal["inverse-distance", "one-hot"] = "inverse-distance"
    """A row's code at its nearest centre: 1 / (1 + distance), or 1.0."""
    seed: int = 0
    """Seed of the initial centres and of the reseeding of empty ones."""

    kind: typing.ClassVar[str] = "kmeans"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be positive, got {self.k}")


@jaxtyped(typechecker=beartype.beartype)
def nearest(x_BD: Float[Tensor, "B D"], centres_KD: Float[Tensor, "K D"]) -> Int[Tensor, " B"]:
    """Index of each row's nearest centre (squared Euclidean distance, first index on ties), computed as
    ||c||^2 - 2 x.c in float32, rows in chunks of about `_ASSIGN_ELEMENTS` distances."""
    sq_K = centres_KD.square().sum(dim=1)
    out_B = torch.empty(len(x_BD), dtype=torch.int64, device=x_BD.device)
    step = max(1, _ASSIGN_ELEMENTS // max(1, len(centres_KD)))
    for s in range(0, len(x_BD), step):
        dist_bK = torch.addmm(sq_K, x_BD[s : s + step], centres_KD.T, alpha=-2.0)
        out_B[s : s + step] = dist_bK.argmin(dim=1)
    return out_B


@jaxtyped(typechecker=beartype.beartype)
def init_centres(rows_ND: Float[Tensor, "N D"], k: int, generator: torch.Generator) -> Int[Tensor, " k"]:
    """Indices of k distinct rows chosen by k-means++ (Arthur and Vassilvitskii 2007): the first uniformly, each next
    one with probability proportional to its squared distance (float64) to the nearest one chosen so far; rows at
    distance 0 of every chosen one are drawn uniformly among the unchosen once every distance is 0. Draws use
    `torch.rand(generator=generator)` on the CPU. It costs k passes over the rows: seconds on a GPU for k = 16,384
    and 65,536 rows of width 1,024, many minutes on a CPU."""
    n = len(rows_ND)
    out = torch.empty(k, dtype=torch.int64)
    chosen_N = torch.zeros(n, dtype=torch.bool, device=rows_ND.device)
    d2_N = torch.full((n,), torch.inf, dtype=torch.float64, device=rows_ND.device)
    for i in range(k):
        u = float(torch.rand((), dtype=torch.float64, generator=generator))
        weights_N = torch.where(chosen_N, 0.0, torch.where(torch.isinf(d2_N), 1.0, d2_N))
        if float(weights_N.sum()) == 0:
            weights_N = (~chosen_N).double()
        cum_N = weights_N.cumsum(0)
        j = min(int(torch.searchsorted(cum_N, u * cum_N[-1], right=True)), n - 1)
        while chosen_N[j] or weights_N[j] == 0:  # u * total at a boundary lands on a zero-weight row: the next one
            j = (j + 1) % n
        out[i], chosen_N[j] = j, True
        d2_N = torch.minimum(d2_N, (rows_ND - rows_ND[j]).square().sum(dim=1, dtype=torch.float64))
    return out


class KMeansFitter:
    """A k-means fit in progress (`saev.methods.Fitter`)."""

    def __init__(self, cfg: KMeansConfig, d_vit: int):
        self.cfg, self.d_vit = cfg, d_vit
        self.batches_seen = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.centres_KD: Tensor | None = None
        """float32 [k, D] once started."""
        self.counts_K = torch.zeros(cfg.k, dtype=torch.int64)
        """Rows each centre has won so far."""
        self.held: list[Tensor] = []
        """Batches held until there are k rows to start from (step 1)."""

    def update(self, x_BD: Tensor) -> None:
        self.batches_seen += 1
        if self.centres_KD is None:
            self.held.append(x_BD.detach().float().clone())
            if sum(len(b) for b in self.held) >= INIT_ROWS_PER_CENTRE * self.cfg.k:
                self._start()
            return
        self._step(x_BD.detach().float())

    def _start(self) -> None:
        """Step 1 of the module docstring: centres from the held rows, then the held batches taken in order."""
        rows_ND = torch.cat(self.held)
        pick = init_centres(rows_ND, self.cfg.k, self.generator).to(rows_ND.device)
        self.centres_KD = rows_ND[pick].clone()
        held, self.held = self.held, []
        for batch_BD in held:
            self._step(batch_BD)

    def _step(self, x_BD: Tensor) -> None:
        """Steps 2 and 3 of the module docstring on one batch, on the batch's device (bit for bit reproducible on
        the CPU; CUDA's index_add_ sums in no fixed order)."""
        assert self.centres_KD is not None
        k, device = self.cfg.k, x_BD.device
        self.centres_KD, self.counts_K = self.centres_KD.to(device), self.counts_K.to(device)
        idx_B = nearest(x_BD, self.centres_KD)
        n_K = torch.bincount(idx_B, minlength=k)
        sum_KD = torch.zeros((k, self.d_vit), dtype=torch.float64, device=device).index_add_(0, idx_B, x_BD.double())
        won = n_K > 0
        count_k1 = self.counts_K[won].double().unsqueeze(1)
        moved = (count_k1 * self.centres_KD[won].double() + sum_KD[won]) / (count_k1 + n_K[won].double().unsqueeze(1))
        self.centres_KD[won] = moved.float()
        self.counts_K += n_K
        empty_E = (self.counts_K == 0).nonzero().squeeze(1)
        if len(empty_E):
            rows = torch.randperm(len(x_BD), generator=self.generator)[: len(empty_E)].to(device)
            self.centres_KD[empty_E[: len(rows)]] = x_BD[rows]

    def state_dict(self) -> dict[str, Tensor]:
        state = {
            "batches_seen": torch.tensor(self.batches_seen, dtype=torch.int64),
            "generator": self.generator.get_state(),
            "counts_K": self.counts_K,
        }
        if self.centres_KD is not None:
            state["centres_KD"] = self.centres_KD
        for i, batch_BD in enumerate(self.held):
            state[f"held{i:06d}"] = batch_BD
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self.batches_seen = int(state.pop("batches_seen"))
        self.generator.set_state(state.pop("generator"))
        self.counts_K = state.pop("counts_K").clone()
        centres = state.pop("centres_KD", None)
        self.centres_KD = None if centres is None else centres.clone()
        self.held = [state.pop(name).clone() for name in sorted(n for n in state if n.startswith("held"))]
        if state or self.counts_K.shape != (self.cfg.k,):
            raise ValueError(f"unexpected tensors {sorted(state)} or counts of shape {list(self.counts_K.shape)}")
        if self.centres_KD is not None and self.centres_KD.shape != (self.cfg.k, self.d_vit):
            raise ValueError(f"centres of shape {list(self.centres_KD.shape)}, expected [{self.cfg.k}, {self.d_vit}]")

    def finish(self) -> "KMeans":
        if self.centres_KD is None:
            rows = sum(len(b) for b in self.held)
            if rows < self.cfg.k:
                raise methods.MethodConfigError(
                    f"k-means k={self.cfg.k} needs at least {self.cfg.k} corpus rows, the stream had {rows}; lower k"
                )
            self._start()
            assert self.centres_KD is not None
        return KMeans(self.cfg, self.d_vit, {"centres_KD": self.centres_KD.clone()})


class KMeans(torch.nn.Module):
    """Fitted k-means (`saev.methods.Encoder`): one non-zero code per row, at its nearest centre."""

    def __init__(self, cfg: KMeansConfig, d_vit: int, tensors: dict[str, Tensor]):
        super().__init__()
        methods.check_tensors(tensors, {"centres_KD": (cfg.k, d_vit)})
        self.cfg = cfg
        self.register_buffer("centres_KD", tensors["centres_KD"].float())

    @property
    def d_vit(self) -> int:
        return self.centres_KD.shape[1]

    @property
    def n_latents(self) -> int:
        return self.cfg.k

    def tensors(self) -> dict[str, Tensor]:
        return {"centres_KD": self.centres_KD}

    @torch.inference_mode()
    def assign(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's nearest centre (int64 [B]) and its code there (float32 [B])."""
        idx_B = nearest(x_BD, self.centres_KD)
        if self.cfg.code == "one-hot":
            return idx_B, torch.ones(len(x_BD), dtype=torch.float32, device=x_BD.device)
        # The distance to the chosen centre is computed directly, not from the expansion used to find it.
        dist_B = (x_BD - self.centres_KD[idx_B]).norm(dim=1)
        return idx_B, 1.0 / (1.0 + dist_B)

    def encode_block(self, x_BD: Tensor, start: int, stop: int) -> Tensor:
        idx_B, code_B = self.assign(x_BD)
        out_BK = torch.zeros((len(x_BD), stop - start), dtype=torch.float32, device=x_BD.device)
        inside = (idx_B >= start) & (idx_B < stop)
        out_BK[inside, idx_B[inside] - start] = code_B[inside]
        return out_BK

    def reconstruct(self, x_BD: Tensor) -> Tensor:
        return self.centres_KD[self.assign(x_BD)[0]]

    def count_nonzero(self, x_BD: Tensor) -> Tensor:
        return torch.ones(len(x_BD), dtype=torch.int64, device=x_BD.device)
