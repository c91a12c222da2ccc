"""score: exact AP and the 1-D logistic probe of every SAE latent ("prototype") for every class, over the kept
patches of the select split, in K-blocks.

One artifact per SAE, `<root>/score/<key>/`, with one partial per K-block in `partials/blockNNNNN.safetensors`
holding `ap_CK` (float64 [C, block]), `min_K` and `max_K` (each latent's lowest and highest score over the kept
patches; equal = a constant, dead latent) and `k_range` ([k_start, k_stop)); the format is `saev.scoring`'s. Each
block is one piece of work (one task of a job array on Slurm); the artifact is sealed when every block exists.

Block size: a fixed number of latents, or "auto": as many latents as fit the memory budget, given the number of
kept patches (the block's float32 scores [N, block] dominate; the AP engine bounds its own working memory).

What a block costs is its own columns, for every activation rule:
- The kept patches' activations of the SAE's layer are an input: the kept artifact (`stages.kept`,
  `<root>/kept/<key>/acts.npy`), checked like every input before a task starts, then memory-mapped; a task reads no
  shard.
- ReLU and JumpReLU (BatchTopK, Matryoshka) latents are per-latent rules: a block computes its columns only.
- A TopK SAE's selected latents (each kept row's k largest pre-activations, as indices) are found once per SAE
  by the first block task that needs them (under the artifact's lock `.lock-topk`: one pass over all blocks'
  matmuls, about one block's matmul per block) into `topk_latents.safetensors` of the score artifact
  (`saev.scoring.topk_latents`); every block then computes its own columns and keeps the selected ones
  (`saev.nn.TopK.select`): TopK's rule, with a selection that does not depend on where a block runs. The file is
  part of the score artifact (listed in its manifest when sealed, so `--verify` checks it), and its checksum is
  checked before a block uses it.
"""

import dataclasses
import functools
import logging
import math
import typing

import numpy as np
import torch

from saev import artifacts, atomic, checksums, helpers, keepmask, methods, nn, scoring
from saev.data.shards import Shards
from saev.engine.plan import Piece, StagePlan

from .graph import DumpInfo, KeptInfo, MaskInfo, ScoreInfo, TrainInfo, role

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

NAME = "score"
VERSION = 4  # 3: the kept activations are an input of their own (kept); keys hash it; 4: partials hold probes

logger = logging.getLogger("stages.score")

check = None
"""No checks before submission beyond the plan's."""
finalize = None
"""Nothing to join: the partials are the artifact."""
slurm_resources = explain_key = None


class Inputs(typing.NamedTuple):
    """What scoring reads."""

    dump: StagePlan[DumpInfo]
    """The dumps; the one of the select role gives the class names and per-patch labels."""
    train: StagePlan[TrainInfo]
    """The SAEs, one score artifact each."""
    mask: StagePlan[MaskInfo]
    """The keep-mask: which patches are scored (their labels)."""
    kept: StagePlan[KeptInfo]
    """The kept patches' activations, one artifact per layer."""


@dataclasses.dataclass(frozen=True)
class Config:
    """How latents are scored."""

    block_size: int | typing.Literal["auto"] = "auto"
    """Latents per K-block (one partial file and one job-array task each), or "auto" to size blocks from memory_gb."""
    memory_gb: float = artifacts.unhashed(4.0)
    """Memory budget of one scoring task (GPU memory when scoring on a GPU), used by block_size = "auto"."""
    probes: bool = True
    """Fit every (class, latent) 1-D logistic probe beside the AP (`saev.probe`): what `[reduce] select = "probe"` and
    the table's Probe R need; false scores AP only, many times faster (the table is then not written)."""
    matmul_precision: typing.Literal["highest", "high", "medium"] = "highest"
    """torch float32 matmul precision for the latent scores; TF32/bf16 change scores and so ties, hence hashed."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    batch_size: int = artifacts.unhashed(16_384)
    """Patches per encoder matmul (memory only: which latents a TopK SAE keeps does not depend on it; on some BLAS
    paths a score may differ in its last bit between batch sizes, as between devices)."""

    def __post_init__(self):
        if self.block_size != "auto" and self.block_size <= 0:
            raise ValueError(f'score.block_size must be positive or "auto", got {self.block_size}')
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


def plan(pipeline: "Pipeline", inputs: Inputs) -> StagePlan[ScoreInfo]:
    cfg: Config = pipeline.score
    dump_ref = role(inputs.dump, "select")[0].ref
    mask_ref = inputs.mask.artifact.ref
    n_rows = inputs.mask.record.max_kept
    kept_by_layer = {kept.layer: key for key, kept in inputs.kept.info.items()}
    arts, pieces, all_params, all_inputs = [], [], {}, {}
    info: dict[str, ScoreInfo] = {}
    for train_art in inputs.train.artifacts:
        train_info = inputs.train.info[train_art.key]
        kept_art = inputs.kept.by_key(kept_by_layer[train_info.layer])
        refs = {"dump": dump_ref, "mask": mask_ref, "kept": kept_art.ref, "sae": train_art.ref}
        block_size = get_block_size(cfg, n_rows, train_info.d_sae)
        params = {**artifacts.hashed_params(cfg), "block_size": block_size}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
        n_blocks = math.ceil(train_info.d_sae / block_size)
        arts.append(art)
        all_params[art.key] = params
        all_inputs[art.key] = refs
        info[art.key] = ScoreInfo(
            train_key=train_art.key, kept_key=kept_art.key, d_sae=train_info.d_sae, layer=train_info.layer,
            block_size=block_size,
        )  # fmt: skip
        for block in range(n_blocks):
            label = f"sae {train_art.key} block {block + 1}/{n_blocks}"
            pieces.append(Piece(NAME, art, scoring.partial_fpath(art, block), label))
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)


def load_kept(
    dump_art: artifacts.Artifact, mask_art: artifacts.Artifact, kept_art: artifacts.Artifact
) -> tuple[np.ndarray, np.ndarray]:
    """Activations [n_keep, D] (memory-mapped, read-only, from the kept artifact) and labels [n_keep] of the kept
    patches (cached while their files are unchanged: every block of a job reuses them).

    The kept artifact was checked against its manifest as an input of the task (`saev.engine.job.verify_inputs`);
    the keep-mask and labels are checked where they are read and the kept file by its shape
    (`keepmask.MaskFileError`, `scoring.KeptError` name the bad file), so no bad value reaches the AP engine.
    """
    sigs = []
    for fpath in (kept_art.dpath / scoring.KEPT_FNAME, mask_art.dpath / "keep.npy", dump_art.dpath / "labels.bin"):
        try:
            sigs.append(tuple(checksums.stat_sig(fpath.stat())))
        except OSError:
            sigs.append(())
    return _load_kept(dump_art, mask_art, kept_art, tuple(sigs))


@functools.lru_cache(maxsize=2)
def _load_kept(
    dump_art: artifacts.Artifact, mask_art: artifacts.Artifact, kept_art: artifacts.Artifact, sigs: tuple
) -> tuple[np.ndarray, np.ndarray]:
    shards = Shards(dump_art.dpath)
    keep = keepmask.load_keep(mask_art.dpath, shards)  # checked: in range, labelled, sorted, disjoint from held-out
    labels = np.asarray(shards.labels).reshape(-1)[keep].astype(np.int64)
    return scoring.read_kept(kept_art.dpath / scoring.KEPT_FNAME, len(keep), shards.metadata.d_vit), labels


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
    with art.lock(
        "topk", wait=True, on_wait=lambda: logger.info("%s: another task is finding the TopK latents", art.ref)
    ):
        try:
            return scoring.read_topk(fpath, **expected)
        except scoring.TopkError as err:
            if fpath.exists():
                logger.warning("%s; computing it again", err)
        atomic.remove_temp_files(art.dpath, scoring.TOPK_FNAME)  # we hold its lock: leftovers of a killed job
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


def run(pipeline: "Pipeline", own: StagePlan[ScoreInfo], inputs: Inputs, piece: Piece) -> None:
    cfg: Config = pipeline.score
    info = own.info[piece.artifact.key]
    block = int(piece.fpath.stem.removeprefix("block"))
    k_start = block * info.block_size
    k_stop = min(info.d_sae, k_start + info.block_size)

    dump_art, _ = role(inputs.dump, "select")
    train_art = inputs.train.by_key(info.train_key)
    acts_ND, labels_N = load_kept(dump_art, inputs.mask.artifact, inputs.kept.by_key(info.kept_key))
    n_classes = len(Shards(dump_art.dpath).metadata.class_names)

    device = helpers.get_device(cfg.device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    sae = methods.load_encoder(train_art.dpath, device=device)
    top_Nk = None
    if isinstance(sae, nn.SparseAutoencoder) and isinstance(sae.activation, nn.TopK):
        top_Nk = torch.from_numpy(get_topk(cfg, piece.artifact, info, sae, acts_ND, device))
    block_scores = scoring.score_block(
        sae, acts_ND, labels_N, n_classes, k_start, k_stop, batch_size=cfg.batch_size, device=device, top_Nk=top_Nk,
        probes=cfg.probes,
    )  # fmt: skip
    scoring.write_partial(
        piece.fpath, block_scores, k_start=k_start, k_stop=k_stop, train_key=info.train_key,
        matmul_precision=cfg.matmul_precision,
    )  # fmt: skip


def manifest_extra(pipeline: "Pipeline", art: artifacts.Artifact) -> dict[str, object]:
    return {"matmul_precision": pipeline.score.matmul_precision}
