"""score: exact AP of every SAE latent ("prototype") for every class, over the kept patches, in K-blocks.

One artifact per SAE, `<root>/score/<key>/`, with one partial per K-block in `partials/blockNNNNN.safetensors`
holding `ap_CK` (float64 [C, block]) and `k_range` ([k_start, k_stop)). Each block is one piece of work (one task of
a job array on Slurm); the artifact is sealed when every block exists.
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
VERSION = 1

logger = logging.getLogger("stages.score")


@dataclasses.dataclass(frozen=True)
class Config:
    """How latents are scored."""

    block_size: int = 1024
    """Latents per K-block: one partial file and one job-array task each."""
    matmul_precision: typing.Literal["highest", "high", "medium"] = "highest"
    """torch float32 matmul precision for the latent scores; TF32/bf16 change scores and so ties, hence hashed."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    batch_size: int = artifacts.unhashed(16_384)
    """Patches per encoder matmul (memory only; results do not depend on it)."""

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError(f"score.block_size must be positive, got {self.block_size}")
        if self.batch_size <= 0:
            raise ValueError(f"score.batch_size must be positive, got {self.batch_size}")


def partial_fpath(art: artifacts.Artifact, block: int) -> pathlib.Path:
    return art.dpath / "partials" / f"block{block:05d}.safetensors"


def plan(pipeline, upstream) -> StagePlan:
    cfg: Config = pipeline.score
    params = artifacts.hashed_params(cfg)
    dump_ref = upstream["dump"].artifacts[0].ref
    mask_ref = upstream["mask"].artifacts[0].ref
    arts, pieces, all_params, all_inputs, info = [], [], {}, {}, {}
    train_plan = upstream["train"]
    for sae_art in train_plan.artifacts:
        sae_info = train_plan.info[sae_art.key]
        inputs = {"dump": dump_ref, "mask": mask_ref, "sae": sae_art.ref}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
        n_blocks = math.ceil(sae_info["d_sae"] / cfg.block_size)
        arts.append(art)
        all_params[art.key] = params
        all_inputs[art.key] = inputs
        info[art.key] = {"sae": sae_art.key, "d_sae": sae_info["d_sae"], "layer": sae_info["layer"]}
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
    k_start = block * cfg.block_size
    k_stop = min(info["d_sae"], k_start + cfg.block_size)

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
            {"ap_CK": ap_CK.cpu().numpy(), "k_range": np.array([k_start, k_stop], dtype=np.int64)},
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


def read_partials(art: artifacts.Artifact, d_sae: int) -> np.ndarray:
    """Concatenate every block partial of a sealed score artifact into ap [C, d_sae] (float64)."""
    fpaths = sorted((art.dpath / "partials").glob("block*.safetensors"))
    blocks, covered = [], 0
    for fpath in fpaths:
        tensors = safetensors.numpy.load_file(str(fpath))
        k_start, k_stop = (int(x) for x in tensors["k_range"])
        if k_start != covered:
            raise artifacts.IncompleteArtifactError(
                f"{art.ref}: partial {fpath.name} starts at latent {k_start}, expected {covered}"
            )
        blocks.append(tensors["ap_CK"])
        covered = k_stop
    if covered != d_sae:
        raise artifacts.IncompleteArtifactError(f"{art.ref}: partials cover {covered} of {d_sae} latents")
    return np.concatenate(blocks, axis=1)


def manifest_extra(pipeline, art: artifacts.Artifact) -> dict[str, object]:
    return {"matmul_precision": pipeline.score.matmul_precision}
