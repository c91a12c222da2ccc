"""Every file a user names (configs, sweeps, imported SAEs, adopted dumps' files, class names) is checked to be a
regular file of a plausible size before it is opened (`saev.helpers.check_regular_file`): a FIFO, a device, a socket
or a directory is one error line naming the file, never a hang or a read without bound.

Opening a FIFO blocks until a writer comes: the launcher cases run under a generous alarm (in-process) or a
subprocess timeout, so a hang is a test failure, not a test that waits; no test depends on how fast anything runs."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess

import numpy as np
import pytest
import torch

from saev import configs, helpers, keepmask, sae_files
from saev.data import saevfmt
from saev.data.shards import ShardError
from tests.helpers import launch, make_folder_dataset, run, use_folder, write_tiny_config
from tests.lib.data.test_saevfmt import adopt_config, src_2x
from tests.lib.test_sae_files import import_config, random_state, write_schema5


def dry_run(cfg: pathlib.Path) -> subprocess.CompletedProcess:
    # 300 s: far more than a dry run takes on a loaded machine; only a read that blocks gets near it.
    return launch(cfg, "--dry-run", timeout=300)


def assert_one_error(stderr: str, *parts: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(p in errors[0] for p in parts), stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


##############
# The helper #
##############


def make_socket(fpath: pathlib.Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(fpath))
    return sock


def test_a_regular_file_and_a_link_to_one_are_read(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    for fpath in (tmp_path / "a.txt", tmp_path / "link"):
        assert helpers.check_regular_file(fpath, what="test", max_bytes=5) == 5
        assert helpers.read_regular_file(fpath, what="test", max_bytes=5) == b"hello"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero link", "dev-null", "socket", "directory", "missing", "too large",
                                  "dangling link"])  # fmt: skip
def test_anything_but_a_plausible_regular_file_is_refused_unopened(tmp_path, kind):
    fpath = tmp_path / "f"
    sock = None
    if kind == "fifo":
        os.mkfifo(fpath)
    elif kind == "dev-zero link":
        fpath.symlink_to("/dev/zero")
    elif kind == "dev-null":
        fpath = pathlib.Path("/dev/null")
    elif kind == "socket":
        sock = make_socket(fpath)
    elif kind == "directory":
        fpath.mkdir()
    elif kind == "too large":
        with open(fpath, "wb") as fd:
            fd.truncate(1 << 40)  # a sparse terabyte: never read
    elif kind == "dangling link":
        fpath.symlink_to(tmp_path / "nowhere")
    expected = {"fifo": "is a FIFO (named pipe), not a regular file", "dev-zero link": "(a link to /dev/zero) is a "
                "character device", "dev-null": "is a character device", "socket": "is a socket",
                "directory": "path is a directory", "missing": "file not found", "too large":
                f"has {1 << 40} bytes, more than a test file can hold (1024 at most)",
                "dangling link": "file not found"}[kind]  # fmt: skip
    try:
        with pytest.raises(configs.ConfigError) as info:
            helpers.read_regular_file(fpath, what="test", max_bytes=1024, error=configs.ConfigError)
    finally:
        if sock is not None:
            sock.close()
    msg = str(info.value)
    assert "\n" not in msg and str(fpath) in msg and expected in msg, msg


#######################################
# The launcher on the files users name #
#######################################


def _config_fifo(tmp_path):
    cfg = tmp_path / "fifo.toml"
    os.mkfifo(cfg)
    return cfg, cfg


def _sweep_fifo(tmp_path):
    cfg = write_tiny_config(tmp_path)
    (tmp_path / "tiny-sweep.toml").unlink()
    os.mkfifo(tmp_path / "tiny-sweep.toml")
    return cfg, tmp_path / "tiny-sweep.toml"


def _import(tmp_path, make):
    cfg = write_tiny_config(tmp_path)
    fpath = tmp_path / "sae.pt"
    make(fpath)
    return import_config(cfg, json.dumps([str(fpath)])), fpath


def _adopted(tmp_path, name):
    src = src_2x(tmp_path)
    (tmp_path / "classes.txt").write_text("background\na\nb\n")
    cfg = adopt_config(tmp_path, src, layer=5)
    fpath = tmp_path / "classes.txt" if name == "classes.txt" else src / name
    fpath.unlink()
    os.mkfifo(fpath)
    return cfg, fpath


def _folder_classes_fifo(tmp_path):
    cfg = write_tiny_config(tmp_path)
    data = make_folder_dataset(tmp_path / "data")
    use_folder(cfg, data)
    (data / "classes.txt").unlink()
    os.mkfifo(data / "classes.txt")
    return cfg, data / "classes.txt"


LAUNCH_CASES = {
    "config FIFO": _config_fifo,
    "sweep FIFO": _sweep_fifo,
    "import FIFO": lambda t: _import(t, os.mkfifo),
    "import linked to /dev/zero": lambda t: _import(t, lambda p: p.symlink_to("/dev/zero")),
    "adopted metadata.json FIFO": lambda t: _adopted(t, "metadata.json"),
    "adopted shards.json FIFO": lambda t: _adopted(t, "shards.json"),
    "adopted labels.bin FIFO": lambda t: _adopted(t, "labels.bin"),
    "adopted classes.txt FIFO": lambda t: _adopted(t, "classes.txt"),
    "folder dataset classes.txt FIFO": _folder_classes_fifo,
}


@contextlib.contextmanager
def hang_fails(seconds: int = 300):
    """Turn a hang into a failure: SIGALRM after `seconds` (far more than a dry run takes on a loaded machine) raises
    in the blocked call (an `open` of a FIFO returns to Python when a signal handler raises)."""

    def fail(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s: a read of a FIFO or device?")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", list(LAUNCH_CASES))
def test_dry_run_refuses_a_fifo_or_device_in_one_line_and_never_hangs(tmp_path, capsys, case):
    cfg, fpath = LAUNCH_CASES[case](tmp_path)
    with hang_fails():
        assert run(cfg, dry_run=True) == 2
    assert_one_error(capsys.readouterr().err, str(fpath), "not a regular file")
    assert not (tmp_path / "runs").exists()


def test_the_launcher_process_on_a_fifo_config_exits_with_one_line(tmp_path):
    """The real command line, in its own process (a hang is a failure by the subprocess timeout)."""
    cfg, fpath = _config_fifo(tmp_path)
    proc = dry_run(cfg)
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, str(fpath), "is a FIFO (named pipe), not a regular file")


####################################
# Sizes bounded by what a format allows #
####################################


def test_a_metadata_file_of_many_mib_is_refused_unread(tmp_path):
    src = src_2x(tmp_path)
    with open(src / "metadata.json", "ab") as fd:
        fd.truncate(helpers.MAX_TEXT_BYTES + 1)
    with pytest.raises(ShardError) as info:
        saevfmt.read_source(src)
    msg = str(info.value)
    assert "\n" not in msg and str(src / "metadata.json") in msg and "more than a metadata file can hold" in msg


def test_a_sae_pt_larger_than_its_header_allows_is_refused_unread(tmp_path):
    """A valid header followed by a sparse 64 GiB: refused from the header's shapes, before any tensor is read."""
    fpath = write_schema5(tmp_path / "sae.pt", "Relu", 8, 16, random_state(8, 16))
    sae_files.read_sae(fpath)  # as written, it is fine
    with open(fpath, "ab") as fd:
        fd.truncate(64 << 30)
    with pytest.raises(sae_files.SaeFileError) as info:
        sae_files.read_sae(fpath)
    msg = str(info.value)
    assert "\n" not in msg and str(fpath) in msg and "more than its header's shapes allow (d_model=8, d_sae=16" in msg


def test_a_sae_pt_with_float64_tensors_fits_the_bound(tmp_path):
    """The bound counts 8 bytes a value: a saev file of float64 weights is read (and converted to float32)."""
    state = {k: v.double() for k, v in random_state(8, 16).items()}
    imported = sae_files.read_sae(write_schema5(tmp_path / "sae.pt", "Relu", 8, 16, state))
    assert imported.sae.W_enc.dtype == torch.float32


@pytest.mark.parametrize("name", ["sae.json", "sae.safetensors"])
def test_our_sae_directory_with_a_fifo_is_refused(tmp_path, name):
    from saev import nn

    nn.save(nn.SparseAutoencoder(nn.SaeConfig(d_vit=4)), tmp_path / "mine")
    (tmp_path / "mine" / name).unlink()
    os.mkfifo(tmp_path / "mine" / name)
    with pytest.raises(sae_files.SaeFileError, match="is a FIFO") as info:
        sae_files.read_sae(tmp_path / "mine")
    assert str(tmp_path / "mine" / name) in str(info.value)


def test_our_safetensors_larger_than_its_config_allows_is_refused(tmp_path):
    from saev import nn

    nn.save(nn.SparseAutoencoder(nn.SaeConfig(d_vit=4)), tmp_path / "mine")
    with open(tmp_path / "mine" / "sae.safetensors", "ab") as fd:
        fd.truncate(1 << 30)
    with pytest.raises(sae_files.SaeFileError, match="more than a SAE checkpoint file can hold"):
        sae_files.read_sae(tmp_path / "mine")


def test_a_keep_mask_larger_than_the_dump_allows_or_not_a_file_is_refused(tmp_path):
    np.save(tmp_path / "keep.npy", np.arange(10, dtype=np.int64))
    assert keepmask.load_mask_file(tmp_path / "keep.npy", 10).tolist() == list(range(10))
    with open(tmp_path / "keep.npy", "ab") as fd:
        fd.truncate(1 << 30)  # far more than 10 indices and a header
    with pytest.raises(keepmask.MaskFileError, match="more than a mask file can hold"):
        keepmask.load_mask_file(tmp_path / "keep.npy", 10)
    (tmp_path / "keep.npy").unlink()
    os.mkfifo(tmp_path / "keep.npy")
    with pytest.raises(keepmask.MaskFileError, match="is a FIFO"):
        keepmask.load_mask_file(tmp_path / "keep.npy", 10)


def test_a_shard_that_is_a_fifo_is_refused(tmp_path):
    src = src_2x(tmp_path)
    (src / "acts000000.bin").unlink()
    os.mkfifo(src / "acts000000.bin")
    with pytest.raises(ShardError, match="is a FIFO") as info:
        saevfmt.read_source(src, class_names=("background", "a", "b"))
    assert str(src / "acts000000.bin") in str(info.value)


@pytest.mark.parametrize("name,damage,match", [
    ("metadata.json", "truncate", "cannot read it: not JSON"),
    ("metadata.json", "not utf-8", "cannot read it: not JSON"),
    ("metadata.json", "a list", "is not a JSON object of metadata fields"),
    ("shards.json", "truncate", "cannot read it: not JSON"),
    ("shards.json", "an object", "is not a valid shard list"),
    ("shards.json", "directory", "metadata path is a directory, not a file"),
    ("labels.bin", "truncate", "bytes, expected"),
    ("labels.bin", "directory", "labels path is a directory, not a file"),
])  # fmt: skip
def test_an_adopted_file_truncated_mistyped_or_not_a_file_is_one_line_naming_it(tmp_path, name, damage, match):
    src = src_2x(tmp_path)
    fpath = src / name
    data = fpath.read_bytes()
    if damage == "truncate":
        fpath.write_bytes(data[: len(data) // 2])
    elif damage == "not utf-8":
        fpath.write_bytes(b"\xff" + data[1:])
    elif damage == "a list":
        fpath.write_text("[1, 2]")
    elif damage == "an object":
        fpath.write_text('{"name": "acts000000.bin"}')
    elif damage == "directory":
        fpath.unlink()
        fpath.mkdir()
    with pytest.raises(ShardError) as info:
        saevfmt.read_source(src, class_names=("background", "a", "b"))
    msg = str(info.value)
    assert "\n" not in msg and str(fpath) in msg and match in msg, msg
