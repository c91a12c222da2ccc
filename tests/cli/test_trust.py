"""Knowing a result can be trusted: unhealthy SAEs are flagged everywhere the result is read, a sweep too large for
the data is warned about at plan time, and `--dry-run` / `--status` refuse what a real run would refuse."""

import csv
import json
import math
import re

import pytest

import launch
from saev import best
from stages import reduce as reduce_stage
from stages import train as train_stage

FAILING_SWEEP = """# One SAE that is known to fail on the tiny dump: a huge L1 penalty at a high learning rate kills every latent
# (on the tiny dump: normalized MSE 7.4, 100% dead, deterministically).
l1_coeff = 1e3
lr = 0.3
n_train = 20480
batch_size = 512
warmup_steps = 10
n_eval = 256
seed = 0

[sae]
exp_factor = 2
seed = 0
"""


def set_key(cfg_fpath, section: str, key: str, value: str) -> None:
    """Replace `key = ...` in `[section]` of the tiny config."""
    text = cfg_fpath.read_text()
    head, _, rest = text.partition(f"[{section}]\n")
    rest, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", rest, count=1, flags=re.MULTILINE)
    assert n == 1, (section, key)
    cfg_fpath.write_text(f"{head}[{section}]\n{rest}")


######################
# SAE health (units) #
######################


@pytest.mark.parametrize(
    "metrics, reasons",
    [
        ({"nmse": 0.99, "dead_frac": 0.49, "dense_frac": 0.1}, []),
        ({"nmse": 1.0, "dead_frac": 0.0, "dense_frac": 0.0}, ["normalized MSE"]),
        ({"nmse": 0.2, "dead_frac": 0.5, "dense_frac": 0.0}, ["dead latents"]),
        ({"nmse": 0.2, "dead_frac": 0.0, "dense_frac": 0.11}, ["dense latents"]),
        ({"nmse": 1.31, "dead_frac": 0.7, "dense_frac": 0.0}, ["normalized MSE", "dead latents"]),
        ({"nmse": math.nan, "dead_frac": 0.0, "dense_frac": 0.0}, ["normalized MSE"]),
    ],
)
def test_sae_health_thresholds(metrics, reasons):
    got = reduce_stage.sae_health(metrics)
    assert len(got) == len(reasons)
    for line, want in zip(got, reasons, strict=True):
        assert want in line


def test_a_best_json_of_an_earlier_version_is_refused_naming_the_file(tmp_path):
    # Reduce v2 wrote no metrics, health or wins per SAE: the launcher and notebooks cannot read it as a record.
    fpath = tmp_path / "best.json"
    fpath.write_text(json.dumps({"n_patches": 0, "n_heldout": 0, "classes": [],
                                 "per_sae": {"abc": {"dead_frac": 0.0, "classes": []}}}))  # fmt: skip
    with pytest.raises(ValueError, match=f"{re.escape(str(fpath))} is not a best.json of this version"):
        best.read(fpath)


###############################
# Data too small for a sweep  #
###############################


def test_warns_when_n_eval_takes_half_the_rows():
    cfgs = [_train_cfg(n_eval=1536, n_train=2048)]
    (msg,) = train_stage.warn_small_data(cfgs, n_rows=3072)
    assert "n_eval=1536" in msg and "50%" in msg and "3072 patches" in msg
    assert train_stage.warn_small_data([_train_cfg(n_eval=1535, n_train=2048)], n_rows=3072) == []


def test_warns_when_training_repeats_rows_a_hundred_times():
    (msg,) = train_stage.warn_small_data([_train_cfg(n_eval=72, n_train=300_000)], n_rows=3072)
    assert "n_train=300000" in msg and "100 times" in msg
    assert train_stage.warn_small_data([_train_cfg(n_eval=72, n_train=299_999)], n_rows=3072) == []


def _train_cfg(n_eval: int, n_train: int):
    from saev import nn, training

    return training.TrainConfig(
        sae=nn.SaeConfig(d_vit=64, exp_factor=2), n_train=n_train, batch_size=512, n_eval=n_eval
    )


def test_launcher_shows_the_small_data_warning_at_plan_time(tiny_config, capsys):
    sweep_fpath = tiny_config.parent / "tiny-sweep.toml"
    sweep_fpath.write_text(sweep_fpath.read_text().replace("n_eval = 256", "n_eval = 2000"))
    assert launch.main(launch.Args(config=tiny_config, dry_run=True)) == 0
    err = capsys.readouterr().err
    assert "the data is small for the sweep: n_eval=2000 held-out rows are 65% of the 3072 patches" in err


#################################
# --dry-run makes config checks #
#################################


@pytest.mark.parametrize("flag", ["dry_run", "status"])
def test_dry_run_and_status_refuse_a_keep_mask_larger_than_the_dump(tiny_config, capsys, flag):
    set_key(tiny_config, "mask", "n_keep", "40000")
    assert launch.main(launch.Args(config=tiny_config, **{flag: True})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: mask.n_keep=40000 + mask.n_heldout=500 is more than the 3072 patches")
    # The same line a real run stops with (before running anything).
    assert launch.main(launch.Args(config=tiny_config)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == err[-1]
    assert not (tiny_config.parent / "runs" / "dump").exists()


####################################
# An SAE that failed, end to end   #
####################################


def test_failed_sae_is_flagged_in_the_summary_best_files_and_report(tiny_config, capsys):
    (tiny_config.parent / "tiny-sweep.toml").write_text(FAILING_SWEEP)
    assert launch.main(launch.Args(config=tiny_config)) == 0
    out = capsys.readouterr().out
    (best_line,) = [line for line in out.splitlines() if line.startswith("best latent per class")]
    best_fpath = tiny_config.parent / best_line.rsplit(": ", 1)[1]
    reduce_dpath = best_fpath.parent

    # The launcher's summary: every class marked, the SAE table, a warning naming the reasons, the report's path.
    table = out[out.index("best latent per class") :]
    assert all("(SAE unhealthy)" in line for line in table.splitlines()[2:8])
    (warning,) = [line for line in out.splitlines() if line.startswith("warning: SAE")]
    assert "normalized MSE" in warning and "100% dead latents (>= 50%)" in warning
    assert "6 class(es) use its latents" in warning
    index_fpath = reduce_dpath / "report" / "index.html"
    assert f"report: {index_fpath}" in out.splitlines()

    # best.json and best.csv: per class the reasons, per SAE its metrics, health and wins.
    result = json.loads(best_fpath.read_text())
    (sae_key,) = result["per_sae"]
    entry = result["per_sae"][sae_key]
    assert entry["metrics"]["dead_frac"] == 1.0 and entry["metrics"]["nmse"] >= 1.0
    assert entry["n_wins"] == 6 and len(entry["health"]) == 2
    assert entry["config"].startswith("relu_l1(l1_coeff=1000.0)")
    for row in result["classes"]:
        assert row["sae_unhealthy"] == entry["health"]
        assert {"ap", "prototype", "sae", "dead", "heldout_ap"} <= set(row)  # the fields of before are kept
    with open(reduce_dpath / "best.csv", newline="") as fd:
        rows = list(csv.DictReader(fd))
    assert all(row["sae_unhealthy"] == "; ".join(entry["health"]) for row in rows)

    # The report: the banner, a badge on every class, the SAE table, the config file (not its directory).
    page = index_fpath.read_text(encoding="utf-8")
    assert "1 SAE(s) of the sweep look unhealthy; 6 class(es) use their latents" in page
    assert page.count('<span class="badge unhealthy">SAE unhealthy</span>') == 6
    sweep_table = page[page.index('<table id="sweep-table">') :]
    assert f"<code>{sae_key}</code>" in sweep_table and "100.0%" in sweep_table
    assert f"config: {tiny_config.resolve()}" in page

    # A rerun skips everything and still prints the table, the warning and the report's path.
    assert launch.main(launch.Args(config=tiny_config)) == 0
    again = capsys.readouterr().out
    assert "reduce: done, skipping" in again
    assert warning in again.splitlines() and f"report: {index_fpath}" in again.splitlines()
