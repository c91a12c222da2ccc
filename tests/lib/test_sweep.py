"""Sweep tables: list values expand to a grid of configs in a fixed order; bad keys and values are named."""

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saev import nn, sweep, training
from saev.training import TrainConfig


def test_lists_expand_to_the_grid_in_sorted_key_order_last_key_fastest():
    cfgs = sweep.expand_sweep({"sae": {"d_vit": 16, "seed": [0, 1]}, "lr": [1e-3, 1e-4]}, TrainConfig)
    assert [(c.lr, c.sae.seed) for c in cfgs] == [(1e-3, 0), (1e-3, 1), (1e-4, 0), (1e-4, 1)]


def test_grid_order_does_not_depend_on_key_order():
    a = sweep.expand_sweep({"lr": [1.0, 2.0], "l1_coeff": [0.1, 0.2], "sae.d_vit": 4}, TrainConfig)
    b = sweep.expand_sweep({"sae.d_vit": 4, "l1_coeff": [0.1, 0.2], "lr": [1.0, 2.0]}, TrainConfig)
    assert a == b
    assert [(c.objective.l1_coeff, c.lr) for c in a] == [(0.1, 1.0), (0.1, 2.0), (0.2, 1.0), (0.2, 2.0)]


def test_scalars_are_shared_and_unset_fields_keep_their_defaults():
    (cfg,) = sweep.expand_sweep({"sae.d_vit": 32, "lr": 3e-4}, TrainConfig)
    assert cfg == TrainConfig(sae=nn.SaeConfig(d_vit=32), lr=3e-4)


def test_dotted_keys_and_sub_tables_are_the_same():
    dotted = sweep.expand_sweep({"sae.d_vit": 8, "sae.exp_factor": [4, 8]}, TrainConfig)
    nested = sweep.expand_sweep({"sae": {"d_vit": 8, "exp_factor": [4, 8]}}, TrainConfig)
    assert dotted == nested
    assert [c.sae.d_sae for c in dotted] == [32, 64]


def test_seed_lists_give_one_sae_per_seed():
    cfgs = sweep.expand_sweep({"sae.d_vit": 8, "sae.seed": [0, 1, 2]}, TrainConfig)
    assert [c.sae.seed for c in cfgs] == [0, 1, 2]
    assert len({c.seed for c in cfgs}) == 1  # the data-order seed is a different key ('seed')


@settings(max_examples=30, deadline=None)
@given(
    lrs=st.lists(st.floats(1e-5, 1.0), min_size=1, max_size=4),
    seeds=st.lists(st.integers(0, 100), min_size=1, max_size=4),
    exp_factors=st.lists(st.integers(1, 16), min_size=1, max_size=3),
)
def test_grid_size_is_the_product_of_list_lengths(lrs, seeds, exp_factors):
    table = {"lr": lrs, "sae": {"d_vit": 4, "seed": seeds, "exp_factor": exp_factors}}
    cfgs = sweep.expand_sweep(table, TrainConfig)
    assert len(cfgs) == len(lrs) * len(seeds) * len(exp_factors)
    assert [c.lr for c in cfgs[:: len(seeds) * len(exp_factors)]] == lrs


def test_ints_are_accepted_for_floats():
    (cfg,) = sweep.expand_sweep({"sae.d_vit": 4, "lr": 1}, TrainConfig)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_defaults_fill_fields_the_table_leaves_out():
    cfgs = sweep.expand_sweep({"lr": [1e-3, 1e-4]}, TrainConfig, defaults={"sae.d_vit": 768})
    assert [c.sae.d_vit for c in cfgs] == [768, 768]


def test_unknown_key_suggests_the_closest_valid_key():
    with pytest.raises(sweep.SweepError, match=r"unknown key 'l1_coef'; did you mean 'objective.l1_coeff'\?"):
        sweep.expand_sweep({"sae.d_vit": 4, "l1_coef": 0.1}, TrainConfig)


def test_bare_nested_name_suggests_its_dotted_key():
    msg = r"unknown key 'exp_factor'; did you mean 'sae.exp_factor'\?"
    with pytest.raises(sweep.SweepError, match=msg):
        sweep.expand_sweep({"sae.d_vit": 4, "exp_factor": [4, 8]}, TrainConfig)


def test_unknown_key_inside_a_sub_table_is_named_with_its_path():
    msg = r"unknown key 'sae.exp_facter'; did you mean 'sae.exp_factor'\?"
    with pytest.raises(sweep.SweepError, match=msg):
        sweep.expand_sweep({"sae": {"d_vit": 4, "exp_facter": 2}}, TrainConfig)


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(sweep.SweepError, match=r"key 'lr' expects float, got str 'fast'"):
        sweep.expand_sweep({"sae.d_vit": 4, "lr": "fast"}, TrainConfig)


def test_wrong_type_inside_a_list_names_the_item():
    msg = r"key 'sae.exp_factor' expects int, got float 2.5 \(list index 1\)"
    with pytest.raises(sweep.SweepError, match=msg):
        sweep.expand_sweep({"sae.d_vit": 4, "sae.exp_factor": [2, 2.5]}, TrainConfig)


@pytest.mark.parametrize("key", ["n_train", "lr"])
def test_bools_are_not_numbers(key):
    with pytest.raises(sweep.SweepError, match=f"key '{key}' expects (int|float), got bool True"):
        sweep.expand_sweep({"sae.d_vit": 4, key: True}, TrainConfig)


def test_empty_list_is_refused():
    with pytest.raises(sweep.SweepError, match=r"key 'lr' has an empty list"):
        sweep.expand_sweep({"sae.d_vit": 4, "lr": []}, TrainConfig)


def test_missing_required_field_is_named():
    with pytest.raises(sweep.SweepError, match=r"missing required key\(s\): 'sae.d_vit'"):
        sweep.expand_sweep({"lr": 1e-3}, TrainConfig)


def test_key_given_both_dotted_and_nested_is_refused():
    with pytest.raises(sweep.SweepError, match=r"key 'sae.d_vit' is given twice"):
        sweep.expand_sweep({"sae.d_vit": 4, "sae": {"d_vit": 8}}, TrainConfig)


def test_group_given_a_scalar_is_refused():
    with pytest.raises(sweep.SweepError, match=r"key 'sae' expects a table"):
        sweep.expand_sweep({"sae": 4}, TrainConfig)


def test_invalid_value_rejected_by_the_config_is_a_sweep_error():
    with pytest.raises(sweep.SweepError, match=r"sweep: n_train=10 is smaller than one batch"):
        sweep.expand_sweep({"sae.d_vit": 4, "n_train": 10, "batch_size": 64}, TrainConfig)


def test_sweep_error_is_a_value_error():
    assert issubclass(sweep.SweepError, ValueError)


def test_works_for_any_nested_frozen_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        k: int = 1

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner
        name: str = "a"

    cfgs = sweep.expand_sweep({"name": ["x", "y"], "inner": {"k": [1, 2]}}, Outer)
    # Sorted keys: 'inner.k' < 'name', so 'name' varies fastest.
    assert cfgs == [Outer(Inner(1), "x"), Outer(Inner(1), "y"), Outer(Inner(2), "x"), Outer(Inner(2), "y")]


#########
# Files #
#########


def test_load_sweep_reads_toml_sub_tables_and_dotted_keys(tmp_path):
    fpath = tmp_path / "sweep.toml"
    fpath.write_text("lr = [1e-3, 3e-4]\n\n[sae]\nd_vit = 64\nexp_factor = 4\nseed = [0, 1]\n")
    cfgs = sweep.load_sweep(fpath, TrainConfig)
    assert len(cfgs) == 4
    assert {(c.lr, c.sae.seed, c.sae.d_sae) for c in cfgs} == {(lr, s, 256) for lr in (1e-3, 3e-4) for s in (0, 1)}


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    fpath = tmp_path / "bad.toml"
    fpath.write_text("lr = 1e-3\nsae.d_vit = 64\nl1_coeff = = 0.1\nseed = 0\n")
    with pytest.raises(sweep.SweepError, match=rf"TOML syntax error in {re.escape(str(fpath))}: .*line 3"):
        sweep.load_sweep(fpath, TrainConfig)


def test_sweep_errors_from_a_file_name_the_file(tmp_path):
    fpath = tmp_path / "sweep.toml"
    fpath.write_text("sae.d_vit = 64\nl1_coef = 0.1\n")
    with pytest.raises(
        sweep.SweepError, match=rf"{re.escape(str(fpath))}: unknown key 'l1_coef'.*'objective.l1_coeff'"
    ):
        sweep.load_sweep(fpath, TrainConfig)


def test_missing_sweep_file_is_named(tmp_path):
    with pytest.raises(sweep.SweepError, match="sweep file not found: .*nope.toml"):
        sweep.load_sweep(tmp_path / "nope.toml", TrainConfig)


def test_toml_floats_like_inf_are_passed_to_the_config_check(tmp_path):
    fpath = tmp_path / "sweep.toml"
    fpath.write_text("sae.d_vit = 4\nlr = inf\n")
    with pytest.raises(sweep.SweepError, match="lr must be a positive finite number"):
        sweep.load_sweep(fpath, TrainConfig)


################
# Tuple fields #
################


def test_a_list_for_a_tuple_field_is_one_value():
    table = {"sae.d_vit": 8, "objective": "matryoshka", "matryoshka_prefixes": [4, 16]}
    (cfg,) = sweep.expand_sweep(table, TrainConfig)
    assert cfg.objective.prefixes == (4, 16)


def test_a_list_of_lists_for_a_tuple_field_is_swept():
    table = {"sae.d_vit": 8, "objective": "matryoshka", "matryoshka_prefixes": [[4, 16], [8], []]}
    assert [c.objective.prefixes for c in sweep.expand_sweep(table, TrainConfig)] == [(4, 16), (8,), ()]


def test_a_tuple_field_with_a_wrong_item_type_is_named():
    with pytest.raises(sweep.SweepError, match=r"key 'objective.prefixes\[1\]' expects int, got float 2.5"):
        sweep.expand_sweep({"sae.d_vit": 8, "objective": "matryoshka", "matryoshka_prefixes": [4, 2.5]}, TrainConfig)


def test_tuple_fields_from_toml(tmp_path):
    fpath = tmp_path / "sweep.toml"
    fpath.write_text('objective = "matryoshka"\nk = [4, 8]\nmatryoshka_prefixes = [64, 256]\n[sae]\nd_vit = 64\n')
    cfgs = sweep.load_sweep(fpath, TrainConfig)
    assert [(c.objective.k, c.objective.prefixes) for c in cfgs] == [(4, (64, 256)), (8, (64, 256))]


##########
# Groups #
##########


def test_group_splits_by_shape_objective_and_data_stream_keeping_sweep_order():
    table = {"sae.d_vit": 8, "objective": ["topk", "relu_l1"], "k": [2, 4], "batch_size": [64, 128], "lr": [1e-3, 1e-4]}
    cfgs = sweep.expand_sweep(table, TrainConfig)
    groups = training.group(cfgs)
    assert [(g[0].batch_size, g[0].objective.kind) for g in groups] == [
        (64, "topk"), (64, "relu_l1"), (128, "topk"), (128, "relu_l1")
    ]  # fmt: skip
    assert [len(g) for g in groups] == [4, 4, 4, 4]
    assert [(c.objective.k, c.lr) for c in groups[0]] == [(2, 1e-3), (2, 1e-4), (4, 1e-3), (4, 1e-4)]
    assert sorted(map(id, (c for g in groups for c in g))) == sorted(map(id, cfgs))


@pytest.mark.parametrize(
    "table",
    [
        {"sae.exp_factor": [2, 4]},
        {"seed": [0, 1]},
        {"n_train": [2048, 4096]},
        {"n_eval": [100, 200]},
        {"objective": "matryoshka", "matryoshka_prefixes": [[4], [8]]},
    ],
)
def test_configs_differing_in_a_group_field_go_to_different_groups(table):
    cfgs = sweep.expand_sweep({"sae.d_vit": 8, "objective": "topk", "k": 2, **table}, TrainConfig)
    assert training.group(cfgs) == [[cfgs[0]], [cfgs[1]]]


def test_configs_differing_only_in_per_sae_fields_share_a_group():
    table = {"sae.d_vit": 8, "objective": "topk", "sae.seed": [0, 1], "lr": [1e-3, 3e-3], "k": [2, 4],
             "aux_k": [4, 8], "aux_coeff": [0.0, 0.1], "dead_tokens": [100, 200], "warmup_steps": [0, 5]}  # fmt: skip
    cfgs = sweep.expand_sweep(table, TrainConfig)
    assert training.group(cfgs) == [cfgs]


@settings(max_examples=30, deadline=None)
@given(
    exp_factors=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    batch_sizes=st.lists(st.sampled_from([32, 64]), min_size=1, max_size=2, unique=True),
    ks=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    objectives=st.lists(st.sampled_from(["relu_l1", "topk", "batchtopk"]), min_size=1, max_size=3, unique=True),
    max_size=st.one_of(st.none(), st.integers(1, 4)),
)
def test_every_group_is_accepted_by_train_group(exp_factors, batch_sizes, ks, objectives, max_size):
    table = {"sae.d_vit": 8, "sae.exp_factor": exp_factors, "batch_size": batch_sizes, "objective": objectives}
    if set(objectives) - {"relu_l1"}:  # k is a field of the top-k objectives only
        table["k"] = ks
    cfgs = sweep.expand_sweep(table, TrainConfig)
    groups = training.group(cfgs, max_size=max_size)
    assert sorted(map(id, (c for g in groups for c in g))) == sorted(map(id, cfgs))
    for g in groups:
        training.check_group(g)
        assert max_size is None or len(g) <= max_size
    if max_size is None:  # whole groups: two groups never share a key
        keys = [tuple(training.get_group_key(g[0]).items()) for g in groups]
        assert len(set(keys)) == len(keys)


def test_group_max_size_cuts_groups_into_chunks():
    cfgs = sweep.expand_sweep({"sae.d_vit": 8, "lr": [1.0, 2.0, 3.0, 4.0, 5.0]}, TrainConfig)
    assert training.group(cfgs, max_size=2) == [cfgs[0:2], cfgs[2:4], cfgs[4:5]]


def test_group_max_size_must_be_positive():
    with pytest.raises(ValueError, match="max_size must be positive"):
        training.group([], max_size=0)


def test_group_of_an_empty_sweep_is_empty():
    assert training.group([]) == []
