"""Open a report in a real headless Chromium: take a screenshot and check that every image loaded.

Test-only helper. Nothing is injected into the report itself: the check runs on a copy of the page
(`_check.html`, next to it so relative links resolve the same way) with a script appended that, on load, writes
how many images failed to load onto <body> (`data-broken`), which `--dump-dom` then shows.
"""

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess

CHROMIUM_NAMES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")

# Chromium's stderr lines that mean the page itself had a problem (the rest is dbus/GPU noise of a bare machine).
PAGE_ERRORS = re.compile(
    r"Failed to load resource|Not allowed to load local resource|Uncaught|CONSOLE\(\d+\).*[Ee]rror"
)

_CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", String(broken.length));
  var srcs = broken.map(function (img) { return img.getAttribute("src"); });
  document.body.setAttribute("data-broken-srcs", srcs.join(" "));
});
</script>
"""


@dataclasses.dataclass(frozen=True)
class PageCheck:
    """What a headless Chromium saw of a page."""

    dom: str
    """The DOM after load (`--dump-dom`), with the check's attributes on <body>."""
    n_images: int | None
    """How many <img> the page has; None if the check script never ran."""
    n_broken: int | None
    """How many <img> failed to load; None if the check script never ran."""
    errors: list[str]
    """Chromium stderr lines about the page: failed resources, uncaught exceptions, console errors."""
    screenshot_fpath: pathlib.Path
    """A PNG screenshot of the page's top."""


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(chromium: str, profile_dpath: pathlib.Path, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dpath}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    env = {**os.environ, "HOME": str(profile_dpath)}  # keep crash dumps and caches out of the real home
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def check_page(
    chromium: str, index_fpath: pathlib.Path, tmp_dpath: pathlib.Path, *, window: tuple[int, int] = (1200, 2000)
) -> PageCheck:
    """Load `index_fpath` from file:// twice: once for a screenshot, once (a copy with the check script) for the DOM."""
    tmp_dpath.mkdir(parents=True, exist_ok=True)
    shot_fpath = tmp_dpath / "shot.png"
    shot = _run(
        chromium,
        tmp_dpath / "profile-shot",
        [f"--screenshot={shot_fpath}", f"--window-size={window[0]},{window[1]}", index_fpath.resolve().as_uri()],
        timeout=60,
    )
    check_fpath = index_fpath.with_name("_check.html")
    page = index_fpath.read_text(encoding="utf-8")
    check_fpath.write_text(page.replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        dump = _run(
            chromium,
            tmp_dpath / "profile-dom",
            [
                "--run-all-compositor-stages-before-draw",
                "--virtual-time-budget=5000",
                "--dump-dom",
                check_fpath.resolve().as_uri(),
            ],
            timeout=60,
        )
    finally:
        check_fpath.unlink(missing_ok=True)
    stderr = shot.stderr + dump.stderr
    errors = [line for line in stderr.splitlines() if PAGE_ERRORS.search(line)]
    body = re.search(r"<body[^>]*>", dump.stdout)
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(0))) if body else {}
    return PageCheck(
        dom=dump.stdout,
        n_images=int(attrs["data-images"]) if "data-images" in attrs else None,
        n_broken=int(attrs["data-broken"]) if "data-broken" in attrs else None,
        errors=errors + ([f"broken images: {attrs['data-broken-srcs']}"] if attrs.get("data-broken-srcs") else []),
        screenshot_fpath=shot_fpath,
    )
