"""The job body: what a Slurm job or the local executor runs for a list of pieces of one stage.

It recomputes the plan from the root config (a job needs nothing but the config to run), checks every input the
pieces read, runs each piece under its artifact's lock, and seals the artifacts once all their pieces exist.
"""

import datetime
import logging
import signal
import typing

from saev import artifacts, atomic, errors, helpers, preemption, slurm

from .plan import Piece, Plan, Registry, RootConfig, StagePlan

logger = logging.getLogger("stages")


def verify_inputs(registry: Registry, pipeline: RootConfig, plan: Plan, stage: str, key: str) -> None:
    """Refuse to start when an input artifact is incomplete or damaged (afterok alone is not trusted).

    Each input must have a manifest naming its key and the params the plan expects, with every file present at its
    recorded size, and each file changed since it was last verified must match its checksum (`Artifact.verify`);
    a damaged input is unsealed so that rerunning its stage recomputes it. An input whose pieces all exist but whose
    manifest is missing (its last job died between writing its piece and sealing) is sealed here first.
    """
    for art in plan[stage].input_artifacts(key, pipeline.root):
        if not art.is_done() and art.stage in plan and art.check().state == "missing":
            seal(registry, pipeline, plan[art.stage], art)
        try:
            art.verify(params=plan[art.stage].params.get(art.key) if art.stage in plan else None)
        except artifacts.IncompleteArtifactError as err:
            raise artifacts.IncompleteArtifactError(
                f"stage '{stage}' cannot start: input {err} (`--stage {art.stage}`)"
            ) from None


def run_pieces(registry: Registry, pipeline: RootConfig, stage: str, piece_ids: typing.Sequence[str]) -> None:
    """Job body: run the named pieces of one stage (skipping done ones), then seal the artifacts they belong to.

    This is what a Slurm job or the local executor calls. It recomputes the plan from the pipeline config, so a job
    needs nothing but the config to run.
    """
    helpers.setup_logging()  # a Slurm job starts with no log handler: progress lines must reach its log file
    helpers.use_allocated_cpus(logger)  # as many torch threads as CPUs given, not the node's cores (logged)
    plan = registry.plan(pipeline)
    stage_plan = plan[stage]
    by_id = {piece.id: piece for piece in stage_plan.pieces}
    unknown = [pid for pid in piece_ids if pid not in by_id]
    if unknown:
        raise errors.UserConfigError(
            f"stage '{stage}' has no piece(s) {unknown}; did the config change since submission?"
        )
    touched: dict[str, artifacts.Artifact] = {}
    if slurm.job_id() is not None:
        # Slurm's pre-timeout signal (submitit asks for USR2 before the limit): finish the current training step,
        # save a checkpoint, requeue. Replaces submitit's handler, which would requeue without saving.
        signal.signal(signal.SIGUSR2, preemption.request_checkpoint)
    try:
        with errors.machine_refusals(f"stage '{stage}'"):  # a full disk or a refused permission: the user's to fix
            _run(registry, pipeline, plan, stage, [by_id[pid] for pid in piece_ids], touched)
    except preemption.Preempted as err:
        slurm.requeue(err)  # outside Slurm: re-raised
    for art in touched.values():
        seal(registry, pipeline, stage_plan, art)


def _run(
    registry: Registry,
    pipeline: RootConfig,
    plan: Plan,
    stage: str,
    pieces: list[Piece],
    touched: dict[str, artifacts.Artifact],
) -> None:
    module = registry[stage]
    inputs = registry.inputs(stage, plan)
    # Many pieces in one job (local runs, several K-blocks): a line with rate and ETA at most every 10 s.
    for piece in helpers.Progress(pieces, desc=stage, unit="pieces", logger=logger) if len(pieces) > 1 else pieces:
        art = piece.artifact
        touched[art.key] = art
        if piece.is_done():
            logger.info("%s %s: already done, skipping", stage, piece.label)
            continue
        verify_inputs(registry, pipeline, plan, stage, art.key)
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
                atomic.remove_temp_files(art.dpath)
            else:
                atomic.remove_temp_files(piece.fpath.parent, piece.fpath.name)
            logger.info("%s %s: running", stage, piece.label)
            module.run(pipeline, plan[stage], inputs, piece)


def seal(registry: Registry, pipeline: RootConfig, stage_plan: StagePlan, art: artifacts.Artifact) -> bool:
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
            started = datetime.datetime.fromtimestamp(first_mtime, datetime.UTC)
            module = registry[stage_plan.name]
            if module.finalize is not None:  # e.g. join per-chunk labels, write index files
                module.finalize(pipeline, stage_plan, art)
            art.write_manifest(
                params=stage_plan.params[art.key],
                inputs=stage_plan.inputs[art.key],
                started=started.isoformat(timespec="seconds"),
                extra=module.manifest_extra(pipeline, art) if module.manifest_extra is not None else None,
            )
            logger.info("%s: sealed %s (%d pieces)", stage_plan.name, art.ref, len(pieces))
    return True
