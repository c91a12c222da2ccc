"""Segmentation datasets: every image comes with a mask of integer class ids, one per pixel.

- `Synthetic`: the built-in demo, generated deterministically from a seed (coloured shapes on textured backgrounds).
- `SegFolder`: real data laid out as `images/`, `masks/` (same stem, `.png` class ids) and `classes.txt`.
- `ClassFolder`: classification data, one subdirectory per class; every patch gets its image's class.

Folder datasets read every image upright (its EXIF orientation applied, as viewers show it) as 8-bit RGB by its full
range (`to_rgb`: 16-bit grayscale rescaled, not clipped; alpha dropped; floating-point refused) and masks as stored,
with their values exact (16-bit ids kept). `load_batch` brings items to the model's square input, stretched or
centre-cropped (`ResizeMode`). A file that cannot be
read, an image over the pixel limit (`pixel_limit`, a guard against decompression bombs) or a malformed class-names
file is a `DatasetError` naming the file. `fingerprint` summarises the files a dataset reads, for the dump key.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import struct
import threading
import typing
import zlib
from collections.abc import Mapping, Sequence

import beartype
import numpy as np
import torch
from jaxtyping import Integer, UInt8, jaxtyped
from PIL import ExifTags, Image, ImageOps

from saev import artifacts
from saev.data import labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

ResizeMode = typing.Literal["stretch", "crop"]
"""How an image (and its mask) becomes the model's square input: "stretch" resizes the whole image to the square,
distorting any other aspect ratio; "crop" takes the centred square of side min(width, height) and resizes that, so
shapes keep their proportions but the ends of the long side are not seen (see `crop_box`)."""


class DatasetError(ValueError):
    """The dataset is malformed: the message names the file or value at fault."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image with its segmentation mask."""

    image: Image.Image
    """RGB image."""
    mask: np.ndarray
    """int64 [H, W] class ids (same size as the image)."""
    name: str
    """Identifier (file stem, or `synthetic-000042`)."""


#############
# Synthetic #
#############

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

    def __post_init__(self):
        if self.n_imgs <= 0:
            raise ValueError(f"data.n_imgs must be positive, got {self.n_imgs}")
        if self.img_size < 16:
            raise ValueError(f"data.img_size must be at least 16, got {self.img_size}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"data.seed must be a non-negative 64-bit integer, got {self.seed}")
        if self.max_shapes <= 0:
            raise ValueError(f"data.max_shapes must be positive, got {self.max_shapes}")


class SyntheticDataset:
    """Images generated on demand; any one can be regenerated alone from (seed, index)."""

    def __init__(self, cfg: Synthetic):
        self.cfg = cfg
        self.class_names = ("background", *SHAPES)
        self.background: int | None = 0
        self.resize: ResizeMode = "stretch"  # square images: both modes give the same input

    def __len__(self) -> int:
        return self.cfg.n_imgs

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range [0, {len(self)})")
        images_B3SS, masks_BSS = render_synthetic(self.cfg, [i])  # a batch of one
        image = Image.fromarray(images_B3SS[0].transpose(1, 2, 0))
        return Sample(image, masks_BSS[0].astype(np.int64), f"synthetic-{i:06d}")

    def fingerprint(self) -> "Fingerprint":
        """No files: the config alone (every image follows from it; see `Fingerprint`)."""
        return _make_fingerprint("synthetic", self.class_names, pathlib.Path("."), [], dataclasses.asdict(self.cfg))


_SHAPE_RGB_K3 = np.array([_SHAPE_RGB[kind] for kind in SHAPES], dtype=np.float32)
_RADIUS_MIN, _RADIUS_MAX = 0.12, 0.24
"""Shape radii, as fractions of the image side."""

# Layout of one image's uniform draws: 11 for the background, then 7 per shape slot.
_U_BASE, _U_JITTER, _U_MIX, _U_PERIODS, _U_PHASES, _U_NOISE, _U_N_SHAPES = 0, slice(1, 4), 4, slice(5, 7), slice(7, 9), 9, 10
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
    step_BJS = np.rint((coords_S - cy_BJ1) * (_PROFILE_STEPS / r_BJ1)).astype(np.int64) + _PROFILE_REACH * _PROFILE_STEPS
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


#################
# Reading files #
#################

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
"""What Pillow raises on a file it cannot decode (unknown format, truncated or corrupt data, bad header fields)."""

_UNCHECKED_OPEN_LOCK = threading.Lock()
"""Held while Pillow's process-wide pixel limit is lifted to open one file (see `_open_unchecked`)."""

_INT_STORAGE = re.compile(r"I(?:;(8|16|32)[BLN]?(S)?)?")
"""Pillow's raw modes for integer pixels read into mode "I": bits per pixel (32 if absent) and S for signed."""

_ALPHA_DROPPED = frozenset({"1", "L", "P", "PA", "LA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"})
"""Modes that Pillow converts to RGB correctly (any alpha channel is dropped, the colour kept as stored)."""

MASK_MODES = frozenset({"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"})
"""Single-channel mask modes: pixel values (palette indices for "P") are the class ids, 16- and 32-bit ids kept."""


def pixel_limit(max_image_pixels: int | None = None) -> int | None:
    """The largest image (width x height) read: `max_image_pixels` if given, else Pillow's own error threshold
    (2 x `PIL.Image.MAX_IMAGE_PIXELS`, about 179 million pixels unless changed; None: no limit)."""
    if max_image_pixels is not None:
        return max_image_pixels
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _open_unchecked(fpath: pathlib.Path) -> Image.Image:
    """`Image.open` without Pillow's decompression-bomb check (the caller checks the size itself). Pillow reads its
    limit from a module global, so it is lifted for this call only, under a lock; opening reads the header alone."""
    with _UNCHECKED_OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(fpath)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(fpath: pathlib.Path, what: str, max_image_pixels: int | None) -> Image.Image:
    """Open an image file (header only), refusing one over the pixel limit (see `pixel_limit`) with a `DatasetError`
    that names the file, its size and how to allow it. With no `max_image_pixels`, Pillow's check runs as usual: an
    image over `Image.MAX_IMAGE_PIXELS` (but within twice that) still loads, with Pillow's DecompressionBombWarning."""
    with _UNCHECKED_OPEN_LOCK:  # Pillow's limit as set, not as lifted for a moment by another thread
        limit = pixel_limit(max_image_pixels)
    try:
        if max_image_pixels is None:
            try:
                image = Image.open(fpath)
            except Image.DecompressionBombError:
                image = _open_unchecked(fpath)  # only to report its size below
        else:
            image = _open_unchecked(fpath)
    except _DECODE_ERRORS as err:
        raise DatasetError(f"cannot read {what} {fpath}: {type(err).__name__}: {err}") from err
    n_pixels = image.width * image.height
    if limit is not None and n_pixels > limit:
        image.close()
        raise DatasetError(
            f"{what} {fpath} is {image.width}x{image.height} = {n_pixels:,} pixels, over the limit of {limit:,} "
            f"(a guard against decompression bombs); if the file is genuine, set max_image_pixels = {n_pixels} "
            "(or more) in the dataset config"
        )
    return image


def _storage_mode(image: Image.Image) -> str | None:
    """The raw mode Pillow will decode `image` from (e.g. "I;16B", "I;32S"), known only until it is loaded."""
    tile = getattr(image, "tile", None)
    if not tile:
        return None
    args = tile[0][3]
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else None


@beartype.beartype
def to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """`image` as 8-bit RGB, its full range kept; `source` names it in errors (a `DatasetError`).

    - RGB is unchanged; 1-bit, grayscale, palette, CMYK, YCbCr and HSV are converted by Pillow.
    - Alpha (LA, PA, RGBA, RGBa, a palette or tRNS transparency) is dropped, not composited: each pixel keeps the
      colour it stores (RGBa is un-premultiplied first), whatever its opacity. This is what `convert("RGB")` did.
    - 16-bit grayscale (I;16*) and mode I (integers) are rescaled by the full range of the type they were stored as,
      which Pillow reports until the image is loaded: unsigned 16-bit v -> v >> 8, unsigned 32-bit v -> v >> 24,
      signed types offset by their minimum first (so 0 is mid-grey). Mode I of unknown storage (an image made in
      memory, or already loaded) is taken as Pillow's native signed 32-bit. (`convert("RGB")` clips such images at
      255, so a 16-bit image would be almost white.)
    - Refused: floating-point images (mode F: no range to rescale by; convert them to 8 or 16 bits), LAB (Pillow
      converts it to RGB wrongly), and every other mode.
    """
    storage = _storage_mode(image)
    try:
        image.load()  # decode now, so that a truncated or corrupt file is reported here, naming it
        if image.mode == "RGB":
            return image
        if image.mode in _ALPHA_DROPPED:
            return image.convert("RGB")
        if image.mode.startswith("I;16"):
            gray_HW = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return Image.fromarray(gray_HW, mode="L").convert("RGB")
        if image.mode == "I":
            match = _INT_STORAGE.fullmatch(storage or "I")
            if match is None:
                raise DatasetError(
                    f"{source} has mode I stored as {storage}, which is not supported; save it as 8 or 16 bits"
                )
            bits = int(match.group(1) or 32)
            signed = match.group(2) is not None or match.group(1) is None
            values_HW = np.asarray(image).astype(np.int64)
            if bits == 32 and not signed:
                values_HW &= 0xFFFFFFFF  # Pillow stores unsigned 32-bit values in int32: undo the wrap-around
            if signed:
                values_HW += 1 << (bits - 1)
            gray_HW = (np.clip(values_HW, 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8)
            return Image.fromarray(gray_HW, mode="L").convert("RGB")
    except _DECODE_ERRORS as err:
        raise DatasetError(f"cannot read {source}: {type(err).__name__}: {err}") from err
    if image.mode == "F":
        raise DatasetError(
            f"{source} has mode F (floating-point pixels), which has no range to rescale by; save it as 8 or 16 bits"
        )
    raise DatasetError(f"{source} has mode {image.mode}, which is not supported; save it as RGB")


_ORIENTATION = ExifTags.Base.Orientation
"""The EXIF tag saying how the stored pixels are turned for display: 1 as stored, 2..8 mirrored and/or rotated."""


def _exif_orientation(image: Image.Image, fpath: pathlib.Path) -> int:
    """The EXIF (or XMP) orientation of an opened image, 1 when absent or not a valid value (1..8)."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except _DECODE_ERRORS as err:
        raise DatasetError(
            f"cannot read the EXIF metadata of image {fpath}: {type(err).__name__}: {err}; "
            "the orientation it may hold is unknown (strip the metadata, e.g. exiftool -all= FILE)"
        ) from err
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


@dataclasses.dataclass(frozen=True)
class UprightImage:
    """An image file read upright, with what was done to turn it."""

    image: Image.Image
    """8-bit RGB pixels as a viewer shows them (the EXIF orientation applied)."""
    orientation: int
    """The EXIF orientation applied (1: none, or already applied by Pillow as for TIFF; 5..8 swap width and
    height)."""
    stored_size: tuple[int, int]
    """(width, height) of the pixels as stored in the file, before turning."""


@beartype.beartype
def read_upright(fpath: pathlib.Path, max_image_pixels: int | None = None) -> UprightImage:
    """The image file `fpath` decoded in full, converted to 8-bit RGB (see `to_rgb`) and turned upright by its EXIF
    orientation (`ImageOps.exif_transpose`), as photo viewers show it: a phone photo held sideways is stored
    sideways with an orientation tag. An image over the pixel limit (see `pixel_limit`), an unsupported mode, or a
    file Pillow cannot decode is a `DatasetError` naming it."""
    image = _open(fpath, "image", max_image_pixels)
    try:
        rgb = to_rgb(image, f"image {fpath}")
        # Read once the pixels are decoded (a PNG may keep its EXIF after them). Pillow turns a TIFF upright itself
        # as it loads it, dropping the tag, so a TIFF reads as 1 here and is not turned twice.
        orientation = _exif_orientation(image, fpath)
    except DatasetError:
        image.close()
        raise
    if rgb is not image:
        image.close()  # the file of a multi-frame image stays open until closed
    stored_size = rgb.size
    if orientation != 1:
        # `to_rgb` may build a new image without the file's metadata: give it the tag that exif_transpose reads.
        rgb.getexif()[_ORIENTATION] = orientation
        rgb = ImageOps.exif_transpose(rgb)
    return UprightImage(rgb, orientation, stored_size)


@beartype.beartype
def read_image(fpath: pathlib.Path, max_image_pixels: int | None = None) -> Image.Image:
    """The image file `fpath` as 8-bit RGB, upright (see `read_upright`); errors are a `DatasetError` naming it."""
    return read_upright(fpath, max_image_pixels).image


@beartype.beartype
def read_mask(fpath: pathlib.Path, max_image_pixels: int | None = None) -> np.ndarray:
    """int64 [H, W] class ids of the mask file `fpath`: a single-channel image (see `MASK_MODES`), values kept
    exactly (16-bit ids above 255 included). Errors are a `DatasetError` naming the file."""
    image = _open(fpath, "mask", max_image_pixels)
    try:
        image.load()  # decode now, so that a truncated or corrupt mask is reported here, naming it
        if image.mode not in MASK_MODES:
            raise DatasetError(f"mask {fpath} has mode {image.mode}; expected a single-channel image of class ids")
        return np.asarray(image).astype(np.int64)
    except _DECODE_ERRORS as err:
        raise DatasetError(f"cannot read mask {fpath}: {type(err).__name__}: {err}") from err
    finally:
        image.close()


def _list_dir(dpath: pathlib.Path) -> list[pathlib.Path]:
    """The entries of a directory, sorted; an unreadable directory is a `DatasetError` naming it."""
    try:
        return sorted(dpath.iterdir())
    except OSError as err:
        raise DatasetError(f"cannot list directory {dpath}: {err.strerror or err}") from err


def _image_files(dpath: pathlib.Path) -> list[pathlib.Path]:
    """The image files of a directory (by suffix, see `IMAGE_SUFFIXES`), sorted. Subdirectories are skipped; an entry
    with an image suffix that is neither a file nor a directory (a broken link, a pipe) is a `DatasetError`."""
    fpaths = []
    for p in _list_dir(dpath):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.is_dir():
            continue
        if not p.is_file():
            raise DatasetError(f"image {p} is not a regular file (a broken link?)")
        fpaths.append(p)
    return fpaths


def read_class_names(fpath: pathlib.Path) -> tuple[str, ...]:
    """Class names from a text file, one per line (line i names class id i): UTF-8 (a leading byte-order mark is
    allowed), each name stripped of surrounding whitespace, blank lines allowed only at the end, no name twice.
    Every fault is a `DatasetError` naming the file (and the line)."""
    if not fpath.is_file():
        raise DatasetError(f"class-names file not found: {fpath}")
    try:
        text = fpath.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise DatasetError(f"cannot read class-names file {fpath}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        line = fpath.read_bytes()[: err.start].count(b"\n") + 1
        raise DatasetError(f"class-names file {fpath} is not UTF-8: byte {err.start} (line {line}) is invalid") from err
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DatasetError(f"class-names file is empty: {fpath}")
    first_line: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise DatasetError(f"class-names file {fpath} has a blank line {i + 1} between class names")
        if name in first_line:
            lines = f"lines {first_line[name] + 1} and {i + 1}"
            raise DatasetError(f"class-names file {fpath} names class {name!r} twice: {lines}")
        first_line[name] = i
    return tuple(names)


###############
# Fingerprint #
###############


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a dataset reads, cheaply summarised (file sizes and modification times, no contents except the class-names
    file): meant to enter the dump key, so that editing, adding, removing or renaming a file gives a new key.

    A file rewritten with the same size and modification time (e.g. restored with `touch -r`) goes unseen; a copy of
    the dataset that does not preserve modification times (`cp` without `-p`) gets a new digest.
    """

    digest: str
    """16 hex digits (SHA-256, truncated) over the kind, the class names, `files` and the class-names file's
    contents (the synthetic dataset: its config)."""
    files: dict[str, list[int]]
    """Every file read, by path relative to the dataset root ('/'-separated) -> [size in bytes, mtime in ns]."""

    def changed(self, old_files: Mapping[str, Sequence[int]]) -> list[str]:
        """Sorted paths of the files added, removed or changed since an earlier `files` listing (e.g. one read back
        from JSON), to say why a digest differs."""
        paths = set(self.files) | set(old_files)
        return sorted(p for p in paths if list(old_files.get(p, ())) != self.files.get(p, []))


def _make_fingerprint(
    kind: str, class_names: Sequence[str], root: pathlib.Path, fpaths: Sequence[pathlib.Path], extra: object
) -> Fingerprint:
    """Stat `fpaths` (paths under `root`, or relative to it) and digest them with the kind, class names and `extra`."""
    files: dict[str, list[int]] = {}
    for fpath in fpaths:
        try:
            st = fpath.stat()
        except OSError as err:
            raise DatasetError(f"cannot stat {fpath}: {err.strerror or err}") from err
        files[pathlib.Path(os.path.relpath(fpath, root)).as_posix()] = [st.st_size, st.st_mtime_ns]
    payload = {"kind": kind, "class_names": list(class_names), "files": sorted(files.items()), "extra": extra}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return Fingerprint(hashlib.sha256(text.encode()).hexdigest()[:16], dict(sorted(files.items())))


##########
# Folder #
##########


@dataclasses.dataclass(frozen=True)
class SegFolder:
    """Real data: `<root>/images/*` with same-stem `<root>/masks/*.png` (integer class ids) and `<root>/classes.txt`.

    Images of any mode are read upright (their EXIF orientation applied) as 8-bit RGB by their full range (see
    `to_rgb`: 16-bit grayscale rescaled, alpha dropped, floating-point refused); masks are read as stored, so they are
    drawn on the upright image, and keep their values exactly (16-bit ids included)."""

    root: str
    """Dataset directory."""
    images: str = "images"
    """Image subdirectory (any format PIL reads)."""
    masks: str = "masks"
    """Mask subdirectory: single-channel PNGs of class ids, same stem and size as the images."""
    classes: str = "classes.txt"
    """Class names, one per line (UTF-8); line i names class id i. Blank lines only at the end; no name twice."""
    background: int | None = 0
    """Class id of the background (used by prefer-foreground labelling); leave out if none."""
    mask_ignore: int | None = None
    """Mask value meaning "unlabelled" (e.g. 255 in many datasets); such pixels vote for no class."""
    resize: ResizeMode = "stretch"
    """How images and masks become the model's square input: "stretch" (the whole image, squeezed) or "crop" (the
    centred square, proportions kept, the ends of the long side dropped); see `ResizeMode`. "stretch" is the default
    because it keeps every pixel, so no labelled object near an edge is lost, and it is what earlier versions did;
    "crop" matches open_clip's own preprocessing (short side resized, centre crop), undistorted shapes as in the
    model's training. Square images give the same input either way."""
    max_image_pixels: int | None = artifacts.unhashed(None)
    """Largest image or mask read (width x height); a larger one is refused as a possible decompression bomb. Leave
    out for Pillow's limit (about 179 million pixels; Pillow warns above half that); when set, it is the one limit,
    with no warning. Raise it for genuinely huge images. Changes no result."""

    def __post_init__(self):
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")


class FolderDataset:
    """Images and masks read from disk, checked up front for missing masks."""

    def __init__(self, cfg: SegFolder):
        self.cfg = cfg
        root = pathlib.Path(cfg.root)
        if not root.is_dir():
            raise DatasetError(f"dataset directory not found: {root}")
        imgs_dpath, masks_dpath = root / cfg.images, root / cfg.masks
        self.classes_fpath = root / cfg.classes
        for dpath in (imgs_dpath, masks_dpath):
            if not dpath.is_dir():
                raise DatasetError(f"dataset directory not found: {dpath}")
        self.class_names = read_class_names(self.classes_fpath)
        n_classes = len(self.class_names)
        if cfg.background is not None and not 0 <= cfg.background < n_classes:
            raise DatasetError(
                f"background class id {cfg.background} is outside the {n_classes} classes of {self.classes_fpath}"
            )
        self.background = cfg.background
        self.resize: ResizeMode = cfg.resize

        self.img_fpaths = _image_files(imgs_dpath)
        if not self.img_fpaths:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {imgs_dpath}")
        stems: dict[str, pathlib.Path] = {}
        for p in self.img_fpaths:
            if p.stem in stems:
                raise DatasetError(f"images {stems[p.stem]} and {p} share the mask {masks_dpath / (p.stem + '.png')}")
            stems[p.stem] = p
        self.mask_fpaths = [masks_dpath / f"{p.stem}.png" for p in self.img_fpaths]
        missing = []
        for p in self.mask_fpaths:
            if p.is_dir():
                raise DatasetError(f"mask {p} is a directory, not an image file")
            if not p.is_file():
                missing.append(p)
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DatasetError(f"{len(missing)} image(s) have no mask; expected e.g. {shown}")

    def __len__(self) -> int:
        return len(self.img_fpaths)

    def __getitem__(self, i: int) -> Sample:
        img_fpath, mask_fpath = self.img_fpaths[i], self.mask_fpaths[i]
        upright = read_upright(img_fpath, self.cfg.max_image_pixels)
        image = upright.image
        mask = read_mask(mask_fpath, self.cfg.max_image_pixels)
        if mask.shape != (image.height, image.width):
            stored_w, stored_h = upright.stored_size
            why = ""
            if upright.orientation >= 5 and mask.shape == (stored_h, stored_w):
                why = (
                    f" upright (its EXIF orientation {upright.orientation} turns the stored {stored_w}x{stored_h} "
                    "pixels); images are used upright, as viewers show them, and masks as stored: draw the mask on "
                    "the upright image"
                )
            raise DatasetError(
                f"mask {mask_fpath} is {mask.shape[1]}x{mask.shape[0]} "
                f"but image {img_fpath} is {image.width}x{image.height}{why}"
            )
        valid = mask if self.cfg.mask_ignore is None else mask[mask != self.cfg.mask_ignore]
        if valid.size and (valid.min() < 0 or valid.max() >= len(self.class_names)):
            bad = int(valid.max() if valid.max() >= len(self.class_names) else valid.min())
            raise DatasetError(
                f"mask {mask_fpath} has class id {bad}, "
                f"outside the {len(self.class_names)} classes of {self.classes_fpath}"
            )
        if self.cfg.mask_ignore is not None:
            mask = np.where(mask == self.cfg.mask_ignore, -1, mask)
        return Sample(image, mask, img_fpath.stem)

    def fingerprint(self) -> Fingerprint:
        """Every image and mask, and the class-names file, with its contents' hash (see `Fingerprint`)."""
        try:
            classes_sha256 = hashlib.sha256(self.classes_fpath.read_bytes()).hexdigest()
        except OSError as err:
            raise DatasetError(f"cannot read class-names file {self.classes_fpath}: {err.strerror or err}") from err
        fpaths = [*self.img_fpaths, *self.mask_fpaths, self.classes_fpath]
        return _make_fingerprint("segfolder", self.class_names, pathlib.Path(self.cfg.root), fpaths, classes_sha256)


################
# Class folder #
################


@dataclasses.dataclass(frozen=True)
class ClassFolder:
    """Classification data: `<root>/<class name>/*` images. Every patch of an image is labelled with the image's
    class (there are no masks), so AP measures how well a latent fires on images of that class, patch by patch.
    Images are read as in `SegFolder` (upright, 8-bit RGB)."""

    root: str
    """Dataset directory with one subdirectory per class (class ids follow the sorted subdirectory names)."""
    resize: ResizeMode = "stretch"
    """How images become the model's square input: "stretch" or "crop"; see `SegFolder.resize`."""
    max_image_pixels: int | None = artifacts.unhashed(None)
    """Largest image read (width x height); see `SegFolder.max_image_pixels`. Changes no result."""

    def __post_init__(self):
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")


class ClassFolderDataset:
    """Images from class subfolders; the mask of an image is its class everywhere."""

    def __init__(self, cfg: ClassFolder):
        self.cfg = cfg
        root = pathlib.Path(cfg.root)
        if not root.is_dir():
            raise DatasetError(f"dataset directory not found: {root}")
        class_dpaths = [p for p in _list_dir(root) if p.is_dir()]
        if not class_dpaths:
            raise DatasetError(f"no class subdirectories in {root}")
        self.class_names = tuple(p.name for p in class_dpaths)
        self.background: int | None = None
        self.resize: ResizeMode = cfg.resize
        self.items = [(fpath, c) for c, dpath in enumerate(class_dpaths) for fpath in _image_files(dpath)]
        if not self.items:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class subdirectories of {root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        fpath, c = self.items[i]
        image = read_image(fpath, self.cfg.max_image_pixels)
        mask = np.full((image.height, image.width), c, dtype=np.int64)
        return Sample(image, mask, f"{fpath.parent.name}/{fpath.stem}")

    def fingerprint(self) -> Fingerprint:
        """Every image, plus the class names (an empty class subdirectory adds a class; see `Fingerprint`)."""
        fpaths = [fpath for fpath, _ in self.items]
        return _make_fingerprint("classfolder", self.class_names, pathlib.Path(self.cfg.root), fpaths, None)


Dataset = SyntheticDataset | FolderDataset | ClassFolderDataset


#########
# Batch #
#########


@dataclasses.dataclass(frozen=True)
class Batch:
    """Items of a dataset at the model's input size, stacked for one forward pass."""

    images: UInt8[np.ndarray, "B 3 S S"]
    """RGB pixels, channels first (the model's layout)."""
    masks: Integer[np.ndarray, "B S S"]
    """Class ids per pixel (negative: unlabelled), aligned with the images."""


@beartype.beartype
def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square of side min(width, height), the part of an image that the
    "crop" mode keeps: the long side loses (long - short) // 2 pixels at its start and the rest at its end."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@beartype.beartype
def resize_image(image: Image.Image, size: int, resize: ResizeMode = "stretch") -> UInt8[np.ndarray, "3 size size"]:
    """RGB pixels at size x size, channels first, bicubic: the whole image ("stretch") or its centred square
    ("crop", see `crop_box`). Masks go through `resize_mask` with the same mode, so pixels and patches line up. An
    image already at that size is unchanged. An image of another mode is converted first as `to_rgb` does (16-bit
    grayscale rescaled, not clipped)."""
    image = to_rgb(image)
    if resize == "crop" and image.width != image.height:
        image = image.crop(crop_box(image.width, image.height))
    image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1).copy()


@jaxtyped(typechecker=beartype.beartype)
def resize_mask(
    mask: Integer[np.ndarray, "H W"], size: int, resize: ResizeMode = "stretch"
) -> Integer[np.ndarray, "size size"]:
    """Class ids at size x size, nearest-neighbour (`labels.resize_nearest`), of the part of the mask that
    `resize_image` keeps of its image with the same mode."""
    if resize == "crop":
        left, top, right, bottom = crop_box(mask.shape[1], mask.shape[0])
        mask = mask[top:bottom, left:right]
    return labels.resize_nearest(mask, size)


@beartype.beartype
def load_batch(
    dataset: Dataset, indices: Sequence[int], size: int, pool: concurrent.futures.Executor | None = None
) -> Batch:
    """Items `indices` at size x size, as the model sees them: stretched or centre-cropped by the dataset's `resize`
    mode (see `resize_image`; masks through `resize_mask`, the same crop, nearest-neighbour).

    The synthetic dataset at its own size renders the whole batch at once; other datasets load item by item, on
    `pool`'s threads when given (image decoding and resizing release the GIL).
    """
    if isinstance(dataset, SyntheticDataset) and dataset.cfg.img_size == size:
        return Batch(*render_synthetic(dataset.cfg, indices))

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        sample = dataset[i]
        return resize_image(sample.image, size, dataset.resize), resize_mask(sample.mask, size, dataset.resize)

    items = list(pool.map(load, indices) if pool is not None else map(load, indices))
    return Batch(np.stack([image for image, _ in items]), np.stack([mask for _, mask in items]))


@beartype.beartype
def make_dataset(cfg: Synthetic | SegFolder | ClassFolder) -> Dataset:
    """Open a dataset (folder datasets are checked up front: directories, class file, a mask for every image)."""
    factories = {Synthetic: SyntheticDataset, SegFolder: FolderDataset, ClassFolder: ClassFolderDataset}
    return factories[type(cfg)](cfg)


@beartype.beartype
def fingerprint(cfg: Synthetic | SegFolder | ClassFolder) -> Fingerprint:
    """The dataset's `Fingerprint` (opening it first, with its checks): the files it reads, by size and modification
    time, digested. Meant to enter the dump key next to the config, so that an edited dataset gets a new dump."""
    return make_dataset(cfg).fingerprint()


def describe(cfg: Synthetic | SegFolder | ClassFolder) -> str:
    """A short human-readable name for plans and logs."""
    if isinstance(cfg, Synthetic):
        return f"synthetic shapes ({cfg.n_imgs} images, seed {cfg.seed})"
    if isinstance(cfg, ClassFolder):
        return f"class folders {cfg.root}"
    return f"folder {cfg.root}"
