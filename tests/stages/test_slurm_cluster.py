"""The local single-node Slurm itself (slurm/local/up.sh), checked with submitit before the pipeline relies on it:
a job runs and returns, an array is throttled, MaxArraySize is the small known limit, an afterok chain is cancelled
when upstream fails, a GPU job gets CUDA_VISIBLE_DEVICES, and sacct (slurmdbd accounting) reports the states.

Run with `bash slurm/local/run-tests.sh tests/stages/test_slurm_cluster.py` (it starts the cluster in a network namespace
and runs `pytest -m slurm` inside it). Outside such a cluster every test here is skipped, and run-tests.sh fails
on a skip.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import cloudpickle
import pytest

pytestmark = pytest.mark.slurm

# slurm/local/up.sh sets MaxArraySize=20 (indices 0..19) so that splitting large arrays is exercised.
LOCAL_MAX_ARRAY_SIZE = 20


def _run(*cmd: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sinfo") is None:
        pytest.skip("no Slurm client (sinfo) on PATH; run slurm/local/run-tests.sh")
    try:
        out = _run("sinfo", "-h", "-o", "%T", timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"sinfo did not answer ({err}); run slurm/local/run-tests.sh")
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        pytest.skip(f"no Slurm controller reachable ({out.stderr.strip()}); run slurm/local/run-tests.sh")
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        pytest.skip(f"no usable Slurm node (states: {states}); run slurm/local/run-tests.sh")


@pytest.fixture
def executor(tmp_path):
    import submitit

    ex = submitit.SlurmExecutor(folder=tmp_path, max_num_timeout=0)
    ex.update_parameters(time=5, cpus_per_task=1, stderr_to_stdout=True)
    return ex


def sacct_state(job_id: str) -> str:
    """The allocation's state as slurmdbd recorded it ("" while sacct does not know the job yet)."""
    out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()  # e.g. "CANCELLED by 0"
    return words[0] if words else ""


def wait_for_state(job_id: str, wanted: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = sacct_state(job_id)
        if state in wanted:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} is {state or 'unknown to sacct'} after {timeout:.0f}s, wanted {wanted}")


# Job bodies. pytest imports this file from tests/, which the job's interpreter cannot import, so pickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a, b):
    return a + b


def square(x):
    return x * x


def fail():
    raise RuntimeError("upstream failed on purpose")


def gpu_env():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("SLURM_JOB_GPUS")


def test_job_runs_and_returns_and_sacct_records_it(executor):
    job = executor.submit(add, 2, 3)
    assert job.result() == 5
    assert wait_for_state(job.job_id, {"COMPLETED"}) == "COMPLETED"


def test_failed_job_raises_and_sacct_says_failed(executor):
    import submitit

    job = executor.submit(fail)
    with pytest.raises(submitit.core.utils.FailedJobError, match="upstream failed on purpose"):
        job.result()
    assert wait_for_state(job.job_id, {"FAILED"}) == "FAILED"


def test_array_with_parallelism(executor):
    executor.update_parameters(array_parallelism=2)
    jobs = executor.map_array(square, range(5))
    array_id = jobs[0].job_id.split("_")[0]
    assert all(j.job_id.startswith(array_id + "_") for j in jobs)
    batch = "".join(p.read_text() for p in executor.folder.glob("*submission.sh"))
    assert re.search(r"#SBATCH --array=0-4%2\b", batch), batch
    assert [j.result() for j in jobs] == [0, 1, 4, 9, 16]
    assert {wait_for_state(j.job_id, {"COMPLETED"}) for j in jobs} == {"COMPLETED"}


def test_max_array_size_is_the_small_known_limit(executor):
    out = _run("scontrol", "show", "config")
    assert out.returncode == 0, out.stderr
    assert re.search(rf"^MaxArraySize\s*=\s*{LOCAL_MAX_ARRAY_SIZE}$", out.stdout, re.M), out.stdout
    # Indices must be < MaxArraySize: an array of LOCAL_MAX_ARRAY_SIZE tasks fits, one more does not.
    with pytest.raises(Exception, match=r"(?i)array"):
        executor.map_array(square, range(LOCAL_MAX_ARRAY_SIZE + 1))
    ok = _run("sbatch", "--parsable", "--hold", f"--array=0-{LOCAL_MAX_ARRAY_SIZE - 1}", "--wrap", "true")
    assert ok.returncode == 0, ok.stderr
    _run("scancel", ok.stdout.strip().split(";")[0])


def test_afterok_downstream_is_cancelled_when_upstream_fails(executor):
    import submitit

    up = executor.submit(fail)
    executor.update_parameters(
        additional_parameters={"kill-on-invalid-dep": "yes", "dependency": f"afterok:{up.job_id}"}
    )
    down = executor.submit(add, 1, 1)
    with pytest.raises(submitit.core.utils.FailedJobError):
        up.result()
    assert wait_for_state(down.job_id, {"CANCELLED", "COMPLETED", "FAILED"}) == "CANCELLED"
    assert wait_for_state(up.job_id, {"FAILED"}) == "FAILED"


def test_afterok_downstream_runs_after_upstream_succeeds(executor):
    up = executor.submit(add, 1, 2)
    executor.update_parameters(
        additional_parameters={"kill-on-invalid-dep": "yes", "dependency": f"afterok:{up.job_id}"}
    )
    down = executor.submit(add, 10, 20)
    assert down.result() == 30 and up.result() == 3
    assert wait_for_state(down.job_id, {"COMPLETED"}) == "COMPLETED"


def test_gpu_job_sees_cuda_visible_devices(executor):
    executor.update_parameters(gpus_per_node=1)
    job = executor.submit(gpu_env)
    cuda, job_gpus = job.result()
    assert cuda in ("0", "1"), (cuda, job_gpus)
    assert job_gpus in ("0", "1"), (cuda, job_gpus)
    out = _run("sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "AllocTRES")
    assert "gres/gpu=1" in out.stdout, out.stdout
