"""Slurm options from the config, without a cluster: `[slurm]` keys become the right submitit parameters and
`#SBATCH` lines (qos, typed GPUs, gres, constraint, passthrough options), and bad values are one-line errors
naming the key."""

import os
import stat
import tomllib

import pytest

from saev import configs, slurm
from tests.helpers import REPO

CLUSTER = """
account = "PAS1234"
partition = "gpu"
qos = "normal"
constraint = "ib"
gpu_type = "a100"
[additional_parameters]
mail_type = "FAIL"
comment = "saev run"
[dump]
gpus = 1
[train]
gpus = "v100:2"
qos = "long"
partition = "gpu-long"
constraint = "48core"
[train.additional_parameters]
comment = "training"
exclusive = true
begin = "now+1"
nice = 10
[mask]
gpus = 0
[score]
gres = "gpu:h100:1"
gpus = 0
"""


def load(text: str) -> slurm.SlurmConfig:
    return configs.from_dict(slurm.SlurmConfig, tomllib.loads(text), "my.toml [slurm]")


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """submitit's SlurmExecutor refuses to start without `srun` on PATH; nothing is run here."""
    bin_dpath = tmp_path / "bin"
    bin_dpath.mkdir()
    srun = bin_dpath / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dpath}{os.pathsep}{os.environ['PATH']}")


def sbatch_lines(executor) -> set[str]:
    text = executor._make_submission_file_text("python -m something", "uid")
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_make_executor_turns_the_config_into_submitit_parameters(fake_srun, tmp_path):
    cfg = configs.from_dict(
        slurm.SlurmConfig, {**tomllib.loads(CLUSTER), "log_dpath": str(tmp_path)}, "my.toml [slurm]"
    )
    train = slurm.make_executor(cfg, "train", after=["11", "12"])
    assert train.parameters["qos"] == "long"
    assert train.parameters["gpus_per_node"] == "v100:2"
    assert train.parameters["partition"] == "gpu-long" and train.parameters["account"] == "PAS1234"
    assert train.parameters["additional_parameters"] == {
        "mail-type": "FAIL",
        "comment": "training",  # the stage's value wins over the cluster-wide one
        "exclusive": True,
        "begin": "now+1",
        "nice": 10,
        "dependency": "afterok:11:12",
        "kill-on-invalid-dep": "yes",
    }
    lines = sbatch_lines(train)
    for line in (
        "#SBATCH --qos=long",
        "#SBATCH --gpus-per-node=v100:2",
        "#SBATCH --partition=gpu-long",
        "#SBATCH --account=PAS1234",
        "#SBATCH --constraint=48core",
        "#SBATCH --mail-type=FAIL",
        "#SBATCH --comment=training",
        "#SBATCH --exclusive",
        "#SBATCH --begin=now+1",
        "#SBATCH --nice=10",
        "#SBATCH --dependency=afterok:11:12",
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=16GB",
        "#SBATCH --time=60",
    ):
        assert line in lines, (line, sorted(lines))
    assert not any("--gres" in line for line in lines)

    dump = sbatch_lines(slurm.make_executor(cfg, "dump"))  # cluster-wide defaults, gpu_type on a plain count
    for line in (
        "#SBATCH --qos=normal",
        "#SBATCH --gpus-per-node=a100:1",
        "#SBATCH --partition=gpu",
        "#SBATCH --constraint=ib",
        "#SBATCH --comment='saev run'",
        "#SBATCH --mail-type=FAIL",
    ):
        assert line in dump, (line, sorted(dump))
    assert not any("dependency" in line for line in dump)

    score = sbatch_lines(slurm.make_executor(cfg, "score"))  # gres instead of --gpus-per-node, never both
    assert "#SBATCH --gres=gpu:h100:1" in score
    assert not any("--gpus" in line for line in score), sorted(score)

    mask = sbatch_lines(slurm.make_executor(cfg, "mask"))
    assert not any("--gpus" in line or "--gres" in line for line in mask), sorted(mask)


def test_defaults_send_only_what_is_set(fake_srun, tmp_path):
    cfg = slurm.SlurmConfig(log_dpath=tmp_path, train=slurm.Resources(gpus=1))
    params = slurm.executor_parameters(cfg, "train")
    assert params["gpus_per_node"] == 1
    assert not {"qos", "partition", "account", "constraint", "gres"} & set(params)
    assert params["additional_parameters"] == {}
    lines = sbatch_lines(slurm.make_executor(cfg, "train"))
    assert "#SBATCH --gpus-per-node=1" in lines and not any("qos" in line for line in lines)


def test_gpu_counts_and_types():
    cfg = slurm.SlurmConfig()
    assert slurm.gpus_per_node(cfg, slurm.Resources(gpus=0)) == 0
    assert slurm.gpus_per_node(cfg, slurm.Resources(gpus=2)) == 2
    assert slurm.gpus_per_node(cfg, slurm.Resources(gpus="2")) == 2
    assert slurm.gpus_per_node(cfg, slurm.Resources(gpus="a100:1")) == "a100:1"
    typed = slurm.SlurmConfig(gpu_type="h100")
    assert slurm.gpus_per_node(typed, slurm.Resources(gpus=2)) == "h100:2"
    assert slurm.gpus_per_node(typed, slurm.Resources(gpus="a100:1")) == "a100:1"  # the stage's type wins
    assert slurm.gpus_per_node(typed, slurm.Resources(gpus=0)) == 0


@pytest.mark.parametrize(
    "toml, message",
    [
        (
            '[train]\ngpus = "a100"',
            r"^my\.toml \[slurm\]: key 'train': gpus = 'a100' has no count; write TYPE:COUNT, e\.g\. gpus = 'a100:1'$",
        ),
        (
            '[train]\ngpus = "gpu:a100:1"',
            r"key 'train': gpus = 'gpu:a100:1' looks like a gres string; write gpus = 'a100:1' or gres = 'gpu:a100:1'$",
        ),
        ('[train]\ngpus = "a100:0"', r"key 'train': gpus = 'a100:0' asks for 0 GPUs of a type"),
        ('[train]\ngpus = "two"', r"key 'train': gpus = 'two' has no count"),
        ('[train]\ngpus = "a100:1:2"', r"key 'train': gpus = 'a100:1:2' is not a count or TYPE:COUNT"),
        ("[train]\ngpus = -1", r"key 'train': gpus must be >= 0, got -1"),
        ("[train]\ngpus = 1.5", r"key 'train.gpus' expects int or str, got float 1\.5"),
        (
            '[score]\ngpus = 1\ngres = "gpu:a100:1"',
            r"key 'score': set gpus or gres, not both \(gpus = 1, gres = 'gpu:a100:1'\)",
        ),
        ('[score]\ngpus = 0\ngres = "gpu a100"', r"key 'score': gres = 'gpu a100' must not contain spaces"),
        ('[score]\ngpus = 0\ngres = "gpu::1"', r"key 'score': gres = 'gpu::1' is not a gres string"),
        ('qos = "high prio"', r"^my\.toml \[slurm\]: qos = 'high prio' must not contain spaces or line breaks$"),
        ('gpu_type = "a100:1"', r"\[slurm\]: gpu_type = 'a100:1' is not a GPU type name"),
        ("[train]\nqos = 3", r"key 'train.qos' expects str, got int 3"),
        ("qoss = 'x'", r"unknown key 'qoss'; did you mean 'qos'\?"),
        (
            '[additional_parameters]\nqos = "x"',
            r"^my\.toml \[slurm\]: additional_parameters key 'qos' is an sbatch option the pipeline sets itself: use the key 'qos'$",
        ),
        (
            "[additional_parameters]\ngpus_per_node = 1",
            r"additional_parameters key 'gpus_per_node' is an sbatch option the pipeline sets itself: use the key 'gpus'",
        ),
        (
            '[train.additional_parameters]\ngres = "gpu:1"',
            r"key 'train': additional_parameters key 'gres' is an sbatch option the pipeline sets itself: use the key 'gres'$",
        ),
        ('[additional_parameters]\ntime = "1:00:00"', r"additional_parameters key 'time' .*use the key 'hours'"),
        (
            '[additional_parameters]\nmem-per-cpu = "4G"',
            r"additional_parameters key 'mem-per-cpu' .*use the key 'mem_gb'",
        ),
        ('[additional_parameters]\ndependency = "afterok:1"', r"additional_parameters key 'dependency' .*afterok"),
        ('[additional_parameters]\nsignal = "USR1@60"', r"additional_parameters key 'signal' .*requeues"),
        (
            '[additional_parameters]\nmail_type = "FAIL"\nmail-type = "END"',
            r"additional_parameters key 'mail-type' and 'mail_type' are the same sbatch option --mail-type; keep one",
        ),
        (
            '[additional_parameters]\n"--mail-type" = "FAIL"',
            r"additional_parameters key '--mail-type' is not a long sbatch option name",
        ),
        ('[additional_parameters]\np = "gpu"', r"additional_parameters key 'p' is not a long sbatch option name"),
        (
            "[additional_parameters]\nexclusive = false",
            r"additional_parameters key 'exclusive' = false: leave the key out instead",
        ),
        (
            "[additional_parameters]\nnice = 1.5",
            r"additional_parameters key 'nice' expects a string, an integer or true, got float 1\.5",
        ),
        (
            '[additional_parameters]\ncomment = ""',
            r"additional_parameters key 'comment' = '' must be a non-empty, single-line string",
        ),
        (
            '[additional_parameters]\ncomment = "a\\nb"',
            r"additional_parameters key 'comment' = 'a\\nb' must be a non-empty, single-line string",
        ),
        (
            "[additional_parameters]\nmail_type = ['FAIL']",
            r"additional_parameters key 'mail_type' expects a string, an integer or true, got list",
        ),
        ("additional_parameters = 3", r"key 'additional_parameters' expects a table, got int 3"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(toml, message):
    with pytest.raises(configs.ConfigError, match=message) as info:
        load(toml)
    assert "\n" not in str(info.value)


def test_osc_example_reports_held_out_ap_and_loads():
    from stages import pipeline as pl

    pipeline = pl.load(REPO / "configs" / "osc-example.toml")
    assert pipeline.mask.n_heldout > 0
    assert pipeline.slurm is not None and pipeline.slurm.additional_parameters == {"mail_type": "FAIL"}
    assert slurm.executor_parameters(pipeline.slurm, "train")["additional_parameters"] == {"mail-type": "FAIL"}
