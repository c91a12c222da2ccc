"""Segmentation datasets: every image comes with a mask of integer class ids, one per pixel.

- `Synthetic`: the built-in demo, generated deterministically from a seed (coloured shapes on textured backgrounds).
- `SegFolder`: real data laid out as `images/`, `masks/` (same stem, `.png` class ids) and `classes.txt`.
- `ClassFolder`: classification data, one subdirectory per class; every patch gets its image's class.
"""

import dataclasses
import pathlib

import beartype
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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

_SHAPE_RGB = {
    "circle": (220, 40, 40),
    "square": (40, 80, 225),
    "triangle": (40, 185, 60),
    "ring": (235, 205, 35),
    "cross": (200, 50, 205),
}


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """The built-in demo: coloured shapes on textured backgrounds, one class per shape kind plus background."""

    n_imgs: int = 256
    """Number of images."""
    img_size: int = 64
    """Side of the square images in pixels."""
    seed: int = 0
    """Image i depends only on (seed, i)."""
    max_shapes: int = 3
    """Each image has between 1 and this many shapes."""

    def __post_init__(self):
        if self.n_imgs <= 0:
            raise ValueError(f"data.n_imgs must be positive, got {self.n_imgs}")
        if self.img_size < 16:
            raise ValueError(f"data.img_size must be at least 16, got {self.img_size}")
        if self.max_shapes <= 0:
            raise ValueError(f"data.max_shapes must be positive, got {self.max_shapes}")


class SyntheticDataset:
    """Images generated on demand; any one can be regenerated alone from (seed, index)."""

    def __init__(self, cfg: Synthetic):
        self.cfg = cfg
        self.class_names = ("background", *SHAPES)
        self.background: int | None = 0

    def __len__(self) -> int:
        return self.cfg.n_imgs

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range [0, {len(self)})")
        image_HW3, mask_HW = render_synthetic(self.cfg, i)
        return Sample(Image.fromarray(image_HW3), mask_HW, f"synthetic-{i:06d}")


@beartype.beartype
def render_synthetic(cfg: Synthetic, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i of the synthetic dataset: uint8 [S, S, 3] and int64 mask [S, S]."""
    rng = np.random.default_rng([cfg.seed, i])
    s = cfg.img_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

    # Background: a low-saturation base colour, stripes at a random angle and pixel noise.
    base = rng.uniform(90, 150) + rng.uniform(-12, 12, size=3)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, 12)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image = base[None, None, :] + 14 * stripes[..., None] + rng.normal(0, 6, size=(s, s, 3))
    mask = np.zeros((s, s), dtype=np.int64)

    for _ in range(int(rng.integers(1, cfg.max_shapes + 1))):
        kind = int(rng.integers(len(SHAPES)))
        r = rng.uniform(0.12, 0.24) * s
        cy, cx = rng.uniform(r, s - r, size=2)
        inside = shape_mask(SHAPES[kind], yy - cy, xx - cx, r)
        rgb = np.array(_SHAPE_RGB[SHAPES[kind]]) + rng.uniform(-15, 15, size=3)
        image[inside] = rgb + rng.normal(0, 4, size=(int(inside.sum()), 3))
        mask[inside] = kind + 1
    return np.clip(image, 0, 255).astype(np.uint8), mask


def shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside a shape of radius r centred at the origin of (dy, dx)."""
    d2 = dy**2 + dx**2
    if kind == "circle":
        return d2 <= r**2
    if kind == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if kind == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "ring":
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {kind!r}")


##########
# Folder #
##########


@dataclasses.dataclass(frozen=True)
class SegFolder:
    """Real data: `<root>/images/*` with same-stem `<root>/masks/*.png` (integer class ids) and `<root>/classes.txt`."""

    root: str
    """Dataset directory."""
    images: str = "images"
    """Image subdirectory (any format PIL reads)."""
    masks: str = "masks"
    """Mask subdirectory: single-channel PNGs of class ids, same stem and size as the images."""
    classes: str = "classes.txt"
    """Class names, one per line; line i names class id i."""
    background: int | None = 0
    """Class id of the background (used by prefer-foreground labelling); leave out if none."""
    mask_ignore: int | None = None
    """Mask value meaning "unlabelled" (e.g. 255 in many datasets); such pixels vote for no class."""


class FolderDataset:
    """Images and masks read from disk, checked up front for missing masks."""

    def __init__(self, cfg: SegFolder):
        self.cfg = cfg
        root = pathlib.Path(cfg.root)
        if not root.is_dir():
            raise DatasetError(f"dataset directory not found: {root}")
        imgs_dpath, masks_dpath = root / cfg.images, root / cfg.masks
        classes_fpath = root / cfg.classes
        for dpath in (imgs_dpath, masks_dpath):
            if not dpath.is_dir():
                raise DatasetError(f"dataset directory not found: {dpath}")
        if not classes_fpath.is_file():
            raise DatasetError(f"class-names file not found: {classes_fpath}")
        names = [line.strip() for line in classes_fpath.read_text().splitlines()]
        while names and not names[-1]:
            names.pop()
        if not names:
            raise DatasetError(f"class-names file is empty: {classes_fpath}")
        self.class_names = tuple(names)
        if cfg.background is not None and not 0 <= cfg.background < len(names):
            raise DatasetError(f"background class id {cfg.background} is outside the {len(names)} classes of {classes_fpath}")
        self.background = cfg.background

        self.img_fpaths = sorted(
            p for p in imgs_dpath.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.img_fpaths:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {imgs_dpath}")
        stems: dict[str, pathlib.Path] = {}
        for p in self.img_fpaths:
            if p.stem in stems:
                raise DatasetError(f"images {stems[p.stem]} and {p} share the mask {masks_dpath / (p.stem + '.png')}")
            stems[p.stem] = p
        self.mask_fpaths = [masks_dpath / f"{p.stem}.png" for p in self.img_fpaths]
        missing = [p for p in self.mask_fpaths if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DatasetError(f"{len(missing)} image(s) have no mask; expected e.g. {shown}")

    def __len__(self) -> int:
        return len(self.img_fpaths)

    def __getitem__(self, i: int) -> Sample:
        img_fpath, mask_fpath = self.img_fpaths[i], self.mask_fpaths[i]
        try:
            image = Image.open(img_fpath).convert("RGB")
        except OSError as err:
            raise DatasetError(f"cannot read image {img_fpath}: {err}") from err
        try:
            mask_img = Image.open(mask_fpath)
            mask_img.load()  # decode now so that a truncated mask is reported here, naming the file
        except OSError as err:
            raise DatasetError(f"cannot read mask {mask_fpath}: {err}") from err
        if mask_img.mode not in ("L", "P", "I", "I;16", "1"):
            raise DatasetError(f"mask {mask_fpath} has mode {mask_img.mode}; expected a single-channel image of class ids")
        mask = np.asarray(mask_img).astype(np.int64)
        if mask.shape != (image.height, image.width):
            raise DatasetError(
                f"mask {mask_fpath} is {mask.shape[1]}x{mask.shape[0]} but image {img_fpath} is {image.width}x{image.height}"
            )
        valid = mask if self.cfg.mask_ignore is None else mask[mask != self.cfg.mask_ignore]
        if valid.size and (valid.min() < 0 or valid.max() >= len(self.class_names)):
            bad = int(valid.max() if valid.max() >= len(self.class_names) else valid.min())
            raise DatasetError(
                f"mask {mask_fpath} has class id {bad}, outside the {len(self.class_names)} classes "
                f"of {pathlib.Path(self.cfg.root) / self.cfg.classes}"
            )
        if self.cfg.mask_ignore is not None:
            mask = np.where(mask == self.cfg.mask_ignore, -1, mask)
        return Sample(image, mask, img_fpath.stem)


################
# Class folder #
################


@dataclasses.dataclass(frozen=True)
class ClassFolder:
    """Classification data: `<root>/<class name>/*` images. Every patch of an image is labelled with the image's
    class (there are no masks), so AP measures how well a latent fires on images of that class, patch by patch."""

    root: str
    """Dataset directory with one subdirectory per class (class ids follow the sorted subdirectory names)."""


class ClassFolderDataset:
    """Images from class subfolders; the mask of an image is its class everywhere."""

    def __init__(self, cfg: ClassFolder):
        self.cfg = cfg
        root = pathlib.Path(cfg.root)
        if not root.is_dir():
            raise DatasetError(f"dataset directory not found: {root}")
        class_dpaths = sorted(p for p in root.iterdir() if p.is_dir())
        if not class_dpaths:
            raise DatasetError(f"no class subdirectories in {root}")
        self.class_names = tuple(p.name for p in class_dpaths)
        self.background: int | None = None
        self.items = [
            (fpath, c)
            for c, dpath in enumerate(class_dpaths)
            for fpath in sorted(dpath.iterdir())
            if fpath.is_file() and fpath.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.items:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class subdirectories of {root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        fpath, c = self.items[i]
        try:
            image = Image.open(fpath).convert("RGB")
        except OSError as err:
            raise DatasetError(f"cannot read image {fpath}: {err}") from err
        return Sample(image, np.full((image.height, image.width), c, dtype=np.int64), f"{fpath.parent.name}/{fpath.stem}")


Dataset = SyntheticDataset | FolderDataset | ClassFolderDataset


@beartype.beartype
def make_dataset(cfg: Synthetic | SegFolder | ClassFolder) -> Dataset:
    """Open a dataset (folder datasets are checked up front: directories, class file, a mask for every image)."""
    factories = {Synthetic: SyntheticDataset, SegFolder: FolderDataset, ClassFolder: ClassFolderDataset}
    return factories[type(cfg)](cfg)


def describe(cfg: Synthetic | SegFolder | ClassFolder) -> str:
    """A short human-readable name for plans and logs."""
    if isinstance(cfg, Synthetic):
        return f"synthetic shapes ({cfg.n_imgs} images, seed {cfg.seed})"
    if isinstance(cfg, ClassFolder):
        return f"class folders {cfg.root}"
    return f"folder {cfg.root}"
