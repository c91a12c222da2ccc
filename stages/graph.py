"""The graph's building blocks: a stage's plan (artifacts, keys, pieces) and its pieces of work."""

import dataclasses
import pathlib
import typing

from saev import artifacts


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
        when each of its files exists with the size recorded when it was written (`artifacts.is_intact`; a file with
        no record, from an older version, only has to exist)."""
        if self.fpath is None:
            return self.artifact.is_done() and all(art.is_done() for art in self.also)
        return all(_file_done(f) for f in (self.fpath, *self.owns))


def _file_done(fpath: pathlib.Path) -> bool:
    if artifacts.recorded_checksum(fpath) is None:
        return fpath.is_file()
    return artifacts.is_intact(fpath)


@dataclasses.dataclass(frozen=True)
class StagePlan:
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
    info: dict[str, typing.Any] = dataclasses.field(default_factory=dict)
    """Artifact key -> stage-specific details later stages need (e.g. the SAE config of a train artifact)."""

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


Plan = dict[str, StagePlan]
"""Stage name -> its plan, in dependency order."""
