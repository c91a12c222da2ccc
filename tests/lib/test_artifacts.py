"""The artifact contract: keys, atomic writes, manifests, completeness, locks."""

import dataclasses
import os
import pathlib

import pytest
import xxhash

from saev import artifacts, atomic, checksums
from tests.helpers import flip_byte


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
    assert key_of(Cfg()) == artifacts.get_key("train", 1, {"__class__": "Cfg", "lr": 1e-3, "n": 4}, {})
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
    atomic.atomic_write_bytes(art.dpath / "sae.safetensors", b"weights")
    assert not art.is_done()
    with pytest.raises(artifacts.IncompleteArtifactError, match="manifest.json is missing"):
        art.verify()


def test_manifest_lists_files_and_marks_done(tmp_path):
    art = artifacts.Artifact(tmp_path, "score", "abc")
    atomic.atomic_write_bytes(art.dpath / "partials" / "block00000.safetensors", b"12345")
    manifest = art.write_manifest(params={"a": 1}, inputs={"dump": "dump/x"}, started=artifacts.now())
    assert art.is_done()
    assert manifest["files"] == {
        "partials/block00000.safetensors": {"size": 5, "xxh3_128": xxhash.xxh3_128_hexdigest(b"12345")}
    }
    assert art.verify()["inputs"] == {"dump": "dump/x"}


def test_verify_names_missing_and_truncated_files(tmp_path):
    art = artifacts.Artifact(tmp_path, "dump", "abc")
    atomic.atomic_write_bytes(art.dpath / "acts000000.bin", b"x" * 10)
    atomic.atomic_write_bytes(art.dpath / "acts000001.bin", b"x" * 10)
    art.write_manifest(params={}, inputs={}, started=artifacts.now())
    with open(art.dpath / "acts000000.bin", "wb") as fd:
        fd.write(b"x" * 3)
    with pytest.raises(artifacts.IncompleteArtifactError, match="acts000000.bin has 3 bytes"):
        art.verify()
    assert not art.manifest_fpath.exists()  # unsealed: rerunning the stage recomputes it
    art = _done_artifact(tmp_path, key="def")
    (art.dpath / "acts000000.bin").unlink()
    with pytest.raises(artifacts.IncompleteArtifactError, match="acts000000.bin is missing"):
        art.verify()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    fpath = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(fpath) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_until_rename(tmp_path):
    fpath = tmp_path / "out.json"
    atomic.atomic_write_json(fpath, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(fpath) as tmp:
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
        atomic.atomic_write_bytes(target, b"data")


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
        atomic.atomic_write_bytes(art.dpath / "a.bin", b"1")
        (art.dpath / ".a.bin.tmp-123").write_bytes(b"junk")
    assert art.list_files() == {"a.bin": 1}


def _done_artifact(tmp_path, stage="dump", key="abc", **files: bytes) -> artifacts.Artifact:
    art = artifacts.Artifact(tmp_path, stage, key)
    for name, data in (files or {"acts000000.bin": b"a" * 64, "acts000001.bin": b"b" * 64}).items():
        atomic.atomic_write_bytes(art.dpath / name, data)
    art.write_manifest(params={"p": 1}, inputs={}, started=artifacts.now())
    return art


def test_checksums_are_recorded_while_writing(tmp_path):
    """Streamed writers hash as they write; the manifest's checksum equals a hash of the file read back."""
    fpath = tmp_path / "big.bin"
    with atomic.atomic_file(fpath) as fd:
        for i in range(5):
            fd.write(bytes([i]) * 1000)
    assert checksums.recorded_checksum(fpath) == (5000, checksums.file_checksum(fpath))
    assert checksums.is_intact(fpath)
    with open(fpath, "ab") as fd:
        fd.write(b"x")
    assert not checksums.is_intact(fpath)


def test_same_size_corruption_is_caught_by_a_checked_read_not_by_the_cheap_check(tmp_path):
    art = _done_artifact(tmp_path)
    flip_byte(art.dpath / "acts000001.bin", 3)
    assert art.check().state == "done"  # sizes only
    health = art.check("changed")
    assert health.state == "damaged"
    assert [p.rel for p in health.problems] == ["acts000001.bin"]
    with pytest.raises(artifacts.DamagedArtifactError, match="acts000001.bin does not match its checksum"):
        art.verify()
    # verify unsealed it and moved the bad file aside, so rerunning the stage recomputes it
    assert not art.manifest_fpath.exists()
    assert not (art.dpath / "acts000001.bin").exists() and (art.dpath / ".acts000001.bin.corrupt").exists()


def test_changed_check_hashes_only_files_touched_since_verified(tmp_path, monkeypatch):
    art = _done_artifact(tmp_path)
    hashed = []
    real = checksums.file_checksum
    monkeypatch.setattr(checksums, "file_checksum", lambda f, *a: hashed.append(f.name) or real(f, *a))
    assert art.check("changed").state == "done" and hashed == []
    os.utime(art.dpath / "acts000000.bin")  # touched, not changed: hashed once, then trusted again
    assert art.check("changed").state == "done" and hashed == ["acts000000.bin"]
    assert art.check("changed").state == "done" and hashed == ["acts000000.bin"]
    assert art.check("all").state == "done" and sorted(hashed[1:]) == ["acts000000.bin", "acts000001.bin"]


def test_corruption_under_a_restored_mtime_is_still_caught(tmp_path):
    art = _done_artifact(tmp_path)
    fpath = art.dpath / "acts000000.bin"
    st = fpath.stat()
    flip_byte(fpath, 3)
    os.utime(fpath, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime still moves
    assert art.check("changed").state == "damaged"


@pytest.mark.parametrize(
    "text", ["{not json", "", "[]", '{"files": 3}', "\udcff", '{"stage": "dump", "key": "abc", "files": {"a": [1]}}']
)
def test_unreadable_manifest_is_damaged_not_done(tmp_path, text):
    art = _done_artifact(tmp_path)
    art.manifest_fpath.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\udcff" else b"\xff\xfe")
    assert not art.is_done()
    health = art.check()
    assert health.state == "damaged" and health.problems[0].rel == "manifest.json"
    with pytest.raises(artifacts.IncompleteArtifactError, match="manifest.json"):
        art.verify()


def test_a_link_to_another_keys_directory_is_not_done_and_repair_removes_only_the_link(tmp_path):
    other = _done_artifact(tmp_path, key="other")
    art = artifacts.Artifact(tmp_path, "dump", "mine")
    art.dpath.parent.mkdir(parents=True, exist_ok=True)
    art.dpath.symlink_to(other.dpath)
    health = art.check()
    assert health.state == "damaged" and "names dump/other, not dump/mine" in health.problems[0].what
    art.repair(health)
    assert not art.dpath.exists() and other.is_done()


def test_recorded_params_must_match(tmp_path):
    art = _done_artifact(tmp_path)
    assert art.check(params={"p": 1}).state == "done"
    assert art.check(params={"p": 2}).state == "damaged"


def test_verify_file_catches_a_changed_piece(tmp_path):
    fpath = tmp_path / "labels000000.npy"
    atomic.atomic_write_bytes(fpath, b"0123456789")
    artifacts.verify_file(fpath)
    flip_byte(fpath, 3)
    with pytest.raises(artifacts.DamagedArtifactError, match="labels000000.npy does not match"):
        artifacts.verify_file(fpath)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"acts000000.bin": "x"}', ""])
def test_a_broken_verified_record_only_means_hashing_again(tmp_path, text):
    art = _done_artifact(tmp_path)
    (art.dpath / ".verified.json").write_text(text)
    assert art.check("changed").state == "done"
    flip_byte(art.dpath / "acts000000.bin", 3)
    assert art.check("changed").state == "damaged"


@pytest.mark.parametrize("record", ["{not json", '{"size": 3}', '{"size": "x", "xxh3_128": 1}', ""])
def test_a_broken_checksum_record_makes_the_piece_not_intact_or_unknown(tmp_path, record):
    """A checksum record that cannot be read counts as none (the file only has to exist, as for older stores); one
    that names another size makes the piece not done, so it is written again."""
    fpath = tmp_path / "block00000.safetensors"
    atomic.atomic_write_bytes(fpath, b"0123456789")
    checksums.sum_fpath(fpath).write_text(record)
    assert checksums.recorded_checksum(fpath) is None or not checksums.is_intact(fpath)
    checksums.sum_fpath(fpath).write_text('{"size": 11, "xxh3_128": "00"}')
    assert not checksums.is_intact(fpath)


def test_a_record_with_a_wrong_checksum_is_never_sealed(tmp_path):
    """A checksum record that disagrees with its file (and carries no stat signature, as an earlier version's) is not
    trusted when sealing: the file is hashed, set aside and its piece recomputed (wasted work, never a wrong result)."""
    fpath = tmp_path / "dump" / "abc" / "acts000000.bin"
    art = artifacts.Artifact(tmp_path, "dump", "abc")
    atomic.atomic_write_bytes(fpath, b"a" * 64)
    checksums.write_record(fpath, 64, "0" * 32)
    with pytest.raises(artifacts.DamagedArtifactError, match="acts000000.bin changed after its job wrote it"):
        art.write_manifest(params={}, inputs={}, started=artifacts.now())
    assert not art.manifest_fpath.exists() and not fpath.exists()


###########################################
# Sealing trusts a record only while the  #
# file keeps the stat it was recorded at  #
###########################################


def _unsealed(tmp_path, n=3) -> artifacts.Artifact:
    """A score-like artifact whose pieces were written by their jobs, not sealed yet (an interrupted run)."""
    art = artifacts.Artifact(tmp_path, "score", "abc")
    for i in range(n):
        atomic.atomic_write_bytes(art.dpath / "partials" / f"block{i:05d}.safetensors", bytes([i]) * 100)
    return art


def _restore_mtime(fpath: pathlib.Path, edit) -> None:
    st = fpath.stat()
    edit(fpath)
    os.utime(fpath, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("edit", [
    lambda f: flip_byte(f, 3),  # same size, other contents
    lambda f: _restore_mtime(f, lambda g: flip_byte(g, 3)),  # ... with the modification time put back
    lambda f: f.write_bytes(f.read_bytes()[:50]),  # truncated
    lambda f: f.write_bytes(f.read_bytes() + b"x"),  # grown
    lambda f: f.write_bytes(bytes([7]) * 100),  # another piece's contents (another key's), same size
], ids=["same-size", "mtime-restored", "truncated", "grown", "other-contents"])  # fmt: skip
def test_a_piece_edited_before_sealing_is_moved_aside_not_sealed(tmp_path, caplog, edit):
    art = _unsealed(tmp_path)
    fpath = art.dpath / "partials" / "block00001.safetensors"
    edit(fpath)
    with pytest.raises(artifacts.DamagedArtifactError) as err:
        art.write_manifest(params={}, inputs={}, started=artifacts.now())
    assert str(err.value).startswith(f"{fpath} changed after its job wrote it") and "rerun to recompute it" in str(
        err.value
    )
    assert not art.manifest_fpath.exists() and not fpath.exists() and checksums.recorded_checksum(fpath) is None
    assert (fpath.parent / ".block00001.safetensors.corrupt").exists()
    assert "block00001.safetensors changed after its job wrote it" in caplog.text  # the warning line of a job's log


def test_an_untouched_piece_is_sealed_from_its_record_a_touched_one_hashed_once(tmp_path, monkeypatch):
    art = _unsealed(tmp_path)
    hashed = []
    real = checksums.file_checksum
    monkeypatch.setattr(checksums, "file_checksum", lambda f, *a: hashed.append(f.name) or real(f, *a))
    os.utime(art.dpath / "partials" / "block00002.safetensors")  # touched, same contents
    manifest = art.write_manifest(params={}, inputs={}, started=artifacts.now())
    assert hashed == ["block00002.safetensors"]
    for rel, entry in manifest["files"].items():
        assert entry[checksums.CHECKSUM] == real(art.dpath / rel)
    assert art.check("changed").state == "done" and hashed == ["block00002.safetensors"]


def test_a_record_left_without_its_stat_by_a_killed_job_means_hashing_before_sealing(tmp_path, monkeypatch):
    """A job killed between renaming a piece into place and recording its stat leaves the record of the
    write without it: the file is hashed (and sealed when it matches)."""
    art = _unsealed(tmp_path, n=1)
    fpath = art.dpath / "partials" / "block00000.safetensors"
    size, digest = checksums.recorded_checksum(fpath)
    checksums.write_record(fpath, size, digest)
    assert checksums.read_record(fpath).sig is None and checksums.is_intact(fpath)
    hashed = []
    real = checksums.file_checksum
    monkeypatch.setattr(checksums, "file_checksum", lambda f, *a: hashed.append(f.name) or real(f, *a))
    art.write_manifest(params={}, inputs={}, started=artifacts.now())
    assert hashed == ["block00000.safetensors"] and art.is_done()


def test_the_check_before_a_run_finds_a_piece_edited_in_an_unsealed_artifact(tmp_path):
    art = _unsealed(tmp_path)
    fpath = art.dpath / "partials" / "block00000.safetensors"
    assert art.check("changed").state == "missing"  # nothing edited: not done, nothing wrong
    _restore_mtime(fpath, lambda f: flip_byte(f, 3))
    assert art.check().state == "missing"  # the cheap check reads no file
    health = art.check("changed")
    assert health.state == "damaged" and [p.rel for p in health.problems] == ["partials/block00000.safetensors"]
    assert "changed after its job wrote it" in health.describe(art)
    assert art.repair(health) == ["moved partials/block00000.safetensors aside"]
    assert not fpath.exists() and art.check("changed").state == "missing"
    art.write_manifest(params={}, inputs={}, started=artifacts.now())  # the other pieces are sealed as written
    assert sorted(art.read_manifest()["files"]) == [
        "partials/block00001.safetensors",
        "partials/block00002.safetensors",
    ]


def test_current_checksum_trusts_a_record_only_at_its_stat(tmp_path):
    fpath = tmp_path / "acts000000.bin"
    atomic.atomic_write_bytes(fpath, b"a" * 64)
    assert checksums.current_checksum(fpath) == checksums.file_checksum(fpath)
    _restore_mtime(fpath, lambda f: flip_byte(f, 3))
    assert checksums.recorded_checksum(fpath)[1] != checksums.file_checksum(fpath)
    assert checksums.current_checksum(fpath) == checksums.file_checksum(fpath)
