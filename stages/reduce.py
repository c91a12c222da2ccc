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

from saev import ap, artifacts, helpers, nn
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
    dump_art, mask_art = plan["dump"].artifacts[0], plan["mask"].artifacts[0]
    shards = Shards(dump_art.dpath)
    class_names = list(shards.metadata.class_names)
    n_classes = len(class_names)
    flat_labels = np.asarray(shards.labels).reshape(-1)
    keep, heldout = mask_stage.load_keep(mask_art.dpath), mask_stage.load_heldout(mask_art.dpath)
    labels_N = flat_labels[keep].astype(np.int64)
    counts_C = np.bincount(labels_N, minlength=n_classes)

    # Select on the kept patches: the best latent of every SAE, then the best over the sweep.
    score_plan = plan["score"]
    per_sae, chosen = {}, [None] * n_classes
    for score_art in score_plan.artifacts:
        info = score_plan.info[score_art.key]
        partials = score_stage.read_partials(score_art, info["d_sae"])
        dead_K = partials.min_K == partials.max_K
        best_ap_C, best_k_C = ap.best_per_class(torch.from_numpy(partials.ap_CK))
        entries = []
        for c, name in enumerate(class_names):
            value, k = float(best_ap_C[c]), int(best_k_C[c])
            entries.append({"name": name, "ap": _json_float(value), "prototype": k})
            if k >= 0 and (chosen[c] is None or value > chosen[c]["ap"]):
                chosen[c] = {"ap": value, "prototype": k, "sae": info["sae"], "dead": bool(dead_K[k])}
        per_sae[info["sae"]] = {
            "score": score_art.key,
            "d_sae": info["d_sae"],
            "dead_frac": float(dead_K.mean()),
            "classes": entries,
        }

    # Report on the held-out patches, which took no part in the choice.
    heldout_ap_C, heldout_counts_C = heldout_aps(pipeline, plan, chosen, heldout, flat_labels, n_classes)

    classes = []
    for c, name in enumerate(class_names):
        pick = chosen[c] or {"ap": math.nan, "prototype": -1, "sae": None, "dead": False}
        classes.append(
            {
                "name": name,
                "n_patches": int(counts_C[c]),
                "prevalence": float(counts_C[c] / max(1, len(labels_N))),
                "ap": _json_float(pick["ap"]),
                "prototype": pick["prototype"],
                "sae": pick["sae"],
                "dead": pick["dead"],
                "heldout_n_patches": int(heldout_counts_C[c]),
                "heldout_prevalence": float(heldout_counts_C[c] / len(heldout)) if len(heldout) else None,
                "heldout_ap": _json_float(heldout_ap_C[c]),
            }
        )
    result = {"n_patches": int(len(labels_N)), "n_heldout": int(len(heldout)), "classes": classes, "per_sae": per_sae}
    artifacts.atomic_write_json(art.dpath / "best.json", result)
    artifacts.atomic_write_bytes(art.dpath / "best.csv", to_csv(classes).encode("utf-8"))
    art.write_manifest(params=plan[NAME].params[art.key], inputs=plan[NAME].inputs[art.key], started=started)


def heldout_aps(pipeline, plan, chosen, heldout, flat_labels, n_classes) -> tuple[list[float], np.ndarray]:
    """AP of each class's chosen latent over the held-out patches (NaN without held-out positives or a choice)."""
    labels_H = flat_labels[heldout].astype(np.int64)
    counts_C = np.bincount(labels_H, minlength=n_classes)
    out = [math.nan] * n_classes
    if not len(heldout):
        return out, counts_C
    dump_art = plan["dump"].artifacts[0]
    shards = Shards(dump_art.dpath)
    by_sae: dict[str, list[int]] = {}
    for c, pick in enumerate(chosen):
        if pick is not None:
            by_sae.setdefault(pick["sae"], []).append(c)
    device = helpers.get_device(pipeline.score.device)
    torch.set_float32_matmul_precision(pipeline.score.matmul_precision)
    train_info = plan["train"].info
    for sae_key, classes in by_sae.items():
        acts_HD = shards.patches_flat(train_info[sae_key]["layer"], heldout)
        sae = nn.load(artifacts.Artifact(pipeline.root, "train", sae_key).dpath, device=device)
        latents = torch.tensor([chosen[c]["prototype"] for c in classes], device=device)
        scores_HJ = torch.cat(
            [
                score_stage.encode_block(sae, acts_HD[i : i + 4096], 0, sae.cfg.d_sae, batch_size=4096, device=device)[:, latents]
                for i in range(0, len(acts_HD), 4096)
            ]
        )
        ap_CJ = ap.average_precision(scores_HJ, torch.from_numpy(labels_H).to(device), n_classes=n_classes)
        for j, c in enumerate(classes):
            out[c] = float(ap_CJ[c, j])
    return out, counts_C


def _json_float(value: float) -> float | None:
    """JSON has no NaN: a class without positives gets null."""
    return None if math.isnan(value) else value


def to_csv(classes: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["name", "n_patches", "prevalence", "ap", "prototype", "sae", "dead"]
    fields += ["heldout_n_patches", "heldout_prevalence", "heldout_ap"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in classes:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in writer.fieldnames})
    return buf.getvalue()


def format_table(result: dict, top: int = 50) -> str:
    """The per-class results as a plain-text table (what the launcher prints at the end).

    `select AP` is the AP on the kept patches that chose the latent; `held-out AP` is that latent's AP on patches
    that took no part in the choice (the honest figure); `prev` is the AP of a random (or constant) score.
    """

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = [
        f"{'class':<18} {'patches':>7} {'prev':>6} {'select AP':>9} {'held-out AP':>11} {'x prev':>7} {'latent':>7}  sae"
    ]
    for row in result["classes"][:top]:
        reported = row["heldout_ap"] if row.get("heldout_ap") is not None else row["ap"]
        prev = row["heldout_prevalence"] if row.get("heldout_ap") is not None else row["prevalence"]
        ratio = "-" if reported is None or not prev else f"{reported / prev:.1f}x"
        flag = "  (dead latent)" if row.get("dead") else ""
        lines.append(
            f"{row['name'][:18]:<18} {row['n_patches']:>7d} {row['prevalence']:>6.3f} {fmt(row['ap']):>9} "
            f"{fmt(row.get('heldout_ap')):>11} {ratio:>7} {row['prototype']:>7d}  {row['sae'] or '-'}{flag}"
        )
    if len(result["classes"]) > top:
        lines.append(f"... {len(result['classes']) - top} more classes in best.json")
    return "\n".join(lines)
