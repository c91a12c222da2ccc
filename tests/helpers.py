"""Plain helpers shared by the tests (fixtures live in tests/conftest.py): the tiny config, launching the pipeline
in this process or in a subprocess, and small ways to damage or inspect a run."""

import dataclasses
import pathlib
import shutil
import subprocess
import sys

import torch

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
