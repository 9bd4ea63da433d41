"""Dataclass configs <-> YAML files <-> command-line flags, in one place.

Each method has one dataclass config whose fields carry a docstring (a string literal right under
the field, as in cleanRL's ``Args``). This module turns such a class into argparse flags (the
docstring becomes the help text), reads a YAML file into it, and applies the precedence
``dataclass defaults < YAML file < command-line flags``. Unknown keys and wrong types are errors
that name the file, the line and the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value, file or flag is invalid; the message names where and which field."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it, for ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a flag string) to type ``tp``, or raise ConfigError."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)})")
    origin = typing.get_origin(inner)
    if inner is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (Any,)
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        out = [coerce(v, item_tp, where) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if inner is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    if inner is Path:
        return Path(value)
    return value


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is Literal:
        name = "|".join(map(str, typing.get_args(inner)))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per dataclass field. Defaults are suppressed so that only
    flags actually given override the YAML file; the help shows the dataclass default."""
    docs = field_docs(cls)
    hints = _hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields (override --config)")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        help_text = f"{docs.get(f.name, '')} [{_type_name(tp)}; default: {default!r}]".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if inner is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=_type_name(tp).upper()
                               if typing.get_origin(inner) is not Literal else None,
                               choices=typing.get_args(inner) if typing.get_origin(inner) is Literal else None,
                               help=help_text)


def _yaml_lines(path: Path, text: str) -> dict[str, int]:
    """Line number (1-based) of each top-level key of a YAML mapping."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:1: a config file must be a mapping of field: value")
    return {k.value: k.start_mark.line + 1 for k, _ in node.value}


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML config: (values, line of each key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    lines = _yaml_lines(path, text)
    return (yaml.safe_load(text) or {}), lines


def build(cls: type, values: dict[str, Any] | None = None, source: str = "config",
          lines: dict[str, int] | None = None):
    """Build ``cls`` from a mapping, checking names and types; errors name ``source``:line."""
    values = dict(values or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    lines = lines or {}
    kwargs = {}
    for key, value in values.items():
        where = f"{source}:{lines[key]}: field '{key}'" if key in lines else f"{source}: field '{key}'"
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{where}: unknown field for {cls.__name__}{hint}")
        kwargs[key] = coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: {e}") from None


def from_sources(cls: type, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """``cls`` from its defaults, then the YAML file, then ``overrides`` (e.g. parsed flags)."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "command line"
    if config_file is not None:
        values, lines = read_yaml(config_file)
        build(cls, values, str(config_file), lines)  # report file errors against the file
        source = str(config_file)
    flags = {k: v for k, v in (overrides or {}).items() if not k.startswith("_")}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in flags.items():
        if k in names:
            values[k] = v
            lines.pop(k, None)
    return build(cls, values, source, lines)


def to_dict(config) -> dict[str, Any]:
    """A YAML-safe dict of a config (paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def save_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(cls: type, path: str | Path):
    return from_sources(cls, config_file=path)
