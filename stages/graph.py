"""The typed record each stage's plan hands downstream per artifact (`DumpInfo`, `TrainInfo`, `MaskInfo`,
`KeptInfo`, `ScoreInfo`; reduce hands nothing on): what a stage reads of its inputs' plans, through
`saev.engine.plan.StagePlan.info` (the engine itself knows no stage and none of these records).
"""

import dataclasses
import pathlib
import typing

from saev import artifacts, methods, training
from saev.data import datasets

if typing.TYPE_CHECKING:
    from saev.engine.plan import StagePlan

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
    roles: tuple[str, ...] = ("corpus", "select", "report")
    """The roles this dump plays (`stages.dump.ROLES`): all three of a one-dataset config, or those whose [data.*]
    dataset it is."""
    data: datasets.DatasetConfig | None = None
    """Its dataset config (None for an adopted dump)."""
    class_names: tuple[str, ...] = ()
    """Its class names (label i is class_names[i]); empty for an unlabelled dataset."""


def role(dump: "StagePlan[DumpInfo]", name: str) -> "tuple[artifacts.Artifact, DumpInfo]":
    """The dump artifact playing role `name` ("corpus", "select", "report") and its record."""
    for art in dump.artifacts:
        if name in dump.info[art.key].roles:
            return art, dump.info[art.key]
    raise KeyError(f"no dump plays the role {name!r}")


def corpus_eval(dump: "StagePlan[DumpInfo]") -> "tuple[artifacts.Artifact, DumpInfo] | None":
    """The dump of `[data.corpus_eval]`, or None without one."""
    try:
        return role(dump, "corpus_eval")
    except KeyError:
        return None


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
class MethodRun:
    """One baseline method to fit on the corpus (a point of the `[train] methods` sweep file): k-means, PCA, random
    directions or the ViT's neurons (`saev.methods`), fit on a shuffled stream of the corpus's rows like an SAE."""

    method: methods.Config
    """The method and its options: `method = "neurons"`, or a table with `kind = "kmeans"` (`k`, `code`, `seed`),
    `"pca"` (`k`, `top_n`, `sign`) or `"random"` (`n`, `source`, `seed`)."""
    n_train: int = 1_000_000
    """Corpus rows streamed through the fit (PCA's covariance, k-means' mini-batch updates; epochs repeat)."""
    batch_size: int = 4096
    """Rows per batch of the stream (k-means: per mini-batch update)."""
    n_eval: int = 4096
    """Rows the metrics are measured on: the corpus's last n_eval rows, never fit on (or spread over
    `[data.corpus_eval]`)."""
    seed: int = 0
    """Seed of the stream's shuffling."""

    def __post_init__(self):
        for name in ("n_train", "batch_size", "n_eval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TrainInfo:
    """What the train plan tells later stages about one SAE (one train artifact)."""

    config: training.TrainConfig | ImportInfo | MethodRun
    """The SAE's canonical training config (as hashed into its key), where an imported SAE comes from, or the baseline
    method fit instead of an SAE."""
    d_sae: int
    """Latents of the SAE (or of the method)."""
    layer: int
    """ViT block (non-negative index) whose patch activations the SAE reads."""


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """What the mask plan tells later stages about its one artifact."""

    max_kept: int
    """An upper bound on the number of kept patches, known before anything runs (sizes the score blocks)."""


@dataclasses.dataclass(frozen=True)
class KeptInfo:
    """What the kept plan tells the score stage about one kept artifact (the kept patches' activations of a layer)."""

    layer: int
    """ViT block whose activations it holds."""


@dataclasses.dataclass(frozen=True)
class ScoreInfo:
    """What the score plan tells its job body and the reduce about one score artifact (one SAE's partials)."""

    train_key: str
    """Key of the train artifact whose SAE is scored (its input "sae")."""
    kept_key: str
    """Key of the kept artifact holding the activations it scores (its input "kept")."""
    d_sae: int
    """Latents of that SAE."""
    layer: int
    """ViT block the SAE reads."""
    block_size: int
    """Latents per K-block (the last block may be narrower)."""
