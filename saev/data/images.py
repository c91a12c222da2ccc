"""Reading a folder dataset's files: images (upright, 8-bit RGB by their full range), masks (class ids, exact), class
names, and bringing an image and its mask to the model's square input.

Images are read upright (their EXIF orientation applied, as viewers show them) as 8-bit RGB by their full range
(`to_rgb`: 16-bit grayscale rescaled, not clipped; alpha dropped; floating-point refused); masks as stored, with their
values exact (16-bit ids kept). A file that cannot be read, an image over the pixel limit (`pixel_limit`, a guard
against decompression bombs) or a malformed class-names file is a `DatasetError` naming the file. `resize_image` and
`resize_mask` stretch or centre-crop (`ResizeMode`) an image and its mask alike.
"""

import dataclasses
import pathlib
import re
import struct
import threading
import typing
import zlib

import beartype
import numpy as np
from jaxtyping import Integer, UInt8, jaxtyped
from PIL import ExifTags, Image, ImageOps

from saev import errors, helpers
from saev.data import labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

ResizeMode = typing.Literal["stretch", "crop"]
"""How an image (and its mask) becomes the model's square input: "stretch" resizes the whole image to the square,
distorting any other aspect ratio; "crop" takes the centred square of side min(width, height) and resizes that, so
shapes keep their proportions but the ends of the long side are not seen (see `crop_box`)."""


class DatasetError(errors.UserInputError, ValueError):
    """The dataset is malformed: the message names the file or value at fault. (One found while planning, before
    anything runs, is reported as a `ConfigError`: see `stages.pipeline.make_plan`.)"""


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
    data = read_class_names_bytes(fpath)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetError(f"class-names file {fpath} is not UTF-8: byte {err.start} (line {line}) is invalid") from err
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DatasetError(f"class-names file is empty: {fpath}")
    for i, name in enumerate(names):
        if not name:
            raise DatasetError(f"class-names file {fpath} has a blank line {i + 1} between class names")
    if fault := labels.class_names_fault(names, lines=True):
        raise DatasetError(f"class-names file {fpath} {fault}")
    return tuple(names)


def read_class_names_bytes(fpath: pathlib.Path) -> bytes:
    """The bytes of a class-names file, read only once checked to be a regular file of a plausible size
    (`helpers.read_regular_file`); a `DatasetError` naming it otherwise."""
    return helpers.read_regular_file(fpath, what="class-names", error=DatasetError)


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
