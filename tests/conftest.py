import pathlib
import shutil

import pytest

TESTS_DPATH = pathlib.Path(__file__).parent


def write_tiny_config(dpath: pathlib.Path, root: pathlib.Path | None = None) -> pathlib.Path:
    """Copy tests/tiny.toml (+ its sweep) into dpath with the artifact root set to `root` (default dpath/runs)."""
    for name in ("tiny.toml", "tiny-sweep.toml"):
        shutil.copy(TESTS_DPATH / name, dpath / name)
    cfg = dpath / "tiny.toml"
    cfg.write_text(cfg.read_text().replace('root = "runs"', f'root = "{root or dpath / "runs"}"'))
    return cfg


@pytest.fixture
def tiny_config(tmp_path) -> pathlib.Path:
    """A fresh copy of the tiny config in a temp dir; nothing has run."""
    return write_tiny_config(tmp_path)


@pytest.fixture(scope="session")
def done_config(tmp_path_factory) -> pathlib.Path:
    """The tiny pipeline run once to completion (shared: tests that change anything use `copy_of_done`)."""
    import launch

    cfg = write_tiny_config(tmp_path_factory.mktemp("tiny-done"))
    assert launch.main(launch.Args(config=cfg)) == 0
    return cfg


@pytest.fixture
def copy_of_done(done_config, tmp_path) -> pathlib.Path:
    """A private copy of the completed tiny run (config + artifacts) that a test may change."""
    cfg = write_tiny_config(tmp_path)
    shutil.copytree(done_config.parent / "runs", tmp_path / "runs")
    return cfg


def flip_byte(fpath: pathlib.Path, offset: int | None = None) -> None:
    """Corrupt one byte of a file in place (the middle one by default): its size does not change."""
    offset = fpath.stat().st_size // 2 if offset is None else offset
    with open(fpath, "r+b") as fd:
        fd.seek(offset)
        byte = fd.read(1)
        fd.seek(offset)
        fd.write(bytes([byte[0] ^ 0x5A]))
