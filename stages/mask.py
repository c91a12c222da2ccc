"""mask: a seeded, exact-size keep-mask over the labelled patches of the select split's dump.

Output `<root>/mask/<key>/keep.npy` and `heldout.npy`: sorted int64 global patch indices
(image * n_patches_per_img + patch). The kept patches select the best latent per class. In a one-dataset config the
disjoint held-out patches report its AP, so selection and reporting never use the same patches; with a
`[data.report]` split, that split reports (scored whole) and `n_heldout` must be 0.
"""

import dataclasses
import typing

import numpy as np

from saev import artifacts, atomic, configs, keepmask
from saev.data import datasets
from saev.data.shards import ShardError, Shards
from saev.engine.plan import Piece, StagePlan

from .graph import DumpInfo, MaskInfo, role

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
    """What the masks are drawn from: the select split's labels."""

    dump: StagePlan[DumpInfo]
    """The dumps; the mask reads the one of the select role."""


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
    select_art, select = role(inputs.dump, "select")
    refs = {"dump": select_art.ref}
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
    piece = Piece(
        NAME, art, label=f"keep {pipeline.mask.n_keep}, hold out {pipeline.mask.n_heldout} (seed {pipeline.mask.seed})"
    )
    n_patches = select.n_patches
    # "all" keeps every labelled patch: at most every patch of the dump.
    info = MaskInfo(max_kept=n_patches if pipeline.mask.n_keep == "all" else pipeline.mask.n_keep)
    return StagePlan(NAME, (art,), (piece,), {art.key: params}, {art.key: refs}, {art.key: info})


def run(pipeline: "Pipeline", own: StagePlan[MaskInfo], inputs: Inputs, piece: Piece) -> None:
    started = artifacts.now()
    cfg: Config = pipeline.mask
    shards = Shards(role(inputs.dump, "select")[0].dpath)
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
    """Before anything runs: the select split has labels, the masks cannot ask for more patches than it will have,
    and nothing is held out of it when a report split reports."""
    cfg: Config = pipeline.mask
    _, info = role(inputs.dump, "select")
    if pipeline.data is not None and cfg.n_heldout:
        raise configs.ConfigError(
            f"mask.n_heldout = {cfg.n_heldout}: with [data.report] the report split is scored whole and nothing is "
            "held out of the select split; remove mask.n_heldout (it splits the one dataset of a one-dataset config)"
        )
    if not info.has_labels and info.adopted is not None:
        raise ShardError(
            f"{info.adopted / 'labels.bin'} is missing: the adopted dump has no per-patch labels, which the mask, "
            "score and reduce stages need (train alone runs without them: --stage train --only)"
        )
    if not info.has_labels:
        raise configs.ConfigError(
            f"the dataset ({datasets.describe(info.data)}) has no labels, which the mask, score and reduce stages "
            "need: give labelled select and report splits as [data.select] and [data.report] with this one as "
            "[data.corpus] (train alone runs without them: --stage train --only)"
        )
    n_patches = info.n_patches
    n_keep = None if cfg.n_keep == "all" else cfg.n_keep
    keepmask.check_sizes(n_keep, cfg.n_heldout, n_patches, "patches the dump will have")
