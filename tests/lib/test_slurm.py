"""A job's own Slurm identity and requeue, without a cluster (environment variables as Slurm sets them)."""

import re

import pytest

from saev import preemption, slurm
from tests.helpers import REPO


def test_job_id_outside_slurm_is_none(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm.job_id() is None


def test_job_id_of_a_plain_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert slurm.job_id() == "123"


def test_job_id_of_an_array_task_is_arrayjob_task(monkeypatch):
    """What `slurm.submit` returns for an array task, so the ledger and the manifest name the same job."""
    monkeypatch.setenv("SLURM_JOB_ID", "130")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "123")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm.job_id() == "123_7"


def test_requeue_outside_slurm_reraises(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    err = preemption.Preempted(3, 10, None)
    with pytest.raises(preemption.Preempted, match=r"after step 3/10 \(no checkpoint file"):
        slurm.requeue(err)


def test_checkpoint_request_is_taken_once():
    preemption.request_checkpoint()
    assert preemption.take_checkpoint_request()
    assert not preemption.take_checkpoint_request()


def test_run_tests_syncs_the_environment_before_entering_the_network_namespace():
    """slurm/local/run-tests.sh runs pytest inside the cluster's network namespace, where only loopback is reachable:
    a fresh clone (no .venv) must be synced before (`uv sync --locked`), and nothing inside may sync (`uv run
    --no-sync`), or the first `uv run` fails to reach the package registry."""
    script = REPO / "slurm" / "local" / "run-tests.sh"
    lines = [line.strip() for line in script.read_text().splitlines()]
    commands = [(i, line) for i, line in enumerate(lines) if line and not line.startswith("#")]
    sync = [i for i, line in commands if re.match(r"uv sync --locked\b", line)]
    in_namespace = [i for i, line in commands if "nsenter" in line or "up.sh" in line]
    assert sync and in_namespace and sync[0] < in_namespace[0], (sync, in_namespace)
    uv_runs = [line for _, line in commands if re.search(r"\buv run\b", line)]
    assert uv_runs and all("uv run --no-sync" in line for line in uv_runs), uv_runs
