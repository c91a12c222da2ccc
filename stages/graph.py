"""The contracts between stages: what a stage module provides (`StageModule`), its plan (artifacts, keys, pieces),
its pieces of work, and the typed record each stage's plan hands downstream per artifact (`DumpInfo`, `TrainInfo`,
`MaskInfo`, `ScoreInfo`; reduce hands nothing on).
"""

import dataclasses
import pathlib
import typing
from collections.abc import Callable

from saev import artifacts, checksums, training
from saev.data import datasets

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline


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


################
# Plan records #
################


@dataclasses.dataclass(frozen=True)
class DumpInfo:
    """What the dump plan tells the job body and later stages about its one artifact."""

    chunks: dict[int, tuple[int, int]]
    """Last shard of each chunk (the shard whose labels mark the chunk done) -> the chunk's shards [start, stop)."""
    fingerprint: datasets.Fingerprint
    """The dataset's listing (folder datasets: every file's size and mtime; empty for the synthetic one)."""
    n_patches: int
    """Patches the dump holds (images x patches per image), known from the configs alone (an adopted dump: from its
    metadata.json)."""
    layers: tuple[int, ...]
    """The ViT blocks recorded, as non-negative indices (an adopted dump: as its metadata.json lists them)."""
    d_vit: int
    """Activation width."""
    has_labels: bool = True
    """Whether the dump has per-patch labels (an adopted dump without labels.bin has none)."""
    adopted: pathlib.Path | None = None
    """The saev shard directory adopted as this dump ([dump.adopt]); None for a dump this pipeline writes."""


@dataclasses.dataclass(frozen=True)
class ImportInfo:
    """Where an imported SAE (`[train] imports`) comes from: what its train artifact is made from."""

    path: pathlib.Path
    """The checkpoint file or directory (absolute)."""
    fmt: str
    """Its format (`saev.sae_files.ImportedSae.fmt`)."""
    checksum: str
    """XXH3-128 of its bytes when planned (the job refuses a file that changed since)."""
    activation: str
    """Its activation rule after conversion, e.g. "TopK(k=32, keep_negative=True)"."""
    d_sae: int
    """Its number of latents."""


@dataclasses.dataclass(frozen=True)
class TrainInfo:
    """What the train plan tells later stages about one SAE (one train artifact)."""

    config: training.TrainConfig | ImportInfo
    """The SAE's canonical training config (as hashed into its key), or where an imported SAE comes from."""
    d_sae: int
    """Latents of the SAE."""
    layer: int
    """ViT block (non-negative index) whose patch activations the SAE reads."""


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """What the mask plan tells later stages about its one artifact."""

    max_kept: int
    """An upper bound on the number of kept patches, known before anything runs (sizes the score blocks)."""


@dataclasses.dataclass(frozen=True)
class ScoreInfo:
    """What the score plan tells its job body and the reduce about one score artifact (one SAE's partials)."""

    train_key: str
    """Key of the train artifact whose SAE is scored (its input "sae")."""
    d_sae: int
    """Latents of that SAE."""
    layer: int
    """ViT block the SAE reads."""
    block_size: int
    """Latents per K-block (the last block may be narrower)."""


Info = typing.TypeVar("Info")
"""The plan record type of one stage (`DumpInfo`, ...; None for a stage that hands nothing on)."""


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
"""Stage name -> its plan, in dependency order (`plan["score"]` is a `StagePlan[ScoreInfo]`, and so on)."""


@typing.runtime_checkable
class StageModule(typing.Protocol):
    """What a stage module (stages/dump.py, ...) provides. The optional hooks are module attributes that are None
    when the stage has no such step, so every module declares all of them."""

    NAME: str
    """Stage name: the artifact directory `<root>/<NAME>/` and the stage's key in the plan."""
    VERSION: int
    """Output format version, part of every key of the stage."""
    Config: type
    """The frozen dataclass of the stage's `[NAME]` config section."""
    check: "Callable[[Pipeline, Plan], None] | None"
    """Checks that can run before anything is submitted (raise an error naming the problem); None: none."""
    finalize: "Callable[[Pipeline, Plan, artifacts.Artifact], None] | None"
    """For a multi-piece artifact: what runs once every piece exists, before the manifest (e.g. index files)."""
    manifest_extra: "Callable[[Pipeline, artifacts.Artifact], dict[str, object]] | None"
    """For a multi-piece artifact: extra manifest fields (e.g. the device used); None: none."""

    def plan(self, pipeline: "Pipeline", upstream: Plan) -> StagePlan[typing.Any]:
        """Keys and pieces of the stage, from the configs and the upstream stages' plans (nothing is read from the
        artifacts)."""
        ...

    def run(self, pipeline: "Pipeline", plan: Plan, piece: Piece) -> None:
        """The job body: write `piece` (a single-piece artifact also writes its manifest)."""
        ...
