"""`launch.py --gc`: list, then with --yes delete, every artifact under the root that the given configs no longer reach."""

import pathlib
import re

from stages import pipeline as pl
from tests.helpers import run


def artifact_dirs(root: pathlib.Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in root.glob("*/*")}


def reseed_mask(config: pathlib.Path) -> pathlib.Path:
    """A copy of the config with another mask seed: new mask, kept, score and reduce keys; dump and train the same."""
    other = config.with_name("reseeded.toml")
    text = config.read_text()
    assert "seed = 0" in text
    other.write_text(text.replace("seed = 0", "seed = 7"))
    return other


def refs(config: pathlib.Path, *stages: str) -> set[str]:
    plan = pl.make_plan(pl.load(config))
    return {art.ref for name in stages for art in plan[name].artifacts}


def test_gc_lists_what_no_config_reaches_with_its_bytes_and_deletes_nothing(copy_of_done, capsys):
    root = copy_of_done.parent / "runs"
    before = artifact_dirs(root)
    old = refs(copy_of_done, "mask", "kept", "score", "reduce")
    assert run(reseed_mask(copy_of_done), gc=True) == 0
    out = capsys.readouterr().out
    listed = dict(re.findall(r"unreached: (\S+)  (\d+) bytes", out))
    assert {"/".join(pathlib.Path(p).parts[-2:]) for p in listed} == old
    for dpath, n_bytes in listed.items():
        assert int(n_bytes) == sum(f.stat().st_size for f in pathlib.Path(dpath).rglob("*") if f.is_file()) > 0
    assert f"{len(old)} artifact(s), {sum(int(n) for n in listed.values())} bytes" in out and "--gc --yes" in out
    assert artifact_dirs(root) == before


def test_gc_yes_deletes_only_the_unreached_artifacts(copy_of_done, capsys):
    root = copy_of_done.parent / "runs"
    reseeded = reseed_mask(copy_of_done)
    kept = refs(copy_of_done, "dump", "train")
    old = refs(copy_of_done, "mask", "kept", "score", "reduce")
    assert artifact_dirs(root) == kept | old
    assert run(reseeded, gc=True, yes=True) == 0
    assert f"gc: deleted {len(old)} artifact(s)" in capsys.readouterr().out
    assert artifact_dirs(root) == kept
    for ref in kept:  # what is left is intact
        stage, key = ref.split("/")
        assert pl.make_plan(pl.load(copy_of_done))[stage].by_key(key).check("all").state == "done"
    assert run(reseeded) == 0  # the reseeded config runs on the dump and SAEs that were kept
    assert "dump: done, skipping" in capsys.readouterr().out


def test_gc_keeps_what_any_config_given_reaches(copy_of_done, capsys):
    root = copy_of_done.parent / "runs"
    before = artifact_dirs(root)
    assert run(reseed_mask(copy_of_done), gc=True, yes=True, keep_configs=(copy_of_done,)) == 0
    assert "nothing to delete" in capsys.readouterr().out
    assert artifact_dirs(root) == before


def test_gc_removes_a_link_not_what_it_points_to(copy_of_done, capsys):
    root = copy_of_done.parent / "runs"
    (target,) = refs(copy_of_done, "reduce")
    link = root / "reduce" / "0123456789abcdef"
    link.symlink_to(root / target)
    assert run(copy_of_done, gc=True, yes=True) == 0
    assert re.search(rf"deleting: {link}  0 bytes", capsys.readouterr().out)
    assert not link.is_symlink() and (root / target / "best.json").is_file()


def test_gc_is_refused_while_a_lock_is_held(copy_of_done, capsys):
    root = copy_of_done.parent / "runs"
    before = artifact_dirs(root)
    plan = pl.make_plan(pl.load(copy_of_done))
    with plan["dump"].artifact.lock():  # as a running job holds it
        assert run(reseed_mask(copy_of_done), gc=True, yes=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{plan['dump'].artifact.dpath / '.lock'} is held by a running process" in err
    assert artifact_dirs(root) == before


def test_gc_keeps_a_stages_own_bookkeeping(copy_of_done, capsys):
    """Dot-names under a stage's directory (e.g. `dump/.adopted/`, the checksums first taken of adopted sources, which
    must outlive the artifacts) are not artifacts: never listed, never deleted."""
    root = copy_of_done.parent / "runs"
    ledger = root / "dump" / ".adopted" / "0123abcd.json"
    ledger.parent.mkdir()
    ledger.write_text("{}")
    assert run(reseed_mask(copy_of_done), gc=True, yes=True) == 0
    assert ".adopted" not in capsys.readouterr().out
    assert ledger.read_text() == "{}"
