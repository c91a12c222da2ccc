"""The root config (`Pipeline`: one TOML file drives every stage) and the stage registry the engine runs.

`REGISTRY` lists the stage modules in dependency order; the engine (`saev.engine`) plans, checks, runs and submits
them knowing no stage. `make_plan` and `run_pieces` are the engine's with this registry: the plan of a config, and
the job body that Slurm jobs run (submitit pickles it by reference, from this module).
"""

import contextlib
import dataclasses
import pathlib
import typing

from saev import artifacts, configs, sae_files
from saev.data import datasets, shards
from saev.engine import job, store
from saev.engine.plan import Plan, Registry
from saev.slurm import SlurmConfig

from . import dump as dump_stage
from . import kept as kept_stage
from . import mask as mask_stage
from . import reduce as reduce_stage
from . import score as score_stage
from . import train as train_stage

REGISTRY = Registry([dump_stage, train_stage, mask_stage, kept_stage, score_stage, reduce_stage])
"""The stages in dependency order (each module provides what `saev.engine.plan.StageModule` declares)."""

STAGES = REGISTRY.names
"""Stage names in dependency order."""


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything one launch needs: one TOML file drives every stage."""

    root: pathlib.Path = pathlib.Path("runs")
    """Artifact store root; each stage writes `<root>/<stage>/<key>/`. Relative paths are relative to the working directory."""
    dump: dump_stage.Config = dataclasses.field(default_factory=dump_stage.Config)
    """Activation dump: the ViT and layers, shard size, and the one dataset of a one-dataset config."""
    data: dump_stage.Roles | None = None
    """Datasets by role ([data.corpus], [data.select], [data.report], optional [data.corpus_eval]), instead of the one
    dataset `[dump.data]`; each is dumped through `[dump.vit]`."""
    train: train_stage.Config = dataclasses.field(default_factory=train_stage.Config)
    """SAE sweep training."""
    mask: mask_stage.Config = dataclasses.field(default_factory=mask_stage.Config)
    """Keep-mask over labelled patches."""
    score: score_stage.Config = dataclasses.field(default_factory=score_stage.Config)
    """Per-block AP scoring of every SAE latent."""
    reduce: reduce_stage.Config = dataclasses.field(default_factory=reduce_stage.Config)
    """Best latent per class."""
    slurm: SlurmConfig | None = None
    """Cluster settings; when present (and not overridden on the command line) stages are submitted to Slurm."""
    config_dpath: pathlib.Path = artifacts.unhashed(pathlib.Path("."))
    """Directory of the config file; relative paths inside the config (sweep files) resolve against it."""
    config_fpath: pathlib.Path | None = artifacts.unhashed(None)
    """The config file itself (as given to `load`), shown in the report; None for a pipeline not read from a file."""


def load(fpath: pathlib.Path | str) -> Pipeline:
    """Read and check a pipeline TOML file (unknown keys and wrong types are `ConfigError`s naming the key)."""
    fpath = pathlib.Path(fpath)
    data = configs.load_toml(fpath)
    for name in ("config_dpath", "config_fpath"):
        if name in data:
            raise configs.ConfigError(f"{fpath}: '{name}' is set by the launcher, not the config")
    if isinstance(data.get("data"), dict) and isinstance(data.get("dump"), dict) and "data" in data["dump"]:
        raise configs.ConfigError(
            f"{fpath}: [dump.data] and [data.*] roles both name datasets: give one dataset as [dump.data], or every "
            "role as [data.corpus], [data.select] and [data.report] (see docs/data.md)"
        )
    pipeline = configs.from_dict(Pipeline, data, where=str(fpath))
    return dataclasses.replace(pipeline, config_dpath=fpath.resolve().parent, config_fpath=fpath.resolve())


def make_plan(pipeline: Pipeline) -> Plan:
    """Compute every stage's keys and pieces, from configs only (nothing is read from the artifacts)."""
    with _refused_with_the_config():
        return REGISTRY.plan(pipeline)


def check_configs(pipeline: Pipeline, plan: Plan, stages: typing.Sequence[str]) -> None:
    """What a real run would refuse from the config alone (`saev.engine.store.check_configs`), for `--dry-run`."""
    with _refused_with_the_config():
        store.check_configs(REGISTRY, pipeline, plan, stages)


def check_inputs(pipeline: Pipeline, plan: Plan, stages: typing.Sequence[str]) -> None:
    """The config's checks and the inputs neither done nor part of this launch (`saev.engine.store.check_inputs`)."""
    with _refused_with_the_config():
        store.check_inputs(REGISTRY, pipeline, plan, stages)


@contextlib.contextmanager
def _refused_with_the_config() -> typing.Iterator[None]:
    """While planning or checking, bad data is the data the config names (its dataset, an adopted dump, an imported
    SAE, a shard budget below one image): report it as a `ConfigError`, refused with the config before anything runs
    (exit 2)."""
    try:
        yield
    except (datasets.DatasetError, shards.ShardError, sae_files.SaeFileError) as err:
        raise configs.ConfigError(str(err)) from err


def run_pieces(pipeline: Pipeline, stage: str, piece_ids: typing.Sequence[str]) -> None:
    """Job body: run the named pieces of one stage, then seal what they complete (`saev.engine.job.run_pieces`)."""
    job.run_pieces(REGISTRY, pipeline, stage, piece_ids)
