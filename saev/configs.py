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


class ConfigError(ValueError):
    """A config file or table is malformed: the message names the file, the key and what was expected."""


@beartype.beartype
def load_toml(fpath: pathlib.Path | str, what: str = "config") -> dict[str, typing.Any]:
    """Parse a TOML file; every problem reading or parsing it becomes one `ConfigError` naming the file (`what` names
    the kind of file in messages, e.g. "sweep").

    Raises:
        ConfigError: the file is missing, a directory, unreadable (permissions or any other OSError), not UTF-8
            text, or not valid TOML (the message has the line and column).
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
        ConfigError: missing, a directory, unreadable, any other OSError (e.g. EIO on a flaky mount), or not UTF-8.
    """
    try:
        data = fpath.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {fpath}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path is a directory, not a TOML file: {fpath}") from None
    except PermissionError:
        raise ConfigError(f"{what} file is not readable (permission denied): {fpath}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} file {fpath}: {err.strerror or err}") from None
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
    """The `kind = "..."` tag that selects a dataclass in a union of dataclasses: its lower-cased class name."""
    return cls.__name__.lower()


def from_dict(cls: type, data: typing.Any, where: str) -> typing.Any:
    """Build dataclass `cls` from a parsed TOML table, checking every key and type.

    Args:
        cls: a dataclass type.
        data: the table.
        where: where the table came from, for messages, e.g. "configs/demo.toml [train]".
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(
                f"{where}: unknown key '{name}'{closest(name, fields)} (valid keys: {', '.join(fields)})"
            )
        kwargs[name] = convert(hints[name], value, f"{where} key '{name}'")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def convert(tp: typing.Any, value: typing.Any, where: str) -> typing.Any:
    """Check `value` against annotation `tp` and convert it (lists to tuples, tables to dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where)
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where} expects a list, got {_describe(value)}")
        item_tp = args[0] if args else typing.Any
        return tuple(convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a table, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
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
        raise ConfigError(f"{where}: TOML has no null; leave the key out instead")
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where} expects {_type_name(tp)}, got {_describe(value)}")


def _convert_union(args: tuple, value: typing.Any, where: str) -> typing.Any:
    classes = [a for a in args if dataclasses.is_dataclass(a)]
    if classes and isinstance(value, dict):
        kinds = {kind_of(c): c for c in classes}
        kind = value.get("kind", kind_of(classes[0]) if len(classes) == 1 else None)
        if kind not in kinds:
            raise ConfigError(
                f"{where} needs kind = one of {', '.join(repr(k) for k in kinds)}, got {kind!r}"
                + (closest(str(kind), kinds) if kind else "")
            )
        rest = {k: v for k, v in value.items() if k != "kind"}
        return from_dict(kinds[kind], rest, where)
    errors = []
    for arg in args:
        if dataclasses.is_dataclass(arg) or arg is type(None):
            continue
        try:
            return convert(arg, value, where)
        except ConfigError as err:
            errors.append(err)
    names = " or ".join(_type_name(a) for a in args if a is not type(None))
    raise ConfigError(f"{where} expects {names}, got {_describe(value)}")


def _type_name(tp: typing.Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return f"a table ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _describe(value: typing.Any) -> str:
    name = {dict: "table", list: "list"}.get(type(value), type(value).__name__)
    return f"{name} {value!r}" if not isinstance(value, (dict, list)) else name
