"""reduce: every score partial -> the best AP and best latent per class, per SAE and across the sweep.

Output `<root>/reduce/<key>/best.json` and `best.csv`, written from the typed records of `saev.best` (`Best`: a
`ClassBest` per class, a `SaeBest` per SAE with its `metrics`, `health` and `n_wins`); the class entries are the best over the whole sweep (equal APs: the earlier
SAE in sweep order, then the lowest latent). An SAE whose training metrics say it failed (`sae_health`) is still
used, but every class whose latent it gives is marked, in best.json, best.csv, the launcher's table and the report.
"""

import collections
import dataclasses
import json
import logging
import math
import typing

import numpy as np
import torch
from PIL import Image

from saev import ap, artifacts, best, configs, helpers, keepmask, methods, metrics, nn, report, scoring, training, vit
from saev.data import datasets
from saev.data.shards import Shards
from saev.engine.plan import Piece, StagePlan

from . import train as train_stage
from .graph import DumpInfo, ImportInfo, MaskInfo, MethodRun, ScoreInfo, TrainInfo, role

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

NAME = "reduce"
VERSION = 5  # 3: SAE health (training metrics) in best.json, best.csv and the report; 4: the SAEs are inputs too;
# 5: a report split ([data.report]) may report; best.json has each class's layer and the best per layer

logger = logging.getLogger("stages.reduce")

# A single piece whose `run` writes the manifest.
finalize = manifest_extra = slurm_resources = explain_key = None


def check(pipeline: "Pipeline", own: StagePlan[None], inputs: "Inputs") -> None:
    """Before anything runs: selecting by probe needs the probes."""
    if pipeline.reduce.select == "probe" and not pipeline.score.probes:
        raise configs.ConfigError(
            '[reduce] select = "probe" chooses by the probes\' train cross-entropy, but [score] probes = false: '
            'set probes = true (or select = "ap")'
        )


class Inputs(typing.NamedTuple):
    """What the reduce reads (every artifact of these is an input of the reduce artifact)."""

    dump: StagePlan[DumpInfo]
    """The dumps: the select split's class names and labels, and the report patches' activations and labels (the report
    split's, or the one dump's held-out patches)."""
    train: StagePlan[TrainInfo]
    """The SAEs: their training metrics and the chosen latents' weights."""
    mask: StagePlan[MaskInfo]
    """The kept and held-out patches."""
    score: StagePlan[ScoreInfo]
    """The partials of every SAE."""


@dataclasses.dataclass(frozen=True)
class Config:
    """How results are reported."""

    report: bool = True
    """Write report/index.html: AP charts, precision-recall curves and top-activating images per class."""
    n_top_images: int = 12
    """Top-activating images shown per class in the report."""
    print_top: int = artifacts.unhashed(50)
    """The launcher prints at most this many classes (best.json always has all of them)."""
    select: typing.Literal["ap", "probe"] = "ap"
    """How each class's latent is chosen on the select split: "ap", the highest AP (equal APs: the earlier SAE, then
    the lowest latent); "probe", the lowest train cross-entropy of its 1-D logistic probe (the published rule; equal
    losses: the same order)."""
    purity_k: int = 16
    """The table's Purity@k: the top k report patches of each class's latent."""
    coverage_tau: float = 0.3
    """The table's Coverage@tau: classes whose report AP is above tau."""
    n_boot: int = 200
    """Bootstrap resamples of the report images for the table's 95% intervals (0: none)."""
    n_perm: int = 100
    """Permutations of the report labels among images for mAP's chance level and p-value (0: none)."""
    seed: int = 0
    """Seed of the resamples and permutations."""

    def __post_init__(self):
        if self.purity_k <= 0 or self.n_boot < 0 or self.n_perm < 0 or not 0 <= self.coverage_tau < 1:
            raise ValueError(
                "reduce: purity_k must be positive, n_boot and n_perm >= 0, coverage_tau in [0, 1); got "
                f"{self.purity_k}, {self.n_boot}, {self.n_perm}, {self.coverage_tau}"
            )


MAX_NMSE = 1.0
"""An SAE with normalized MSE at or above this reconstructs no better than the activations' mean: it failed."""
MAX_DEAD_FRAC = 0.5
"""An SAE with at least this fraction of dead latents (never active on its held-out rows) failed to train."""
MAX_DENSE_FRAC = 0.1
"""An SAE with more than this fraction of dense latents (each active on more than 10% of its held-out rows, see
`saev.training.Metrics.dense_frac`) is not sparse: its latents are not detectors of anything in particular."""


def sae_health(metrics: dict) -> list[str]:
    """Why an SAE's training metrics (its `metrics.json`) say it is unhealthy (failed to train, or not sparse);
    empty when it looks healthy.

    Thresholds: normalized MSE >= `MAX_NMSE`, dead fraction >= `MAX_DEAD_FRAC`, dense fraction > `MAX_DENSE_FRAC`;
    a metric that is NaN (e.g. constant activations) counts as failed.
    """
    out = []
    nmse, dead, dense = (float(metrics.get(k, math.nan)) for k in ("nmse", "dead_frac", "dense_frac"))
    if not nmse < MAX_NMSE:
        out.append(f"normalized MSE {nmse:.3g} >= {MAX_NMSE:g}")
    if not dead < MAX_DEAD_FRAC:
        out.append(f"{dead:.0%} dead latents (>= {MAX_DEAD_FRAC:.0%})")
    if not dense <= MAX_DENSE_FRAC:
        out.append(f"{dense:.0%} dense latents (> {MAX_DENSE_FRAC:.0%})")
    return out


def read_metrics(train_art: artifacts.Artifact) -> dict:
    """The SAE's training metrics (`metrics.json` of its train artifact): mse, nmse, l0, dead_frac, dense_frac."""
    with open(train_art.dpath / "metrics.json") as fd:
        return json.load(fd)


def plan(pipeline: "Pipeline", inputs: Inputs) -> StagePlan[None]:
    params = artifacts.hashed_params(pipeline.reduce)
    select_art, _ = role(inputs.dump, "select")
    report_art, _ = role(inputs.dump, "report")
    refs = {"dump": select_art.ref, "mask": inputs.mask.artifact.ref}
    if report_art != select_art:
        refs["report"] = report_art.ref
    for i, art in enumerate(inputs.score.artifacts):
        refs[f"score{i:03d}"] = art.ref
    for i, art in enumerate(inputs.train.artifacts):
        refs[f"sae{i:03d}"] = art.ref
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, refs))
    n_saes = len(inputs.score.artifacts)
    piece = Piece(NAME, art, label=f"best latent per class over {n_saes} SAE(s)")
    return StagePlan(NAME, (art,), (piece,), {art.key: params}, {art.key: refs})


class Pick(typing.NamedTuple):
    """A class's chosen latent: its AP on the kept patches, where it is."""

    ap: float
    prototype: int
    sae: str
    layer: int
    dead: bool
    rank: float
    """What the selection compares (higher wins): the AP, or minus the probe's train cross-entropy."""


class ReportSet(typing.NamedTuple):
    """The patches that report: the report split's labelled patches, or the one dump's held-out patches."""

    dump: artifacts.Artifact
    """The dump holding them."""
    idx: np.ndarray
    """Their global patch indices in that dump, sorted."""
    labels: np.ndarray
    """Their labels (int64)."""


def get_report_set(inputs: Inputs, heldout: np.ndarray) -> ReportSet:
    """The report split's labelled patches, or the one dump's held-out patches (a one-dataset config)."""
    select_art, _ = role(inputs.dump, "select")
    report_art, _ = role(inputs.dump, "report")
    if report_art == select_art:
        flat = np.asarray(Shards(select_art.dpath).labels).reshape(-1)
        return ReportSet(select_art, heldout, flat[heldout].astype(np.int64))
    shards = Shards(report_art.dpath)
    flat = np.asarray(shards.labels).reshape(-1)
    idx = np.flatnonzero(flat != shards.metadata.labels_ignore)
    return ReportSet(report_art, idx, flat[idx].astype(np.int64))


def run(pipeline: "Pipeline", own: StagePlan[None], inputs: Inputs, piece: Piece) -> None:
    started = artifacts.now()
    cfg: Config = pipeline.reduce
    art = piece.artifact
    select_art, mask_art = role(inputs.dump, "select")[0], inputs.mask.artifact
    shards = Shards(select_art.dpath)
    class_names = list(shards.metadata.class_names)
    n_classes = len(class_names)
    flat_labels = np.asarray(shards.labels).reshape(-1)
    keep, heldout = keepmask.load_for_dump(mask_art.dpath, shards)
    labels_N = flat_labels[keep].astype(np.int64)
    counts_C = np.bincount(labels_N, minlength=n_classes)
    reported = get_report_set(inputs, heldout)
    report_counts_C = np.bincount(reported.labels, minlength=n_classes)

    # Select on the kept patches: the best latent of every SAE, then the best over each layer's SAEs and over all.
    score_plan = inputs.score
    per_sae, ap_by_sae, partials_by_sae, sae_picks = {}, {}, {}, {}
    chosen: list[Pick | None] = [None] * n_classes
    by_layer: dict[int, list[Pick | None]] = {}
    for score_art in score_plan.artifacts:
        info = score_plan.info[score_art.key]
        partials = scoring.read_partials(
            score_art, info.d_sae, info.block_size, info.train_key, counts_C, probes=pipeline.score.probes
        )
        ap_by_sae[info.train_key] = partials.ap_CK
        dead_K = partials.min_K == partials.max_K
        partials_by_sae[info.train_key] = partials
        best_ap_C, best_k_C = ap.best_per_class(torch.from_numpy(partials.ap_CK))
        if cfg.select == "probe":  # the lowest train cross-entropy, first index on ties; none for an absent class
            best_k_C = np.where(counts_C > 0, np.argmin(partials.loss_CK, axis=1), -1)
        layer_chosen = by_layer.setdefault(info.layer, [None] * n_classes)
        sae_picks[info.train_key] = own_picks = [None] * n_classes
        entries = []
        for c, name in enumerate(class_names):
            k = int(best_k_C[c])
            value = float(partials.ap_CK[c, k]) if k >= 0 else math.nan
            entries.append(best.SaeClassBest(name=name, ap=_json_float(value), prototype=k))
            if k < 0:
                continue
            rank = -float(partials.loss_CK[c, k]) if cfg.select == "probe" else value
            pick = Pick(value, k, info.train_key, info.layer, bool(dead_K[k]), rank)
            own_picks[c] = pick
            for picks in (chosen, layer_chosen):  # equal ranks: the earlier SAE keeps the class
                if picks[c] is None or rank > picks[c].rank:
                    picks[c] = pick
        metrics = read_metrics(inputs.train.by_key(info.train_key))
        train_cfg = inputs.train.info[info.train_key].config
        per_sae[info.train_key] = {
            "score": score_art.key,
            "d_sae": info.d_sae,
            "layer": info.layer,
            "dead_frac": float(dead_K.mean()),
            "classes": tuple(entries),
            "config": train_stage.describe(train_cfg),
            "metrics": metrics,
            # The health checks are an SAE's: a baseline's codes are dense (PCA) or few (k-means) by design.
            "health": () if isinstance(train_cfg, MethodRun) else tuple(sae_health(metrics)),
        }
    n_wins = collections.Counter(pick.sae for pick in chosen if pick is not None)
    per_sae = {key: best.SaeBest(**entry, n_wins=n_wins[key]) for key, entry in per_sae.items()}

    def class_rows(picks: list[Pick | None], report_ap_C: list[float]) -> tuple[best.ClassBest, ...]:
        rows = []
        for c, name in enumerate(class_names):
            pick = picks[c]
            n_report = len(reported.idx)
            rows.append(
                best.ClassBest(
                    name=name,
                    n_patches=int(counts_C[c]),
                    prevalence=float(counts_C[c] / max(1, len(labels_N))),
                    ap=_json_float(pick.ap) if pick else None,
                    prototype=pick.prototype if pick else -1,
                    sae=pick.sae if pick else None,
                    layer=pick.layer if pick else None,
                    dead=pick.dead if pick else False,
                    sae_unhealthy=per_sae[pick.sae].health if pick else (),
                    heldout_n_patches=int(report_counts_C[c]),
                    heldout_prevalence=float(report_counts_C[c] / n_report) if n_report else None,
                    heldout_ap=_json_float(report_ap_C[c]),
                )
            )
        return tuple(rows)

    # Report on the report patches, which took no part in the choice.
    report_scores = chosen_scores(pipeline, inputs, reported.dump, chosen, reported.idx)
    classes = class_rows(chosen, report_ap(report_scores, reported.labels, n_classes))
    layers = []
    for layer, picks in by_layer.items():
        same = picks == chosen
        scores = report_scores if same else chosen_scores(pipeline, inputs, reported.dump, picks, reported.idx)
        layers.append(
            best.LayerBest(layer, classes if same else class_rows(picks, report_ap(scores, reported.labels, n_classes)))
        )
    report_key = None if reported.dump == select_art else reported.dump.key
    result = best.Best(
        n_patches=int(len(labels_N)), n_heldout=int(len(reported.idx)), report_dump=report_key, classes=classes,
        layers=tuple(layers), per_sae=per_sae,
    )  # fmt: skip
    best.write(art.dpath, result)
    rows = make_table(
        pipeline, inputs, reported, sae_picks, partials_by_sae, counts_C, shards.metadata.n_patches_per_img
    )
    best.write_table(art.dpath, rows)
    if cfg.report:
        data = make_report_data(pipeline, inputs, result, chosen, ap_by_sae, keep, reported, report_scores)
        data = dataclasses.replace(data, table=rows, files=[*data.files, "table.csv", "table.json"])
        index_fpath = report.write_report(art.dpath, data)
        logger.info("report: %s", index_fpath)
    art.write_manifest(params=own.params[art.key], inputs=own.inputs[art.key], started=started)


def make_table(
    pipeline: "Pipeline",
    inputs: Inputs,
    reported: ReportSet,
    sae_picks: dict[str, list[Pick | None]],
    partials_by_sae: dict[str, scoring.Partials],
    counts_C: np.ndarray,
    n_patches_per_img: int,
) -> list[best.TableRow]:
    """One `best.TableRow` per SAE or method (with its own choice of latent per class): the protocol's figures on the
    report patches (`saev.metrics.table`), its NMSE and L0 (`metrics.json`), and `best` per method by train Probe R.
    A class without a latent (no kept patches) enters as a constant score with the intercept-only probe. Empty
    without report patches."""
    cfg: Config = pipeline.reduce
    if not len(reported.idx):
        logger.warning("no report patches (no [data.report] and mask.n_heldout = 0): table.csv is empty")
        return []
    if not pipeline.score.probes:
        logger.info("[score] probes = false: no probes, so table.csv is empty (Probe R needs them)")
        return []
    n_classes = len(counts_C)
    pi_C = np.clip(counts_C / max(1, counts_C.sum()), 1e-12, 1 - 1e-12)
    h_C = -(pi_C * np.log(pi_C) + (1 - pi_C) * np.log1p(-pi_C))
    labels_N = torch.from_numpy(reported.labels)
    image_N = torch.from_numpy(reported.idx // n_patches_per_img)
    rows = []
    for key, picks in sae_picks.items():
        partials = partials_by_sae[key]
        scores = chosen_scores(pipeline, inputs, reported.dump, picks, reported.idx)
        scores_NC = np.zeros((len(reported.idx), n_classes), dtype=np.float32)
        w_C, b_C, ce_C = np.zeros(n_classes), np.log(pi_C) - np.log1p(-pi_C), h_C.copy()
        for c, pick in enumerate(picks):
            if pick is not None:
                scores_NC[:, c] = scores[c]
                w_C[c], b_C[c] = partials.w_CK[c, pick.prototype], partials.b_CK[c, pick.prototype]
                ce_C[c] = partials.loss_CK[c, pick.prototype]
        got = metrics.table(
            torch.from_numpy(scores_NC), torch.from_numpy(w_C), torch.from_numpy(b_C), labels_N, image_N,
            k=cfg.purity_k, tau=cfg.coverage_tau, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.seed,
        )  # fmt: skip
        train_cfg = inputs.train.info[key].config
        m = read_metrics(inputs.train.by_key(key))
        nmse = float(m.get("nmse", math.nan))
        rows.append(
            best.TableRow(
                method=method_name(train_cfg), sae=key, layer=inputs.train.info[key].layer,
                nmse=None if math.isnan(nmse) else nmse, l0=float(m.get("l0", math.nan)),
                probe_r=got["probe_r"].value, map=got["map"].value, purity=got["purity"], coverage=got["coverage"].value,
                map_lo=got["map"].low, map_hi=got["map"].high, probe_r_lo=got["probe_r"].low,
                probe_r_hi=got["probe_r"].high, coverage_lo=got["coverage"].low, coverage_hi=got["coverage"].high,
                best=False, train_probe_r=float(1 - ce_C.mean() / h_C.mean()),
                map_null=got["map_null_mean"], map_p=got["map_p"],
            )
        )  # fmt: skip
    for method in dict.fromkeys(row.method for row in rows):  # per method, the highest train Probe R (first on ties)
        mine = [i for i, row in enumerate(rows) if row.method == method]
        top = max(mine, key=lambda i: (rows[i].train_probe_r, -i))
        rows[top] = dataclasses.replace(rows[top], best=True)
    return rows


def method_name(cfg: "training.TrainConfig | ImportInfo | MethodRun") -> str:
    """The table's method: the objective, the baseline's kind, or "imported"."""
    if isinstance(cfg, MethodRun):
        return cfg.method.kind
    if isinstance(cfg, ImportInfo):
        return "imported"
    return cfg.objective.kind


def report_ap(scores: dict[int, np.ndarray], labels_H: np.ndarray, n_classes: int) -> list[float]:
    """Each class's exact AP on the report patches of its chosen latent's scores (NaN for a class without one)."""
    out = [math.nan] * n_classes
    if scores:
        classes_J = sorted(scores)
        scores_HJ = torch.from_numpy(np.stack([scores[c] for c in classes_J], axis=1))
        ap_CJ = ap.average_precision(scores_HJ, torch.from_numpy(labels_H), n_classes=n_classes)
        for j, c in enumerate(classes_J):
            out[c] = float(ap_CJ[c, j])
    return out


def chosen_scores(
    pipeline: "Pipeline", inputs: Inputs, dump_art: artifacts.Artifact, chosen: list[Pick | None], idx: np.ndarray
) -> dict[int, np.ndarray]:
    """Class -> float32 scores of its chosen latent on the patches `idx` of `dump_art` (classes without a choice left
    out)."""
    if not len(idx):
        return {}
    shards = Shards(dump_art.dpath)
    by_sae: dict[str, list[int]] = {}
    for c, pick in enumerate(chosen):
        if pick is not None:
            by_sae.setdefault(pick.sae, []).append(c)
    device = helpers.get_device(pipeline.score.device)
    torch.set_float32_matmul_precision(pipeline.score.matmul_precision)
    out = {}
    for sae_key, classes in by_sae.items():
        layer = inputs.train.info[sae_key].layer
        sae = methods.load_encoder(inputs.train.by_key(sae_key).dpath, device=device)
        prototypes = [chosen[c].prototype for c in classes]
        latents = torch.tensor(prototypes, device=device)
        parts = []
        for start in range(0, len(idx), _BATCH):
            acts_BD = torch.from_numpy(shards.patches_flat(layer, idx[start : start + _BATCH])).to(device)
            with torch.inference_mode():  # only the chosen latents' columns, except for TopK (which needs all)
                if isinstance(sae, nn.SparseAutoencoder):
                    parts.append(sae.encode(acts_BD, latents=latents).cpu())
                else:
                    parts.append(torch.cat([sae.encode_block(acts_BD, k, k + 1) for k in prototypes], dim=1).cpu())
        scores_NJ = torch.cat(parts).numpy()
        for j, c in enumerate(classes):
            out[c] = np.ascontiguousarray(scores_NJ[:, j])
    return out


_BATCH = 4096


def make_report_data(
    pipeline: "Pipeline",
    inputs: Inputs,
    result: best.Best,
    chosen: list[Pick | None],
    ap_by_sae: dict[str, np.ndarray],
    keep: np.ndarray,
    reported: ReportSet,
    report_scores: dict[int, np.ndarray],
) -> report.ReportData:
    """Everything the HTML report shows: AP distributions, PR curves and the top-activating images per class."""
    cfg: Config = pipeline.reduce
    select_art, select = role(inputs.dump, "select")
    shards = Shards(select_art.dpath)
    md = shards.metadata
    flat_labels = np.asarray(shards.labels).reshape(-1)
    # An adopted dump has no dataset or model config here: its report has no top-activating images.
    dataset = None if select.data is None else datasets.make_dataset(select.data)
    img_size, n_side = (0, 0) if dataset is None else vit.get_patch_grid(pipeline.dump.vit)
    kept_scores = chosen_scores(pipeline, inputs, select_art, chosen, keep)
    items = []
    for c, row in enumerate(result.classes):
        pick = chosen[c]
        if pick is None:
            ap_all = np.zeros(0)
            pr_scores, pr_labels, top = np.zeros(0, np.float32), np.zeros(0, bool), []
        else:
            ap_all = ap_by_sae[pick.sae][c]
            if c in report_scores:
                pr_scores, pr_labels = report_scores[c], reported.labels == c
            else:
                pr_scores, pr_labels = kept_scores[c], flat_labels[keep] == c
            top = (
                []
                if dataset is None
                else top_images(
                    inputs, shards, dataset, pick, keep, kept_scores[c], c, img_size, n_side, cfg.n_top_images
                )
            )
        items.append(
            report.ClassResult(
                **{name: getattr(row, name) for name in best.fields(best.ClassBest)},
                ap_all=np.asarray(ap_all, dtype=np.float64),
                pr_scores=np.asarray(pr_scores, dtype=np.float32),
                pr_labels=np.asarray(pr_labels, dtype=bool),
                pr_source="held-out" if c in report_scores else "selection",
                top=top,
            )
        )
    notes = [
        f"config: {pipeline.config_fpath or pipeline.config_dpath}",
        f"dump: {select_art.ref} ({md.vit_ckpt}, {md.n_imgs} images, layers {list(md.layers)})",
        f"selection patches: {result.n_patches}; "
        + (
            f"report patches: {result.n_heldout} (every labelled patch of the report split dump/{result.report_dump})"
            if result.report_dump
            else f"held-out patches: {result.n_heldout}"
        ),
        f"SAEs: {', '.join(result.per_sae)}",
    ]
    saes = [
        report.SaeResult(
            key=key,
            description=entry.config,
            nmse=float(entry.metrics["nmse"]),
            l0=float(entry.metrics["l0"]),
            dead_frac=float(entry.metrics["dead_frac"]),
            dense_frac=float(entry.metrics["dense_frac"]),
            n_wins=entry.n_wins,
            health=list(entry.health),
            layer=entry.layer,
        )
        for key, entry in result.per_sae.items()
    ]
    by_layer = {entry.layer: [row.heldout_ap for row in entry.classes] for entry in result.layers}
    return report.ReportData(
        title="Best SAE latent per class", classes=items, notes=notes, saes=saes, files=["best.json", "best.csv"],
        by_layer=by_layer,
    )  # fmt: skip


def top_images(
    inputs: Inputs, shards, dataset, pick: Pick, keep, scores_N, c, img_size, n_side, n_top
) -> list[report.TopImage]:
    """The images holding the kept patches where the chosen latent fires hardest, with every patch's score."""
    md = shards.metadata
    order = np.argsort(-scores_N, kind="stable")
    imgs: list[int] = []
    for i in order:
        img = int(keep[i] // md.n_patches_per_img)
        if img not in imgs:
            imgs.append(img)
        if len(imgs) == n_top:
            break
    layer = pick.layer
    sae = methods.load_encoder(inputs.train.by_key(pick.sae).dpath)
    out = []
    for img in imgs:
        acts_PD = shards.patches(layer, img, img + 1)[0]
        scores_P = scoring.encode_block(
            sae, acts_PD, pick.prototype, pick.prototype + 1, batch_size=_BATCH, device=torch.device("cpu")
        )[:, 0].numpy()
        labels_P = np.asarray(shards.labels[img]) == c
        sample = dataset[img]
        # The model's input itself (upright, stretched or cropped as `load_batch` did for the dump), so that the
        # outlined patches cover what the model saw.
        pixels_3SS = datasets.resize_image(sample.image, img_size, dataset.resize)
        out.append(
            report.TopImage(
                image=Image.fromarray(pixels_3SS.transpose(1, 2, 0)),
                patch_scores=scores_P.reshape(n_side, n_side).astype(np.float32),
                label_mask=labels_P.reshape(n_side, n_side),
                title=sample.name,
            )
        )
    return out


def _json_float(value: float) -> float | None:
    """JSON has no NaN: a class without positives gets null."""
    return None if math.isnan(value) else value


def format_table(result: best.Best, top: int = 50) -> str:
    """The per-class results as a plain-text table (what the launcher prints at the end), then, with several layers,
    each layer's own best per class.

    `select AP` is the AP on the kept patches that chose the latent; `report AP` (`held-out AP` in a one-dataset
    config) is that latent's AP on patches that took no part in the choice (the honest figure); `prev` is the AP of a
    random (or constant) score.
    """

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    reported_name = "report AP" if result.report_dump else "held-out AP"
    lines = [
        f"{'class':<18} {'patches':>7} {'prev':>6} {'select AP':>9} {reported_name:>11} {'x prev':>7} {'layer':>5} "
        f"{'latent':>7}  sae"
    ]
    for row in result.classes[:top]:
        reported = row.heldout_ap if row.heldout_ap is not None else row.ap
        prev = row.heldout_prevalence if row.heldout_ap is not None else row.prevalence
        ratio = "-" if reported is None or not prev else f"{reported / prev:.1f}x"
        flag = "  (dead latent)" if row.dead else ""
        flag += "  (SAE unhealthy)" if row.sae_unhealthy else ""
        layer = "-" if row.layer is None else str(row.layer)
        lines.append(
            f"{row.name[:18]:<18} {row.n_patches:>7d} {row.prevalence:>6.3f} {fmt(row.ap):>9} "
            f"{fmt(row.heldout_ap):>11} {ratio:>7} {layer:>5} {row.prototype:>7d}  {row.sae or '-'}{flag}"
        )
    if len(result.classes) > top:
        lines.append(f"... {len(result.classes) - top} more classes in best.json")
    if len(result.layers) > 1:
        lines.append(f"\n{reported_name} by layer (each layer's own best latent; * = the best over layers)")
        lines.append(f"{'class':<18} " + " ".join(f"{'layer ' + str(entry.layer):>10}" for entry in result.layers))
        for c, row in enumerate(result.classes[:top]):
            cells = []
            for entry in result.layers:
                mark = "*" if row.layer == entry.layer else " "
                cells.append(f"{fmt(entry.classes[c].heldout_ap):>9}{mark}")
            lines.append(f"{row.name[:18]:<18} " + " ".join(cells))
    return "\n".join(lines)


def format_health(result: best.Best) -> list[str]:
    """The launcher's lines after the table: every SAE of the sweep with its training metrics, then a `warning:`
    line per unhealthy SAE (`sae_health`), naming the classes whose latent it gives."""
    per_sae = result.per_sae
    if not per_sae:
        return []
    lines = [
        f"\n{'sae':<18} {'method':<9} {'layer':>5} {'nmse':>6} {'L0':>7} {'dead':>6} {'dense':>6} {'wins':>5}  health"
    ]
    for key, entry in per_sae.items():
        m = entry.metrics
        method = entry.config.split("(")[0].split(" ")[0]  # the objective or method kind ("imported" for imports)
        lines.append(
            f"{key:<18} {method[:9]:<9} {entry.layer:>5d} {m['nmse']:>6.3f} {m['l0']:>7.1f} {m['dead_frac']:>6.1%} {m['dense_frac']:>6.1%} "
            f"{entry.n_wins:>5d}  {'UNHEALTHY' if entry.health else 'ok'}"
        )
    for key, entry in per_sae.items():
        if entry.health:
            won = [row.name for row in result.classes if row.sae == key]
            shown = ", ".join(won[:8]) + (f" and {len(won) - 8} more" if len(won) > 8 else "")
            lines.append(
                f"warning: SAE {key} is unhealthy ({'; '.join(entry.health)}); "
                + (
                    f"{len(won)} class(es) use its latents: {shown}; check them before trusting them"
                    if won
                    else "no class uses it"
                )
                + " (see 'SAE health' in the README)"
            )
    return lines
