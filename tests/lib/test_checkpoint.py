"""Checkpoints: one atomic safetensors file with JSON scalars; a preempted or killed run resumes to the very same
weights as an uninterrupted one; a checkpoint of other configs or data is refused."""

import dataclasses
import logging
import os
import signal

import numpy as np
import pytest
import safetensors.numpy
import torch

from saev import checkpoint, nn, objectives, training
from saev.objectives import BatchTopK

TINY = training.TrainConfig(
    sae=nn.SaeConfig(d_vit=8, exp_factor=2), n_train=640, batch_size=64, warmup_steps=3, n_eval=88
)
TINY_BATCHTOPK = dataclasses.replace(TINY, objective=BatchTopK(k=1, aux_k=2, dead_tokens=64))
"""BatchTopK: besides weights and Adam, its state has a threshold estimate and dead-latent counters (AuxK fires)."""


@pytest.fixture(scope="module")
def tiny_acts() -> np.ndarray:
    """Rows of 2 of 12 random atoms with positive weights, plus an offset; 512 rows train, 88 are held out."""
    rng = np.random.default_rng(1)
    atoms_AD = rng.standard_normal((12, 8))
    codes_NA = np.zeros((600, 12))
    for i in range(600):
        codes_NA[i, rng.choice(12, size=2, replace=False)] = rng.uniform(1, 3, size=2)
    return (codes_NA @ atoms_AD + 0.5).astype(np.float32)


@pytest.fixture(autouse=True)
def no_pending_request(monkeypatch):
    """Each test starts and ends without a pending checkpoint request."""
    monkeypatch.setattr("saev.preemption._checkpoint_requested", False)


class OnStep(logging.Handler):
    """Calls `action` when training logs the progress line of step `step` (run with log_every=1)."""

    def __init__(self, step: int, action):
        super().__init__()
        self.step, self.action = step, action

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(f"step {self.step}/"):
            self.action()


def train_with(cfgs, acts, action_at: tuple[int, object] | None = None, **kwargs):
    logger = logging.getLogger(f"test_checkpoint.{id(cfgs)}")
    logger.setLevel(logging.INFO)
    handler = OnStep(*action_at) if action_at else None
    if handler:
        logger.addHandler(handler)
    try:
        return training.train_group(cfgs, acts, log_every=1, logger=logger, **kwargs)
    finally:
        if handler:
            logger.removeHandler(handler)


def assert_same_results(a: list[training.TrainResult], b: list[training.TrainResult]):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for name, tensor in ra.sae.state_dict().items():
            assert torch.equal(tensor, rb.sae.state_dict()[name]), name
        assert ra.sae.activation == rb.sae.activation
        assert ra.metrics == rb.metrics


##########
# Format #
##########


def test_save_load_round_trip(tmp_path):
    fpath = tmp_path / "ckpt.safetensors"
    tensors = {"w": torch.randn(3, 4), "n": torch.arange(5), "t": torch.tensor([0.1], dtype=torch.float64)}
    checkpoint.save(fpath, tensors, kind="test", version=2, meta={"step": 7, "names": ["a", "b"]})
    loaded, meta = checkpoint.load(fpath, kind="test", version=2)
    assert meta == {"step": 7, "names": ["a", "b"]}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [
        "ckpt.safetensors"
    ]  # one file, no temp left over


def test_checkpoint_is_plain_safetensors(tmp_path):
    """Readable by the numpy loader: no pickled objects anywhere."""
    fpath = tmp_path / "ckpt.safetensors"
    checkpoint.save(fpath, {"w": torch.ones(2)}, kind="test", version=1, meta={})
    np.testing.assert_array_equal(safetensors.numpy.load_file(str(fpath))["w"], np.ones(2, dtype=np.float32))


@pytest.mark.parametrize(("kind", "version"), [("other", 1), ("test", 2)])
def test_load_refuses_another_kind_or_version(tmp_path, kind, version):
    fpath = tmp_path / "ckpt.safetensors"
    checkpoint.save(fpath, {"w": torch.ones(2)}, kind="test", version=1, meta={})
    with pytest.raises(ValueError, match="is a 'test' checkpoint of version 1"):
        checkpoint.load(fpath, kind=kind, version=version)


def test_load_refuses_files_that_are_not_checkpoints(tmp_path):
    plain, garbage = tmp_path / "plain.safetensors", tmp_path / "garbage.safetensors"
    safetensors.numpy.save_file({"w": np.ones(2)}, str(plain))
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a saev checkpoint"):
        checkpoint.load(plain, kind="test", version=1)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        checkpoint.load(garbage, kind="test", version=1)
    with pytest.raises(FileNotFoundError, match="missing"):
        checkpoint.load(tmp_path / "nope.safetensors", kind="test", version=1)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    fpath = tmp_path / "ckpt.safetensors"
    checkpoint.save(fpath, {"w": torch.ones(2)}, kind="test", version=1, meta={"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # checkpoint.save serialises in memory and writes through atomic.atomic_path, which fsyncs the temp file
    # (where a full disk surfaces on filesystems that allocate late).
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(fpath, {"w": torch.zeros(2)}, kind="test", version=1, meta={"step": 2})
    assert checkpoint.load(fpath, kind="test", version=1)[1] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ckpt.safetensors"]


##############
# Data order #
##############


##########
# Resume #
##########


@pytest.mark.parametrize(
    "cfgs",
    [
        [TINY],
        [
            TINY_BATCHTOPK,
            dataclasses.replace(TINY_BATCHTOPK, objective=BatchTopK(k=2, aux_k=2, dead_tokens=64), lr=3e-3),
        ],
    ],
)
@pytest.mark.parametrize("stop_at", [1, 4, 10])
def test_preempted_then_resumed_run_equals_an_uninterrupted_run(tiny_acts, tmp_path, cfgs, stop_at):
    fpath = tmp_path / "ckpt.safetensors"
    with pytest.raises(training.Preempted) as info:
        train_with(cfgs, tiny_acts, action_at=(stop_at, training.request_checkpoint), checkpoint_fpath=fpath)
    assert (info.value.step, info.value.n_steps, info.value.checkpoint_fpath) == (stop_at, 10, fpath)
    assert checkpoint.load(fpath, kind="saev.training.GroupTrainer", version=2)[1]["step"] == stop_at

    resumed = train_with(cfgs, tiny_acts, checkpoint_fpath=fpath)
    assert_same_results(resumed, training.train_group(cfgs, tiny_acts))


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(tiny_acts, tmp_path):
    fpath = tmp_path / "ckpt.safetensors"

    def crash():
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing is saved at step 8

    with pytest.raises(KeyboardInterrupt):
        train_with([TINY_BATCHTOPK], tiny_acts, action_at=(8, crash), checkpoint_fpath=fpath, checkpoint_every=3)
    assert checkpoint.load(fpath, kind="saev.training.GroupTrainer", version=2)[1]["step"] == 6

    resumed = train_with([TINY_BATCHTOPK], tiny_acts, checkpoint_fpath=fpath, checkpoint_every=3)
    assert_same_results(resumed, [training.train(TINY_BATCHTOPK, tiny_acts)])


def test_resume_is_logged(tiny_acts, tmp_path, caplog):
    fpath = tmp_path / "ckpt.safetensors"
    train_with([TINY], tiny_acts, checkpoint_fpath=fpath, checkpoint_every=4)
    with caplog.at_level(logging.INFO):
        train_with([TINY], tiny_acts, checkpoint_fpath=fpath)
    assert any(f"resumed from {fpath} at step 8/10" in r.getMessage() for r in caplog.records)


def test_sigusr2_preempts_a_run_that_then_resumes(tiny_acts, tmp_path):
    """What the train stage does on Slurm: SIGUSR2 -> request_checkpoint -> save, Preempted, requeue, resume."""
    fpath = tmp_path / "ckpt.safetensors"
    previous = signal.signal(signal.SIGUSR2, training.request_checkpoint)
    try:
        with pytest.raises(training.Preempted, match=r"after step \d+/10 \(state saved to .*ckpt.safetensors\)"):
            train_with([TINY], tiny_acts, action_at=(3, lambda: os.kill(os.getpid(), signal.SIGUSR2)),
                       checkpoint_fpath=fpath)  # fmt: skip
    finally:
        signal.signal(signal.SIGUSR2, previous)
    resumed = train_with([TINY], tiny_acts, checkpoint_fpath=fpath)
    assert_same_results(resumed, [training.train(TINY, tiny_acts)])


def test_request_without_a_checkpoint_file_stops_and_saves_nothing(tiny_acts, tmp_path):
    with pytest.raises(training.Preempted, match="no checkpoint file, nothing saved") as info:
        train_with([TINY], tiny_acts, action_at=(2, training.request_checkpoint))
    assert info.value.checkpoint_fpath is None and info.value.step == 2


def test_a_request_is_handled_once(tiny_acts):
    training.request_checkpoint()
    with pytest.raises(training.Preempted):
        training.train(TINY, tiny_acts)
    training.train(TINY, tiny_acts)  # the request was consumed


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (dataclasses.replace(TINY, lr=3e-3), "configs"),
        (dataclasses.replace(TINY, warmup_steps=1), "configs"),
    ],
)
def test_a_checkpoint_of_other_configs_is_refused(tiny_acts, tmp_path, other, what):
    fpath = tmp_path / "ckpt.safetensors"
    train_with([TINY], tiny_acts, checkpoint_fpath=fpath, checkpoint_every=5)
    with pytest.raises(ValueError, match=rf"checkpoint .* was made for other {what}.*delete it to start over"):
        training.train(other, tiny_acts, checkpoint_fpath=fpath)


def test_a_checkpoint_of_other_data_is_refused(tiny_acts, tmp_path):
    fpath = tmp_path / "ckpt.safetensors"
    train_with([TINY], tiny_acts, checkpoint_fpath=fpath, checkpoint_every=5)
    with pytest.raises(ValueError, match="was made for other scale"):
        training.train(TINY, tiny_acts * 2, checkpoint_fpath=fpath)
    with pytest.raises(ValueError, match="was made for other n_rows"):
        training.train(TINY, tiny_acts[:-1], checkpoint_fpath=fpath)


def test_checkpoint_every_must_be_positive(tiny_acts, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be positive"):
        training.train(TINY, tiny_acts, checkpoint_fpath=tmp_path / "c.safetensors", checkpoint_every=0)


def test_a_tiled_group_resumes_to_the_uninterrupted_result(tiny_acts, tmp_path, monkeypatch):
    """BatchTopK thresholds live in per-tile objectives; the checkpoint gathers and restores them."""
    cfgs = [
        TINY_BATCHTOPK,
        dataclasses.replace(TINY_BATCHTOPK, objective=BatchTopK(k=2, aux_k=2, dead_tokens=64), lr=3e-3),
        dataclasses.replace(TINY_BATCHTOPK, objective=BatchTopK(k=3, aux_k=2, dead_tokens=64)),
    ]
    uninterrupted = training.train_group(cfgs, tiny_acts)
    monkeypatch.setattr(objectives, "_CPU_TILE_BYTES", 1)  # one SAE per tile
    fpath = tmp_path / "ckpt.safetensors"
    with pytest.raises(training.Preempted):
        train_with(cfgs, tiny_acts, action_at=(4, training.request_checkpoint), checkpoint_fpath=fpath)
    assert_same_results(train_with(cfgs, tiny_acts, checkpoint_fpath=fpath), uninterrupted)
