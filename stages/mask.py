"""mask: a seeded, exact-size keep-mask over the labelled patches of a dump.

Output `<root>/mask/<key>/keep.npy` and `heldout.npy`: sorted int64 global patch indices
(image * n_patches_per_img + patch). The kept patches select the best latent per class; the disjoint held-out
patches report its AP, so selection and reporting never use the same patches.
"""

import dataclasses
import pathlib
import typing

import numpy as np

from saev import artifacts, keepmask
from saev.data.shards import Shards

from .graph import Piece, StagePlan

NAME = "mask"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Which labelled patches the score stage uses to pick the best latent."""

    n_keep: int | typing.Literal["all"] = 100_000
    """Exactly this many labelled patches are kept (uniformly, without replacement), or "all" of them."""
    n_heldout: int = 0
    """Labelled patches held out (disjoint from the kept ones) to report the AP of each chosen latent; 0 = none."""

    def __post_init__(self):
        if self.n_keep != "all" and self.n_keep <= 0:
            raise ValueError(f"mask.n_keep must be positive or \"all\", got {self.n_keep}")
        if self.n_heldout < 0:
            raise ValueError(f"mask.n_heldout must be >= 0, got {self.n_heldout}")
    seed: int = 0
    """Seed of the draw; the masks depend only on it, the sizes and which patches are labelled."""


def plan(pipeline, upstream):
    dump_art = upstream["dump"].artifacts[0]
    params = artifacts.hashed_params(pipeline.mask)
    inputs = {"dump": dump_art.ref}
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
    piece = Piece(NAME, art, label=f"keep {pipeline.mask.n_keep}, hold out {pipeline.mask.n_heldout} (seed {pipeline.mask.seed})")
    return StagePlan(NAME, (art,), (piece,), {art.key: params}, {art.key: inputs})


def run(pipeline, plan, piece) -> None:
    started = artifacts.now()
    cfg: Config = pipeline.mask
    shards = Shards(plan["dump"].artifacts[0].dpath)
    md = shards.metadata
    labelled_N = np.asarray(shards.labels).reshape(-1) != md.labels_ignore
    n_keep = None if cfg.n_keep == "all" else cfg.n_keep
    masks = keepmask.make_masks(labelled_N, n_keep, cfg.n_heldout, cfg.seed)
    artifacts.atomic_save_npy(piece.artifact.dpath / "keep.npy", masks.keep)
    artifacts.atomic_save_npy(piece.artifact.dpath / "heldout.npy", masks.heldout)
    piece.artifact.write_manifest(
        params=plan[NAME].params[piece.artifact.key],
        inputs=plan[NAME].inputs[piece.artifact.key],
        started=started,
        extra={
            "n_patches": int(labelled_N.size),
            "n_labelled": int(labelled_N.sum()),
            "n_keep": len(masks.keep),
            "n_heldout": len(masks.heldout),
        },
    )


def check(pipeline) -> None:
    """Before anything runs: the masks cannot ask for more patches than the dump will have."""
    from . import dump as dump_stage

    cfg: Config = pipeline.mask
    if cfg.n_keep == "all":
        if cfg.n_heldout:
            raise keepmask.KeepMaskError('mask.n_keep = "all" leaves no patches for mask.n_heldout; set n_heldout = 0')
        return
    n_patches = dump_stage.count_patches(pipeline)
    if cfg.n_keep + cfg.n_heldout > n_patches:
        raise keepmask.KeepMaskError(
            f"mask.n_keep={cfg.n_keep} + mask.n_heldout={cfg.n_heldout} is more than the {n_patches} patches "
            "the dump will have; lower them"
        )


def max_kept(pipeline) -> int:
    """An upper bound on the number of kept patches, known before anything runs (sizes the score blocks)."""
    if pipeline.mask.n_keep != "all":
        return pipeline.mask.n_keep
    from . import dump as dump_stage

    return dump_stage.count_patches(pipeline)


def load_keep(dpath: pathlib.Path, shards: Shards) -> np.ndarray:
    """The sorted global indices of the kept patches of the mask artifact in `dpath`, checked against the dump.

    Both mask files are read and checked (`keepmask.load_masks`): integer, 1-D, strictly increasing, within the
    dump's patches, labelled, and disjoint from the held-out ones. Raises `keepmask.MaskFileError` naming the file.
    """
    return _load_masks(dpath, shards).keep


def load_heldout(dpath: pathlib.Path, shards: Shards) -> np.ndarray:
    """The sorted global indices of the held-out patches (disjoint from the kept ones; may be empty), checked as
    in `load_keep`."""
    return _load_masks(dpath, shards).heldout


def _load_masks(dpath: pathlib.Path, shards: Shards) -> keepmask.Masks:
    md = shards.metadata
    labelled_N = np.asarray(shards.labels).reshape(-1) != md.labels_ignore  # labels are checked when first read
    return keepmask.load_masks(pathlib.Path(dpath), n_patches=md.n_imgs * md.n_patches_per_img, labelled_N=labelled_N)
