"""The reduce stage's result as typed records: what `best.json` and `best.csv` hold, in one place.

Reduce builds a `Best` and writes it (`write`); the launcher's table, the report (`saev.report.ClassResult` extends
`ClassBest`) and the notebook API (`saev.results.ClassResult` extends it too) read it back (`read`). The files follow
the records: a `best.json` class entry has exactly the fields of `ClassBest`, in their order, and `best.csv` has one
column per field (list fields last). Adding a field is one edit here plus the code that computes it.
"""

import csv
import dataclasses
import io
import json
import pathlib
import typing

import beartype

from saev import atomic


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class ClassBest:
    """One class: its best latent over the sweep, chosen on the kept patches, and that latent's AP."""

    name: str
    """Class name (line `index` of the dataset's classes)."""
    n_patches: int
    """Kept patches of this class (the selection set)."""
    prevalence: float
    """Share of the kept patches that are this class: the AP of a random or constant score."""
    ap: float | None
    """AP of the chosen latent on the kept patches (which chose it); None for a class without kept patches."""
    prototype: int
    """Index of the chosen latent in its SAE; -1 when the class has no kept patches."""
    sae: str | None
    """Key of the chosen SAE's train artifact (`<root>/train/<sae>/`); None when nothing was chosen."""
    layer: int | None
    """ViT block (0-based) the chosen SAE reads; None when nothing was chosen."""
    dead: bool
    """The chosen latent is constant on the kept patches (its AP is the prevalence)."""
    sae_unhealthy: tuple[str, ...]
    """Why the chosen SAE failed the health checks (normalized MSE, dead or dense latents); empty when healthy."""
    heldout_n_patches: int
    """Report patches of this class: the report split's ([data.report]), or the held-out patches of a one-dataset
    config."""
    heldout_prevalence: float | None
    """Share of the report patches that are this class; None without report patches."""
    heldout_ap: float | None
    """AP of the chosen latent on the report patches (they took no part in the choice: the figure to report)."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class SaeClassBest:
    """One class as one SAE of the sweep sees it: that SAE's best latent for it."""

    name: str
    """Class name."""
    ap: float | None
    """AP of the SAE's best latent for this class on the kept patches; None for a class without kept patches."""
    prototype: int
    """Index of that latent; -1 when the class has no kept patches."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class SaeBest:
    """One SAE (or method) of the sweep: how it scored, how it trained, and how many classes it wins."""

    score: str
    """Key of its score artifact (`<root>/score/<score>/`)."""
    d_sae: int
    """Its number of latents."""
    layer: int
    """ViT block (0-based) whose activations it reads."""
    dead_frac: float
    """Share of its latents that are constant on the kept patches."""
    classes: tuple[SaeClassBest, ...]
    """Its best latent for every class, in class-id order."""
    config: str
    """Its training config in a line (e.g. "relu_l1(l1_coeff=0.001) d_sae=512 lr=0.003 seed=0")."""
    metrics: dict[str, typing.Any]
    """Its training metrics (`metrics.json` of its train artifact: mse, nmse, l0, dead_frac, dense_frac, ...)."""
    health: tuple[str, ...]
    """Why its training metrics say it failed (reduce's `sae_health`); empty when healthy."""
    n_wins: int
    """Classes whose best latent over the sweep is one of its latents."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class LayerBest:
    """The best latent per class among the SAEs of one layer (chosen and reported as `Best.classes` are)."""

    layer: int
    """ViT block (0-based)."""
    classes: tuple[ClassBest, ...]
    """One record per class, in class-id order, choosing among this layer's SAEs only."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Best:
    """The whole of `best.json`."""

    n_patches: int
    """Kept patches (the selection set)."""
    n_heldout: int
    """Report patches: every labelled patch of the report split, or the held-out patches of a one-dataset config."""
    report_dump: str | None
    """Key of the report split's dump (`[data.report]`); None when the held-out patches of the one dump report."""
    classes: tuple[ClassBest, ...]
    """One record per class, in class-id order: the best over every SAE of every layer."""
    layers: tuple[LayerBest, ...]
    """The best per class within each layer, in the order the layers were trained."""
    per_sae: dict[str, SaeBest]
    """Every SAE of the sweep by its train key, in sweep order."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class TableRow:
    """One row of the protocol's table (`table.csv`, `table.json`): one SAE or baseline at one layer, each class's
    latent chosen on the select split by the reduce's `select` rule, every figure but `train_probe_r` measured on the
    report patches (docs/results.md#the-table)."""

    method: str
    """The objective (relu_l1, topk, ...), the baseline kind (kmeans, pca, random, neurons), or "imported"."""
    sae: str
    """Key of its train artifact."""
    layer: int
    """ViT block (0-based) it reads."""
    nmse: float | None
    """Normalized MSE on the corpus_eval rows (or the corpus's held-out rows); None if undefined."""
    l0: float
    """Mean non-zero codes per row, on the same rows."""
    probe_r: float
    """1 - mean_c CE_c / mean_c H(pi_c) on the report patches (train-fit probes; the report's own prevalences)."""
    map: float
    """Mean over ALL classes of the exact, tie-aware AP of w z + b of each class's latent (no report positives: 0)."""
    purity: float
    """Purity@k: the most frequent label's share among the k report patches where each class's latent is highest."""
    coverage: float
    """Coverage@tau: share of classes whose report AP is above tau."""
    map_lo: float
    """2.5th percentile of mAP over bootstrap resamples of the report images."""
    map_hi: float
    """97.5th percentile."""
    probe_r_lo: float
    """2.5th percentile of Probe R over the same resamples."""
    probe_r_hi: float
    """97.5th percentile."""
    coverage_lo: float
    """2.5th percentile of Coverage."""
    coverage_hi: float
    """97.5th percentile."""
    best: bool
    """The row of its method with the highest train Probe R (the one the papers report)."""
    train_probe_r: float
    """Probe R on the select split's kept patches (the probes' own fit): what `best` compares."""
    map_null: float
    """Mean mAP with the report labels permuted among images (the chance level)."""
    map_p: float
    """Permutation p-value of mAP: (1 + #null >= observed) / (1 + permutations)."""


def write_table(dpath: pathlib.Path, rows: typing.Sequence[TableRow]) -> None:
    """`table.json` (a list of row objects) and `table.csv` (one column per field) in `dpath`, atomically."""
    atomic.atomic_write_json(dpath / "table.json", [dataclasses.asdict(row) for row in rows])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields(TableRow))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()})
    atomic.atomic_write_bytes(dpath / "table.csv", buf.getvalue().encode("utf-8"))


def read_table(fpath: pathlib.Path) -> list[TableRow]:
    """The rows of a `table.json`; ValueError naming the file if it is not one of this version."""
    try:
        return [_record(TableRow, row) for row in json.loads(fpath.read_text())]
    except (ValueError, KeyError, TypeError, beartype.roar.BeartypeCallHintViolation) as err:
        raise ValueError(f"{fpath} is not a table.json of this version ({type(err).__name__}: {err})") from None


def format_table(rows: typing.Sequence[TableRow]) -> str:
    """The table as plain text (what the launcher prints), with 95% intervals for mAP and Probe R."""

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        f"{'method':<9} {'layer':>5} {'sae':<17} {'NMSE':>6} {'L0':>6} {'Probe R':>7} {'(95% CI)':>15} {'mAP':>6} "
        f"{'(95% CI)':>15} {'Purity':>6} {'Cov':>6}  best"
    ]
    for r in rows:
        lines.append(
            f"{r.method[:9]:<9} {r.layer:>5d} {r.sae:<17} {f(r.nmse):>6} {r.l0:>6.1f} {r.probe_r:>7.3f} "
            f"{f'[{r.probe_r_lo:.3f}, {r.probe_r_hi:.3f}]':>15} {r.map:>6.3f} {f'[{r.map_lo:.3f}, {r.map_hi:.3f}]':>15} "
            f"{r.purity:>6.3f} {r.coverage:>6.3f}  {'*' if r.best else ''}"
        )
    return "\n".join(lines)


def fields(cls: type) -> list[str]:
    """The field names of a record, in order (best.json's keys for it)."""
    return [f.name for f in dataclasses.fields(cls)]


def to_json(best: Best) -> dict[str, typing.Any]:
    """`best` as the JSON object of best.json (tuples become lists, records become objects, in field order)."""
    return dataclasses.asdict(best)


@beartype.beartype
def from_json(obj: dict[str, typing.Any]) -> Best:
    """The record of a parsed best.json; a missing or extra key raises KeyError, an ill-typed value beartype's
    violation (`read` turns both into one ValueError naming the file)."""
    classes = tuple(_record(ClassBest, row) for row in obj["classes"])
    layers = tuple(
        _record(LayerBest, {**entry, "classes": tuple(_record(ClassBest, row) for row in entry["classes"])})
        for entry in obj["layers"]
    )
    per_sae = {
        key: _record(SaeBest, {**entry, "classes": tuple(_record(SaeClassBest, c) for c in entry["classes"])})
        for key, entry in obj["per_sae"].items()
    }
    return Best(
        n_patches=obj["n_patches"], n_heldout=obj["n_heldout"], report_dump=obj["report_dump"], classes=classes,
        layers=layers, per_sae=per_sae,
    )  # fmt: skip


def _record(cls: type, obj: dict[str, typing.Any]) -> typing.Any:
    """`cls` from a JSON object with exactly its fields (lists become tuples)."""
    names = fields(cls)
    if sorted(obj) != sorted(names):
        missing, extra = sorted(set(names) - set(obj)), sorted(set(obj) - set(names))
        raise KeyError(f"{cls.__name__} fields: missing {missing}, unexpected {extra}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})


@beartype.beartype
def read(fpath: pathlib.Path) -> Best:
    """The record of the best.json at `fpath`.

    Raises:
        ValueError: the file is not a best.json of this version: not JSON, a key missing or extra, a value of
            another type (the message names the file).
        OSError: it cannot be read.
    """
    try:
        return from_json(json.loads(fpath.read_text()))
    except (ValueError, KeyError, TypeError, beartype.roar.BeartypeCallHintViolation) as err:
        raise ValueError(f"{fpath} is not a best.json of this version ({type(err).__name__}: {err})") from None


def write(dpath: pathlib.Path, best: Best) -> None:
    """Write `best.json` and `best.csv` of `best` into `dpath`, atomically."""
    atomic.atomic_write_json(dpath / "best.json", to_json(best))
    atomic.atomic_write_bytes(dpath / "best.csv", to_csv(best.classes).encode("utf-8"))


def csv_columns() -> list[str]:
    """best.csv's columns: the fields of `ClassBest`, list fields (joined with "; ") last."""
    hints = typing.get_type_hints(ClassBest)
    listed = [n for n in fields(ClassBest) if typing.get_origin(hints[n]) is tuple]
    return [n for n in fields(ClassBest) if n not in listed] + listed


def to_csv(classes: typing.Sequence[ClassBest]) -> str:
    """best.csv: one row per class; None is an empty cell, a list its items joined with "; " (empty: none)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns())
    writer.writeheader()
    for row in classes:
        values = {k: getattr(row, k) for k in writer.fieldnames}
        writer.writerow(
            {k: "" if v is None else "; ".join(v) if isinstance(v, tuple) else v for k, v in values.items()}
        )
    return buf.getvalue()
