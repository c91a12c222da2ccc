"""A user's mistake or a broken environment is one clear error naming the file (or what to check), never a traceback:
config and sweep files that are not UTF-8, directories or unreadable; an unreachable Slurm controller; a full disk
while writing SAE weights or training checkpoints."""

import errno
import logging
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import launch
from saev import artifacts, atomic, checkpoint, configs, errors, nn, slurm, sweep, training
from tests.helpers import REPO, small_tmpfs

NOT_UTF8 = b'# caf\xe9 (latin-1)\nroot = "runs"\n'
"""A TOML file saved in latin-1: byte 0xe9 is not valid UTF-8."""


def failing_open(fpath: pathlib.Path, err: OSError):
    """`os.open` that raises `err` for `fpath` (the one reader of user files opens them with it) and opens the rest."""
    real_open = os.open

    def fake_open(path, *args, **kwargs):
        if pathlib.Path(path) == fpath:
            raise err
        return real_open(path, *args, **kwargs)

    return fake_open


CONTROLLER_DOWN = "slurm_load_partitions: Unable to contact slurm controller (connect failure)"


################
# Config files #
################


def test_config_not_utf8_names_the_file(tmp_path):
    fpath = tmp_path / "latin1.toml"
    fpath.write_bytes(NOT_UTF8)
    with pytest.raises(configs.ConfigError, match=rf"{fpath} is not UTF-8 text \(byte 0xe9 at line 1\)"):
        configs.load_toml(fpath)


def test_config_directory_names_it(tmp_path):
    with pytest.raises(configs.ConfigError, match=rf"config path is a directory, not a file: {tmp_path}"):
        configs.load_toml(tmp_path)


@pytest.mark.parametrize(
    "err, msg",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "config file is not readable \\(permission denied\\)"),
        (OSError(errno.EIO, "Input/output error"), "cannot read config file .*: Input/output error"),
    ],
)
def test_config_unreadable_names_it(tmp_path, monkeypatch, err, msg):
    fpath = tmp_path / "a.toml"
    fpath.write_text('root = "runs"\n')

    monkeypatch.setattr(os, "open", failing_open(fpath, err))
    with pytest.raises(configs.ConfigError, match=msg) as info:
        configs.load_toml(fpath)
    assert str(fpath) in str(info.value)


def test_launcher_not_utf8_config_is_one_error_line(tmp_path, capsys):
    fpath = tmp_path / "latin1.toml"
    fpath.write_bytes(NOT_UTF8)
    assert launch.main(launch.Args(config=fpath)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(fpath) in err and "Traceback" not in err


def test_sweep_not_utf8_names_the_file(tmp_path):
    fpath = tmp_path / "sweep.toml"
    fpath.write_bytes(b"lr = [1e-3]\n# \xff\n")
    with pytest.raises(sweep.SweepError, match=rf"sweep file {fpath} is not UTF-8 text \(byte 0xff at line 2\)"):
        sweep.load_sweep(fpath, training.TrainConfig)


def test_sweep_directory_names_it(tmp_path):
    with pytest.raises(sweep.SweepError, match=rf"sweep path is a directory, not a file: {tmp_path}"):
        sweep.load_sweep(tmp_path, training.TrainConfig)


@pytest.mark.parametrize(
    "err, msg",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "sweep file is not readable \\(permission denied\\): {f}"),
        (OSError(errno.EIO, "Input/output error"), "cannot read sweep file {f}: Input/output error"),
    ],
)
def test_sweep_unreadable_names_it(tmp_path, monkeypatch, err, msg):
    fpath = tmp_path / "sweep.toml"
    fpath.write_text("lr = [1e-3]\n")

    monkeypatch.setattr(os, "open", failing_open(fpath, err))
    with pytest.raises(sweep.SweepError, match=msg.format(f=fpath)):
        sweep.load_sweep(fpath, training.TrainConfig)


@pytest.mark.parametrize("case", ["not-utf8", "directory"])
def test_launcher_bad_sweep_is_one_error_line(tiny_config, capsys, case):
    sweep_fpath = tiny_config.parent / "tiny-sweep.toml"
    if case == "not-utf8":
        sweep_fpath.write_bytes(sweep_fpath.read_bytes() + b"# \xe9\n")
    else:
        sweep_fpath.unlink()
        sweep_fpath.mkdir()
    assert launch.main(launch.Args(config=tiny_config, dry_run=True)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(sweep_fpath) in err


#########
# Slurm #
#########


def _job(x: int) -> int:
    return x


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> pathlib.Path:
    """A directory first on PATH with `srun`, `sbatch`, `sacct`, `squeue` and `sinfo` that behave like a login
    node whose controller is down: the message on stderr, exit 1. Tests replace single scripts."""
    bin_dpath = tmp_path / "bin"
    bin_dpath.mkdir()
    for name in ("srun", "sbatch", "sacct", "squeue", "sinfo"):
        _script(bin_dpath / name, f'echo "{name}: error: {CONTROLLER_DOWN}" >&2\nexit 1')
    monkeypatch.setenv("PATH", f"{bin_dpath}{os.pathsep}{os.environ['PATH']}")
    return bin_dpath


def _script(fpath: pathlib.Path, body: str) -> None:
    fpath.write_text("#!/bin/sh\n" + textwrap.dedent(body) + "\n")
    fpath.chmod(fpath.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_submit_unreachable_controller_is_slurm_error(fake_slurm, tmp_path, n_jobs):
    cfg = slurm.SlurmConfig(log_dpath=tmp_path / "logs")
    with pytest.raises(slurm.SlurmError) as info:
        slurm.submit(cfg, "score", _job, [(i,) for i in range(n_jobs)])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("sbatch failed for stage 'score': sbatch: error: " + CONTROLLER_DOWN), msg
    assert "`sinfo`" in msg
    assert isinstance(info.value, RuntimeError)


def test_submit_reports_arrays_already_submitted(fake_slurm, tmp_path):
    counter = tmp_path / "n"
    _script(
        fake_slurm / "sbatch",
        f"""\
        if [ -e {counter} ]; then echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1; fi
        touch {counter}; echo "Submitted batch job 4242"
        """,
    )
    cfg = slurm.SlurmConfig(log_dpath=tmp_path / "logs", max_array_size=2)
    with pytest.raises(slurm.SlurmError, match=r"Invalid account; .*\(already submitted for this stage: 4242\)$"):
        slurm.submit(cfg, "score", _job, [(i,) for i in range(4)])
    with pytest.raises(slurm.SlurmError) as info:  # the counter file exists now: the first array fails too
        slurm.submit(cfg, "score", _job, [(i,) for i in range(4)])
    assert info.value.submitted == ()
    counter.unlink()
    with pytest.raises(slurm.SlurmError) as info:
        slurm.submit(cfg, "score", _job, [(i,) for i in range(4)])
    assert info.value.submitted == ("4242_0", "4242_1")


def test_submit_garbled_sbatch_output_is_slurm_error(fake_slurm, tmp_path):
    _script(fake_slurm / "sbatch", "echo 'sbatch: something unexpected'")
    with pytest.raises(slurm.SlurmError, match="sbatch failed for stage 'train': Could not make sense of sbatch"):
        slurm.submit(slurm.SlurmConfig(log_dpath=tmp_path / "logs"), "train", _job, [(1,)])


def test_submit_without_sbatch_is_slurm_error(fake_slurm, tmp_path, monkeypatch):
    (fake_slurm / "sbatch").unlink()
    monkeypatch.setenv("PATH", str(fake_slurm))  # srun only: no sbatch anywhere
    with pytest.raises(slurm.SlurmError, match="sbatch not found on PATH; .*--executor local"):
        slurm.submit(slurm.SlurmConfig(log_dpath=tmp_path / "logs"), "mask", _job, [(1,)])


def test_submit_without_srun_is_slurm_error(fake_slurm, tmp_path, monkeypatch):
    (fake_slurm / "srun").unlink()
    monkeypatch.setenv("PATH", str(fake_slurm))
    with pytest.raises(slurm.SlurmError, match="cannot submit stage 'dump': Could not detect \"srun\""):
        slurm.submit(slurm.SlurmConfig(log_dpath=tmp_path / "logs"), "dump", _job, [(1,)])


def test_job_states_unreachable_controller_is_unknown_with_one_warning(fake_slurm, caplog):
    with caplog.at_level(logging.WARNING, logger="saev.slurm"):
        states = slurm.job_states(["12_0", "12_1", "13"])
    assert states == {"12_0": "UNKNOWN", "12_1": "UNKNOWN", "13": "UNKNOWN"}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert CONTROLLER_DOWN in msg and "`sinfo`" in msg and "\n" not in msg


def test_job_states_hanging_sacct_times_out_to_squeue(fake_slurm):
    _script(fake_slurm / "sacct", "exec sleep 30")
    _script(fake_slurm / "squeue", "echo '12_0|RUNNING'\necho '13|PENDING'")
    assert slurm.job_states(["12_0", "13"], timeout_s=0.5) == {"12_0": "RUNNING", "13": "PENDING"}


def test_job_states_without_slurm_commands_is_unknown(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with caplog.at_level(logging.WARNING, logger="saev.slurm"):
        assert slurm.job_states(["7"]) == {"7": "UNKNOWN"}
    assert "could not run" in caplog.text


#############
# Full disk #
#############


def _assert_disk_full(err: BaseException, fpath: pathlib.Path) -> None:
    assert isinstance(err, atomic.WriteError)
    assert str(err).startswith(f"could not write {fpath} (disk full?)"), str(err)


def test_sae_save_on_full_disk_is_write_error(tmp_path):
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=64, exp_factor=8))  # ~264 KB of weights > 200 KB
    with small_tmpfs(tmp_path / "disk") as dpath:
        with pytest.raises(atomic.WriteError) as info:
            nn.save(sae, dpath / "sae")
        _assert_disk_full(info.value, dpath / "sae" / nn.WEIGHTS_FNAME)
        assert [p for p in (dpath / "sae").iterdir() if not p.name.startswith(".")] == []  # no temp file left behind


def test_checkpoint_save_on_full_disk_is_write_error_and_keeps_the_previous(tmp_path):
    with small_tmpfs(tmp_path / "disk") as dpath:
        fpath = dpath / "ckpt.safetensors"
        checkpoint.save(fpath, {"w": torch.ones(10)}, kind="test", version=1, meta={"step": 1})
        with pytest.raises(atomic.WriteError) as info:
            checkpoint.save(fpath, {"w": torch.zeros(100_000)}, kind="test", version=1, meta={"step": 2})
        _assert_disk_full(info.value, fpath)
        assert checkpoint.load(fpath, kind="test", version=1)[1] == {"step": 1}
        assert [p.name for p in dpath.iterdir() if not p.name.startswith(".")] == ["ckpt.safetensors"]


def test_kept_activations_on_a_full_disk_are_a_write_error_not_sigbus(tmp_path):
    """The kept activations were written through a memory map: on a full tmpfs a store into a mapped page kills the
    process with SIGBUS. Run in a child process so that a SIGBUS fails the test instead of ending the session."""
    with small_tmpfs(tmp_path / "disk") as dpath:
        code = textwrap.dedent(f"""
            import pathlib, numpy as np
            from saev import atomic, scoring
            try:
                scoring.write_kept(pathlib.Path({str(dpath / "kept" / "acts.npy")!r}),
                                   lambda a, b: np.ones((b - a, 64), np.float32), 4096, 64)  # 1 MiB > 200 KiB
            except atomic.WriteError as err:
                print(err)
        """)
        repo = REPO
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
        assert done.returncode == 0, (done.returncode, done.stderr)
        assert done.stdout.startswith(f"could not write {dpath / 'kept' / 'acts.npy'} (disk full?)"), done.stdout
        assert list((dpath / "kept").iterdir()) == []  # no temp file left behind


def test_sae_save_disk_full_without_tmpfs(tmp_path, monkeypatch):
    """The same conversion where no tmpfs can be mounted: ENOSPC from the temp file's fsync."""
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=4, exp_factor=2))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(atomic.WriteError) as info:
        nn.save(sae, tmp_path / "sae")
    _assert_disk_full(info.value, tmp_path / "sae" / nn.WEIGHTS_FNAME)


####################
# Unreadable files #
####################


@pytest.mark.parametrize("which", ["sae", "checkpoint"])
def test_unreadable_weights_are_permission_error_not_missing(tmp_path, monkeypatch, which):
    """safetensors reports EACCES as 'No such file or directory'; load opens the file itself first, so a
    labmate's 0600 file is a PermissionError naming it (we run as root, so the denial is simulated)."""
    if which == "sae":
        nn.save(nn.SparseAutoencoder(nn.SaeConfig(d_vit=4, exp_factor=2)), tmp_path)
        fpath, module, load = tmp_path / nn.WEIGHTS_FNAME, nn, lambda: nn.load(tmp_path)
    else:
        fpath = tmp_path / "ckpt.safetensors"
        checkpoint.save(fpath, {"w": torch.ones(2)}, kind="t", version=1, meta={})
        module, load = checkpoint, lambda: checkpoint.load(fpath, kind="t", version=1)

    real_open = open

    def deny(file, *args, **kwargs):
        if pathlib.Path(file) == fpath:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", deny, raising=False)
    with pytest.raises(PermissionError, match=rf"Permission denied: '{fpath}'"):
        load()


##########################
# User errors, our bugs  #
##########################


def test_a_bug_inside_a_stage_is_a_traceback_and_a_crash_log_not_one_error_line(tiny_config, capsys, monkeypatch):
    from stages import dump as dump_stage

    def broken_run(pipeline, own, inputs, piece):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(dump_stage, "run", broken_run)
    monkeypatch.chdir(tiny_config.parent)
    assert launch.main(launch.Args(config=tiny_config)) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "in broken_run" in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: unexpected ValueError: operands could not be broadcast")
    (log,) = (tiny_config.parent / "logs" / "crashes").glob("launch-*.log")
    assert last.endswith(f"traceback saved to {log.resolve()}")
    assert "in broken_run" in log.read_text()


@pytest.mark.parametrize(
    "err_no,user",
    [(errno.ENOSPC, True), (errno.EACCES, True), (errno.EROFS, True), (errno.ENOENT, False), (errno.EBADF, False)],
    ids=errno.errorcode.get,
)
def test_a_stage_refused_by_the_machine_is_one_error_line_any_other_os_error_a_crash(
    tiny_config, capsys, monkeypatch, err_no, user
):
    from stages import dump as dump_stage

    fpath = tiny_config.parent / "runs" / "acts000000.bin"

    def refused_run(pipeline, own, inputs, piece):
        raise OSError(err_no, os.strerror(err_no), str(fpath))

    monkeypatch.setattr(dump_stage, "run", refused_run)
    monkeypatch.chdir(tiny_config.parent)
    assert launch.main(launch.Args(config=tiny_config)) == 1
    err = capsys.readouterr().err
    crashes = tiny_config.parent / "logs" / "crashes"
    if user:
        assert err.splitlines()[-1] == f"error: stage 'dump': [Errno {err_no}] {os.strerror(err_no)}: '{fpath}'"
        assert "Traceback" not in err and not crashes.exists()
    else:
        assert "Traceback (most recent call last):" in err and len(list(crashes.glob("launch-*.log"))) == 1


@pytest.mark.parametrize(
    "error,code",
    [
        (configs.ConfigError("my.toml: key 'mask.n_kep' is unknown"), 2),
        (errors.UserConfigError("dump.vit.layers = [99] is out of range"), 2),
        (errors.UserInputError("runs/mask/abc/keep.npy: index 5 appears twice"), 1),
        (artifacts.IncompleteArtifactError("stage 'score' needs mask/abc, which is not done"), 1),
        (errors.UserEnvironmentError("could not write runs/dump/abc/acts000002.bin (disk full?)"), 1),
        (slurm.SlurmError("sbatch failed for stage 'train': Unable to contact slurm controller"), 1),
        (atomic.WriteError(errno.ENOSPC, "could not write runs/x.bin (disk full?)"), 1),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Exception) else str(x),
)
def test_each_kind_of_user_error_is_one_line_and_its_exit_code(tiny_config, capsys, monkeypatch, error, code):
    from stages import pipeline as pl

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(pl, "check_inputs", refuse)
    monkeypatch.chdir(tiny_config.parent)
    assert launch.main(launch.Args(config=tiny_config)) == code == launch.EXIT_CODES[error.kind]
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"
    assert not (tiny_config.parent / "logs" / "crashes").exists()


def test_every_user_error_class_has_a_kind_with_an_exit_code():
    import saev.results  # noqa: F401 -- with the stages, every module that defines a user error
    import saev.training  # noqa: F401
    import stages.pipeline  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = {cls.__name__: cls.kind for cls in subclasses(errors.UserError)}
    assert set(found.values()) == set(launch.EXIT_CODES)
    # The errors a user can fix, by kind (the exit codes are launch.EXIT_CODES's).
    assert {name for name, kind in found.items() if kind == "config"} >= {
        "ConfigError", "SweepError", "KeepMaskError"
    }  # fmt: skip
    assert {name for name, kind in found.items() if kind == "input"} >= {
        "IncompleteArtifactError", "DamagedArtifactError", "ResultsError", "TopkError", "KeptError", "PartialError",
        "MaskFileError", "ShardError", "ShardValueError", "SaeFileError", "DatasetError",
        "CheckpointError",
    }  # fmt: skip
    assert {name for name, kind in found.items() if kind == "environment"} >= {
        "ArtifactBusyError", "WriteError", "SlurmError"
    }  # fmt: skip


def test_every_exception_class_of_ours_is_a_user_error_or_a_known_internal_signal():
    """A new error class on a builtin base alone would be reported as a bug (traceback and crash log) instead of one
    `error:` line: every exception class defined in saev/ and stages/ derives from `errors.UserError`, except the
    internal control-flow signals listed here."""
    import importlib
    import inspect
    import pkgutil

    import saev
    import stages

    internal = {"saev.preemption.Preempted", "saev.vit._Stop"}
    found, wrong = set(), []
    for package in (saev, stages):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__ or not issubclass(cls, BaseException):
                    continue
                ref = f"{module.__name__}.{name}"
                found.add(ref)
                if not issubclass(cls, errors.UserError) and ref not in internal:
                    wrong.append(ref)
    assert internal <= found and "stages.export.ExportError" in found
    assert wrong == []
