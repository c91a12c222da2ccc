import pathlib
import shutil

import pytest

TESTS_DPATH = pathlib.Path(__file__).parent


@pytest.fixture
def tiny_config(tmp_path) -> pathlib.Path:
    """A copy of tests/tiny.toml (+ its sweep) in a temp dir, with the artifact root inside it."""
    for name in ("tiny.toml", "tiny-sweep.toml"):
        shutil.copy(TESTS_DPATH / name, tmp_path / name)
    text = (tmp_path / "tiny.toml").read_text().replace('root = "runs"', f'root = "{tmp_path / "runs"}"')
    (tmp_path / "tiny.toml").write_text(text)
    return tmp_path / "tiny.toml"
