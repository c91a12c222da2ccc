"""saev's shard layouts (shared/notes/saev-formats.md, and the v1 protocol in shared/seeds/001-saev-v1-source.txt):
shard sets written by fixture writers from the documented formats are adopted in place and read back; a dump is
exported in the 2.x layout and adopted back bit-identical; every refusal is one line naming the file and field.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import typing

import beartype
import numpy as np
import pytest
import torch

import launch
from saev import atomic
from saev.data import saevfmt
from saev.data.shards import Metadata, ShardError, Shards, ShardWriter
from stages import pipeline as pl
from tests.helpers import assert_within, flip_byte, sae_forward_bounds, write_tiny_config

CLASSES = ("background", "a", "b")


###################################################
# Fixture writers, from the documented formats only #
###################################################


def write_saev_shards(
    dpath: pathlib.Path,
    acts_NLTD: np.ndarray,
    *,
    layers: tuple[int, ...],
    cls_token: bool,
    budget: int,
    protocol: str = "2.1",
    labels_NP: np.ndarray | None = None,
    spelling: str = "released",
    pixel_agg: str | None = "majority",
) -> pathlib.Path:
    """A shard directory as saev writes it: every shard at full size (the last padded with zeros), and, as the 2.x
    writer does, one extra all-zero shard of 0 examples when the example count is a multiple of the shard size.

    `protocol` "1.0.0" uses the v1 field names, "2.1" the 2.x ones (`spelling` "released": content_tokens_per_example
    and max_tokens_per_shard, as the released 2.1 `Metadata`; "notes": the older patches_per_ex and patches_per_shard).
    """
    n, n_layers, t, d = acts_NLTD.shape
    per = budget // (t * n_layers)
    n_shards = math.ceil(n / per)
    counts = [min(per, n - s * per) for s in range(n_shards)]
    if protocol == "2.1" and n % per == 0:
        counts.append(0)
    dpath.mkdir(parents=True)
    for s, count in enumerate(counts):
        shard = np.zeros((per, n_layers, t, d), dtype=np.float32)
        shard[:count] = acts_NLTD[s * per : s * per + count]
        shard.tofile(dpath / f"acts{s:06d}.bin")
    count_key = "n_examples" if protocol == "2.1" else "n_imgs"
    listed = [{"name": f"acts{s:06d}.bin", count_key: c} for s, c in enumerate(counts)]
    (dpath / "shards.json").write_text(json.dumps(listed))
    p = t - int(cls_token)
    if protocol == "2.1":
        per_ex, per_shard = ("patches_per_ex", "patches_per_shard") if spelling == "notes" else (
            "content_tokens_per_example", "max_tokens_per_shard")  # fmt: skip
        meta = {"family": "clip", "ckpt": "ViT-B-16/openai", "layers": list(layers), per_ex: p, "cls_token": cls_token,
                "d_model": d, "n_examples": n, per_shard: budget, "data": "gASVAAAAAAAAAAB9lC4=",
                "dataset": "/data/images", "dtype": "float32", "protocol": "2.1", "pixel_agg": pixel_agg}  # fmt: skip
    else:
        meta = {"vit_family": "clip", "vit_ckpt": "ViT-B-16/openai", "layers": list(layers), "n_patches_per_img": p,
                "cls_token": cls_token, "d_vit": d, "n_imgs": n, "max_patches_per_shard": budget,
                "data": {"__class__": "ImageFolder", "root": "/data/images"}, "dtype": "float32",
                "protocol": "1.0.0"}  # fmt: skip
    (dpath / "metadata.json").write_text(json.dumps(meta))
    if labels_NP is not None:
        np.ascontiguousarray(labels_NP, dtype=np.uint8).tofile(dpath / "labels.bin")
    return dpath


@beartype.beartype
@dataclasses.dataclass(frozen=True, kw_only=True)
class Saev21Metadata:
    """Stand-in for the released saev 2.1 `Metadata`: a kw_only frozen dataclass with exactly its fields and types,
    so unknown keys are refused ("unexpected keyword argument") and, with beartype, wrong types too."""

    family: typing.Literal["clip", "siglip", "dinov2", "dinov3", "fake-clip"]
    ckpt: str
    layers: list[int]
    content_tokens_per_example: int
    cls_token: bool
    d_model: int
    n_examples: int
    max_tokens_per_shard: int
    data: str
    dataset: str
    pixel_agg: typing.Literal["majority", "prefer-fg"] | None = None
    dtype: typing.Literal["float32"]
    protocol: typing.Literal["1.0.0", "1.1", "2.1"]


def load_as_saev21(hashdir: pathlib.Path) -> Saev21Metadata:
    """An exported directory as the 2.x reader takes it: metadata.json into its `Metadata`, at `saev/shards/<dir>`
    and named by its hash (`saev_hash`)."""
    obj = json.loads((hashdir / "metadata.json").read_text())
    assert hashdir.parts[-3:-1] == ("saev", "shards") and hashdir.name == saev_hash(obj)
    return Saev21Metadata(**obj)


def saev_hash(metadata: dict) -> str:
    """saev's name for a shard directory, from the documented rule: the first 8 hex characters of sha256 over the
    metadata as compact JSON with sorted keys (orjson OPT_SORT_KEYS: no spaces, UTF-8 not escaped)."""
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def open_as_saev2(out: pathlib.Path) -> tuple[pathlib.Path, dict, np.ndarray, np.ndarray]:
    """A stand-in for saev 2.x's readers, written from the documented path and hash rule only (not our reader):
    under `out/saev/shards/`, the directory whose name is the hash of its metadata.json; its path must end in
    `saev/shards/<dir>` (saev's readers assert it); every listed shard memory-mapped at the full shard size (as saev
    maps them: a shorter file fails here) and its first `n_examples` rows kept; labels.bin as uint8 [examples,
    content tokens]. Returns the directory, its metadata, activations [examples, layers, tokens, d_model], labels."""
    found = []
    for dpath in sorted((out / "saev" / "shards").iterdir()):
        meta = json.loads((dpath / "metadata.json").read_text())
        if dpath.name == saev_hash(meta):
            found.append((dpath, meta))
    ((dpath, meta),) = found
    assert dpath.parts[-3:-1] == ("saev", "shards"), dpath
    Saev21Metadata(**meta)  # its fields and types, nothing else
    tokens = meta["content_tokens_per_example"] + int(meta["cls_token"])
    shape = (
        meta["max_tokens_per_shard"] // (tokens * len(meta["layers"])),
        len(meta["layers"]),
        tokens,
        meta["d_model"],
    )
    rows = [np.memmap(dpath / entry["name"], dtype=np.float32, mode="r", shape=shape)[: entry["n_examples"]]
            for entry in json.loads((dpath / "shards.json").read_text())]  # fmt: skip
    acts = np.concatenate(rows)
    assert len(acts) == meta["n_examples"]
    labels = np.fromfile(dpath / "labels.bin", dtype=np.uint8).reshape(
        meta["n_examples"], meta["content_tokens_per_example"]
    )
    return dpath, meta, acts, labels


def test_the_stand_in_2x_reader_refuses_what_the_released_one_refuses():
    good = dict(family="clip", ckpt="m", layers=[1], content_tokens_per_example=4, cls_token=True, d_model=3,
                n_examples=2, max_tokens_per_shard=10, data="", dataset="", dtype="float32", protocol="2.1")  # fmt: skip
    assert Saev21Metadata(**good).pixel_agg is None
    with pytest.raises(TypeError, match="unexpected keyword argument 'patches_per_ex'"):
        Saev21Metadata(**good, patches_per_ex=4)
    with pytest.raises(beartype.roar.BeartypeCallHintParamViolation):
        Saev21Metadata(**{**good, "protocol": "1.1.0"})


def make_acts(n=7, layers=(3, 5), t=5, d=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(layers), t, d)).astype(np.float32)


def make_labels(n=7, p=4, seed=1) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, len(CLASSES), size=(n, p)).astype(np.uint8)
    labels[0, 0] = 255  # unlabelled
    return labels


def adopted(tmp_path, source_dpath, **kwargs) -> Shards:
    """Adopt `source_dpath` into a fresh directory and read it with our reader."""
    source = saevfmt.read_source(source_dpath, class_names=CLASSES, **kwargs)
    saevfmt.adopt(source, tmp_path / "art")
    return Shards(tmp_path / "art")


###########################
# Adopting saev's layouts #
###########################


@pytest.mark.parametrize("protocol,spelling", [("1.0.0", "released"), ("2.1", "notes"), ("2.1", "released")])
def test_a_saev_shard_set_is_adopted_and_reads_back_exactly(tmp_path, protocol, spelling):
    acts, labels = make_acts(), make_labels()
    src = write_saev_shards(tmp_path / "src", acts, layers=(3, 5), cls_token=True, budget=25, protocol=protocol,
                            labels_NP=labels, spelling=spelling)  # fmt: skip
    shards = adopted(tmp_path, src)
    assert shards.metadata.n_imgs_per_shard == 2 and shards.metadata.n_shards == 4  # 2, 2, 2, 1 (padded)
    np.testing.assert_array_equal(shards.patches(5, 0, 7), acts[:, 1, 1:])
    np.testing.assert_array_equal(shards.patches_flat(3, np.arange(28)), acts[:, 0, 1:].reshape(28, -1))
    np.testing.assert_array_equal(shards.labels, labels)
    assert shards.metadata.class_names == CLASSES and shards.metadata.labels_ignore == 255


def test_a_2x_set_with_a_trailing_empty_shard_is_adopted(tmp_path):
    acts = make_acts(n=6)
    src = write_saev_shards(tmp_path / "src", acts, layers=(3, 5), cls_token=True, budget=20)
    assert json.loads((src / "shards.json").read_text())[-1] == {"name": "acts000003.bin", "n_examples": 0}
    shards = adopted(tmp_path, src)
    np.testing.assert_array_equal(shards.patches(3, 0, 6), acts[:, 0, 1:])
    assert (tmp_path / "art" / "acts000003.bin").is_symlink()


def test_adopting_links_the_source_files_and_writes_nothing_there(tmp_path):
    src = write_saev_shards(tmp_path / "src", make_acts(), layers=(3, 5), cls_token=True, budget=25,
                            labels_NP=make_labels())  # fmt: skip
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in src.iterdir()}
    adopted(tmp_path, src)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in src.iterdir()} == before
    art = tmp_path / "art"
    assert os.readlink(art / "acts000000.bin") == str(src.resolve() / "acts000000.bin")
    assert os.readlink(art / "labels.bin") == str(src.resolve() / "labels.bin")
    assert json.loads((art / "metadata.json").read_text())["protocol"] == "1.0.0"
    assert json.loads((art / "source.json").read_text())["metadata"]["protocol"] == "2.1"


def test_without_cls_every_token_is_a_patch(tmp_path):
    acts = make_acts(t=4)
    src = write_saev_shards(tmp_path / "src", acts, layers=(3, 5), cls_token=False, budget=16, protocol="1.0.0")
    np.testing.assert_array_equal(adopted(tmp_path, src).patches(3, 0, 7), acts[:, 0])


############
# Refusals #
############


def src_2x(tmp_path, **kwargs) -> pathlib.Path:
    return write_saev_shards(tmp_path / "src", make_acts(), layers=(3, 5), cls_token=True, budget=25,
                             labels_NP=make_labels(), **kwargs)  # fmt: skip


def edit_json(fpath: pathlib.Path, **changes) -> None:
    obj = json.loads(fpath.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    fpath.write_text(json.dumps(obj))


def one_line_error(fn, match: str) -> str:
    with pytest.raises(ShardError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


def test_a_directory_that_is_not_a_shard_set_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(
        lambda: saevfmt.read_source(tmp_path / "nowhere"),
        re.escape(f"{tmp_path / 'nowhere'} is not a directory of saev shards"),
    )
    one_line_error(
        lambda: saevfmt.read_source(tmp_path / "empty"),
        re.escape(f"{tmp_path / 'empty' / 'metadata.json'} is missing: "),
    )


@pytest.mark.parametrize("protocol", ["1.1", "3.0", None])
def test_a_protocol_we_do_not_know_is_refused_naming_the_field(tmp_path, protocol):
    src = src_2x(tmp_path)
    edit_json(src / "metadata.json", protocol=protocol)
    one_line_error(
        lambda: saevfmt.read_source(src),
        re.escape(f"{src / 'metadata.json'}: field 'protocol' is {protocol!r}, not one we know"),
    )


def test_a_missing_unknown_or_mistyped_field_is_named(tmp_path):
    src = src_2x(tmp_path)
    md = src / "metadata.json"
    edit_json(md, d_model=None)
    one_line_error(lambda: saevfmt.read_source(src), re.escape(f"{md}: field 'd_model' is missing"))
    edit_json(md, d_model="4")
    one_line_error(lambda: saevfmt.read_source(src), re.escape(f"{md}: field 'd_model' must be int, got '4'"))
    edit_json(md, d_model=4, colour="red")
    one_line_error(lambda: saevfmt.read_source(src), re.escape(f"{md}: field 'colour' is not a field of protocol 2.1"))
    edit_json(md, colour=None, patches_per_ex=4)
    one_line_error(
        lambda: saevfmt.read_source(src), "fields 'patches_per_ex' and 'content_tokens_per_example' are the same"
    )


def test_a_truncated_shard_is_refused(tmp_path):
    src = src_2x(tmp_path)
    last = src / "acts000003.bin"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # what our earlier dumps did: not saev's
    one_line_error(
        lambda: saevfmt.read_source(src),
        re.escape(f"shard file {last} has 160 bytes, expected 320; saev writes every shard"),
    )


def test_a_missing_shard_or_a_shard_list_that_disagrees_is_refused(tmp_path):
    src = src_2x(tmp_path)
    listed = json.loads((src / "shards.json").read_text())
    (src / "shards.json").write_text(json.dumps(listed[:2]))
    one_line_error(
        lambda: saevfmt.read_source(src), re.escape(f"{src / 'shards.json'} does not match the shard sizing")
    )
    (src / "shards.json").write_text(json.dumps([{**e, "n_imgs": 2} for e in listed]))
    one_line_error(lambda: saevfmt.read_source(src), "is not a valid shard list: entry 0")
    (src / "shards.json").write_text(json.dumps(listed))
    (src / "acts000002.bin").unlink()
    one_line_error(lambda: saevfmt.read_source(src), re.escape(f"shard file missing: {src / 'acts000002.bin'}"))


@pytest.mark.parametrize("fname,entry,field,value", [
    ("shards.json", 0, "n_examples", 2.0), ("shards.json", 3, "n_examples", True),
    ("metadata.json", None, "n_examples", 7.0), ("metadata.json", None, "d_model", True),
    ("metadata.json", None, "layers", [3, 5.0]),
])  # fmt: skip
def test_integer_fields_must_be_real_integers(tmp_path, fname, entry, field, value):
    """JSON true and 2.0 compare equal to 1 and 2 in Python: they are refused, not taken as integers."""
    src = src_2x(tmp_path)
    if entry is None:
        edit_json(src / fname, **{field: value})
        match = f"{src / fname}: field '{field}' must be"
    else:
        listed = json.loads((src / fname).read_text())
        listed[entry][field] = value
        (src / fname).write_text(json.dumps(listed))
        match = f"{src / fname}: entry {entry} field '{field}' must be an integer"
    one_line_error(lambda: saevfmt.read_source(src), re.escape(match))


@pytest.mark.parametrize("protocol", ["2.1", "1.0.0"])
def test_a_layer_listed_twice_is_refused(tmp_path, protocol):
    """Each slot of a shard holds one layer: `layers = [3, 3]` would make `train.layer = 3` read only one of them."""
    src = write_saev_shards(tmp_path / "src", make_acts(), layers=(3, 3), cls_token=True, budget=25,
                            labels_NP=make_labels(), protocol=protocol)  # fmt: skip
    one_line_error(
        lambda: saevfmt.read_source(src),
        re.escape(f"{src / 'metadata.json'}: field 'layers' lists layer 3 more than once ([3, 3])"),
    )
    edit_json(src / "metadata.json", layers=[5, 3])
    assert saevfmt.read_source(src).metadata.layers == (5, 3)


def test_a_labels_file_of_the_wrong_size_is_refused(tmp_path):
    src = src_2x(tmp_path)
    (src / "labels.bin").write_bytes(b"\0" * 3)
    one_line_error(lambda: saevfmt.read_source(src), re.escape(f"{src / 'labels.bin'} has 3 bytes, expected 28"))


def test_a_label_beyond_the_class_names_is_refused_naming_the_file(tmp_path):
    src = src_2x(tmp_path)
    labels = make_labels()
    labels[4, 2] = 3  # three class names: 0, 1, 2
    labels.tofile(src / "labels.bin")
    source = saevfmt.read_source(src, class_names=CLASSES)
    with pytest.raises(
        ValueError, match=re.escape(f"{src / 'labels.bin'}: class id 3 at image 4, patch 2 is not in [0, 3)")
    ):
        saevfmt.check_source_labels(source)


########################
# Export, and back in  #
########################


def test_export_writes_the_2x_layout(tmp_path):
    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1, 3), n_patches_per_img=4, cls_token=True, d_vit=3,
                  n_imgs=7, max_patches_per_shard=25, data={"__class__": "Synthetic"}, class_names=CLASSES)  # fmt: skip
    acts = np.random.default_rng(0).normal(size=(7, 2, 5, 3)).astype(np.float32)
    writer = ShardWriter(tmp_path / "dump", md)
    writer.write(acts)
    writer.write_labels(make_labels())
    writer.close()
    out = saevfmt.export(Shards(tmp_path / "dump"), tmp_path / "out", dataset="", pixel_agg="majority")
    meta = json.loads((out / "metadata.json").read_text())
    assert list(meta) == list(saevfmt.V2_KEYS) and meta["protocol"] == "2.1"
    released = load_as_saev21(out)  # the released names, not patches_per_ex / patches_per_shard
    assert (released.content_tokens_per_example, released.max_tokens_per_shard) == (4, 25)
    assert json.loads((out / "shards.json").read_text())[-1] == {"name": "acts000003.bin", "n_examples": 1}
    assert {(out / f"acts{s:06d}.bin").stat().st_size for s in range(4)} == {2 * 2 * 5 * 3 * 4}
    back = adopted(tmp_path, out)
    np.testing.assert_array_equal(back.patches(3, 0, 7), acts[:, 1, 1:])
    assert back.labels.tobytes() == make_labels().tobytes()


def write_dump(dpath: pathlib.Path, acts: np.ndarray, labels: np.ndarray) -> Shards:
    """A dump of ours (ShardWriter) with the metadata of `test_export_writes_the_2x_layout`."""
    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1, 3), n_patches_per_img=4, cls_token=True, d_vit=3,
                  n_imgs=7, max_patches_per_shard=25, data={"__class__": "Synthetic"}, class_names=CLASSES)  # fmt: skip
    writer = ShardWriter(dpath, md)
    writer.write(acts)
    writer.write_labels(labels)
    writer.close()
    return Shards(dpath)


def test_a_repeat_export_reuses_an_identical_directory_and_refuses_other_contents(tmp_path):
    """The directory name hashes the metadata only: a dump with the same metadata but other labels or activations
    (e.g. masks edited in place, dumped again) must not be answered with the old export."""
    acts = np.random.default_rng(0).normal(size=(7, 2, 5, 3)).astype(np.float32)
    out = saevfmt.export(
        write_dump(tmp_path / "a", acts, make_labels()), tmp_path / "out", dataset="", pixel_agg="majority"
    )
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = saevfmt.export(
        write_dump(tmp_path / "b", acts, make_labels()), tmp_path / "out", dataset="", pixel_agg="majority"
    )
    assert again == out and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other_labels = make_labels(seed=5)
    one_line_error(lambda: saevfmt.export(write_dump(tmp_path / "c", acts, other_labels), tmp_path / "out", dataset="",
                                          pixel_agg="majority"),  # fmt: skip
                   re.escape(f"{out / 'labels.bin'} does not have the checksum of {tmp_path / 'c' / 'labels.bin'}; ")
                   + f".*remove {re.escape(str(out))} or export to another directory")  # fmt: skip
    acts2 = acts.copy()
    acts2[6, 0, 0, 0] += 1  # the last shard, padded
    one_line_error(lambda: saevfmt.export(write_dump(tmp_path / "d", acts2, make_labels()), tmp_path / "out", dataset="",
                                          pixel_agg="majority"), re.escape(f"{out / 'acts000003.bin'} does not have the checksum"))  # fmt: skip
    (out / "labels.bin").unlink()
    one_line_error(
        lambda: saevfmt.export(Shards(tmp_path / "a"), tmp_path / "out", dataset="", pixel_agg="majority"),
        re.escape(f"{out}: an earlier export holds other files (extra: -, missing: labels.bin)"),
    )
    shutil.rmtree(out)  # what the error says to do
    assert saevfmt.export(Shards(tmp_path / "c"), tmp_path / "out", dataset="", pixel_agg="majority") == out
    assert (out / "labels.bin").read_bytes() == other_labels.tobytes()


def test_an_export_to_a_full_disk_is_one_error_naming_the_file_and_a_rerun_with_space_recovers(tmp_path):
    """Every shard's blocks are reserved before it is copied: a full disk is a WriteError naming the file (not a
    SIGBUS in a later reader that maps the shard at full size), the temporary directory is removed, and once there is
    room the export is written whole."""
    from tests.helpers import small_tmpfs

    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1, 3), n_patches_per_img=4, cls_token=True, d_vit=512,
                  n_imgs=7, max_patches_per_shard=25, data={"__class__": "Synthetic"}, class_names=CLASSES)  # fmt: skip
    acts = np.random.default_rng(0).normal(size=(7, 2, 5, 512)).astype(np.float32)  # 4 shards of 40 KiB
    writer = ShardWriter(tmp_path / "dump", md)
    writer.write(acts)
    writer.write_labels(make_labels())
    writer.close()
    shards = Shards(tmp_path / "dump")
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        with pytest.raises(atomic.WriteError) as info:
            saevfmt.export(shards, disk, dataset="", pixel_agg="majority")
        assert re.fullmatch(rf"could not write {re.escape(str(disk / 'saev' / 'shards'))}/[0-9a-f]{{8}}/acts00000\d\.bin "
                            r"\(disk full\?\): No space left on device", str(info.value)), str(info.value)  # fmt: skip
        assert list((disk / "saev" / "shards").iterdir()) == []
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        out = saevfmt.export(shards, disk, dataset="", pixel_agg="majority")
        _, _, got, labels = open_as_saev2(disk)
        assert got.tobytes() == acts.tobytes() and labels.tobytes() == make_labels().tobytes()
        assert {os.stat(out / f"acts{s:06d}.bin").st_blocks * 512 for s in range(4)} == {md.shard_bytes}  # no hole


def test_a_2x_dump_with_null_pixel_agg_is_adopted_and_exported_verbatim(tmp_path):
    src = src_2x(tmp_path, pixel_agg=None)
    back = adopted(tmp_path, src)
    assert back.metadata.data["pixel_agg"] is None
    out = saevfmt.export(back, tmp_path / "out", dataset="ignored", pixel_agg="majority")
    released = load_as_saev21(out)
    assert (released.pixel_agg, released.dataset) == (None, "/data/images")
    edit_json(src / "metadata.json", pixel_agg=3)
    one_line_error(
        lambda: saevfmt.read_source(src),
        re.escape(f"{src / 'metadata.json'}: field 'pixel_agg' must be str or null, got 3"),
    )


def test_export_refuses_int16_labels(tmp_path):
    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1,), n_patches_per_img=4, cls_token=False, d_vit=3,
                  n_imgs=2, max_patches_per_shard=8, data={}, labels_dtype="int16", labels_ignore=-1,
                  class_names=tuple(f"c{i}" for i in range(300)))  # fmt: skip
    writer = ShardWriter(tmp_path / "dump", md)
    writer.write(np.zeros((2, 1, 4, 3), np.float32))
    writer.write_labels(np.zeros((2, 4), np.int16))
    writer.close()
    one_line_error(lambda: saevfmt.export(Shards(tmp_path / "dump"), tmp_path / "out", dataset="", pixel_agg="majority"),
                   re.escape(f"{tmp_path / 'dump' / 'labels.json'}: labels_dtype is 'int16' (300 classes); saev's labels.bin is uint8"))  # fmt: skip
    assert not any((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True


###############################
# The pipeline on an adopted dump #
###############################


def adopt_config(dpath: pathlib.Path, shards_dpath: pathlib.Path, layer: int, extra: str = "") -> pathlib.Path:
    """tests/tiny.toml with [dump.adopt] instead of [dump.data] and [dump.vit]."""
    cfg = write_tiny_config(dpath)
    text = cfg.read_text()
    text = (
        text[: text.index("[dump]")]
        + f"""[dump.adopt]
shards = "{shards_dpath}"
classes = "classes.txt"
{extra}
"""
        + text[text.index("[train]") :].replace("layer = -1", f"layer = {layer}")
    )
    cfg.write_text(text)
    return cfg


def best_by_order(pipeline) -> dict:
    """best.json with each SAE and score key replaced by its place in the sweep (keys differ with the dump's key)."""
    plan = pl.make_plan(pipeline)
    text = (plan["reduce"].artifacts[0].dpath / "best.json").read_text()
    for stage in ("train", "score"):
        for i, art in enumerate(plan[stage].artifacts):
            text = text.replace(art.key, f"{stage}{i}")
    return json.loads(text)


@pytest.fixture(scope="module")
def exported(done_config, tmp_path_factory):
    """The tiny run's dump exported in the 2.x layout, with the adopting config's class names."""
    out = tmp_path_factory.mktemp("export")
    assert launch.main(launch.Args(config=done_config, export=out)) == 0
    (hashdir,) = (out / "saev" / "shards").iterdir()
    return out, hashdir


def test_export_then_adopt_gives_identical_activations_labels_and_best_json(done_config, exported, tmp_path, capsys):
    out, hashdir = exported
    native = pl.make_plan(pl.load(done_config))["dump"].artifacts[0]
    md = Shards(native.dpath).metadata
    assert md.n_imgs % md.n_imgs_per_shard  # the last shard has fewer images: the dump's chunk padded it
    assert {(native.dpath / f"acts{s:06d}.bin").stat().st_size for s in range(md.n_shards)} == {md.shard_bytes}
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    cfg = adopt_config(tmp_path, hashdir, layer=md.layers[-1])
    assert launch.main(launch.Args(config=cfg)) == 0
    pipeline = pl.load(cfg)
    dump = pl.make_plan(pipeline)["dump"].artifacts[0]
    a, b = Shards(native.dpath), Shards(dump.dpath)
    for layer in md.layers:
        assert a.patches(layer, 0, md.n_imgs).tobytes() == b.patches(layer, 0, md.n_imgs).tobytes()
    assert np.asarray(a.labels).tobytes() == np.asarray(b.labels).tobytes()
    assert b.metadata.class_names == md.class_names
    assert best_by_order(pipeline) == best_by_order(pl.load(done_config))
    # ... and exported again: the same directory name and the same bytes, file for file.
    assert launch.main(launch.Args(config=cfg, export=tmp_path / "again")) == 0
    (again,) = (tmp_path / "again" / "saev" / "shards").iterdir()
    assert again.name == hashdir.name
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in hashdir.iterdir())
    for fpath in hashdir.iterdir():
        assert (again / fpath.name).read_bytes() == fpath.read_bytes(), fpath.name


def test_launch_export_is_opened_by_a_reader_written_from_saevs_path_and_hash_rule(done_config, exported):
    """`launch.py --export OUT` as saev's 2.x readers find it: OUT/saev/shards/<8 hex of the metadata's hash>/, with
    the native dump's activations (CLS first) and labels, and its class names in classes.txt."""
    out, hashdir = exported
    dpath, meta, acts, labels = open_as_saev2(out)
    assert dpath == hashdir and re.fullmatch(r"[0-9a-f]{8}", dpath.name)
    native = Shards(pl.make_plan(pl.load(done_config))["dump"].artifacts[0].dpath)
    md = native.metadata
    assert (meta["layers"], meta["cls_token"], meta["n_examples"]) == (list(md.layers), md.cls_token, md.n_imgs)
    for li, layer in enumerate(md.layers):
        assert acts[:, li, int(md.cls_token) :].tobytes() == native.patches(layer, 0, md.n_imgs).tobytes()
    assert labels.tobytes() == np.asarray(native.labels, dtype=np.uint8).tobytes()
    assert (dpath / "classes.txt").read_text().splitlines() == list(md.class_names)


def test_a_repeat_export_reuses_identical_files_and_overwrites_none_that_differ(
    done_config, exported, tmp_path, capsys
):
    """Every file an earlier export left (the shard directory's classes.txt, an SAE's sae.pt) is reused when it holds
    what this export writes, and otherwise refused with one `error:` line naming it, before anything is written."""
    out, hashdir = exported
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    files = sorted(p for p in mine.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert launch.main(launch.Args(config=done_config, export=mine)) == 0
    assert "(already there)" in capsys.readouterr().out
    assert sorted(p for p in mine.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before
    classes = mine / "saev" / "shards" / hashdir.name / "classes.txt"
    saes = sorted((mine / "saev" / "saes").glob("*/sae.pt"))
    shutil.rmtree(saes[1].parent)  # a missing SAE: written by a successful export, never by a refused one
    for fpath, change in ((classes, lambda f: f.write_text("other\nnames\n")), (saes[0], flip_byte)):
        original = fpath.read_bytes()
        change(fpath)
        changed = fpath.read_bytes()
        assert launch.main(launch.Args(config=done_config, export=mine)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {fpath} ") and "remove" in err and err.count("\n") == 1, err
        assert fpath.read_bytes() == changed and not saes[1].exists()
        fpath.write_bytes(original)
    assert launch.main(launch.Args(config=done_config, export=mine)) == 0
    assert saes[1].read_bytes() == (out / saes[1].relative_to(mine)).read_bytes()


def flip_keeping_mtime(fpath: pathlib.Path) -> None:
    """Change one byte at the same size and put the modification time back (the ctime still moves)."""
    st = fpath.stat()
    flip_byte(fpath)
    os.utime(fpath, ns=(st.st_atime_ns, st.st_mtime_ns))


def adopt_copy(exported, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A copy of the exported dump at tmp_path/src and a config adopting it; returns (config, source)."""
    out, hashdir = exported
    src = tmp_path / "src"
    shutil.copytree(hashdir, src)
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    layer = json.loads((src / "metadata.json").read_text())["layers"][-1]
    return adopt_config(tmp_path, src, layer=layer), src


def test_a_same_size_change_of_an_adopted_file_is_caught_and_never_adopted_silently(exported, tmp_path, capsys):
    """Edited under its old modification time (the key stays): `--verify` and the rerun name the file."""
    cfg, src = adopt_copy(exported, tmp_path)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    flip_keeping_mtime(src / "acts000001.bin")
    assert launch.main(launch.Args(config=cfg, verify=True)) == 1
    out_text = capsys.readouterr().out
    assert "acts000001.bin does not match its checksum" in out_text
    assert (src / "acts000001.bin").is_file() and not (src / "acts000001.bin").is_symlink()  # the user's file stays
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 1
    err = capsys.readouterr().err
    assert f"error: {src.resolve() / 'acts000001.bin'} changed since it was adopted as dump/" in err
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 1  # and again: never sealed silently
    flip_keeping_mtime(src / "acts000001.bin")  # changed back
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0


def swap_labels(fpath: pathlib.Path) -> None:
    """Swap class ids 1 and 2 in labels.bin (uint8), at the same size."""
    labels = np.fromfile(fpath, dtype=np.uint8)
    assert (labels == 1).any() and (labels == 2).any()
    labels = np.where(labels == 1, 2, np.where(labels == 2, 1, labels)).astype(np.uint8)
    labels.tofile(fpath)


def clean_best_of(cfg: pathlib.Path, root: pathlib.Path) -> bytes:
    """best.json of a run from nothing under another root (same config, same source)."""
    assert launch.main(launch.Args(config=cfg, root=root)) == 0
    return next(root.glob("reduce/*/best.json")).read_bytes()


@pytest.mark.parametrize("delete_dump", [False, True], ids=["kept", "dump-deleted"])
def test_an_edited_source_is_a_new_dump_and_everything_made_from_it_is_recomputed(
    exported, tmp_path, capsys, delete_dump
):
    """Editing labels.bin (then, as an earlier error advised, deleting runs/dump/<key>) gives a new key for the dump
    and every stage after it: nothing made from the old labels is reused, the plan says which file changed, and
    best.json is a clean run's on the edited labels."""
    cfg, src = adopt_copy(exported, tmp_path)
    assert launch.main(launch.Args(config=cfg)) == 0
    before = pl.make_plan(pl.load(cfg))
    old_best = next((tmp_path / "runs").glob("reduce/*/best.json")).read_bytes()
    swap_labels(src / "labels.bin")
    if delete_dump:
        shutil.rmtree(before["dump"].artifacts[0].dpath)
    capsys.readouterr()
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 0
    out = capsys.readouterr().out
    if not delete_dump:  # what changed, compared with the earlier dump
        assert "differs in dataset_files; dataset files changed: labels.bin" in out
    assert re.search(r"mask/\w+: new key; mask/\w+ differs in input dump", out), out  # what is recomputed
    after = pl.make_plan(pl.load(cfg))
    for stage in ("dump", "mask", "score", "reduce"):
        assert not {a.key for a in after[stage].artifacts} & {a.key for a in before[stage].artifacts}, stage
        assert after[stage].state() == "missing", stage
    assert launch.main(launch.Args(config=cfg)) == 0
    best = next(a for a in after["reduce"].artifacts).dpath / "best.json"
    assert best.read_bytes() != old_best
    assert best.read_bytes() == clean_best_of(cfg, tmp_path / "clean")


def test_a_source_edited_under_its_old_modification_time_and_readopted_is_refused(exported, tmp_path, capsys):
    """The hole a listing of sizes and modification times leaves (a file rewritten with its mtime put back, the
    artifact deleted so that nothing checks it): the checksums first adopted under the key are kept beside the
    artifact, and adopting other contents under it is refused; `touch` gives a new key, and a clean result."""
    cfg, src = adopt_copy(exported, tmp_path)
    assert launch.main(launch.Args(config=cfg)) == 0
    dump = pl.make_plan(pl.load(cfg))["dump"].artifacts[0]
    labels = src / "labels.bin"
    st = labels.stat()
    swap_labels(labels)
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(dump.dpath)
    capsys.readouterr()
    assert launch.main(launch.Args(config=cfg)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {labels.resolve()} changed since it was adopted as {dump.ref}"
    ), errors
    assert f"`touch {labels.resolve()}`" in errors[0]
    assert not dump.is_done()
    os.utime(labels)
    assert launch.main(launch.Args(config=cfg)) == 0
    after = pl.make_plan(pl.load(cfg))
    assert after["dump"].artifacts[0].key != dump.key
    best = after["reduce"].artifacts[0].dpath / "best.json"
    assert best.read_bytes() == clean_best_of(cfg, tmp_path / "clean")


def test_a_moved_source_directory_is_adopted_again_under_the_same_key(exported, tmp_path, capsys):
    out, hashdir = exported
    shutil.copytree(hashdir, tmp_path / "src")
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    layer = json.loads((hashdir / "metadata.json").read_text())["layers"][-1]
    cfg = adopt_config(tmp_path, tmp_path / "src", layer=layer)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    key = pl.make_plan(pl.load(cfg))["dump"].artifacts[0].key
    (tmp_path / "src").rename(tmp_path / "moved")
    cfg = adopt_config(tmp_path, tmp_path / "moved", layer=layer)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    assert "is missing" in capsys.readouterr().err  # the old links were found dangling, and made again
    dump = pl.make_plan(pl.load(cfg))["dump"].artifacts[0]
    assert dump.key == key and dump.is_done()
    assert os.readlink(dump.dpath / "acts000000.bin") == str((tmp_path / "moved" / "acts000000.bin").resolve())


@pytest.mark.parametrize("inside", ["artifact", "store"])
def test_adopting_a_directory_inside_the_store_is_refused_before_anything_runs(exported, tmp_path, capsys, inside):
    """`dump.adopt.shards` naming the adopted artifact itself (or anything under the store root) would replace each
    link by a link to itself; refused with one line naming the directory, exit 2, every link left as it was."""
    out, hashdir = exported
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    layer = json.loads((hashdir / "metadata.json").read_text())["layers"][-1]
    cfg = adopt_config(tmp_path, hashdir, layer=layer)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    dump = pl.make_plan(pl.load(cfg))["dump"].artifacts[0]
    links = {p.name: os.readlink(p) for p in dump.dpath.iterdir() if p.is_symlink()}
    target = dump.dpath if inside == "artifact" else tmp_path / "runs" / "dump" / ".." / "dump"
    cfg = adopt_config(tmp_path, target, layer=layer)
    capsys.readouterr()
    for args in (launch.Args(config=cfg, dry_run=True), launch.Args(config=cfg)):
        assert launch.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: dump.adopt.shards: {target} is inside the artifact store {(tmp_path / 'runs').resolve()}"
        )
        assert err.count("\n") == 1, err
    assert {p.name: os.readlink(p) for p in dump.dpath.iterdir() if p.is_symlink()} == links
    assert launch.main(launch.Args(config=adopt_config(tmp_path, hashdir, layer=layer), stage="dump", only=True)) == 0


def test_pipeline_refusals_before_anything_runs(exported, tmp_path, capsys):
    out, hashdir = exported
    layers = json.loads((hashdir / "metadata.json").read_text())["layers"]
    (tmp_path / "classes.txt").write_text("background\nonly\n")  # fewer names than the labels use
    cfg = adopt_config(tmp_path, hashdir, layer=layers[-1])
    assert launch.main(launch.Args(config=cfg)) == 2
    assert re.search(
        r"error: .*labels\.bin: class id \d+ at image \d+, patch \d+ is not in \[0, 2\)", capsys.readouterr().err
    )
    cfg = adopt_config(tmp_path, hashdir, layer=99)
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 2
    assert (
        f"error: train.layer=99 is not among the layers of the adopted dump {hashdir / 'metadata.json'}"
        in capsys.readouterr().err
    )
    cfg = adopt_config(tmp_path, hashdir, layer=layers[-1], extra="ignore = 1")
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 2
    assert "error: dump.adopt.ignore is 1, a class id (classes are 0..1)" in capsys.readouterr().err
    cfg = adopt_config(tmp_path, tmp_path / "missing", layer=0)
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 2
    assert "is not a directory of saev shards" in capsys.readouterr().err
    cfg = write_tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[dump]", f'[dump.adopt]\nshards = "{hashdir}"\n\n[dump]'))
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 2
    assert "dump.adopt uses an existing dump, so dump.data would not be used: remove it" in capsys.readouterr().err


def test_a_dump_without_labels_is_refused_by_the_stages_that_need_them(exported, tmp_path, capsys):
    _, hashdir = exported
    src = tmp_path / "src"
    shutil.copytree(hashdir, src)
    (src / "labels.bin").unlink()
    layer = json.loads((src / "metadata.json").read_text())["layers"][-1]
    (tmp_path / "classes.txt").write_text("x\n")
    cfg = adopt_config(tmp_path, src, layer=layer)
    assert launch.main(launch.Args(config=cfg)) == 2
    err = capsys.readouterr().err
    assert f"error: {src.resolve() / 'labels.bin'} is missing: the adopted dump has no per-patch labels" in err
    assert err.count("\n") == 1


def test_export_of_a_dump_that_is_not_done_is_refused(tiny_config, tmp_path, capsys):
    assert launch.main(launch.Args(config=tiny_config, export=tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: dump/") and "is not done" in err and err.count("\n") == 1


def test_a_dump_of_our_earlier_versions_is_adopted_with_its_own_label_fields(tmp_path):
    """Protocol "1.1.0": label keys in metadata.json, the last shard truncated to its images."""
    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1,), n_patches_per_img=4, cls_token=False, d_vit=3,
                  n_imgs=3, max_patches_per_shard=8, data={}, labels_dtype="int16", labels_ignore=-1,
                  class_names=("x", "y"))  # fmt: skip
    acts = np.random.default_rng(0).normal(size=(3, 1, 4, 3)).astype(np.float32)
    writer = ShardWriter(tmp_path / "old", md)
    writer.write(acts)
    writer.write_labels(np.array([[0, 1, -1, 1]] * 3, np.int16))
    writer.close()
    old = tmp_path / "old"
    (old / "metadata.json").write_text(json.dumps({**md.to_json(), **md.labels_json(), "protocol": "1.1.0"}))
    (old / "labels.json").unlink()
    (old / "acts000001.bin").write_bytes((old / "acts000001.bin").read_bytes()[: md.bytes_per_img])
    source = saevfmt.read_source(old)
    saevfmt.adopt(source, tmp_path / "art")
    shards = Shards(tmp_path / "art")
    assert (shards.metadata.class_names, shards.metadata.labels_ignore) == (("x", "y"), -1)
    np.testing.assert_array_equal(shards.patches(1, 0, 3), acts[:, 0])
    np.testing.assert_array_equal(shards.labels, [[0, 1, -1, 1]] * 3)


def test_a_dump_of_this_pipeline_is_adopted_with_its_labels_json(tmp_path):
    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1,), n_patches_per_img=4, cls_token=False, d_vit=3,
                  n_imgs=3, max_patches_per_shard=8, data={}, labels_dtype="int16", labels_ignore=-1,
                  class_names=("x", "y"))  # fmt: skip
    writer = ShardWriter(tmp_path / "ours", md)
    writer.write(np.ones((3, 1, 4, 3), np.float32))
    writer.write_labels(np.array([[0, 1, -1, 1]] * 3, np.int16))
    writer.close()
    saevfmt.adopt(saevfmt.read_source(tmp_path / "ours"), tmp_path / "art")
    shards = Shards(tmp_path / "art")
    assert (shards.metadata.labels_dtype, shards.metadata.class_names) == ("int16", ("x", "y"))
    np.testing.assert_array_equal(shards.labels, [[0, 1, -1, 1]] * 3)


def write_own_int16_dump(dpath: pathlib.Path) -> pathlib.Path:
    md = Metadata(vit_family="clip", vit_ckpt="m", layers=(1,), n_patches_per_img=4, cls_token=False, d_vit=3,
                  n_imgs=3, max_patches_per_shard=8, data={}, labels_dtype="int16", labels_ignore=-1,
                  class_names=("x", "y"))  # fmt: skip
    writer = ShardWriter(dpath, md)
    writer.write(np.ones((3, 1, 4, 3), np.float32))
    writer.write_labels(np.array([[0, 1, -1, 1]] * 3, np.int16))
    writer.close()
    return dpath


def test_the_ignore_label_is_never_a_class_and_fits_the_labels(tmp_path):
    src = src_2x(tmp_path)
    one_line_error(
        lambda: saevfmt.read_source(src, class_names=CLASSES, ignore=1),
        re.escape("dump.adopt.ignore is 1, a class id (classes are 0..2): unlabelled patches would count"),
    )
    one_line_error(
        lambda: saevfmt.read_source(src, class_names=CLASSES, ignore=-1),
        re.escape("dump.adopt.ignore must be an integer within [0, 255] (labels.bin is uint8), got -1"),
    )
    assert saevfmt.read_source(src, class_names=CLASSES, ignore=7).metadata.labels_ignore == 7
    ours = write_own_int16_dump(tmp_path / "ours")
    # Our own int16 dump: labels.json's -1 is kept when the config names classes but no ignore value.
    assert saevfmt.read_source(ours, class_names=("p", "q")).metadata.labels_ignore == -1
    assert saevfmt.read_source(ours, class_names=("p", "q"), ignore=-7).metadata.labels_ignore == -7
    one_line_error(lambda: saevfmt.read_source(ours, ignore=0), re.escape("dump.adopt.ignore is 0, a class id"))
    edit_json(ours / "labels.json", labels_ignore=1)
    one_line_error(
        lambda: saevfmt.read_source(ours), re.escape(f"{ours / 'labels.json'}: field 'labels_ignore' is 1, a class id")
    )


@pytest.mark.parametrize("field,value,match", [
    ("labels_dtype", "float64", "field 'labels_dtype' must be 'uint8' or 'int16', got 'float64'"),
    ("labels_dtype", ["int16"], "field 'labels_dtype' must be 'uint8' or 'int16', got ['int16']"),
    ("class_names", ["x", 2], "field 'class_names' must be a list of strings, got ['x', 2]"),
    ("labels_ignore", 1.5, "field 'labels_ignore' must be an integer within [-32768, 32767]"),
    ("labels_ignore", True, "field 'labels_ignore' must be an integer within"),
    ("class_names", ["x", "x"], "field 'class_names' names class 'x' twice: entries 1 and 2"),
    ("class_names", ["x", ""], "field 'class_names' entry 2 is blank ('')"),
    ("class_names", ["x", "  "], "field 'class_names' entry 2 is blank ('  ')"),
    ("class_names", ["x", "y\nz"], "field 'class_names' entry 2 ('y\\nz') has a line break"),
])  # fmt: skip
def test_a_malformed_labels_json_is_refused_when_read(tmp_path, field, value, match):
    """Every field of an adopted dump's labels.json is checked where it is read (plan time), not at run time."""
    ours = write_own_int16_dump(tmp_path / "ours")
    edit_json(ours / "labels.json", **{field: value})
    one_line_error(lambda: saevfmt.read_source(ours), re.escape(f"{ours / 'labels.json'}: {match}"))
    with pytest.raises(ShardError, match=re.escape(match)):
        Shards(ours)


@pytest.mark.parametrize("class_names,classes_txt,match", [
    ('["background", "circle", "circle"]', None, "class_names names class 'circle' twice: entries 2 and 3"),
    ('["background", "", "b"]', None, "class_names entry 2 is blank ('')"),
    ('["background", " ", "b"]', None, "class_names entry 2 is blank (' ')"),
    ('["background", " a", "b"]', None, "class_names entry 2 (' a') has a line break or surrounding whitespace"),
    (None, "background\na\na\n", "classes.txt names class 'a' twice: lines 2 and 3"),
    (None, "background\n\na\n", "classes.txt has a blank line 2 between class names"),
    (None, "background\n \t\na\n", "classes.txt has a blank line 2 between class names"),
])  # fmt: skip
def test_an_adopted_dumps_class_list_with_a_duplicate_or_blank_is_refused(
    tmp_path, capsys, class_names, classes_txt, match
):
    """Inline `dump.adopt.class_names` or a classes.txt: a class named twice (two rows of best.json for one name, and
    an export whose classes.txt cannot be adopted back) or a blank name is one error line, before anything runs."""
    src = src_2x(tmp_path)
    cfg = adopt_config(tmp_path, src, layer=5)
    if class_names is not None:
        cfg.write_text(cfg.read_text().replace('classes = "classes.txt"', f"class_names = {class_names}"))
    else:
        (tmp_path / "classes.txt").write_text(classes_txt)
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    where = str(cfg) if class_names is not None else str(tmp_path / "classes.txt")
    assert len(errors) == 1 and where in errors[0] and match in errors[0], errors
    assert not (tmp_path / "runs").exists()


def test_export_of_int16_labels_is_refused_before_anything_is_written(tmp_path, capsys):
    """The whole export is refused (not the SAEs exported and the dump left out): OUT_DIR is not even made."""
    ours = write_own_int16_dump(tmp_path / "ours")
    (tmp_path / "classes.txt").write_text("x\ny\n")
    cfg = adopt_config(tmp_path, ours, layer=1)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    assert launch.main(launch.Args(config=cfg, export=tmp_path / "out")) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err.startswith(f"error: {tmp_path / 'runs' / 'dump'}") and "labels_dtype is 'int16'" in err
    assert not (tmp_path / "out").exists()


def test_an_identical_copy_elsewhere_is_relinked_and_a_different_one_refused(exported, tmp_path, capsys):
    """The key leaves the path out (a directory moved or copied with its modification times keeps its key): pointing
    dump.adopt.shards at another such directory relinks the done artifact, in the job (planning writes nothing), when
    its files match the recorded checksums, and refuses, naming the file, when they do not; the artifact never keeps
    reading the old one."""
    out, hashdir = exported
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    layer = json.loads((hashdir / "metadata.json").read_text())["layers"][-1]
    for name in ("one", "two", "three"):
        shutil.copytree(hashdir, tmp_path / name)  # copy2: modification times kept
    cfg = adopt_config(tmp_path, tmp_path / "one", layer=layer)
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    cfg = adopt_config(tmp_path, tmp_path / "two", layer=layer)
    dump = pl.make_plan(pl.load(cfg))["dump"].artifacts[0]
    assert os.readlink(dump.dpath / "acts000000.bin") == str((tmp_path / "one" / "acts000000.bin").resolve())
    capsys.readouterr()
    assert launch.main(launch.Args(config=cfg, dry_run=True)) == 0
    assert (
        f"relink {(tmp_path / 'one').resolve()} -> {(tmp_path / 'two').resolve()}" not in capsys.readouterr().out
    )  # not verbose
    assert launch.main(launch.Args(config=cfg, status=True)) == 0
    assert (
        f"missing: relink {(tmp_path / 'one').resolve()} -> {(tmp_path / 'two').resolve()}" in capsys.readouterr().out
    )
    assert os.readlink(dump.dpath / "acts000000.bin") == str((tmp_path / "one" / "acts000000.bin").resolve())
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 0
    assert dump.is_done() and dump.read_manifest()["adopted"] == str((tmp_path / "two").resolve())
    assert json.loads((dump.dpath / "source.json").read_text())["dpath"] == str((tmp_path / "two").resolve())
    assert os.readlink(dump.dpath / "acts000000.bin") == str((tmp_path / "two" / "acts000000.bin").resolve())
    assert launch.main(launch.Args(config=cfg, verify=True)) == 0
    flip_keeping_mtime(tmp_path / "three" / "acts000001.bin")
    cfg = adopt_config(tmp_path, tmp_path / "three", layer=layer)
    assert pl.make_plan(pl.load(cfg))["dump"].artifacts[0] == dump  # the same key
    capsys.readouterr()
    assert launch.main(launch.Args(config=cfg, stage="dump", only=True)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {(tmp_path / 'three').resolve() / 'acts000001.bin'} has another checksum: it differs "
        f"from {(tmp_path / 'two').resolve() / 'acts000001.bin'}, adopted as {dump.ref}"
    ), errors
    assert os.readlink(dump.dpath / "acts000001.bin") == str((tmp_path / "two" / "acts000001.bin").resolve())


def test_an_adopted_dump_and_two_imported_saes_give_the_native_best_latents(done_config, exported, tmp_path):
    """The whole round trip through saev's formats: `launch.py --export` writes the tiny run's dump (2.x layout) and
    its two SAEs (2.x sae.pt); a config that adopts that dump and imports those SAEs instead of training runs
    `--stage all` and gets, per class and per SAE, the native run's best latents, with APs equal to float rounding
    (the 2.x encoder bias is converted, so latents differ from ours by ~1e-7)."""
    from saev import nn, sae_files

    out, hashdir = exported
    native_plan = pl.make_plan(pl.load(done_config))
    native = json.loads((native_plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    saes = [out / "saev" / "saes" / art.key / "sae.pt" for art in native_plan["train"].artifacts]
    assert all(f.is_file() for f in saes)
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    layer = Shards(native_plan["dump"].artifacts[0].dpath).metadata.layers[-1]
    cfg = adopt_config(tmp_path, hashdir, layer=layer)
    text = cfg.read_text().replace(
        'sweep = "tiny-sweep.toml"', f'sweep = ""\nimports = {json.dumps([str(f) for f in saes])}'
    )
    cfg.write_text(text)
    assert launch.main(launch.Args(config=cfg)) == 0
    plan = pl.make_plan(pl.load(cfg))
    assert (plan["dump"].artifacts[0].dpath / "source.json").is_file()  # adopted, not dumped
    got = json.loads((plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    key_map = {a.key: b.key for a, b in zip(native_plan["train"].artifacts, plan["train"].artifacts, strict=True)}
    for want_sae, got_sae in key_map.items():
        native_sae, imported_sae = (
            nn.load(native_plan["train"].artifacts[0].dpath.parent / want_sae),
            nn.load(plan["train"].artifacts[0].dpath.parent / got_sae),
        )
        x = torch.randn(64, native_sae.cfg.d_vit)
        with torch.no_grad():
            f_got, f_want = imported_sae(x).f_BS, native_sae(x).f_BS
        assert_within(f_got, f_want, 2 * sae_forward_bounds(native_sae, x)[0], "f")
        assert sae_files.read_sae(saes[list(key_map).index(want_sae)]).fmt == "saev-2-schema5"
    for want, row in zip(native["classes"], got["classes"], strict=True):
        assert (row["name"], row["prototype"], row["dead"]) == (want["name"], want["prototype"], want["dead"])
        assert row["sae"] == key_map.get(want["sae"])
        for field in ("ap", "heldout_ap"):
            assert (row[field] is None) == (want[field] is None)
            if want[field] is not None:
                assert row[field] == pytest.approx(want[field], abs=1e-6)
    for native_key, key in key_map.items():
        assert [c["prototype"] for c in got["per_sae"][key]["classes"]] == [
            c["prototype"] for c in native["per_sae"][native_key]["classes"]
        ]


def test_adopting_a_dump_asks_slurm_for_no_gpu(exported, tmp_path):
    """The adopt job only links and hashes files: its sbatch options ask for no GPU, whatever [slurm.dump] says;
    the other stages keep theirs."""
    from saev import slurm
    from saev.engine import executors

    out, hashdir = exported
    shutil.copy(hashdir / "classes.txt", tmp_path / "classes.txt")
    layer = json.loads((hashdir / "metadata.json").read_text())["layers"][-1]
    cfg = adopt_config(tmp_path, hashdir, layer=layer)
    cfg.write_text(cfg.read_text() + '\n[slurm.dump]\ngpus = "a100:2"\ncpus = 3\n')
    pipeline = pl.load(cfg)
    params = slurm.executor_parameters(executors.stage_slurm(pl.REGISTRY, pipeline, "dump"), "dump")
    assert "gpus_per_node" not in params and "gres" not in params and params["cpus_per_task"] == 3
    assert (
        slurm.executor_parameters(executors.stage_slurm(pl.REGISTRY, pipeline, "train"), "train")["gpus_per_node"] == 1
    )


@pytest.mark.parametrize("ledger", [b"[]", b'{"labels.bin": 5}', b'{"labels.bin": "ab', b"\xff\xfe"], ids=repr)
def test_a_damaged_record_of_what_was_adopted_is_one_error_and_deleting_it_recovers(exported, tmp_path, capsys, ledger):
    """`<root>/dump/.adopted/<key>.json` of another shape, truncated or not text: one line naming it and what to do;
    deleting it, as the line says, adopts the source again and gives a clean run's best.json."""
    cfg, _ = adopt_copy(exported, tmp_path)
    dump = pl.make_plan(pl.load(cfg))["dump"].artifacts[0]
    record = dump.root / "dump" / ".adopted" / f"{dump.key}.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(ledger)
    capsys.readouterr()
    assert launch.main(launch.Args(config=cfg)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {record}: cannot read what was adopted"), errors
    assert "delete it" in errors[0]
    record.unlink()
    assert launch.main(launch.Args(config=cfg)) == 0
    best = pl.make_plan(pl.load(cfg))["reduce"].artifacts[0].dpath / "best.json"
    assert best.read_bytes() == clean_best_of(cfg, tmp_path / "clean")
