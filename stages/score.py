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
    """Activations [n_keep, D] and labels [n_keep] of the kept patches (cached: every block of a job reuses them).

    The keep-mask, the labels and the gathered activations are checked where they are read (a bad file raises an
    error naming it: `keepmask.MaskFileError`, `ShardValueError`), so no bad value reaches the AP engine.
    """
    shards = Shards(dump_dpath)
    keep = mask_stage.load_keep(mask_dpath, shards)  # checked: in range, labelled, sorted, disjoint from held-out
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

    tensors = {
        "ap_CK": ap_CK.cpu().numpy(),
        "min_K": scores_NK.amin(dim=0).cpu().numpy(),
        "max_K": scores_NK.amax(dim=0).cpu().numpy(),
        "k_range": np.array([k_start, k_stop], dtype=np.int64),
    }
    metadata = {"sae": info["sae"], "matmul_precision": cfg.matmul_precision}
    # Serialised in memory, written by our own atomic writer: checksummed, umask permissions, a full disk is a
    # WriteError naming the file (safetensors' own file writer gives 0600 files and its own error type).
    artifacts.atomic_write_bytes(piece.fpath, safetensors.numpy.save(tensors, metadata=metadata))


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


class PartialError(artifacts.IncompleteArtifactError):
    """A score partial is missing, unreadable, or does not hold what its artifact implies; the message names it."""


_PARTIAL_DTYPES = {"ap_CK": np.float64, "min_K": np.float32, "max_K": np.float32, "k_range": np.int64}
"""Every tensor of a partial file and its dtype (nothing else may be in the file)."""


def read_partials(
    art: artifacts.Artifact, d_sae: int, block_size: int, sae_key: str, counts_C: np.ndarray
) -> Partials:
    """Read and check exactly the partials that tile [0, d_sae) of a score artifact, and concatenate them.

    Block b is `partials/block{b:05d}.safetensors` and covers latents [b * block_size, min(d_sae, (b + 1) *
    block_size)). Other files in partials/ are not read. Each file must hold exactly ap_CK (float64 [C, block]),
    min_K and max_K (float32 [block], finite, min <= max) and k_range (int64, the block's range), record
    `sae_key` as its "sae" metadata, and have APs within [0, 1]; an AP row is NaN exactly when its class has no
    kept patch (counts_C[c] == 0), and then wholly NaN.

    Args:
        art: the score artifact.
        d_sae: latents of its SAE.
        block_size: latents per block (the score plan's `block_size`).
        sae_key: key of the train artifact the partials must come from.
        counts_C: int [C] kept patches of each class; C is the number of classes.

    Raises:
        PartialError: naming the file and what is wrong with it (missing, corrupt, from another SAE, ...).
    """
    counts_C = np.asarray(counts_C)
    n_classes = len(counts_C)
    empty_C = counts_C == 0
    blocks = []
    for block in range(math.ceil(d_sae / block_size)):
        fpath = partial_fpath(art, block)
        k_start, k_stop = block * block_size, min(d_sae, (block + 1) * block_size)
        tensors = _read_partial(fpath, sae_key)
        width = k_stop - k_start
        shapes = {"ap_CK": (n_classes, width), "min_K": (width,), "max_K": (width,), "k_range": (2,)}
        for name, shape in shapes.items():
            if tensors[name].shape != shape:
                raise PartialError(f"{fpath}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        got_range = [int(x) for x in tensors["k_range"]]
        if got_range != [k_start, k_stop]:
            raise PartialError(f"{fpath}: k_range is {got_range}, expected [{k_start}, {k_stop}]")
        ap_CK, min_K, max_K = tensors["ap_CK"], tensors["min_K"], tensors["max_K"]
        nan_CK = np.isnan(ap_CK)
        out_of_range = ~nan_CK & ((ap_CK < 0) | (ap_CK > 1))
        if out_of_range.any():
            c, k = (int(x) for x in np.argwhere(out_of_range)[0])
            raise PartialError(
                f"{fpath}: AP {float(ap_CK[c, k])} of class {c}, latent {k_start + k} is not within [0, 1]"
            )
        wrong_nan_C = ~empty_C & nan_CK.any(axis=1)
        if wrong_nan_C.any():
            c = int(np.flatnonzero(wrong_nan_C)[0])
            k = int(np.flatnonzero(nan_CK[c])[0])
            raise PartialError(
                f"{fpath}: AP of class {c}, latent {k_start + k} is NaN but the class has {int(counts_C[c])} kept "
                "patches (NaN means a class without any)"
            )
        wrong_number_C = empty_C & ~nan_CK.all(axis=1)
        if wrong_number_C.any():
            c = int(np.flatnonzero(wrong_number_C)[0])
            k = int(np.flatnonzero(~nan_CK[c])[0])
            raise PartialError(
                f"{fpath}: class {c} has no kept patches but latent {k_start + k} has AP {float(ap_CK[c, k])} "
                "(expected NaN); it was scored on another mask"
            )
        bad_K = ~np.isfinite(min_K) | ~np.isfinite(max_K) | (min_K > max_K)
        if bad_K.any():
            k = int(np.flatnonzero(bad_K)[0])
            raise PartialError(
                f"{fpath}: latent {k_start + k} has min {float(min_K[k])} and max {float(max_K[k])} "
                "(expected finite, min <= max)"
            )
        blocks.append(tensors)
    return Partials(*(np.concatenate([b[name] for b in blocks], axis=-1) for name in Partials._fields))


def _read_partial(fpath: pathlib.Path, sae_key: str) -> dict[str, np.ndarray]:
    """The tensors of one partial file, checked for their names, dtypes and "sae" metadata."""
    remedy = "delete it and rerun `--stage score`"
    if not fpath.is_file():
        raise PartialError(f"{fpath} is missing; rerun `--stage score`")
    try:
        with safetensors.safe_open(str(fpath), framework="numpy") as fd:
            metadata = fd.metadata() or {}
            names = set(fd.keys())
            if names != set(_PARTIAL_DTYPES):
                raise PartialError(
                    f"{fpath}: holds tensors {sorted(names)}, expected {sorted(_PARTIAL_DTYPES)}; {remedy}"
                )
            tensors = {name: fd.get_tensor(name) for name in _PARTIAL_DTYPES}
    except PartialError:
        raise
    except Exception as err:  # safetensors raises SafetensorError (or others) on a corrupt header or short file
        raise PartialError(f"{fpath} is not a readable safetensors file ({err}); {remedy}") from None
    if metadata.get("sae") != sae_key:
        raise PartialError(
            f"{fpath}: scores SAE {metadata.get('sae')!r}, expected {sae_key!r} (a partial of another SAE); {remedy}"
        )
    for name, dtype in _PARTIAL_DTYPES.items():
        if tensors[name].dtype != dtype:
            raise PartialError(f"{fpath}: {name} has dtype {tensors[name].dtype}, expected {np.dtype(dtype)}; {remedy}")
    return tensors


def manifest_extra(pipeline, art: artifacts.Artifact) -> dict[str, object]:
    return {"matmul_precision": pipeline.score.matmul_precision}
