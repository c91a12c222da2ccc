"""A finished run's results in a notebook, by its pipeline config or its reduce directory: one import.

    from stages import results
    run = results.load("configs/demo.toml")

Locating a run by its config needs the pipeline's keys, which only the stages compute, so this entry point lives here;
everything else (`Results`, `get_prototype`, `activations`, `top_patches`, ...) is `saev.results`, served under the
same name.
"""

import dataclasses
import os
import pathlib

import beartype

from saev.results import (
    ClassResult,
    Prototype,
    Results,
    ResultsError,
    TopPatch,
    activations,
    get_prototype,
    load_reduce,
    top_patches,
)

from . import pipeline as pipeline_

__all__ = [
    "ClassResult", "Prototype", "Results", "ResultsError", "TopPatch", "activations", "get_prototype", "load",
    "load_reduce", "top_patches",
]  # fmt: skip


@beartype.beartype
def load(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Results:
    """A finished run's results, from its reduce artifact's directory or from its pipeline config.

    Args:
        path: `<root>/reduce/<key>/`, or a pipeline TOML file (whose reduce artifact is located by planning the graph,
            as `launch.py` does; nothing runs).
        root: with a config, the artifact root to look in instead of the config's `root` (which, when relative, is
            relative to the working directory the launcher ran in).

    Raises:
        ResultsError: the reduce artifact (or an artifact it was computed from) is not done, or a file is not what the
            pipeline writes; the message names it.
        saev.configs.ConfigError: the config file is malformed.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if root is not None:
            raise ValueError("root= applies to a config file, not a reduce directory")
        return load_reduce(path)
    pipeline = pipeline_.load(path)
    if root is not None:
        pipeline = dataclasses.replace(pipeline, root=pathlib.Path(root))
    art = pipeline_.make_plan(pipeline)["reduce"].artifacts[0]
    if not art.is_done():
        raise ResultsError(
            f"{path}: its results {art.dpath} are not done (run `uv run launch.py --config {path}` first; a relative "
            f"root is relative to the directory the launcher runs in: pass root= if that is not {pathlib.Path.cwd()})"
        )
    return load_reduce(art.dpath)
