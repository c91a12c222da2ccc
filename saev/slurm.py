"""Cluster profiles and Slurm submission through submitit.

Every stage is submitted at once; a stage waits for its upstream jobs with `afterok` and is cancelled (not left
pending forever) when an upstream job fails, thanks to `kill-on-invalid-dep=yes`. Stages still verify their inputs
when they start: an `afterok` on a job id that never existed is accepted by Slurm and runs at once.
"""

import dataclasses
import logging
import math
import pathlib
import typing
from collections.abc import Callable, Sequence

import beartype

logger = logging.getLogger("saev.slurm")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one stage's jobs ask Slurm for. Empty strings mean "use the cluster-wide value"."""

    partition: str = ""
    """Partition (queue); empty = `SlurmConfig.partition`."""
    account: str = ""
    """Account to charge; empty = `SlurmConfig.account`."""
    gpus: int = 0
    """GPUs per job."""
    cpus: int = 2
    """CPU cores per job."""
    mem_gb: int = 16
    """Host memory per job in GB."""
    hours: float = 1.0
    """Wall-clock limit in hours."""
    array_parallelism: int = 32
    """At most this many tasks of one job array run at once."""
    constraint: str = ""
    """Node feature constraint (sbatch --constraint), empty for none."""


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """Cluster-wide settings plus per-stage resources. Nothing here changes any result, so nothing here is hashed."""

    account: str = ""
    """Default account for every stage (e.g. an OSC project code like PAS1234)."""
    partition: str = ""
    """Default partition for every stage; empty = the cluster's default partition."""
    log_dpath: pathlib.Path = pathlib.Path("logs")
    """Where submitit writes job scripts, pickles and logs, one folder per stage."""
    max_array_size: int = 1000
    """The cluster's MaxArraySize; larger job arrays are split into several arrays."""
    setup: tuple[str, ...] = ()
    """Shell lines run before each job (e.g. 'module load cuda')."""
    dump: Resources = Resources(gpus=1, cpus=8, mem_gb=32, hours=4.0)
    """Resources for the dump stage."""
    train: Resources = Resources(gpus=1, cpus=8, mem_gb=64, hours=8.0)
    """Resources for each training job."""
    mask: Resources = Resources(gpus=0, cpus=1, mem_gb=8, hours=0.5)
    """Resources for the keep-mask job."""
    score: Resources = Resources(gpus=1, cpus=4, mem_gb=32, hours=1.0)
    """Resources for each scoring task (one per SAE and K-block)."""
    reduce: Resources = Resources(gpus=0, cpus=1, mem_gb=8, hours=0.5)
    """Resources for the reduce job."""

    def resources(self, stage: str) -> Resources:
        return getattr(self, stage)


@beartype.beartype
def make_executor(cfg: SlurmConfig, stage: str, *, after: Sequence[str] = ()) -> typing.Any:
    """A submitit SlurmExecutor for one stage, waiting (afterok) on the given job ids."""
    import submitit

    res = cfg.resources(stage)
    folder = cfg.log_dpath / stage / "%j"
    executor = submitit.SlurmExecutor(folder=folder)
    additional: dict[str, object] = {}
    if after:
        additional["dependency"] = "afterok:" + ":".join(after)
        additional["kill-on-invalid-dep"] = "yes"
    params: dict[str, object] = dict(
        job_name=f"saev-{stage}",
        time=max(1, math.ceil(res.hours * 60)),
        cpus_per_task=res.cpus,
        mem=f"{res.mem_gb}GB",
        array_parallelism=res.array_parallelism,
        additional_parameters=additional,
        setup=list(cfg.setup),
    )
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    partition = res.partition or cfg.partition
    if partition:
        params["partition"] = partition
    account = res.account or cfg.account
    if account:
        params["account"] = account
    if res.constraint:
        params["constraint"] = res.constraint
    executor.update_parameters(**params)
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
    """
    if not args_list:
        return []
    executor = make_executor(cfg, stage, after=after)
    if len(args_list) == 1:
        job = executor.submit(fn, *args_list[0])
        return [str(job.job_id)]
    ids = []
    for start in range(0, len(args_list), cfg.max_array_size):
        chunk = args_list[start : start + cfg.max_array_size]
        jobs = executor.map_array(fn, *zip(*chunk))
        ids.extend(str(job.job_id) for job in jobs)
    return ids


@beartype.beartype
def array_ids(job_ids: Sequence[str]) -> list[str]:
    """Collapse task ids `123_0, 123_1, 124` to the ids a dependency needs (`123, 124`): afterok on an array
    job id waits for all of its tasks."""
    seen: dict[str, None] = {}
    for job_id in job_ids:
        seen[job_id.split("_")[0]] = None
    return list(seen)
