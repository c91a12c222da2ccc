"""saev.report: a self-contained static HTML report that a browser shows whole, from the file system."""

import html
import os
import re
import warnings

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import precision_recall_curve as sklearn_precision_recall_curve

from saev import atomic
from saev.report import ClassResult, ReportData, SaeResult, TopImage, precision_recall_curve, write_report
from tests import browser

ODD_NAME = "<b>&"
"""A class name that is HTML markup unless escaped (and `$` would be mathtext in matplotlib)."""


def make_top(rng: np.random.Generator, side: int, px: int, i: int) -> TopImage:
    """A random blocky image whose latent fires on a blob that overlaps the class's labelled patches."""
    blocks = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(blocks).resize((px, px), PIL.Image.Resampling.BILINEAR)
    yy, xx = np.mgrid[:side, :side]
    cy, cx = rng.integers(1, side - 1, size=2)
    dist = np.hypot(yy - cy, xx - cx)
    scores = np.maximum(0, 3.0 - dist + rng.normal(0, 0.3, size=(side, side))).astype(np.float32)
    label = dist < rng.uniform(1.5, 3.0)
    return TopImage(image=image, patch_scores=scores, label_mask=label, title=f"image {i:05d} <x>")


def make_class(
    rng: np.random.Generator,
    name: str,
    *,
    side: int = 8,
    px: int = 64,
    n_top: int = 8,
    dead: bool = False,
    unhealthy: list[str] | None = None,
) -> ClassResult:
    k, m = 64, 2000
    labels = rng.random(m) < 0.1
    scores = np.where(labels, rng.exponential(2.0, m), rng.exponential(0.5, m)) * (rng.random(m) < 0.6)
    scores = np.round(scores, 1).astype(np.float32)  # rounded: many ties, and most patches at exactly 0
    if dead:
        scores[:] = 0.0
    ap_all = rng.beta(1.2, 8.0, size=k)
    ap_all[3] = np.nan
    prototype = 5
    ap = 0.1 if dead else float(rng.uniform(0.4, 0.9))
    ap_all[prototype] = ap
    return ClassResult(
        name=name,
        n_patches=int(labels.sum()) * 10,
        prevalence=0.1,
        ap=ap,
        heldout_ap=0.1 if dead else ap - 0.05,
        heldout_prevalence=float(labels.mean()),
        prototype=prototype,
        sae="sae-bad" if unhealthy else "sae-3f9c2a1b",
        layer=3,
        dead=dead,
        sae_unhealthy=tuple(unhealthy or ()),
        heldout_n_patches=int(labels.sum()),
        ap_all=ap_all,
        pr_scores=scores,
        pr_labels=labels,
        pr_source="held-out",
        top=[] if dead else [make_top(rng, side, px, i) for i in range(n_top)],
    )


def make_empty_class(name: str) -> ClassResult:
    """A class with no positive selection patches: no AP, no prototype."""
    return ClassResult(
        name=name,
        n_patches=0,
        prevalence=0.0,
        ap=None,
        heldout_ap=None,
        heldout_prevalence=0.0,
        prototype=-1,
        sae=None,
        layer=None,
        dead=False,
        sae_unhealthy=(),
        heldout_n_patches=0,
        ap_all=np.full(64, np.nan),
        pr_scores=np.zeros(0, dtype=np.float32),
        pr_labels=np.zeros(0, dtype=bool),
        pr_source="held-out",
        top=[],
    )


def make_report() -> ReportData:
    rng = np.random.default_rng(0)
    classes = [
        make_class(rng, "road", n_top=12),
        make_class(rng, ODD_NAME),
        make_class(rng, "sky", side=14, px=224, n_top=16),
        make_empty_class("unicorn"),
        make_class(rng, "wall", dead=True),
        make_class(rng, "tree $x$", unhealthy=UNHEALTHY),
    ]
    notes = ["config: configs/demo.toml", "reduce key: 0123456789abcdef", "patches: 100,000 kept & 20,000 held out"]
    saes = [
        SaeResult(key="sae-3f9c2a1b", description="relu_l1(l1_coeff=0.001) d_sae=64 lr=0.001 seed=0", nmse=0.12,
                  l0=9.5, dead_frac=0.02, dense_frac=0.0, n_wins=4, health=[]),
        SaeResult(key="sae-bad", description="relu_l1(l1_coeff=1000.0) d_sae=64 lr=0.3 seed=0", nmse=7.4, l0=0.0,
                  dead_frac=1.0, dense_frac=0.0, n_wins=1, health=UNHEALTHY),
    ]  # fmt: skip
    return ReportData(
        title="Prototypes <demo> & co", classes=classes, notes=notes, saes=saes, files=["best.json", "best.csv"]
    )


UNHEALTHY = ["normalized MSE 7.4 >= 1", "100% dead latents (>= 50%)"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The synthetic report, written once for the tests that only read it."""
    dpath = tmp_path_factory.mktemp("reduce")
    return write_report(dpath, make_report())


def img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_writes_index_with_every_image_a_png_inside_the_report_folder(written):
    report_dpath = written.parent
    assert written == report_dpath / "index.html" and report_dpath.name == "report"
    srcs = img_srcs(written.read_text(encoding="utf-8"))
    # summary + one plot per class with data (5) + the top images (12 + 8 + 16 + 8).
    assert len(srcs) == 1 + 5 + 44
    for src in srcs:
        fpath = (report_dpath / html.unescape(src)).resolve()
        assert fpath.parent == report_dpath.resolve(), src
        assert fpath.suffix == ".png" and fpath.is_file(), src
        with PIL.Image.open(fpath) as image:
            assert image.format == "PNG"


def test_page_is_self_contained(written):
    page = written.read_text(encoding="utf-8")
    assert not re.search(r"https?://|//cdn|<link|<script|@import|url\(", page)


def test_text_is_escaped(written):
    page = written.read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;" in page
    assert "<b>&" not in page
    assert "Prototypes &lt;demo&gt; &amp; co" in page
    assert "image 00000 &lt;x&gt;" in page
    assert "patches: 100,000 kept &amp; 20,000 held out" in page


def test_dead_latent_and_class_without_positives_are_flagged(written):
    page = written.read_text(encoding="utf-8")
    sections = dict(re.findall(r'<section class="cls" id="c\d+">\s*<h2>(.*?)</h2>(.*?)</section>', page, re.DOTALL))
    assert 'wall <span class="badge">dead latent</span>' in sections
    assert "No prototype: it has no positive selection patches" in sections["unicorn"]
    assert "<img" not in sections["unicorn"]


def test_sweep_table_compares_every_sae_with_its_health(written):
    page = written.read_text(encoding="utf-8")
    table = page[page.index('<table id="sweep-table">') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr[^>]*>.*?</tr>", table[table.index("<tbody>") :], re.DOTALL)
    assert len(rows) == 2
    assert "<code>sae-3f9c2a1b</code>" in rows[0] and "<td>0.120</td>" in rows[0] and ">ok<" in rows[0]
    assert 'class="unhealthy"' in rows[1] and "100.0%" in rows[1] and "normalized MSE 7.4 &gt;= 1" in rows[1]
    for header in ("normalized MSE", "L0", "dead", "dense", "classes won", "health"):
        assert f"<th>{header}</th>" in table


def test_unhealthy_sae_is_flagged_in_the_header_table_and_class(written):
    page = written.read_text(encoding="utf-8")
    header = page[: page.index("</header>")]
    assert "1 SAE(s) of the sweep look unhealthy; 1 class(es) use their latents" in header
    sections = dict(re.findall(r'<section class="cls" id="c\d+">\s*<h2>(.*?)</h2>(.*?)</section>', page, re.DOTALL))
    assert "tree $x$ " + '<span class="badge unhealthy">SAE unhealthy</span>' in sections
    assert page.count("SAE unhealthy</span>") == 1


def test_class_table_shows_heldout_ap_over_prevalence(written):
    page = written.read_text(encoding="utf-8")
    summary = page[page.index('<section id="summary">') : page.index('<section id="saes">')]
    assert "<th>held-out AP / prevalence</th>" in summary
    road = make_report().classes[0]
    assert f"<td>{road.heldout_ap / road.heldout_prevalence:.1f}x</td>" in summary


def test_links_to_the_result_files_beside_the_report(written):
    page = written.read_text(encoding="utf-8")
    assert re.findall(r'<a href="(\.\./[^"]*)"', page) == ["../best.json", "../best.csv"]


def test_every_top_image_grid_has_a_colour_bar_with_its_range(written):
    page = written.read_text(encoding="utf-8")
    n_grids = page.count("<h3>Top-activating images</h3>")
    bars = re.findall(r'<span class="cbar"><span class="cmin">0</span><span class="cgrad" style="background: '
                      r'linear-gradient\(to right, (#[0-9a-f]{6} 0%).*?(#[0-9a-f]{6} 100%)\)"></span>'
                      r'<span class="cmax">([0-9.]+)</span></span>', page)  # fmt: skip
    assert n_grids == 4 and len(bars) == n_grids
    assert all(float(vmax) > 0 for *_, vmax in bars)


def _tile_pixels(written, c: int, i: int) -> np.ndarray:
    with PIL.Image.open(written.parent / f"class{c:04d}-top{i:02d}.png") as image:
        return np.asarray(image.convert("RGB"))


def _one_tile(tmp_path, label: np.ndarray, scores: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = make_class(rng, "background", n_top=0)
    image = PIL.Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    top = TopImage(image=image, patch_scores=scores.astype(np.float32), label_mask=label, title="x")
    data = ReportData(title="t", classes=[ClassResult(**{**base.__dict__, "top": [top]})], notes=[], saes=[], files=[])
    index = write_report(tmp_path, data)
    with PIL.Image.open(index.parent / "class0000-top00.png") as tile:
        return np.asarray(tile.convert("RGB")), index.read_text(encoding="utf-8")


CYAN = (0, 230, 255)


def test_labelled_patches_are_hatched_so_a_hole_reads_as_a_hole(tmp_path):
    label = np.ones((8, 8), bool)
    label[3:5, 3:5] = False  # an object the background class surrounds
    tile, _ = _one_tile(tmp_path, label, np.zeros((8, 8)))
    cyan = (tile == CYAN).all(axis=-1)
    scale = tile.shape[0] // 8
    hole = cyan[3 * scale : 5 * scale, 3 * scale : 5 * scale]
    assert not hole.any()  # no outline traced around (or inside) the hole
    corner = cyan[: 3 * scale, : 3 * scale]
    assert 0.1 < corner.mean() < 0.5  # a hatch over the labelled patches, not a solid fill


def test_every_patch_labelled_draws_no_hatch_and_says_so(tmp_path):
    scores = np.zeros((8, 8))
    scores[2:4, 2:4] = 2.0
    tile, page = _one_tile(tmp_path, np.ones((8, 8), bool), scores)
    assert not (tile == CYAN).all(axis=-1).any()
    assert (tile == (255, 26, 26)).all(axis=-1).any()  # the firing outline is there, unhidden
    assert "all patches labelled" in page and "every patch of these images is labelled background" in page


def test_leaves_no_temporary_files(written):
    assert not [p.name for p in written.parent.iterdir() if atomic.is_temp(p)]


def test_rejects_labels_that_do_not_match_the_scores():
    rng = np.random.default_rng(0)
    good = make_class(rng, "road", n_top=0)
    with pytest.raises(Exception, match="pr_labels|M"):
        ClassResult(**{**good.__dict__, "pr_labels": good.pr_labels[:-1]})


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_precision_recall_curve_equals_sklearn_on_tied_scores(data):
    n = data.draw(st.integers(1, 50))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    values = st.one_of(st.just(0.0), st.integers(-3, 3).map(float), st.sampled_from([0.5, -0.25, 1e-3]))
    scores = data.draw(hnp.arrays(dtype, n, elements=values))
    labels = data.draw(hnp.arrays(np.bool_, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when there are no positives
        want = sklearn_precision_recall_curve(labels, scores)
    got = precision_recall_curve(labels, scores)
    for name, g, w in zip(("precision", "recall", "thresholds"), got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=name)
        assert g.dtype == w.dtype, name


def test_browser_shows_the_whole_page(tmp_path):
    chromium = browser.find_chromium()
    if chromium is None:
        if os.environ.get("SAEV_REQUIRE_BROWSER"):
            pytest.fail("SAEV_REQUIRE_BROWSER is set but no chromium was found (apt-get install chromium)")
        pytest.skip("chromium is not installed (set SAEV_REQUIRE_BROWSER to make this a failure)")
    index_fpath = write_report(tmp_path / "reduce", make_report())
    for name in ("best.json", "best.csv"):  # what the links point at, as the reduce stage writes them
        (tmp_path / "reduce" / name).write_text("{}")
    seen = browser.check_page(chromium, index_fpath, tmp_path / "browser")
    assert seen.n_broken == 0, (seen.errors, seen.dom[:2000])
    assert seen.n_images == len(img_srcs(index_fpath.read_text(encoding="utf-8")))
    assert not seen.errors
    for name in ("road", "&lt;b&gt;&amp;", "sky", "unicorn", "wall", "tree $x$"):
        assert f"{name}" in seen.dom
    # The sweep table, a colour bar per top-image grid and the links to the result files, as the browser built them.
    assert '<table id="sweep-table">' in seen.dom and "sae-bad" in seen.dom
    assert seen.dom.count('class="cgrad"') == 4 and "linear-gradient" in seen.dom
    for name in ("best.json", "best.csv"):
        assert f'<a href="../{name}">{name}</a>' in seen.dom
    with PIL.Image.open(seen.screenshot_fpath) as shot:
        assert shot.size == (1200, 2000)
        assert len(shot.convert("L").getcolors(2**16) or []) > 50  # a rendered page, not a blank one
