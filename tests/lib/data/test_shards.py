"""Activation shards (saev's sharded-activation protocol v1, shared/seeds/001-saev-v1-source.txt, data/protocol.md).

The writer and reader are checked against each other, and against a reader written from the protocol text alone.
"""

import dataclasses
import hashlib
import json
import pathlib
import re
import tempfile
import typing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saev import atomic, checksums
from saev.data.shards import Metadata, ShardError, Shards, ShardWriter


def make_md(n_imgs=7, n_patches=4, cls_token=True, layers=(1, 3), d_vit=3, budget=None, **kwargs) -> Metadata:
    """Metadata; by default 2 images per shard (budget of 2.5 images), so 7 images make shards of 2, 2, 2, 1."""
    t = n_patches + int(cls_token)
    if budget is None:
        budget = 2 * t * len(layers) + t * len(layers) // 2
    return Metadata(
        vit_family="clip",
        vit_ckpt="saev-tiny-vit:random-init-seed-0",
        layers=layers,
        n_patches_per_img=n_patches,
        cls_token=cls_token,
        d_vit=d_vit,
        n_imgs=n_imgs,
        max_patches_per_shard=budget,
        data={"__class__": "Synthetic", "n_imgs": n_imgs, "seed": 0},
        **kwargs,
    )


def logical_tensor(md: Metadata, seed=0) -> np.ndarray:
    """The protocol's logical tensor [image, layer, token, dim]."""
    shape = (md.n_imgs, len(md.layers), md.n_tokens_per_img, md.d_vit)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def write_dump(dpath, md, acts, batch_sizes=(3,), labels=None) -> pathlib.Path:
    """Write `acts` in batches cycling through `batch_sizes`, then optionally labels, then close."""
    writer = ShardWriter(dpath, md)
    i, b = 0, 0
    while i < md.n_imgs:
        n = batch_sizes[b % len(batch_sizes)]
        writer.write(acts[i : i + n])
        i, b = i + n, b + 1
    if labels is not None:
        writer.write_labels(labels)
    writer.close()
    return pathlib.Path(dpath)


class Dump(typing.NamedTuple):
    dpath: pathlib.Path
    """The finished dump directory."""
    md: Metadata
    """Its metadata."""
    acts: np.ndarray
    """The logical tensor that was written."""
    labels: np.ndarray
    """The labels that were written."""


@pytest.fixture
def dump(tmp_path) -> Dump:
    """A finished dump of 7 images in shards of 2, 2, 2, 1 (CLS recorded, layers 1 and 3) with labels."""
    md = make_md()
    acts = logical_tensor(md)
    labels = np.random.default_rng(1).integers(0, 4, size=(md.n_imgs, md.n_patches_per_img)).astype(np.uint8)
    return Dump(write_dump(tmp_path / "dump", md, acts, (3, 1, 2), labels), md, acts, labels)


##############################
# A reader from the protocol #
##############################


def read_by_protocol(dpath: pathlib.Path) -> np.ndarray:
    """Protocol sections 2-4 only: metadata.json + shards.json, np.fromfile each shard at the full shard size (as
    saev's readers map it), keep its `n_imgs` real images, concatenate."""
    meta = json.loads((dpath / "metadata.json").read_text())
    listed = json.loads((dpath / "shards.json").read_text())
    L, P, D = len(meta["layers"]), meta["n_patches_per_img"], meta["d_vit"]
    T = P + (1 if meta["cls_token"] else 0)
    S = meta["max_patches_per_shard"] // (T * L)
    parts = [np.fromfile(dpath / s["name"], dtype=np.float32).reshape(S, L, T, D)[: s["n_imgs"]] for s in listed]
    return np.concatenate(parts)


def read_vector_by_protocol(dpath: pathlib.Path, global_img_idx: int, layer: int, token_idx: int) -> np.ndarray:
    """Protocol section 4.2: shard and byte offset of one activation vector, then seek and read D floats."""
    meta = json.loads((dpath / "metadata.json").read_text())
    L, P, D = len(meta["layers"]), meta["n_patches_per_img"], meta["d_vit"]
    T = P + (1 if meta["cls_token"] else 0)
    S = meta["max_patches_per_shard"] // (T * L)
    shard_idx, img_in_shard = global_img_idx // S, global_img_idx % S
    layer_idx = meta["layers"].index(layer)
    offset_in_bytes = ((img_in_shard * L * T) + (layer_idx * T) + token_idx) * D * 4
    with open(dpath / f"acts{shard_idx:06d}.bin", "rb") as fd:
        fd.seek(offset_in_bytes)
        return np.frombuffer(fd.read(D * 4), dtype=np.float32)


def test_a_reader_written_from_the_protocol_reads_what_the_writer_wrote(dump):
    dpath, md, acts, _ = dump
    np.testing.assert_array_equal(read_by_protocol(dpath), acts)


def test_protocol_byte_offsets_locate_every_vector(dump):
    dpath, md, acts, _ = dump
    for img in range(md.n_imgs):
        for li, layer in enumerate(md.layers):
            for token in range(md.n_tokens_per_img):
                np.testing.assert_array_equal(read_vector_by_protocol(dpath, img, layer, token), acts[img, li, token])


def test_metadata_hash_is_the_protocol_sha256_of_metadata_json(dump):
    dpath, md, _, _ = dump
    meta = json.loads((dpath / "metadata.json").read_text())
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    assert md.hash == hashlib.sha256(blob).hexdigest()
    assert meta["protocol"] == "1.0.0" and meta["dtype"] == "float32"


def test_metadata_json_has_exactly_the_v1_keys_and_the_label_fields_are_in_labels_json(dump):
    """saev's v1 `Metadata(**json)` rejects unknown keys and any protocol but "1.0.0"."""
    meta = json.loads((dump.dpath / "metadata.json").read_text())
    assert list(meta) == ["vit_family", "vit_ckpt", "layers", "n_patches_per_img", "cls_token", "d_vit", "n_imgs",
                          "max_patches_per_shard", "data", "dtype", "protocol"]  # fmt: skip
    assert json.loads((dump.dpath / "labels.json").read_text()) == {
        "labels_dtype": "uint8", "labels_ignore": 255, "class_names": []
    }  # fmt: skip


def test_dump_directory_holds_exactly_the_protocol_files(dump):
    dpath, *_ = dump
    names = sorted(p.name for p in dpath.iterdir() if not p.name.startswith("."))
    assert names == [f"acts{i:06d}.bin" for i in range(4)] + [
        "labels.bin",
        "labels.json",
        "metadata.json",
        "shards.json",
    ]


################
# Sizing maths #
################


def test_images_per_shard_is_the_budget_floored_over_tokens_times_layers():
    # T = 16 + 1, L = 2: 34 vectors per image; floor(100 / 34) = 2.
    md = make_md(n_imgs=5, n_patches=16, cls_token=True, layers=(0, 1), budget=100)
    assert (md.n_tokens_per_img, md.n_imgs_per_shard, md.n_shards) == (17, 2, 3)
    assert [md.shard_n_imgs(s) for s in range(md.n_shards)] == [2, 2, 1]
    assert make_md(n_patches=16, cls_token=False, layers=(0, 1), budget=100).n_imgs_per_shard == 3


def test_shards_json_and_file_sizes_follow_the_sizing_maths(dump):
    """Every shard file, the last included, has the full n_imgs_per_shard size; shards.json says what is real."""
    dpath, md, _, _ = dump
    listed = json.loads((dpath / "shards.json").read_text())
    assert listed == [{"name": f"acts{i:06d}.bin", "n_imgs": n} for i, n in enumerate([2, 2, 2, 1])]
    vector_bytes = md.d_vit * 4
    for s in listed:
        assert (dpath / s["name"]).stat().st_size == 2 * len(md.layers) * md.n_tokens_per_img * vector_bytes


def test_the_last_shard_is_padded_with_zeros(dump):
    md = dump.md
    last = np.fromfile(dump.dpath / "acts000003.bin", dtype=np.float32).reshape(2, 2, md.n_tokens_per_img, md.d_vit)
    np.testing.assert_array_equal(last[0], dump.acts[6])
    assert not last[1].any()


def test_a_dump_of_earlier_versions_with_a_truncated_last_shard_and_label_keys_in_metadata_reads(dump):
    """Protocol "1.1.0" as earlier versions wrote it: the label keys in metadata.json, no labels.json, the last
    shard holding only its images."""
    md = dataclasses.replace(dump.md, class_names=("a", "b", "c", "d"))
    old = {**md.to_json(), **md.labels_json(), "protocol": "1.1.0"}
    (dump.dpath / "metadata.json").write_text(json.dumps(old))
    (dump.dpath / "labels.json").unlink()
    last = dump.dpath / "acts000003.bin"
    last.write_bytes(last.read_bytes()[: md.bytes_per_img])
    shards = Shards(dump.dpath)
    assert shards.metadata.class_names == ("a", "b", "c", "d")
    np.testing.assert_array_equal(shards.patches(1, 0, 7), dump.acts[:, 0, 1:])
    np.testing.assert_array_equal(shards.labels, dump.labels)


def test_a_trailing_shard_of_zero_images_is_accepted(dump):
    """saev 2.x lists one extra all-zero shard when the image count is a multiple of the shard size."""
    listed = json.loads((dump.dpath / "shards.json").read_text())
    (dump.dpath / "shards.json").write_text(json.dumps([*listed, {"name": "acts000004.bin", "n_imgs": 0}]))
    (dump.dpath / "acts000004.bin").write_bytes(bytes(dump.md.shard_bytes))
    np.testing.assert_array_equal(Shards(dump.dpath).patches(3, 0, 7), dump.acts[:, 1, 1:])


def test_a_trailing_shard_with_images_or_of_the_wrong_size_is_refused(dump):
    fpath = dump.dpath / "shards.json"
    listed = json.loads(fpath.read_text())
    fpath.write_text(json.dumps([*listed, {"name": "acts000004.bin", "n_imgs": 1}]))
    with pytest.raises(ShardError, match=re.escape(f"{fpath} does not match the shard sizing") + ".*entry 4"):
        Shards(dump.dpath)
    fpath.write_text(json.dumps([*listed, {"name": "acts000004.bin", "n_imgs": 0}]))
    (dump.dpath / "acts000004.bin").write_bytes(bytes(8))
    with pytest.raises(ShardError, match=re.escape(f"shard file {dump.dpath / 'acts000004.bin'} has 8 bytes")):
        Shards(dump.dpath)


def test_a_truncated_shard_that_is_not_the_last_is_refused(dump):
    fpath = dump.dpath / "acts000002.bin"
    fpath.write_bytes(fpath.read_bytes()[: dump.md.bytes_per_img])
    with pytest.raises(ShardError, match=re.escape(f"shard file {fpath} has")):
        Shards(dump.dpath)


def test_a_budget_below_one_image_is_an_error():
    md = make_md(n_patches=4, cls_token=True, layers=(0, 1), budget=9)
    with pytest.raises(ShardError, match="max_patches_per_shard=9 is smaller than one image"):
        md.n_imgs_per_shard


@settings(max_examples=30, deadline=None)
@given(
    n_imgs=st.integers(1, 12),
    n_patches=st.integers(1, 5),
    cls_token=st.booleans(),
    n_layers=st.integers(1, 3),
    d_vit=st.integers(1, 4),
    per_shard=st.integers(1, 5),
    slack=st.floats(0, 0.99),
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
)
def test_round_trip_for_any_sizes_and_batches(
    n_imgs, n_patches, cls_token, n_layers, d_vit, per_shard, slack, batch_sizes
):
    vectors_per_img = (n_patches + int(cls_token)) * n_layers
    budget = per_shard * vectors_per_img + int(slack * vectors_per_img)
    md = make_md(n_imgs, n_patches, cls_token, tuple(range(n_layers)), d_vit, budget)
    acts = logical_tensor(md, seed=n_imgs)
    with tempfile.TemporaryDirectory() as tmp:
        dpath = write_dump(tmp, md, acts, tuple(batch_sizes))
        shards = Shards(dpath)
        sizes = [s["n_imgs"] for s in json.loads((dpath / "shards.json").read_text())]
        assert sizes == [per_shard] * (len(sizes) - 1) + [n_imgs - per_shard * (len(sizes) - 1)]
        assert 1 <= sizes[-1] <= per_shard
        np.testing.assert_array_equal(read_by_protocol(dpath), acts)
        for li, layer in enumerate(md.layers):
            np.testing.assert_array_equal(shards.patches(layer, 0, n_imgs), acts[:, li, int(cls_token) :])
        del shards


##########
# Reader #
##########


def test_patches_equal_the_logical_tensor_without_cls_across_shard_boundaries(dump):
    dpath, md, acts, _ = dump
    shards = Shards(dpath)
    for start, stop in [(0, 7), (1, 6), (3, 4), (5, 7), (2, 2)]:
        np.testing.assert_array_equal(shards.patches(3, start, stop), acts[start:stop, 1, 1:])
        np.testing.assert_array_equal(shards.patches(1, start, stop), acts[start:stop, 0, 1:])


def test_patches_flat_equal_the_logical_tensor_at_global_patch_indices(dump):
    dpath, md, acts, _ = dump
    shards = Shards(dpath)
    patches_ND = acts[:, 1, 1:].reshape(-1, md.d_vit)  # image-major, then patch: global index image * P + patch
    idx = np.array([27, 0, 5, 8, 3, 27, 12, 19, 26])
    np.testing.assert_array_equal(shards.patches_flat(3, idx), patches_ND[idx])
    assert shards.patches_flat(3, np.array([], dtype=np.int64)).shape == (0, md.d_vit)


def test_without_cls_every_token_is_a_patch(tmp_path):
    md = make_md(cls_token=False)
    acts = logical_tensor(md)
    shards = Shards(write_dump(tmp_path, md, acts, (2, 5)))
    assert md.n_tokens_per_img == md.n_patches_per_img
    np.testing.assert_array_equal(shards.patches(1, 0, md.n_imgs), acts[:, 0])
    idx = np.arange(md.n_imgs * md.n_patches_per_img)[::-3]
    np.testing.assert_array_equal(shards.patches_flat(3, idx), acts[:, 1].reshape(-1, md.d_vit)[idx])


def test_with_cls_token_zero_is_the_cls_and_the_shard_holds_it(dump):
    dpath, md, acts, _ = dump
    shards = Shards(dpath)
    assert shards.shard(1).shape == (2, 2, md.n_patches_per_img + 1, md.d_vit)
    np.testing.assert_array_equal(shards.shard(1)[:, :, 0], acts[2:4, :, 0])


def test_labels_round_trip(dump):
    dpath, md, _, labels = dump
    got = Shards(dpath).labels
    assert got.dtype == np.uint8 and got.shape == (md.n_imgs, md.n_patches_per_img)
    np.testing.assert_array_equal(got, labels)


def test_int16_labels_keep_a_negative_ignore_value(tmp_path):
    md = make_md(labels_dtype="int16", labels_ignore=-1, class_names=tuple(f"c{i}" for i in range(300)))
    labels = np.random.default_rng(0).integers(-1, 300, size=(md.n_imgs, md.n_patches_per_img))
    shards = Shards(write_dump(tmp_path, md, logical_tensor(md), labels=labels))
    np.testing.assert_array_equal(shards.labels, labels)
    assert shards.metadata == md


def test_a_dump_without_labels_reads_but_has_no_labels(tmp_path):
    md = make_md()
    shards = Shards(write_dump(tmp_path, md, logical_tensor(md)))
    with pytest.raises(ShardError, match=re.escape(f"{tmp_path / 'labels.bin'} is missing")):
        shards.labels


def test_a_layer_that_was_not_dumped_is_an_error(dump):
    with pytest.raises(ValueError, match=re.escape("layer 2 was not dumped; dumped layers: [1, 3]")):
        Shards(dump[0]).patches(2, 0, 1)


def test_out_of_range_images_or_patches_are_index_errors(dump):
    shards = Shards(dump[0])
    with pytest.raises(IndexError, match=re.escape("image range [5, 8) is not within [0, 7)")):
        shards.patches(1, 5, 8)
    with pytest.raises(IndexError, match="image range"):
        shards.patches(1, -1, 2)
    with pytest.raises(IndexError, match=re.escape("patch index 28 is not within [0, 28)")):
        shards.patches_flat(1, np.array([3, 28]))
    with pytest.raises(IndexError, match="patch index -1"):
        shards.patches_flat(1, np.array([-1]))


###############################
# Reader errors name the file #
###############################


def test_truncated_shard_is_named(dump):
    dpath, *_ = dump
    fpath = dpath / "acts000001.bin"
    fpath.write_bytes(fpath.read_bytes()[:-4])
    with pytest.raises(ShardError, match=re.escape(f"shard file {fpath} has")):
        Shards(dpath)


def test_missing_shard_is_named(dump):
    dpath, *_ = dump
    (dpath / "acts000003.bin").unlink()
    with pytest.raises(ShardError, match=re.escape(f"shard file missing: {dpath / 'acts000003.bin'}")):
        Shards(dpath)


def test_missing_metadata_is_named(dump):
    dpath, *_ = dump
    (dpath / "metadata.json").unlink()
    with pytest.raises(ShardError, match=re.escape(f"{dpath / 'metadata.json'} is missing")):
        Shards(dpath)


def test_missing_or_malformed_shards_json_is_named(dump):
    dpath, *_ = dump
    fpath = dpath / "shards.json"
    fpath.write_text('[{"name": "acts000000.bin"}]')
    with pytest.raises(ShardError, match=re.escape(f"{fpath} is not a valid shard list")):
        Shards(dpath)
    fpath.unlink()
    with pytest.raises(ShardError, match=re.escape(f"{fpath} is missing")):
        Shards(dpath)


def test_shards_json_that_disagrees_with_the_metadata_is_an_error(dump):
    dpath, *_ = dump
    fpath = dpath / "shards.json"
    listed = json.loads(fpath.read_text())
    fpath.write_text(json.dumps(listed[:-1]))
    with pytest.raises(ShardError, match=re.escape(f"{fpath} does not match the shard sizing")):
        Shards(dpath)


def test_wrong_size_labels_file_is_named(dump):
    dpath, *_ = dump
    fpath = dpath / "labels.bin"
    fpath.write_bytes(fpath.read_bytes() + b"\0")
    with pytest.raises(ShardError, match=re.escape(f"{fpath} has 29 bytes, expected 28")):
        Shards(dpath)


def test_incompatible_protocol_or_dtype_is_refused(dump):
    dpath, *_ = dump
    fpath = dpath / "metadata.json"
    meta = json.loads(fpath.read_text())
    fpath.write_text(json.dumps({**meta, "protocol": "2.0.0"}))
    with pytest.raises(ShardError, match="protocol '2.0.0' is not one this reader knows"):
        Shards(dpath)
    fpath.write_text(json.dumps({**meta, "dtype": "float16"}))
    with pytest.raises(ShardError, match="dtype 'float16' is not supported"):
        Shards(dpath)


##########
# Writer #
##########


def test_nan_or_inf_activations_are_rejected_naming_the_image(tmp_path):
    md = make_md()
    acts = logical_tensor(md)
    writer = ShardWriter(tmp_path, md)
    writer.write(acts[:3])
    bad = acts[3:6].copy()
    bad[1, 0, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf activations for image 4"):
        writer.write(bad)
    bad[1, 0, 2, 1] = -np.inf
    with pytest.raises(ValueError, match="NaN/inf activations for image 4"):
        writer.write(bad)
    assert writer.n_written == 3


def test_values_beyond_float32_are_rejected_not_stored_as_inf(tmp_path):
    md = make_md()
    acts = logical_tensor(md)[:2].astype(np.float64)
    acts[0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match="NaN/inf activations for image 0"):
        ShardWriter(tmp_path, md).write(acts)


def test_activations_of_the_wrong_shape_are_rejected(tmp_path):
    md = make_md()
    with pytest.raises(ValueError, match=re.escape("expected [B, 2, 5, 3]")):
        ShardWriter(tmp_path, md).write(np.zeros((2, 2, 4, 3), np.float32))


def test_writing_past_n_imgs_is_an_error(tmp_path):
    md = make_md()
    writer = ShardWriter(tmp_path, md)
    writer.write(logical_tensor(md)[:6])
    with pytest.raises(ValueError, match="writing past n_imgs=7"):
        writer.write(logical_tensor(md)[:2])


def test_closing_before_every_image_is_written_is_an_error_and_marks_nothing_done(tmp_path):
    md = make_md()
    writer = ShardWriter(tmp_path, md)
    writer.write(logical_tensor(md)[:5])
    with pytest.raises(ValueError, match="wrote 5 images, metadata says 7"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "acts000000.bin",
        "acts000001.bin",
    ]


def test_labels_of_the_wrong_shape_are_rejected(tmp_path):
    md = make_md()
    with pytest.raises(ValueError, match=re.escape("expected (7, 4)")):
        ShardWriter(tmp_path, md).write_labels(np.zeros((7, 5), np.uint8))


def test_aborted_writer_leaves_only_whole_shards(tmp_path):
    md = make_md()
    acts = logical_tensor(md)
    writer = ShardWriter(tmp_path, md)
    writer.write(acts[:3])  # shard 0 whole, shard 1 half-written
    assert any(atomic.is_temp(p) for p in tmp_path.iterdir())
    writer.abort()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["acts000000.bin"]
    shard_0 = np.fromfile(tmp_path / "acts000000.bin", np.float32).reshape(acts[:2].shape)
    np.testing.assert_array_equal(shard_0, acts[:2])
    with pytest.raises(ValueError, match="aborted"):
        writer.write(acts[3:4])


def test_an_exception_inside_a_with_block_aborts_the_shard_being_written(tmp_path):
    md = make_md()
    acts = logical_tensor(md)
    with pytest.raises(RuntimeError, match="model crashed"):
        with ShardWriter(tmp_path, md) as writer:
            writer.write(acts[:5])
            raise RuntimeError("model crashed")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "acts000000.bin",
        "acts000001.bin",
    ]


def test_resume_from_start_shard_is_byte_identical_to_an_uninterrupted_write(tmp_path):
    md = make_md()
    acts = logical_tensor(md)
    labels = np.arange(md.n_imgs * md.n_patches_per_img, dtype=np.uint8).reshape(md.n_imgs, -1)
    whole = write_dump(tmp_path / "whole", md, acts, (3,), labels)

    first = ShardWriter(tmp_path / "resumed", md)
    first.write(acts[:5])  # shards 0 and 1 done, shard 2 half-written
    first.abort()
    second = ShardWriter(tmp_path / "resumed", md, start_shard=2)
    assert second.n_written == 4
    for i in range(4, md.n_imgs):
        second.write(acts[i : i + 1])
    second.write_labels(labels)
    second.close()

    resumed = tmp_path / "resumed"
    assert sorted(p.name for p in whole.iterdir() if not atomic.is_temp(p)) == sorted(
        p.name for p in resumed.iterdir() if not atomic.is_temp(p)
    )
    for fpath in whole.iterdir():
        if fpath.name.endswith(".sum"):  # checksum records: the same size and checksum (their stat differs)
            data = fpath.with_name(fpath.name[1:].removesuffix(".sum"))
            assert checksums.recorded_checksum(data) == checksums.recorded_checksum(resumed / data.name), fpath.name
            continue
        assert fpath.read_bytes() == (resumed / fpath.name).read_bytes(), fpath.name


def test_resume_after_the_last_shard_only_writes_the_json_files(tmp_path):
    md = make_md()
    acts = logical_tensor(md)
    writer = ShardWriter(tmp_path, md)
    writer.write(acts)  # every shard is whole; the job died before close()
    writer = ShardWriter(tmp_path, md, start_shard=md.n_shards)
    assert writer.n_written == md.n_imgs
    writer.close()
    np.testing.assert_array_equal(read_by_protocol(tmp_path), acts)


def test_resume_with_a_missing_earlier_shard_names_it(tmp_path):
    md = make_md()
    writer = ShardWriter(tmp_path, md)
    writer.write(logical_tensor(md)[:4])
    (tmp_path / "acts000000.bin").unlink()
    with pytest.raises(ShardError, match=re.escape(f"shard file missing: {tmp_path / 'acts000000.bin'}")):
        ShardWriter(tmp_path, md, start_shard=2)


def test_start_shard_beyond_the_shards_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=re.escape("start_shard=5 outside [0, 4]")):
        ShardWriter(tmp_path, make_md(), start_shard=5)


def test_metadata_round_trips_through_json(dump):
    dpath, md, _, _ = dump
    labels = json.loads((dpath / "labels.json").read_text())
    assert Metadata.from_json(json.loads((dpath / "metadata.json").read_text()), labels) == md


######################################################
# Values checked where they are read (labels, NaNs) #
######################################################


def test_a_class_id_outside_the_classes_is_named_with_image_patch_and_value(tmp_path):
    from saev.data.shards import ShardValueError

    md = make_md(class_names=("a", "b", "c"))
    labels = np.zeros((md.n_imgs, md.n_patches_per_img), dtype=np.uint8)
    labels[2, 1] = 255  # the ignore label is fine
    labels[3, 2], labels[5, 0] = 3, 200
    shards = Shards(write_dump(tmp_path, md, logical_tensor(md), labels=labels))
    msg = f"{tmp_path / 'labels.bin'}: class id 3 at image 3, patch 2 is not in [0, 3) nor the ignore label 255 (2 bad"
    with pytest.raises(ShardError, match=re.escape(msg)) as info:
        shards.labels
    assert isinstance(info.value, (ShardValueError, ValueError))


def test_negative_int16_labels_other_than_the_ignore_value_are_refused(tmp_path):
    md = make_md(labels_dtype="int16", labels_ignore=-1, class_names=("a", "b"))
    labels = np.full((md.n_imgs, md.n_patches_per_img), -1, dtype=np.int16)
    labels[6, 3] = -2
    shards = Shards(write_dump(tmp_path, md, logical_tensor(md), labels=labels))
    with pytest.raises(ValueError, match=re.escape("labels.bin: class id -2 at image 6, patch 3 is not in [0, 2)")):
        shards.labels


def test_labels_corrupted_in_place_after_a_good_write_are_caught(dump):
    fpath = dump.dpath / "labels.bin"
    raw = bytearray(fpath.read_bytes())
    raw[-1] = 7  # same size; the metadata names no classes here, so only negatives would be refused
    fpath.write_bytes(bytes(raw))
    Shards(dump.dpath).labels  # no class names: 7 is accepted
    md = dataclasses.replace(dump.md, class_names=("a", "b", "c", "d"))
    (dump.dpath / "labels.json").write_text(json.dumps(md.labels_json()))
    with pytest.raises(ValueError, match=re.escape(f"{fpath}: class id 7 at image 6, patch 3")):
        Shards(dump.dpath).labels


def _poison(dpath: pathlib.Path, md: Metadata, img: int, layer_idx: int, token: int, value: float) -> None:
    """Write `value` into one activation of the dump at (image, layer index, token), keeping the file size."""
    per = md.n_imgs_per_shard
    shard, local = divmod(img, per)
    acts = np.memmap(dpath / f"acts{shard:06d}.bin", dtype=np.float32, mode="r+").reshape(
        md.n_imgs_per_shard, len(md.layers), md.n_tokens_per_img, md.d_vit
    )
    acts[local, layer_idx, token, 1] = value
    acts.flush()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_activations_are_named_by_shard_image_and_layer_when_gathered(dump, value):
    md = dump.md
    _poison(dump.dpath, md, img=5, layer_idx=1, token=1 + 2, value=value)  # CLS is token 0: patch 2
    shards = Shards(dump.dpath)
    msg = f"{dump.dpath / 'acts000002.bin'}: NaN/inf activation at image 5, patch 2, layer 3"
    with pytest.raises(ValueError, match=re.escape(msg)):
        shards.patches_flat(3, np.array([0, 5 * md.n_patches_per_img + 2]))
    with pytest.raises(ValueError, match=re.escape(msg)):
        shards.patches(3, 0, md.n_imgs)
    # Other patches, the other layer and the CLS token are still readable.
    shards.patches_flat(3, np.array([5 * md.n_patches_per_img + 1]))
    shards.patches(1, 0, md.n_imgs)
    shards.patches(3, 0, 5)


def test_nan_in_the_cls_token_is_not_read_so_not_refused(dump):
    _poison(dump.dpath, dump.md, img=0, layer_idx=0, token=0, value=np.nan)
    Shards(dump.dpath).patches(1, 0, dump.md.n_imgs)


def test_a_budget_below_one_image_is_a_value_error_naming_the_setting():
    md = make_md(n_patches=4, cls_token=True, layers=(0, 1), budget=9)
    with pytest.raises(ValueError, match=r"max_patches_per_shard=9 is smaller than one image .*raise dump.max_patches"):
        md.n_shards


def test_metadata_json_with_a_budget_below_one_image_is_named(dump):
    fpath = dump.dpath / "metadata.json"
    md = json.loads(fpath.read_text())
    md["max_patches_per_shard"] = 3
    fpath.write_text(json.dumps(md))
    with pytest.raises(ValueError, match=re.escape(f"{fpath}: max_patches_per_shard=3 is smaller than one image")):
        Shards(dump.dpath)


def test_a_labels_json_of_the_wrong_shape_is_named(dump):
    fpath = dump.dpath / "labels.json"
    for bad in ('["uint8"]', '{"labels_dtype": "float32"}', '{"class_names": "abc"}', '{"labels_ignore": "255"}'):
        fpath.write_text(bad)
        with pytest.raises(ShardError, match=re.escape(str(fpath))):
            Shards(dump.dpath)


def test_metadata_json_is_accepted_by_a_reader_with_the_v1_fields_and_types(dump):
    """The v1 reader of the seed builds a frozen dataclass from metadata.json (unknown keys are a TypeError) whose
    protocol is Literal["1.0.0"] and family Literal["clip", "siglip", "dinov2"], checked by beartype; then it maps
    every shard at the full shard shape."""
    import beartype

    # The seed's field types, as its reader declares them (the defaults of dtype and protocol do not matter here).
    v1_types = [("vit_family", typing.Literal["clip", "siglip", "dinov2"]), ("vit_ckpt", str),
                ("layers", tuple[int, ...]), ("n_patches_per_img", int), ("cls_token", bool), ("d_vit", int),
                ("n_imgs", int), ("max_patches_per_shard", int), ("data", dict[str, object]),
                ("dtype", typing.Literal["float32"]), ("protocol", typing.Literal["1.0.0"])]  # fmt: skip
    V1Metadata = beartype.beartype(dataclasses.make_dataclass("V1Metadata", v1_types, frozen=True))

    dct = json.loads((dump.dpath / "metadata.json").read_text())
    dct["layers"] = tuple(dct.pop("layers"))
    v1 = V1Metadata(**dct)
    with pytest.raises(Exception):  # noqa: B017 --  # what this stand-in refuses, as the seed's reader does
        V1Metadata(**{**dct, "protocol": "1.1.0"})
    with pytest.raises(TypeError):
        V1Metadata(**dct, labels_dtype="uint8")
    per = v1.max_patches_per_shard // ((v1.n_patches_per_img + v1.cls_token) * len(v1.layers))
    shape = (per, len(v1.layers), v1.n_patches_per_img + v1.cls_token, v1.d_vit)
    for entry in json.loads((dump.dpath / "shards.json").read_text()):
        np.memmap(dump.dpath / entry["name"], mode="r", dtype=np.float32, shape=shape)  # no "mmap length" error
