"""Segmentation datasets: the seeded synthetic demo and real image/mask folders, with errors that name the file."""

import concurrent.futures
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from saev.data import datasets, synthetic
from saev.data.datasets import DatasetError, SegFolder, Synthetic, make_dataset
from saev.data.labels import pool_patch_labels, resize_nearest
from tests.helpers import make_folder_dataset


def same_sample(a: datasets.Sample, b: datasets.Sample) -> bool:
    return np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask)


#############
# Synthetic #
#############


def test_synthetic_sample_is_an_rgb_image_with_an_int64_mask_of_the_same_size():
    sample = make_dataset(Synthetic(n_imgs=3, img_size=48))[2]
    assert sample.image.mode == "RGB" and sample.image.size == (48, 48)
    assert sample.mask.dtype == np.int64 and sample.mask.shape == (48, 48)
    assert sample.name == "synthetic-000002"


def test_synthetic_image_regenerated_alone_equals_the_one_generated_in_sequence():
    in_sequence = [make_dataset(Synthetic(n_imgs=8, seed=3))[i] for i in range(8)]
    alone = make_dataset(Synthetic(n_imgs=8, seed=3))[5]
    assert same_sample(alone, in_sequence[5])


def test_synthetic_image_depends_only_on_seed_and_index_not_on_dataset_size():
    assert same_sample(make_dataset(Synthetic(n_imgs=6, seed=1))[4], make_dataset(Synthetic(n_imgs=500, seed=1))[4])


def test_synthetic_other_seed_gives_other_images():
    a, b = make_dataset(Synthetic(n_imgs=4, seed=0)), make_dataset(Synthetic(n_imgs=4, seed=1))
    assert not any(same_sample(a[i], b[i]) for i in range(4))


def test_synthetic_every_class_appears_within_50_images():
    ds = make_dataset(Synthetic(n_imgs=50))
    seen = set().union(*(np.unique(ds[i].mask).tolist() for i in range(len(ds))))
    assert seen == set(range(len(ds.class_names)))
    assert ds.class_names == ("background", *datasets.SHAPES) and ds.background == 0


def test_synthetic_masks_align_with_the_coloured_pixels():
    """Shape pixels carry their class's colour; background pixels are greyish (shape colours are saturated)."""
    ds = make_dataset(Synthetic(n_imgs=20, seed=7))
    colours_K3 = np.array([synthetic._SHAPE_RGB[kind] for kind in datasets.SHAPES], dtype=np.float64)
    for i in range(len(ds)):
        sample = ds[i]
        rgb_HW3 = np.asarray(sample.image).astype(np.float64)
        fg = sample.mask > 0
        # Each shape pixel is within 40 (per channel) of its nominal colour and nearer to it than to any other.
        dist_NK = np.abs(rgb_HW3[fg][:, None, :] - colours_K3[None]).max(axis=2)
        assert (dist_NK[np.arange(fg.sum()), sample.mask[fg] - 1] <= 40).all()
        np.testing.assert_array_equal(dist_NK.argmin(axis=1), sample.mask[fg] - 1)
        spread_HW = rgb_HW3.max(axis=2) - rgb_HW3.min(axis=2)
        assert (spread_HW[~fg] < 80).all() and (spread_HW[fg] > 80).all()


def test_synthetic_batch_rendering_equals_rendering_each_image_alone():
    cfg = Synthetic(n_imgs=40, seed=5)
    indices = [7, 3, 39, 0, 12, 25, 3, 18]  # any order, repeats allowed
    images_B3SS, masks_BSS = datasets.render_synthetic(cfg, indices)
    assert images_B3SS.shape == (len(indices), 3, 64, 64) and masks_BSS.shape == (len(indices), 64, 64)
    for b, i in enumerate(indices):
        image_13SS, mask_1SS = datasets.render_synthetic(cfg, [i])
        np.testing.assert_array_equal(images_B3SS[b], image_13SS[0])
        np.testing.assert_array_equal(masks_BSS[b], mask_1SS[0])


def test_synthetic_item_is_its_batch_of_one_rendering():
    cfg = Synthetic(n_imgs=10, img_size=32, seed=2)
    images_B3SS, masks_BSS = datasets.render_synthetic(cfg, range(10))
    sample = make_dataset(cfg)[6]
    np.testing.assert_array_equal(np.asarray(sample.image), images_B3SS[6].transpose(1, 2, 0))
    np.testing.assert_array_equal(sample.mask, masks_BSS[6])


def test_synthetic_images_hold_from_one_to_max_shapes_shapes():
    ds = make_dataset(Synthetic(n_imgs=60, max_shapes=3))
    # Distinct shape classes per image (two shapes of one kind, or a hidden one, count once): 1 to 3 all occur.
    n_kinds = {len(np.unique(ds[i].mask)) - 1 for i in range(len(ds))}
    assert n_kinds == {1, 2, 3}


def test_synthetic_seed_must_be_a_non_negative_64_bit_integer():
    with pytest.raises(ValueError, match="data.seed"):
        Synthetic(seed=-1)


def test_synthetic_index_out_of_range_is_an_index_error():
    ds = make_dataset(Synthetic(n_imgs=3))
    with pytest.raises(IndexError, match=r"image 3 out of range \[0, 3\)"):
        ds[3]


@pytest.mark.parametrize(
    "kwargs, field", [({"n_imgs": 0}, "n_imgs"), ({"img_size": 8}, "img_size"), ({"max_shapes": 0}, "max_shapes")]
)
def test_synthetic_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"data.{field}"):
        Synthetic(**kwargs)


##########
# Folder #
##########

CLASSES = ("background", "cat", "dog")


def write_png(fpath: pathlib.Path, array: np.ndarray, mode: str | None = None) -> None:
    fpath.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(fpath)


def make_folder(root: pathlib.Path, n: int = 3, h: int = 12, w: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A real dataset folder: n RGB PNGs, same-stem L-mode PNG masks with ids in [0, 3), and classes.txt."""
    rng = np.random.default_rng(0)
    written = {}
    for i in range(n):
        stem = f"img{i:02d}"
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, len(CLASSES), size=(h, w), dtype=np.uint8)
        write_png(root / "images" / f"{stem}.png", image)
        write_png(root / "masks" / f"{stem}.png", mask)
        written[stem] = (image, mask)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    return written


def test_folder_loads_images_masks_and_class_names(tmp_path):
    written = make_folder(tmp_path)
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    assert len(ds) == 3 and ds.class_names == CLASSES and ds.background == 0
    for i, (stem, (image, mask)) in enumerate(sorted(written.items())):
        sample = ds[i]
        assert sample.name == stem
        np.testing.assert_array_equal(np.asarray(sample.image), image)
        np.testing.assert_array_equal(sample.mask, mask.astype(np.int64))
        assert sample.mask.dtype == np.int64


def test_folder_palette_mask_gives_its_indices(tmp_path):
    make_folder(tmp_path, n=1)
    mask = np.array([[0, 1, 2, 1]] * 3, dtype=np.uint8)
    pal = Image.fromarray(mask, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    write_png(tmp_path / "images" / "img00.png", np.zeros((3, 4, 3), np.uint8))
    pal.save(tmp_path / "masks" / "img00.png")
    np.testing.assert_array_equal(make_dataset(SegFolder(root=str(tmp_path)))[0].mask, mask)


def test_folder_mask_ignore_pixels_become_minus_one(tmp_path):
    make_folder(tmp_path, n=1)
    mask = np.array([[0, 255, 2], [255, 1, 0]], dtype=np.uint8)
    write_png(tmp_path / "images" / "img00.png", np.zeros((2, 3, 3), np.uint8))
    write_png(tmp_path / "masks" / "img00.png", mask)
    got = make_dataset(SegFolder(root=str(tmp_path), mask_ignore=255))[0].mask
    np.testing.assert_array_equal(got, [[0, -1, 2], [-1, 1, 0]])


def test_folder_missing_dataset_directory_is_named(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(f"dataset directory not found: {root}")):
        make_dataset(SegFolder(root=str(root)))


def test_folder_missing_masks_directory_is_named(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "labels"))):
        make_dataset(SegFolder(root=str(tmp_path), masks="labels"))


def test_folder_missing_classes_file_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"class-names file not found: {tmp_path / 'classes.txt'}")):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_folder_empty_classes_file_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=re.escape(f"class-names file is empty: {tmp_path / 'classes.txt'}")):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_folder_background_outside_the_classes_is_an_error(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DatasetError, match="background class id 3 is outside the 3 classes"):
        make_dataset(SegFolder(root=str(tmp_path), background=3))


def test_folder_without_images_is_an_error_naming_the_directory(tmp_path):
    make_folder(tmp_path, n=0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=re.escape(f"in {tmp_path / 'images'}")):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_folder_image_without_a_mask_names_the_expected_mask(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks" / "img01.png").unlink()
    expected = f"1 image(s) have no mask; expected e.g. {tmp_path / 'masks' / 'img01.png'}"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_folder_two_images_with_one_stem_is_an_error(tmp_path):
    make_folder(tmp_path, n=1)
    Image.new("RGB", (20, 12)).save(tmp_path / "images" / "img00.jpg")
    with pytest.raises(DatasetError, match=re.escape(f"share the mask {tmp_path / 'masks' / 'img00.png'}")):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_folder_mask_of_another_size_names_both_files(tmp_path):
    make_folder(tmp_path, h=12, w=20)
    write_png(tmp_path / "masks" / "img02.png", np.zeros((12, 19), np.uint8))
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    expected = f"mask {tmp_path / 'masks' / 'img02.png'} is 19x12 but image"
    with pytest.raises(DatasetError, match=re.escape(expected)) as info:
        ds[2]
    assert str(tmp_path / "images" / "img02.png") in str(info.value)


def test_folder_mask_class_id_out_of_range_names_the_mask(tmp_path):
    make_folder(tmp_path)
    mask = np.zeros((12, 20), np.uint8)
    mask[3, 4] = 7
    write_png(tmp_path / "masks" / "img01.png", mask)
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    expected = f"mask {tmp_path / 'masks' / 'img01.png'} has class id 7, outside the 3 classes"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        ds[1]


def test_folder_255_is_an_out_of_range_id_unless_it_is_mask_ignore(tmp_path):
    make_folder(tmp_path)
    mask = np.full((12, 20), 255, np.uint8)
    write_png(tmp_path / "masks" / "img01.png", mask)
    with pytest.raises(DatasetError, match="has class id 255"):
        make_dataset(SegFolder(root=str(tmp_path)))[1]
    assert (make_dataset(SegFolder(root=str(tmp_path), mask_ignore=255))[1].mask == -1).all()


def test_folder_rgb_mask_is_an_error_naming_the_mask(tmp_path):
    make_folder(tmp_path)
    write_png(tmp_path / "masks" / "img00.png", np.zeros((12, 20, 3), np.uint8))
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    with pytest.raises(DatasetError, match=re.escape(f"mask {tmp_path / 'masks' / 'img00.png'} has mode RGB")):
        ds[0]


def test_folder_truncated_mask_is_an_error_naming_the_mask(tmp_path):
    make_folder(tmp_path, h=64, w=64)
    fpath = tmp_path / "masks" / "img00.png"
    fpath.write_bytes(fpath.read_bytes()[: fpath.stat().st_size // 2])
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    with pytest.raises(DatasetError, match=re.escape(f"cannot read mask {fpath}")):
        ds[0]


def test_class_folder_labels_every_pixel_with_the_image_class(tmp_path):
    from PIL import Image

    for name, n in (("cat", 2), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = datasets.make_dataset(datasets.ClassFolder(root=str(tmp_path)))
    assert ds.class_names == ("cat", "dog") and len(ds) == 5 and ds.background is None
    sample = ds[3]
    assert sample.name == "dog/1" and sample.mask.shape == (16, 20) and (sample.mask == 1).all()


def test_class_folder_errors_name_the_directory(tmp_path):
    with pytest.raises(datasets.DatasetError, match="no class subdirectories in"):
        datasets.make_dataset(datasets.ClassFolder(root=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetError, match="no images .* in the class subdirectories"):
        datasets.make_dataset(datasets.ClassFolder(root=str(tmp_path)))


#########
# Batch #
#########


def test_load_batch_of_the_synthetic_dataset_at_its_size_equals_its_items():
    ds = make_dataset(Synthetic(n_imgs=12, seed=4))
    batch = datasets.load_batch(ds, range(2, 9), 64)
    for b, i in enumerate(range(2, 9)):
        np.testing.assert_array_equal(batch.images[b], np.asarray(ds[i].image).transpose(2, 0, 1))
        np.testing.assert_array_equal(batch.masks[b], ds[i].mask)


def test_load_batch_at_another_size_resizes_each_item_like_the_model_does(tmp_path):
    """Bicubic images without a crop (as `Vit.preprocess`), nearest-neighbour masks (as the labels); threads or not."""
    make_folder(tmp_path, n=3, h=24, w=40)
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        batch = datasets.load_batch(ds, [2, 0], 32, pool)
    alone = datasets.load_batch(ds, [2, 0], 32)
    np.testing.assert_array_equal(batch.images, alone.images)
    np.testing.assert_array_equal(batch.masks, alone.masks)
    for b, i in enumerate([2, 0]):
        expected = np.asarray(ds[i].image.resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)
        np.testing.assert_array_equal(batch.images[b], expected)
        np.testing.assert_array_equal(batch.masks[b], resize_nearest(ds[i].mask, 32))
    synthetic = datasets.load_batch(make_dataset(Synthetic(n_imgs=2)), [1], 48)
    assert synthetic.images.shape == (1, 3, 48, 48) and synthetic.masks.shape == (1, 48, 48)


##########################
# Image modes and depths #
##########################


def make_one(root: pathlib.Path, image: Image.Image, fname: str = "img00.png", h: int = 3, w: int = 5) -> SegFolder:
    """A one-image segmentation folder holding `image` (as `fname`) with an all-zero mask."""
    make_folder(root, n=0)
    (root / "images").mkdir(exist_ok=True)
    image.save(root / "images" / fname)
    write_png(root / "masks" / f"{pathlib.Path(fname).stem}.png", np.zeros((h, w), np.uint8))
    return SegFolder(root=str(root))


GRAY16 = np.array([[0, 255, 256, 32768, 65535]] * 3, dtype=np.uint16)
GRAY16_AS_8 = np.array([[0, 0, 1, 128, 255]] * 3, dtype=np.uint8)


@pytest.mark.parametrize(
    "array, fname",
    [(GRAY16, "img00.png"), (GRAY16, "img00.tif"), (GRAY16.astype(">u2"), "img00.tif")],
    ids=["png-I;16", "tiff-I;16", "tiff-I;16B"],
)
def test_16_bit_grayscale_image_is_rescaled_by_its_full_range_not_clipped(tmp_path, array, fname):
    cfg = make_one(tmp_path, Image.fromarray(array), fname)
    sample = make_dataset(cfg)[0]
    assert sample.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(sample.image), np.repeat(GRAY16_AS_8[..., None], 3, axis=2))


def test_32_bit_signed_tiff_is_rescaled_by_the_int32_range(tmp_path):
    array = np.array([[-(2**31), -1, 0, 2**24, 2**31 - 1]] * 3, dtype=np.int32)
    cfg = make_one(tmp_path, Image.fromarray(array), "img00.tif")
    got = np.asarray(make_dataset(cfg)[0].image)[..., 0]
    np.testing.assert_array_equal(got, [[0, 127, 128, 129, 255]] * 3)


def test_32_bit_unsigned_tiff_is_rescaled_by_the_uint32_range(tmp_path):
    """Pillow writes int32 TIFFs only; its SampleFormat tag (339, SHORT, one value) is patched to 1, unsigned."""
    cfg = make_one(tmp_path, Image.fromarray(np.array([[0, 2**24, -1] * 5] * 3, dtype=np.int32)), "img00.tif", 3, 15)
    fpath = tmp_path / "images" / "img00.tif"
    signed, unsigned = (bytes.fromhex("5301030001000000") + bytes([v, 0]) for v in (2, 1))
    assert fpath.read_bytes().count(signed) == 1
    fpath.write_bytes(fpath.read_bytes().replace(signed, unsigned))
    got = np.asarray(make_dataset(cfg)[0].image)[..., 0]
    np.testing.assert_array_equal(got, [[0, 1, 255] * 5] * 3)  # 0xFFFFFFFF is white, not -1


def test_to_rgb_of_an_in_memory_mode_i_image_takes_it_as_int32():
    image = Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(datasets.to_rgb(image))[..., 1], [[0, 128, 255]])


def test_load_batch_of_a_16_bit_image_is_not_clipped(tmp_path):
    cfg = make_one(tmp_path, Image.fromarray(np.full((3, 5), 0x4000, np.uint16)))
    batch = datasets.load_batch(make_dataset(cfg), [0], 8)
    assert (batch.images == 0x40).all()
    resized = datasets.resize_image(Image.fromarray(np.full((3, 5), 0x4000, np.uint16)), 8)
    assert (resized == 0x40).all()


def test_class_folder_16_bit_image_is_rescaled(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(GRAY16).save(tmp_path / "cat" / "a.png")
    image = make_dataset(datasets.ClassFolder(root=str(tmp_path)))[0].image
    np.testing.assert_array_equal(np.asarray(image)[..., 2], GRAY16_AS_8)


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[0, 64, 128, 192, 255]] * 3
    cfg = make_one(tmp_path, Image.fromarray(rgba, mode="RGBA"))
    assert (np.asarray(make_dataset(cfg)[0].image) == (200, 100, 50)).all()
    la = Image.fromarray(np.stack([np.full((3, 5), 90, np.uint8), rgba[..., 3]], axis=2), mode="LA")
    la.save(tmp_path / "images" / "img00.png")
    assert (np.asarray(make_dataset(cfg)[0].image) == 90).all()


@pytest.mark.parametrize(
    "mode, fname", [("1", "png"), ("P", "png"), ("CMYK", "tif"), ("CMYK", "jpg"), ("YCbCr", "tif")]
)
def test_other_modes_convert_as_pillow_converts_them(tmp_path, mode, fname):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)).convert(mode)
    cfg = make_one(tmp_path, image, f"img00.{fname}")
    got = make_dataset(cfg)[0].image
    assert got.mode == "RGB"
    expected = Image.open(tmp_path / "images" / f"img00.{fname}").convert("RGB")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("mode, fname", [("F", "tif"), ("LAB", "tif")])
def test_float_and_lab_images_are_refused_naming_the_file_and_mode(tmp_path, mode, fname):
    image = Image.fromarray(np.zeros((3, 5), np.float32)) if mode == "F" else Image.new("LAB", (5, 3))
    cfg = make_one(tmp_path, image, f"img00.{fname}")
    expected = f"image {tmp_path / 'images' / f'img00.{fname}'} has mode {mode}"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        make_dataset(cfg)[0]


def test_16_bit_mask_keeps_class_ids_above_255(tmp_path):
    make_folder(tmp_path, n=1, h=3, w=5)
    (tmp_path / "classes.txt").write_text("\n".join(f"class{i}" for i in range(301)) + "\n")
    mask = np.zeros((3, 5), np.uint16)
    mask[1, 2], mask[2, 4] = 300, 256
    write_png(tmp_path / "masks" / "img00.png", mask)
    assert Image.open(tmp_path / "masks" / "img00.png").mode == "I;16"
    got = make_dataset(SegFolder(root=str(tmp_path)))[0].mask
    np.testing.assert_array_equal(got, mask.astype(np.int64))
    mask[0, 0] = 301
    write_png(tmp_path / "masks" / "img00.png", mask)
    with pytest.raises(DatasetError, match="has class id 301, outside the 301 classes"):
        make_dataset(SegFolder(root=str(tmp_path)))[0]


#######################
# Decompression bombs #
#######################


def test_image_over_pillows_limit_is_a_dataset_error_saying_how_to_allow_it(tmp_path, monkeypatch):
    make_folder(tmp_path, n=1, h=12, w=20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above twice this
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    expected = f"image {tmp_path / 'images' / 'img00.png'} is 20x12 = 240 pixels, over the limit of 200"
    with pytest.raises(DatasetError, match=re.escape(expected)) as info:
        ds[0]
    assert "set max_image_pixels = 240 (or more)" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_max_image_pixels_raises_or_lowers_the_limit_and_leaves_pillows_alone(tmp_path, monkeypatch):
    make_folder(tmp_path, n=1, h=12, w=20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert make_dataset(SegFolder(root=str(tmp_path), max_image_pixels=240))[0].image.size == (20, 12)
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    with pytest.raises(DatasetError, match="240 pixels, over the limit of 239"):
        make_dataset(SegFolder(root=str(tmp_path), max_image_pixels=239))[0]
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    Image.new("RGB", (20, 12)).save(tmp_path / "classes" / "cat" / "a.png")
    with pytest.raises(DatasetError, match=re.escape(f"image {tmp_path / 'classes' / 'cat' / 'a.png'} is 20x12")):
        make_dataset(datasets.ClassFolder(root=str(tmp_path / "classes"), max_image_pixels=239))[0]


def test_max_image_pixels_must_be_positive_and_is_not_hashed(tmp_path):
    from saev import artifacts

    with pytest.raises(ValueError, match="data.max_image_pixels must be positive, got 0"):
        SegFolder(root=str(tmp_path), max_image_pixels=0)
    with pytest.raises(ValueError, match="data.max_image_pixels"):
        datasets.ClassFolder(root=str(tmp_path), max_image_pixels=-1)
    plain, raised = SegFolder(root="x"), SegFolder(root="x", max_image_pixels=10**10)
    assert artifacts.hashed_params(plain) == artifacts.hashed_params(raised)


###########################
# Corrupt files, hostile  #
###########################


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_an_error_naming_the_image(tmp_path, suffix):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cfg = make_one(tmp_path, image, f"img00{suffix}", 64, 64)
    fpath = tmp_path / "images" / f"img00{suffix}"
    fpath.write_bytes(fpath.read_bytes()[: fpath.stat().st_size // 2])
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {fpath}")):
        make_dataset(cfg)[0]


def test_non_image_file_with_an_image_suffix_is_an_error_naming_it(tmp_path):
    make_folder(tmp_path, n=2)
    (tmp_path / "images" / "img01.png").write_text("not an image")
    (tmp_path / "masks" / "img00.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    ds = make_dataset(SegFolder(root=str(tmp_path)))
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {tmp_path / 'images' / 'img01.png'}")):
        ds[1]
    with pytest.raises(DatasetError, match=re.escape(f"cannot read mask {tmp_path / 'masks' / 'img00.png'}")):
        ds[0]
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {tmp_path / 'classes' / 'cat' / 'a.jpg'}")):
        make_dataset(datasets.ClassFolder(root=str(tmp_path / "classes")))[0]


def test_mask_that_is_a_directory_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks" / "img01.png").unlink()
    (tmp_path / "masks" / "img01.png").mkdir()
    with pytest.raises(DatasetError, match=re.escape(f"mask {tmp_path / 'masks' / 'img01.png'} is a directory")):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_broken_link_among_the_images_is_named_and_a_directory_is_skipped(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images" / "album.png").mkdir()
    assert len(make_dataset(SegFolder(root=str(tmp_path)))) == 3
    (tmp_path / "images" / "img09.png").symlink_to(tmp_path / "nowhere.png")
    expected = f"image {tmp_path / 'images' / 'img09.png'} is not a regular file"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_unreadable_directory_is_an_error_naming_it(tmp_path, monkeypatch):
    make_folder(tmp_path)
    denied = tmp_path / "images"
    iterdir = pathlib.Path.iterdir

    def guarded(self):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", guarded)  # chmod cannot stop root, who runs some test machines
    with pytest.raises(DatasetError, match=re.escape(f"cannot list directory {denied}: Permission denied")):
        make_dataset(SegFolder(root=str(tmp_path)))
    with pytest.raises(DatasetError, match=re.escape(f"cannot list directory {denied}")):
        make_dataset(datasets.ClassFolder(root=str(tmp_path)))


###############
# Class names #
###############


def test_class_names_are_stripped_and_may_start_with_a_byte_order_mark(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_bytes("\ufeff background \r\n\tcat\r\ndog  \r\n\r\n  \n".encode())
    assert make_dataset(SegFolder(root=str(tmp_path))).class_names == CLASSES


def test_class_names_file_that_is_not_utf8_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_bytes("background\ncat\nchien d\u00e9\n".encode("latin-1"))
    expected = f"class-names file {tmp_path / 'classes.txt'} is not UTF-8: byte 22 (line 3)"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_blank_class_name_between_names_is_an_error_naming_the_line(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("background\n\ncat\ndog\n")
    expected = f"{tmp_path / 'classes.txt'} has a blank line 2 between class names"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        make_dataset(SegFolder(root=str(tmp_path)))


def test_duplicate_class_name_names_both_lines(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n cat\n")
    expected = f"{tmp_path / 'classes.txt'} names class 'cat' twice: lines 2 and 4"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        make_dataset(SegFolder(root=str(tmp_path)))


###############
# Fingerprint #
###############


def test_fingerprint_lists_every_file_read_and_is_stable(tmp_path):
    make_folder(tmp_path, n=2)
    cfg = SegFolder(root=str(tmp_path))
    fp = datasets.fingerprint(cfg)
    images_and_masks = {f"{d}/img0{i}.png" for d in ("images", "masks") for i in range(2)}
    assert set(fp.files) == {"classes.txt", *images_and_masks}
    st = (tmp_path / "masks" / "img01.png").stat()
    assert fp.files["masks/img01.png"] == [st.st_size, st.st_mtime_ns]
    assert re.fullmatch(r"[0-9a-f]{16}", fp.digest)
    assert datasets.fingerprint(cfg) == fp == make_dataset(cfg).fingerprint()
    assert fp.changed(fp.files) == []


def test_fingerprint_changes_when_an_image_is_edited_in_place(tmp_path):
    make_folder(tmp_path, n=2)
    cfg = SegFolder(root=str(tmp_path))
    before = datasets.fingerprint(cfg)
    fpath = tmp_path / "images" / "img01.png"
    st = fpath.stat()
    fpath.write_bytes(fpath.read_bytes())  # rewritten in place, same size: only the modification time moves
    os.utime(fpath, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = datasets.fingerprint(cfg)
    assert after.digest != before.digest
    assert after.changed(before.files) == ["images/img01.png"]


@pytest.mark.parametrize("change", ["rename", "add", "remove"])
def test_fingerprint_changes_when_a_file_is_renamed_added_or_removed(tmp_path, change):
    make_folder(tmp_path, n=3)
    cfg = SegFolder(root=str(tmp_path))
    before = datasets.fingerprint(cfg)
    if change == "rename":
        (tmp_path / "images" / "img02.png").rename(tmp_path / "images" / "img09.png")
        (tmp_path / "masks" / "img02.png").rename(tmp_path / "masks" / "img09.png")
        expected = ["images/img02.png", "images/img09.png", "masks/img02.png", "masks/img09.png"]
    elif change == "add":
        write_png(tmp_path / "images" / "img03.jpg", np.zeros((12, 20, 3), np.uint8))
        write_png(tmp_path / "masks" / "img03.png", np.zeros((12, 20), np.uint8))
        expected = ["images/img03.jpg", "masks/img03.png"]
    else:
        (tmp_path / "images" / "img00.png").unlink()
        (tmp_path / "masks" / "img00.png").unlink()
        expected = ["images/img00.png", "masks/img00.png"]
    after = datasets.fingerprint(cfg)
    assert after.digest != before.digest and after.changed(before.files) == expected


def test_fingerprint_sees_class_names_edited_with_the_same_size_and_time(tmp_path):
    make_folder(tmp_path)
    cfg = SegFolder(root=str(tmp_path))
    before = datasets.fingerprint(cfg)
    fpath = tmp_path / "classes.txt"
    st = fpath.stat()
    fpath.write_text(fpath.read_text().replace("cat", "cow"))
    os.utime(fpath, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = datasets.fingerprint(cfg)
    assert after.files == before.files and after.digest != before.digest


def test_fingerprint_ignores_files_the_dataset_does_not_read(tmp_path):
    make_folder(tmp_path)
    cfg = SegFolder(root=str(tmp_path))
    before = datasets.fingerprint(cfg)
    (tmp_path / "images" / "notes.txt").write_text("not read")
    (tmp_path / "README").write_text("not read")
    assert datasets.fingerprint(cfg) == before


def test_class_folder_fingerprint_sees_files_and_empty_classes(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "0.png")
    cfg = datasets.ClassFolder(root=str(tmp_path))
    before = datasets.fingerprint(cfg)
    assert set(before.files) == {"cat/0.png", "dog/0.png"} and datasets.fingerprint(cfg) == before
    (tmp_path / "eel").mkdir()  # a new class, no file
    with_class = datasets.fingerprint(cfg)
    assert with_class.digest != before.digest and with_class.files == before.files
    Image.new("RGB", (4, 4)).save(tmp_path / "dog" / "1.png")
    assert datasets.fingerprint(cfg).changed(with_class.files) == ["dog/1.png"]


def test_synthetic_fingerprint_is_its_config_alone():
    fp = datasets.fingerprint(Synthetic(n_imgs=8))
    assert fp.files == {} and fp == datasets.fingerprint(Synthetic(n_imgs=8))
    assert fp.digest != datasets.fingerprint(Synthetic(n_imgs=8, seed=1)).digest
    assert fp.digest != datasets.fingerprint(Synthetic(n_imgs=9)).digest


@pytest.mark.parametrize("mask_ignore", [None, 0])
def test_class_zero_is_kept_as_a_class_or_ignored_as_asked(tmp_path, mask_ignore):
    """ADE20K's "other" (id 0): a class like any other unless mask_ignore says its pixels are unlabelled."""
    root = make_folder_dataset(tmp_path / "data", n_imgs=2)
    dataset = datasets.make_dataset(datasets.SegFolder(root=str(root), mask_ignore=mask_ignore))
    batch = datasets.load_batch(dataset, [0, 1], 64)
    labels_BP = pool_patch_labels(batch.masks, n_side=8, img_size=64, n_classes=3, ignore=255)
    corner = labels_BP[:, 0]  # the mask's corner is class 0 everywhere
    assert (corner == (0 if mask_ignore is None else 255)).all()
    assert (labels_BP == 1).any()  # the other classes are labelled either way


def test_unlabelled_image_folder_walks_subdirectories_once(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("b", "a/x", ".hidden"):
        (tmp_path / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / sub / "0.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a link back up the tree is walked once
    dataset = datasets.make_dataset(datasets.ImageFolder(root=str(tmp_path)))
    assert [dataset[i].name for i in range(len(dataset))] == ["a/x/0", "b/0"]
    assert dataset.class_names == () and (dataset[0].mask == -1).all()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(datasets.DatasetError, match="no images"):
        datasets.make_dataset(datasets.ImageFolder(root=str(empty)))
