"""Find, for every class, the sparse-autoencoder latent that best detects it.

Plans the five-stage graph (dump -> train -> mask -> score -> reduce) from one TOML config, skips what is already
done, and runs the rest: locally in order, or on Slurm with every missing stage submitted at once (afterok chains)
and the launcher returning right after submission.

    uv run launch.py --stage all                      # the built-in demo, on CPU
    uv run launch.py --stage all --dry-run            # print the plan only
    uv run launch.py --status                         # what is done, partial or missing
    uv run launch.py --stage score --config my.toml   # (re)run one stage: only its missing pieces
"""

import dataclasses
import pathlib
import sys
import time
import typing

import tyro

# Keep jaxtyped library code out of this module: submitit pickles the job function from stages.pipeline, not here.
from saev import artifacts, configs, helpers
from stages import pipeline as pl

Stage = typing.Literal["dump", "train", "mask", "score", "reduce", "all"]


@dataclasses.dataclass(frozen=True)
class Args:
    """Run or submit the pipeline described by one TOML config."""

    stage: Stage = "all"
    """Stage to run: one of dump, train, mask, score, reduce, or all. Only missing pieces run; done ones are skipped."""
    config: pathlib.Path = pathlib.Path("configs/demo.toml")
    """The pipeline config (TOML). The default is the built-in demo that runs on CPU in a few minutes."""
    dry_run: bool = False
    """Print the plan (every stage, its key, done/partial/missing, and what would run) and exit."""
    status: bool = False
    """Print the status of every stage and piece and exit (same table as --dry-run, with file paths)."""
    executor: typing.Literal["auto", "local", "slurm"] = "auto"
    """Where to run: 'local' (this process, in order), 'slurm' (submit with submitit), or 'auto' (slurm when the config has a [slurm] section)."""
    root: pathlib.Path | None = None
    """Override the artifact root from the config (e.g. a scratch directory)."""


def selected_stages(stage: str) -> list[str]:
    return list(pl.STAGES) if stage == "all" else [stage]


def describe_plan(plan: pl.Plan, stages: list[str], *, verbose: bool = False) -> str:
    """The plan as a table: stage, key(s), state, pieces done, action."""
    lines = [f"{'stage':<8} {'key':<18} {'state':<8} {'pieces':>9}  action"]
    for name, stage_plan in plan.items():
        n_done = sum(piece.is_done() for piece in stage_plan.pieces)
        n_total = len(stage_plan.pieces)
        state = stage_plan.state()
        if name not in stages:
            action = "-"
        elif state == "done":
            action = "skip (done)"
        elif n_done == n_total:
            action = "seal"
        else:
            action = f"run {n_total - n_done} piece(s)"
        keys = stage_plan.artifacts
        key = keys[0].key if len(keys) == 1 else f"{len(keys)} artifacts"
        lines.append(f"{name:<8} {key:<18} {state:<8} {n_done:>4}/{n_total:<4}  {action}")
        if verbose:
            for art in stage_plan.artifacts:
                lines.append(f"    {art.dpath}  {'done' if art.is_done() else 'not done'}")
            for piece in stage_plan.pieces:
                if not piece.is_done() and len(stage_plan.pieces) > 1:
                    lines.append(f"    missing: {piece.label}")
    return "\n".join(lines)


def run_local(pipeline: pl.Pipeline, plan: pl.Plan, stages: list[str]) -> None:
    for name in stages:
        stage_plan = plan[name]
        missing = stage_plan.missing()
        if not missing and stage_plan.state() == "done":
            print(f"{name}: done, skipping", flush=True)
            continue
        print(f"{name}: running {len(missing)} piece(s)", flush=True)
        start = time.perf_counter()
        ids = [piece.id for piece in missing] or [stage_plan.pieces[0].id]
        pl.run_pieces(pipeline, name, ids)
        print(f"{name}: done in {helpers.format_duration(time.perf_counter() - start)}", flush=True)


def submit_slurm(pipeline: pl.Pipeline, plan: pl.Plan, stages: list[str]) -> None:
    from saev import slurm

    assert pipeline.slurm is not None
    submitted: dict[str, list[str]] = {}
    for name in stages:
        stage_plan = plan[name]
        if stage_plan.state() == "done":
            print(f"{name}: done, skipping", flush=True)
            continue
        # Wait on the upstream stages submitted in this launch; done upstream stages need no dependency.
        after = [job for upstream in pl.STAGES[: pl.STAGES.index(name)] for job in submitted.get(upstream, [])]
        missing = stage_plan.missing() or [stage_plan.pieces[0]]  # all pieces exist: one task seals
        args = [(pipeline, name, [piece.id]) for piece in missing]
        job_ids = slurm.submit(pipeline.slurm, name, pl.run_pieces, args, after=slurm.array_ids(after))
        submitted[name] = job_ids
        shown = ", ".join(slurm.array_ids(job_ids))
        print(f"{name}: submitted {len(job_ids)} job(s) [{shown}]" + (f" after {', '.join(slurm.array_ids(after))}" if after else ""), flush=True)
    print(f"logs: {pipeline.slurm.log_dpath}/<stage>/<job id>/", flush=True)


def check_inputs(pipeline: pl.Pipeline, plan: pl.Plan, stages: list[str]) -> None:
    """Fail before running or submitting anything when a stage's inputs are neither done nor part of this launch."""
    for name in stages:
        module = pl.MODULES[name]
        if hasattr(module, "check") and plan[name].state() != "done":
            module.check(pipeline)
        for key in plan[name].inputs:
            for art in plan[name].input_artifacts(key, pipeline.root):
                if art.stage not in stages and not art.is_done() and plan[art.stage].missing():
                    raise artifacts.IncompleteArtifactError(
                        f"stage '{name}' needs {art.ref}, which is not done; run `--stage {art.stage}` (or `--stage all`) first"
                    )


def main(args: Args) -> int:
    helpers.setup_logging()
    try:
        pipeline = pl.load(args.config)
    except configs.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.root is not None:
        pipeline = dataclasses.replace(pipeline, root=args.root)
    executor = args.executor
    if executor == "auto":
        executor = "slurm" if pipeline.slurm is not None else "local"
    if executor == "slurm" and pipeline.slurm is None:
        print(f"error: --executor slurm needs a [slurm] section in {args.config}", file=sys.stderr)
        return 2

    try:
        plan = pl.make_plan(pipeline)
    except (configs.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stages = selected_stages(args.stage)
    print(f"config: {args.config}  root: {pipeline.root}  executor: {executor}")
    print(describe_plan(plan, stages, verbose=args.status), flush=True)
    if args.dry_run or args.status:
        return 0

    try:
        check_inputs(pipeline, plan, stages)
        if executor == "slurm":
            submit_slurm(pipeline, plan, stages)
            return 0
        run_local(pipeline, plan, stages)
    except (artifacts.IncompleteArtifactError, artifacts.ArtifactBusyError, configs.ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    reduce_art = plan["reduce"].artifacts[0]
    if reduce_art.is_done():
        import json

        with open(reduce_art.dpath / "best.json") as fd:
            result = json.load(fd)
        from stages import reduce

        print(f"\nbest latent per class ({result['n_patches']} kept patches): {reduce_art.dpath / 'best.json'}")
        print(reduce.format_table(result, pipeline.reduce.print_top))
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
