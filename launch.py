"""Find, for every class, the sparse-autoencoder latent that best detects it.

Plans the stage graph (dump -> train, mask -> kept -> score -> reduce) from one TOML config, skips what is already
done, and runs the rest: locally in order, or on Slurm with every missing stage submitted at once (afterok chains)
and the launcher returning right after submission.

    uv run launch.py --stage all                      # the built-in demo, on CPU
    uv run launch.py --stage all --dry-run            # print the plan only
    uv run launch.py --status                         # what is done, partial or missing
    uv run launch.py --stage score --config my.toml   # (re)run one stage: only its missing pieces
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
import tempfile
import time
import traceback
import typing

import tyro

# Keep jaxtyped library code out of this module: submitit pickles the job function from stages.pipeline, not here.
# The stages (torch, open_clip) are imported when a command needs them, so that `--help` answers at once.
from saev import best, errors, helpers, preemption, slurm
from saev.engine import executors, store

if typing.TYPE_CHECKING:
    from stages import pipeline as pl

Stage = typing.Literal["dump", "train", "mask", "kept", "score", "reduce", "all"]


@dataclasses.dataclass(frozen=True)
class Args:
    """Run or submit the pipeline described by one TOML config."""

    stage: Stage = "all"
    """Stage to (re)run: dump, train, mask, kept, score, reduce, or all. Runs that stage's missing pieces, then whatever downstream is not done (see --only). Done pieces are skipped."""
    config: pathlib.Path = pathlib.Path("configs/demo.toml")
    """The pipeline config (TOML). The default is the built-in demo that runs on CPU in a few minutes."""
    dry_run: bool = False
    """Print the plan (every stage, its key, done/partial/missing, and what would run) and exit."""
    status: bool = False
    """Print the status of every stage and piece and exit (same table as --dry-run, with file paths)."""
    executor: typing.Literal["auto", "local", "slurm"] = "auto"
    """Where to run: 'local' (this process, in order), 'slurm' (submit with submitit), or 'auto' (slurm when the config has a [slurm] section)."""
    only: bool = False
    """With --stage NAME: run that stage alone, not the stages downstream of it."""
    root: pathlib.Path | None = None
    """Override the artifact root from the config (e.g. a scratch directory)."""
    export: pathlib.Path | None = None
    """Write the config's dump (it must be done) in the saev library's 2.x layout as EXPORT/saev/shards/<hash>/ (with its class names as classes.txt there) and its SAEs as EXPORT/saev/saes/<train key>/sae.pt, for saev's own tools, and exit; files already there are reused if identical, never overwritten; adopt it back with [dump.adopt]."""
    gc: bool = False
    """List every artifact under the root that this config (and --keep-configs) no longer reach, with its size, and exit; nothing is deleted without --yes. Refused while any artifact under the root is locked (a run is writing)."""
    yes: bool = False
    """With --gc: delete what it lists."""
    keep_configs: tuple[pathlib.Path, ...] = ()
    """With --gc: more pipeline configs whose artifacts (planned under the same root) are kept too."""
    verify: bool = False
    """Hash every file of every artifact this config uses and compare with the checksums in its manifest; report each bad file and what was made from it, unseal the damaged artifacts (a rerun recomputes them) and exit 1 if any."""


def _stages():
    """The pipeline and reduce stage modules (imported on first use: they bring in torch and open_clip)."""
    from stages import pipeline, reduce

    return pipeline, reduce


def selected_stages(stage: str, only: bool) -> list[str]:
    """`all`: every stage; a stage name: that stage and the stages downstream of it (unless `only`).

    Done stages and pieces are always skipped, so `--stage score` after one K-block failed reruns that block and
    then the reduce that waits on it.
    """
    pl, _ = _stages()
    if stage == "all":
        return list(pl.STAGES)
    if only:
        return [stage]
    return list(pl.STAGES[pl.STAGES.index(stage) :])


def describe_plan(
    pipeline: pl.Pipeline, plan: pl.Plan, stages: list[str], *, verbose: bool = False, jobs: dict | None = None
) -> str:
    """The plan as a table: stage, key(s), state, pieces done, action; with `verbose`, every piece not done
    (and, on Slurm, its job's state, and for a failed job its log file and last lines)."""
    pl, _ = _stages()
    jobs = jobs or {}
    lines = [f"{'stage':<8} {'key':<18} {'state':<8} {'pieces':>9}  action"]
    for name, stage_plan in plan.items():
        n_done = sum(piece.is_done() for piece in stage_plan.pieces)
        n_total = len(stage_plan.pieces)
        state = stage_plan.state()
        active = [p for p in stage_plan.pieces if jobs.get(p.id, ("", ""))[1] in slurm.ACTIVE_STATES]
        if name not in stages:
            action = "-"
        elif state == "done":
            action = "skip (done)"
        elif n_done == n_total:
            action = "seal"
        else:
            action = f"run {n_total - n_done - len(active)} piece(s)"
            if active:
                action += f", {len(active)} already queued"
        keys = stage_plan.artifacts
        key = keys[0].key if len(keys) == 1 else f"{len(keys)} artifacts"
        lines.append(f"{name:<8} {key:<18} {state:<8} {n_done:>4}/{n_total:<4}  {action}")
        if name in stages and state != "done":
            lines.extend(f"    why: {why}" for why in store.explain(pl.REGISTRY, pipeline, plan, name))
        if not verbose:
            continue
        for art in stage_plan.artifacts:
            lines.append(f"    {art.dpath}  {'done' if art.is_done() else 'not done'}")
        for piece in stage_plan.pieces:
            if piece.is_done():
                continue
            job_id, job_state = jobs.get(piece.id, (None, None))
            if job_id is None:
                lines.append(f"    missing: {piece.label}")
                continue
            lines.append(f"    {job_state.lower()}: {piece.label} (job {job_id})")
            if job_state not in slurm.ACTIVE_STATES and pipeline.slurm is not None:
                _, err_fpath = slurm.log_fpaths(pipeline.slurm, name, job_id)
                lines.append(f"      log: {err_fpath}")
                lines.extend(f"      | {line}" for line in slurm.tail(err_fpath).splitlines())
    return "\n".join(lines)


_say = functools.partial(print, flush=True)
"""How the pipeline's progress lines reach the user: stdout, flushed at once so that they keep their place among
the log lines on stderr."""

EXIT_CODES: dict[errors.Kind, int] = {"config": 2, "input": 1, "environment": 1}
"""The exit code of each kind of `errors.UserError` (the one place they are mapped): 2 for a config to fix, 1 for
the data, a damaged or missing input, or the machine. A bug of ours also exits 1, after its traceback."""


def main(args: Args) -> int:
    """Run the launcher; every error a user can cause or fix (an `errors.UserError`) is one `error:` line and the
    exit code of its kind (`EXIT_CODES`); anything else is our bug: its traceback is printed and kept in a log file
    whose path is printed last."""
    helpers.setup_logging()
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume (finished pieces are kept)", file=sys.stderr)
        return 130
    except errors.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODES[err.kind]
    except preemption.Preempted as err:
        print(f"error: {err}; run the same command again to resume", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 -- a bug of ours: keep the whole story
        text = traceback.format_exc()
        fpath = _crash_log(text)
        print(text, file=sys.stderr, end="")
        print(
            f"error: unexpected {type(err).__name__}: {err} (a bug in the pipeline, please report it); "
            f"traceback saved to {fpath}",
            file=sys.stderr,
        )
        return 1


def _gc(args: Args, pipeline: pl.Pipeline, plan: pl.Plan) -> int:
    """`--gc [--yes]`: list (and with --yes delete) every artifact under the root that no config given reaches."""
    pl, _ = _stages()
    plans = [plan]
    for fpath in args.keep_configs:
        try:
            other = dataclasses.replace(pl.load(fpath), root=pipeline.root)
            plans.append(pl.make_plan(other))
        except errors.UserConfigError as err:
            raise errors.UserConfigError(f"--keep-configs {fpath}: {err}") from err
    held = store.held_locks(pipeline.root)
    if held:
        print(f"error: {held[0]} is held by a running process ({len(held)} lock(s) under {pipeline.root}): "
              "garbage collection waits until no run writes to the root", file=sys.stderr)  # fmt: skip
        return 1
    garbage = store.unreached(pl.REGISTRY, pipeline.root, plans)
    total = sum(g.n_bytes for g in garbage)
    if not garbage:
        print(f"gc: every artifact under {pipeline.root} is reached by the config(s) given: nothing to delete")
        return 0
    for g in garbage:
        print(f"{'deleting' if args.yes else 'unreached'}: {g.dpath}  {g.n_bytes} bytes ({g.n_bytes / 2**20:.1f} MiB)")
    if not args.yes:
        print(f"gc: {len(garbage)} artifact(s), {total} bytes ({total / 2**20:.1f} MiB) would be deleted; "
              "run again with --gc --yes to delete them")  # fmt: skip
        return 0
    with errors.machine_refusals("--gc"):
        store.gc(garbage)
    print(f"gc: deleted {len(garbage)} artifact(s), {total} bytes ({total / 2**20:.1f} MiB)")
    return 0


def _crash_log(text: str) -> pathlib.Path | str:
    """Save a traceback under logs/crashes/ (or the temp dir); returns where it went."""
    name = f"launch-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    for dpath in (pathlib.Path("logs") / "crashes", pathlib.Path(tempfile.gettempdir())):
        try:
            dpath.mkdir(parents=True, exist_ok=True)
            (dpath / name).write_text(" ".join(sys.argv) + "\n" + text)
            return (dpath / name).resolve()
        except OSError:
            continue
    return "(nowhere: no writable logs/ or temp dir)"


def _main(args: Args) -> int:
    pl, reduce_stage = _stages()
    pipeline = pl.load(args.config)
    if args.root is not None:
        pipeline = dataclasses.replace(pipeline, root=args.root)
    executor = args.executor
    if executor == "auto":
        executor = "slurm" if pipeline.slurm is not None else "local"
    if executor == "slurm" and pipeline.slurm is None:
        print(f"error: --executor slurm needs a [slurm] section in {args.config}", file=sys.stderr)
        return 2

    plan = pl.make_plan(pipeline)
    stages = selected_stages(args.stage, args.only)
    print(f"config: {args.config}  root: {pipeline.root}  executor: {executor}")
    if args.export is not None:
        from stages import export

        with errors.machine_refusals(f"--export {args.export}"):
            for line in export.export(pipeline, plan, args.export):
                print(line)
        return 0
    if args.gc:
        return _gc(args, pipeline, plan)
    if args.verify:
        lines, n_arts, n_bytes = store.verify_store(plan)
        for line in lines:
            print(line)
        print(
            f"verified {n_arts} artifact(s), {n_bytes / 2**20:.1f} MiB hashed: "
            + (
                f"{sum(line.startswith('bad: ') for line in lines)} bad file(s)"
                if lines
                else "every file matches its checksum"
            )
        )
        return 1 if lines else 0
    if not (args.dry_run or args.status):
        try:
            for line in store.repair_store(pl.REGISTRY, plan, stages):
                print(f"warning: {line}", file=sys.stderr, flush=True)
        except OSError as err:  # listing or unsealing the store: the root is unreadable or not writable
            raise errors.UserEnvironmentError(f"cannot check the artifacts under {pipeline.root}: {err}") from err
    jobs = executors.piece_jobs(plan) if executor == "slurm" else {}
    print(describe_plan(pipeline, plan, stages, verbose=args.status, jobs=jobs), flush=True)
    if args.dry_run or args.status:
        pl.check_configs(pipeline, plan, stages)  # what a real run would refuse from the config alone
        return 0

    pl.check_inputs(pipeline, plan, stages)
    # On Slurm the launcher returns once submitted: the summary below only when all was done.
    runner = executors.Slurm(pl.REGISTRY, pl.run_pieces, jobs) if executor == "slurm" else executors.Local(pl.REGISTRY)
    runner.run(pipeline, plan, stages, say=_say)

    reduce_art = plan["reduce"].artifacts[0]
    if reduce_art.is_done():
        result = best.read(reduce_art.dpath / "best.json")
        print(f"\nbest latent per class ({result.n_patches} kept patches): {reduce_art.dpath / 'best.json'}")
        print(reduce_stage.format_table(result, pipeline.reduce.print_top))
        for line in reduce_stage.format_health(result):
            print(line)
        table_fpath = reduce_art.dpath / "table.json"
        if table_fpath.is_file() and (rows := best.read_table(table_fpath)):
            select = pipeline.reduce.select
            print(
                f"\nthe table (report patches; each class's latent chosen by {select} on the select split): {table_fpath}"
            )
            print(best.format_table(rows))
        index_fpath = reduce_art.dpath / "report" / "index.html"
        if index_fpath.is_file():
            print(f"report: {index_fpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
