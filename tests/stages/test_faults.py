"""Nothing lost, nothing silent: kill the launcher with SIGKILL at points inside every stage, run two launches at
once, fill the disk; the rerun's best.json equals a clean run's, and no artifact missing a file is ever done.

These run the real launcher in subprocesses (`python launch.py`), so they are marked slow; CI runs them explicitly.
"""

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from saev import artifacts, checksums
from tests.helpers import small_tmpfs, start_launch, write_tiny_config

pytestmark = pytest.mark.slow


def best_of(root: pathlib.Path) -> dict:
    (fpath,) = root.glob("reduce/*/best.json")
    return json.loads(fpath.read_text())


def assert_done_means_complete(root: pathlib.Path) -> None:
    """Every artifact with a manifest has every file the manifest lists, at its size."""
    for manifest in root.glob("*/*/manifest.json"):
        stage, key = manifest.parent.parent.name, manifest.parent.name
        artifacts.Artifact(root, stage, key).verify()


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> pathlib.Path:
    """The artifact root of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("clean")
    cfg = write_tiny_config(tmp, tmp / "runs")
    proc = start_launch(cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return tmp / "runs"


@pytest.fixture(scope="module")
def reference(clean_root) -> dict:
    return best_of(clean_root)


def kill_when(proc: subprocess.Popen, root: pathlib.Path, pattern: str) -> None:
    deadline = time.monotonic() + 240
    while not list(root.glob(pattern)):
        assert proc.poll() is None, f"launcher ended before {pattern} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{pattern} never appeared"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


KILL_POINTS = [
    ("dump-mid-shards", "dump/*/acts000002.bin"),
    ("dump-labels", "dump/*/labels.bin"),
    ("train-checkpoint", "train/*/.checkpoint.safetensors"),
    ("train-weights", "train/*/sae.safetensors"),
    ("mask-keep", "mask/*/keep.npy"),
    ("score-partial", "score/*/partials/block00001.safetensors"),
    ("reduce-results", "reduce/*/best.json"),
]


@pytest.mark.parametrize("pattern", [p for _, p in KILL_POINTS], ids=[n for n, _ in KILL_POINTS])
def test_sigkill_then_rerun_gives_clean_result(tmp_path, reference, pattern):
    root = tmp_path / "runs"
    cfg = write_tiny_config(tmp_path, root)
    if "checkpoint" in pattern:  # checkpoint often enough that the kill lands between checkpoints
        cfg.write_text(cfg.read_text().replace("[train]\n", "[train]\ncheckpoint_every = 3\n"))
    kill_when(start_launch(cfg), root, pattern)
    assert_done_means_complete(root)
    assert not list(root.glob("reduce/*/manifest.json")) or pattern.startswith("reduce")

    rerun = start_launch(cfg)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert_done_means_complete(root)
    assert best_of(root) == reference


def test_killed_dump_resumes_without_rewriting_finished_shards(tmp_path, clean_root):
    root = tmp_path / "runs"
    cfg = write_tiny_config(tmp_path, root)
    kill_when(start_launch(cfg, "--stage", "dump", "--only"), root, "dump/*/parts/labels000001.npy")
    (dump_dpath,) = root.glob("dump/*")
    # A shard is finished once its labels part is written (after its activations): only those must be kept as they
    # are. An activation file without its labels part (the write-behind thread was killed between them) is redone.
    finished = {
        f"acts{p.stem.removeprefix('labels')}.bin": (dump_dpath / f"acts{p.stem.removeprefix('labels')}.bin")
        .stat()
        .st_mtime_ns
        for p in (dump_dpath / "parts").glob("labels*.npy")
    }
    assert "acts000000.bin" in finished
    rerun = start_launch(cfg, "--stage", "dump", "--only")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert "resuming at shard" in out
    for name, mtime_ns in finished.items():
        assert (dump_dpath / name).stat().st_mtime_ns == mtime_ns, f"{name} was rewritten"
    (clean_dump,) = clean_root.glob("dump/*")
    assert clean_dump.name == dump_dpath.name
    for fpath in sorted(clean_dump.glob("*.bin")) + [clean_dump / "metadata.json", clean_dump / "shards.json"]:
        assert (dump_dpath / fpath.name).read_bytes() == fpath.read_bytes(), fpath.name


def test_two_launches_at_once_run_each_piece_once(tmp_path, reference):
    root = tmp_path / "runs"
    cfg = write_tiny_config(tmp_path, root)
    procs = [start_launch(cfg) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    log = "\n".join(outs)
    running = [line.split("] ", 3)[-1] for line in log.splitlines() if line.endswith(": running")]
    assert running and len(running) == len(set(running)), running  # no piece ran twice
    assert_done_means_complete(root)
    assert best_of(root) == reference


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_is_a_clear_error_and_leaves_no_manifest(tmp_path):
    with small_tmpfs(tmp_path / "disk", "600k") as disk:
        cfg = write_tiny_config(tmp_path, disk / "runs")
        proc = start_launch(cfg, "--stage", "dump")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, out
        assert "error: could not write" in out and "(disk full?)" in out, out
        assert not list((disk / "runs").glob("*/*/manifest.json"))
        assert not list((disk / "runs").glob("dump/*/.*.tmp-*"))  # the failed write cleaned up after itself


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_while_gathering_the_kept_rows_is_an_error_and_a_rerun_recovers(tmp_path, reference):
    """The kept activations were written through a memory map: with a little space left (264 KiB, less than the file)
    the score task died by SIGBUS (exit 135) and left its temp file. Now: one `error:` line naming the file, exit 1,
    no temp file, the same again on a rerun, and once space is freed a rerun gives the clean run's best.json."""
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        root = disk / "runs"
        cfg = write_tiny_config(tmp_path, root)
        for stage in ("dump", "train", "mask"):  # everything before the kept rows, with room to spare
            proc = start_launch(cfg, "--stage", stage, "--only")
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as fd:  # leave 264 KiB; the kept rows need about 512 KiB
            for _ in range((free - (264 << 10)) >> 12):
                fd.write(bytes(4096))
        for _ in range(2):
            proc = start_launch(cfg)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 1, out
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "could not write" in errors[0] and "(disk full?)" in errors[0], out
            assert f"{root / 'kept'}/" in errors[0] and "acts.npy" in errors[0], errors
            assert not list(root.rglob(f"*{checksums.TMP_MARK}*")), list(root.rglob(f"*{checksums.TMP_MARK}*"))
        (disk / "filler").unlink()
        proc = start_launch(cfg)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert_done_means_complete(root)
        assert best_of(root) == reference
