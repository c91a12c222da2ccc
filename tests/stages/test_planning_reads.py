"""Planning only reads: `--dry-run` and `--status` leave the store, and an adopted source directory, exactly as they
were (every name, size, modification time and link target under them), whatever state the store is in. Anything
that changes the store happens in a job, under the artifact's lock."""

import dataclasses
import json
import os
import pathlib
import shutil
import stat

import pytest

import launch
from stages import pipeline as pl
from tests.helpers import flip_byte
from tests.lib.data.test_saevfmt import adopt_config, adopt_copy, exported  # noqa: F401 -- `exported` is a fixture


def snapshot(*dpaths: pathlib.Path) -> dict[str, tuple | None]:
    """Path -> (file type, size, mtime in ns, link target) of each directory given and everything under it (None: it
    does not exist); directories included, since adding or removing an entry moves their mtime."""
    out: dict[str, tuple | None] = {}
    for dpath in dpaths:
        if not dpath.exists() and not dpath.is_symlink():
            out[str(dpath)] = None
            continue
        paths = [dpath] + [pathlib.Path(top) / name for top, dirs, files in os.walk(dpath) for name in dirs + files]
        for path in paths:
            st = path.lstat()
            target = os.readlink(path) if path.is_symlink() else None
            out[str(path)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, target)
    return out


def plan_only(cfg: pathlib.Path, *watched: pathlib.Path) -> None:
    """Run `--dry-run`, then `--status`: neither changes anything under `watched` (the root by default)."""
    watched = watched or (cfg.parent / "runs",)
    for flag in ("dry_run", "status"):
        before = snapshot(*watched)
        code = launch.main(dataclasses.replace(launch.Args(config=cfg), **{flag: True}))
        assert code in (0, 2), flag
        after = snapshot(*watched)
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        assert not changed, f"--{flag.replace('_', '-')} changed {changed[:5]}"


def test_a_fresh_root_is_not_even_made(tiny_config):
    plan_only(tiny_config)
    assert not (tiny_config.parent / "runs").exists()


def test_a_done_store(copy_of_done):
    plan_only(copy_of_done)


def test_an_interrupted_run_with_a_piece_edited_since(copy_of_done):
    """Unsealed artifacts, a missing piece and an edited one: the run would move the edited one aside; planning
    does not."""
    root = copy_of_done.parent / "runs"
    score = next(root.glob("score/*/manifest.json")).parent
    (score / "manifest.json").unlink()
    (score / "partials" / "block00001.safetensors").unlink()
    flip_byte(score / "partials" / "block00000.safetensors")
    for dpath in root.glob("reduce/*"):
        shutil.rmtree(dpath)
    plan_only(copy_of_done)


@pytest.mark.parametrize("damage", [
    lambda root: flip_byte(next(root.glob("dump/*/acts000001.bin"))),
    lambda root: next(root.glob("train/*/sae.safetensors")).unlink(),
    lambda root: next(root.glob("mask/*/manifest.json")).write_text("{"),
    lambda root: (next(root.glob("score/*/partials")) / ".block00000.safetensors.tmp-1").write_bytes(b"x"),
], ids=["shard-flipped", "weights-deleted", "manifest-broken", "temp-file-left"])  # fmt: skip
def test_a_damaged_store(copy_of_done, damage):
    damage(copy_of_done.parent / "runs")
    plan_only(copy_of_done)


def _adopted(exported, tmp_path) -> tuple[pathlib.Path, int]:  # noqa: F811
    """tmp_path/src adopted (its dump done); returns (config, layer)."""
    cfg, src = adopt_copy(exported, tmp_path)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    return cfg, json.loads((src / "metadata.json").read_text())["layers"][-1]


def test_an_adopted_source_moved_or_copied_elsewhere(exported, tmp_path):  # noqa: F811
    """Moved: the links dangle (the run adopts it again); copied: the run relinks the artifact. Planning neither."""
    cfg, layer = _adopted(exported, tmp_path)
    shutil.copytree(tmp_path / "src", tmp_path / "copy")
    cfg = adopt_config(tmp_path, tmp_path / "copy", layer=layer)
    dump = pl.make_plan(pl.load(cfg))["dump"]
    assert dump.state() != "done" and dump.artifacts[0].is_done()  # the same key, to be relinked
    plan_only(cfg, tmp_path / "runs", tmp_path / "src", tmp_path / "copy")
    (tmp_path / "src").rename(tmp_path / "moved")
    cfg = adopt_config(tmp_path, tmp_path / "moved", layer=layer)
    plan_only(cfg, tmp_path / "runs", tmp_path / "moved", tmp_path / "copy")


def test_an_adopted_source_edited(exported, tmp_path):  # noqa: F811
    cfg, _ = _adopted(exported, tmp_path)
    flip_byte(tmp_path / "src" / "acts000000.bin")
    plan_only(cfg, tmp_path / "runs", tmp_path / "src")
