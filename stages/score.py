"""score: exact AP of every SAE latent ("prototype") for every class, over the kept patches, in K-blocks.

One artifact per SAE, `<root>/score/<key>/`, with one partial per K-block in `partials/blockNNNNN.safetensors`
holding `ap_CK` (float64 [C, block]), `min_K` and `max_K` (each latent's lowest and highest score over the kept
patches; equal = a constant, dead latent) and `k_range` ([k_start, k_stop)); the format is `saev.scoring`'s. Each
block is one piece of work (one task of a job array on Slurm); the artifact is sealed when every block exists.

Block size: a fixed number of latents, or "auto": as many latents as fit the memory budget, given the number of
kept patches (the block's float32 scores [N, block] dominate; the AP engine bounds its own working memory).
"""

import dataclasses
import functools
import logging
import math
import pathlib
import typing

import numpy as np
import torch

from saev import ap, artifacts, helpers, keepmask, nn, scoring
from saev.data.shards import Shards

from .graph import Piece, Plan, ScoreInfo, StagePlan

NAME = "score"
VERSION = 2

logger = logging.getLogger("stages.score")

check = None
"""No checks before submission beyond the plan's."""
finalize = None
"""Nothing to join: the partials are the artifact."""


@dataclasses.dataclass(frozen=True)
class Config:
    """How latents are scored."""

    block_size: int | typing.Literal["auto"] = "auto"
    """Latents per K-block (one partial file and one job-array task each), or "auto" to size blocks from memory_gb."""
    memory_gb: float = artifacts.unhashed(4.0)
    """Memory budget of one scoring task (GPU memory when scoring on a GPU), used by block_size = "auto"."""
    matmul_precision: typing.Literal["highest", "high", "medium"] = "highest"
    """torch float32 matmul precision for the latent scores; TF32/bf16 change scores and so ties, hence hashed."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    batch_size: int = artifacts.unhashed(16_384)
    """Patches per encoder matmul (memory only; results do not depend on it)."""

    def __post_init__(self):
        if self.block_size != "auto" and self.block_size <= 0:
            raise ValueError(f"score.block_size must be positive or \"auto\", got {self.block_size}")
        if self.memory_gb <= 0:
            raise ValueError(f"score.memory_gb must be positive, got {self.memory_gb}")
        if self.batch_size <= 0:
            raise ValueError(f"score.batch_size must be positive, got {self.batch_size}")


_WORKING_BYTES = 768 * 2**20
"""Memory kept aside from the budget for the AP engine (~256 MB by default), an encoder batch and the SAE."""


def get_block_size(cfg: Config, n_rows: int, d_sae: int) -> int:
    """Latents per block: the configured number, or as many float32 score columns of n_rows as fit the budget."""
    if cfg.block_size != "auto":
        return min(cfg.block_size, d_sae)
    budget = max(cfg.memory_gb * 2**30 - _WORKING_BYTES, 2**20)
    block = int(budget // (4 * max(1, n_rows)))
    if block >= 256:
        block -= block % 128  # round numbers for readable partial ranges
    return max(1, min(block, d_sae))


def plan(pipeline, upstream: Plan) -> StagePlan[ScoreInfo]:
    cfg: Config = pipeline.score
    dump_ref = upstream["dump"].artifacts[0].ref
    mask_art = upstream["mask"].artifacts[0]
    n_rows = upstream["mask"].info[mask_art.key].max_kept
    arts, pieces, all_params, all_inputs = [], [], {}, {}
    info: dict[str, ScoreInfo] = {}
    train_plan = upstream["train"]
    for train_art in train_plan.artifacts:
        train_info = train_plan.info[train_art.key]
        inputs = {"dump": dump_ref, "mask": mask_art.ref, "sae": train_art.ref}
        block_size = get_block_size(cfg, n_rows, train_info.d_sae)
        params = {**artifacts.hashed_params(cfg), "block_size": block_size}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
        n_blocks = math.ceil(train_info.d_sae / block_size)
        arts.append(art)
        all_params[art.key] = params
        all_inputs[art.key] = inputs
        info[art.key] = ScoreInfo(
            train_key=train_art.key, d_sae=train_info.d_sae, layer=train_info.layer, block_size=block_size
        )
        for block in range(n_blocks):
            label = f"sae {train_art.key} block {block + 1}/{n_blocks}"
            pieces.append(Piece(NAME, art, scoring.partial_fpath(art, block), label))
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)


@functools.lru_cache(maxsize=2)
def load_kept(dump_dpath: pathlib.Path, mask_dpath: pathlib.Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations [n_keep, D] and labels [n_keep] of the kept patches (cached: every block of a job reuses them).

    The keep-mask, the labels and the gathered activations are checked where they are read (a bad file raises an
    error naming it: `keepmask.MaskFileError`, `ShardValueError`), so no bad value reaches the AP engine.
    """
    shards = Shards(dump_dpath)
    keep = keepmask.load_keep(mask_dpath, shards)  # checked: in range, labelled, sorted, disjoint from held-out
    labels = np.asarray(shards.labels).reshape(-1)[keep].astype(np.int64)
    acts = shards.patches_flat(layer, keep)
    return acts, labels


def run(pipeline, plan: Plan, piece: Piece) -> None:
    cfg: Config = pipeline.score
    info: ScoreInfo = plan[NAME].info[piece.artifact.key]
    block = int(piece.fpath.stem.removeprefix("block"))
    k_start = block * info.block_size
    k_stop = min(info.d_sae, k_start + info.block_size)

    dump_art = plan["dump"].artifacts[0]
    mask_art = plan["mask"].artifacts[0]
    train_art = artifacts.Artifact(pipeline.root, "train", info.train_key)
    acts_ND, labels_N = load_kept(dump_art.dpath, mask_art.dpath, info.layer)
    n_classes = len(Shards(dump_art.dpath).metadata.class_names)

    device = helpers.get_device(cfg.device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    sae = nn.load(train_art.dpath, device=device)
    scores_NK = scoring.encode_block(sae, acts_ND, k_start, k_stop, batch_size=cfg.batch_size, device=device)
    ap_CK = ap.average_precision(scores_NK, torch.from_numpy(labels_N).to(device), n_classes=n_classes)
    scoring.write_partial(
        piece.fpath,
        ap_CK=ap_CK.cpu().numpy(),
        scores_NK=scores_NK,
        k_start=k_start,
        k_stop=k_stop,
        train_key=info.train_key,
        matmul_precision=cfg.matmul_precision,
    )


def manifest_extra(pipeline, art: artifacts.Artifact) -> dict[str, object]:
    return {"matmul_precision": pipeline.score.matmul_precision}
