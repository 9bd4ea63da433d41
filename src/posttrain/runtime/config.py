"""Dataclass configs <-> YAML files <-> command-line flags, in one place.

Each method has one dataclass config whose fields carry a docstring (a string literal right under
the field, as in cleanRL's ``Args``). This module turns such a class into argparse flags (the
docstring becomes the help text), reads a YAML file into it, and applies the precedence
``dataclass defaults < YAML file < command-line flags``. Unknown keys and wrong types are errors
that name the file, the line and the field.

Domains. Each field's valid values are declared with its definition, in its annotation:
``max_new_tokens: Annotated[int, Positive] = 256``, ``top_p: Annotated[float, Range(0, 1, low_open=True)]``
(``typing.get_type_hints`` without extras, used for coercion, does not see them). Every float field
must be finite, whatever else it declares; ``SplitOverProcesses`` marks a global batch size, a
multiple of the process count read from ``WORLD_SIZE`` (set by torchrun / accelerate), so it is
checked before any process group starts. A config class derives from :class:`Checked`: its
``__post_init__`` checks every field's domain, then the class's cross-field rules (its ``check``
method, extended by subclasses), whenever a config is constructed (library users included), and
raises :class:`ConfigError` carrying the field(s). :func:`build` / :func:`from_sources` turn that
into a message naming where the value came from: the YAML file, line and field, or the flag
(``--max-new-tokens``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from posttrain.data import DataError, read_utf8
from posttrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value, file or flag is invalid; the message names where and which field.

    ``fields`` are the fields the problem is about (the first is the one to change), ``problem``
    the message without the place: :func:`build` puts the file and line, or the flag, in front."""

    def __init__(self, message: str, fields: tuple[str, ...] = (), problem: str | None = None):
        super().__init__(message)
        self.fields, self.problem = tuple(fields), problem if problem is not None else message


def refuse(field: str, problem: str, *others: str) -> ConfigError:
    """The error of a cross-field rule about ``field`` (and ``others``), to raise in a ``check``."""
    return ConfigError(f"field '{field}': {problem}", (field, *others), problem)


# ------------------------------------------------------------------------------------- domains


def processes() -> int:
    """The number of processes the run is launched with (torchrun / accelerate set ``WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """A number within bounds (None = unbounded), each bound inclusive unless ``*_open``; ``why``
    says why, in the error."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __str__(self) -> str:
        lo = None if self.low is None else ("(" if self.low_open else "[") + _number(self.low)
        hi = None if self.high is None else _number(self.high) + (")" if self.high_open else "]")
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">" if self.low_open else ">=") + f" {_number(self.low)}"
        return ("<" if self.high_open else "<=") + f" {_number(self.high)}" if hi else "any number"

    def problem(self, value: float) -> str | None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"must be {self}, got {value!r}" + (f": {self.why}" if self.why else "")
        return None


@dataclasses.dataclass(frozen=True)
class SplitOverProcesses:
    """A global batch size: each of the ``WORLD_SIZE`` processes takes an equal part of it."""

    def __str__(self) -> str:
        return "a multiple of the process count"

    def problem(self, value: int) -> str | None:
        n = processes()
        if value % n:
            return (f"{value} is the global batch, split evenly over the {n} processes (WORLD_SIZE={n}): "
                    f"use a multiple of {n}")
        return None


Positive = Range(0, low_open=True)
NonNegative = Range(0)
"""For sizes and intervals where 0 means off / all / none (the field's docstring says which)."""
Probability = Range(0, 1)
Fraction = Range(0, 1, high_open=True)
"""A share held out or dropped: [0, 1)."""
Seed = Range(0, 2**32 - 1)
"""numpy's seeds are 32-bit unsigned."""
PerProcess = SplitOverProcesses()


@dataclasses.dataclass(frozen=True)
class Domain:
    """What a field accepts: its number type (int, float or None for other types), whether None is
    allowed, and its declared constraints."""

    number: type | None
    optional: bool
    constraints: tuple = ()

    def problem(self, value: Any) -> str | None:
        if self.number is None:
            return None
        if value is None:
            return None if self.optional else "must be a number, not null"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {'an integer' if self.number is int else 'a number'}, got {value!r}"
        if self.number is int and not float(value).is_integer():
            return f"expected an integer, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        for c in self.constraints:
            problem = c.problem(value)
            if problem:
                return problem
        return None

    def __str__(self) -> str:
        return ", ".join(map(str, self.constraints))


def _split_annotated(tp: Any) -> tuple[Any, tuple]:
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[0], tuple(typing.get_args(tp)[1:])
    return tp, ()


@functools.lru_cache(maxsize=None)
def domains(cls: type) -> dict[str, Domain]:
    """field name -> its :class:`Domain`, read from the annotations (``Annotated[...]`` extras)."""
    out = {}
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        tp, outer = _split_annotated(tp)
        inner, optional = _unwrap_optional(tp)
        inner, extra = _split_annotated(inner)
        number = inner if inner in (int, float) else None
        out[name] = Domain(number, optional, outer + extra)
    return out


def field_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``name`` of ``cls`` (None: nothing)."""
    domain = domains(cls).get(name)
    return domain.problem(value) if domain else None


class Checked:
    """Base of the config dataclasses: checks every field's domain, then ``check``, at construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            problem = field_problem(type(self), f.name, getattr(self, f.name))
            if problem:
                raise ConfigError(f"field '{f.name}': {problem}", (f.name,), problem)
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise ``refuse(field, problem)``. Subclasses call ``super().check()``."""


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
        domain = str(domains(cls)[f.name])
        kind = _type_name(tp) + (f", {domain}" if domain else "")
        help_text = f"{docs.get(f.name, '')} [{kind}; default: {default!r}]".replace("%", "%%")
        name = flag(f.name)
        if inner is bool:
            group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(name, dest=f.name, default=argparse.SUPPRESS, metavar=_type_name(tp).upper()
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
    try:
        text = read_utf8(path)  # the data layer's reader: file:line of a bad byte, UTF-16 recognised
    except DataError as e:
        raise ConfigError(str(e)) from None
    lines = _yaml_lines(path, text)
    return (yaml.safe_load(text) or {}), lines


def flag(name: str) -> str:
    """The command-line flag of field ``name``."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass
class Origins:
    """Where each value given to :func:`build` came from: line ``lines[key]`` of ``source`` (a
    file), the command line (``flags``: keys given as flags; None when no command line was
    involved), or ``source`` as a whole. Messages put it in front of the problem."""

    source: str
    lines: dict[str, int]
    flags: Optional[set[str]] = None
    given: frozenset[str] = frozenset()

    def where(self, key: str) -> str:
        if self.flags is not None and key in self.flags:
            return f"command line: field '{key}'"
        if key in self.lines:
            return f"{self.source}:{self.lines[key]}: field '{key}'"
        return f"{self.source}: field '{key}'" if key in self.given else f"field '{key}' (its default)"

    def hint(self, key: str) -> str:
        """' (flag --name)' when the value can be given on the command line and was not read from a file line."""
        return f" (flag {flag(key)})" if self.flags is not None and key not in self.lines else ""

    def error(self, key: str, problem: str, fields: tuple[str, ...] = ()) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {problem}{self.hint(key)}", fields or (key,), problem)


def _checked(cls: type, values: dict[str, Any], origins: Origins) -> dict[str, Any]:
    """``values`` checked for their names, coerced to their types and checked for their domains."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        where = origins.where(key)
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{where}: unknown field for {cls.__name__}{hint}", (key,))
        try:
            kwargs[key] = coerce(value, hints[key], where)
        except ConfigError as e:
            raise ConfigError(f"{e}{origins.hint(key)}", (key,), str(e)[len(where) + 2:]) from None
        problem = field_problem(cls, key, kwargs[key])
        if problem:
            raise origins.error(key, problem)
    return kwargs


def _construct(cls: type, kwargs: dict[str, Any], origins: Origins):
    """``cls(**kwargs)``; a cross-field error is reported against where its first field came from."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if not e.fields:
            raise
        raise origins.error(e.fields[0], e.problem, e.fields) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{origins.source}: {e}") from None


def check_values(cls: type, values: dict[str, Any], source: str = "config",
                 lines: dict[str, int] | None = None) -> dict[str, Any]:
    """Check a partial mapping (e.g. a YAML file that flags will complete) field by field: names,
    types and domains, not the cross-field rules; errors name ``source``:line. Returns the coerced values."""
    return _checked(cls, dict(values), Origins(source, dict(lines or {}), None, frozenset(values)))


def build(cls: type, values: dict[str, Any] | None = None, source: str = "config",
          lines: dict[str, int] | None = None, flags: Optional[set[str]] = None):
    """Build ``cls`` from a mapping, checking names, types and domains; errors name ``source``:line,
    or the flag for keys in ``flags`` (given on the command line)."""
    values = dict(values or {})
    origins = Origins(source, dict(lines or {}), flags, frozenset(values))
    return _construct(cls, _checked(cls, values, origins), origins)


def from_sources(cls: type, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """``cls`` from its defaults, then the YAML file, then ``overrides`` (parsed flags): each value
    is checked against where it came from (the file's line, or the flag), then the whole."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "command line"
    if config_file is not None:
        values, lines = read_yaml(config_file)
        source = str(config_file)
        check_values(cls, values, source, lines)  # the file's own errors, against the file
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in (overrides or {}).items() if not k.startswith("_") and k in names}
    values.update(flags)
    lines = {k: n for k, n in lines.items() if k not in flags}
    return build(cls, values, source, lines, flags=set(flags))


def inapplicable(config, given: dict[str, str | None]) -> None:
    """``ConfigError`` for a field the user gave (``given``: field -> the file line it came from,
    e.g. ``run.yaml:3``, or None for a flag) that does nothing with the rest of ``config``: the classes' ``APPLIES_WHEN``
    tables (field -> (when, predicate on the config)), merged along the class hierarchy. A value
    that would be ignored is refused with the reason, not accepted silently."""
    rules: dict[str, tuple[str, Any]] = {}
    for klass in reversed(type(config).__mro__):
        rules.update(vars(klass).get("APPLIES_WHEN", {}))
    for field, where in given.items():
        if field in rules and not rules[field][1](config):
            what = f"{where}: field '{field}'" if where else flag(field)
            raise ConfigError(f"{what} applies only {rules[field][0]}; drop it, or give that too", (field,))


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
