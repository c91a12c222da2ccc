"""The pipeline: one TOML config -> the graph of five stages, their artifact keys and pieces, and how to run them.

Keys of the whole graph are computed here before anything runs (from configs and upstream keys only), which is what
lets the launcher submit every stage at once and resubmit a single missing piece. This module owns the graph
(`make_plan`), the checks and repairs of the store before a run, the job body (`run_pieces`, `seal`), and how pieces
get run: in this process (`run_local`) or submitted to Slurm with `afterok` chains (`submit_slurm`), with the job
ledger that keeps a piece from being submitted twice (`Ledger`, `piece_jobs`).
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import pathlib
import signal
import time
import typing
from collections.abc import Callable

from saev import artifacts, configs, errors, helpers, preemption, sae_files, slurm
from saev.data import datasets, shards
from saev.slurm import SlurmConfig

from . import dump as dump_stage
from . import mask as mask_stage
from . import reduce as reduce_stage
from . import score as score_stage
from . import train as train_stage
from .graph import Piece, Plan, StageModule, StagePlan

logger = logging.getLogger("stages")

STAGES = ("dump", "train", "mask", "score", "reduce")
"""Stage names in dependency order."""

MODULES: dict[str, StageModule] = {
    "dump": dump_stage,
    "train": train_stage,
    "mask": mask_stage,
    "score": score_stage,
    "reduce": reduce_stage,
}
"""Stage name -> the module holding its Config, plan() and run() and its optional hooks (see `StageModule`)."""

for _name, _module in MODULES.items():  # a module missing a member (even an absent hook's None) fails at import
    if not isinstance(_module, StageModule) or _module.NAME != _name:
        raise TypeError(f"stages/{_name}.py does not provide what `graph.StageModule` declares (NAME = {_name!r}, ...)")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything one launch needs: one TOML file drives all five stages."""

    root: pathlib.Path = pathlib.Path("runs")
    """Artifact store root; each stage writes `<root>/<stage>/<key>/`. Relative paths are relative to the working directory."""
    dump: dump_stage.Config = dataclasses.field(default_factory=dump_stage.Config)
    """Activation dump: dataset, ViT, layers, shard size."""
    train: train_stage.Config = dataclasses.field(default_factory=train_stage.Config)
    """SAE sweep training."""
    mask: mask_stage.Config = dataclasses.field(default_factory=mask_stage.Config)
    """Keep-mask over labelled patches."""
    score: score_stage.Config = dataclasses.field(default_factory=score_stage.Config)
    """Per-block AP scoring of every SAE latent."""
    reduce: reduce_stage.Config = dataclasses.field(default_factory=reduce_stage.Config)
    """Best latent per class."""
    slurm: SlurmConfig | None = None
    """Cluster settings; when present (and not overridden on the command line) stages are submitted to Slurm."""
    config_dpath: pathlib.Path = artifacts.unhashed(pathlib.Path("."))
    """Directory of the config file; relative paths inside the config (sweep files) resolve against it."""
    config_fpath: pathlib.Path | None = artifacts.unhashed(None)
    """The config file itself (as given to `load`), shown in the report; None for a pipeline not read from a file."""


def load(fpath: pathlib.Path | str) -> Pipeline:
    """Read and check a pipeline TOML file (unknown keys and wrong types are `ConfigError`s naming the key)."""
    fpath = pathlib.Path(fpath)
    data = configs.load_toml(fpath)
    for name in ("config_dpath", "config_fpath"):
        if name in data:
            raise configs.ConfigError(f"{fpath}: '{name}' is set by the launcher, not the config")
    pipeline = configs.from_dict(Pipeline, data, where=str(fpath))
    return dataclasses.replace(pipeline, config_dpath=fpath.resolve().parent, config_fpath=fpath.resolve())


def make_plan(pipeline: Pipeline) -> Plan:
    """Compute every stage's keys and pieces, from configs only (nothing is read from the artifacts)."""
    plan: Plan = {}
    for name in STAGES:
        with _refused_with_the_config():
            plan[name] = MODULES[name].plan(pipeline, plan)
    return plan


@contextlib.contextmanager
def _refused_with_the_config():
    """While planning or checking, bad data is the data the config names (its dataset, an adopted dump, an imported
    SAE, a shard budget below one image): report it as a `ConfigError`, refused with the config before anything runs
    (exit 2)."""
    try:
        yield
    except (datasets.DatasetError, shards.ShardError, sae_files.SaeFileError) as err:
        raise configs.ConfigError(str(err)) from err


def verify_inputs(pipeline: Pipeline, plan: Plan, stage: str, key: str) -> None:
    """Refuse to start when an input artifact is incomplete or damaged (afterok alone is not trusted).

    Each input must have a manifest naming its key and the params the plan expects, with every file present at its
    recorded size, and each file changed since it was last verified must match its checksum (`Artifact.verify`);
    a damaged input is unsealed so that rerunning its stage recomputes it. An input whose pieces all exist but whose
    manifest is missing (its last job died between writing its piece and sealing) is sealed here first.
    """
    for art in plan[stage].input_artifacts(key, pipeline.root):
        if not art.is_done() and art.stage in plan and art.check().state == "missing":
            seal(pipeline, plan[art.stage], art)
        try:
            art.verify(params=plan[art.stage].params.get(art.key) if art.stage in plan else None)
        except artifacts.IncompleteArtifactError as err:
            raise artifacts.IncompleteArtifactError(
                f"stage '{stage}' cannot start: input {err} (`--stage {art.stage}`)"
            ) from None


def upstream_and(stages: typing.Sequence[str]) -> list[str]:
    """The selected stages and every stage upstream of them, in dependency order."""
    last = max(STAGES.index(name) for name in stages)
    return list(STAGES[: last + 1])


def repair_store(pipeline: Pipeline, plan: Plan, stages: typing.Sequence[str]) -> list[str]:
    """Before a run: check every artifact the selected stages write or read against its manifest, hashing each file
    changed since it was last verified, and unseal the damaged ones (`Artifact.repair`), so that the run recomputes
    exactly what is needed. Returns one line per damaged artifact (what was wrong, what was done)."""
    lines = []
    for name in upstream_and(stages):
        for art in plan[name].artifacts:
            if not art.dpath.exists() and not art.dpath.is_symlink():
                continue
            health = art.check("changed", params=plan[name].params[art.key])
            if health.state != "damaged":
                continue
            actions = art.repair(health)
            lines.append(
                f"{art.ref} is damaged: {health.describe(art)}; {', '.join(actions) or 'left as is'}: "
                f"stage {name} recomputes it"
            )
    return lines


def verify_store(pipeline: Pipeline, plan: Plan) -> tuple[list[str], int, int]:
    """`launch.py --verify`: hash every file of every artifact the config uses and compare with its manifest.

    Damaged artifacts are reported file by file, with the artifacts downstream that were made from them, and unsealed
    so that rerunning recomputes them. Returns (report lines, artifacts checked, bytes hashed).
    """
    arts, total = [], 0
    for name in STAGES:
        for art in plan[name].artifacts:
            state = art.check().state  # cheap; the sizes of a done artifact only size the progress line
            if state == "missing":
                continue
            arts.append((name, art))
            if state == "done":
                total += sum(e["size"] if isinstance(e, dict) else e for e in art.read_manifest()["files"].values())
    progress = helpers.Progress(desc="verify", total=max(1, total >> 20), unit="MiB", logger=logger)
    hashed, pending = 0, 0

    def on_bytes(n: int) -> None:
        nonlocal hashed, pending
        hashed += n
        pending += n
        if pending >= 1 << 20:
            progress.update(pending >> 20)
            pending &= (1 << 20) - 1

    lines = []
    for name, art in arts:
        health = art.check("all", params=plan[name].params[art.key], on_bytes=on_bytes)
        if health.state != "damaged":
            continue
        lines.extend(f"bad: {art.dpath / p.rel} {p.what}" for p in health.problems)
        affected = downstream(plan, art.ref)
        if affected:
            lines.append(f"  made from {art.ref}: {', '.join(affected)} (kept: a recomputed {name} has the same key)")
        actions = art.repair(health)
        lines.append(f"  {art.ref}: {', '.join(actions)}; run `--stage {name}` (or `--stage all`) to recompute it")
    progress.finish()
    return lines, len(arts), hashed


def downstream(plan: Plan, ref: str) -> list[str]:
    """Refs of every artifact made, directly or not, from the artifact `ref`."""
    found: list[str] = []
    frontier = {ref}
    for name in STAGES:
        for art in plan[name].artifacts:
            if frontier & set(plan[name].inputs[art.key].values()):
                found.append(art.ref)
                frontier.add(art.ref)
    return found


def explain(pipeline: Pipeline, plan: Plan, name: str, limit: int = 2) -> list[str]:
    """Why a stage has work to do: for up to `limit` of its artifacts that were never made, the closest earlier
    artifact of the stage under the same root and what differs (params, inputs; for a dump, which dataset files)."""
    stage_plan = plan[name]
    health = {a.key: a.check() for a in stage_plan.artifacts}
    new = [a for a in stage_plan.artifacts if health[a.key].state == "missing" and a.damage_note() is None]
    lines = [f"{a.ref} is damaged: {health[a.key].describe(a)}" for a in stage_plan.artifacts
             if health[a.key].state == "damaged"][:limit]
    lines += [f"{a.ref} was unsealed: {a.damage_note()}" for a in stage_plan.artifacts
              if health[a.key].state == "missing" and a.damage_note()][:limit]
    if not new:
        return lines
    earlier = []
    for fpath in sorted((pipeline.root / name).glob("*/manifest.json"))[:500]:
        try:
            manifest = json.loads(fpath.read_text())
            earlier.append((manifest["key"], manifest["params"], manifest["inputs"], manifest.get("finished", "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for art in new[:limit]:
        params = json.loads(artifacts.canonical_json(stage_plan.params[art.key]))
        candidates = []  # the fewest differences first, then the most recent
        for key, old_params, old_inputs, finished in sorted(earlier, key=lambda e: e[3], reverse=True):
            if key == art.key:
                continue
            diffs = _diff(old_params, params, "") + [
                f"input {k}" for k in sorted(set(old_inputs) | set(stage_plan.inputs[art.key]))
                if old_inputs.get(k) != stage_plan.inputs[art.key].get(k)
            ]
            candidates.append((key, diffs))
        if not candidates:  # nothing to compare with (a first run): nothing to explain
            continue
        key, diffs = min(candidates, key=lambda c: len(c[1]))
        shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        line = f"{art.ref}: new key; {name}/{key} differs in {shown or 'nothing recorded (format version?)'}"
        if name == "dump" and "dataset_files" in diffs:
            files = dump_stage.changed_files(
                artifacts.Artifact(pipeline.root, name, key), stage_plan.info[art.key].fingerprint
            )
            if files:
                line += f"; dataset files changed: {', '.join(files[:5])}" + (
                    f" and {len(files) - 5} more" if len(files) > 5 else ""
                )
        lines.append(line)
    return lines


def _diff(old: object, new: object, prefix: str) -> list[str]:
    """Dotted paths at which two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k == "__class__" and old.get(k) != new.get(k):
                out.append(prefix.rstrip(".") or "kind")
            elif k != "__class__":
                out.extend(_diff(old.get(k), new.get(k), f"{prefix}{k}."))
        return out
    return [] if old == new else [prefix.rstrip(".") or "value"]


def run_pieces(pipeline: Pipeline, stage: str, piece_ids: typing.Sequence[str]) -> None:
    """Job body: run the named pieces of one stage (skipping done ones), then seal the artifacts they belong to.

    This is what a Slurm job or the local executor calls. It recomputes the plan from the pipeline config, so a job
    needs nothing but the config to run.
    """
    helpers.setup_logging()  # a Slurm job starts with no log handler: progress lines must reach its log file
    helpers.use_allocated_cpus(logger)  # as many torch threads as CPUs given, not the node's cores (logged)
    plan = make_plan(pipeline)
    stage_plan = plan[stage]
    by_id = {piece.id: piece for piece in stage_plan.pieces}
    unknown = [pid for pid in piece_ids if pid not in by_id]
    if unknown:
        raise errors.UserConfigError(
            f"stage '{stage}' has no piece(s) {unknown}; did the config change since submission?"
        )
    module = MODULES[stage]
    touched: dict[str, artifacts.Artifact] = {}
    if slurm.job_id() is not None:
        # Slurm's pre-timeout signal (submitit asks for USR2 before the limit): finish the current training step,
        # save a checkpoint, requeue. Replaces submitit's handler, which would requeue without saving.
        signal.signal(signal.SIGUSR2, preemption.request_checkpoint)
    try:
        with errors.machine_refusals(f"stage '{stage}'"):  # a full disk or a refused permission: the user's to fix
            _run(pipeline, plan, stage, module, [by_id[pid] for pid in piece_ids], touched)
    except preemption.Preempted as err:
        slurm.requeue(err)  # outside Slurm: re-raised
    for art in touched.values():
        seal(pipeline, stage_plan, art)


def _run(
    pipeline: Pipeline,
    plan: Plan,
    stage: str,
    module: StageModule,
    pieces: list[Piece],
    touched: dict[str, artifacts.Artifact],
) -> None:
    # Many pieces in one job (local runs, several K-blocks): a line with rate and ETA at most every 10 s.
    for piece in helpers.Progress(pieces, desc=stage, unit="pieces", logger=logger) if len(pieces) > 1 else pieces:
        art = piece.artifact
        touched[art.key] = art
        if piece.is_done():
            logger.info("%s %s: already done, skipping", stage, piece.label)
            continue
        verify_inputs(pipeline, plan, stage, art.key)
        part = piece.fpath.name if piece.fpath else ""

        def waiting(piece=piece):
            logger.info("%s %s: another process is writing it; waiting", stage, piece.label)

        with art.lock(part, wait=True, on_wait=waiting):
            if piece.is_done():  # finished by a concurrent launch while we waited
                logger.info("%s %s: done by another process, skipping", stage, piece.label)
                continue
            for target in (art, *piece.also):
                health = target.check()
                if health.state == "damaged" or (piece.fpath is not None and health.state == "done"):
                    # A file of a sealed artifact vanished or changed (deleted, purged, edited): the manifest no
                    # longer tells the truth. Unseal it; this piece recomputes what is missing.
                    logger.warning("%s: %s; unsealing it to recompute", stage, health.describe(target) or piece.label)
                    target.repair(health)
            # Leftovers of a killed job (we hold the lock that covers them, so no live writer owns them).
            if piece.fpath is None:
                artifacts.remove_temp_files(art.dpath)
            else:
                artifacts.remove_temp_files(piece.fpath.parent, piece.fpath.name)
            logger.info("%s %s: running", stage, piece.label)
            module.run(pipeline, plan, piece)


def seal(pipeline: Pipeline, stage_plan: StagePlan, art: artifacts.Artifact) -> bool:
    """Write the manifest of a multi-piece artifact once all its pieces exist; returns whether it is done.

    Every task of a job array calls this after writing its piece, so the last one to finish seals the artifact.
    """
    pieces = [p for p in stage_plan.pieces if p.artifact.key == art.key]
    if art.is_done():
        return True
    if not pieces or any(p.fpath is None for p in pieces) or not all(p.is_done() for p in pieces):
        return False  # single-piece artifacts are sealed by their own run()
    with art.lock(wait=True):
        if not art.is_done():
            first_mtime = min(p.fpath.stat().st_mtime for p in pieces if p.fpath is not None)
            started = datetime.datetime.fromtimestamp(first_mtime, datetime.timezone.utc)
            module = MODULES[stage_plan.name]
            if module.finalize is not None:  # e.g. join per-chunk labels, write index files
                module.finalize(pipeline, {stage_plan.name: stage_plan}, art)
            art.write_manifest(
                params=stage_plan.params[art.key],
                inputs=stage_plan.inputs[art.key],
                started=started.isoformat(timespec="seconds"),
                extra=module.manifest_extra(pipeline, art) if module.manifest_extra is not None else None,
            )
            logger.info("%s: sealed %s (%d pieces)", stage_plan.name, art.ref, len(pieces))
    return True


##########################
# Running and submitting #
##########################


def check_configs(pipeline: Pipeline, plan: Plan, stages: typing.Sequence[str]) -> None:
    """The checks that need only the config and the dataset listing (`StageModule.check` of every selected stage
    not done), so that `--dry-run` and `--status` refuse what a real run would (e.g. a keep-mask larger than the
    dump); nothing is read from the artifacts."""
    for name in stages:
        module = MODULES[name]
        if module.check is not None and plan[name].state() != "done":
            with _refused_with_the_config():
                module.check(pipeline, plan)


def check_inputs(pipeline: Pipeline, plan: Plan, stages: typing.Sequence[str]) -> None:
    """Fail before running or submitting anything: a stage's own checks (`StageModule.check`), and inputs that are
    neither done nor part of this launch (`IncompleteArtifactError` naming the stage to run first)."""
    check_configs(pipeline, plan, stages)
    for name in stages:
        for key in plan[name].inputs:
            for art in plan[name].input_artifacts(key, pipeline.root):
                if art.stage not in stages and not art.is_done() and plan[art.stage].missing():
                    note = art.damage_note()
                    why = f" (it was found damaged and unsealed: {note})" if note else ""
                    raise artifacts.IncompleteArtifactError(
                        f"stage '{name}' needs {art.ref}, which is not done{why}; "
                        f"run `--stage {art.stage}` (or `--stage all`) first"
                    )


def run_local(pipeline: Pipeline, plan: Plan, stages: typing.Sequence[str], *, say: Callable[[str], None]) -> None:
    """Run the missing pieces of the selected stages in this process, in order; `say` gets one line per stage."""
    for name in stages:
        stage_plan = plan[name]
        missing = stage_plan.missing()
        if not missing and stage_plan.state() == "done":
            say(f"{name}: done, skipping")
            continue
        say(f"{name}: running {len(missing)} piece(s)")
        start = time.perf_counter()
        ids = [piece.id for piece in missing] or [stage_plan.pieces[0].id]  # all pieces exist: one seals
        run_pieces(pipeline, name, ids)
        say(f"{name}: done in {helpers.format_duration(time.perf_counter() - start)}")


class Ledger:
    """Which Slurm job was submitted for each piece of an artifact: `<artifact>/.jobs.json` (a dot-file, never
    part of the artifact). Keeps a piece from being submitted twice and lets `--status` show failed jobs' logs."""

    def __init__(self, dpath: pathlib.Path):
        self.fpath = dpath / ".jobs.json"

    def read(self) -> dict[str, str]:
        """Piece id -> job id ({} when nothing was recorded or the file is unreadable)."""
        try:
            return json.loads(self.fpath.read_text())
        except (OSError, ValueError):
            return {}

    def record(self, jobs: dict[str, str]) -> None:
        """Add (or replace) the jobs of these pieces."""
        artifacts.atomic_write_json(self.fpath, {**self.read(), **jobs})


def piece_jobs(plan: Plan) -> dict[str, tuple[str, str]]:
    """Piece id -> (job id, Slurm state) for every piece that is not done and has a recorded job."""
    wanted: dict[str, str] = {}
    for stage_plan in plan.values():
        pending = {p.id for p in stage_plan.pieces if not p.is_done()}
        if not pending and stage_plan.state() == "done":
            continue
        for art in stage_plan.artifacts:
            for piece_id, job_id in Ledger(art.dpath).read().items():
                if piece_id in pending or (piece_id == stage_plan.pieces[0].id and not art.is_done()):
                    wanted[piece_id] = job_id
    states = slurm.job_states(sorted(set(wanted.values())))
    return {pid: (job, states.get(job, "UNKNOWN")) for pid, job in wanted.items()}


def stage_slurm(pipeline: Pipeline, name: str) -> SlurmConfig:
    """The Slurm settings stage `name` is submitted with: `pipeline.slurm`, except that adopting a dump
    (`[dump.adopt]`) only links and hashes files, so that job asks for no GPU (`[slurm.dump]`'s gpus and gres are
    dropped; its partition, CPUs, memory and hours are kept)."""
    if name == "dump" and pipeline.dump.adopt is not None:
        return dataclasses.replace(pipeline.slurm, dump=dataclasses.replace(pipeline.slurm.dump, gpus=0, gres=""))
    return pipeline.slurm


def submit_slurm(
    pipeline: Pipeline,
    plan: Plan,
    stages: typing.Sequence[str],
    jobs: dict[str, tuple[str, str]],
    *,
    say: Callable[[str], None],
) -> dict[str, list[str]]:
    """Submit every missing piece of the selected stages at once, each stage waiting (afterok) on the jobs of its
    upstream stages; pieces whose job is already pending or running (`jobs`, from `piece_jobs`) are not submitted
    again (their job ids become dependencies instead). Every job queued is recorded in its artifact's `Ledger`, also
    when a later submission fails (`slurm.SlurmError`, re-raised). `say` gets one line per stage. Returns stage ->
    job ids."""
    assert pipeline.slurm is not None
    waiting_on: dict[str, list[str]] = {}
    for name in stages:
        stage_plan = plan[name]
        if stage_plan.state() == "done":
            say(f"{name}: done, skipping")
            continue
        queued = {pid: job for pid, (job, state) in jobs.items() if state in slurm.ACTIVE_STATES}
        missing = stage_plan.missing() or [stage_plan.pieces[0]]  # all pieces exist: one task seals
        todo = [p for p in missing if p.id not in queued]
        reuse = [queued[p.id] for p in missing if p.id in queued]
        after = [job for upstream in STAGES[: STAGES.index(name)] for job in waiting_on.get(upstream, [])]
        after = slurm.array_ids(after)
        args = [(pipeline, name, [piece.id]) for piece in todo]
        try:
            job_ids = slurm.submit(stage_slurm(pipeline, name), name, run_pieces, args, after=after)
        except slurm.SlurmError as err:
            _record_jobs(stage_plan, todo, err.submitted)  # so that a rerun does not submit them twice
            raise
        _record_jobs(stage_plan, todo, job_ids)
        waiting_on[name] = job_ids + reuse
        msg = f"{name}: submitted {len(job_ids)} job(s)"
        if job_ids:
            msg += f" [{', '.join(slurm.array_ids(job_ids))}]"
        if reuse:
            msg += f"; {len(reuse)} already queued [{', '.join(slurm.array_ids(reuse))}]"
        if after:
            msg += f"; after {', '.join(after)}"
        say(msg)
    say(f"logs: {pipeline.slurm.log_dpath}/<stage>/<job id>/")
    return waiting_on


def _record_jobs(stage_plan: StagePlan, pieces: list[Piece], job_ids: typing.Sequence[str]) -> None:
    """Record in each artifact's ledger the jobs of its pieces (`job_ids` in `pieces` order, maybe fewer)."""
    for art in stage_plan.artifacts:
        mine = {p.id: j for p, j in zip(pieces, job_ids) if p.artifact.key == art.key}
        if mine:
            Ledger(art.dpath).record(mine)
