"""Nothing from disk can run code: no pickle, configs are data; artifacts are not world-writable."""

import os
import re
import stat
import tomllib

import torch

from tests.helpers import REPO

SOURCES = [p for d in ("saev", "stages") for p in (REPO / d).rglob("*.py")] + [REPO / "launch.py"]


def test_no_pickle_and_no_unsafe_torch_load_in_the_code():
    for fpath in SOURCES:
        text = fpath.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), fpath
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{fpath}: {call}"
        assert "np.load(" not in text or "allow_pickle=False" in text, fpath


def test_torch_is_new_enough_for_weights_only_loading_to_be_safe():
    """torch.load(weights_only=True) can be made to run code before torch 2.6 (CVE-2025-32434): the project requires
    2.6 or newer, and the torch installed is."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps, deps
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert (major, minor) >= (2, 6), torch.__version__


def test_configs_are_parsed_never_executed():
    for fpath in SOURCES:
        text = fpath.read_text()
        assert not re.search(r"(?<![.\w])(exec|eval)\(", text), fpath  # builtins, not module.eval()
        assert "runpy" not in text and "importlib.import_module(" not in text, fpath


def test_artifacts_follow_the_umask_and_nothing_is_world_writable(tmp_path):
    from tests.helpers import run, write_tiny_config

    cfg = write_tiny_config(tmp_path)
    old = os.umask(0o027)
    try:
        assert run(cfg, stage="dump", only=True) == 0
    finally:
        os.umask(old)
    paths = list((tmp_path / "runs").rglob("*"))
    assert paths
    for path in paths:
        mode = path.stat().st_mode
        assert not mode & stat.S_IWOTH, path
        assert not mode & stat.S_IROTH, f"{path} ignores the umask"
