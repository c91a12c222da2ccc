"""TOML -> frozen dataclass configs, with errors that name the file, the key and the closest valid key.

Configs are data: they are parsed with `tomllib` and checked field by field against the dataclass annotations.
Nothing in a config is ever executed.
"""

import dataclasses
import difflib
import pathlib
import tomllib
import types
import typing

import beartype

from saev import errors, helpers


class ConfigError(errors.UserConfigError, ValueError):
    """A config file or table is malformed: the message names the file, the key and what was expected."""


@beartype.beartype
def load_toml(fpath: pathlib.Path | str, what: str = "config") -> dict[str, typing.Any]:
    """Parse a TOML file; every problem reading or parsing it becomes one `ConfigError` naming the file (`what` names
    the kind of file in messages, e.g. "sweep").

    Raises:
        ConfigError: the file is missing, a directory, not a regular file, too large, unreadable (permissions or any
            other OSError), not UTF-8 text, or not valid TOML (the message has the line and column).
    """
    fpath = pathlib.Path(fpath)
    try:
        return tomllib.loads(read_text(fpath, what))
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"TOML syntax error in {fpath}: {err}") from None


@beartype.beartype
def read_text(fpath: pathlib.Path, what: str = "config") -> str:
    """The whole text of the TOML file `fpath`, or `ConfigError` naming it (`what` names the kind of file).

    Raises:
        ConfigError: missing, a directory, not a regular file (a FIFO, a device), over `helpers.MAX_TEXT_BYTES`,
            unreadable, any other OSError (e.g. EIO on a flaky mount), or not UTF-8.
    """
    data = helpers.read_regular_file(fpath, what=what, error=ConfigError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} file {fpath} is not UTF-8 text (byte {data[err.start]:#04x} at line {line}); "
            "TOML files must be UTF-8"
        ) from None


def closest(name: str, options: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def kind_of(cls: type) -> str:
    """The `kind = "..."` tag that selects a dataclass in a union of dataclasses: its `kind` class variable if it
    has one, else its lower-cased class name."""
    kind = getattr(cls, "kind", None)
    return kind if isinstance(kind, str) else cls.__name__.lower()


def _leaf_paths(cls: type, depth: int = 2) -> list[str]:
    """Dotted paths of the fields below `cls` (through nested dataclasses and kind-chosen unions), `depth` levels."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(f.name)
        inner = union_classes(hints[f.name]) or ([hints[f.name]] if dataclasses.is_dataclass(hints[f.name]) else [])
        if depth > 1:
            for c in inner:
                out.extend(f"{f.name}.{p}" for p in _leaf_paths(c, depth - 1) if f"{f.name}.{p}" not in out)
    return out


def _suggest(cls: type, name: str, path: str) -> str:
    """'; did you mean ...?' for an unknown key: the same name one level down (`exp_factor` -> `sae.exp_factor`), else
    the closest key at this level or below."""
    paths = _leaf_paths(cls)
    nested = [p for p in paths if p.endswith("." + name)]
    if len(nested) == 1:
        return f"; did you mean '{path}{nested[0]}'?"
    by_last = {p.rsplit(".", 1)[-1]: p for p in reversed(paths)}
    match = difflib.get_close_matches(name, [p for p in paths if "." not in p], n=1, cutoff=0.6)
    match = match or [by_last[m] for m in difflib.get_close_matches(name, list(by_last), n=1, cutoff=0.6)]
    return f"; did you mean '{path}{match[0]}'?" if match else ""


def union_classes(tp: typing.Any) -> list[type]:
    """The dataclasses of a union annotation (a field chosen by `kind`), or [] if `tp` is not such a union."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return []
    return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]


def field_hint(cls: type, path: str) -> typing.Any:
    """The annotation of the field at dotted `path` below dataclass `cls` (through nested dataclasses and, for a
    union chosen by `kind`, any of its classes); None if no such field exists."""
    hint: typing.Any = cls
    for name in path.split("."):
        classes = union_classes(hint) or ([hint] if dataclasses.is_dataclass(hint) else [])
        found = None
        for c in classes:
            hints = typing.get_type_hints(c)
            if name in hints and name in {f.name for f in dataclasses.fields(c)}:
                found = hints[name]
                break
        if found is None:
            if name == "kind" and len(classes) > 1:
                return str
            return None
        hint = found
    return hint


def from_dict(cls: type, data: typing.Any, where: str, path: str = "") -> typing.Any:
    """Build dataclass `cls` from a parsed TOML table, checking every key and type. This is the one engine that turns
    TOML into configs: pipeline files (`saev.stages` configs) and every point of a sweep (`saev.sweep`) go through it.

    Args:
        cls: a dataclass type.
        data: the table.
        where: the file (or other source) the table came from, for messages.
        path: the dotted key of this table inside the file ("" at the top), for messages.

    Rules: unknown keys are refused with the closest valid key (also a nested one: `exp_factor` -> `sae.exp_factor`);
    lists become tuples; a field whose type is a union of dataclasses is chosen by `kind = "..."` in its table (or a
    bare string `field = "kind"`; without `kind`, the class of the field's default); TOML has no null, so an
    optional field is left out instead.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {_key(path.rstrip('.')) or 'the file'} expects a table, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            hint = _suggest(cls, name, path)
            raise ConfigError(
                f"{where}: unknown key '{path}{name}'{hint} (valid keys: {', '.join(path + f for f in fields)})"
            )
        default = fields[name].default
        if union_classes(hints[name]) and isinstance(value, dict) and "kind" not in value:
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                value = {"kind": kind_of(type(default)), **value}
        kwargs[name] = convert(hints[name], value, where, f"{path}{name}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        names = [n for m in missing for n in _required_paths(hints[m], f"{path}{m}")]
        raise ConfigError(f"{where}: missing required key(s): {', '.join(repr(n) for n in names)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        prefix = f"{_key(path.rstrip('.'))}: " if path else ""
        raise ConfigError(f"{where}: {prefix}{err}") from err


def convert(tp: typing.Any, value: typing.Any, where: str, key: str = "") -> typing.Any:
    """Check `value` against annotation `tp` and convert it (lists to tuples, tables to dataclasses); `key` is its
    dotted key, for messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where, key)
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{where}: {_key(key)} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {_key(key)} expects a list, got {_describe(value)}")
        item_tp = args[0] if args else typing.Any
        return tuple(convert(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {_key(key)} expects a table, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, f"{key}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is pathlib.Path:
        if isinstance(value, str):
            return pathlib.Path(value)
    elif tp is type(None):
        raise ConfigError(f"{where}: {_key(key)}: TOML has no null; leave the key out instead")
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: {_key(key)} expects {_type_name(tp)}, got {_describe(value)}")


def _required_paths(tp: typing.Any, key: str) -> list[str]:
    """The dotted keys a missing field needs: the field itself, or for a dataclass its own required fields."""
    if not dataclasses.is_dataclass(tp):
        return [key]
    hints = typing.get_type_hints(tp)
    required = [
        f.name for f in dataclasses.fields(tp)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    return [n for name in required for n in _required_paths(hints[name], f"{key}.{name}")] or [key]


def _key(key: str) -> str:
    return f"key '{key}'" if key else ""


def _convert_union(args: tuple, value: typing.Any, where: str, key: str) -> typing.Any:
    classes = [a for a in args if dataclasses.is_dataclass(a)]
    kinds = {kind_of(c): c for c in classes}
    if classes and isinstance(value, str) and value in kinds:
        value = {"kind": value}  # `objective = "topk"`: the kind with its defaults
    if classes and isinstance(value, dict):
        kind = value.get("kind", kind_of(classes[0]) if len(classes) == 1 else None)
        if kind not in kinds:
            raise ConfigError(
                f"{where}: {_key(key)} needs kind = one of {', '.join(repr(k) for k in kinds)}, got {kind!r}"
                + (closest(str(kind), kinds) if kind else "")
            )
        rest = {k: v for k, v in value.items() if k != "kind"}
        own = {f.name for f in dataclasses.fields(kinds[kind])}
        for name in rest:
            owners = [k for k, c in kinds.items() if name in {f.name for f in dataclasses.fields(c)}]
            if name not in own and owners:
                raise ConfigError(
                    f"{where}: key '{key}.{name}' is not read by {key} kind {kind!r} (only by "
                    f"{', '.join(repr(o) for o in owners)}); remove it, or choose one of those kinds"
                )
        return from_dict(kinds[kind], rest, where, f"{key}.")
    for arg in args:
        if dataclasses.is_dataclass(arg) or arg is type(None):
            continue
        try:
            return convert(arg, value, where, key)
        except ConfigError:
            continue
    names = " or ".join(_type_name(a) for a in args if a is not type(None))
    if classes and isinstance(value, str):
        raise ConfigError(
            f"{where}: {_key(key)} must be a kind, one of {', '.join(repr(k) for k in kinds)}, got {value!r}"
            + closest(value, kinds)
        )
    raise ConfigError(f"{where}: {_key(key)} expects {names}, got {_describe(value)}")


def _type_name(tp: typing.Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return f"a table ({tp.__name__})"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _describe(value: typing.Any) -> str:
    name = {dict: "table", list: "list"}.get(type(value), type(value).__name__)
    return f"{name} {value!r}" if not isinstance(value, (dict, list)) else name
