"""The plan of a pipeline: what a stage module provides (`StageModule`), the artifacts, keys and pieces of work each
stage plans (`StagePlan`, `Piece`), and the `Registry` of stage modules that plans the whole graph.

Keys of the whole graph are computed before anything runs (from configs and upstream keys only), which is what lets a
launcher submit every stage at once and resubmit a single missing piece. A stage reads what its upstream stages
planned through the typed records of the inputs it declares (`StageModule.Inputs`), never by another stage's name.
"""

import dataclasses
import pathlib
import typing
from collections.abc import Callable, Sequence

from saev import artifacts, checksums, slurm


class RootConfig(typing.Protocol):
    """What the engine reads of the root config (stages' `Pipeline`): where the store is, and the cluster settings."""

    root: pathlib.Path
    """Artifact store root; each stage writes `<root>/<stage>/<key>/`."""
    slurm: "slurm.SlurmConfig | None"
    """Cluster settings; None when the pipeline runs locally only."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """The smallest unit of work a job runs: a whole artifact, or one file of it (e.g. one K-block partial)."""

    stage: str
    """Stage that runs it."""
    artifact: artifacts.Artifact
    """Artifact it writes into."""
    fpath: pathlib.Path | None = None
    """The one file this piece produces; None when the piece is the whole artifact."""
    label: str = ""
    """Human-readable name for plans and logs."""
    also: tuple[artifacts.Artifact, ...] = ()
    """Other whole artifacts the same piece writes (e.g. the SAEs of one training group)."""
    owns: tuple[pathlib.Path, ...] = ()
    """Other files this piece writes besides `fpath` (e.g. a dump chunk's shards); a damaged one makes it not done."""

    @property
    def id(self) -> str:
        """Stable id used to name the piece in jobs: `key` or `key/relative-file`."""
        if self.fpath is None:
            return self.artifact.key
        return f"{self.artifact.key}/{self.fpath.relative_to(self.artifact.dpath).as_posix()}"

    def is_done(self) -> bool:
        """A whole-artifact piece is done when its artifacts match their manifests (`Artifact.is_done`); a file piece
        when each of its files exists with the size recorded when it was written (`checksums.is_intact`; a file with
        no record, from an older version, only has to exist)."""
        if self.fpath is None:
            return self.artifact.is_done() and all(art.is_done() for art in self.also)
        return all(_file_done(f) for f in (self.fpath, *self.owns))


def _file_done(fpath: pathlib.Path) -> bool:
    if checksums.recorded_checksum(fpath) is None:
        return fpath.is_file()
    return checksums.is_intact(fpath)


Info = typing.TypeVar("Info")
"""The plan record type of one stage (e.g. the dump's `DumpInfo`; None for a stage that hands nothing on)."""


@dataclasses.dataclass(frozen=True)
class StagePlan(typing.Generic[Info]):
    """What one stage produces for a given config: its artifacts (with their keys) and pieces of work."""

    name: str
    """Stage name."""
    artifacts: tuple[artifacts.Artifact, ...]
    """Artifacts this stage writes, in a stable order."""
    pieces: tuple[Piece, ...]
    """Units of work; a piece-per-artifact stage has one piece per artifact."""
    params: dict[str, object]
    """Artifact key -> its hashed params (recorded in the manifest)."""
    inputs: dict[str, dict[str, str]]
    """Artifact key -> input name -> `stage/key` of the input artifact."""
    info: dict[str, Info] = dataclasses.field(default_factory=dict)
    """Artifact key -> the stage's plan record for it (what the job body and later stages need); empty when the
    stage hands nothing on."""

    @property
    def artifact(self) -> artifacts.Artifact:
        """The stage's one artifact (e.g. the dump); `ValueError` for a stage that planned several."""
        if len(self.artifacts) != 1:
            raise ValueError(f"stage '{self.name}' has {len(self.artifacts)} artifacts, not one")
        return self.artifacts[0]

    @property
    def record(self) -> Info:
        """The plan record of the stage's one artifact (see `artifact`)."""
        return self.info[self.artifact.key]

    def by_key(self, key: str) -> artifacts.Artifact:
        """The stage's artifact of this key (`KeyError` if the plan has none)."""
        for art in self.artifacts:
            if art.key == key:
                return art
        raise KeyError(f"stage '{self.name}' planned no artifact {key}")

    def input_artifacts(self, key: str, root: pathlib.Path) -> list[artifacts.Artifact]:
        out = []
        for ref in self.inputs[key].values():
            stage, input_key = ref.split("/")
            out.append(artifacts.Artifact(root, stage, input_key))
        return out

    def missing(self) -> list[Piece]:
        return [piece for piece in self.pieces if not piece.is_done()]

    def state(self) -> str:
        """'done' (every artifact has a manifest), 'partial' (some pieces done) or 'missing'."""
        if all(a.is_done() for a in self.artifacts) and all(p.is_done() for p in self.pieces):
            return "done"
        if any(piece.is_done() for piece in self.pieces):
            return "partial"
        return "missing"


Plan = dict[str, StagePlan[typing.Any]]
"""Stage name -> its plan, in dependency order."""


@typing.runtime_checkable
class StageModule(typing.Protocol):
    """What a stage module provides. The optional hooks are module attributes that are None when the stage has no
    such step, so every module declares all of them. `Pipeline` below is the root config (`RootConfig` and the
    stages' own sections); `Inputs` is the module's own NamedTuple of upstream plans."""

    NAME: str
    """Stage name: the artifact directory `<root>/<NAME>/` and the stage's key in the plan."""
    VERSION: int
    """Output format version, part of every key of the stage."""
    Config: type | None
    """The frozen dataclass of the stage's `[NAME]` config section; None for a stage without settings."""
    Inputs: type
    """A NamedTuple whose fields name the upstream stages it reads, each typed `StagePlan[TheirInfo]`: the stage
    gets exactly these plans (`Registry.inputs`), and its artifacts' input refs must be artifacts of them."""
    check: "Callable[[typing.Any, StagePlan[typing.Any], typing.Any], None] | None"
    """`check(pipeline, own, inputs)`: checks that can run before anything is submitted (raise an error naming the
    problem); None: none."""
    finalize: "Callable[[typing.Any, StagePlan[typing.Any], artifacts.Artifact], None] | None"
    """`finalize(pipeline, own, art)`: for a multi-piece artifact, what runs once every piece exists, before the
    manifest (e.g. index files); None: nothing."""
    manifest_extra: "Callable[[typing.Any, artifacts.Artifact], dict[str, object]] | None"
    """`manifest_extra(pipeline, art)`: for a multi-piece artifact, extra manifest fields (e.g. the device used)."""
    slurm_resources: "Callable[[typing.Any, slurm.Resources], slurm.Resources] | None"
    """`slurm_resources(pipeline, configured)`: the resources this stage's jobs ask for instead of the configured
    `[slurm.NAME]` ones (e.g. no GPU for a job that only links files); None: the configured ones."""
    explain_key: "Callable[[typing.Any, StagePlan[typing.Any], artifacts.Artifact, artifacts.Artifact, list[str]], str | None] | None"
    """`explain_key(pipeline, own, new, earlier, diffs)`: more about why `new` got another key than the closest
    `earlier` artifact, given the params and inputs that differ (`diffs`), e.g. which dataset files changed; None:
    nothing more."""

    def plan(self, pipeline: typing.Any, inputs: typing.Any) -> StagePlan[typing.Any]:
        """Keys and pieces of the stage, from the configs and the upstream plans it declares (nothing is read from
        the artifacts)."""
        ...

    def run(self, pipeline: typing.Any, own: StagePlan[typing.Any], inputs: typing.Any, piece: Piece) -> None:
        """The job body: write `piece` (a single-piece artifact also writes its manifest)."""
        ...


_MEMBERS = ("NAME", "VERSION", "Config", "Inputs", "check", "finalize", "manifest_extra", "slurm_resources",
            "explain_key", "plan", "run")  # fmt: skip


class Registry:
    """The stages of a pipeline, in dependency order: what the engine plans, checks, runs and submits."""

    def __init__(self, modules: Sequence[StageModule]):
        """Check that every module provides what `StageModule` declares and reads only stages before it."""
        self.modules: dict[str, StageModule] = {}
        for module in modules:
            name = getattr(module, "NAME", getattr(module, "__name__", repr(module)))
            if not isinstance(module, StageModule):
                missing = [m for m in _MEMBERS if not hasattr(module, m)]
                raise TypeError(f"stage module {name} does not provide what `StageModule` declares: {missing}")
            late = [f for f in module.Inputs._fields if f not in self.modules]
            if late:
                raise TypeError(f"stage '{name}' reads {late}, which are not stages before it")
            self.modules[module.NAME] = module

    @property
    def names(self) -> tuple[str, ...]:
        """Stage names in dependency order."""
        return tuple(self.modules)

    def __getitem__(self, name: str) -> StageModule:
        return self.modules[name]

    def inputs(self, name: str, plan: Plan) -> typing.Any:
        """The upstream plans stage `name` declares (its `Inputs`), from the plan of the stages before it."""
        module = self.modules[name]
        return module.Inputs(**{field: plan[field] for field in module.Inputs._fields})

    def plan(self, pipeline: typing.Any) -> Plan:
        """Compute every stage's keys and pieces, from configs only (nothing is read from the artifacts)."""
        plan: Plan = {}
        for name, module in self.modules.items():
            plan[name] = module.plan(pipeline, self.inputs(name, plan))
        return plan

    def upstream_and(self, stages: Sequence[str]) -> list[str]:
        """The selected stages and every stage before them, in dependency order."""
        last = max(self.names.index(name) for name in stages)
        return list(self.names[: last + 1])
