"""Cluster profiles, Slurm submission through submitit, job states and logs, and a job's own identity and requeue.

Every stage is submitted at once; a stage waits for its upstream jobs with `afterok` and is cancelled (not left
pending forever) when an upstream job fails, thanks to `kill-on-invalid-dep=yes`. Stages still verify their inputs
when they start: an `afterok` on a job id that never existed is accepted by Slurm and runs at once.
"""

import dataclasses
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import typing
from collections.abc import Callable, Sequence

import beartype

from saev import errors

logger = logging.getLogger("saev.slurm")

QUERY_TIMEOUT_S = 30.0
"""How long `job_states` waits for sacct or squeue before giving up on it."""


class SlurmError(errors.UserEnvironmentError, RuntimeError):
    """Slurm refused or could not take a submission (controller unreachable, bad partition or account, no sbatch).

    The message is one line: what failed, the first line of sbatch's error, and what to check. `submitted` holds
    the job ids (array tasks as `ARRAYID_TASK`, in `args_list` order) that this `submit` call did get queued
    before the failure, so a caller can record them instead of submitting those pieces twice.
    """

    def __init__(self, msg: str, submitted: Sequence[str] = ()):
        super().__init__(msg)
        self.submitted: tuple[str, ...] = tuple(submitted)


#########################################
# Checks of the [slurm] values (configs) #
#########################################

_GPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_GPUS = re.compile(r"(?:(?P<type>[A-Za-z0-9][A-Za-z0-9_.-]*):)?(?P<count>[0-9]+)")
_GRES = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*(?:,[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)*)*")
_OPTION = re.compile(r"[a-z][a-z0-9-]+")

RESERVED_OPTIONS: dict[str, str] = {
    "time": "use the key 'hours'",
    **dict.fromkeys(("cpus-per-task", "cpus-per-gpu"), "use the key 'cpus'"),
    **dict.fromkeys(("mem", "mem-per-cpu", "mem-per-gpu"), "use the key 'mem_gb'"),
    **dict.fromkeys(("gpus", "gpus-per-node", "gpus-per-task", "gpus-per-socket"), "use the key 'gpus' (or 'gres')"),
    "gres": "use the key 'gres'",
    "partition": "use the key 'partition'",
    "account": "use the key 'account'",
    "qos": "use the key 'qos'",
    "constraint": "use the key 'constraint'",
    "job-name": "the pipeline names jobs saev-<stage>",
    **dict.fromkeys(("dependency", "kill-on-invalid-dep"), "the launcher chains stages with afterok"),
    "array": "the launcher builds job arrays (see array_parallelism, max_array_size)",
    **dict.fromkeys(("output", "error", "open-mode"), "submitit writes logs under log_dpath"),
    "signal": "submitit sends the pre-timeout signal that checkpoints and requeues",
    **dict.fromkeys(("nodes", "ntasks", "ntasks-per-node"), "every job is one task on one node"),
}
"""sbatch options that `additional_parameters` may not set, with what to do instead: the pipeline sets them itself
(a second value would silently win or conflict, e.g. --gres next to --gpus-per-node)."""


def _check_word(name: str, value: str) -> None:
    """A value that goes into one `#SBATCH --name=value` line: no spaces, tabs or line breaks."""
    if any(c.isspace() for c in value):
        raise ValueError(f"{name} = {value!r} must not contain spaces or line breaks")


def _check_gpus(gpus: int | str) -> None:
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {gpus}")
        return
    match = _GPUS.fullmatch(gpus)
    if match is None:
        if _GPU_TYPE.fullmatch(gpus):
            raise ValueError(f"gpus = {gpus!r} has no count; write TYPE:COUNT, e.g. gpus = '{gpus}:1'")
        if gpus.startswith("gpu:"):
            raise ValueError(f"gpus = {gpus!r} looks like a gres string; write gpus = '{gpus[4:]}' or gres = '{gpus}'")
        raise ValueError(f"gpus = {gpus!r} is not a count or TYPE:COUNT (e.g. 1 or 'a100:1')")
    if match["type"] and int(match["count"]) == 0:
        raise ValueError(f"gpus = {gpus!r} asks for 0 GPUs of a type; write gpus = 0 for none")


def _check_gres(gres: str) -> None:
    if not _GRES.fullmatch(gres):
        raise ValueError(
            f"gres = {gres!r} is not a gres string like 'gpu:a100:1' (NAME[:TYPE][:COUNT], comma-separated)"
        )


def _option_name(name: str) -> str:
    """sbatch's long option name for a passthrough key: mail_type and mail-type are both --mail-type."""
    return name.replace("_", "-")


def _check_additional(params: dict[str, typing.Any]) -> None:
    """Passthrough sbatch options: long option names the pipeline does not set itself, and simple values (sbatch
    itself refuses an option it does not know, at submission)."""
    seen: dict[str, str] = {}
    for name, value in params.items():
        option = _option_name(name)
        where = f"additional_parameters key '{name}'"
        if not _OPTION.fullmatch(option):
            raise ValueError(
                f"{where} is not a long sbatch option name (like mail_type or mail-type, without dashes in front)"
            )
        if option in RESERVED_OPTIONS:
            raise ValueError(f"{where} is an sbatch option the pipeline sets itself: {RESERVED_OPTIONS[option]}")
        if option in seen:
            raise ValueError(f"{where} and '{seen[option]}' are the same sbatch option --{option}; keep one")
        seen[option] = name
        if value is False:
            raise ValueError(f"{where} = false: leave the key out instead (true means a bare --{option})")
        if isinstance(value, str):
            if not value or "\n" in value or "\r" in value:
                raise ValueError(f"{where} = {value!r} must be a non-empty, single-line string")
        elif not isinstance(value, (int, bool)):
            raise ValueError(f"{where} expects a string, an integer or true, got {type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one stage's jobs ask Slurm for. Empty strings mean "use the cluster-wide value"."""

    partition: str = ""
    """Partition (queue), sbatch --partition; empty = `SlurmConfig.partition`."""
    account: str = ""
    """Account to charge, sbatch --account; empty = `SlurmConfig.account`."""
    qos: str = ""
    """Quality of service, sbatch --qos; empty = `SlurmConfig.qos`."""
    gpus: int | str = 0
    """GPUs per job, sbatch --gpus-per-node: a count (1), or TYPE:COUNT ("a100:1") for a GPU type; 0 = none. A plain
    count takes the type `SlurmConfig.gpu_type` when that is set."""
    gres: str = ""
    """Generic resources, sbatch --gres (e.g. "gpu:a100:1"), for clusters that want --gres rather than
    --gpus-per-node; empty = none. Set `gpus` or `gres`, not both."""
    cpus: int = 2
    """CPU cores per job, sbatch --cpus-per-task."""
    mem_gb: int = 16
    """Host memory per job in GB, sbatch --mem."""
    hours: float = 1.0
    """Wall-clock limit in hours, sbatch --time (rounded up to whole minutes)."""
    array_parallelism: int = 32
    """At most this many tasks of one job array run at once (sbatch --array=...%N)."""
    constraint: str = ""
    """Node feature constraint, sbatch --constraint (e.g. "a100|h100"); empty = `SlurmConfig.constraint`."""
    additional_parameters: dict[str, str | int | bool] = dataclasses.field(default_factory=dict, hash=False)
    """More sbatch options for this stage's jobs, `name = value` -> `#SBATCH --name=value` (`true` -> `--name`), on top
    of `SlurmConfig.additional_parameters` (a name set in both takes this value). Options the pipeline sets itself
    (time, mem, qos, dependency, ...) are refused: use their keys."""

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos", "gres", "constraint"):
            _check_word(name, getattr(self, name))
        _check_gpus(self.gpus)
        if self.gres:
            _check_gres(self.gres)
            if self.gpus not in (0, "0"):
                raise ValueError(f"set gpus or gres, not both (gpus = {self.gpus!r}, gres = {self.gres!r})")
        for name in ("cpus", "mem_gb", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.hours > 0:
            raise ValueError(f"hours must be > 0, got {self.hours}")
        _check_additional(self.additional_parameters)


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """Cluster-wide settings plus per-stage resources. Nothing here changes any result, so nothing here is hashed."""

    account: str = ""
    """Default account for every stage (e.g. an OSC project code like PAS1234); empty = your default account."""
    partition: str = ""
    """Default partition for every stage; empty = the cluster's default partition."""
    qos: str = ""
    """Default quality of service for every stage (sbatch --qos); empty = the account's default QOS."""
    constraint: str = ""
    """Default node feature constraint for every stage (sbatch --constraint); empty = none."""
    gpu_type: str = ""
    """GPU type for stages whose `gpus` is a plain count (e.g. "a100": gpus = 1 asks for a100:1); empty = any GPU."""
    additional_parameters: dict[str, str | int | bool] = dataclasses.field(default_factory=dict, hash=False)
    """More sbatch options for every stage, `name = value` -> `#SBATCH --name=value` (`true` -> `--name`), e.g.
    mail_type = "FAIL"; a stage's own `additional_parameters` override the same names."""
    log_dpath: pathlib.Path = pathlib.Path("logs")
    """Where submitit writes job scripts, pickles and logs, one folder per stage; must be on a filesystem the compute
    nodes can read and write."""
    max_array_size: int = 1000
    """The cluster's MaxArraySize; larger job arrays are split into several arrays."""
    setup: tuple[str, ...] = ()
    """Shell lines run at the start of each job script, before Python starts (e.g. 'module load cuda')."""
    dump: Resources = Resources(gpus=1, cpus=8, mem_gb=32, hours=4.0)
    """Resources for the dump stage."""
    train: Resources = Resources(gpus=1, cpus=8, mem_gb=64, hours=8.0)
    """Resources for each training job."""
    mask: Resources = Resources(gpus=0, cpus=1, mem_gb=8, hours=0.5)
    """Resources for the keep-mask job."""
    kept: Resources = Resources(gpus=0, cpus=2, mem_gb=16, hours=2.0)
    """Resources for gathering the kept patches' activations (one job per layer scored; reads the shards, no GPU)."""
    score: Resources = Resources(gpus=1, cpus=4, mem_gb=32, hours=1.0)
    """Resources for each scoring task (one per SAE and K-block)."""
    reduce: Resources = Resources(gpus=0, cpus=1, mem_gb=8, hours=0.5)
    """Resources for the reduce job."""

    def __post_init__(self) -> None:
        for name in ("account", "partition", "qos", "constraint", "gpu_type"):
            _check_word(name, getattr(self, name))
        if self.gpu_type and not _GPU_TYPE.fullmatch(self.gpu_type):
            raise ValueError(f"gpu_type = {self.gpu_type!r} is not a GPU type name (e.g. 'a100')")
        if self.max_array_size < 1:
            raise ValueError(f"max_array_size must be >= 1, got {self.max_array_size}")
        for i, line in enumerate(self.setup):
            if "\n" in line or "\r" in line:
                raise ValueError(f"setup[{i}] = {line!r} spans several lines; write one list item per line")
        _check_additional(self.additional_parameters)

    def resources(self, stage: str) -> Resources:
        return getattr(self, stage)


@beartype.beartype
def make_executor(cfg: SlurmConfig, stage: str, *, after: Sequence[str] = ()) -> typing.Any:
    """A submitit SlurmExecutor for one stage, waiting (afterok) on the given job ids."""
    import submitit

    executor = submitit.SlurmExecutor(folder=cfg.log_dpath / stage / "%j")
    executor.update_parameters(**executor_parameters(cfg, stage, after=after))
    return executor


@beartype.beartype
def submit(
    cfg: SlurmConfig,
    stage: str,
    fn: Callable[..., object],
    args_list: Sequence[tuple],
    *,
    after: Sequence[str] = (),
) -> list[str]:
    """Submit `fn(*args)` for each args tuple: one job, or job arrays of at most `max_array_size` tasks.

    Returns the Slurm job ids (array tasks as `ARRAYID_TASK`), suitable for `after=` of a downstream stage.

    Raises:
        SlurmError: no Slurm client here (no srun/sbatch on PATH), or sbatch failed (e.g. the controller is
            unreachable, an unknown partition or account) or answered something that is not a job id. Arrays
            submitted before the failing one stay queued; their ids are in the message.
    """
    if not args_list:
        return []
    try:
        executor = make_executor(cfg, stage, after=after)
    except RuntimeError as err:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise SlurmError(
            f"cannot submit stage '{stage}': {_first_line(str(err))} (run on a Slurm login node, or use --executor local)"
        ) from err
    ids: list[str] = []
    try:
        if len(args_list) == 1:
            job = executor.submit(fn, *args_list[0])
            return [str(job.job_id)]
        for start in range(0, len(args_list), cfg.max_array_size):
            chunk = args_list[start : start + cfg.max_array_size]
            jobs = executor.map_array(fn, *zip(*chunk, strict=True))
            ids.extend(str(job.job_id) for job in jobs)
    except Exception as err:
        if not _is_submission_error(err):
            raise
        raise SlurmError(_submission_message(stage, err, ids), submitted=ids) from err
    return ids


def _is_submission_error(err: BaseException) -> bool:
    """Whether `err` is how submitit reports a failed `sbatch`: `FailedJobError` (sbatch exited non-zero; its
    stderr is the message), `FailedSubmissionError` (no job id in sbatch's output), `CalledProcessError`, or an
    OSError from starting sbatch (not on PATH, not executable)."""
    from submitit.core import utils as submitit_utils

    return isinstance(
        err,
        (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError, subprocess.CalledProcessError, OSError),
    )


def _submission_message(stage: str, err: BaseException, submitted: Sequence[str]) -> str:
    """One line: which stage, sbatch's first error line (or the file submitit could not write), what to check."""
    if isinstance(err, OSError) and str(err.filename) != "sbatch":
        # submitit writes the job script and pickles under [slurm] log_dpath before it runs sbatch.
        msg = f"cannot submit stage '{stage}': could not write {err.filename}: {err.strerror or err}; check [slurm] log_dpath"
    elif isinstance(err, OSError):
        what = (
            "sbatch not found on PATH"
            if isinstance(err, FileNotFoundError)
            else f"could not run sbatch: {err.strerror or err}"
        )
        msg = f"cannot submit stage '{stage}': {what}; run on a Slurm login node, or use --executor local"
    else:
        if isinstance(err, subprocess.CalledProcessError):
            detail = err.stderr or err.output or str(err)
            detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        else:
            detail = str(err)
        msg = (
            f"sbatch failed for stage '{stage}': {_first_line(detail) or type(err).__name__}; check that the Slurm "
            "controller is reachable (`sinfo`) and the partition/account in [slurm]"
        )
    if submitted:
        msg += f" (already submitted for this stage: {', '.join(array_ids(submitted))})"
    return msg


def _first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped ('' if none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@beartype.beartype
def array_ids(job_ids: Sequence[str]) -> list[str]:
    """Collapse task ids `123_0, 123_1, 124` to the ids a dependency needs (`123, 124`): afterok on an array
    job id waits for all of its tasks."""
    seen: dict[str, None] = {}
    for job_id in job_ids:
        seen[job_id.split("_")[0]] = None
    return list(seen)


#######################
# Job states and logs #
#######################

ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "RESIZING",
        "SUSPENDED",
        "SIGNALING",
        "STAGE_OUT",
    }
)
"""Slurm states of a job that is still going to run or is running."""


@beartype.beartype
def job_states(job_ids: Sequence[str], *, timeout_s: float = QUERY_TIMEOUT_S) -> dict[str, str]:
    """Current state of each job (array tasks as `ARRAY_TASK`): from sacct, or squeue when accounting is unavailable.

    Jobs Slurm no longer knows are left out. States are Slurm's words (PENDING, RUNNING, COMPLETED, FAILED,
    CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...); "CANCELLED by 0" is shortened to "CANCELLED".

    Never raises for Slurm's sake: when neither sacct nor squeue answers within `timeout_s` seconds each (no
    controller, not on PATH, an error), every job is "UNKNOWN" and one warning names the reason.
    """
    if not job_ids:
        return {}
    wanted = set(job_ids)
    base_ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    states: dict[str, str] = {}
    out, sacct_problem = _query(["sacct", "-n", "-P", "-X", "-j", base_ids, "-o", "JobID,State"], timeout_s)
    if out is not None and "disabled" in out.stderr.lower():
        out, sacct_problem = None, "accounting disabled"
    if out is not None:
        for line in out.stdout.splitlines():
            job_id, _, state = line.partition("|")
            state = state.split()[0] if state else ""
            if job_id in wanted:
                states[job_id] = state
            elif "[" in job_id:  # a pending array not yet split into tasks: 123_[4-9%2]
                base, _, spec = job_id.partition("_")
                for task in _expand_array_spec(spec):
                    if f"{base}_{task}" in wanted:
                        states[f"{base}_{task}"] = state
        return states
    out, squeue_problem = _query(["squeue", "-h", "-r", "-j", base_ids, "-o", "%i|%T"], timeout_s)
    if out is None:
        logger.warning(
            "job states unknown: sacct %s; squeue %s; is the Slurm controller reachable (`sinfo`)?",
            sacct_problem,
            squeue_problem,
        )
        return {job_id: "UNKNOWN" for job_id in job_ids}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in wanted:
            states[job_id] = state.strip()
    return states


def _query(cmd: list[str], timeout_s: float) -> tuple["subprocess.CompletedProcess[str] | None", str]:
    """Run a Slurm query: (the finished process, "") when it exited 0, else (None, why it failed, one line)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"did not answer within {timeout_s:g} s"
    except OSError as err:
        return None, f"could not run ({err.strerror or err})"
    if out.returncode != 0:
        return None, f"failed (exit {out.returncode}): {_first_line(out.stderr) or 'no message'}"
    return out, ""


def _expand_array_spec(spec: str) -> list[int]:
    """'[4-9%2]' or '[1,3,5-6]' -> task ids."""
    spec = spec.strip("[]").split("%")[0]
    tasks: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            tasks.extend(range(int(lo), int(hi) + 1))
        elif part:
            tasks.append(int(part))
    return tasks


@beartype.beartype
def log_fpaths(cfg: SlurmConfig, stage: str, job_id: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(stdout, stderr) log files that submitit writes for a job or array task."""
    dpath = cfg.log_dpath / stage / job_id
    return dpath / f"{job_id}_0_log.out", dpath / f"{job_id}_0_log.err"


@beartype.beartype
def tail(fpath: pathlib.Path, n_lines: int = 5) -> str:
    """The last lines of a log file ('' if it does not exist yet)."""
    try:
        with open(fpath, "rb") as fd:
            fd.seek(0, 2)
            fd.seek(max(0, fd.tell() - 16_384))
            lines = fd.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n_lines:])


################
# Job identity #
################


def job_id() -> str | None:
    """This process's Slurm job id (an array task as `ARRAYJOB_TASK`, as `submit` returns it); None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def requeue(err: BaseException) -> typing.NoReturn:
    """Requeue this Slurm job because of `err` (it resumes from its checkpoint when it runs again) and end this run;
    outside Slurm, re-raise `err`."""
    this_job = job_id()
    if this_job is None:
        raise err
    logger.warning("%s; requeueing job %s", err, this_job)
    subprocess.run(["scontrol", "requeue", this_job], check=True, timeout=60)
    sys.exit(-1)  # Slurm stops this run and starts the job again; as submitit does after its own requeue


##############################
# sbatch options from config #
##############################


@beartype.beartype
def executor_parameters(cfg: SlurmConfig, stage: str, *, after: Sequence[str] = ()) -> dict[str, typing.Any]:
    """The keyword arguments for submitit's `SlurmExecutor.update_parameters` for one stage: its resources with the
    cluster-wide defaults filled in, the afterok chain, and the passthrough options (as `--name=value` names)."""
    res = cfg.resources(stage)
    additional: dict[str, typing.Any] = {}
    for name, value in {**cfg.additional_parameters, **res.additional_parameters}.items():
        additional[_option_name(name)] = value
    if after:
        additional["dependency"] = "afterok:" + ":".join(after)
        additional["kill-on-invalid-dep"] = "yes"
    params: dict[str, typing.Any] = dict(
        job_name=f"saev-{stage}",
        time=max(1, math.ceil(res.hours * 60)),
        cpus_per_task=res.cpus,
        mem=f"{res.mem_gb}GB",
        array_parallelism=res.array_parallelism,
        additional_parameters=additional,
        setup=list(cfg.setup),
    )
    gpus = gpus_per_node(cfg, res)
    if gpus:
        params["gpus_per_node"] = gpus
    if res.gres:
        params["gres"] = res.gres
    for name in ("partition", "account", "qos", "constraint"):
        value = getattr(res, name) or getattr(cfg, name)
        if value:
            params[name] = value
    return params


@beartype.beartype
def gpus_per_node(cfg: SlurmConfig, res: Resources) -> int | str:
    """What --gpus-per-node gets: 0 (none), a count, or TYPE:COUNT (a plain count takes `cfg.gpu_type`)."""
    match = _GPUS.fullmatch(str(res.gpus))
    assert match is not None, res.gpus  # Resources checked it
    count, gpu_type = int(match["count"]), match["type"] or cfg.gpu_type
    if count == 0:
        return 0
    return f"{gpu_type}:{count}" if gpu_type else count
