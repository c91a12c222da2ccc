"""Sweeps: a TOML table whose list values expand to a grid of configs, each point built by the config engine.

Keys name fields by their dotted path from the top config class: `lr` is `TrainConfig.lr`, `sae.exp_factor` is
`TrainConfig.sae.exp_factor`, `objective.k` is the `k` of the objective. In TOML a dotted key and a sub-table are the
same thing, so these are equivalent:

    sae.exp_factor = [8, 16]          |    [sae]
                                      |    exp_factor = [8, 16]

(a Python dict may also use the flat string key "sae.exp_factor"). A field chosen by kind (the objective) takes
`objective = "topk"` or `objective.kind = "topk"`; a list of kinds is swept like any other list. When the kinds are
swept, a field that only some of them read applies to those (`objective.kind = ["relu_l1", "topk"]` with
`objective.k = [16, 32]` gives 1 + 2 SAEs); a field that no chosen kind reads is an error. A config class may declare
`aliases` (a class variable: old key -> dotted key), e.g. `l1_coeff` for `objective.l1_coeff`.

A list value is swept; a scalar is shared by every config. A tuple-typed field (e.g. `objective.prefixes`) takes a
list as ONE value; to sweep it give a list of lists (`[[64, 256], [128, 512]]`). The grid is the cartesian product
over the swept keys sorted by dotted name, with the LAST key varying fastest (itertools.product order); so the order
does not depend on how the file is laid out. For example {"lr": [1, 2], "sae.seed": [0, 1]} gives
(lr=1, seed=0), (lr=1, seed=1), (lr=2, seed=0), (lr=2, seed=1).

This module only flattens keys and takes the grid product; each point is checked and built by
`saev.configs.from_dict`, so a sweep and a pipeline config give the same messages for the same mistakes.
"""

import dataclasses
import itertools
import pathlib
import types
import typing
from collections.abc import Mapping

import beartype

from saev import configs, errors

T = typing.TypeVar("T")


class SweepError(errors.UserConfigError, ValueError):
    """A sweep table or file is invalid; the message names the offending key (and file)."""


@beartype.beartype
def expand_sweep(
    table: Mapping[str, object], cls: type[T], *, defaults: Mapping[str, object] | None = None, where: str = "sweep"
) -> list[T]:
    """Expand a sweep table into the grid of `cls` instances it describes (see the module docstring for the rules).

    Arguments:
        table: dotted or nested keys -> a value, or a list of values to sweep.
        cls: a (frozen) dataclass, possibly with nested dataclass fields.
        defaults: values (same key rules, no lists) used for fields the table leaves out, e.g. `sae.d_vit` taken
            from the activations; the table wins where it gives the field too.
        where: the file the table came from, for messages.

    Raises:
        SweepError: unknown key, value of the wrong type, empty list, key given twice, or a required field missing.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    aliases = getattr(cls, "aliases", {})
    flat = _kinds_as_keys(cls, _flatten(table, aliases))
    for key, value in _kinds_as_keys(cls, _flatten(defaults or {}, aliases)).items():
        if _is_swept(cls, key, value):
            raise SweepError(f"{where}: default for key '{key}' must be a single value, got a list")
        flat.setdefault(key, value)

    choices: dict[str, list[object]] = {}
    written = {dotted: old for old, dotted in aliases.items() if old in table}  # sort by the key as written
    for key in sorted(flat, key=lambda k: written.get(k, k)):
        value = flat[key]
        if _is_swept(cls, key, value):
            if not value:
                raise SweepError(f"{where}: key '{key}' has an empty list; give at least one value")
            choices[key] = list(value)
        else:
            choices[key] = [value]

    keys = list(choices)
    out = []
    for combo in itertools.product(*choices.values()):
        point = _fit_kinds(cls, dict(zip(keys, combo, strict=True)), choices)
        try:
            out.append(configs.from_dict(cls, _unflatten(point), where))
        except configs.ConfigError as err:
            msg = str(err)
            for key, value in zip(keys, combo, strict=True):  # name the list item at fault
                if len(choices[key]) > 1 and (f"key '{key}'" in msg or f"key '{key}[" in msg):
                    msg += f" (list index {choices[key].index(value)})"
                    break
            raise SweepError(msg) from None
    return out


@beartype.beartype
def load_sweep(fpath: pathlib.Path | str, cls: type[T], *, defaults: Mapping[str, object] | None = None) -> list[T]:
    """Read the TOML file `fpath` (its top-level table is the sweep) and expand it with `expand_sweep`.

    Raises:
        SweepError: the file is missing, a directory, unreadable (permissions or any other OSError), not UTF-8, not
            valid TOML (the message has the line and column), or the sweep is invalid; every message starts with
            the file path.
    """
    fpath = pathlib.Path(fpath)
    try:
        table = configs.load_toml(fpath, what="sweep")
    except configs.ConfigError as err:
        raise SweepError(str(err)) from None  # it names the file
    return expand_sweep(table, cls, defaults=defaults, where=str(fpath))


###########
# Helpers #
###########


def _flatten(table: Mapping[str, object], aliases: Mapping[str, str], prefix: str = "") -> dict[str, object]:
    """Nested and dotted keys -> {dotted key: value}; old keys renamed by `aliases`; a bare string for a field chosen
    by kind (`objective = "topk"`) becomes its `.kind`."""
    out: dict[str, object] = {}
    for raw_key, value in table.items():
        key = aliases.get(prefix + raw_key, prefix + raw_key)
        items = _flatten(value, {}, key + ".").items() if isinstance(value, Mapping) else [(key, value)]
        for k, v in items:
            if k in out:
                raise SweepError(f"key '{k}' is given twice in sweep")
            out[k] = v
    return out


def _kinds_as_keys(cls: type, flat: dict[str, object]) -> dict[str, object]:
    """`objective = "topk"` (or a list of kinds) -> `objective.kind`, so that its fields can sit beside it."""
    out: dict[str, object] = {}
    for key, value in flat.items():
        is_kind = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if is_kind and configs.union_classes(configs.field_hint(cls, key)):
            key = f"{key}.kind"
        if key in out:
            raise SweepError(f"key '{key}' is given twice in sweep")
        out[key] = value
    return out


def _unflatten(flat: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise SweepError(f"key '{name}' is a group of fields; give e.g. '{name}.<field>' or a [{name}] table")
            node = child
        if isinstance(node.get(leaf), dict):
            raise SweepError(f"key '{key}' is a group of fields; give e.g. '{key}.<field>' or a [{key}] table")
        node[leaf] = value
    return out


def _is_swept(cls: type, key: str, value: object) -> bool:
    """A list is swept, except for a tuple-typed field, which takes a list as one value (then a list of lists is
    swept)."""
    if not isinstance(value, list):
        return False
    if _is_sequence_hint(configs.field_hint(cls, key)):
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def _is_sequence_hint(hint: object) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence_hint(arg) for arg in typing.get_args(hint))
    return origin is tuple or hint is tuple


def _fit_kinds(cls: type, point: dict[str, object], choices: Mapping[str, list[object]]) -> dict[str, object]:
    """Drop, from one grid point, the fields of a kind-chosen table that its kind does not read but another kind
    swept in the same file does (so `objective.k` applies to the top-k points only). A field that no chosen kind reads
    stays, and the config engine refuses it."""
    out = dict(point)
    for key in point:
        parent, _, name = key.rpartition(".")
        classes = configs.union_classes(configs.field_hint(cls, parent)) if parent else []
        if not classes or name == "kind":
            continue
        by_kind = {configs.kind_of(c): c for c in classes}
        chosen = point.get(f"{parent}.kind")
        if chosen is None:  # the field's default kind
            default = _default_at(cls, parent)
            chosen = configs.kind_of(type(default)) if default is not None else None
        swept = [k for k in choices.get(f"{parent}.kind", [chosen]) if k in by_kind]
        if chosen in by_kind and name not in _field_names(by_kind[chosen]):
            if any(name in _field_names(by_kind[k]) for k in swept):
                del out[key]
    return out


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _default_at(cls: type, path: str) -> object:
    """The default value of the field at dotted `path` (None if it has none or a level is not a plain dataclass)."""
    obj: object = None
    current: type | None = cls
    for name in path.split("."):
        if current is None or not dataclasses.is_dataclass(current):
            return None
        field = {f.name: f for f in dataclasses.fields(current)}.get(name)
        if field is None:
            return None
        if field.default is not dataclasses.MISSING:
            obj = field.default
        elif field.default_factory is not dataclasses.MISSING:
            obj = field.default_factory()
        else:
            return None
        current = type(obj) if dataclasses.is_dataclass(obj) else None
    return obj
