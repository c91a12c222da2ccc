import pathlib
import shutil

import pytest
import torch

TESTS_DPATH = pathlib.Path(__file__).parent


def write_tiny_config(dpath: pathlib.Path, root: pathlib.Path | None = None) -> pathlib.Path:
    """Copy tests/tiny.toml (+ its sweep) into dpath with the artifact root set to `root` (default dpath/runs)."""
    for name in ("tiny.toml", "tiny-sweep.toml"):
        shutil.copy(TESTS_DPATH / name, dpath / name)
    cfg = dpath / "tiny.toml"
    cfg.write_text(cfg.read_text().replace('root = "runs"', f'root = "{root or dpath / "runs"}"'))
    return cfg


@pytest.fixture
def tiny_config(tmp_path) -> pathlib.Path:
    """A fresh copy of the tiny config in a temp dir; nothing has run."""
    return write_tiny_config(tmp_path)


@pytest.fixture(scope="session")
def done_config(tmp_path_factory) -> pathlib.Path:
    """The tiny pipeline run once to completion (shared: tests that change anything use `copy_of_done`)."""
    import launch

    cfg = write_tiny_config(tmp_path_factory.mktemp("tiny-done"))
    assert launch.main(launch.Args(config=cfg)) == 0
    return cfg


@pytest.fixture
def copy_of_done(done_config, tmp_path) -> pathlib.Path:
    """A private copy of the completed tiny run (config + artifacts) that a test may change."""
    cfg = write_tiny_config(tmp_path)
    shutil.copytree(done_config.parent / "runs", tmp_path / "runs")
    return cfg


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
