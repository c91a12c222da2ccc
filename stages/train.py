"""train: a sweep of SAEs on the dumped activations of one layer; each SAE is its own artifact.

The sweep is a TOML file whose list values expand to a grid (see `saev.sweep`). SAEs that can share a data stream
(same shape, objective, batch size, number of examples, data seed and loader sizes) form a group, trained together
with batched matmuls in one job (one piece of work), on one stream of shuffled batches read from the dump's shards
(`saev.data.loader`: large contiguous reads on a background thread, shuffled in a RAM buffer). Output per SAE,
`<root>/train/<key>/`: `sae.safetensors` (weights, scale folded in so the SAE applies to raw activations),
`sae.json` (its config and activation rule) and `metrics.json` (MSE, normalized MSE, L0, dead and dense fractions
on held-out rows).

Training saves a checkpoint every `checkpoint_every` steps and when asked to (Slurm's pre-timeout signal, see
`stages.pipeline.run_pieces`); a rerun or a requeued job resumes from it and ends with the same weights.
"""

import dataclasses
import logging
import pathlib

from saev import artifacts, helpers, nn, sweep, training, vit
from saev.data import loader
from saev.data.shards import Shards

from .graph import DumpInfo, Piece, Plan, StagePlan, TrainInfo

NAME = "train"
VERSION = 3  # 2: batches from saev.data.loader (chunked windows); 3: one config class per objective (params nest)

logger = logging.getLogger("stages.train")

# No checks before submission beyond the plan's (the sweep and layer are read while planning); `run` seals each SAE.
check = finalize = manifest_extra = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Which SAEs to train, on which layer."""

    sweep: pathlib.Path = artifacts.unhashed(pathlib.Path("sweeps/demo.toml"))
    """Sweep TOML file (relative to the pipeline config's directory); its expanded contents, not its path, are hashed."""
    layer: int = -1
    """ViT layer whose patch activations the SAEs learn (a value of dump.vit.layers; negative counts from the end of the ViT)."""
    max_group: int = artifacts.unhashed(16)
    """At most this many SAEs trained together in one job (GPU memory); results do not depend on it."""
    checkpoint_every: int = artifacts.unhashed(1000)
    """Save the training state every this many steps (and on Slurm's pre-timeout signal)."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    def __post_init__(self):
        for name in ("max_group", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")


def get_layer(pipeline, dump: DumpInfo) -> int:
    """The train layer as a non-negative block index, checked against the dumped layers (an adopted dump: one of the
    layers its metadata.json lists, as listed; there is no model to count negative indices from)."""
    if dump.adopted is not None:
        if pipeline.train.layer not in dump.layers:
            raise ValueError(
                f"train.layer={pipeline.train.layer} is not among the layers of the adopted dump "
                f"{dump.adopted / 'metadata.json'}: layers={list(dump.layers)}"
            )
        return pipeline.train.layer
    model = pipeline.dump.vit.model
    (layer,) = vit.resolve_layers(model, (pipeline.train.layer,))
    if layer not in dump.layers:
        raise ValueError(
            f"train.layer={pipeline.train.layer} (block {layer}) is not among the dumped layers "
            f"dump.vit.layers={list(pipeline.dump.vit.layers)}"
        )
    return layer


def get_sweep(pipeline, d_vit: int) -> list[training.TrainConfig]:
    """The expanded sweep with the SAE input width `d_vit` (the dump's), each distinct SAE once, in sweep order."""
    fpath = pipeline.config_dpath / pipeline.train.sweep
    if not fpath.exists() and not pipeline.train.sweep.is_absolute():
        raise sweep.SweepError(
            f"sweep file not found: {fpath} ([train] sweep = \"{pipeline.train.sweep}\" is relative to the config's "
            f"directory {pipeline.config_dpath}: copy the sweep file there too, or give its absolute path)"
        )
    expanded = sweep.load_sweep(fpath, training.TrainConfig, defaults={"sae.d_vit": d_vit})
    distinct = list(dict.fromkeys(expanded))
    if len(distinct) < len(expanded):
        logger.warning(
            "%s expands to %d configs but only %d distinct SAEs: a value was repeated, or an objective's field "
            "was swept alongside an objective that does not read it (it applies to the others only)",
            fpath, len(expanded), len(distinct),
        )  # fmt: skip
    return distinct


def describe(cfg: training.TrainConfig) -> str:
    fields = ", ".join(f"{f.name}={getattr(cfg.objective, f.name)}" for f in dataclasses.fields(cfg.objective))
    return f"{cfg.objective.kind}({fields}) d_sae={cfg.sae.d_sae} lr={cfg.lr:g} seed={cfg.sae.seed}"


MAX_EVAL_SHARE = 0.5
"""Warn when an SAE's `n_eval` held-out rows are at least this share of the dump's patches (too few left to train on)."""
MAX_EPOCHS = 100
"""Warn when an SAE would see each training row this many times or more (n_train / (patches - n_eval)): it
memorises a small dump rather than learning features."""


def warn_small_data(cfgs: list[training.TrainConfig], n_rows: int) -> list[str]:
    """Why the dump is too small for these SAEs (one message per distinct problem; logged as warnings by `plan`):
    `n_eval` takes `MAX_EVAL_SHARE` of the rows or more, or training repeats each row `MAX_EPOCHS` times or more."""
    out: list[str] = []
    for cfg in cfgs:
        n_fit = n_rows - cfg.n_eval
        if cfg.n_eval >= MAX_EVAL_SHARE * n_rows:
            msg = (
                f"n_eval={cfg.n_eval} held-out rows are {cfg.n_eval / n_rows:.0%} of the {n_rows} patches the dump "
                f"will have (>= {MAX_EVAL_SHARE:.0%}): {max(n_fit, 0)} rows are left to train on; lower n_eval in "
                "the sweep or dump more images"
            )
        elif cfg.n_train / n_fit >= MAX_EPOCHS:
            msg = (
                f"n_train={cfg.n_train} visits each of the {n_fit} training rows ({n_rows} patches minus "
                f"n_eval={cfg.n_eval}) {cfg.n_train / n_fit:.0f} times (>= {MAX_EPOCHS} epochs): the SAE can "
                "memorise them; lower n_train in the sweep or dump more images"
            )
        else:
            continue
        if msg not in out:
            out.append(msg)
    return out


def plan(pipeline, upstream: Plan) -> StagePlan[TrainInfo]:
    dump_ref = upstream["dump"].artifacts[0].ref
    dump_info: DumpInfo = upstream["dump"].info[upstream["dump"].artifacts[0].key]
    layer = get_layer(pipeline, dump_info)
    arts, all_params, all_inputs = [], {}, {}
    info: dict[str, TrainInfo] = {}
    by_cfg: dict[training.TrainConfig, artifacts.Artifact] = {}
    for train_cfg in get_sweep(pipeline, dump_info.d_vit):
        params = {"sae": artifacts.hashed_params(train_cfg), "layer": layer}
        inputs = {"dump": dump_ref}
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
        if art.key in info:
            continue  # the same SAE twice in a sweep is trained once
        arts.append(art)
        by_cfg[train_cfg] = art
        all_params[art.key] = params
        all_inputs[art.key] = inputs
        info[art.key] = TrainInfo(config=train_cfg, d_sae=train_cfg.sae.d_sae, layer=layer)
    n_rows = dump_info.n_patches
    for msg in warn_small_data([i.config for i in info.values()], n_rows):
        logger.warning("the data is small for the sweep: %s", msg)
    pieces = []
    for group in training.group(list(by_cfg), max_size=pipeline.train.max_group):
        group_arts = [by_cfg[cfg] for cfg in group]
        label = describe(group[0]) if len(group) == 1 else f"group of {len(group)}: {describe(group[0])}, ..."
        pieces.append(Piece(NAME, group_arts[0], label=label, also=tuple(group_arts[1:])))
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)


def run(pipeline, plan: Plan, piece: Piece) -> None:
    started = artifacts.now()
    todo = [art for art in (piece.artifact, *piece.also) if not art.is_done()]
    infos = [plan[NAME].info[art.key] for art in todo]
    # Rows stream from the shards on disk (the layer is never loaded whole; see saev.data.loader).
    rows = loader.ShardRows(Shards(plan["dump"].artifacts[0].dpath), infos[0].layer)
    device = helpers.get_device(pipeline.train.device)
    # The checkpoint lives beside the group's first SAE as a dot-file: never part of an artifact.
    checkpoint_fpath = todo[0].dpath / ".checkpoint.safetensors"
    results = training.train_group(
        [info.config for info in infos],
        rows,
        device=device,
        checkpoint_fpath=checkpoint_fpath,
        checkpoint_every=pipeline.train.checkpoint_every,
    )
    for art, result in zip(todo, results):
        nn.save(result.sae, art.dpath)
        metrics = dataclasses.asdict(result.metrics)
        artifacts.atomic_write_json(art.dpath / "metrics.json", metrics)
        art.write_manifest(
            params=plan[NAME].params[art.key],
            inputs=plan[NAME].inputs[art.key],
            started=started,
            extra={"metrics": metrics, "device": str(device), "group": [a.key for a in todo]},
        )
        logger.info("trained %s: nmse %.4f, l0 %.1f, dead %.3f", art.ref, result.metrics.nmse, result.metrics.l0, result.metrics.dead_frac)
    checkpoint_fpath.unlink(missing_ok=True)
