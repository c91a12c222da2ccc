"""The pipeline on a real Slurm (slurm/local/run-tests.sh starts one): the whole graph submitted at once, a failed
K-block resubmitted alone, downstream cancelled when upstream fails, status, and requeue with resume.

Run with `bash slurm/local/run-tests.sh` (it starts a single-node cluster in a network namespace and runs
`pytest -m slurm` inside it).
"""

import json
import pathlib
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, launch, write_tiny_config

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def cluster():
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no Slurm here ({err}); run slurm/local/run-tests.sh")
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip(f"no Slurm here: {out.stderr.strip()}; run slurm/local/run-tests.sh")


SLURM_SECTION = """
[slurm]
log_dpath = "{logs}"
max_array_size = 3
[slurm.dump]
gpus = 0
cpus = 1
mem_gb = 1
hours = 0.2
[slurm.train]
gpus = 1
cpus = 1
mem_gb = 1
hours = 0.2
[slurm.mask]
cpus = 1
mem_gb = 1
hours = 0.2
[slurm.kept]
cpus = 1
mem_gb = 1
hours = 0.2
[slurm.score]
gpus = 1
cpus = 1
mem_gb = 1
hours = 0.2
array_parallelism = 2
[slurm.reduce]
cpus = 1
mem_gb = 1
hours = 0.2
"""


def slurm_config(tmp_path: pathlib.Path) -> pathlib.Path:
    cfg = write_tiny_config(tmp_path)
    cfg.write_text(cfg.read_text() + SLURM_SECTION.format(logs=tmp_path / "logs"))
    return cfg


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    from saev import slurm

    return slurm.job_states(job_ids)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stage_states(out: str) -> dict[str, str]:
    """Stage -> done/partial/missing from the launcher's plan table."""
    stages = ("dump", "train", "mask", "kept", "score", "reduce")
    states = {}
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in stages:
            states[words[0]] = next(w for w in words if w in ("done", "partial", "missing"))
    return states


def job_ids_of(out: str, stage: str) -> list[str]:
    for line in out.splitlines():
        if line.startswith(f"{stage}: submitted") and "[" in line:
            return line.split("[", 1)[1].split("]", 1)[0].split(", ")
    return []


def test_whole_graph_is_submitted_at_once_and_completes_after_the_launcher_exits(tmp_path):
    cfg = slurm_config(tmp_path)
    start = time.monotonic()
    done = launch(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - start < 60  # it returned right after submitting
    out = done.stdout
    for stage in ("dump", "train", "mask", "kept", "score", "reduce"):
        assert job_ids_of(out, stage), f"{stage} not submitted:\n{out}"
    assert "score: submitted 4 job(s)" in out  # 2 SAEs x 2 blocks, in arrays of at most 3
    assert len(job_ids_of(out, "score")) == 2  # split into two arrays (max_array_size = 3)
    best = wait_for(lambda: list((tmp_path / "runs").glob("reduce/*/manifest.json")), 600, "reduce to finish")
    result = json.loads((best[0].parent / "best.json").read_text())
    assert len(result["classes"]) == 6
    status = launch(cfg, "--status")
    assert status.returncode == 0
    assert stage_states(status.stdout) == {s: "done" for s in ("dump", "train", "mask", "kept", "score", "reduce")}
    again = launch(cfg)  # nothing left to submit
    assert ": submitted" not in again.stdout and again.stdout.count("done, skipping") == 6


def test_failed_block_cancels_reduce_and_is_resubmitted_alone(tmp_path):
    cfg = slurm_config(tmp_path)
    plan_out = launch(cfg, "--dry-run").stdout
    assert "score" in plan_out
    # Make exactly one K-block fail: a directory where its partial file must go makes the atomic rename fail.
    sys.path.insert(0, str(REPO))
    from stages import pipeline as pl

    plan = pl.make_plan(pl.load(cfg))
    victim = plan["score"].pieces[1].fpath
    victim.mkdir(parents=True)
    first = launch(cfg)
    assert first.returncode == 0, first.stdout + first.stderr
    reduce_jobs = job_ids_of(first.stdout, "reduce")
    states = wait_for(
        lambda: (s := sacct_states(reduce_jobs)) and s.get(reduce_jobs[0]) == "CANCELLED" and s,
        600,
        "reduce to be cancelled after the failed block",
    )
    assert states[reduce_jobs[0]] == "CANCELLED"  # not left pending forever

    status = launch(cfg, "--status").stdout
    assert "failed: sae" in status and "log:" in status, status
    assert "could not write" in status or "Is a directory" in status, status

    victim.rmdir()
    other = [p.fpath for p in plan["score"].pieces if p.fpath != victim and p.fpath.exists()]
    mtimes = {p: p.stat().st_mtime_ns for p in other}
    second = launch(cfg, "--stage", "score")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "score: submitted 1 job(s)" in second.stdout, second.stdout
    assert "reduce: submitted 1 job(s)" in second.stdout
    wait_for(lambda: list((tmp_path / "runs").glob("reduce/*/manifest.json")), 600, "reduce after resubmission")
    assert {p: p.stat().st_mtime_ns for p in other} == mtimes  # the other blocks were not recomputed


def test_pending_pieces_are_not_submitted_twice(tmp_path):
    cfg = slurm_config(tmp_path)
    first = launch(cfg)
    assert first.returncode == 0, first.stdout + first.stderr
    second = launch(cfg)  # immediately: the first launch's jobs are pending or running
    assert second.returncode == 0, second.stdout + second.stderr
    assert "submitted 0 job(s)" in second.stdout and "already queued" in second.stdout, second.stdout
    pending = launch(cfg, "--status").stdout
    assert "pending:" in pending or "running:" in pending or "done" in pending
    wait_for(lambda: list((tmp_path / "runs").glob("reduce/*/manifest.json")), 600, "reduce to finish")


def test_pre_timeout_signal_checkpoints_requeues_and_resumes_to_the_same_weights(tmp_path):
    from safetensors.numpy import load_file

    def config(dpath: pathlib.Path) -> pathlib.Path:
        dpath.mkdir()
        cfg = slurm_config(dpath)
        sweep = dpath / "tiny-sweep.toml"
        sweep.write_text(sweep.read_text().replace("n_train = 20480", "n_train = 3072000"))
        cfg.write_text(cfg.read_text().replace("[train]\n", "[train]\ncheckpoint_every = 20\n"))
        return cfg

    interrupted, clean = config(tmp_path / "interrupted"), config(tmp_path / "clean")
    first = launch(interrupted)
    assert first.returncode == 0, first.stdout + first.stderr
    (train_job,) = job_ids_of(first.stdout, "train")
    root = interrupted.parent / "runs"
    wait_for(lambda: list(root.glob("train/*/.checkpoint.safetensors")), 600, "a training checkpoint")
    subprocess.run(["scancel", "--signal=USR2", train_job], check=True)
    wait_for(lambda: list(root.glob("reduce/*/manifest.json")), 900, "the requeued pipeline to finish")
    manifests = [json.loads(p.read_text()) for p in root.glob("train/*/manifest.json")]
    assert manifests and all(m["slurm_restart_count"] >= 1 for m in manifests)  # it was requeued, not restarted
    logs = "".join(p.read_text() for p in (interrupted.parent / "logs" / "train" / train_job).glob("*_log.*"))
    assert "resumed from" in logs, logs[-3000:]  # the requeued run continued from the checkpoint

    second = launch(clean)
    assert second.returncode == 0, second.stdout + second.stderr
    wait_for(lambda: list((clean.parent / "runs").glob("reduce/*/manifest.json")), 900, "the clean pipeline")
    for fpath in root.glob("train/*/sae.safetensors"):
        resumed = load_file(str(fpath))
        reference = load_file(str(clean.parent / "runs" / "train" / fpath.parent.name / "sae.safetensors"))
        for name, value in reference.items():
            assert (resumed[name] == value).all(), name


def scontrol_jobs(job_id: str) -> list[str]:
    """`scontrol show job -o`: one line per job (per task for an array), fields `Name=value` separated by spaces."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def field(line: str, name: str) -> str:
    """The value of one field of a `scontrol show job -o` line (up to the next ` Name=`)."""
    found = re.search(rf"(?:^| ){name}=(.*?)(?= [A-Za-z:/]+=|$)", line)
    assert found, f"no {name}= in {line}"
    return found.group(1).strip()


def test_qos_typed_gpus_gres_and_passthrough_options_reach_the_jobs(tmp_path):
    cfg = slurm_config(tmp_path)
    cfg.write_text(
        cfg.read_text()
        .replace("[slurm]\n", '[slurm]\naccount = "saev"\nqos = "saevtest"\n')
        .replace("[slurm.dump]\n", '[slurm.dump]\nqos = "normal"\n')
        .replace("[slurm.train]\ngpus = 1\n", '[slurm.train]\ngpus = "fake:1"\n')
        .replace("[slurm.score]\ngpus = 1\n", '[slurm.score]\ngpus = 0\ngres = "gpu:fake:1"\n')
        + '[slurm.additional_parameters]\ncomment = "saev adopt test"\n'
        + '[slurm.train.additional_parameters]\nmail_type = "FAIL"\n'
    )
    done = launch(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {stage: job_ids_of(done.stdout, stage) for stage in ("dump", "train", "mask", "score", "reduce")}
    assert all(jobs.values()), done.stdout
    seen: dict[str, list[str]] = {}
    for stage, ids in jobs.items():
        seen[stage] = [line for job_id in ids for line in scontrol_jobs(job_id)]
        for line in seen[stage]:
            assert field(line, "Account") == "saev", line
            assert field(line, "QOS") == ("normal" if stage == "dump" else "saevtest"), line  # a stage's qos wins
            assert field(line, "Comment") == "saev adopt test", line  # cluster-wide passthrough
    for line in seen["train"]:  # typed GPU through --gpus-per-node, and the stage's own passthrough option
        assert field(line, "TresPerNode") == "gres:gpu:fake:1", line
        assert field(line, "MailType") == "FAIL", line
    for line in seen["score"]:  # typed GPU through --gres
        assert field(line, "TresPerNode") == "gres:gpu:fake:1", line
        assert "MailType=FAIL" not in line, line
    for line in seen["mask"] + seen["reduce"]:
        assert "TresPerNode" not in line or field(line, "TresPerNode") in ("", "(null)"), line
    # They also run: a typed GPU the node has (through --gpus-per-node and --gres) and a QOS the association allows
    # are schedulable. Once the training job is done and a score task has started, the rest is cancelled.
    score_tasks = [f"{array}_{i}" for array in jobs["score"] for i in range(3)]
    wait_for(
        lambda: (
            (s := sacct_states(jobs["train"] + score_tasks)).get(jobs["train"][0]) == "COMPLETED"
            and any(s.get(t) in ("RUNNING", "COMPLETED") for t in score_tasks)
        ),
        600,
        "the training job to finish and a score task to start",
    )
    subprocess.run(["scancel", *[i for ids in jobs.values() for i in ids]], timeout=15)
    train_tres = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", jobs["train"][0], "-o", "AllocTRES"],
        capture_output=True,
        text=True,
        timeout=15,
    ).stdout
    assert "gres/gpu:fake=1" in train_tres, train_tres


def test_a_qos_the_account_may_not_use_is_refused_before_anything_runs(tmp_path):
    cfg = slurm_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[slurm]\n", '[slurm]\nqos = "nosuchqos"\n'))
    done = launch(cfg)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "sbatch failed for stage 'dump'" in out and "Invalid qos specification" in out, out
    assert not job_ids_of(done.stdout, "dump"), out
