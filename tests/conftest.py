"""Fixtures shared by every test (plain helpers are in tests/helpers.py)."""

import pathlib
import shutil

import pytest

from tests.helpers import run, write_tiny_config


@pytest.fixture
def tiny_config(tmp_path) -> pathlib.Path:
    """A fresh copy of the tiny config in a temp dir; nothing has run."""
    return write_tiny_config(tmp_path)


@pytest.fixture(scope="session")
def done_config(tmp_path_factory) -> pathlib.Path:
    """The tiny pipeline run once to completion (shared: tests that change anything use `copy_of_done`)."""
    cfg = write_tiny_config(tmp_path_factory.mktemp("tiny-done"))
    assert run(cfg) == 0
    return cfg


@pytest.fixture
def copy_of_done(done_config, tmp_path) -> pathlib.Path:
    """A private copy of the completed tiny run (config + artifacts) that a test may change."""
    cfg = write_tiny_config(tmp_path)
    shutil.copytree(done_config.parent / "runs", tmp_path / "runs")
    return cfg
