"""The documentation is true of the tree: every relative link and heading anchor in README.md, CHANGELOG.md and
docs/*.md resolves, and every documented command and code block that can run here parses: python blocks compile,
toml blocks go through the config engine (as a pipeline config or a sweep file), bash blocks pass `bash -n`,
`uv run launch.py ...` commands parse with the launcher's own argument parser, and scripts named by a command exist.
Nothing here runs the pipeline."""

import ast
import contextlib
import dataclasses
import io
import pathlib
import re
import shlex
import shutil
import subprocess
import tomllib
import unicodedata

import pytest
import tyro

import launch
from saev import configs, sweep, training
from stages import pipeline
from stages.graph import MethodRun
from tests.helpers import REPO as REPO_DPATH


def doc_fpaths(repo: pathlib.Path = REPO_DPATH) -> list[pathlib.Path]:
    """The pages checked: README.md, CHANGELOG.md and every docs/*.md."""
    return [repo / "README.md", repo / "CHANGELOG.md", *sorted((repo / "docs").glob("*.md"))]


def rel(fpath: pathlib.Path) -> str:
    return fpath.relative_to(REPO_DPATH).as_posix() if fpath.is_relative_to(REPO_DPATH) else str(fpath)


###########
# Parsing #
###########


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block of a page."""

    fpath: pathlib.Path
    """The page."""
    line: int
    """Line of the opening fence (1-based)."""
    lang: str
    """The fence's info string, first word, lower case ("" when none)."""
    text: str
    """The block's contents."""


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")


def split_page(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(prose lines, fenced blocks): prose as (line number, text) outside fences; blocks as (line, lang, contents)."""
    prose, blocks = [], []
    fence, start, lang, body = None, 0, "", []
    for i, line in enumerate(text.splitlines(), start=1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence, start, lang, body = m.group(1), i, m.group(2).lower(), []
            else:
                prose.append((i, line))
        elif line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((start, lang, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"a code fence opened at line {start} is never closed"
    return prose, blocks


def page_blocks(fpath: pathlib.Path) -> list[Block]:
    return [Block(fpath, line, lang, body) for line, lang, body in split_page(fpath.read_text())[1]]


_INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def strip_inline_code(line: str) -> str:
    """The line with code spans blanked (a `[x](y)` inside backticks is not a link)."""
    return _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text in lower case, every character that is not a letter, digit,
    space, hyphen or underscore dropped, spaces turned into hyphens (duplicates get -1, -2, ... in `anchors`)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page defines: its headings' slugs (numbered as GitHub numbers repeats) and HTML ids/names."""
    prose, _ = split_page(text)
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return out


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(fpath: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of every inline markdown link and image outside code."""
    prose, _ = split_page(fpath.read_text())
    return [(i, m.group(1)) for i, line in prose for m in _LINK.finditer(strip_inline_code(line))]


def broken_links(fpath: pathlib.Path) -> list[str]:
    """One line per link of the page whose file or heading anchor does not exist (web links are not followed)."""
    bad = []
    for line, target in links(fpath):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (fpath.parent / path).resolve() if path else fpath
        where = f"{rel(fpath)}:{line}: [{target}]"
        if not dest.exists():
            bad.append(f"{where}: {rel(dest)} does not exist")
        elif fragment:
            if dest.suffix != ".md" or dest.is_dir():
                bad.append(f"{where}: an anchor into {rel(dest)}, which is not a markdown page")
            elif fragment not in anchors(dest.read_text()):
                bad.append(f"{where}: {rel(dest)} has no heading with the anchor #{fragment}")
    return bad


#########
# Pages #
#########


DOC_FPATHS = doc_fpaths()
IDS = [rel(f) for f in DOC_FPATHS]


def test_the_pages_exist_and_the_readme_is_short():
    assert (REPO_DPATH / "docs").is_dir() and len(DOC_FPATHS) > 3
    assert len((REPO_DPATH / "README.md").read_text().splitlines()) <= 160


@pytest.mark.parametrize("fpath", DOC_FPATHS, ids=IDS)
def test_every_relative_link_and_anchor_resolves(fpath):
    assert broken_links(fpath) == []


def test_every_page_is_linked_from_the_readme():
    targets = {(REPO_DPATH / t.partition("#")[0]).resolve() for _, t in links(REPO_DPATH / "README.md")}
    assert [rel(f) for f in DOC_FPATHS[1:] if f not in targets] == []


def test_the_readme_keeps_the_two_commands():
    text = (REPO_DPATH / "README.md").read_text()
    assert "uv run launch.py --stage all" in text and "uv run pytest" in text


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The checks above can fail: a missing file, a missing anchor and a missing anchor of another page are each
    reported; a link inside code, a web link and GitHub's slugs of punctuated headings are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Page A\n\n## `best.json` and `best.csv`\n\n## Exact, fast AP: (K-blocks)\n\n## Repeat\n\n## Repeat\n"
    )
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#bestjson-and-bestcsv) [ok](docs/a.md#exact-fast-ap-k-blocks) [ok](docs/a.md#repeat-1)\n"
        "[web](https://example.org/x.md#nope) `[code](nowhere.md)` [self](#top)\n\n"
        "# Top\n\n"
        "[gone](docs/missing.md) [no anchor](docs/a.md#nope) [no anchor here](#nope)\n\n"
        "```md\n[in a block](nowhere.md)\n```\n"
    )
    bad = broken_links(page)
    assert len(bad) == 3, bad
    assert "docs/missing.md does not exist" in bad[0]
    assert "has no heading with the anchor #nope" in bad[1] and "has no heading with the anchor #nope" in bad[2]


###############
# Code blocks #
###############


ALL_BLOCKS = [block for fpath in DOC_FPATHS for block in page_blocks(fpath)]
BLOCK_IDS = [f"{rel(b.fpath)}:{b.line}:{b.lang or 'text'}" for b in ALL_BLOCKS]
SHELL_LANGS = {"sh", "bash", "shell", "console"}
KNOWN_LANGS = SHELL_LANGS | {"python", "toml", "text", "", "md"}


def parse_launch(argv: list[str]) -> launch.Args | None:
    """Parse launch.py's arguments as `uv run launch.py ...` would; None for `--help` (which prints and exits 0).
    A bad argument fails with the parser's own message."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return tyro.cli(launch.Args, args=argv)
    except SystemExit as err:
        if err.code == 0:
            return None
        raise AssertionError(f"launch.py refuses {shlex.join(argv)}:\n{out.getvalue()}") from None


def command_problems(command: str) -> list[str]:
    """Check one documented shell command: `uv run launch.py ...` parses, a script it runs exists."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError as err:
        return [f"{command!r}: {err}"]
    if words[:2] == ["uv", "run"]:
        words = words[2:]
    problems = []
    if words[:1] == ["launch.py"] or words[:2] == ["python", "launch.py"]:
        try:
            parse_launch(words[words.index("launch.py") + 1 :])
        except AssertionError as err:
            problems.append(str(err))
    elif words[:1] in (["python"], ["bash"]) and len(words) > 1 and not words[1].startswith("-"):
        script = words[1]
        if not (REPO_DPATH / script).is_file() and not script.startswith("/"):
            problems.append(f"{command!r}: {script} does not exist")
    return problems


def inline_commands(fpath: pathlib.Path) -> list[str]:
    """Commands quoted in the prose: code spans that start with `uv run` or `bash ` (optional `[...]` parts
    dropped)."""
    prose, _ = split_page(fpath.read_text())
    out = []
    for _, line in prose:
        for m in _INLINE_CODE.finditer(line):
            code = m.group(2).strip()
            if code.startswith(("uv run ", "bash ")):
                out.append(re.sub(r"\s*\[[^\]]*\]", "", code))
    return out


def check_toml(text: str, tmp_path: pathlib.Path) -> None:
    """A pipeline config fragment goes through the pipeline's config engine (unknown keys and wrong types are
    errors); a sweep file fragment (any other top-level key) through the sweep's, every point of its grid built."""
    data = tomllib.loads(text)
    if set(data) <= {f.name for f in dataclasses.fields(pipeline.Pipeline)}:
        configs.from_dict(pipeline.Pipeline, data, where="the block")
    elif "method" in data:  # a sweep of baseline methods ([train] methods)
        fpath = tmp_path / "methods.toml"
        fpath.write_text(text)
        assert sweep.load_sweep(fpath, MethodRun)
    else:
        fpath = tmp_path / "sweep.toml"
        fpath.write_text(text)
        assert sweep.load_sweep(fpath, training.TrainConfig, defaults={"sae.d_vit": 64})


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=BLOCK_IDS)
def test_every_code_block_parses(block, tmp_path):
    assert block.lang in KNOWN_LANGS, f"{BLOCK_IDS[ALL_BLOCKS.index(block)]}: add a check for {block.lang!r} blocks"
    if block.lang == "python":
        ast.parse(block.text, filename=f"{rel(block.fpath)}:{block.line}")
    elif block.lang == "toml":
        check_toml(block.text, tmp_path)
    elif block.lang in SHELL_LANGS:
        bash = shutil.which("bash")
        assert bash is not None
        script = tmp_path / "block.sh"
        script.write_text(block.text)
        result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        lines = [line for line in block.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert [p for line in lines for p in command_problems(line)] == []


@pytest.mark.parametrize("fpath", DOC_FPATHS, ids=IDS)
def test_every_command_in_the_prose_parses(fpath):
    assert [p for command in inline_commands(fpath) for p in command_problems(command)] == []


def test_a_command_launch_py_refuses_is_found():
    assert command_problems("uv run launch.py --stage all --dry-run  # fine") == []
    assert command_problems("uv run launch.py --help") == []
    assert "launch.py refuses" in command_problems("uv run launch.py --stage everything")[0]
    assert "launch.py refuses" in command_problems("uv run launch.py --no-such-flag")[0]
    assert "does not exist" in command_problems("uv run python benchmarks/nope.py")[0]
