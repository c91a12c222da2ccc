"""Every documented recovery works: damage a finished run the way scratch purges, crashes, bit rot or a hostile user
would, run the command the README's "When things go wrong" table gives, and get exactly the clean run's results.

Each case: corrupt a private copy of the finished tiny run, run the README's command (exit 0), then best.json is
byte-identical to the clean run's and `--verify` finds every file matching its checksum.
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from tests.helpers import flip_byte, run


def one(root: pathlib.Path, pattern: str, index: int = 0) -> pathlib.Path:
    found = sorted(root.glob(pattern))
    assert found, pattern
    return found[index]


def delete(pattern):
    def corrupt(root):
        one(root, pattern).unlink()

    return corrupt


def truncate(pattern, size=1000):
    def corrupt(root):
        with open(one(root, pattern), "r+b") as fd:
            fd.truncate(size)

    return corrupt


def flip(pattern, offset=None):
    def corrupt(root):
        flip_byte(one(root, pattern), offset)

    return corrupt


def manifest_not_json(stage):
    def corrupt(root):
        one(root, f"{stage}/*/manifest.json").write_text('{"stage": "dump", "files": {')

    return corrupt


def manifest_wrong_size(stage):
    def corrupt(root):
        fpath = one(root, f"{stage}/*/manifest.json")
        manifest = json.loads(fpath.read_text())
        rel = sorted(manifest["files"])[0]
        manifest["files"][rel]["size"] += 8
        fpath.write_text(json.dumps(manifest))

    return corrupt


def manifest_of_another_key(root):
    first, second = sorted(root.glob("train/*/manifest.json"))[:2]
    shutil.copy(second, first)


def link_to_another_key(root):
    first, second = sorted(p for p in root.glob("train/*") if p.is_dir())[:2]
    shutil.rmtree(first)
    first.symlink_to(second)


def keep_duplicated(root):
    """Same size, still a valid .npy: two kept patches become the same one."""
    fpath = one(root, "mask/*/keep.npy")
    keep = np.load(fpath)
    keep[1] = keep[0]
    np.save(fpath, keep)


def bit_rot(pattern):
    """A corruption that no stat can see: the verified-state record is updated to the corrupted file's state."""

    def corrupt(root):
        fpath = one(root, pattern)
        flip_byte(fpath)
        verified_fpath = fpath.parent / ".verified.json"
        verified = json.loads(verified_fpath.read_text())
        st = fpath.stat()
        verified[fpath.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        verified_fpath.write_text(json.dumps(verified))

    return corrupt


# (id, corruption, the README's command as launch.Args fields, whether `--verify` must be run first)
CASES = [
    ("shard-missing", delete("dump/*/acts000001.bin"), {"stage": "dump"}),
    ("shard-truncated", truncate("dump/*/acts000000.bin"), {"stage": "dump"}),
    ("shard-corrupted-same-size", flip("dump/*/acts000002.bin"), {"stage": "dump"}),
    ("labels-missing", delete("dump/*/labels.bin"), {"stage": "dump"}),
    ("labels-part-corrupted", flip("dump/*/parts/labels000001.npy"), {"stage": "dump"}),
    ("dump-manifest-not-json", manifest_not_json("dump"), {"stage": "dump"}),
    ("dump-manifest-sizes-disagree", manifest_wrong_size("dump"), {"stage": "dump"}),
    ("sae-weights-missing", delete("train/*/sae.safetensors"), {"stage": "train"}),
    ("sae-weights-corrupted-same-size", flip("train/*/sae.safetensors"), {"stage": "train"}),
    ("train-manifest-of-another-key", manifest_of_another_key, {"stage": "train"}),
    ("train-dir-linked-to-another-key", link_to_another_key, {"stage": "train"}),
    ("keep-mask-duplicated", keep_duplicated, {"stage": "mask"}),
    ("kept-activations-corrupted-same-size", flip("kept/*/acts.npy"), {"stage": "kept"}),
    ("partial-missing", delete("score/*/partials/block00001.safetensors"), {"stage": "score"}),
    ("partial-corrupted-same-size", flip("score/*/partials/block00000.safetensors"), {"stage": "score"}),
    ("best-json-corrupted", flip("reduce/*/best.json", 5), {"stage": "reduce"}),
    (
        "everything-all-at-once",
        lambda root: [
            c(root)
            for c in (
                delete("dump/*/acts000001.bin"),
                flip("train/*/sae.safetensors"),
                keep_duplicated,
                delete("score/*/partials/block00001.safetensors"),
            )
        ],
        {"stage": "all"},
    ),
]


@pytest.fixture(scope="module")
def clean_best(done_config) -> bytes:
    return one(done_config.parent / "runs", "reduce/*/best.json").read_bytes()


@pytest.mark.parametrize("corrupt,command", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_readme_command_recovers_the_clean_result(copy_of_done, clean_best, capsys, corrupt, command):
    root = copy_of_done.parent / "runs"
    corrupt(root)
    assert run(copy_of_done, **command) == 0, capsys.readouterr().err
    assert one(root, "reduce/*/best.json").read_bytes() == clean_best
    capsys.readouterr()
    assert run(copy_of_done, verify=True) == 0, capsys.readouterr().out
    assert run(copy_of_done) == 0
    assert "running" not in capsys.readouterr().out  # nothing left to do


def test_bit_rot_is_found_by_verify_then_recovered_by_a_rerun(copy_of_done, clean_best, capsys):
    root = copy_of_done.parent / "runs"
    shard = one(root, "dump/*/acts000002.bin")
    bit_rot("dump/*/acts000002.bin")(root)
    assert run(copy_of_done) == 0  # a stat cannot see it: the cheap checks pass
    capsys.readouterr()
    assert run(copy_of_done, verify=True) == 1
    out = capsys.readouterr().out
    assert f"bad: {shard} does not match its checksum" in out
    for stage in ("train", "mask", "score", "reduce"):  # what was made from the dump is named
        assert f"{stage}/" in out.split("made from dump/")[1]
    assert "1 bad file(s)" in out
    assert run(copy_of_done) == 0
    assert "dump: running 1 piece(s)" in capsys.readouterr().out  # only the chunk holding the shard
    assert one(root, "reduce/*/best.json").read_bytes() == clean_best
    assert run(copy_of_done, verify=True) == 0


def test_a_fixed_mask_then_stage_dump_runs_to_the_end(tiny_config, capsys):
    """README: 'mask ... has class id 7, outside the 3 classes' -> fix or remove that image, then `--stage dump`."""
    from tests.cli.test_bad_inputs import _bad_class_id
    from tests.helpers import folder

    folder(_bad_class_id)(tiny_config)
    assert run(tiny_config) == 1
    assert "has class id 7" in capsys.readouterr().err
    data = tiny_config.parent / "data"
    (data / "masks" / "img2.png").unlink()
    (data / "images" / "img2.png").unlink()
    assert run(tiny_config, stage="dump") == 0
    out = capsys.readouterr().out
    assert "best latent per class" in out


def test_editing_the_dataset_gives_a_new_dump_and_says_why(tiny_config, capsys):
    from PIL import Image

    from tests.helpers import folder

    folder()(tiny_config)
    assert run(tiny_config) == 0
    capsys.readouterr()
    img = tiny_config.parent / "data" / "images" / "img5.png"
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(img)  # edited in place
    assert run(tiny_config, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "dump     " in out and "differs in dataset_files" in out and "images/img5.png" in out
    assert run(tiny_config) == 0
    assert "dump: running" in capsys.readouterr().out
    os.utime(img)


def test_a_file_written_wrong_is_named_and_deleting_its_artifact_recovers(copy_of_done, clean_best, capsys):
    """README: a file holding values no run writes, with a matching checksum (written that way) -> the reading
    stage names it; deleting that artifact's directory and rerunning gives the clean result."""
    from tests.helpers import reseal

    root = copy_of_done.parent / "runs"
    keep_duplicated(root)
    reseal(root)
    shutil.rmtree(one(root, "score/*", 0))  # so that a stage reads the mask again
    assert run(copy_of_done) == 1
    err = capsys.readouterr().err
    assert "keep.npy" in err and "appears twice" in err
    shutil.rmtree(one(root, "mask/*"))
    assert run(copy_of_done) == 0
    assert one(root, "reduce/*/best.json").read_bytes() == clean_best


@pytest.mark.parametrize("edit", [
    lambda f: flip_byte(f),  # same size, other contents
    lambda f: f.write_bytes(f.read_bytes()[:-8]),  # truncated
    lambda f: shutil.copy(f.parent / "block00001.safetensors", f),  # another block's contents (another piece's record)
], ids=["same-size", "truncated", "other-block"])  # fmt: skip
def test_a_piece_edited_before_its_artifact_was_sealed_is_recomputed_not_sealed(copy_of_done, clean_best, capsys, edit):
    """A run interrupted before a score artifact was sealed (its last block not written, reduce not run), one written
    block then edited: the rerun warns, moves the block aside and recomputes it, and best.json is the clean one."""
    root = copy_of_done.parent / "runs"
    score = one(root, "score/*/manifest.json").parent
    (score / "manifest.json").unlink()
    block = score / "partials" / "block00000.safetensors"
    size = block.stat().st_size
    edit(block)  # edited after its job wrote it...
    same_size = block.stat().st_size == size
    (score / "partials" / "block00001.safetensors").unlink()  # ... while the next block was not written yet
    for dpath in root.glob("reduce/*"):
        shutil.rmtree(dpath)
    assert run(copy_of_done) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if same_size:  # else not the size written: simply not done, recomputed without a word
        assert len(warnings) == 1 and f"{block} changed after its job wrote it" in warnings[0], err
        assert "moved partials/block00000.safetensors aside: stage score recomputes it" in warnings[0]
    assert one(root, "reduce/*/best.json").read_bytes() == clean_best
    assert run(copy_of_done, verify=True) == 0
