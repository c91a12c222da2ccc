"""Researchers' own photos: EXIF-rotated JPEGs are used upright (as viewers show them) against masks drawn on the
upright photo, and images of any aspect ratio are stretched or centre-cropped to the model's square input.

Stored layouts are built here with numpy from the EXIF definitions of orientations 1..8 (not with Pillow), so the
tests check the reader against the standard rather than against itself.
"""

import pathlib

import numpy as np
import pytest
from PIL import Image

import launch
from saev import report
from saev.data import datasets, labels
from saev.data.datasets import ClassFolder, DatasetError, SegFolder, make_dataset

GREY, RED, BLUE = (128, 128, 128), (220, 30, 30), (30, 30, 220)
CLASSES = ("background", "blob", "stripe")

# Stored pixels of an image whose upright form is `u`, for each EXIF orientation: what a camera writes when it
# records the display transform in the tag instead of turning the pixels.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored left-right
    3: lambda u: u[::-1, ::-1],  # rotated 180
    4: lambda u: u[::-1, :],  # mirrored top-bottom
    5: lambda u: u.swapaxes(0, 1),  # mirrored along the main diagonal
    6: lambda u: np.rot90(u, 1),  # shown after a 90 degree clockwise turn
    7: lambda u: u[::-1, ::-1].swapaxes(0, 1),  # mirrored along the anti-diagonal
    8: lambda u: np.rot90(u, -1),  # shown after a 90 degree anticlockwise turn
}


def upright_photo(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric upright image and its mask: a red class-1 blob in the top-left quadrant, a blue class-2 stripe
    along the bottom, grey background (every region several patches wide, so JPEG noise cannot flip a label)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 16 : h // 2 - h // 16, w // 16 : w // 2 - w // 16] = 1
    mask[h - h // 4 :, :] = 2
    image = np.empty((h, w, 3), dtype=np.uint8)
    for c, rgb in enumerate((GREY, RED, BLUE)):
        image[mask == c] = rgb
    return image, mask


def save_jpeg(fpath: pathlib.Path, upright: np.ndarray, orientation: int | None) -> None:
    """`upright` stored in the layout of `orientation`, with that EXIF tag (None: no EXIF at all)."""
    img = Image.fromarray(np.ascontiguousarray(STORED[orientation or 1](upright)))
    if orientation is None:
        img.save(fpath, quality=95)
        return
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(fpath, quality=95, exif=exif)


def make_segfolder(root: pathlib.Path, photos: dict[str, tuple[np.ndarray, np.ndarray, int | None]]) -> pathlib.Path:
    """A segfolder dataset of JPEGs: name -> (upright image, upright mask, EXIF orientation)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for name, (image, mask, orientation) in photos.items():
        save_jpeg(root / "images" / f"{name}.jpg", image, orientation)
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def region_colours(image_HW3: np.ndarray, mask_HW: np.ndarray) -> dict[int, np.ndarray]:
    """Mean colour of each class's pixels."""
    return {c: image_HW3[mask_HW == c].mean(axis=0) for c in np.unique(mask_HW)}


def assert_colours_match_classes(image_HW3: np.ndarray, mask_HW: np.ndarray) -> None:
    colours = region_colours(image_HW3.astype(np.float64), mask_HW)
    for c, expected in enumerate((GREY, RED, BLUE)):
        if c in colours:
            assert np.abs(colours[c] - expected).max() < 20, (c, colours[c], expected)


#####################
# EXIF orientation  #
#####################


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("shape", [(48, 80), (64, 64)], ids=["landscape", "square"])
def test_exif_rotated_jpeg_is_read_upright_against_its_mask(tmp_path, orientation, shape):
    image, mask = upright_photo(*shape)
    ds = make_dataset(SegFolder(root=str(make_segfolder(tmp_path / "data", {"p": (image, mask, orientation)}))))
    sample = ds[0]
    assert (sample.image.height, sample.image.width) == shape
    np.testing.assert_array_equal(sample.mask, mask)
    assert np.abs(np.asarray(sample.image, dtype=np.int64) - image).mean() < 4  # JPEG noise only
    assert_colours_match_classes(np.asarray(sample.image), sample.mask)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_dump_patch_labels_of_an_exif_rotated_jpeg_line_up_with_the_upright_image(tmp_path, orientation):
    image, mask = upright_photo(64, 96)
    ds = make_dataset(SegFolder(root=str(make_segfolder(tmp_path / "data", {"p": (image, mask, orientation)}))))
    batch = datasets.load_batch(ds, [0], 32)  # as the dump loads it
    labels_P = labels.pool_patch_labels(batch.masks, n_side=4, img_size=32, n_classes=3)[0]
    expected_P = labels.pool_patch_labels(labels.resize_nearest(mask, 32), n_side=4, img_size=32, n_classes=3)
    np.testing.assert_array_equal(labels_P, expected_P)
    assert {1, 2} <= set(labels_P.tolist())
    # Every patch's pixels have the colour of its label: the blob patches are red, the stripe patches blue.
    patches_P3 = batch.images[0].reshape(3, 4, 8, 4, 8).mean(axis=(2, 4)).reshape(3, 16).T
    for p, c in enumerate(labels_P):
        if np.all(labels.resize_nearest(mask, 32).reshape(4, 8, 4, 8)[p // 4, :, p % 4, :] == c):  # pure patches
            assert np.abs(patches_P3[p] - (GREY, RED, BLUE)[c]).max() < 30, (p, c, patches_P3[p])


def test_mask_drawn_on_the_stored_pixels_of_a_rotated_jpeg_names_the_exif_orientation(tmp_path):
    image, mask = upright_photo(48, 80)
    data = make_segfolder(tmp_path / "data", {"p": (image, mask, 6)})
    Image.fromarray(np.ascontiguousarray(STORED[6](mask))).save(data / "masks" / "p.png")  # 48 wide, 80 high
    message = (
        r"mask .*p\.png is 48x80 but image .*p\.jpg is 80x48 upright "
        r"\(its EXIF orientation 6 turns the stored 48x80 pixels\).*draw the mask on the upright image$"
    )
    with pytest.raises(DatasetError, match=message):
        make_dataset(SegFolder(root=str(data)))[0]


def test_mask_of_another_size_without_exif_says_nothing_of_orientation(tmp_path):
    image, mask = upright_photo(48, 80)
    data = make_segfolder(tmp_path / "data", {"p": (image, mask, None)})
    Image.fromarray(mask[:, :40]).save(data / "masks" / "p.png")
    with pytest.raises(DatasetError, match=r"is 40x48 but image .*p\.jpg is 80x48$"):
        make_dataset(SegFolder(root=str(data)))[0]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_classfolder_reads_exif_rotated_jpegs_upright(tmp_path, orientation):
    image, _ = upright_photo(48, 80)
    (tmp_path / "cat").mkdir()
    save_jpeg(tmp_path / "cat" / "a.jpg", image, orientation)
    sample = make_dataset(ClassFolder(root=str(tmp_path)))[0]
    assert np.abs(np.asarray(sample.image, dtype=np.int64) - image).mean() < 4


@pytest.mark.parametrize("mode", ["RGBA", "I;16"])
def test_exif_orientation_is_applied_to_pngs_that_are_converted_to_rgb(tmp_path, mode):
    """A converted image (alpha dropped, 16-bit rescaled) is a new image: the file's orientation must still apply."""
    image, _ = upright_photo(48, 80)
    stored = np.ascontiguousarray(STORED[6](image))
    if mode == "RGBA":
        pil = Image.fromarray(np.dstack([stored, np.full(stored.shape[:2], 90, np.uint8)]), "RGBA")
        expected = image
    else:
        pil = Image.fromarray(stored[..., 0].astype(np.uint16) << 8)
        expected = np.repeat(image[..., :1], 3, axis=2)
    exif = Image.Exif()
    exif[0x0112] = 6
    pil.save(tmp_path / "a.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(datasets.read_image(tmp_path / "a.png")), expected)


def test_an_invalid_orientation_value_leaves_the_image_as_stored(tmp_path):
    image, _ = upright_photo(48, 80)
    pil = Image.fromarray(image)
    exif = Image.Exif()
    exif[0x0112] = 9
    pil.save(tmp_path / "a.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(datasets.read_image(tmp_path / "a.png")), image)


###############
# Aspect ratio #
###############


def banded_mask(h: int, w: int) -> np.ndarray:
    """Class ids that change along the long side: class 1 in its first quarter, class 2 in its last quarter, class 0
    between, with a class-1 square in the middle (so the centre square holds classes 0 and 1 only)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    long = max(h, w)
    along = np.arange(long)
    band = np.where(along < long // 4, 1, np.where(along >= long - long // 4, 2, 0)).astype(np.uint8)
    mask[:] = band[None, :] if w >= h else band[:, None]
    side = min(h, w)
    cy, cx = h // 2, w // 2
    mask[cy - side // 4 : cy + side // 4, cx - side // 4 : cx + side // 4] = 1
    return mask


def make_png_segfolder(root: pathlib.Path, items: dict[str, tuple[np.ndarray, np.ndarray]]) -> pathlib.Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for name, (image, mask) in items.items():
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


@pytest.mark.parametrize(
    "shape", [(32, 96), (96, 32), (33, 100), (101, 34)], ids=["3:1", "1:3", "odd-wide", "odd-tall"]
)
def test_crop_labels_equal_the_labels_of_the_centre_square_cut_by_hand(tmp_path, shape):
    h, w = shape
    mask = banded_mask(h, w)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    data = make_png_segfolder(tmp_path / "data", {"a": (image, mask)})
    ds = make_dataset(SegFolder(root=str(data), resize="crop"))
    batch = datasets.load_batch(ds, [0], 32)

    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    mask_cut, image_cut = mask[top : top + side, left : left + side], image[top : top + side, left : left + side]
    pool = {"n_side": 4, "img_size": 32, "n_classes": 3}
    np.testing.assert_array_equal(
        labels.pool_patch_labels(batch.masks[0], **pool), labels.pool_patch_labels(mask_cut, **pool)
    )
    np.testing.assert_array_equal(batch.masks[0], labels.resize_nearest(mask_cut, 32))
    np.testing.assert_array_equal(
        batch.images[0], np.asarray(Image.fromarray(image_cut).resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)
    )
    assert 2 not in labels.pool_patch_labels(batch.masks[0], **pool)  # the far end of the long side is cut away


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)], ids=["3:1", "1:3"])
def test_stretch_keeps_the_whole_image(tmp_path, shape):
    mask = banded_mask(*shape)
    image = np.zeros((*shape, 3), dtype=np.uint8)
    data = make_png_segfolder(tmp_path / "data", {"a": (image, mask)})
    batch = datasets.load_batch(make_dataset(SegFolder(root=str(data))), [0], 32)
    np.testing.assert_array_equal(batch.masks[0], labels.resize_nearest(mask, 32))
    assert {0, 1, 2} == set(labels.pool_patch_labels(batch.masks[0], n_side=4, img_size=32, n_classes=3).tolist())


def test_crop_and_stretch_agree_on_square_images(tmp_path):
    image, mask = upright_photo(64, 64)
    data = make_png_segfolder(tmp_path / "data", {"a": (image, mask)})
    stretch = datasets.load_batch(make_dataset(SegFolder(root=str(data))), [0], 32)
    crop = datasets.load_batch(make_dataset(SegFolder(root=str(data), resize="crop")), [0], 32)
    np.testing.assert_array_equal(stretch.images, crop.images)
    np.testing.assert_array_equal(stretch.masks, crop.masks)


def test_classfolder_crop_takes_the_centre_square(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (30, 90, 3), dtype=np.uint8)
    (tmp_path / "cat").mkdir()
    Image.fromarray(image).save(tmp_path / "cat" / "a.png")
    batch = datasets.load_batch(make_dataset(ClassFolder(root=str(tmp_path), resize="crop")), [0], 30)
    np.testing.assert_array_equal(batch.images[0], image[:, 30:60].transpose(2, 0, 1))


def test_crop_box_is_the_centred_square():
    assert datasets.crop_box(100, 33) == (33, 0, 66, 33)
    assert datasets.crop_box(34, 101) == (0, 33, 34, 67)
    assert datasets.crop_box(20, 20) == (0, 0, 20, 20)


def test_resize_mode_is_part_of_the_dump_key(tmp_path):
    """It changes the activations and labels: a normal (hashed) field, so the two modes never share a dump."""
    from saev import artifacts

    stretch, crop = SegFolder(root=str(tmp_path)), SegFolder(root=str(tmp_path), resize="crop")
    assert artifacts.hashed_params(stretch) != artifacts.hashed_params(crop)
    classes_stretch, classes_crop = ClassFolder(root="x"), ClassFolder(root="x", resize="crop")
    assert artifacts.hashed_params(classes_stretch) != artifacts.hashed_params(classes_crop)


def test_an_unknown_resize_mode_is_a_config_error_naming_the_choices(tiny_config, capsys):
    text = tiny_config.read_text().replace('kind = "synthetic"', 'kind = "segfolder"\nroot = "x"\nresize = "pad"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("n_imgs", "img_size", "seed = 1")))
    tiny_config.write_text(text)
    assert launch.main(launch.Args(config=tiny_config)) == 2
    assert "key 'dump.data.resize' must be one of 'stretch', 'crop', got 'pad'" in capsys.readouterr().err


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_an_exif_rotated_tiff_is_turned_upright_once(tmp_path, compression):
    """Pillow turns TIFFs upright as it loads them: the reader must not turn them a second time."""
    image, _ = upright_photo(48, 80)
    stored = Image.fromarray(np.ascontiguousarray(STORED[6](image)))
    stored.save(tmp_path / "a.tif", tiffinfo={0x0112: 6}, compression=compression)
    np.testing.assert_array_equal(np.asarray(datasets.read_image(tmp_path / "a.tif")), image)


##############
# End to end #
##############


def photo_set(root: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A segfolder dataset of generated "photos" (the upright image each should read as, and the mask drawn on it):
    JPEGs stored in the layout of every EXIF orientation, an RGBA PNG, a grayscale PNG, and PNGs of aspect ratios
    1:3 to 3:1."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    expected = {}
    sizes = [(60, 90), (90, 60), (64, 64), (48, 96)]
    for orientation in range(1, 9):
        image, mask = upright_photo(*sizes[orientation % len(sizes)])
        save_jpeg(root / "images" / f"exif{orientation}.jpg", image, orientation)
        expected[f"exif{orientation}"] = (image, mask)
    image, mask = upright_photo(70, 70)
    Image.fromarray(np.dstack([image, np.full((70, 70), 128, np.uint8)]), "RGBA").save(root / "images" / "rgba.png")
    expected["rgba"] = (image, mask)
    image, mask = upright_photo(50, 100)
    Image.fromarray(image[..., 0]).save(root / "images" / "gray.png")  # mode L
    expected["gray"] = (np.repeat(image[..., :1], 3, axis=2), mask)
    rng = np.random.default_rng(0)
    for h, w in [(30, 90), (40, 80), (60, 60), (80, 40), (90, 30)]:
        mask = banded_mask(h, w)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[mask == 1] = RED
        Image.fromarray(image).save(root / "images" / f"crop{h}x{w}.png")
        expected[f"crop{h}x{w}"] = (image, mask)
    for name, (_, mask) in expected.items():
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return expected


def input_of(array: np.ndarray, size: int, resize: str, nearest: bool) -> np.ndarray:
    """What the model should see of an upright image (or mask), the crop cut by hand."""
    if resize == "crop":
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        array = array[top : top + side, left : left + side]
    if nearest:
        return labels.resize_nearest(array, size)
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_own_photos_run_end_to_end_with_upright_labels_and_thumbnails(tiny_config, monkeypatch, resize):
    from saev import vit
    from saev.data.shards import Shards

    data = tiny_config.parent / "data"
    expected = photo_set(data)
    text = tiny_config.read_text()
    start, end = text.index("[dump.data]"), text.index("[dump.vit]")
    data_section = f'[dump.data]\nkind = "segfolder"\nroot = "{data}"\nresize = "{resize}"\n\n'
    text = text[:start] + data_section + text[end:]
    tiny_config.write_text(text.replace("n_keep = 2000", "n_keep = 300").replace("n_heldout = 500", "n_heldout = 100"))
    reports: list[report.ReportData] = []
    write_report = report.write_report

    def capture(dpath, data):
        reports.append(data)
        return write_report(dpath, data)

    monkeypatch.setattr(report, "write_report", capture)
    assert launch.main(launch.Args(config=tiny_config)) == 0

    size, n_side = vit.get_patch_grid("saev-tiny-vit")
    ds = make_dataset(SegFolder(root=str(data), resize=resize))
    names = [p.stem for p in ds.img_fpaths]
    (dump_dpath,) = (tiny_config.parent / "runs" / "dump").iterdir()
    labels_NP = np.asarray(Shards(dump_dpath).labels)
    for i, name in enumerate(names):
        mask = input_of(expected[name][1], size, resize, nearest=True)
        want_P = labels.pool_patch_labels(mask, n_side=n_side, img_size=size, n_classes=3)
        np.testing.assert_array_equal(labels_NP[i], want_P, err_msg=name)

    # Thumbnails are the model's input: upright, cropped as dumped.
    (data_,) = reports
    tops = [top for result in data_.classes for top in result.top]
    assert {"exif3", "exif6", "exif7"} & {top.title for top in tops}  # turned photos among them
    for top in tops:
        i = names.index(top.title)
        shown_3SS = np.asarray(top.image).transpose(2, 0, 1)
        np.testing.assert_array_equal(shown_3SS, datasets.load_batch(ds, [i], size).images[0])
        want_3SS = input_of(expected[top.title][0], size, resize, nearest=False).astype(np.int64)
        assert np.abs(shown_3SS - want_3SS).mean() < 6, top.title  # JPEG noise only
