"""score: exact AP of every SAE latent ("prototype") for every class, over the kept patches, in K-blocks.

One artifact per SAE, `<root>/score/<key>/`, with one partial per K-block in `partials/blockNNNNN.safetensors`
holding `ap_CK` (float64 [C, block]), `min_K` and `max_K` (each latent's lowest and highest score over the kept
patches; equal = a constant, dead latent) and `k_range` ([k_start, k_stop)). Each block is one piece of work (one
task of a job array on Slurm); the artifact is sealed when every block exists.

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
import safetensors.numpy
import torch

from saev import ap, artifacts, helpers, nn
from saev.data.shards import Shards

from . import mask as mask_stage
from .graph import Piece, StagePlan

NAME = "score"
VERSION = 2

logger = logging.getLogger("stages.score")


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


def partial_fpath(art: artifacts.Artifact, block: int) -> pathlib.Path:
    return art.dpath / "partials" / f"block{block:05d}.safetensors"


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


def plan(pipeline, upstream) -> StagePlan:
    cfg: Config = pipeline.score
    n_rows = mask_stage.max_kept(pipeline)
    dump_ref = upstream["dump"].artifacts[0].ref
    mask_ref = upstream["mask"].artifacts[0].ref
    arts, pieces, all_params, all_inputs, info = [], [], {}, {}, {}
    train_plan = upstream["train"]
    for sae_art in train_plan.artifacts:
        sae_info = train_plan.info[sae_art.key]
        inputs = {"dump": dump_ref, "mask": mask_ref, "sae": sae_art.ref}
        block_size = get_block_size(cfg, n_rows, sae_info["d_sae"])
        params = {**artifacts.hashed_params(cfg), "block_size": block_size}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
        n_blocks = math.ceil(sae_info["d_sae"] / block_size)
        arts.append(art)
        all_params[art.key] = params
        all_inputs[art.key] = inputs
        info[art.key] = {
            "sae": sae_art.key,
            "d_sae": sae_info["d_sae"],
            "layer": sae_info["layer"],
            "block_size": block_size,
        }
        for block in range(n_blocks):
            label = f"sae {sae_art.key} block {block + 1}/{n_blocks}"
            pieces.append(Piece(NAME, art, partial_fpath(art, block), label))
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)



@functools.lru_cache(maxsize=2)
def load_kept(dump_dpath: pathlib.Path, mask_dpath: pathlib.Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations [n_keep, D] and labels [n_keep] of the kept patches (cached: every block of a job reuses them)."""
    shards = Shards(dump_dpath)
    keep = mask_stage.load_keep(mask_dpath)
    labels = np.asarray(shards.labels).reshape(-1)[keep].astype(np.int64)
    acts = shards.patches_flat(layer, keep)
    return acts, labels


def run(pipeline, plan, piece: Piece) -> None:
    cfg: Config = pipeline.score
    info = plan[NAME].info[piece.artifact.key]
    block = int(piece.fpath.stem.removeprefix("block"))
    k_start = block * info["block_size"]
    k_stop = min(info["d_sae"], k_start + info["block_size"])

    dump_art = plan["dump"].artifacts[0]
    mask_art = plan["mask"].artifacts[0]
    sae_art = artifacts.Artifact(pipeline.root, "train", info["sae"])
    acts_ND, labels_N = load_kept(dump_art.dpath, mask_art.dpath, info["layer"])
    n_classes = len(Shards(dump_art.dpath).metadata.class_names)

    device = helpers.get_device(cfg.device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    sae = nn.load(sae_art.dpath, device=device)
    scores_NK = encode_block(sae, acts_ND, k_start, k_stop, batch_size=cfg.batch_size, device=device)
    ap_CK = ap.average_precision(scores_NK, torch.from_numpy(labels_N).to(device), n_classes=n_classes)

    with artifacts.atomic_path(piece.fpath) as tmp_fpath:
        safetensors.numpy.save_file(
            {
                "ap_CK": ap_CK.cpu().numpy(),
                "min_K": scores_NK.amin(dim=0).cpu().numpy(),
                "max_K": scores_NK.amax(dim=0).cpu().numpy(),
                "k_range": np.array([k_start, k_stop], dtype=np.int64),
            },
            str(tmp_fpath),
            metadata={"sae": info["sae"], "matmul_precision": cfg.matmul_precision},
        )


@torch.inference_mode()
def encode_block(
    sae: nn.SparseAutoencoder,
    acts_ND: np.ndarray,
    k_start: int,
    k_stop: int,
    *,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Latents [k_start, k_stop) of the SAE for every row of acts_ND, as float32 [N, k_stop - k_start]."""
    n = len(acts_ND)
    out = torch.empty((n, k_stop - k_start), dtype=torch.float32, device=device)
    for start in range(0, n, batch_size):
        x_BD = torch.from_numpy(np.ascontiguousarray(acts_ND[start : start + batch_size])).to(device)
        out[start : start + len(x_BD)] = sae.encode(x_BD, latents=slice(k_start, k_stop))
    return out


class Partials(typing.NamedTuple):
    """Every block of one SAE's score artifact, concatenated."""

    ap_CK: np.ndarray
    """float64 [C, d_sae] AP of every latent for every class."""
    min_K: np.ndarray
    """float32 [d_sae] lowest score of each latent over the kept patches."""
    max_K: np.ndarray
    """float32 [d_sae] highest score; equal to min_K for a constant (dead) latent."""


def read_partials(art: artifacts.Artifact, d_sae: int) -> Partials:
    """Concatenate every block partial of a score artifact, checking that the blocks tile [0, d_sae)."""
    fpaths = sorted((art.dpath / "partials").glob("block*.safetensors"))
    blocks, covered = [], 0
    for fpath in fpaths:
        tensors = safetensors.numpy.load_file(str(fpath))
        k_start, k_stop = (int(x) for x in tensors["k_range"])
        if k_start != covered:
            raise artifacts.IncompleteArtifactError(
                f"{art.ref}: partial {fpath.name} starts at latent {k_start}, expected {covered}"
            )
        blocks.append(tensors)
        covered = k_stop
    if covered != d_sae:
        raise artifacts.IncompleteArtifactError(f"{art.ref}: partials cover {covered} of {d_sae} latents")
    return Partials(*(np.concatenate([b[name] for b in blocks], axis=-1) for name in Partials._fields))


def manifest_extra(pipeline, art: artifacts.Artifact) -> dict[str, object]:
    return {"matmul_precision": pipeline.score.matmul_precision}
