"""train: a sweep of SAEs on the dumped activations of one layer; each SAE is its own artifact.

The sweep is a TOML file whose list values expand to a grid (see `saev.sweep`). Output per SAE,
`<root>/train/<key>/`: `sae.safetensors` (weights, scale folded in so the SAE applies to raw activations),
`sae.json` (its config) and `metrics.json` (MSE, normalized MSE, L0, dead and dense fractions on held-out rows).
"""

import dataclasses
import logging
import pathlib

from saev import artifacts, helpers, nn, sweep, training, vit
from saev.data.shards import Shards

from .graph import Piece, StagePlan

NAME = "train"
VERSION = 1

logger = logging.getLogger("stages.train")


@dataclasses.dataclass(frozen=True)
class Config:
    """Which SAEs to train, on which layer."""

    sweep: pathlib.Path = artifacts.unhashed(pathlib.Path("sweeps/demo.toml"))
    """Sweep TOML file (relative to the pipeline config's directory); its expanded contents, not its path, are hashed."""
    layer: int = -1
    """ViT layer whose patch activations the SAEs learn (a value of dump.vit.layers; negative counts from the end of the ViT)."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""


def get_layer(pipeline) -> int:
    """The train layer as a non-negative block index, checked against the dumped layers."""
    model = pipeline.dump.vit.model
    (layer,) = vit.resolve_layers(model, (pipeline.train.layer,))
    dumped = vit.resolve_layers(model, pipeline.dump.vit.layers)
    if layer not in dumped:
        raise ValueError(
            f"train.layer={pipeline.train.layer} (block {layer}) is not among the dumped layers "
            f"dump.vit.layers={list(pipeline.dump.vit.layers)}"
        )
    return layer


def get_sweep(pipeline) -> list[training.TrainConfig]:
    """The expanded sweep with the SAE input width taken from the ViT config."""
    fpath = pipeline.config_dpath / pipeline.train.sweep
    d_vit = vit.get_d_vit(pipeline.dump.vit.model)
    return sweep.load_sweep(fpath, training.TrainConfig, defaults={"sae.d_vit": d_vit})


def plan(pipeline, upstream) -> StagePlan:
    dump_ref = upstream["dump"].artifacts[0].ref
    layer = get_layer(pipeline)
    arts, pieces, all_params, all_inputs, info = [], [], {}, {}, {}
    for train_cfg in get_sweep(pipeline):
        params = {"sae": artifacts.hashed_params(train_cfg), "layer": layer}
        inputs = {"dump": dump_ref}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
        if art.key in info:
            continue  # the same SAE twice in a sweep is trained once
        arts.append(art)
        all_params[art.key] = params
        all_inputs[art.key] = inputs
        info[art.key] = {"config": train_cfg, "d_sae": train_cfg.sae.d_sae, "layer": layer}
        label = (
            f"d_sae={train_cfg.sae.d_sae} l1={train_cfg.l1_coeff:g} lr={train_cfg.lr:g} seed={train_cfg.sae.seed}"
        )
        pieces.append(Piece(NAME, art, label=label))
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)


def run(pipeline, plan, piece: Piece) -> None:
    started = artifacts.now()
    art = piece.artifact
    info = plan[NAME].info[art.key]
    train_cfg: training.TrainConfig = info["config"]
    shards = Shards(plan["dump"].artifacts[0].dpath)
    acts_ND = shards.patches(info["layer"], 0, shards.n_imgs).reshape(-1, shards.metadata.d_vit)
    device = helpers.get_device(pipeline.train.device)
    result = training.train(train_cfg, acts_ND, device=device)
    nn.save(result.sae, art.dpath)
    artifacts.atomic_write_json(art.dpath / "metrics.json", dataclasses.asdict(result.metrics))
    art.write_manifest(
        params=plan[NAME].params[art.key],
        inputs=plan[NAME].inputs[art.key],
        started=started,
        extra={"metrics": dataclasses.asdict(result.metrics), "device": str(device)},
    )
    logger.info("trained %s: %s", art.ref, result.metrics)
