"""Every file and directory the pipeline creates follows the umask (files 0666 & ~umask, directories 0777 & ~umask),
so labmates sharing a group and a umask of 002 can rerun stages in each other's artifact directories.

The slow two-user test creates a group `saevlab` and users `saeva`, `saevb` (root only; removed afterwards).
"""

import contextlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
import torch

import launch
from saev import artifacts, checkpoint, nn
from tests.helpers import REPO as REPO_DPATH
from tests.helpers import write_tiny_config


@contextlib.contextmanager
def umask(mask: int):
    """Set the process umask for the block, restoring the previous one afterwards."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: pathlib.Path) -> dict[pathlib.Path, int]:
    """Permission bits of `root` and of everything below it (symlinks are not followed)."""
    out = {root: stat.S_IMODE(root.lstat().st_mode)}
    for path in root.rglob("*"):
        out[path] = stat.S_IMODE(path.lstat().st_mode)
    return out


def is_score_partial(path: pathlib.Path) -> bool:
    return path.parent.name == "partials" and path.parent.parent.parent.name == "score"


@pytest.fixture(scope="module")
def umask002_run(tmp_path_factory) -> pathlib.Path:
    """The tiny pipeline run in-process to completion under umask 002; its artifact root."""
    dpath = tmp_path_factory.mktemp("umask002")
    cfg = write_tiny_config(dpath)
    with umask(0o002):
        assert launch.main(launch.Args(config=cfg)) == 0
    return dpath / "runs"


def test_every_file_and_directory_follows_umask_002(umask002_run):
    found = modes(umask002_run)
    assert any(p.name.startswith(".lock") for p in found)  # lock files are covered too
    assert any(p.suffix == ".safetensors" for p in found)
    wrong = {
        str(p.relative_to(umask002_run)): oct(m)
        for p, m in found.items()
        if m != (0o775 if p.is_dir() else 0o664) and not is_score_partial(p)
    }
    assert not wrong, f"not 0664 (files) / 0775 (dirs) under umask 002: {wrong}"


def test_score_partials_follow_umask_002(umask002_run):
    partials = [p for p in modes(umask002_run) if is_score_partial(p)]
    assert partials
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in partials if stat.S_IMODE(p.stat().st_mode) != 0o664}
    assert not wrong, wrong


@pytest.mark.parametrize("mask, file_mode", [(0o002, 0o664), (0o027, 0o640), (0o077, 0o600)])
def test_weights_checkpoints_and_locks_follow_the_umask(tmp_path, mask, file_mode):
    with umask(mask):
        nn.save(nn.SparseAutoencoder(nn.SaeConfig(d_vit=4, exp_factor=2)), tmp_path / "sae")
        checkpoint.save(tmp_path / "ckpt.safetensors", {"w": torch.ones(3)}, kind="t", version=1, meta={})
        art = artifacts.Artifact(tmp_path / "runs", "score", "0123456789abcdef")
        with art.lock(), art.lock("block00000.safetensors"):
            pass
    files = [tmp_path / "sae" / nn.WEIGHTS_FNAME, tmp_path / "sae" / nn.CONFIG_FNAME, tmp_path / "ckpt.safetensors"]
    files += [art.dpath / ".lock", art.dpath / ".lock-block00000.safetensors"]
    assert {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {str(f): oct(file_mode) for f in files}
    dir_mode = 0o777 & ~mask
    for dpath in (tmp_path / "sae", art.root, art.dpath):
        assert oct(stat.S_IMODE(dpath.stat().st_mode)) == oct(dir_mode), dpath


#################################
# Two users sharing one root #
#################################

GROUP, USER_A, USER_B = "saevlab", "saeva", "saevb"


def _exists(db: str, name: str) -> bool:
    return subprocess.run(["getent", db, name], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def lab_users():
    """Group `saevlab` with users `saeva` and `saevb` (no home directories); removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "setpriv", "getent"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    for db, name in (("group", GROUP), ("passwd", USER_A), ("passwd", USER_B)):
        if _exists(db, name):
            pytest.skip(f"{db} entry '{name}' already exists; not touching it")
    created: list[tuple[str, str]] = []
    try:
        subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
        created.append(("group", GROUP))
        for user in (USER_A, USER_B):
            subprocess.run(
                ["useradd", "--no-create-home", "--no-user-group", "--gid", GROUP, "--shell", "/bin/sh", user],
                check=True,
                capture_output=True,
            )
            created.append(("passwd", user))
        yield
    finally:
        for db, name in reversed(created):
            subprocess.run(["userdel" if db == "passwd" else "groupdel", name], check=False, capture_output=True)


def as_user(user: str, home: pathlib.Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `argv` in the repository as `user` (group saevlab) under umask 002."""
    inner = 'umask 002; cd "$0" && exec "$@"'
    cmd = ["setpriv", f"--reuid={user}", f"--regid={GROUP}", "--init-groups", "sh", "-c", inner, str(REPO_DPATH), *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "MPLCONFIGDIR": str(home / "mpl")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def launch_as(user: str, shared: pathlib.Path, cfg: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    home = shared / f"home-{user}"
    home.mkdir(exist_ok=True)
    shutil.chown(home, user=user, group=GROUP)
    return as_user(user, home, sys.executable, "launch.py", "--config", str(cfg), *args)


@pytest.fixture(scope="module")
def shared_run(lab_users):
    """A shared directory (root:saevlab, 2775) where saeva ran the tiny pipeline to completion."""
    # Other users must reach the interpreter and the repository (here both may sit under root's 0700 home): let them
    # traverse (o+x, no listing) each directory on the way for the duration of the test.
    opened: list[tuple[pathlib.Path, int]] = []
    for target in (pathlib.Path(os.path.realpath(sys.executable)), pathlib.Path(sys.prefix), REPO_DPATH):
        for dpath in reversed(target.parents):
            mode = stat.S_IMODE(dpath.stat().st_mode)
            if not mode & stat.S_IXOTH and dpath not in [d for d, _ in opened]:
                dpath.chmod(mode | stat.S_IXOTH)
                opened.append((dpath, mode))
    shared = pathlib.Path(tempfile.mkdtemp(prefix="saev-shared-", dir="/tmp"))
    try:
        check = as_user(USER_A, pathlib.Path("/tmp"), sys.executable, "-c", "import torch, launch")
        if check.returncode != 0:
            pytest.skip(f"{sys.executable} or {REPO_DPATH} is not usable by other users: {check.stderr.strip()[-300:]}")
        shutil.chown(shared, group=GROUP)
        shared.chmod(0o2775)
        (shared / "cfg").mkdir(mode=0o755)
        cfg = write_tiny_config(shared / "cfg", root=shared / "runs")
        out = launch_as(USER_A, shared, cfg)
        assert out.returncode == 0, out.stderr[-3000:]
        yield shared, cfg
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        for dpath, mode in reversed(opened):
            dpath.chmod(mode)


@pytest.mark.slow
def test_second_user_reruns_a_k_block_in_first_users_artifact(shared_run):
    shared, cfg = shared_run
    partials = sorted((shared / "runs").glob("score/*/partials/block*.safetensors"))
    assert partials
    victim = partials[0]
    assert victim.owner() == USER_A
    lock = victim.parent.parent / f".lock-{victim.name}"
    assert lock.owner() == USER_A and stat.S_IMODE(lock.stat().st_mode) == 0o664
    victim.unlink()

    out = launch_as(USER_B, shared, cfg, "--stage", "score")
    assert out.returncode == 0, out.stderr[-3000:]
    assert victim.owner() == USER_B  # B wrote into A's score directory, under A's lock file
    assert (victim.parent.parent / "manifest.json").owner() == USER_B


@pytest.mark.slow
def test_second_user_reduces_first_users_partials(shared_run):
    shared, cfg = shared_run
    cfg.write_text(cfg.read_text().replace("[reduce]\n", "[reduce]\nn_top_images = 6\n"))  # a new reduce artifact
    out = launch_as(USER_B, shared, cfg)
    assert out.returncode == 0, out.stderr[-3000:]
