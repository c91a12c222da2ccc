"""train: a sweep of SAEs on the corpus's dumped activations, at one layer or several; each SAE is its own artifact.

The SAEs are fit on the corpus dump (`[data.corpus]`, or the one dataset of a one-dataset config). With `layers`, the
whole sweep is trained on each listed layer (one SAE per layer and sweep point, each recording its layer).

The sweep is a TOML file whose list values expand to a grid (see `saev.sweep`). SAEs that can share a data stream
(same shape, objective, batch size, number of examples, data seed and loader sizes) form a group, trained together
with batched matmuls in one job (one piece of work), on one stream of shuffled batches read from the dump's shards
(`saev.data.loader`: large contiguous reads on a background thread, shuffled in a RAM buffer). Output per SAE,
`<root>/train/<key>/`: `sae.safetensors` (weights, scale folded in so the SAE applies to raw activations),
`sae.json` (its config and activation rule) and `metrics.json` (MSE, normalized MSE, L0, dead and dense fractions
on held-out rows: the corpus's last `n_eval` rows, never trained on; with `[data.corpus_eval]`, `n_eval` rows spread
evenly over that dump instead, which is then an input of the SAE).

SAEs trained elsewhere are scored the same way: each entry of `imports` (a saev `sae.pt`, v1 or 2.x, or a directory
with our `sae.json` + `sae.safetensors`) becomes a train artifact of its own, keyed by the file's content checksum, the
conversion version (`saev.sae_files`), the layer it reads and the dump (an input, like a trained SAE's), holding the
converted SAE and `metrics.json` measured on the last `IMPORT_EVAL_ROWS` patches of the dump (with `n_steps` 0).
`sweep = ""` trains nothing.

Training saves a checkpoint every `checkpoint_every` steps and when asked to (Slurm's pre-timeout signal, see
`saev.engine.job.run_pieces`); a rerun or a requeued job resumes from it and ends with the same weights.
"""

import dataclasses
import functools
import logging
import pathlib
import typing

import numpy as np
import torch

from saev import artifacts, atomic, checksums, configs, helpers, methods, nn, sae_files, sweep, training, vit
from saev.data import loader
from saev.data.shards import Shards
from saev.engine.plan import Piece, StagePlan

from .graph import DumpInfo, ImportInfo, MethodRun, TrainInfo, corpus_eval, role

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

NAME = "train"
VERSION = 3  # 2: batches from saev.data.loader (chunked windows); 3: one config class per objective (params nest)

logger = logging.getLogger("stages.train")

# No checks before submission beyond the plan's (the sweep and layer are read while planning); `run` seals each SAE.
check = finalize = manifest_extra = slurm_resources = explain_key = None


class Inputs(typing.NamedTuple):
    """What training reads: the corpus's activations (and the corpus_eval's, when there is one)."""

    dump: StagePlan[DumpInfo]
    """The dumps; training reads the one of the corpus role (and of corpus_eval)."""


@dataclasses.dataclass(frozen=True)
class SaeImport:
    """An existing SAE checkpoint to score, instead of training one."""

    path: pathlib.Path
    """A saev `sae.pt` (v1 or 2.x), or a directory with our `sae.json` + `sae.safetensors` (e.g. a train artifact);
    relative to the pipeline config's directory."""
    layer: int | None = None
    """ViT layer the SAE reads (a value of dump.vit.layers; negative counts from the end); None: `[train] layer`."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Which SAEs to train (or import), on which layer."""

    sweep: pathlib.Path = artifacts.unhashed(pathlib.Path("sweeps/demo.toml"))
    """Sweep TOML file (relative to the pipeline config's directory); its expanded contents, not its path, are hashed.
    "" trains nothing (score `imports` only)."""
    imports: tuple[pathlib.Path | SaeImport, ...] = artifacts.unhashed(())
    """Existing SAE checkpoints to score besides the sweep: paths, or tables {path = "...", layer = N}; each SAE is
    keyed by its file's content (see `saev.sae_files`)."""
    layer: int = -1
    """ViT layer whose patch activations the SAEs learn (a value of dump.vit.layers; 0-based block index, negative counts from the end of the ViT)."""
    methods: pathlib.Path = artifacts.unhashed(pathlib.Path(""))
    """Sweep TOML file of baseline methods fit beside the SAEs on the same layers (`stages.graph.MethodRun`: k-means,
    PCA, random directions, the ViT's neurons), each scored like an SAE; relative to the pipeline config's directory;
    "" fits none."""
    layers: tuple[int, ...] = ()
    """Train the whole sweep on each of these layers (values of dump.vit.layers, as `layer`), instead of `layer` alone; results are then per layer and best over layers."""
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
        if self.layers and self.layer != -1:
            raise ValueError("give train.layer (one layer) or train.layers (a layer sweep), not both")


def get_layer(pipeline: "Pipeline", dump: DumpInfo, layer: int | None = None, what: str = "train.layer") -> int:
    """The train layer (or `layer`, named `what` in messages) as a non-negative block index, checked against the
    dumped layers (an adopted dump: one of the layers its metadata.json lists, as listed; there is no model to count
    negative indices from)."""
    given = pipeline.train.layer if layer is None else layer
    if dump.adopted is not None:
        if given not in dump.layers:
            raise configs.ConfigError(
                f"{what}={given} is not among the layers of the adopted dump "
                f"{dump.adopted / 'metadata.json'}: layers={list(dump.layers)}"
            )
        return given
    (block,) = vit.resolve_layers(pipeline.dump.vit, (given,))
    if block not in dump.layers:
        raise configs.ConfigError(
            f"{what}={given} (block {block}) is not among the dumped layers "
            f"dump.vit.layers={list(pipeline.dump.vit.layers)}"
        )
    return block


NO_SWEEP = pathlib.Path("")
"""`sweep = ""`: train nothing."""


def get_sweep(pipeline: "Pipeline", d_vit: int) -> list[training.TrainConfig]:
    """The expanded sweep with the SAE input width `d_vit` (the dump's), each distinct SAE once, in sweep order."""
    if pipeline.train.sweep == NO_SWEEP:
        return []
    fpath = pipeline.config_dpath / pipeline.train.sweep
    if not fpath.exists() and not pipeline.train.sweep.is_absolute():
        raise sweep.SweepError(
            f'sweep file not found: {fpath} ([train] sweep = "{pipeline.train.sweep}" is relative to the config\'s '
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


def describe(cfg: training.TrainConfig | ImportInfo | MethodRun) -> str:
    """The SAE in a line: e.g. "relu_l1(l1_coeff=0.001) d_sae=512 lr=0.003 seed=0", "imported saev-2-schema5 ..." or
    "pca(k=64, top_n=None, sign=max-loading)"."""
    if isinstance(cfg, MethodRun):
        fields = ", ".join(f"{f.name}={getattr(cfg.method, f.name)}" for f in dataclasses.fields(cfg.method))
        return f"{cfg.method.kind}({fields})"
    if isinstance(cfg, ImportInfo):
        return f"imported {cfg.fmt} {cfg.path} {cfg.activation} d_sae={cfg.d_sae}"
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


IMPORT_EVAL_ROWS = 4096
"""An imported SAE's `metrics.json` (hence its health in the results) is measured on the corpus dump's last this many
patches of its layer (all of them when the dump has fewer), or on this many spread over `[data.corpus_eval]`."""


class PlannedImport(typing.NamedTuple):
    """What planning needs from an imported SAE (its weights are read again by the job)."""

    info: ImportInfo
    """Where it comes from, its format, checksum and activation."""
    d_vit: int
    """Width of the activations it reads."""
    top_k: int | None
    """saev's top_k of a TopK or BatchTopK SAE (kept in its key params, for exports)."""


@functools.lru_cache(maxsize=256)
def _plan_import(path: pathlib.Path, signature: tuple[int, ...]) -> PlannedImport:
    imported = sae_files.read_sae(path)
    sae = imported.sae
    info = ImportInfo(path, imported.fmt, imported.checksum, repr(sae.activation), sae.cfg.d_sae)
    return PlannedImport(info, sae.cfg.d_vit, imported.top_k)


def plan_import(path: pathlib.Path) -> PlannedImport:
    """The SAE checkpoint at `path` (file or directory), read, converted and checked (`sae_files.read_sae`); read
    once per process while its files are unchanged (same stat signatures), since every plan reads it."""
    fpaths = [path / nn.CONFIG_FNAME, path / nn.WEIGHTS_FNAME, path / "sae.pt"] if path.is_dir() else [path]
    signature = []
    for fpath in fpaths:
        try:
            signature += checksums.stat_sig(fpath.stat())
        except OSError:
            signature.append(-1)
    return _plan_import(path, tuple(signature))


def get_imports(pipeline: "Pipeline", dump: DumpInfo) -> list[tuple[pathlib.Path, int]]:
    """Each `[train] imports` entry as (absolute path, dumped layer), checked: the path exists and the layer was
    dumped."""
    out = []
    for i, entry in enumerate(pipeline.train.imports):
        entry = entry if isinstance(entry, SaeImport) else SaeImport(path=entry)
        path = (pipeline.config_dpath / entry.path).absolute()
        if not path.exists():
            where = "" if entry.path.is_absolute() else f" (relative to the config's directory {pipeline.config_dpath})"
            raise sae_files.SaeFileError(f"train.imports[{i}]: SAE checkpoint not found: {path}{where}")
        out.append((path, get_layer(pipeline, dump, entry.layer, f"train.imports[{i}].layer")))
    return out


def get_layers(pipeline: "Pipeline", dump: DumpInfo) -> list[int]:
    """The layers the sweep is trained on (`layers`, or `layer`), as checked block indices, each once, in order."""
    given = pipeline.train.layers or (pipeline.train.layer,)
    what = "train.layers" if pipeline.train.layers else "train.layer"
    return list(dict.fromkeys(get_layer(pipeline, dump, layer, what) for layer in given))


def get_method_runs(pipeline: "Pipeline") -> list[MethodRun]:
    """The expanded `[train] methods` sweep, each distinct run once, in sweep order."""
    if pipeline.train.methods == NO_SWEEP:
        return []
    fpath = pipeline.config_dpath / pipeline.train.methods
    if not fpath.exists() and not pipeline.train.methods.is_absolute():
        raise sweep.SweepError(
            f'methods sweep file not found: {fpath} ([train] methods = "{pipeline.train.methods}" is relative to the '
            f"config's directory {pipeline.config_dpath})"
        )
    return list(dict.fromkeys(sweep.load_sweep(fpath, MethodRun)))


def method_width(run: MethodRun, d_vit: int, n_rows: int) -> int:
    """The method's number of latents, checked against the corpus before anything runs: k-means' k and random
    directions sampled from the corpus at most its fit rows, PCA's k at most the width."""
    cfg, n_fit = run.method, n_rows - run.n_eval
    if n_fit < 1:
        raise configs.ConfigError(f"[train] methods: n_eval={run.n_eval} leaves no corpus rows to fit on ({n_rows})")
    if cfg.kind == "neurons":
        return d_vit
    if cfg.kind == "pca" and cfg.k > d_vit:
        raise configs.ConfigError(f"[train] methods: pca k={cfg.k} components is above the activation width {d_vit}")
    width = cfg.n if cfg.kind == "random" else cfg.k
    if (cfg.kind == "kmeans" or getattr(cfg, "source", "") == "corpus") and width > min(n_fit, run.n_train):
        raise configs.ConfigError(
            f"[train] methods: {cfg.kind} with {width} latents needs at least as many corpus rows, but it is fit on "
            f"{min(n_fit, run.n_train)} (the corpus's {n_rows} minus n_eval={run.n_eval}, at most n_train)"
        )
    return width


def plan(pipeline: "Pipeline", inputs: Inputs) -> StagePlan[TrainInfo]:
    corpus_art, dump_info = role(inputs.dump, "corpus")
    dump_ref = corpus_art.ref
    evaluated = corpus_eval(inputs.dump)
    layers = get_layers(pipeline, dump_info)
    arts, all_params, all_inputs = [], {}, {}
    info: dict[str, TrainInfo] = {}
    pieces = []
    d_vit = dump_info.d_vit
    for path, import_layer in get_imports(pipeline, dump_info):
        planned = plan_import(path)
        if planned.d_vit != d_vit:
            source_desc = (
                f"adopted dump {dump_info.adopted}"
                if dump_info.adopted is not None
                else f"dump.vit.model={pipeline.dump.vit.model!r}"
            )
            raise sae_files.SaeFileError(
                f"{path}: the SAE reads width d_model={planned.d_vit}, but the dump's activations "
                f"({source_desc}) have width {d_vit}"
            )
        import_info = planned.info
        source = {"format": import_info.fmt, "checksum": import_info.checksum}
        source["conversion"] = sae_files.CONVERSION_VERSION
        if planned.top_k is not None:
            source["top_k"] = planned.top_k
        params = {"import": source, "layer": import_layer}
        refs = {"dump": dump_ref}
        if evaluated is not None:
            refs["corpus_eval"] = evaluated[0].ref
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
        if art.key in info:
            continue  # the same file twice
        arts.append(art)
        all_params[art.key], all_inputs[art.key] = params, refs
        info[art.key] = TrainInfo(config=import_info, d_sae=import_info.d_sae, layer=import_layer)
        pieces.append(Piece(NAME, art, label=f"import {path}"))
    by_layer: dict[int, dict[training.TrainConfig, artifacts.Artifact]] = {layer: {} for layer in layers}
    sweep_cfgs = get_sweep(pipeline, dump_info.d_vit)
    for layer in layers:
        for train_cfg in sweep_cfgs:
            params = {"sae": artifacts.hashed_params(train_cfg), "layer": layer}
            refs = {"dump": dump_ref}
            if evaluated is not None:  # its metrics are measured there
                refs["corpus_eval"] = evaluated[0].ref
            art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
            if art.key in info:
                continue  # the same SAE twice in a sweep is trained once
            arts.append(art)
            by_layer[layer][train_cfg] = art
            all_params[art.key] = params
            all_inputs[art.key] = refs
            info[art.key] = TrainInfo(config=train_cfg, d_sae=train_cfg.sae.d_sae, layer=layer)
    for layer in layers:
        for run in get_method_runs(pipeline):
            params = {"method": artifacts.hashed_params(run), "layer": layer}
            refs = {"dump": dump_ref}
            if evaluated is not None:
                refs["corpus_eval"] = evaluated[0].ref
            art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
            width = method_width(run, dump_info.d_vit, dump_info.n_patches)
            arts.append(art)
            all_params[art.key], all_inputs[art.key] = params, refs
            info[art.key] = TrainInfo(config=run, d_sae=width, layer=layer)
            at = f" at layer {layer}" if len(layers) > 1 else ""
            pieces.append(Piece(NAME, art, label=f"fit {describe(run)}{at}"))
    if not info:
        raise configs.ConfigError('[train] has no SAEs: sweep = "", methods = "" and no imports')
    n_rows = dump_info.n_patches
    for msg in warn_small_data(sweep_cfgs, n_rows):
        logger.warning("the data is small for the sweep: %s", msg)
    for layer, by_cfg in by_layer.items():  # a group shares one stream of rows: one layer's
        at = f" at layer {layer}" if len(layers) > 1 else ""
        for group in training.group(list(by_cfg), max_size=pipeline.train.max_group):
            group_arts = [by_cfg[cfg] for cfg in group]
            label = describe(group[0]) if len(group) == 1 else f"group of {len(group)}: {describe(group[0])}, ..."
            pieces.append(Piece(NAME, group_arts[0], label=label + at, also=tuple(group_arts[1:])))
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, all_inputs, info)


def run(pipeline: "Pipeline", own: StagePlan[TrainInfo], inputs: Inputs, piece: Piece) -> None:
    if isinstance(own.info[piece.artifact.key].config, ImportInfo):
        return run_import(pipeline, own, inputs, piece)
    if isinstance(own.info[piece.artifact.key].config, MethodRun):
        return run_method(pipeline, own, inputs, piece)
    started = artifacts.now()
    todo = [art for art in (piece.artifact, *piece.also) if not art.is_done()]
    infos = [own.info[art.key] for art in todo]
    # Rows stream from the shards on disk (the layer is never loaded whole; see saev.data.loader).
    corpus_art, _ = role(inputs.dump, "corpus")
    rows = loader.ShardRows(Shards(corpus_art.dpath), infos[0].layer)
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
    evaluated = corpus_eval(inputs.dump)
    for art, info, result in zip(todo, infos, results, strict=True):
        nn.save(result.sae, art.dpath)
        if evaluated is not None:
            eval_ND = read_eval_rows(evaluated[0], info.layer, info.config.n_eval)
            result = result._replace(metrics=training.get_metrics(result.sae, eval_ND, n_steps=result.metrics.n_steps))
        metrics = dataclasses.asdict(result.metrics)
        atomic.atomic_write_json(art.dpath / "metrics.json", metrics)
        art.write_manifest(
            params=own.params[art.key],
            inputs=own.inputs[art.key],
            started=started,
            extra={"metrics": metrics, "device": str(device), "group": [a.key for a in todo]},
        )
        logger.info(
            "trained %s: nmse %.4f, l0 %.1f, dead %.3f",
            art.ref,
            result.metrics.nmse,
            result.metrics.l0,
            result.metrics.dead_frac,
        )
    checkpoint_fpath.unlink(missing_ok=True)


def run_method(pipeline: "Pipeline", own: StagePlan[TrainInfo], inputs: Inputs, piece: Piece) -> None:
    """The job body of a baseline method: fit it on a shuffled stream of the corpus's rows (all but the last `n_eval`),
    saving its state every `checkpoint_every` batches beside the artifact (a killed fit resumes from it, to the same
    result), then save it (`method.json`, `method.safetensors`), measure `metrics.json` and seal the artifact."""
    started = artifacts.now()
    art = piece.artifact
    info = own.info[art.key]
    run_cfg: MethodRun = info.config
    corpus_art, _ = role(inputs.dump, "corpus")
    rows = loader.ShardRows(Shards(corpus_art.dpath), info.layer)
    n_fit = rows.n_rows - run_cfg.n_eval
    data_loader = loader.ShuffledLoader(
        rows, n_rows=n_fit, batch_size=run_cfg.batch_size, seed=run_cfg.seed,
        chunk_rows=min(16_384, n_fit), buffer_rows=min(262_144, n_fit),
    )  # fmt: skip
    n_steps = -(-run_cfg.n_train // run_cfg.batch_size)
    device = helpers.get_device(pipeline.train.device)

    def get_batches(start: int):
        with data_loader.batches(start, n_steps) as batches:  # closing this generator stops the reading thread
            for x_BD in batches:
                yield x_BD.to(device)

    state_fpath = art.dpath / ".fit-state.safetensors"  # a dot-file: never part of the artifact
    logger.info("fitting %s on %d corpus rows of layer %d: %d batches of %d", describe(run_cfg), n_fit, info.layer,
                n_steps, run_cfg.batch_size)  # fmt: skip
    method = methods.fit(
        run_cfg.method, rows.d, get_batches, state_fpath=state_fpath, save_every=pipeline.train.checkpoint_every
    )
    evaluated = corpus_eval(inputs.dump)
    if evaluated is not None:
        eval_ND = read_eval_rows(evaluated[0], info.layer, run_cfg.n_eval)
    else:
        eval_ND = np.empty((run_cfg.n_eval, rows.d), dtype=np.float32)
        rows.read(n_fit, rows.n_rows, eval_ND)
    metrics = method_metrics(method.to(device), eval_ND, n_steps, device)
    methods.save(method, art.dpath)
    atomic.atomic_write_json(art.dpath / "metrics.json", metrics)
    art.write_manifest(
        params=own.params[art.key], inputs=own.inputs[art.key], started=started,
        extra={"metrics": metrics, "device": str(device)},
    )  # fmt: skip
    state_fpath.unlink(missing_ok=True)
    logger.info("fitted %s: nmse %.4f, l0 %.1f", art.ref, metrics["nmse"], metrics["l0"])


def method_metrics(
    method: methods.Encoder, eval_ND: np.ndarray, n_steps: int, device: torch.device
) -> dict[str, float]:
    """The keys of an SAE's `metrics.json` for a method, on the rows `eval_ND`: NMSE and L0 (`saev.methods.get_metrics`,
    float64 sums), mse, and the shares of latents never non-zero (dead) and non-zero on more than 10% of the rows
    (dense: every latent of a dense method such as PCA)."""
    batches = [torch.from_numpy(eval_ND[s : s + 4096]).to(device) for s in range(0, len(eval_ND), 4096)]
    got = methods.get_metrics(method, batches)
    active_K = torch.zeros(method.n_latents, dtype=torch.float64)
    sq_err = 0.0
    with torch.inference_mode():
        for x_BD in batches:
            active_K += (method.encode_block(x_BD, 0, method.n_latents) != 0).sum(dim=0).double().cpu()
            sq_err += float((method.reconstruct(x_BD).double() - x_BD.double()).square().sum())
    freq_K = active_K / max(1, len(eval_ND))
    return {
        "mse": sq_err / max(1, eval_ND.size), "nmse": got.nmse, "l0": got.l0,
        "dead_frac": float((freq_K == 0).double().mean()), "dense_frac": float((freq_K > 0.1).double().mean()),
        "n_steps": n_steps,
    }  # fmt: skip


def read_eval_rows(dump_art: artifacts.Artifact, layer: int, n_eval: int) -> np.ndarray:
    """`n_eval` rows of `layer` spread evenly over the dump (all of them when it has fewer): where the metrics of an
    SAE are measured on a `[data.corpus_eval]` dump."""
    shards = Shards(dump_art.dpath)
    n_rows = shards.metadata.n_imgs * shards.metadata.n_patches_per_img
    idx = np.unique(np.linspace(0, n_rows - 1, min(n_eval, n_rows)).round().astype(np.int64))
    return shards.patches_flat(layer, idx)


def run_import(pipeline: "Pipeline", own: StagePlan[TrainInfo], inputs: Inputs, piece: Piece) -> None:
    """The job body of an imported SAE: convert it again (refusing a file changed since the plan), save it as ours
    (`sae.json`, `sae.safetensors`), measure `metrics.json` on the dump's last `IMPORT_EVAL_ROWS` patches, record where
    it came from (`source.json`: path, format, checksum, header) and seal the artifact."""
    started = artifacts.now()
    art = piece.artifact
    info = own.info[art.key]
    source: ImportInfo = info.config
    imported = sae_files.read_sae(source.path)
    if imported.checksum != source.checksum:
        raise sae_files.SaeFileError(f"{source.path} changed since the plan was made; run the launcher again")
    evaluated = corpus_eval(inputs.dump)
    if evaluated is not None:
        eval_ND = read_eval_rows(evaluated[0], info.layer, IMPORT_EVAL_ROWS)
    else:
        corpus_art, _ = role(inputs.dump, "corpus")
        rows = loader.ShardRows(Shards(corpus_art.dpath), info.layer)
        n_eval = min(IMPORT_EVAL_ROWS, rows.n_rows)
        eval_ND = np.empty((n_eval, rows.d), dtype=np.float32)
        rows.read(rows.n_rows - n_eval, rows.n_rows, eval_ND)
    metrics = dataclasses.asdict(training.get_metrics(imported.sae, eval_ND, n_steps=0))
    nn.save(imported.sae, art.dpath)
    atomic.atomic_write_json(art.dpath / "metrics.json", metrics)
    atomic.atomic_write_json(
        art.dpath / "source.json",
        {"path": str(source.path), "format": imported.fmt, "checksum": imported.checksum, "header": imported.header},
    )
    art.write_manifest(
        params=own.params[art.key],
        inputs=own.inputs[art.key],
        started=started,
        extra={"metrics": metrics},
    )
    logger.info("imported %s as %s: nmse %.4f, l0 %.1f", source.path, art.ref, metrics["nmse"], metrics["l0"])
