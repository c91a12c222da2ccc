"""TOML configs: parsed as data, checked key by key, with errors that name the file, key and fix."""

import dataclasses
import pathlib
import typing

import pytest

from saev import configs


@dataclasses.dataclass(frozen=True)
class Inner:
    n_imgs: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Other:
    root: str = ""


@dataclasses.dataclass(frozen=True)
class Outer:
    lr: float = 1e-3
    layers: tuple[int, ...] = (-1,)
    n_keep: int | typing.Literal["all"] = 10
    data: Inner | Other = Inner()
    path: pathlib.Path = pathlib.Path("x")


def test_round_trip_with_conversions():
    cfg = configs.from_dict(
        Outer, {"lr": 1, "layers": [-2, -1], "n_keep": "all", "data": {"kind": "other", "root": "/d"}}, "t.toml"
    )
    assert cfg == Outer(lr=1.0, layers=(-2, -1), n_keep="all", data=Other(root="/d"))
    assert isinstance(cfg.lr, float)


def test_unknown_key_suggests_closest():
    with pytest.raises(configs.ConfigError, match=r"t.toml: unknown key 'layer'; did you mean 'layers'\?"):
        configs.from_dict(Outer, {"layer": [1]}, "t.toml")


def test_wrong_type_names_key_and_value():
    with pytest.raises(configs.ConfigError, match=r"key 'lr' expects float, got str 'fast'"):
        configs.from_dict(Outer, {"lr": "fast"}, "t.toml")


def test_bool_is_not_an_int():
    with pytest.raises(configs.ConfigError, match="key 'n_keep'"):
        configs.from_dict(Outer, {"n_keep": True}, "t.toml")


def test_literal_choices_are_listed():
    with pytest.raises(configs.ConfigError, match=r"expects int or 'all', got str 'everything'"):
        configs.from_dict(Outer, {"n_keep": "everything"}, "t.toml")


def test_union_of_tables_needs_a_known_kind():
    with pytest.raises(configs.ConfigError, match=r"kind = one of 'inner', 'other', got 'othr'; did you mean 'other'"):
        configs.from_dict(Outer, {"data": {"kind": "othr"}}, "t.toml")


def test_nested_unknown_key_names_the_path():
    with pytest.raises(configs.ConfigError, match=r"t.toml: unknown key 'data.n_img'; did you mean 'data.n_imgs'"):
        configs.from_dict(Outer, {"data": {"kind": "inner", "n_img": 3}}, "t.toml")


def test_toml_syntax_error_names_file_and_line(tmp_path):
    fpath = tmp_path / "bad.toml"
    fpath.write_text('root = "runs"\n[dump\nx = 1\n')
    with pytest.raises(configs.ConfigError, match=r"bad.toml.*line 2"):
        configs.load_toml(fpath)


def test_missing_config_file(tmp_path):
    with pytest.raises(configs.ConfigError, match="config file not found"):
        configs.load_toml(tmp_path / "nope.toml")


def test_a_bare_string_selects_a_kind_with_its_defaults():
    assert configs.from_dict(Outer, {"data": "inner"}, "t.toml").data == Inner()


def test_a_table_without_kind_takes_the_kind_of_the_default():
    assert configs.from_dict(Outer, {"data": {"n_imgs": 3}}, "t.toml").data == Inner(n_imgs=3)


def test_a_bare_nested_name_suggests_its_dotted_key():
    with pytest.raises(configs.ConfigError, match=r"unknown key 'n_imgs'; did you mean 'data.n_imgs'\?"):
        configs.from_dict(Outer, {"n_imgs": 3}, "t.toml")
