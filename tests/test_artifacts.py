"""The artifact contract: keys, atomic writes, manifests, completeness, locks."""

import dataclasses
import os
import pathlib

import pytest

from saev import artifacts


@dataclasses.dataclass(frozen=True)
class Cfg:
    lr: float = 1e-3
    n: int = 4
    device: str = artifacts.unhashed("cpu")


@dataclasses.dataclass(frozen=True)
class OtherCfg:
    lr: float = 1e-3
    n: int = 4


def key_of(cfg, inputs=None, version=1):
    return artifacts.get_key("train", version, artifacts.hashed_params(cfg), inputs or {})


def test_key_is_stable_across_calls_and_processes():
    # A literal: if hashing ever changes, every user's artifacts would be recomputed. Change it on purpose only.
    assert key_of(Cfg()) == key_of(Cfg())
    assert key_of(Cfg()) == artifacts.get_key(
        "train", 1, {"__class__": "Cfg", "lr": 1e-3, "n": 4}, {}
    )
    assert len(key_of(Cfg())) == 16


def test_key_changes_with_result_changing_field():
    assert key_of(Cfg(lr=2e-3)) != key_of(Cfg())
    assert key_of(Cfg(n=5)) != key_of(Cfg())


def test_key_ignores_unhashed_field():
    assert key_of(Cfg(device="cuda")) == key_of(Cfg())


def test_key_changes_with_inputs_version_and_class():
    assert key_of(Cfg(), {"dump": "dump/aaaa"}) != key_of(Cfg(), {"dump": "dump/bbbb"})
    assert key_of(Cfg(), version=2) != key_of(Cfg())
    assert key_of(OtherCfg()) != key_of(Cfg())


def test_key_refuses_nan():
    with pytest.raises(ValueError):
        artifacts.get_key("train", 1, {"lr": float("nan")}, {})


def test_no_manifest_means_not_done(tmp_path):
    art = artifacts.Artifact(tmp_path, "train", "abc")
    artifacts.atomic_write_bytes(art.dpath / "sae.safetensors", b"weights")
    assert not art.is_done()
    with pytest.raises(artifacts.IncompleteArtifactError, match="manifest.json is missing"):
        art.verify()


def test_manifest_lists_files_and_marks_done(tmp_path):
    art = artifacts.Artifact(tmp_path, "score", "abc")
    artifacts.atomic_write_bytes(art.dpath / "partials" / "block00000.safetensors", b"12345")
    manifest = art.write_manifest(params={"a": 1}, inputs={"dump": "dump/x"}, started=artifacts.now())
    assert art.is_done()
    assert manifest["files"] == {"partials/block00000.safetensors": 5}
    assert art.verify()["inputs"] == {"dump": "dump/x"}


def test_verify_names_missing_and_truncated_files(tmp_path):
    art = artifacts.Artifact(tmp_path, "dump", "abc")
    artifacts.atomic_write_bytes(art.dpath / "acts000000.bin", b"x" * 10)
    artifacts.atomic_write_bytes(art.dpath / "acts000001.bin", b"x" * 10)
    art.write_manifest(params={}, inputs={}, started=artifacts.now())
    with open(art.dpath / "acts000000.bin", "wb") as fd:
        fd.write(b"x" * 3)
    with pytest.raises(artifacts.IncompleteArtifactError, match="acts000000.bin has 3 bytes"):
        art.verify()
    (art.dpath / "acts000000.bin").unlink()
    with pytest.raises(artifacts.IncompleteArtifactError, match="acts000000.bin is missing"):
        art.verify()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    fpath = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(fpath) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_until_rename(tmp_path):
    fpath = tmp_path / "out.json"
    artifacts.atomic_write_json(fpath, {"v": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(fpath) as tmp:
            tmp.write_text('{"v": 2')
            raise RuntimeError("killed")
    assert fpath.read_text().strip().endswith("}")
    assert '"v": 1' in fpath.read_text()


def test_write_error_on_unwritable_dir_names_file(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file fails for everyone.
        blocker = tmp_path / "file"
        blocker.write_text("")
        target = blocker / "sub" / "x.bin"
    else:
        target = pathlib.Path("/proc/x.bin")
    with pytest.raises(OSError, match="x.bin"):
        artifacts.atomic_write_bytes(target, b"data")


def test_lock_is_exclusive_and_released(tmp_path):
    art = artifacts.Artifact(tmp_path, "train", "abc")
    with art.lock():
        # flock locks are per open file description, so a second open in the same process conflicts too.
        with pytest.raises(artifacts.ArtifactBusyError, match="train/abc"):
            with art.lock():
                pass
        with art.lock("block00001"):  # a different part of the same artifact is independent
            pass
    with art.lock():
        pass


def test_temp_and_lock_files_are_not_listed(tmp_path):
    art = artifacts.Artifact(tmp_path, "train", "abc")
    with art.lock():
        artifacts.atomic_write_bytes(art.dpath / "a.bin", b"1")
        (art.dpath / ".a.bin.tmp-123").write_bytes(b"junk")
    assert art.list_files() == {"a.bin": 1}
