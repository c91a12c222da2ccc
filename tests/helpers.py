"""Plain helpers shared by the tests (fixtures live in tests/conftest.py): the tiny config, launching the pipeline
in this process or in a subprocess, and small ways to damage or inspect a run."""

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from saev import checksums

TESTS_DPATH = pathlib.Path(__file__).resolve().parent
REPO = TESTS_DPATH.parent
"""The repository root (where launch.py is)."""


def write_tiny_config(dpath: pathlib.Path, root: pathlib.Path | None = None) -> pathlib.Path:
    """Copy tests/tiny.toml (+ its sweep) into dpath with the artifact root set to `root` (default dpath/runs)."""
    for name in ("tiny.toml", "tiny-sweep.toml"):
        shutil.copy(TESTS_DPATH / name, dpath / name)
    cfg = dpath / "tiny.toml"
    cfg.write_text(cfg.read_text().replace('root = "runs"', f'root = "{root or dpath / "runs"}"'))
    return cfg


def run(config: pathlib.Path, **kwargs) -> int:
    """launch.py's main in this process on `config`, with `launch.Args` fields as keywords; the exit code."""
    import launch

    return launch.main(dataclasses.replace(launch.Args(config=config), **kwargs))


def launch_argv(config: pathlib.Path, *args: str) -> list[str]:
    """The command line of `python launch.py --config config *args` (run it with cwd=REPO)."""
    return [sys.executable, str(REPO / "launch.py"), "--config", str(config), *args]


def launch(config: pathlib.Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """launch.py in a subprocess, to its end: exit code, stdout and stderr (text)."""
    return subprocess.run(launch_argv(config, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_launch(config: pathlib.Path, *args: str) -> subprocess.Popen:
    """launch.py started in a subprocess (stderr into stdout, text), for a test to wait on or kill."""
    return subprocess.Popen(
        launch_argv(config, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def manifests(root: pathlib.Path) -> set[str]:
    """The `<stage>/<key>/manifest.json` paths under an artifact root (relative to it): what is marked done."""
    return {str(p.relative_to(root)) for p in root.glob("*/*/manifest.json")} if root.exists() else set()


def flip_byte(fpath: pathlib.Path, offset: int | None = None) -> None:
    """Corrupt one byte of a file in place (the middle one by default): its size does not change."""
    offset = fpath.stat().st_size // 2 if offset is None else offset
    with open(fpath, "r+b") as fd:
        fd.seek(offset)
        byte = fd.read(1)
        fd.seek(offset)
        fd.write(bytes([byte[0] ^ 0x5A]))


EPS32 = torch.finfo(torch.float32).eps
"""float32's machine epsilon (2^-23): the unit of the tolerances below."""


def sae_forward_bounds(sae, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element bounds on how far a float32 forward of `sae` on `x_BD` (latents f, reconstruction x_hat) can be
    from the exact one, whatever order the CPU's kernels add in: a sum of n products computed in float32 is within
    (n + 2) * eps * (the same sum over absolute values) of the exact sum (the classic gamma_n bound, + 2 for the bias
    and the input's centring). A tolerance that follows the dtype and the magnitude of what is summed; a real error
    (a wrong bias, a missing term) is orders of magnitude larger. Compare two float32 forwards with twice it."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().abs() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    d, s = W_enc.shape
    with torch.no_grad():
        f_BS = sae(x_BD).f_BS.double().abs()
    f_err_BS = (d + 2) * EPS32 * ((x_BD.double().abs() + b_dec) @ W_enc + b_enc)
    x_err_BD = f_err_BS @ W_dec + (s + 2) * EPS32 * (f_BS @ W_dec + b_dec)
    return f_err_BS, x_err_BD


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """Every |got - want| <= bound (element-wise, in float64); the message says by how much the worst one is off."""
    diff = (got.double() - want.double()).abs()
    worst = int((diff / bound.clamp_min(1e-300)).argmax())
    assert bool((diff <= bound).all()), (
        f"{what}: |diff| {float(diff.flatten()[worst]):.3g} > bound {float(bound.flatten()[worst]):.3g} at flat index "
        f"{worst} (value {float(want.flatten()[worst]):.4g})"
    )


def make_folder_dataset(dpath: pathlib.Path, n_imgs: int = 24, classes=("background", "fish", "fin")) -> pathlib.Path:
    """A real folder dataset: PNG images, same-stem PNG masks of class ids, classes.txt."""
    rng = np.random.default_rng(0)
    (dpath / "images").mkdir(parents=True)
    (dpath / "masks").mkdir()
    (dpath / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(n_imgs):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(dpath / "images" / f"img{i}.png")
        mask = np.zeros((40, 48), dtype=np.uint8)
        mask[10:30, 8:40] = 1
        mask[15:20, 20:30] = 2 if len(classes) > 2 and i % 2 else 1
        Image.fromarray(mask).save(dpath / "masks" / f"img{i}.png")
    return dpath


def use_folder(cfg: pathlib.Path, data_dpath: pathlib.Path) -> None:
    """Point the config's [dump.data] at a folder dataset, with a keep-mask and held-out set that fit its patches."""
    text = cfg.read_text()
    start = text.index("[dump.data]")
    end = text.index("[dump.vit]")
    text = text[:start] + f'[dump.data]\nkind = "segfolder"\nroot = "{data_dpath}"\n\n' + text[end:]
    text = text.replace("n_keep = 2000", "n_keep = 100").replace("n_heldout = 500", "n_heldout = 50")
    cfg.write_text(text)


def folder(tweak=None, classes=("background", "fish", "fin")):
    """A config mutation: write a folder dataset beside the config, change it with `tweak(data_dpath)`, use it."""

    def mutate(cfg: pathlib.Path) -> None:
        data = make_folder_dataset(cfg.parent / "data", classes=classes)
        if tweak:
            tweak(data)
        use_folder(cfg, data)

    return mutate


def reseal(root: pathlib.Path) -> None:
    """Make every artifact's checksums agree with its files again, as if the bad contents had been written by the
    pipeline itself: the checksums cannot catch them, so only the readers' validation stands between them and a
    result."""
    for manifest_fpath in root.glob("*/*/manifest.json"):
        manifest = json.loads(manifest_fpath.read_text())
        for rel in manifest["files"]:
            fpath = manifest_fpath.parent / rel
            digest = checksums.file_checksum(fpath)
            manifest["files"][rel] = {"size": fpath.stat().st_size, checksums.CHECKSUM: digest}
            checksums.write_record(fpath, fpath.stat().st_size, digest)
        manifest_fpath.write_text(json.dumps(manifest))
        (manifest_fpath.parent / ".verified.json").unlink(missing_ok=True)


@contextlib.contextmanager
def small_tmpfs(dpath: pathlib.Path, size: str = "200k"):
    """Mount a tmpfs of `size` on `dpath` (skip the test if that is not possible); unmount afterwards."""
    dpath.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(dpath)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {out.stderr.strip()}")
    try:
        yield dpath
    finally:
        subprocess.run(["umount", "-l", str(dpath)], check=False)
