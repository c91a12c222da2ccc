"""score: exact AP of every SAE latent ("prototype") for every class, over the kept patches, in K-blocks.

One artifact per SAE, `<root>/score/<key>/`, with one partial per K-block in `partials/blockNNNNN.safetensors`
holding `ap_CK` (float64 [C, block]), `min_K` and `max_K` (each latent's lowest and highest score over the kept
patches; equal = a constant, dead latent) and `k_range` ([k_start, k_stop)); the format is `saev.scoring`'s. Each
block is one piece of work (one task of a job array on Slurm); the artifact is sealed when every block exists.

Block size: a fixed number of latents, or "auto": as many latents as fit the memory budget, given the number of
kept patches (the block's float32 scores [N, block] dominate; the AP engine bounds its own working memory).

What a block costs is its own columns, for every activation rule:
- Kept activations are gathered from the dump's shards once per (dump, mask, layer), into a kept artifact
  `<root>/kept/<key>/acts.npy` (float32 [n_keep, d_vit], `saev.scoring.write_kept`), by the first score task that
  needs them (under that artifact's lock); every other task memory-maps the contiguous file (one sequential read,
  shared through the page cache by the tasks of a node) and reads no shard. Its key hashes the layer and the keys
  of the dump and mask; its manifest records a checksum of those two manifests' file lists, so kept activations of
  a dump or mask that was recomputed since are gathered again, as are damaged ones.
- ReLU and JumpReLU (BatchTopK, Matryoshka) latents are per-latent rules: a block computes its columns only.
- A TopK SAE's selected latents (each kept row's k largest pre-activations, as indices) are found once per SAE
  by the first block task that needs them (under the artifact's lock `.lock-topk`: one pass over all blocks'
  matmuls, about one block's matmul per block) into `topk_latents.safetensors` of the score artifact
  (`saev.scoring.topk_latents`); every block then computes its own columns and keeps the selected ones
  (`saev.nn.TopK.select`): TopK's rule, with a selection that does not depend on where a block runs.
"""

import dataclasses
import functools
import logging
import math
import pathlib
import time
import typing

import numpy as np
import torch

from saev import artifacts, checksums, helpers, keepmask, nn, scoring
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
    """Patches per encoder matmul (memory only: which latents a TopK SAE keeps does not depend on it; on some BLAS
    paths a score may differ in its last bit between batch sizes, as between devices)."""

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


KEPT = "kept"
"""Stage name (directory under the root) of the kept-activations artifacts; no stage of its own: the score stage
writes them (see the module docstring)."""
KEPT_VERSION = 1
"""Format version of the kept-activations artifacts, part of their keys."""


def kept_artifact(root: pathlib.Path, dump_ref: str, mask_ref: str, layer: int) -> artifacts.Artifact:
    """The kept artifact of a dump, a mask and a layer: `<root>/kept/<key>/`, its key hashing all three."""
    params = {"layer": layer}
    return artifacts.Artifact(root, KEPT, artifacts.get_key(KEPT, KEPT_VERSION, params, _kept_inputs(dump_ref, mask_ref)))


def _kept_inputs(dump_ref: str, mask_ref: str) -> dict[str, str]:
    return {"dump": dump_ref, "mask": mask_ref}


def _sources(dump_art: artifacts.Artifact, mask_art: artifacts.Artifact) -> str:
    """Checksum of the file lists (sizes and checksums) of the dump's and the mask's manifests: what the kept
    activations were gathered from."""
    files = {art.stage: art.read_manifest()["files"] for art in (dump_art, mask_art)}
    return checksums.bytes_checksum(artifacts.canonical_json(files).encode("utf-8"))


@functools.lru_cache(maxsize=2)
def load_kept(
    dump_art: artifacts.Artifact, mask_art: artifacts.Artifact, layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Activations [n_keep, D] (memory-mapped, read-only) and labels [n_keep] of the kept patches (cached: every
    block of a job reuses them).

    The activations come from the kept artifact of (dump, mask, layer), gathered from the shards first if it is
    missing, damaged or gathered from another dump or mask (under its lock, so a task never reads a half-written
    one). The keep-mask and labels are checked where they are read, the shards' rows when gathered, the kept file by
    its checksum (`Artifact.verify`) and shape (`keepmask.MaskFileError`, `ShardValueError`, `scoring.KeptError`
    name the bad file), so no bad value reaches the AP engine.
    """
    shards = Shards(dump_art.dpath)
    keep = keepmask.load_keep(mask_art.dpath, shards)  # checked: in range, labelled, sorted, disjoint from held-out
    labels = np.asarray(shards.labels).reshape(-1)[keep].astype(np.int64)
    d_vit = shards.metadata.d_vit
    kept = kept_artifact(dump_art.root, dump_art.ref, mask_art.ref, layer)
    fpath = kept.dpath / scoring.KEPT_FNAME
    sources = _sources(dump_art, mask_art)
    with kept.lock(wait=True, on_wait=lambda: logger.info("%s: another task is gathering it; waiting", kept.ref)):
        if kept.check().state != "missing":
            try:
                manifest = kept.verify(params={"layer": layer})
                if manifest.get("sources") == sources:
                    return scoring.read_kept(fpath, len(keep), d_vit), labels
                logger.warning("%s: gathered from another dump or mask (recomputed since); gathering again", kept.ref)
            except (artifacts.IncompleteArtifactError, scoring.KeptError) as err:
                logger.warning("%s; gathering again", err)
            kept.manifest_fpath.unlink(missing_ok=True)
        started, t0 = artifacts.now(), time.perf_counter()
        artifacts.remove_temp_files(kept.dpath)  # we hold its lock: leftovers of a killed job
        scoring.write_kept(fpath, lambda a, b: shards.patches_flat(layer, keep[a:b]), len(keep), d_vit)
        kept.write_manifest(
            params={"layer": layer},
            inputs=_kept_inputs(dump_art.ref, mask_art.ref),
            started=started,
            extra={"sources": sources, "n_rows": len(keep), "d_vit": d_vit},
        )
        logger.info("%s: gathered %d kept rows of layer %d in %.1f s", kept.ref, len(keep), layer, time.perf_counter() - t0)
        return scoring.read_kept(fpath, len(keep), d_vit), labels


def get_topk(
    cfg: Config,
    art: artifacts.Artifact,
    info: ScoreInfo,
    sae: nn.SparseAutoencoder,
    acts_ND: np.ndarray,
    device: torch.device,
) -> np.ndarray:
    """The TopK latents of a score artifact: read (and checked, `scoring.read_topk`), or computed and written
    under the artifact's lock `.lock-topk` by the first block task that needs them while the others wait."""
    if not isinstance(sae.activation, nn.TopK):
        raise TypeError(f"get_topk needs a TopK SAE, not {sae.activation!r}")
    fpath = art.dpath / scoring.TOPK_FNAME
    expected = {
        "n_rows": len(acts_ND), "train_key": info.train_key, "k": sae.activation.k, "d_sae": info.d_sae,
        "matmul_precision": cfg.matmul_precision,
    }  # fmt: skip
    with art.lock("topk", wait=True, on_wait=lambda: logger.info("%s: another task is finding the TopK latents", art.ref)):
        try:
            return scoring.read_topk(fpath, **expected)
        except scoring.TopkError as err:
            if fpath.exists():
                logger.warning("%s; computing it again", err)
        artifacts.remove_temp_files(art.dpath, scoring.TOPK_FNAME)  # we hold its lock: leftovers of a killed job
        progress = helpers.Progress(desc="topk latents", total=len(acts_ND), unit="rows", logger=logger)
        top_Nk = scoring.topk_latents(
            sae, acts_ND, info.block_size, batch_size=cfg.batch_size, device=device, on_rows=progress.update
        )
        progress.finish()
        scoring.write_topk(
            fpath, top_Nk, train_key=info.train_key, d_sae=info.d_sae, block_size=info.block_size,
            batch_size=cfg.batch_size, matmul_precision=cfg.matmul_precision,
        )  # fmt: skip
        return top_Nk.numpy()


def run(pipeline, plan: Plan, piece: Piece) -> None:
    cfg: Config = pipeline.score
    info: ScoreInfo = plan[NAME].info[piece.artifact.key]
    block = int(piece.fpath.stem.removeprefix("block"))
    k_start = block * info.block_size
    k_stop = min(info.d_sae, k_start + info.block_size)

    dump_art = plan["dump"].artifacts[0]
    mask_art = plan["mask"].artifacts[0]
    train_art = artifacts.Artifact(pipeline.root, "train", info.train_key)
    acts_ND, labels_N = load_kept(dump_art, mask_art, info.layer)
    n_classes = len(Shards(dump_art.dpath).metadata.class_names)

    device = helpers.get_device(cfg.device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    sae = nn.load(train_art.dpath, device=device)
    top_Nk = None
    if isinstance(sae.activation, nn.TopK):
        top_Nk = torch.from_numpy(get_topk(cfg, piece.artifact, info, sae, acts_ND, device))
    block_scores = scoring.score_block(
        sae, acts_ND, labels_N, n_classes, k_start, k_stop, batch_size=cfg.batch_size, device=device, top_Nk=top_Nk
    )
    scoring.write_partial(
        piece.fpath, block_scores, k_start=k_start, k_stop=k_stop, train_key=info.train_key,
        matmul_precision=cfg.matmul_precision,
    )  # fmt: skip


def manifest_extra(pipeline, art: artifacts.Artifact) -> dict[str, object]:
    return {"matmul_precision": pipeline.score.matmul_precision}
