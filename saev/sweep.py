"""Sweeps: a TOML table whose list values expand to a grid of frozen dataclass configs.

Keys name fields by their dotted path from the top config class: `lr` is `TrainConfig.lr`, `sae.exp_factor` is
`TrainConfig.sae.exp_factor`. In TOML a dotted key and a sub-table are the same thing, so these are equivalent:

    sae.exp_factor = [8, 16]          |    [sae]
                                      |    exp_factor = [8, 16]

(a Python dict may also use the flat string key "sae.exp_factor"). Bare names of nested fields (`exp_factor`) are
NOT accepted: `seed` exists both as the data-order seed and as `sae.seed`, and a namespace where a key's meaning
depends on which other fields exist would be fragile. An unknown key's error suggests the closest valid one.

A list value is swept; a scalar is shared by every config. A tuple-typed field (e.g. `matryoshka_prefixes`)
takes a list as ONE value; to sweep it give a list of lists (`[[64, 256], [128, 512]]`). The grid is the cartesian
product over the swept keys sorted by dotted name, with the LAST key varying fastest (itertools.product order); so
the order does not depend on how the file is laid out. For example {"lr": [1, 2], "sae.seed": [0, 1]} gives
(lr=1, seed=0), (lr=1, seed=1), (lr=2, seed=0), (lr=2, seed=1).

`group(cfgs)` splits an expanded sweep of `TrainConfig`s into groups that `saev.training.train_group` trains
together (same shape, objective and data stream).
"""

import dataclasses
import difflib
import itertools
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence

import beartype

from saev import configs, training

T = typing.TypeVar("T")


class SweepError(ValueError):
    """A sweep table or file is invalid; the message names the offending key (and file)."""


@beartype.beartype
def expand_sweep(table: Mapping[str, object], cls: type[T], *, defaults: Mapping[str, object] | None = None) -> list[T]:
    """Expand a sweep table into the grid of `cls` instances it describes (see the module docstring for the rules).

    Arguments:
        table: dotted or nested keys -> a value, or a list of values to sweep.
        cls: a (frozen) dataclass, possibly with nested dataclass fields.
        defaults: values (same key rules, no lists) used for fields the table leaves out, e.g. `sae.d_vit` taken
            from the activations; the table wins where it gives the field too.

    Raises:
        SweepError: unknown key, value of the wrong type, empty list, key given twice, or a required field missing.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = _leaf_fields(cls)

    flat = _flatten(table, fields)
    for key, value in _flatten(defaults or {}, fields).items():
        if _is_swept(value, fields[key]):
            raise SweepError(f"default for key '{key}' must be a single value, got a list")
        flat.setdefault(key, value)

    choices: dict[str, list[object]] = {}
    for key in sorted(flat):
        value = flat[key]
        if _is_swept(value, fields[key]):
            if not value:
                raise SweepError(f"key '{key}' has an empty list; give at least one value")
            choices[key] = [_coerce(key, v, fields[key], i) for i, v in enumerate(value)]
        else:
            choices[key] = [_coerce(key, value, fields[key], None)]

    missing = [k for k, f in fields.items() if _is_required(f) and k not in choices]
    if missing:
        raise SweepError(f"missing required key(s) {', '.join(repr(k) for k in missing)} in sweep")

    keys = list(choices)
    return [_build(cls, dict(zip(keys, combo, strict=True))) for combo in itertools.product(*choices.values())]


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
    try:
        return expand_sweep(table, cls, defaults=defaults)
    except SweepError as err:
        raise SweepError(f"{fpath}: {err}") from err


@beartype.beartype
def group(cfgs: Sequence[training.TrainConfig], *, max_size: int | None = None) -> list[list[training.TrainConfig]]:
    """Split a sweep into groups that can be trained together on one data stream (`training.train_group`).

    Configs with the same `training.get_group_key` (d_vit, d_sae, objective and its shape fields, batch_size,
    n_train, seed, n_eval) form a group. Deterministic: groups are ordered by their first config in `cfgs`, and
    configs keep their sweep order within a group. With `max_size`, a larger group is cut into consecutive chunks
    of at most that many configs (e.g. to fit GPU memory).

    Raises:
        ValueError: `max_size` is not positive.
    """
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    by_key: dict[tuple, list[training.TrainConfig]] = {}
    for cfg in cfgs:
        by_key.setdefault(tuple(training.get_group_key(cfg).items()), []).append(cfg)
    groups = list(by_key.values())
    if max_size is None:
        return groups
    return [g[i : i + max_size] for g in groups for i in range(0, len(g), max_size)]


###########
# Helpers #
###########


def _is_sequence_hint(hint: object) -> bool:
    """Whether the field takes a tuple (then a list is one value, and a list of lists a sweep)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence_hint(arg) for arg in typing.get_args(hint))
    return origin is tuple or hint is tuple


def _is_swept(value: object, leaf: "_Leaf") -> bool:
    if not isinstance(value, list):
        return False
    if _is_sequence_hint(leaf.hint):
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


class _Leaf(typing.NamedTuple):
    """A non-dataclass field reachable from the top class by a dotted path."""

    hint: object
    """The field's resolved type hint."""
    field: dataclasses.Field
    """The dataclass field itself (for defaults)."""


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, _Leaf]:
    """Dotted path -> leaf field, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    out: dict[str, _Leaf] = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            out.update(_leaf_fields(hint, prefix + field.name + "."))
        else:
            out[prefix + field.name] = _Leaf(hint, field)
    return out


def _flatten(table: Mapping[str, object], fields: Mapping[str, _Leaf], prefix: str = "") -> dict[str, object]:
    """Nested and dotted keys -> {dotted key: value}, checking every key exists."""
    prefixes = {k.rsplit(".", 1)[0] + "." for k in fields if "." in k}
    out: dict[str, object] = {}
    for raw_key, value in table.items():
        key = prefix + raw_key
        if isinstance(value, Mapping):
            if key + "." not in prefixes:
                if key in fields:
                    raise SweepError(f"key '{key}' expects {_type_name(fields[key].hint)}, got a table")
                raise SweepError(_unknown_key_msg(key, fields))
            items = _flatten(value, fields, key + ".").items()
        elif key in fields:
            items = [(key, value)]
        elif key + "." in prefixes:
            raise SweepError(f"key '{key}' is a group of fields; give e.g. '{key}.<field>' or a [{key}] table")
        else:
            raise SweepError(_unknown_key_msg(key, fields))
        for k, v in items:
            if k in out:
                raise SweepError(f"key '{k}' is given twice in sweep")
            out[k] = v
    return out


def _unknown_key_msg(key: str, fields: Mapping[str, _Leaf]) -> str:
    msg = f"unknown key '{key}' in sweep"
    # A bare nested name ('exp_factor') most likely means the one dotted key it ends.
    suffix_matches = [k for k in fields if k.endswith("." + key)]
    close = suffix_matches if len(suffix_matches) == 1 else difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f"{msg}; did you mean '{close[0]}'?"
    return f"{msg}; valid keys: {', '.join(fields)}"


def _is_required(leaf: _Leaf) -> bool:
    f = leaf.field
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _type_name(hint: object) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _coerce(key: str, value: object, leaf: _Leaf, index: int | None) -> object:
    """`value` converted to the field's type (int -> float, str -> Path), or SweepError naming the key."""
    hint = leaf.hint
    ok, converted = _match(value, hint)
    if ok:
        return converted
    where = "" if index is None else f" (list index {index})"
    shown = f" {value!r}" if isinstance(value, (str, int, float, bool)) else ""
    raise SweepError(f"key '{key}' expects {_type_name(hint)}, got {type(value).__name__}{shown}{where}")


def _match(value: object, hint: object) -> tuple[bool, object]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = _match(value, arg)
            if ok:
                return True, converted
        return False, None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint)), value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, None
        item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            return False, None
        items = [_match(v, h) for v, h in zip(value, item_hints, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and issubclass(hint, pathlib.PurePath):
        ok = isinstance(value, (str, pathlib.PurePath))
        return ok, hint(value) if ok else None
    if hint is typing.Any or hint is object:
        return True, value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    raise TypeError(f"sweeps do not support fields of type {hint!r}")


def _build(cls: type[T], flat: Mapping[str, object], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            kwargs[field.name] = _build(hint, flat, key + ".")
        elif key in flat:
            kwargs[field.name] = flat[key]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise SweepError(f"invalid {cls.__name__}{' at ' + prefix.rstrip('.') if prefix else ''}: {err}") from err
