"""How the missing pieces of the selected stages get run, behind one interface (`Executor.run`): in this process, in
order (`Local`), or submitted to Slurm at once with `afterok` chains (`Slurm`), with the job ledger that keeps a piece
from being submitted twice (`Ledger`, `piece_jobs`).
"""

import dataclasses
import json
import pathlib
import time
import typing
from collections.abc import Callable

from saev import atomic, helpers, slurm
from saev.slurm import SlurmConfig

from . import job
from .plan import Piece, Plan, Registry, RootConfig, StagePlan


class Executor(typing.Protocol):
    """Runs (or submits) the missing pieces of the selected stages, in dependency order."""

    def run(
        self, pipeline: RootConfig, plan: Plan, stages: typing.Sequence[str], *, say: Callable[[str], None]
    ) -> None:
        """`say` gets one line per stage (skipped, running or submitted, done)."""
        ...


@dataclasses.dataclass(frozen=True)
class Local:
    """Run the pieces in this process, stage after stage."""

    registry: Registry
    """The stages."""

    def run(
        self, pipeline: RootConfig, plan: Plan, stages: typing.Sequence[str], *, say: Callable[[str], None]
    ) -> None:
        for name in stages:
            stage_plan = plan[name]
            missing = stage_plan.missing()
            if not missing and stage_plan.state() == "done":
                say(f"{name}: done, skipping")
                continue
            say(f"{name}: running {len(missing)} piece(s)")
            start = time.perf_counter()
            ids = [piece.id for piece in missing] or [stage_plan.pieces[0].id]  # all pieces exist: one seals
            job.run_pieces(self.registry, pipeline, name, ids)
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
        atomic.atomic_write_json(self.fpath, {**self.read(), **jobs})


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


def stage_slurm(registry: Registry, pipeline: RootConfig, name: str) -> SlurmConfig:
    """The Slurm settings stage `name` is submitted with: `pipeline.slurm`, with the stage's resources replaced by
    what its `slurm_resources` hook asks for (e.g. an adopted dump's job asks for no GPU)."""
    assert pipeline.slurm is not None
    hook = registry[name].slurm_resources
    if hook is None:
        return pipeline.slurm
    return dataclasses.replace(pipeline.slurm, **{name: hook(pipeline, pipeline.slurm.resources(name))})


@dataclasses.dataclass(frozen=True)
class Slurm:
    """Submit every missing piece of the selected stages at once, each stage waiting (afterok) on the jobs of the
    stages whose artifacts it reads; pieces whose job is already pending or running (`jobs`, from `piece_jobs`) are not submitted
    again (their job ids become dependencies instead). Every job queued is recorded in its artifact's `Ledger`, also
    when a later submission fails (`slurm.SlurmError`, re-raised)."""

    registry: Registry
    """The stages."""
    job: Callable[[typing.Any, str, list[str]], None]
    """The job body submitit pickles: `job(pipeline, stage, piece_ids)`, a module-level function that runs
    `job.run_pieces` with this registry (submitit pickles functions by reference)."""
    jobs: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """Piece id -> (job id, state) of the pieces already submitted (`piece_jobs`)."""

    def run(
        self, pipeline: RootConfig, plan: Plan, stages: typing.Sequence[str], *, say: Callable[[str], None]
    ) -> None:
        self.submit(pipeline, plan, stages, say=say)

    def submit(
        self, pipeline: RootConfig, plan: Plan, stages: typing.Sequence[str], *, say: Callable[[str], None]
    ) -> dict[str, list[str]]:
        """`run`, returning stage -> job ids (submitted now or already queued)."""
        assert pipeline.slurm is not None
        names = self.registry.names
        waiting_on: dict[str, list[str]] = {}
        for name in stages:
            stage_plan = plan[name]
            if stage_plan.state() == "done":
                say(f"{name}: done, skipping")
                continue
            queued = {pid: job for pid, (job, state) in self.jobs.items() if state in slurm.ACTIVE_STATES}
            missing = stage_plan.missing() or [stage_plan.pieces[0]]  # all pieces exist: one task seals
            todo = [p for p in missing if p.id not in queued]
            reuse = [queued[p.id] for p in missing if p.id in queued]
            # Each stage waits on the stages whose artifacts it reads (those wait on theirs: afterok chains).
            reads = {ref.split("/")[0] for refs in stage_plan.inputs.values() for ref in refs.values()}
            after = [job for upstream in names if upstream in reads for job in waiting_on.get(upstream, [])]
            after = slurm.array_ids(after)
            args = [(pipeline, name, [piece.id]) for piece in todo]
            try:
                job_ids = slurm.submit(stage_slurm(self.registry, pipeline, name), name, self.job, args, after=after)
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
        mine = {p.id: j for p, j in zip(pieces, job_ids, strict=False) if p.artifact.key == art.key}
        if mine:
            Ledger(art.dpath).record(mine)
