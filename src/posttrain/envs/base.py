"""The environment protocol: what a multi-turn rollout calls, in plain Python (no torch).

An episode: ``reset(row, seed)`` gives the first messages (system/user) for one dataset row; then,
turn after turn, the model writes an assistant message and ``step(text)`` answers with a
:class:`Step`: the observation messages to append (``{"role": "user"|"tool", "content": str}``),
the turn's reward, whether the episode is over, and ``info`` numbers/strings for metrics. The
episode's return is the sum of its turn rewards. ``rows(split, n, seed)`` gives the dataset rows of
the environment (train and test disjoint). One instance runs one episode at a time; a runner makes
one per concurrent episode through the factory of ``posttrain.envs.get_env``.

This follows the shape of gym's ``reset``/``step`` and of the chat-message environments of verifiers
and textarena, with two departures: an observation is a list of chat messages (so a tool result is a
``tool`` message and a game's feedback a ``user`` one), and the reset takes the dataset row, so that
the runner, not the environment, decides which problems are trained on and which are held out.

Options come from the user's spec (``guess_number(hi=100)``) as keyword arguments of ``__init__``;
``posttrain.envs`` checks their names and types against the signature before anything runs, so a
subclass only declares them: ``def __init__(self, lo: int = 1, hi: int = 50)``. The base class takes
no option and refuses any with an :class:`EnvError` naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import random
import types
import typing
from typing import Any, Callable, Union

from posttrain.data.tasks import SPLITS, in_split
from posttrain.errors import UserError


class EnvError(UserError, ValueError):
    """An environment spec, option or row the user gave is wrong; the message says what is allowed."""


@dataclasses.dataclass
class Step:
    """What an environment answers to one assistant turn."""

    messages: list[dict]
    """Observation messages to append after the assistant turn ({"role": "user"|"tool", "content": str});
    [] when the episode is done."""
    reward: float = 0.0
    """The reward of this turn (the episode's return is the sum of its turn rewards)."""
    done: bool = False
    """True when the episode is over (solved, failed, or the environment's own turn cap)."""
    info: dict = dataclasses.field(default_factory=dict)
    """Numbers/strings for metrics, e.g. {"correct": 1.0}; an environment fault puts "env_error" here."""


class Environment:
    """Base class of environments: subclass it and define ``reset`` and ``step`` (module docstring)."""

    name: str = "env"
    description: str = ""
    tools: list[Callable[..., Any]] = []
    """Python callables offered to the model as tools (schemas via transformers' get_json_schema)."""
    max_turns: int | None = None
    """The environment's own cap on assistant turns (None: only the runner's)."""

    def __init__(self, **options: Any) -> None:
        if options:
            raise EnvError(f"environment {self.name!r} takes no option {next(iter(options))!r}")

    def reset(self, row: dict, seed: int) -> list[dict]:
        """The first messages (system/user) of an episode on dataset ``row``."""
        raise NotImplementedError(f"{type(self).__name__}.reset")

    def step(self, assistant_text: str) -> Step:
        """The model's turn (its text, without the chat template's end-of-turn) -> the environment's answer."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def close(self) -> None:
        """Release what the episode holds (nothing by default)."""

    def rows(self, split: str, n: int, seed: int) -> list[dict]:
        """``n`` dataset rows of ``split``: by default ``{"seed": k}`` episode seeds, split as the
        built-in tasks split their problems (a stable hash puts 1 in 10 in ``test``)."""
        return [{"seed": k} for k in split_values(range(2**31), split, n, seed, key=f"{self.name}/seed")]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise EnvError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def split_values(pool: range | list, split: str, n: int, seed: int, key: str) -> list:
    """``n`` values of ``pool`` on ``split``'s side of the train/test hash of ``f"{key}/{value}"``:
    from a pool of up to 100,000 values, test rows go through that side's values in a fixed order
    (an evaluation covers each one before repeating) and train rows are seeded draws that may
    repeat; from a larger pool (episode seeds) both are seeded draws. Raises EnvError when
    ``split``'s side is empty."""
    check_split(split)
    if n < 0:
        raise EnvError(f"n must be >= 0, got {n}")
    if len(pool) > 100_000:  # a huge pool (episode seeds): draw and keep those on the split's side
        rng = random.Random(f"posttrain/envs/{key}/{split}/{seed}")
        out: list = []
        while len(out) < n:
            v = pool[rng.randrange(len(pool))]
            if in_split(f"{key}/{v}", split):
                out.append(v)
        return out
    side = [v for v in pool if in_split(f"{key}/{v}", split)]
    if not side and n:
        raise EnvError(f"{key}: no value of {len(pool)} falls in the {split!r} split; widen the range")
    if split == "test":
        return [side[i % len(side)] for i in range(n)]
    rng = random.Random(f"posttrain/envs/{key}/{split}/{seed}")
    return [rng.choice(side) for _ in range(n)]


def _fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (an int is a float; a bool is not an int)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_fits(h, value) for h in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    hint = typing.get_origin(hint) or hint
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "none"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_options(cls: type, options: dict[str, Any], spec: str, defaults: dict[str, Any] | None = None) -> None:
    """Refuse (EnvError naming ``spec``) an option ``cls.__init__`` does not take (with "did you mean"),
    a value of the wrong type (against the parameter's annotation, else the type of its default, or of
    ``defaults[name]`` when given), and a missing required one. A class taking ``**options`` takes any name."""
    defaults = defaults or {}
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: check by defaults only
        hints = {}
    for key, value in options.items():
        if key not in named:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, list(named), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            takes = ", ".join(named) or "none"
            raise EnvError(f"environment {spec!r} has no option {key!r}{hint}; its options: {takes}")
        default = defaults.get(key, named[key].default)
        hint = hints.get(key, type(default) if default not in (inspect.Parameter.empty, None) else inspect.Parameter.empty)
        if not _fits(hint, value):
            raise EnvError(f"environment {spec!r}: option {key}={value!r} must be {_type_name(hint)}")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in options and n not in defaults]
    if missing:
        raise EnvError(f"environment {spec!r} needs the option {missing[0]!r}: "
                       f"give it in parentheses as {missing[0]}=VALUE")


__all__ = ["Environment", "EnvError", "Step", "check_options", "check_split", "split_values"]
