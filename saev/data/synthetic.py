"""The built-in demo dataset: coloured shapes on textured backgrounds, rendered a batch at a time.

Owns the `Synthetic` config and `render_synthetic`: every image and mask is a function of (seed, index) alone, drawn
from counter-based random numbers, so an image is identical rendered alone, in any batch or in any order.
`saev.data.datasets.SyntheticDataset` serves it as a dataset.
"""

import dataclasses
import functools
from collections.abc import Sequence

import beartype
import numpy as np
import torch
from jaxtyping import UInt8, jaxtyped

from saev import artifacts

SHAPES = ("circle", "square", "triangle", "ring", "cross")
"""Shape kinds of the synthetic dataset; class id = 1 + index (0 is background)."""

# Channels within [35, 200]: with the jitter (15) and noise (20) below, every pixel stays within [0, 255] unclipped,
# and each shape pixel is nearer to its kind's colour than to any other kind's (and far more saturated than the grey
# background).
_SHAPE_RGB = {
    "circle": (200, 35, 35),
    "square": (35, 70, 200),
    "triangle": (35, 195, 50),
    "ring": (200, 195, 35),
    "cross": (190, 35, 200),
}
_SHAPE_JITTER = 15
"""Each shape's colour is its kind's, each channel moved by up to this much."""
NOISE_MAX = 20
"""Pixel noise: Gaussian with std 5, rounded and clipped to [-NOISE_MAX, NOISE_MAX]."""


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """The built-in demo: coloured shapes on textured backgrounds, one class per shape kind plus background."""

    n_imgs: int = 256
    """Number of images."""
    img_size: int = 64
    """Side of the square images in pixels."""
    seed: int = 0
    """Image i depends only on (seed, i); a non-negative integer."""
    max_shapes: int = 3
    """Each image has between 1 and this many shapes."""
    labelled: bool = artifacts.hashed_if_set(True)
    """false: the same images without labels or classes (an unlabelled corpus, as ImageNet is for the paper)."""

    def __post_init__(self):
        if self.n_imgs <= 0:
            raise ValueError(f"data.n_imgs must be positive, got {self.n_imgs}")
        if self.img_size < 16:
            raise ValueError(f"data.img_size must be at least 16, got {self.img_size}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"data.seed must be a non-negative 64-bit integer, got {self.seed}")
        if self.max_shapes <= 0:
            raise ValueError(f"data.max_shapes must be positive, got {self.max_shapes}")


_SHAPE_RGB_K3 = np.array([_SHAPE_RGB[kind] for kind in SHAPES], dtype=np.float32)
_RADIUS_MIN, _RADIUS_MAX = 0.12, 0.24
"""Shape radii, as fractions of the image side."""

# Layout of one image's uniform draws: 11 for the background, then 7 per shape slot.
_U_BASE, _U_JITTER, _U_MIX, _U_PERIODS, _U_PHASES, _U_NOISE, _U_N_SHAPES = (
    0,
    slice(1, 4),
    4,
    slice(5, 7),
    slice(7, 9),
    9,
    10,
)
_U_PER_BG, _U_PER_SHAPE = 11, 7


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array: a bijection that spreads every input bit over the output."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@functools.lru_cache(maxsize=16)
def _seed_key(seed: int) -> np.uint64:
    """The seed, mixed: xored with an image index, it seeds that image's stream."""
    return _mix64(np.array([seed], dtype=np.uint64))[0]


def _uniforms(seed: int, indices: Sequence[int], n: int) -> np.ndarray:
    """float64 [len(indices), n] in [0, 1): image i's draws are the SplitMix64 stream seeded from (seed, i), computed
    for the whole batch in a few array operations (one generator object per image would cost more than the rendering)."""
    state_B = _mix64(np.array(indices, dtype=np.uint64) ^ _seed_key(seed))
    z_BN = _mix64(state_B[:, None] + np.uint64(0x9E3779B97F4A7C15) * np.arange(1, n + 1, dtype=np.uint64))
    return (z_BN >> np.uint64(11)) * 2.0**-53


@functools.lru_cache(maxsize=4)
def _noise_table(seed: int, img_size: int) -> np.ndarray:
    """uint8 pixel noise plus NOISE_MAX, two images' worth: each image reads a window at its own offset."""
    noise = 5 * np.random.default_rng(seed).standard_normal(2 * 3 * img_size * img_size, dtype=np.float32)
    table = (np.clip(np.rint(noise), -NOISE_MAX, NOISE_MAX) + NOISE_MAX).astype(np.uint8)
    table.flags.writeable = False
    return table


_PROFILE_STEPS = 256
"""Row profiles are sampled every 1 / _PROFILE_STEPS of the radius."""
_PROFILE_REACH = int(1 / _RADIUS_MIN) + 1
"""Row profiles cover |dy| <= _PROFILE_REACH radii: every row of an image (|dy| < side <= radius / _RADIUS_MIN)."""


@functools.lru_cache(maxsize=1)
def _row_profiles() -> np.ndarray:
    """float32 [n shape kinds, 2, 2 * _PROFILE_REACH * _PROFILE_STEPS + 1]: (lo, hi) of `shape_rows` of each kind at
    radius 1, for rows dy = step / _PROFILE_STEPS - _PROFILE_REACH."""
    dy_T = (np.arange(2 * _PROFILE_REACH * _PROFILE_STEPS + 1) / _PROFILE_STEPS - _PROFILE_REACH).astype(np.float32)
    profiles_K2T = np.stack([np.stack(shape_rows(kind, dy_T, np.float32(1))) for kind in SHAPES])
    profiles_K2T.flags.writeable = False
    return profiles_K2T


def _paint(dst: torch.Tensor, where: torch.Tensor, value: torch.Tensor) -> None:
    """dst[where] = value (all three broadcast together; uint8), as dst += where * (value - dst) in wrapping uint8
    arithmetic: branch-free, so faster than a masked copy on masks with many edges."""
    delta = value - dst
    delta *= where
    dst += delta


@jaxtyped(typechecker=beartype.beartype)
def render_synthetic(
    cfg: Synthetic, indices: Sequence[int]
) -> tuple[UInt8[np.ndarray, "B 3 S S"], UInt8[np.ndarray, "B S S"]]:
    """Images `indices` of the synthetic dataset, rendered together: uint8 RGB (channels first) and class-id masks.

    Image i depends only on (cfg, i): its parameters are its own stream of draws seeded from (seed, i), and its pixel
    noise is a window, at an offset it draws, of a table fixed by (seed, img_size). So an image is the same rendered
    alone or in any batch. Every step is vectorised over the batch, on uint8 pixels, and whole-image steps run in
    torch (its kernels broadcast and use every core, several times numpy's speed): that is what lets a dump keep up
    with a small ViT.
    """
    s, n_slots = cfg.img_size, cfg.max_shapes
    u_BU = _uniforms(cfg.seed, indices, _U_PER_BG + _U_PER_SHAPE * n_slots)
    # Rendered in order of decreasing number of shapes (put back at the end), so that the images with a shape in slot
    # j are the first n_j and painting slot j touches only those.
    n_shapes_B = 1 + (u_BU[:, _U_N_SHAPES] * n_slots).astype(np.int64)
    order_B = np.argsort(-n_shapes_B, kind="stable")
    u_BU, n_shapes_B = u_BU[order_B], n_shapes_B[order_B]
    f32 = np.float32
    coords_S = np.arange(s, dtype=f32)

    # One canvas holds the RGB channels and, as a fourth, the class ids, so that a shape paints both in one pass. RGB
    # is painted NOISE_MAX below its value and the noise table holds noise + NOISE_MAX, so the final sum is one uint8
    # addition (the colour ranges keep it within [0, 255]).
    # Background: a low-saturation base colour in [78, 162] plus a plaid: a wave along y and one along x, each of a
    # random period and phase, with amplitudes summing to 14. Rounded to uint8 as [B, S] rows, then broadcast.
    base_B3 = 90 + 60 * u_BU[:, [_U_BASE]] + 24 * u_BU[:, _U_JITTER] - 12
    amp_B2 = 14 * np.stack([u_BU[:, _U_MIX], 1 - u_BU[:, _U_MIX]], axis=1).astype(f32)
    freq_B2 = (2 * np.pi / (4 + 8 * u_BU[:, _U_PERIODS])).astype(f32)
    phase_B2 = (2 * np.pi * u_BU[:, _U_PHASES]).astype(f32)
    wave_B2S = amp_B2[..., None] * (1 + np.sin(freq_B2[..., None] * coords_S + phase_B2[..., None]))
    wave_B2S = np.rint(wave_B2S).astype(np.uint8)  # in [0, 2 * amplitude]
    rows_B4S = np.zeros((len(u_BU), 4, s), dtype=np.uint8)
    rows_B4S[:, :3] = np.rint(base_B3 - 14 - NOISE_MAX).astype(np.uint8)[:, :, None] + wave_B2S[:, None, 0]
    cols_B4S = np.zeros((len(u_BU), 4, s), dtype=np.uint8)
    cols_B4S[:, :3] = wave_B2S[:, None, 1]
    canvas_B4SS = torch.from_numpy(rows_B4S)[..., None] + torch.from_numpy(cols_B4S)[:, :, None, :]

    # Shapes, later slots painted on top. Row y of a shape is an interval of |x - cx|, read (scaled by the radius) from
    # its kind's row profile at (y - cy) / r: a slot's pixels are two comparisons of [B, 1, S] with [B, S, 1].
    u_BJV = u_BU[:, _U_PER_BG:].reshape(len(u_BU), n_slots, _U_PER_SHAPE)
    kind_BJ = (u_BJV[..., 0] * len(SHAPES)).astype(np.int64)
    r_BJ1 = ((_RADIUS_MIN + (_RADIUS_MAX - _RADIUS_MIN) * u_BJV[..., 1:2]) * s).astype(f32)
    cy_BJ1, cx_BJ1 = (r_BJ1 + (s - 2 * r_BJ1) * u_BJV[..., 2:4]).astype(f32).transpose(2, 0, 1)[..., None]
    paint_BJ4 = np.empty((len(u_BU), n_slots, 4), dtype=np.uint8)
    jitter_BJ3 = 2 * _SHAPE_JITTER * u_BJV[..., 4:7] - _SHAPE_JITTER
    paint_BJ4[..., :3] = np.rint(_SHAPE_RGB_K3[kind_BJ] + jitter_BJ3 - NOISE_MAX)
    paint_BJ4[..., 3] = kind_BJ + 1
    paint_BJ4 = torch.from_numpy(paint_BJ4)
    step_BJS = (
        np.rint((coords_S - cy_BJ1) * (_PROFILE_STEPS / r_BJ1)).astype(np.int64) + _PROFILE_REACH * _PROFILE_STEPS
    )
    rows_BJ2S = _row_profiles()[kind_BJ[..., None, None], np.arange(2)[:, None], step_BJS[..., None, :]]
    rows_BJ2S = torch.from_numpy(rows_BJ2S * r_BJ1[..., None])
    adx_BJS = torch.from_numpy(np.abs(coords_S - cx_BJ1))
    for j in range(n_slots):
        n = int(np.count_nonzero(n_shapes_B > j))
        adx_B1S, lo_BS1, hi_BS1 = adx_BJS[:n, j, None, :], rows_BJ2S[:n, j, 0, :, None], rows_BJ2S[:n, j, 1, :, None]
        inside_B1SS = ((adx_B1S <= hi_BS1) & (adx_B1S >= lo_BS1))[:, None]
        _paint(canvas_B4SS[:n], inside_B1SS, paint_BJ4[:n, j, :, None, None])

    n = 3 * s * s
    offset_B = (u_BU[:, _U_NOISE] * (n + 1)).astype(np.int64)
    noise_BN = np.lib.stride_tricks.sliding_window_view(_noise_table(cfg.seed, s), n)[offset_B]
    canvas_B4SS[:, :3] += torch.from_numpy(noise_BN).view(-1, 3, s, s)
    canvas_B4SS = canvas_B4SS.numpy()[np.argsort(order_B)]
    return canvas_B4SS[:, :3], canvas_B4SS[:, 3]


def shape_rows(kind: str, dy: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a shape of radius r centred at the origin: row dy holds the pixels with lo <= |dx| <= hi (none
    where hi < 0). dy and r broadcast together; lo and hi have their shape. Every shape lies within |dy| <= r."""
    ady = np.abs(dy)
    none = np.full(np.broadcast_shapes(np.shape(dy), np.shape(r)), -1, dtype=dy.dtype)
    zero = np.zeros_like(none)

    def disc(radius: np.ndarray) -> np.ndarray:
        return np.where(ady <= radius, np.sqrt(np.maximum(radius**2 - dy**2, 0)), none)

    if kind == "circle":
        return zero, disc(r)
    if kind == "square":
        return zero, np.where(ady <= 0.85 * r, 0.85 * r, none)
    if kind == "triangle":  # apex up at dy = -r, base of width 2r at dy = r
        return zero, np.where(ady <= r, (dy + r) / 2, none)
    if kind == "ring":
        return np.maximum(disc(0.55 * r), 0), disc(r)
    if kind == "cross":  # two bars of half-width r / 3
        arm = r / 3
        return zero, np.where(ady <= arm, r, np.where(ady <= r, arm, none))
    raise ValueError(f"unknown shape {kind!r}")
