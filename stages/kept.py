"""kept: the activations of the kept patches at one layer, gathered once from the select split's shards for scoring.

Output `<root>/kept/<key>/acts.npy`: float32 [n_keep, d_vit], row i the activations of the i-th kept patch (in the
order of the mask's keep.npy), written by `saev.scoring.write_kept`. One artifact per layer that is scored (each
distinct layer of the train artifacts, in their order), one piece each; its key hashes the layer and the keys of the
dump and the mask. Every score task of the layer memory-maps this contiguous file (one sequential read, shared
through the page cache by the tasks of a node) and reads no shard; like every input, it is checked against its
manifest (and the checksum of a file changed since it was last verified) before a task reads it.
"""

import logging
import time
import typing

from saev import artifacts, keepmask, scoring
from saev.data.shards import Shards
from saev.engine.plan import Piece, StagePlan

from .graph import DumpInfo, KeptInfo, MaskInfo, TrainInfo, role

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

NAME = "kept"
VERSION = 1

logger = logging.getLogger("stages.kept")

Config = None
"""No settings of its own: what it holds follows from the dump, the mask and the layers trained on."""
# No checks before submission beyond the mask's; a single piece per artifact whose `run` writes the manifest.
check = finalize = manifest_extra = slurm_resources = explain_key = None


class Inputs(typing.NamedTuple):
    """What the kept activations are gathered from."""

    dump: StagePlan[DumpInfo]
    """The dumps; the one of the select role holds the activations."""
    train: StagePlan[TrainInfo]
    """The SAEs to be scored: which layers are needed (its artifacts are not read)."""
    mask: StagePlan[MaskInfo]
    """The keep-mask: which patches, in which order."""


def plan(pipeline: "Pipeline", inputs: Inputs) -> StagePlan[KeptInfo]:
    refs = {"dump": role(inputs.dump, "select")[0].ref, "mask": inputs.mask.artifact.ref}
    arts, pieces, all_params, all_inputs, info = [], [], {}, {}, {}
    for layer in dict.fromkeys(train.layer for train in inputs.train.info.values()):
        params = {"layer": layer}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
        arts.append(art)
        pieces.append(Piece(NAME, art, label=f"layer {layer}: at most {inputs.mask.record.max_kept} kept patches"))
        all_params[art.key], all_inputs[art.key], info[art.key] = params, refs, KeptInfo(layer=layer)
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)


def run(pipeline: "Pipeline", own: StagePlan[KeptInfo], inputs: Inputs, piece: Piece) -> None:
    """Gather the kept rows of the layer from the shards (the keep-mask and the rows are checked where they are
    read: `keepmask.MaskFileError` and `ShardValueError` name the bad file), then seal the artifact."""
    started, t0 = artifacts.now(), time.perf_counter()
    art = piece.artifact
    layer = own.info[art.key].layer
    shards = Shards(role(inputs.dump, "select")[0].dpath)
    keep = keepmask.load_keep(inputs.mask.artifact.dpath, shards)  # checked: in range, labelled, sorted, disjoint
    d_vit = shards.metadata.d_vit
    scoring.write_kept(
        art.dpath / scoring.KEPT_FNAME, lambda a, b: shards.patches_flat(layer, keep[a:b]), len(keep), d_vit
    )
    art.write_manifest(
        params=own.params[art.key], inputs=own.inputs[art.key], started=started,
        extra={"n_rows": len(keep), "d_vit": d_vit},
    )  # fmt: skip
    logger.info("%s: gathered %d kept rows of layer %d in %.1f s", art.ref, len(keep), layer, time.perf_counter() - t0)
