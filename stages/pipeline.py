"""The pipeline: one TOML config -> the graph of five stages, their artifact keys and pieces, and how to run them.

Keys of the whole graph are computed here before anything runs (from configs and upstream keys only), which is what
lets the launcher submit every stage at once and resubmit a single missing piece.
"""

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import typing

from saev import artifacts, configs, helpers, training
from saev.slurm import SlurmConfig

from . import dump as dump_stage
from . import mask as mask_stage
from . import reduce as reduce_stage
from . import score as score_stage
from . import train as train_stage
from .graph import Piece, Plan, StagePlan

logger = logging.getLogger("stages")

STAGES = ("dump", "train", "mask", "score", "reduce")
"""Stage names in dependency order."""

MODULES = {
    "dump": dump_stage,
    "train": train_stage,
    "mask": mask_stage,
    "score": score_stage,
    "reduce": reduce_stage,
}
"""Stage name -> the module holding its Config, plan() and run()."""


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


def load(fpath: pathlib.Path | str) -> Pipeline:
    """Read and check a pipeline TOML file (unknown keys and wrong types are `ConfigError`s naming the key)."""
    fpath = pathlib.Path(fpath)
    data = configs.load_toml(fpath)
    if "config_dpath" in data:
        raise configs.ConfigError(f"{fpath}: 'config_dpath' is set by the launcher, not the config")
    pipeline = configs.from_dict(Pipeline, data, where=str(fpath))
    return dataclasses.replace(pipeline, config_dpath=fpath.resolve().parent)


def make_plan(pipeline: Pipeline) -> Plan:
    """Compute every stage's keys and pieces, from configs only (nothing is read from the artifacts)."""
    plan: Plan = {}
    for name in STAGES:
        plan[name] = MODULES[name].plan(pipeline, plan)
    return plan


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
    arts = [(name, art) for name in STAGES for art in plan[name].artifacts if art.check().state != "missing"]
    total = 0
    for _, art in arts:
        with_sizes = art.check()  # cheap: only to size the progress line
        if with_sizes.state == "done":
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
        best = None
        for key, old_params, old_inputs, finished in earlier:
            if key == art.key:
                continue
            diffs = _diff(old_params, params, "") + [
                f"input {k}" for k in sorted(set(old_inputs) | set(stage_plan.inputs[art.key]))
                if old_inputs.get(k) != stage_plan.inputs[art.key].get(k)
            ]
            if best is None or (len(diffs), finished) < (len(best[1]), best[2]) or (
                len(diffs) == len(best[1]) and finished > best[2]
            ):
                best = (key, diffs, finished)
        if best is None:  # nothing to compare with (a first run): nothing to explain
            continue
        key, diffs, _ = best
        shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        line = f"{art.ref}: new key; {name}/{key} differs in {shown or 'nothing recorded (format version?)'}"
        if name == "dump" and "dataset_files" in diffs:
            files = dump_stage.changed_files(
                artifacts.Artifact(pipeline.root, name, key), stage_plan.info[art.key]["fingerprint"]
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
    plan = make_plan(pipeline)
    stage_plan = plan[stage]
    by_id = {piece.id: piece for piece in stage_plan.pieces}
    unknown = [pid for pid in piece_ids if pid not in by_id]
    if unknown:
        raise ValueError(f"stage '{stage}' has no piece(s) {unknown}; did the config change since submission?")
    module = MODULES[stage]
    touched: dict[str, artifacts.Artifact] = {}
    if os.environ.get("SLURM_JOB_ID"):
        # Slurm's pre-timeout signal (submitit asks for USR2 before the limit): finish the current training step,
        # save a checkpoint, requeue. Replaces submitit's handler, which would requeue without saving.
        signal.signal(signal.SIGUSR2, training.request_checkpoint)
    try:
        _run(pipeline, plan, stage, module, [by_id[pid] for pid in piece_ids], touched)
    except training.Preempted as err:
        requeue(err)
    for art in touched.values():
        seal(pipeline, stage_plan, art)


def requeue(err: Exception) -> None:
    """Requeue this Slurm job (it resumes from its checkpoint when it runs again); outside Slurm, re-raise."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise err
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    logger.warning("%s; requeueing job %s", err, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    sys.exit(-1)  # Slurm stops this run and starts the job again; as submitit does after its own requeue


def _run(pipeline, plan, stage, module, pieces, touched) -> None:
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
            if hasattr(module, "finalize"):  # e.g. join per-chunk labels, write index files
                module.finalize(pipeline, {stage_plan.name: stage_plan}, art)
            extra = getattr(module, "manifest_extra", None)
            art.write_manifest(
                params=stage_plan.params[art.key],
                inputs=stage_plan.inputs[art.key],
                started=started.isoformat(timespec="seconds"),
                extra=extra(pipeline, art) if extra else None,
            )
            logger.info("%s: sealed %s (%d pieces)", stage_plan.name, art.ref, len(pieces))
    return True
