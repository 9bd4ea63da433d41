"""Multi-turn environments: the registry and the spec a user writes to pick one.

    get_env(spec) -> EnvFactory        (factory() -> a new Environment for one episode)
    list_envs() -> list[EnvInfo]       (for `posttrain tasks` / `recommend`)

Spec forms (``--env`` / config ``env:``), options as ``key=value`` read as task and reward specs read
theirs (``posttrain.data.values.parse_value``: ``3``, ``0.5``, ``true``, ``none``, else a string; quote
a string holding commas or parentheses: ``single_turn(task='rg:chain_sum(min_terms=3)')``):

    guess_number                    a built-in, default options
    guess_number(hi=100, max_turns=10)
    ta:GuessTheNumber-v0            a textarena game (``posttrain.envs.textarena_env``), optional (OPTIONS)
    my_pkg.envs:Maze(size=5)        a user's Environment subclass, imported from an importable module

Everything is checked here, before any model loads, and a wrong spec is an :class:`EnvError` (a
``UserError``) naming the spec: an unknown name or option (with "did you mean" when one is close), an
option value of the wrong type (against the annotation or default of ``__init__``'s parameter), a
missing required option, a module that does not import, a missing attribute, a class that is not an
``Environment`` subclass. The factory builds one instance at spec time, so the environment's own
checks of its option values (``hi`` > ``lo``; a textarena game that needs a missing download) run
now too; its ``tools`` and ``max_turns`` are kept on the factory for the runner.

Built-ins (``_ENVS``; modules are imported only when used):
    single_turn      posttrain.envs.single_turn       a --task spec + reward as a one-step environment
    guess_number     posttrain.envs.games             higher/lower feedback, binary search wins
    tool_arithmetic  posttrain.envs.tool_arithmetic   multiplication with a calculator tool
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
from typing import Any

from posttrain.data.values import parse_value
from posttrain.envs.base import Environment, EnvError, Step, check_options
from posttrain.envs.guard import GuardCounts, Guarded, run_step


class UnknownEnvError(EnvError, KeyError):
    """An environment name that is not built in (also a ``KeyError``, as registry look-ups are)."""

    def __str__(self) -> str:  # a KeyError would print its message in quotes
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class EnvInfo:
    name: str
    description: str
    target: str  # "module:Class"
    multi_turn: bool = True
    tools: tuple[str, ...] = ()


_ENVS: dict[str, EnvInfo] = {e.name: e for e in (
    EnvInfo("single_turn", "a --task spec as a one-step environment scored by its reward: single_turn(task=arithmetic)",
            "posttrain.envs.single_turn:SingleTurn", multi_turn=False),
    EnvInfo("guess_number", "guess a secret number in [lo, hi] from higher/lower feedback; options: lo=1, hi=50, "
            "max_turns=8, shaped=false", "posttrain.envs.games:GuessNumber"),
    EnvInfo("tool_arithmetic", "multiply two 3-4 digit numbers, with a calculator tool; options: min_digits=3, "
            "max_digits=4, max_turns=4", "posttrain.envs.tool_arithmetic:ToolArithmetic", tools=("calculator",)),
)}
TEXTARENA = "posttrain.envs.textarena_env:TextArenaEnv"
PREFIXES: dict[str, tuple[str, str]] = {"ta": (TEXTARENA, "env_id")}
"""``PREFIX:ID(...)`` -> (the class, the option ID sets): ``ta:GuessTheNumber-v0`` is a textarena game."""

_PREFIXED = re.compile(r"\s*([A-Za-z_]+):([A-Za-z0-9_.\-]+)\s*(?:\((.*)\))?\s*", re.S)
_MODULE = re.compile(r"\s*([A-Za-z_][\w.]*):([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", re.S)
_NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", re.S)
_FORMS = "write NAME, NAME(key=value, ...), ta:GAME-v0 or module:Class (quote it in a shell)"
_QUOTES = ("'", '"')


def list_envs() -> list[EnvInfo]:
    """The built-ins, then the textarena games checked to run offline (``posttrain.envs.textarena_env``)."""
    from posttrain.envs.textarena_env import OFFLINE_GAMES  # plain data: does not import textarena

    games = [EnvInfo(f"ta:{gid}", f"textarena: {text}", TEXTARENA) for gid, text in OFFLINE_GAMES.items()]
    return [_ENVS[n] for n in sorted(_ENVS)] + games


def _split_top(text: str, spec: str) -> list[str]:
    """Split ``text`` on commas outside parentheses and quotes."""
    parts, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in _QUOTES:
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth or quote:
        raise EnvError(f"environment {spec!r}: unbalanced {'quote' if quote else 'parentheses'} in its options")
    parts.append("".join(cur))
    return parts


def _value(text: str) -> Any:
    t = text.strip()
    if len(t) >= 2 and t[0] in _QUOTES and t[-1] == t[0]:
        return t[1:-1]
    return parse_value(t)


def parse_env(spec: str) -> tuple[str, dict[str, Any]]:
    """``"guess_number(hi=100)"`` -> ``("posttrain.envs.games:GuessNumber", {"hi": 100})``: the class to
    import and the options given. Checks the syntax and the name, not the options."""
    if not isinstance(spec, str) or not spec.strip():
        raise EnvError(f"empty environment spec: {_FORMS}")
    options: dict[str, Any] = {}
    if (m := _PREFIXED.fullmatch(spec)) and m.group(1) in PREFIXES:
        target, key = PREFIXES[m.group(1)]
        options[key], args = m.group(2), m.group(3)
    elif m := _MODULE.fullmatch(spec):
        target, args = f"{m.group(1)}:{m.group(2)}", m.group(3)
    elif m := _NAME.fullmatch(spec):
        name, args = m.group(1), m.group(2)
        if name not in _ENVS:
            close = difflib.get_close_matches(name, list(_ENVS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownEnvError(f"unknown environment {name!r}{hint}; built in: {', '.join(sorted(_ENVS))}; "
                                  "or ta:GAME-v0 (textarena), or module:Class")
        target = _ENVS[name].target
    else:
        raise EnvError(f"cannot read the environment {spec!r}: {_FORMS}")
    for arg in (a for a in _split_top(args or "", spec) if a.strip()):
        key, eq, value = arg.partition("=")
        if not eq or not re.fullmatch(r"\s*[A-Za-z_]\w*\s*", key):
            raise EnvError(f"environment {spec!r}: cannot read {arg.strip()!r}: write key=value")
        if key.strip() in options:
            raise EnvError(f"environment {spec!r}: option {key.strip()!r} given twice")
        options[key.strip()] = _value(value)
    return target, options


def _load_class(target: str, spec: str) -> type:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EnvError(f"environment {spec!r}: cannot import module {module_name!r} ({e}); "
                       "check the name and that it is on PYTHONPATH (or installed)") from e
    cls = getattr(module, attr, None)
    if cls is None:
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvError(f"environment {spec!r}: module {module_name!r} has no attribute {attr!r}{hint}")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise EnvError(f"environment {spec!r}: {module_name}.{attr} is not a subclass of "
                       "posttrain.envs.Environment; subclass it and define reset() and step()")
    return cls


@dataclasses.dataclass(frozen=True)
class EnvFactory:
    """Makes the environment of a spec, one instance per episode: ``factory()``."""

    spec: str
    cls: type
    options: dict
    name: str
    tools: tuple = ()
    max_turns: int | None = None

    def __call__(self) -> Environment:
        return self.cls(**self.options)

    def rows(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """The environment's dataset rows (``Environment.rows`` of a fresh instance)."""
        env = self()
        try:
            return env.rows(split, n, seed)
        finally:
            env.close()


def get_env(spec: str) -> EnvFactory:
    """The factory of environment ``spec`` (forms and checks in the module docstring)."""
    target, options = parse_env(spec)
    cls = _load_class(target, spec)
    check_options(cls, options, spec)
    probe = cls(**options)
    try:
        tools, max_turns = tuple(getattr(probe, "tools", ()) or ()), getattr(probe, "max_turns", None)
        name = getattr(probe, "name", None)
        name = cls.__name__ if not name or name == Environment.name else name  # a class that names itself not
    finally:
        probe.close()
    return EnvFactory(spec.strip(), cls, options, name, tools, max_turns)


__all__ = ["EnvError", "EnvFactory", "EnvInfo", "Environment", "GuardCounts", "Guarded", "Step", "UnknownEnvError",
           "check_options", "get_env", "list_envs", "parse_env", "run_step"]
