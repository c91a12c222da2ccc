"""reduce: every score partial -> the best AP and best latent per class, per SAE and across the sweep.

Output `<root>/reduce/<key>/best.json` and `best.csv`. `best.json` holds
`{"classes": [{"name", "prevalence", "ap", "prototype", "sae"}, ...], "per_sae": {sae_key: {...}}}`; the class
entries are the best over the whole sweep (equal APs: the earlier SAE in sweep order, then the lowest latent).
"""

import csv
import dataclasses
import io
import math

import numpy as np
import torch

from saev import ap, artifacts
from saev.data.shards import Shards

from . import mask as mask_stage
from . import score as score_stage
from .graph import Piece, StagePlan

NAME = "reduce"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """How results are reported."""

    print_top: int = artifacts.unhashed(50)
    """The launcher prints at most this many classes (best.json always has all of them)."""


def plan(pipeline, upstream) -> StagePlan:
    params = artifacts.hashed_params(pipeline.reduce)
    inputs = {"dump": upstream["dump"].artifacts[0].ref, "mask": upstream["mask"].artifacts[0].ref}
    for i, art in enumerate(upstream["score"].artifacts):
        inputs[f"score{i:03d}"] = art.ref
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, inputs))
    n_saes = len(upstream["score"].artifacts)
    piece = Piece(NAME, art, label=f"best latent per class over {n_saes} SAE(s)")
    return StagePlan(NAME, (art,), (piece,), {art.key: params}, {art.key: inputs})


def run(pipeline, plan, piece: Piece) -> None:
    started = artifacts.now()
    art = piece.artifact
    dump_art = plan["dump"].artifacts[0]
    shards = Shards(dump_art.dpath)
    class_names = list(shards.metadata.class_names)
    keep = mask_stage.load_keep(plan["mask"].artifacts[0].dpath)
    labels_N = np.asarray(shards.labels).reshape(-1)[keep].astype(np.int64)
    counts_C = np.bincount(labels_N, minlength=len(class_names))
    prevalence_C = counts_C / max(1, len(labels_N))

    score_plan = plan["score"]
    per_sae = {}
    best = [{"ap": math.nan, "prototype": -1, "sae": None} for _ in class_names]
    for score_art in score_plan.artifacts:
        info = score_plan.info[score_art.key]
        ap_CK = score_stage.read_partials(score_art, info["d_sae"])
        best_ap_C, best_k_C = ap.best_per_class(torch.from_numpy(ap_CK))
        entries = []
        for c, name in enumerate(class_names):
            value, k = float(best_ap_C[c]), int(best_k_C[c])
            entries.append({"name": name, "ap": _json_float(value), "prototype": k})
            if not math.isnan(value) and (math.isnan(best[c]["ap"]) or value > best[c]["ap"]):
                best[c] = {"ap": value, "prototype": k, "sae": info["sae"]}
        per_sae[info["sae"]] = {"score": score_art.key, "d_sae": info["d_sae"], "classes": entries}

    classes = []
    for c, name in enumerate(class_names):
        classes.append(
            {
                "name": name,
                "n_patches": int(counts_C[c]),
                "prevalence": float(prevalence_C[c]),
                "ap": _json_float(best[c]["ap"]),
                "prototype": best[c]["prototype"],
                "sae": best[c]["sae"],
            }
        )
    result = {"n_patches": int(len(labels_N)), "classes": classes, "per_sae": per_sae}
    artifacts.atomic_write_json(art.dpath / "best.json", result)
    artifacts.atomic_write_bytes(art.dpath / "best.csv", to_csv(classes).encode("utf-8"))
    art.write_manifest(
        params=plan[NAME].params[art.key], inputs=plan[NAME].inputs[art.key], started=started
    )


def _json_float(value: float) -> float | None:
    """JSON has no NaN: a class without positives gets null."""
    return None if math.isnan(value) else value


def to_csv(classes: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", "n_patches", "prevalence", "ap", "prototype", "sae"])
    writer.writeheader()
    for row in classes:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in writer.fieldnames})
    return buf.getvalue()


def format_table(result: dict, top: int = 50) -> str:
    """The per-class results as a plain-text table (what the launcher prints at the end)."""
    lines = [f"{'class':<20} {'patches':>8} {'prevalence':>10} {'best AP':>8} {'AP/prev':>8} {'latent':>7}  sae"]
    for row in result["classes"][:top]:
        ap_value, prev = row["ap"], row["prevalence"]
        ap_s = "-" if ap_value is None else f"{ap_value:.3f}"
        ratio = "-" if ap_value is None or prev == 0 else f"{ap_value / prev:.1f}x"
        lines.append(
            f"{row['name'][:20]:<20} {row['n_patches']:>8d} {prev:>10.3f} {ap_s:>8} {ratio:>8} "
            f"{row['prototype']:>7d}  {row['sae'] or '-'}"
        )
    if len(result["classes"]) > top:
        lines.append(f"... {len(result['classes']) - top} more classes in best.json")
    return "\n".join(lines)
