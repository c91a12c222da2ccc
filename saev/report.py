"""A static HTML report of the best SAE latent ("prototype") per class.

`write_report(dpath, report)` writes `dpath/report/index.html` and the PNGs it shows, side by side, linked by
relative paths: the folder opens from a file system or a cluster's file browser, with nothing fetched from the
network (no external CSS, scripts or fonts). Every file is written atomically; `index.html` last.

The page shows, from top to bottom:
- the title and notes (config file, keys, counts), links to the result files beside `report/` (best.json,
  best.csv), and a warning when an unhealthy SAE (failed to train, or not sparse) gives some class its latent;
- a chart of each class's best AP on the selection patches, its held-out AP and its prevalence (the AP of a
  detector that guesses), and a table of the same numbers (with held-out AP over prevalence) linking to each class;
- every SAE of the sweep side by side: its training metrics (normalized MSE, L0, dead and dense fractions), how
  many classes it wins, and its health;
- per class: the AP of every latent of the chosen SAE (a histogram, the chosen latent and the prevalence
  marked), the precision-recall curve of the chosen latent, and its top-activating images with the patches
  where it fires outlined in red (a colour bar gives the activation scale) and the patches labelled with the
  class hatched in cyan ("all patches labelled" instead, for an image whose every patch is).

The reduce stage fills the records below (`ReportData` holding `ClassResult`s holding `TopImage`s).
"""

import dataclasses
import html
import io
import math
import pathlib
import typing

import beartype
import matplotlib
import numpy as np
import PIL.Image
from jaxtyping import Bool, Float, Float32, Float64, jaxtyped

from saev import atomic, best
from saev.ap import average_precision
from saev.helpers import Progress

matplotlib.use("Agg")  # before pyplot: never open a window or need a display (Slurm nodes have none)
import matplotlib.pyplot as plt

TILE_PX = 128
"""Target side of one top-image tile in pixels (rounded to a whole number of pixels per patch)."""

_DPI = 100
_ACTIVE_RGB = np.array([1.0, 0.1, 0.1])  # outline of patches where the latent fires
_LABEL_RGB = np.array([0.0, 0.9, 1.0])  # hatching of patches labelled with the class
_HATCH_PX = 4  # one diagonal cyan line every this many pixels: a fill, not an outline, so that holes read as holes
_CMAP = "inferno"
_COLORS = {"ap": "#1f77b4", "heldout": "#ff7f0e", "prevalence": "#9a9a9a"}


###########
# Records #
###########


@jaxtyped(typechecker=beartype.beartype)
@dataclasses.dataclass(frozen=True, eq=False)
class TopImage:
    """One of the images on which a class's chosen latent activates most."""

    image: PIL.Image.Image
    """The dataset image as the model saw it (after resizing and cropping), e.g. 64x64 or 224x224."""
    patch_scores: Float32[np.ndarray, "side side"]
    """The chosen latent's activation on each patch of this image, in image layout (row, column)."""
    label_mask: Bool[np.ndarray, "side side"]
    """Patches of this image labelled with the class."""
    title: str
    """Caption, e.g. the image's index or file name (plain text; escaped when written)."""


@jaxtyped(typechecker=beartype.beartype)
@dataclasses.dataclass(frozen=True, eq=False)
class ClassResult(best.ClassBest):
    """What the reduce stage found for one class: its record in best.json (`saev.best.ClassBest`: name, AP,
    prototype, SAE, held-out figures...) and what only the report shows."""

    ap_all: Float64[np.ndarray, " K"]
    """AP of every latent of the chosen SAE for this class over the selection patches; NaN where undefined."""
    pr_scores: Float32[np.ndarray, " M"]
    """The chosen latent's activation on each patch of `pr_source` (for the precision-recall curve)."""
    pr_labels: Bool[np.ndarray, " M"]
    """Whether each patch of `pr_source` is labelled with this class."""
    pr_source: str
    """Which patches `pr_scores` and `pr_labels` cover, e.g. "held-out" or "selection" (shown on the plot)."""
    top: list[TopImage]
    """Top-activating images of the chosen latent, best first (8 to 16 read well); may be empty."""

    def __post_init__(self):
        if self.prototype < -1 or (len(self.ap_all) and self.prototype >= len(self.ap_all)):
            raise ValueError(
                f"class {self.name!r}: prototype {self.prototype} is not -1 or in [0, {len(self.ap_all)})."
            )
        if not np.isfinite(self.pr_scores).all():
            raise ValueError(f"class {self.name!r}: pr_scores has NaN or inf.")


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class SaeResult:
    """One SAE of the sweep, as trained (its metrics on held-out rows) and as used (how many classes it wins)."""

    key: str
    """The SAE's key (its train artifact)."""
    description: str
    """Its training config in a line, e.g. "relu_l1(l1_coeff=0.001) d_sae=512 lr=0.003 seed=0"."""
    nmse: float
    """Normalized MSE: the fraction of variance it does not reconstruct (1 = no better than the mean)."""
    l0: float
    """Mean number of active latents per row."""
    dead_frac: float
    """Fraction of latents never active."""
    dense_frac: float
    """Fraction of latents active on more than 10% of rows."""
    n_wins: int
    """Classes whose best latent over the sweep is one of this SAE's."""
    health: list[str]
    """Why it is unhealthy (e.g. "70% dead latents (>= 50%)"); empty when it looks healthy."""
    layer: int | None = None
    """ViT block (0-based) it reads."""


@beartype.beartype
@dataclasses.dataclass(frozen=True, eq=False)
class ReportData:
    """Everything one report shows."""

    title: str
    """Page title, e.g. the experiment's name (plain text; escaped when written)."""
    classes: list[ClassResult]
    """One result per class, in the order to show them."""
    notes: list[str]
    """Lines under the title: config paths, artifact keys, patch counts (plain text; escaped when written)."""
    saes: list[SaeResult]
    """Every SAE of the sweep, in sweep order."""
    files: list[str]
    """Result files in the directory that holds `report/` (e.g. best.json), linked as `../<name>`."""
    table: list[best.TableRow] = dataclasses.field(default_factory=list)
    """The protocol's table (one row per SAE or method and layer), shown first."""
    by_layer: dict[int, list[float | None]] = dataclasses.field(default_factory=dict)
    """With several layers: layer -> the reported AP (held-out or report split) of that layer's own best latent for
    each class, in the order of `classes`."""


##########################
# Precision-recall curve #
##########################


class PrecisionRecall(typing.NamedTuple):
    """A precision-recall curve as scikit-learn's `precision_recall_curve` returns it (unpacks the same way)."""

    precision: Float64[np.ndarray, " T+1"]
    """Precision at each threshold (thresholds increasing), then a final 1.0 that pairs with recall 0."""
    recall: Float64[np.ndarray, " T+1"]
    """Recall at each threshold (so decreasing), then a final 0.0."""
    thresholds: Float[np.ndarray, " T"]
    """The distinct scores, increasing, in the scores' dtype; a patch is predicted positive if score >= threshold."""


@jaxtyped(typechecker=beartype.beartype)
def precision_recall_curve(labels_M: Bool[np.ndarray, " M"], scores_M: Float[np.ndarray, " M"]) -> PrecisionRecall:
    """Exactly scikit-learn's `precision_recall_curve(labels_M, scores_M)` (drop_intermediate=False).

    One point per distinct score: tied patches cross a threshold together. Like scikit-learn, recall is 1.0
    everywhere when there are no positives (without its warning).

    Raises:
        ValueError: no patches, or NaN or inf among the scores.
    """
    if not len(scores_M):
        raise ValueError("precision_recall_curve needs at least one patch.")
    if not np.isfinite(scores_M).all():
        raise ValueError("precision_recall_curve: scores have NaN or inf.")
    order_M = np.argsort(scores_M, kind="stable")[::-1]
    scores_M, labels_M = scores_M[order_M], labels_M[order_M]
    # The last patch of each tie group (in decreasing order) is where its threshold's counts are read.
    last_T = np.r_[np.flatnonzero(np.diff(scores_M)), len(scores_M) - 1]
    tps_T = np.cumsum(labels_M, dtype=np.int64)[last_T]
    fps_T = last_T + 1 - tps_T
    precision_T = tps_T / (tps_T + fps_T)
    recall_T = tps_T / tps_T[-1] if tps_T[-1] else np.ones(len(tps_T))
    return PrecisionRecall(
        precision=np.r_[precision_T[::-1], 1.0],
        recall=np.r_[recall_T[::-1], 0.0],
        thresholds=scores_M[last_T][::-1].copy(),
    )


##########
# Report #
##########


@beartype.beartype
def write_report(dpath: pathlib.Path, report: ReportData) -> pathlib.Path:
    """Write `dpath/report/index.html` and its PNGs (atomically, index last); return the index's path."""
    report_dpath = dpath / "report"
    report_dpath.mkdir(parents=True, exist_ok=True)
    sections = []
    summary = None
    layers_png = None
    if len({row.layer for row in report.table}) > 1:
        layers_fig = _make_layers_figure(report.table)
        try:
            layers_png = _write_png(report_dpath / "layers.png", layers_fig)
        finally:
            plt.close(layers_fig)
    if report.classes:
        summary_fig = _make_summary_figure(report.classes)
        try:
            summary = _write_png(report_dpath / "summary.png", summary_fig)
        finally:
            plt.close(summary_fig)
    fig, (hist_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 3.3), dpi=_DPI, layout="constrained")
    try:
        for c, result in enumerate(Progress(report.classes, desc="report", unit="class")):
            sections.append(_write_class(report_dpath, c, result, fig, hist_ax, pr_ax))
    finally:
        plt.close(fig)
    index_fpath = report_dpath / "index.html"
    page = _make_page(report, summary, sections, layers_png)
    atomic.atomic_write_bytes(index_fpath, page.encode("utf-8"))
    return index_fpath


class _Png(typing.NamedTuple):
    name: str
    width: int
    height: int


def _write_png(fpath: pathlib.Path, source: "plt.Figure | PIL.Image.Image") -> _Png:
    buf = io.BytesIO()
    if isinstance(source, PIL.Image.Image):
        source.save(buf, format="png")
        width, height = source.size
    else:
        source.savefig(buf, format="png", dpi=_DPI)
        width, height = PIL.Image.open(io.BytesIO(buf.getvalue())).size
    atomic.atomic_write_bytes(fpath, buf.getvalue())
    return _Png(fpath.name, width, height)


def _mpl_text(text: str, limit: int = 32) -> str:
    """Plain text for matplotlib: shortened, and `$` escaped so that no name is read as mathtext."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


_LAYER_METRICS = (("probe_r", "Probe R"), ("map", "mAP"), ("purity", "Purity"), ("coverage", "Coverage"))


def _make_layers_figure(rows: list[best.TableRow]) -> "plt.Figure":
    """Each metric of the table against the layer, one line per method (its best row at each layer by train Probe R),
    with the bootstrap interval as a band where the table has one."""
    fig, axes = plt.subplots(1, len(_LAYER_METRICS), figsize=(12, 3), dpi=_DPI, layout="constrained")
    for method in dict.fromkeys(row.method for row in rows):
        per_layer: dict[int, best.TableRow] = {}
        for row in rows:
            if row.method == method and (
                row.layer not in per_layer or row.train_probe_r > per_layer[row.layer].train_probe_r
            ):
                per_layer[row.layer] = row
        layers = sorted(per_layer)
        for ax, (name, title) in zip(axes, _LAYER_METRICS, strict=True):
            line = ax.plot(
                layers, [getattr(per_layer[lay], name) for lay in layers], marker="o", label=_mpl_text(method)
            )
            if name != "purity":
                lo = [getattr(per_layer[lay], f"{name}_lo") for lay in layers]
                hi = [getattr(per_layer[lay], f"{name}_hi") for lay in layers]
                ax.fill_between(layers, lo, hi, color=line[0].get_color(), alpha=0.15)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _make_summary_figure(classes: list[ClassResult]) -> "plt.Figure":
    """Grouped horizontal bars per class: selection AP, held-out AP, prevalence; "no positives" where AP is None."""
    n = len(classes)
    per_class_in = 0.42 if n <= 20 else 0.3
    fig, ax = plt.subplots(figsize=(9, 1.5 + per_class_in * max(n, 1)), dpi=_DPI, layout="constrained")
    y_C = np.arange(n)
    h = 0.27

    def values(get) -> np.ndarray:
        return np.array([math.nan if get(r) is None else get(r) for r in classes], dtype=np.float64)

    ap_C = values(lambda r: r.ap)
    heldout_C = values(lambda r: r.heldout_ap)
    prevalence_C = values(lambda r: r.prevalence)
    ax.barh(y_C - h, ap_C, h, color=_COLORS["ap"], label="AP (selection)")
    if not np.isnan(heldout_C).all():
        ax.barh(y_C, heldout_C, h, color=_COLORS["heldout"], label="AP (held-out)")
    ax.barh(y_C + h, prevalence_C, h, color=_COLORS["prevalence"], label="prevalence (chance AP)")
    for c, result in enumerate(classes):
        if result.ap is None:
            ax.text(0.01, c - h, "no positives", va="center", fontsize=8, style="italic", color="#b00")
        elif result.dead:
            ax.text(result.ap + 0.01, c - h, "dead latent", va="center", fontsize=8, color="#b00")
    ax.set_yticks(y_C, [_mpl_text(r.name) for r in classes])
    ax.set_ylim(n - 0.5, -0.5)  # first class on top, as in the sections below
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision over patches")
    ax.grid(axis="x", alpha=0.3)
    if n > 12:  # a tall chart: numbers at its top too
        ax.tick_params(axis="x", top=True, labeltop=True)
    fig.legend(loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return fig


def _write_class(dpath, c: int, result: ClassResult, fig, hist_ax, pr_ax) -> str:
    """Write one class's PNGs and return its HTML section."""
    stem = f"class{c:04d}"
    parts = [_class_header(result)]
    has_hist = bool(np.isfinite(result.ap_all).any())
    has_pr = result.prototype >= 0 and len(result.pr_labels) > 0 and bool(result.pr_labels.any())
    if has_hist or has_pr:
        hist_ax.clear()
        pr_ax.clear()
        if has_hist:
            _plot_ap_histogram(hist_ax, result)
        else:
            _plot_missing(hist_ax, "no AP to show")
        if has_pr:
            _plot_pr_curve(pr_ax, result)
        else:
            _plot_missing(pr_ax, f"no positive {result.pr_source} patches")
        png = _write_png(dpath / f"{stem}-plots.png", fig)
        alt = f"AP of every latent and precision-recall curve for {result.name}"
        parts.append(f'<p><img src="{png.name}" width="{png.width}" height="{png.height}" alt="{_e(alt)}"></p>')
    if result.top:
        parts.append(_write_tiles(dpath, stem, result))
    elif result.prototype >= 0:
        parts.append('<p class="muted">No top-activating images were given.</p>')
    return f'<section class="cls" id="c{c}">\n' + "\n".join(parts) + "\n</section>"


def _class_header(result: ClassResult) -> str:
    badge = ' <span class="badge">dead latent</span>' if result.dead else ""
    if result.sae_unhealthy:
        badge += ' <span class="badge unhealthy">SAE unhealthy</span>'
    head = f"<h2>{_e(result.name)}{badge}</h2>"
    if result.prototype < 0:
        why = "it has no positive selection patches" if result.ap is None else "none was chosen"
        return head + f'\n<p class="warn">No prototype: {why}.</p>'
    facts = [
        f"latent <b>{result.prototype}</b> of SAE <code>{_e(result.sae or '?')}</code>",
        f"{result.n_patches:,} patches",
        f"prevalence {_fmt(result.prevalence)}",
        f"selection AP <b>{_fmt(result.ap)}</b>",
        f"held-out AP <b>{_fmt(result.heldout_ap)}</b> (prevalence {_fmt(result.heldout_prevalence)})",
    ]
    html_ = head + "\n<p>" + " · ".join(facts) + "</p>"
    if result.dead:
        html_ += (
            '\n<p class="warn">This latent never fires on the selection patches (constant activation): its AP '
            "equals the prevalence and it detects nothing.</p>"
        )
    if result.sae_unhealthy:
        html_ += (
            f'\n<p class="warn">The SAE <code>{_e(result.sae or "?")}</code> is unhealthy '
            f"({_e('; '.join(result.sae_unhealthy))}): check this latent before trusting it (see the SAE table "
            "above).</p>"
        )
    return html_


def _plot_missing(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")


def _plot_ap_histogram(ax, result: ClassResult) -> None:
    ax.set_axis_on()
    ap_K = result.ap_all[np.isfinite(result.ap_all)]
    ax.hist(ap_K, bins=np.linspace(0, 1, 51), color="#8fb3d9", log=True)
    ax.axvline(result.prevalence, color="#555", ls="--", lw=1.2, label=f"prevalence {_fmt(result.prevalence)}")
    if result.ap is not None and result.prototype >= 0:
        ax.axvline(result.ap, color="#d62728", lw=1.8, label=f"latent {result.prototype}: AP {_fmt(result.ap)}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP on selection patches")
    ax.set_ylabel("latents")
    ax.set_title(f"AP of all {len(result.ap_all):,} latents of the SAE", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")


def _plot_pr_curve(ax, result: ClassResult) -> None:
    ax.set_axis_on()
    curve = precision_recall_curve(result.pr_labels, result.pr_scores)
    ap = average_precision(result.pr_scores[:, None], result.pr_labels[:, None])[0, 0].item()
    ax.plot(curve.recall, curve.precision, drawstyle="steps-post", color="#d62728", lw=1.5,
            label=f"latent {result.prototype} (AP {ap:.3f})")  # fmt: skip
    chance = float(result.pr_labels.mean())
    ax.axhline(chance, color="#555", ls="--", lw=1.2, label=f"chance {_fmt(chance)}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    n_pos = int(result.pr_labels.sum())
    source = _mpl_text(result.pr_source, 20)
    ax.set_title(f"Precision-recall, {source} patches ({n_pos:,} of {len(result.pr_labels):,})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")


def _write_tiles(dpath: pathlib.Path, stem: str, result: ClassResult) -> str:
    """Write one PNG per top image and return the HTML grid of them with captions."""
    vmax = max(float(max(t.patch_scores.max() for t in result.top)), 0.0) or 1.0
    cmap = matplotlib.colormaps[_CMAP]
    figures = []
    for i, top in enumerate(result.top):
        png = _write_png(dpath / f"{stem}-top{i:02d}.png", _make_tile(top, vmax, cmap))
        n_active = int((top.patch_scores != 0).sum())  # an SAE's own rule: saev's TopK keeps negative values
        stats = f"max {_fmt(float(top.patch_scores.max()))} · {n_active}/{top.patch_scores.size} active"
        if top.label_mask.all():
            stats += " · all patches labelled"
        caption = f'{_e(top.title)}<br><span class="muted">{stats}</span>'
        alt = f"{result.name}: {top.title}"
        figures.append(
            f'<figure><img src="{png.name}" width="{png.width}" height="{png.height}" alt="{_e(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if all(t.label_mask.all() for t in result.top):  # class-folder data: nothing to draw, say so
        label_key = f"every patch of these images is labelled {_e(result.name)}"
    else:
        label_key = f'<span class="sw hatch"></span>labelled {_e(result.name)}'
    return (
        f"<h3>Top-activating images</h3>\n"
        f'<p class="key"><span class="sw red"></span>latent &gt; 0 {label_key} · activation (shared by these '
        f"images): {_colour_bar(cmap, vmax)}</p>\n"
        f'<div class="tiles">{"".join(figures)}</div>'
    )


def _colour_bar(cmap, vmax: float) -> str:
    """The heat map's scale as an inline CSS gradient (no file) between its min and max labels. Tiles blend it
    over the image (more opaque where higher), so it is the hue to read, not the exact shade."""
    stops = ", ".join(f"{matplotlib.colors.to_hex(cmap(x))} {x:.0%}" for x in np.linspace(0, 1, 11))
    return (
        f'<span class="cbar"><span class="cmin">0</span>'
        f'<span class="cgrad" style="background: linear-gradient(to right, {stops})"></span>'
        f'<span class="cmax">{_fmt(vmax)}</span></span>'
    )


def _make_tile(top: TopImage, vmax: float, cmap) -> PIL.Image.Image:
    """The image enlarged to about TILE_PX, a heat map on patches where the latent fires, outlined in red, and the
    class's labelled patches hatched with thin cyan diagonals (a fill: an outline would trace the holes of a
    background class around objects as if those were labelled); an image whose every patch is labelled is not
    hatched (its caption says so)."""
    side = top.patch_scores.shape[0]
    scale = max(1, round(TILE_PX / side))
    px = side * scale
    image = top.image.convert("RGB").resize((px, px), PIL.Image.Resampling.LANCZOS)
    rgb = np.asarray(image, dtype=np.float32) / 255
    scores = np.repeat(np.repeat(top.patch_scores, scale, axis=0), scale, axis=1)
    active = scores > 0
    level = np.clip(scores / vmax, 0, 1)
    heat = cmap(level)[..., :3]
    alpha = np.where(active, 0.3 + 0.35 * level, 0.0)[..., None]
    rgb = (1 - alpha) * rgb + alpha * heat
    if not top.label_mask.all():
        label = np.repeat(np.repeat(top.label_mask, scale, axis=0), scale, axis=1)
        yy, xx = np.mgrid[:px, :px]
        rgb[label & ((yy + xx) % _HATCH_PX == 0)] = _LABEL_RGB
    rgb[active & ~_erode(active, 2)] = _ACTIVE_RGB  # last: the firing outline stays whole over the hatching
    return PIL.Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood is in `mask`; outside the image counts as outside the mask."""
    return ~_dilate(~np.pad(mask, r), r)[r:-r, r:-r]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(mask, r)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.3f}" if x >= 0.01 or x == 0 else f"{x:.2g}"


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
  max-width: 1100px; margin: 0 auto; padding: 1rem 1.5rem 4rem; background: #fff; }
h1 { font-size: 1.6rem; margin: .5rem 0; } h2 { font-size: 1.25rem; margin: 0 0 .3rem; } h3 { font-size: 1rem; }
img { max-width: 100%; height: auto; }
code, .notes { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85em; }
.notes { color: #444; padding-left: 1.2rem; margin: .3rem 0 1rem; }
.muted { color: #777; } .warn { color: #b00; }
.badge { background: #c62828; color: #fff; border-radius: 4px; padding: 1px 7px; font-size: .75rem;
  vertical-align: middle; text-transform: uppercase; letter-spacing: .03em; }
section.cls { border-top: 1px solid #ddd; padding-top: 1rem; margin-top: 1.5rem; }
table { border-collapse: collapse; font-size: .85rem; margin: 1rem 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, td.l { text-align: left; }
tr.dead td { background: #fdecea; } tr.none td { color: #999; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
figure { margin: 0; } figure img { image-rendering: pixelated; display: block; }
figcaption { font-size: .75rem; line-height: 1.25; margin-top: 2px; overflow-wrap: anywhere; }
.key { font-size: .8rem; color: #444; }
.sw { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin: 0 3px 0 8px; border: 2px solid; }
.sw.red { border-color: #ff1a1a; }
.sw.hatch { border-color: #00e5ff; background: repeating-linear-gradient(45deg, #00e5ff 0 1px, #fff 1px 4px); }
.cbar { display: inline-flex; align-items: center; gap: 4px; vertical-align: middle; }
.cgrad { display: inline-block; width: 140px; height: 12px; border: 1px solid #999; }
.badge.unhealthy { background: #e65100; } tr.unhealthy td { background: #fff3e0; }
.banner { border: 2px solid #e65100; background: #fff3e0; padding: .5rem .8rem; border-radius: 4px; }
.files a { margin-right: 1rem; }
"""


def _ratio(ap: float | None, prevalence: float | None) -> str:
    """AP over prevalence (how many times better than guessing), e.g. "20.3x"; "–" when undefined."""
    if ap is None or not prevalence:
        return "–"
    return f"{ap / prevalence:.1f}x"


def _make_page(report: ReportData, summary: _Png | None, sections: list[str], layers_png: _Png | None = None) -> str:
    notes = "".join(f"<li>{_e(note)}</li>" for note in report.notes)
    rows = []
    for c, r in enumerate(report.classes):
        cls = "dead" if r.dead else "unhealthy" if r.sae_unhealthy else "none" if r.prototype < 0 else ""
        latent = "–" if r.prototype < 0 else f"{r.prototype}" + (" (dead)" if r.dead else "")
        sae = f"<code>{_e(r.sae or '–')}</code>"
        if r.sae_unhealthy:
            sae += ' <span class="badge unhealthy">unhealthy</span>'
        rows.append(
            f'<tr class="{cls}"><td><a href="#c{c}">{_e(r.name)}</a></td><td>{r.n_patches:,}</td>'
            f"<td>{_fmt(r.prevalence)}</td><td>{_fmt(r.ap)}</td><td>{_fmt(r.heldout_ap)}</td>"
            f"<td>{_fmt(r.heldout_prevalence)}</td><td>{_ratio(r.heldout_ap, r.heldout_prevalence)}</td>"
            f'<td>{"–" if r.layer is None else r.layer}</td><td>{latent}</td><td class="l">{sae}</td></tr>'
        )
    if summary is None:
        chart = '<p class="warn">There are no classes to show.</p>'
    else:
        chart = (
            f'<p><img src="{summary.name}" width="{summary.width}" height="{summary.height}" '
            'alt="AP and prevalence per class"></p>'
        )
    table = (
        "<table><thead><tr><th>class</th><th>patches</th><th>prevalence</th><th>AP (selection)</th>"
        "<th>AP (held-out)</th><th>held-out prevalence</th><th>held-out AP / prevalence</th><th>layer</th><th>latent</th>"
        f"<th>SAE</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    files = ""
    if report.files:
        links = "".join(f'<a href="../{_e(name)}">{_e(name)}</a>' for name in report.files)
        files = f'<p class="files">Results: {links}</p>'
    bad = [sae for sae in report.saes if sae.health]
    banner = ""
    if bad:
        n_classes = sum(bool(r.sae_unhealthy) for r in report.classes)
        items = "".join(f"<li><code>{_e(sae.key)}</code>: {_e('; '.join(sae.health))}</li>" for sae in bad)
        banner = (
            f'<div class="banner"><p><span class="badge unhealthy">warning</span> {len(bad)} SAE(s) of the sweep '
            f"look unhealthy; {n_classes} class(es) use their latents (marked below): check them before trusting them.</p>"
            f"<ul>{items}</ul></div>"
        )
    sweep = ""
    if report.saes:
        sae_rows = "".join(
            f'<tr class="{"unhealthy" if sae.health else ""}"><td><code>{_e(sae.key)}</code></td>'
            f'<td>{"–" if sae.layer is None else sae.layer}</td><td class="l">{_e(sae.description)}</td><td>{_fmt(sae.nmse)}</td><td>{sae.l0:.1f}</td>'
            f"<td>{sae.dead_frac:.1%}</td><td>{sae.dense_frac:.1%}</td><td>{sae.n_wins}</td>"
            + (
                f'<td class="l"><span class="badge unhealthy">unhealthy</span> {_e("; ".join(sae.health))}</td>'
                if sae.health else '<td class="l">ok</td>'
            )
            + "</tr>"
            for sae in report.saes
        )  # fmt: skip
        sweep = (
            '<section id="saes">\n<h2>SAEs of the sweep</h2>\n<p>Each SAE\'s training metrics on its held-out '
            "rows: normalized MSE (the fraction of variance it does not reconstruct; 1 is no better than the mean), "
            "L0 (active latents per row), dead latents (never active), dense latents (active on more than 10% of "
            "rows), and how many classes take their best latent from it.</p>\n"
            '<table id="sweep-table"><thead><tr><th>SAE</th><th>layer</th><th>config</th><th>normalized MSE</th><th>L0</th>'
            "<th>dead</th><th>dense</th><th>classes won</th><th>health</th></tr></thead>"
            f"<tbody>{sae_rows}</tbody></table>\n</section>"
        )
    protocol = ""
    if report.table:
        cells = "".join(
            f'<tr class="{"best" if r.best else ""}"><td>{_e(r.method)}</td><td>{r.layer}</td><td><code>{_e(r.sae)}</code>'
            f"</td><td>{_fmt(r.nmse)}</td><td>{r.l0:.1f}</td><td>{r.probe_r:.3f} [{r.probe_r_lo:.3f}, {r.probe_r_hi:.3f}]"
            f"</td><td>{r.map:.3f} [{r.map_lo:.3f}, {r.map_hi:.3f}]</td><td>{r.purity:.3f}</td>"
            f"<td>{r.coverage:.3f}</td><td>{'best' if r.best else ''}</td></tr>"
            for r in report.table
        )
        protocol = (
            '<section id="table">\n<h2>The table</h2>\n<p>Per SAE or method and layer, on the report patches: Probe R '
            "(1 - mean CE / mean entropy of each class's probe fit on the select split), mAP over all classes (exact, "
            "tie-aware AP of w z + b), Purity@k and Coverage@tau, with 95% bootstrap intervals over images; NMSE and "
            "L0 on the corpus's evaluation rows; best: the row of its method with the highest train Probe R.</p>\n"
            '<table id="protocol-table"><thead><tr><th>method</th><th>layer</th><th>SAE</th><th>NMSE</th><th>L0</th>'
            "<th>Probe R</th><th>mAP</th><th>Purity</th><th>Coverage</th><th></th></tr></thead>"
            f"<tbody>{cells}</tbody></table>\n"
            + (
                f'<p><img src="{layers_png.name}" width="{layers_png.width}" height="{layers_png.height}" '
                'alt="each metric against the layer, per method"></p>\n'
                if layers_png is not None
                else ""
            )
            + "</section>"
        )
    by_layer = ""
    if len(report.by_layer) > 1:
        head = "".join(f"<th>layer {layer}</th>" for layer in report.by_layer)
        layer_rows = "".join(
            f'<tr><td class="l">{_e(r.name)}</td>'
            + "".join(
                f"<td>{'<b>' if r.layer == layer else ''}{_fmt(aps[c])}{'</b>' if r.layer == layer else ''}</td>"
                for layer, aps in report.by_layer.items()
            )
            + "</tr>"
            for c, r in enumerate(report.classes)
        )
        by_layer = (
            '<section id="layers">\n<h2>By layer</h2>\n<p>Each layer\'s own best latent per class (chosen on the '
            "selection patches among that layer's SAEs), its AP on the held-out or report patches; bold: the layer of "
            "the best over layers.</p>\n"
            f'<table id="layer-table"><thead><tr><th>class</th>{head}</tr></thead><tbody>{layer_rows}</tbody></table>'
            "\n</section>"
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(report.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_e(report.title)}</h1>
<ul class="notes">{notes}</ul>
{files}
{banner}
</header>
{protocol}
<section id="summary">
<h2>Best latent per class</h2>
<p>For each class, the AP of its best latent over the selection patches (which chose it), that latent's AP on
held-out patches (which did not), and the class's prevalence, which is the AP of guessing.</p>
{chart}
{table if report.classes else ""}
</section>
{by_layer}
{sweep}
{chr(10).join(sections)}
</body>
</html>
"""
