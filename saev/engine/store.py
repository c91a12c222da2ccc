"""The artifact store before and around a run: checks of the configs and inputs, repair of damaged artifacts,
`--verify`, why a stage has work to do (`explain`), what was made from what (`downstream`), and garbage collection
of what no config reaches (`gc`).
"""

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import shutil
import stat
import typing

from saev import artifacts, helpers

from .plan import Plan, Registry, RootConfig

logger = logging.getLogger("stages")


def check_configs(registry: Registry, pipeline: RootConfig, plan: Plan, stages: typing.Sequence[str]) -> None:
    """The checks that need only the config and the dataset listing (`StageModule.check` of every selected stage
    not done), so that `--dry-run` and `--status` refuse what a real run would (e.g. a keep-mask larger than the
    dump); nothing is read from the artifacts."""
    for name in stages:
        module = registry[name]
        if module.check is not None and plan[name].state() != "done":
            module.check(pipeline, plan[name], registry.inputs(name, plan))


def check_inputs(registry: Registry, pipeline: RootConfig, plan: Plan, stages: typing.Sequence[str]) -> None:
    """Fail before running or submitting anything: a stage's own checks (`StageModule.check`), and inputs that are
    neither done nor part of this launch (`IncompleteArtifactError` naming the stage to run first)."""
    check_configs(registry, pipeline, plan, stages)
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


def repair_store(registry: Registry, plan: Plan, stages: typing.Sequence[str]) -> list[str]:
    """Before a run: check every artifact the selected stages write or read against its manifest, hashing each file
    changed since it was last verified, and unseal the damaged ones (`Artifact.repair`), so that the run recomputes
    exactly what is needed. Returns one line per damaged artifact (what was wrong, what was done)."""
    lines = []
    for name in registry.upstream_and(stages):
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


def verify_store(plan: Plan) -> tuple[list[str], int, int]:
    """`launch.py --verify`: hash every file of every artifact the config uses and compare with its manifest.

    Damaged artifacts are reported file by file, with the artifacts downstream that were made from them, and unsealed
    so that rerunning recomputes them. Returns (report lines, artifacts checked, bytes hashed).
    """
    arts, total = [], 0
    for name, stage_plan in plan.items():
        for art in stage_plan.artifacts:
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
    for stage_plan in plan.values():
        for art in stage_plan.artifacts:
            if frontier & set(stage_plan.inputs[art.key].values()):
                found.append(art.ref)
                frontier.add(art.ref)
    return found


def explain(registry: Registry, pipeline: RootConfig, plan: Plan, name: str, limit: int = 2) -> list[str]:
    """Why a stage has work to do: for up to `limit` of its artifacts that were never made, the closest earlier
    artifact of the stage under the same root and what differs (params, inputs; and what the stage's `explain_key`
    hook adds, e.g. which dataset files)."""
    stage_plan = plan[name]
    health = {a.key: a.check() for a in stage_plan.artifacts}
    new = [a for a in stage_plan.artifacts if health[a.key].state == "missing" and a.damage_note() is None]
    lines = [
        f"{a.ref} is damaged: {health[a.key].describe(a)}"
        for a in stage_plan.artifacts
        if health[a.key].state == "damaged"
    ][:limit]
    lines += [
        f"{a.ref} was unsealed: {a.damage_note()}"
        for a in stage_plan.artifacts
        if health[a.key].state == "missing" and a.damage_note()
    ][:limit]
    if not new:
        return lines
    earlier = []
    for fpath in sorted((pipeline.root / name).glob("*/manifest.json"))[:500]:
        try:
            manifest = json.loads(fpath.read_text())
            earlier.append((manifest["key"], manifest["params"], manifest["inputs"], manifest.get("finished", "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    hook = registry[name].explain_key
    for art in new[:limit]:
        params = json.loads(artifacts.canonical_json(stage_plan.params[art.key]))
        candidates = []  # the fewest differences first, then the most recent
        for key, old_params, old_inputs, _finished in sorted(earlier, key=lambda e: e[3], reverse=True):
            if key == art.key:
                continue
            diffs = _diff(old_params, params, "") + [
                f"input {k}"
                for k in sorted(set(old_inputs) | set(stage_plan.inputs[art.key]))
                if old_inputs.get(k) != stage_plan.inputs[art.key].get(k)
            ]
            candidates.append((key, diffs))
        if not candidates:  # nothing to compare with (a first run): nothing to explain
            continue
        key, diffs = min(candidates, key=lambda c: len(c[1]))
        shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        line = f"{art.ref}: new key; {name}/{key} differs in {shown or 'nothing recorded (format version?)'}"
        more = hook(pipeline, stage_plan, art, artifacts.Artifact(pipeline.root, name, key), diffs) if hook else None
        lines.append(line + (f"; {more}" if more else ""))
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


class Garbage(typing.NamedTuple):
    """An artifact directory under the root that no config given reaches (see `unreached`)."""

    dpath: pathlib.Path
    """`<root>/<stage>/<key>` (a directory, or a link to one)."""
    n_bytes: int
    """Bytes its files take (links count for nothing: what they point to is not deleted)."""


def unreached(registry: Registry, root: pathlib.Path, plans: typing.Sequence[Plan]) -> list[Garbage]:
    """Every `<root>/<stage>/<key>` of a registered stage that is no artifact of any of `plans` (each planned with
    this root), with its size; other directories under the root are not looked at, nor a stage's own bookkeeping
    (dot-names, e.g. `dump/.adopted/`, the checksums taken of adopted sources, kept for every key)."""
    reached = {art.ref for plan in plans for stage_plan in plan.values() for art in stage_plan.artifacts}
    out = []
    for name in registry.names:
        stage_dpath = root / name
        if not stage_dpath.is_dir():
            continue
        for dpath in sorted(stage_dpath.iterdir()):
            if dpath.name.startswith(".") or f"{name}/{dpath.name}" in reached:
                continue
            if not (dpath.is_dir() or dpath.is_symlink()):
                continue
            out.append(Garbage(dpath, _n_bytes(dpath)))
    return out


def _n_bytes(dpath: pathlib.Path) -> int:
    if dpath.is_symlink():
        return 0
    total = 0
    for fpath in dpath.rglob("*"):
        with contextlib.suppress(OSError):
            st = fpath.lstat()
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def held_locks(root: pathlib.Path) -> list[pathlib.Path]:
    """The artifact locks (`Artifact.lock`) under the root that a live process holds now."""
    held = []
    for lock_fpath in sorted(root.glob("*/*/.lock*")):
        with _try_lock(lock_fpath) as got:
            if not got:
                held.append(lock_fpath)
    return held


@contextlib.contextmanager
def _try_lock(lock_fpath: pathlib.Path) -> typing.Iterator[bool]:
    """Hold the flock of `lock_fpath` while in the block if nobody else does (yields whether it is held)."""
    try:
        fd = os.open(lock_fpath, os.O_RDONLY)
    except OSError:  # vanished or unreadable: nothing to hold
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def gc(garbage: typing.Sequence[Garbage]) -> None:
    """Delete the unreached artifacts, each while holding every lock in it (a link is removed, not what it points
    to; links inside an artifact, e.g. an adopted dump's, are removed without touching their targets).

    Raises:
        ArtifactBusyError: a process holds a lock of one of them (those before it are deleted).
    """
    for item in garbage:
        if item.dpath.is_symlink():
            item.dpath.unlink()
            continue
        with contextlib.ExitStack() as stack:
            for lock_fpath in sorted(item.dpath.glob(".lock*")):
                if not stack.enter_context(_try_lock(lock_fpath)):
                    raise artifacts.ArtifactBusyError(
                        f"{item.dpath} is being written by another process (lock {lock_fpath})"
                    )
            shutil.rmtree(item.dpath)
