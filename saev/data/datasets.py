"""Segmentation datasets: every image comes with a mask of integer class ids, one per pixel.

- `Synthetic`: the built-in demo, generated deterministically from a seed (coloured shapes on textured backgrounds).
- `SegFolder`: real data laid out as `images/`, `masks/` (same stem, `.png` class ids) and `classes.txt`.
- `ClassFolder`: classification data, one subdirectory per class; every patch gets its image's class.
- `ImageFolder`: unlabelled images (a corpus to fit SAEs on): every image under a directory, at any depth; no
  classes, every patch unlabelled (kind = "imagefolder").

Folder datasets read every image upright (its EXIF orientation applied, as viewers show it) as 8-bit RGB by its full
range (`to_rgb`: 16-bit grayscale rescaled, not clipped; alpha dropped; floating-point refused) and masks as stored,
with their values exact (16-bit ids kept). `load_batch` brings items to the model's square input, stretched or
centre-cropped (`ResizeMode`). A file that cannot be
read, an image over the pixel limit (`pixel_limit`, a guard against decompression bombs) or a malformed class-names
file is a `DatasetError` naming the file. `fingerprint` summarises the files a dataset reads, for the dump key.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import beartype
import numpy as np
from jaxtyping import Integer, UInt8
from PIL import Image

from saev import artifacts
from saev.data.images import (
    IMAGE_SUFFIXES,
    MASK_MODES,
    DatasetError,
    ResizeMode,
    _image_files,
    _list_dir,
    crop_box,
    pixel_limit,
    read_class_names,
    read_class_names_bytes,
    read_image,
    read_mask,
    read_upright,
    resize_image,
    resize_mask,
    to_rgb,
)
from saev.data.synthetic import SHAPES, Synthetic, render_synthetic

__all__ = [  # what callers use from here; the readers live in saev.data.images, the renderer in saev.data.synthetic
    "IMAGE_SUFFIXES", "MASK_MODES", "DatasetError", "ResizeMode", "SHAPES", "Synthetic", "crop_box", "pixel_limit",
    "read_class_names", "read_image", "read_mask", "read_upright", "render_synthetic", "resize_image", "resize_mask",
    "to_rgb",
]  # fmt: skip


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


def _render(cfg: Synthetic, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """`render_synthetic`, its masks all unlabelled (-1) when the dataset is not `labelled`."""
    images_B3SS, masks_BSS = render_synthetic(cfg, indices)
    if not cfg.labelled:
        masks_BSS = np.full(masks_BSS.shape, -1, dtype=np.int64)
    return images_B3SS, masks_BSS


class SyntheticDataset:
    """Images generated on demand; any one can be regenerated alone from (seed, index)."""

    def __init__(self, cfg: Synthetic):
        self.cfg = cfg
        self.class_names: tuple[str, ...] = ("background", *SHAPES) if cfg.labelled else ()
        self.background: int | None = 0 if cfg.labelled else None
        self.resize: ResizeMode = "stretch"  # square images: both modes give the same input

    def __len__(self) -> int:
        return self.cfg.n_imgs

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range [0, {len(self)})")
        images_B3SS, masks_BSS = _render(self.cfg, [i])  # a batch of one
        image = Image.fromarray(images_B3SS[0].transpose(1, 2, 0))
        return Sample(image, masks_BSS[0].astype(np.int64), f"synthetic-{i:06d}")

    def fingerprint(self) -> "Fingerprint":
        """No files: the config alone (every image follows from it; see `Fingerprint`)."""
        return _make_fingerprint("synthetic", self.class_names, pathlib.Path("."), [], dataclasses.asdict(self.cfg))


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


class _ImageFiles:
    """What the configs of datasets read from image files share: `max_image_pixels` (a field of each) is checked once
    the config is built."""

    max_image_pixels: int | None

    def __post_init__(self):
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")


def _dataset_root(root: str) -> pathlib.Path:
    dpath = pathlib.Path(root)
    if not dpath.is_dir():
        raise DatasetError(f"dataset directory not found: {dpath}")
    return dpath


@dataclasses.dataclass(frozen=True)
class SegFolder(_ImageFiles):
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


class FolderDataset:
    """Images and masks read from disk, checked up front for missing masks."""

    def __init__(self, cfg: SegFolder):
        self.cfg = cfg
        root = _dataset_root(cfg.root)
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
        classes_sha256 = hashlib.sha256(read_class_names_bytes(self.classes_fpath)).hexdigest()
        fpaths = [*self.img_fpaths, *self.mask_fpaths, self.classes_fpath]
        return _make_fingerprint("segfolder", self.class_names, pathlib.Path(self.cfg.root), fpaths, classes_sha256)


################
# Class folder #
################


@dataclasses.dataclass(frozen=True)
class ClassFolder(_ImageFiles):
    """Classification data: `<root>/<class name>/*` images. Every patch of an image is labelled with the image's
    class (there are no masks), so AP measures how well a latent fires on images of that class, patch by patch.
    Images are read as in `SegFolder` (upright, 8-bit RGB)."""

    root: str
    """Dataset directory with one subdirectory per class (class ids follow the sorted subdirectory names)."""
    resize: ResizeMode = "stretch"
    """How images become the model's square input: "stretch" or "crop"; see `SegFolder.resize`."""
    max_image_pixels: int | None = artifacts.unhashed(None)
    """Largest image read (width x height); see `SegFolder.max_image_pixels`. Changes no result."""


class ClassFolderDataset:
    """Images from class subfolders; the mask of an image is its class everywhere."""

    def __init__(self, cfg: ClassFolder):
        self.cfg = cfg
        root = _dataset_root(cfg.root)
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


@dataclasses.dataclass(frozen=True)
class ImageFolder(_ImageFiles):
    """Unlabelled images: every image file under `root`, at any depth (e.g. ImageNet's `train/<synset>/*.JPEG`), in
    sorted path order. There are no classes: every patch is unlabelled, so such a dump can only be a corpus (what
    SAEs are fit on), never a select or report split. Images are read as in `SegFolder` (upright, 8-bit RGB)."""

    root: str
    """Dataset directory; images in it and in its subdirectories (hidden ones, starting with ".", skipped; a linked
    directory is walked once)."""
    resize: ResizeMode = "stretch"
    """How images become the model's square input: "stretch" or "crop"; see `SegFolder.resize`."""
    max_image_pixels: int | None = artifacts.unhashed(None)
    """Largest image read (width x height); see `SegFolder.max_image_pixels`. Changes no result."""


class ImageFolderDataset:
    """Images found under a directory tree; the mask of an image is "unlabelled" everywhere."""

    def __init__(self, cfg: ImageFolder):
        self.cfg = cfg
        root = _dataset_root(cfg.root)
        self.class_names: tuple[str, ...] = ()
        self.background: int | None = None
        self.resize: ResizeMode = cfg.resize
        self.fpaths: list[pathlib.Path] = []
        todo, seen = [root], set()
        while todo:  # sorted depth-first walk: images of a directory, then its subdirectories, by name
            dpath = todo.pop()
            if (real := dpath.resolve()) in seen:
                continue  # a link back up the tree (or to a directory walked already)
            seen.add(real)
            self.fpaths += _image_files(dpath)
            todo += reversed([p for p in _list_dir(dpath) if p.is_dir() and not p.name.startswith(".")])
        if not self.fpaths:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its subdirectories")

    def __len__(self) -> int:
        return len(self.fpaths)

    def __getitem__(self, i: int) -> Sample:
        fpath = self.fpaths[i]
        image = read_image(fpath, self.cfg.max_image_pixels)
        mask = np.full((image.height, image.width), -1, dtype=np.int64)  # negative: unlabelled
        return Sample(image, mask, pathlib.Path(os.path.relpath(fpath, self.cfg.root)).with_suffix("").as_posix())

    def fingerprint(self) -> Fingerprint:
        """Every image (see `Fingerprint`)."""
        return _make_fingerprint("imagefolder", (), pathlib.Path(self.cfg.root), self.fpaths, None)


Dataset = SyntheticDataset | FolderDataset | ClassFolderDataset | ImageFolderDataset

DatasetConfig = Synthetic | SegFolder | ClassFolder | ImageFolder
"""Every dataset config (a TOML table chooses one by `kind`)."""


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
def load_batch(
    dataset: Dataset, indices: Sequence[int], size: int, pool: concurrent.futures.Executor | None = None
) -> Batch:
    """Items `indices` at size x size, as the model sees them: stretched or centre-cropped by the dataset's `resize`
    mode (see `resize_image`; masks through `resize_mask`, the same crop, nearest-neighbour).

    The synthetic dataset at its own size renders the whole batch at once; other datasets load item by item, on
    `pool`'s threads when given (image decoding and resizing release the GIL).
    """
    if isinstance(dataset, SyntheticDataset) and dataset.cfg.img_size == size:
        return Batch(*_render(dataset.cfg, indices))

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        sample = dataset[i]
        return resize_image(sample.image, size, dataset.resize), resize_mask(sample.mask, size, dataset.resize)

    items = list(pool.map(load, indices) if pool is not None else map(load, indices))
    return Batch(np.stack([image for image, _ in items]), np.stack([mask for _, mask in items]))


@beartype.beartype
def make_dataset(cfg: DatasetConfig) -> Dataset:
    """Open a dataset (folder datasets are checked up front: directories, class file, a mask for every image)."""
    factories = {
        Synthetic: SyntheticDataset, SegFolder: FolderDataset, ClassFolder: ClassFolderDataset,
        ImageFolder: ImageFolderDataset,
    }  # fmt: skip
    return factories[type(cfg)](cfg)


@beartype.beartype
def fingerprint(cfg: DatasetConfig) -> Fingerprint:
    """The dataset's `Fingerprint` (opening it first, with its checks): the files it reads, by size and modification
    time, digested. Meant to enter the dump key next to the config, so that an edited dataset gets a new dump."""
    return make_dataset(cfg).fingerprint()


def describe(cfg: DatasetConfig) -> str:
    """A short human-readable name for plans and logs."""
    if isinstance(cfg, Synthetic):
        return f"synthetic shapes ({cfg.n_imgs} images, seed {cfg.seed})"
    if isinstance(cfg, ClassFolder):
        return f"class folders {cfg.root}"
    if isinstance(cfg, ImageFolder):
        return f"unlabelled images {cfg.root}"
    return f"folder {cfg.root}"
