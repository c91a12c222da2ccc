"""mask: a seeded, exact-size keep-mask over the labelled patches of a dump.

Output `<root>/mask/<key>/keep.npy` and `heldout.npy`: sorted int64 global patch indices
(image * n_patches_per_img + patch). The kept patches select the best latent per class; the disjoint held-out
patches report its AP, so selection and reporting never use the same patches.
"""

import dataclasses
import typing

import numpy as np

from saev import artifacts, atomic, keepmask
from saev.data.shards import ShardError, Shards
from saev.engine.plan import Piece, StagePlan

from .graph import DumpInfo, MaskInfo

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

NAME = "mask"
VERSION = 1

finalize = None
"""A single piece: `run` writes the manifest."""
manifest_extra = None
"""`run` writes the manifest."""
slurm_resources = explain_key = None


class Inputs(typing.NamedTuple):
    """What the masks are drawn from: the dump's labels."""

    dump: StagePlan[DumpInfo]
    """The dump (its one artifact)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Which labelled patches the score stage uses to pick the best latent."""

    n_keep: int | typing.Literal["all"] = 100_000
    """Exactly this many labelled patches are kept (uniformly, without replacement), or "all" of them."""
    n_heldout: int = 0
    """Labelled patches held out (disjoint from the kept ones) to report the AP of each chosen latent; 0 = none."""
    seed: int = 0
    """Seed of the draw; the masks depend only on it, the sizes and which patches are labelled."""

    def __post_init__(self):
        if self.n_keep != "all" and self.n_keep <= 0:
            raise ValueError(f'mask.n_keep must be positive or "all", got {self.n_keep}')
        if self.n_heldout < 0:
            raise ValueError(f"mask.n_heldout must be >= 0, got {self.n_heldout}")


def plan(pipeline: "Pipeline", inputs: Inputs) -> StagePlan[MaskInfo]:
    params = artifacts.hashed_params(pipeline.mask)
    refs = {"dump": inputs.dump.artifact.ref}
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
    piece = Piece(
        NAME, art, label=f"keep {pipeline.mask.n_keep}, hold out {pipeline.mask.n_heldout} (seed {pipeline.mask.seed})"
    )
    n_patches = inputs.dump.record.n_patches
    # "all" keeps every labelled patch: at most every patch of the dump.
    info = MaskInfo(max_kept=n_patches if pipeline.mask.n_keep == "all" else pipeline.mask.n_keep)
    return StagePlan(NAME, (art,), (piece,), {art.key: params}, {art.key: refs}, {art.key: info})


def run(pipeline: "Pipeline", own: StagePlan[MaskInfo], inputs: Inputs, piece: Piece) -> None:
    started = artifacts.now()
    cfg: Config = pipeline.mask
    shards = Shards(inputs.dump.artifact.dpath)
    md = shards.metadata
    labelled_N = np.asarray(shards.labels).reshape(-1) != md.labels_ignore
    n_keep = None if cfg.n_keep == "all" else cfg.n_keep
    masks = keepmask.make_masks(labelled_N, n_keep, cfg.n_heldout, cfg.seed)
    atomic.atomic_save_npy(piece.artifact.dpath / "keep.npy", masks.keep)
    atomic.atomic_save_npy(piece.artifact.dpath / "heldout.npy", masks.heldout)
    piece.artifact.write_manifest(
        params=own.params[piece.artifact.key],
        inputs=own.inputs[piece.artifact.key],
        started=started,
        extra={
            "n_patches": int(labelled_N.size),
            "n_labelled": int(labelled_N.sum()),
            "n_keep": len(masks.keep),
            "n_heldout": len(masks.heldout),
        },
    )


def check(pipeline: "Pipeline", own: StagePlan[MaskInfo], inputs: Inputs) -> None:
    """Before anything runs: the dump has labels, and the masks cannot ask for more patches than it will have."""
    cfg: Config = pipeline.mask
    info = inputs.dump.record
    if not info.has_labels:
        raise ShardError(
            f"{info.adopted / 'labels.bin'} is missing: the adopted dump has no per-patch labels, which the mask, "
            "score and reduce stages need (train alone runs without them: --stage train --only)"
        )
    n_patches = info.n_patches
    n_keep = None if cfg.n_keep == "all" else cfg.n_keep
    keepmask.check_sizes(n_keep, cfg.n_heldout, n_patches, "patches the dump will have")
