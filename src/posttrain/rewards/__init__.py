"""Reward functions, picked by name, combined with weights, scored in batches.

Calling convention (TRL `rewards/`, open-r1 `get_reward_funcs`, one sample at a time):

    fn(prompt: str, completion: str, **row) -> float | None

`row` holds the dataset's extra columns (`answer`, `tests`, `entry_point`, `target`, ...);
a function takes the columns it needs by name and swallows the rest with `**_`. `None`
means "cannot judge this sample" (e.g. the reference answer is missing): it is skipped in
means and counted in metrics, never treated as 0.

Registry: `get(name, **options)` returns the function with `options` bound (options win
over same-named row columns). Built-ins are imported lazily, so `get("math")` never imports
the code sandbox and the registry works before an optional module exists:

    math       posttrain.rewards.math:math_reward            columns: answer
    code       posttrain.rewards.code:code_reward            columns: tests, entry_point
    format     posttrain.rewards.format:format_reward        options: pattern
    length     posttrain.rewards.length:length_penalty       options: max_len, buffer, tokenizer
    countdown  posttrain.rewards.countdown:countdown_reward  columns: target, numbers
    reasoning_gym  posttrain.rewards.reasoning_gym:reasoning_gym_reward  columns: answer, metadata

Extension point. `register(name)` adds a plain reward function. `register(name,
factory=True)` adds a *factory* `factory(arg=None, **options) -> reward fn`, for rewards that
hold state (a model, an HTTP client): it is called once by `get`, and the spec argument in
parentheses reaches it as `arg` (`reward_model(runs/rm/final)`, `judge(judge.yaml)`). The
`judge` and `reward_model` rewards of later issues are added as one line each in `_BUILTIN`
(`factory=True`). `register(name, batch=fn)` attaches a batch scorer
`fn(rows, completions, max_workers=None) -> list[float | None]` that `score_batch` uses
instead of the per-sample loop (the code reward runs its sandboxes in parallel this way).

Spec syntax (CLI `--reward`, config `reward:`), parsed by `parse_spec`:

    SPEC   := ITEM ("," ITEM)*
    ITEM   := NAME ["(" ARGS ")"] [":" WEIGHT]
    ARGS   := ARG ("," ARG)*        ARG := KEY "=" VALUE  |  VALUE (one positional, first)

    "math"                          [("math", 1.0, {})]
    "math,format:0.2"               [("math", 1.0, {}), ("format", 0.2, {})]
    "length(max_len=512,buffer=64):0.5"   [("length", 0.5, {"max_len": 512, "buffer": 64})]
    "reward_model(runs/rm/final):0.5"     [("reward_model", 0.5, {"arg": "runs/rm/final"})]
    "judge(http://localhost:8000/v1)"     [("judge", 1.0, {"arg": "http://localhost:8000/v1"})]

Short form for the one argument of a factory reward (judge, reward_model): `NAME:ARG[:WEIGHT]`
when ARG is not a number
(`judge:judge.yaml`, `reward_model:runs/rm/final:0.5`, as the issues and the doctrine write
them); an ARG that itself holds a colon (a URL) needs the parenthesised form.

A weight is only ever the number after a colon *outside* parentheses, so arguments may hold
colons (URLs, Windows paths) and commas do not split inside parentheses. VALUEs that read as
int, float, true/false or none become those; everything else stays a string. Quote the spec
in a shell: parentheses are shell syntax.

A spec the user got wrong (syntax, an unknown name, a bad weight, a positional argument to a
plain reward, a built-in whose module fails to import) raises `RewardSpecError` (a `UserError` and
a `ValueError`) whose message names the flag (`--reward` unless the caller passes another) and the
whole spec, and for an unknown name lists the known rewards (`UnknownRewardError` is also a
`KeyError`, without the quotes `str(KeyError)` adds).

Combination rule (`combine`, the same as TRL's GRPOTrainer): the total is the weighted sum
of the parts that returned a number. A part that returns None is left out *without*
renormalising the other weights (renormalising would turn a 0.2-weighted format bonus into
a full reward whenever the main reward cannot judge), and the total is None only when every
part is None. Exceptions raised by a reward function propagate: a broken reward should stop
a run, not silently score 0.

Batches: `score_batch(fn, prompts, completions, rows)` -> `(totals, {name: values})` runs
rewards that have a batch scorer (code) in worker processes bounded by the core count and the
rest inline; `reward_metrics(totals, parts)` turns that into `reward/mean`, `reward/<name>`, ...
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math as _math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.data.values import NUMBER as _NUMBER, parse_value  # parse_value re-exported
from posttrain.data import as_text  # a completion as text (defined with the data formats)
from posttrain.errors import UserError

RewardFn = Callable[..., "float | None"]

# name -> (module, attribute, factory?, batch "module:attr" or None)
_BUILTIN: dict[str, tuple[str, str, bool, str | None]] = {
    "math": ("posttrain.rewards.math", "math_reward", False, None),
    "code": ("posttrain.rewards.code", "code_reward", False, "posttrain.rewards.code:code_rewards"),
    "format": ("posttrain.rewards.format", "format_reward", False, None),
    "length": ("posttrain.rewards.length", "length_penalty", False, None),
    "countdown": ("posttrain.rewards.countdown", "countdown_reward", False, None),
    "reasoning_gym": ("posttrain.rewards.reasoning_gym", "reasoning_gym_reward", False, None),
    "judge": ("posttrain.rewards.judge", "make_judge_reward", True, None),
    "reward_model": ("posttrain.rewards.reward_model", "make_reward_model_reward", True, None),
}
# name -> (target, factory?, batch); target is a callable or None for a lazy built-in
_REGISTRY: dict[str, tuple[Callable[..., Any] | None, bool, Callable[..., Any] | str | None]] = {
    name: (None, factory, batch) for name, (_, _, factory, batch) in _BUILTIN.items()
}
_RESERVED = ("prompt", "completion")
_ROW_CHECKS = {"code": "posttrain.rewards.code:row_problem"}
"""Built-in rewards that can tell at load time that a row's columns are unusable (``row_checks``)."""


class RewardSpecError(UserError, ValueError):
    """A reward spec the user gave is wrong: ``spec``, ``problem`` and the ``flag`` it came from."""

    def __init__(self, spec: str, problem: str, flag: str = "--reward"):
        self.spec, self.problem, self.flag = spec, problem, flag
        super().__init__(f"{flag} {spec!r}: {problem}")

    def __str__(self) -> str:  # a KeyError subclass would otherwise print its message in quotes
        return str(self.args[0]) if self.args else ""

    def naming(self, spec: str, flag: str) -> "RewardSpecError":
        """The same problem, reported for the whole ``spec`` given with ``flag``."""
        return type(self)(spec, self.problem, flag)


class UnknownRewardError(RewardSpecError, KeyError):
    """A reward name that is not registered (also a ``KeyError``, as registry look-ups were)."""


_SPEC_FORM = "write NAME[(ARGS)][:WEIGHT] items separated by commas, e.g. 'math,format:0.2' (quote it in a shell)"


def register(name: str, *, factory: bool = False, batch: Callable[..., Any] | None = None, replace: bool = False):
    """Decorator adding a reward function (or, with `factory=True`, a factory) under `name`."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"reward name {name!r} must be an identifier")

    def decorate(target: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not replace:
            raise ValueError(f"reward {name!r} is already registered (pass replace=True to override)")
        _REGISTRY[name] = (target, factory, batch)
        return target

    return decorate


def unregister(name: str) -> None:
    """Remove a reward added with `register` (built-ins come back as their lazy entry)."""
    _REGISTRY.pop(name, None)
    if name in _BUILTIN:
        _, _, factory, batch = _BUILTIN[name]
        _REGISTRY[name] = (None, factory, batch)


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _resolve(name: str) -> tuple[Callable[..., Any], bool, Callable[..., Any] | None]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list_rewards(), n=1)
        raise UnknownRewardError(name, f"unknown reward {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; known: {', '.join(list_rewards())}")
    target, factory, batch = _REGISTRY[name]
    if target is None:
        module, attr, _, _ = _BUILTIN[name]
        try:
            target = _load(f"{module}:{attr}")
        except ImportError as e:
            raise RewardSpecError(name, f"reward {name!r} needs {module}, which failed to import ({e}): "
                                  "install what it names, or use another reward") from e
    if isinstance(batch, str):
        batch = _load(batch)
    return target, factory, batch


def row_checks(spec: str | None) -> list[Callable[[dict], tuple[str, str] | None]]:
    """The data checks of the rewards in ``spec`` (``data.load_rows(checks=...)``): a dataset whose
    ``tests`` column is not runnable Python stops at load time, naming the line, rather than in
    the middle of a run."""
    if not spec:
        return []
    return [_load(_ROW_CHECKS[name]) for name in dict.fromkeys(n for n, _, _ in parse_spec(spec)) if name in _ROW_CHECKS]


def _extra(row: dict | None) -> dict:
    return {k: v for k, v in (row or {}).items() if k not in _RESERVED}


class Reward:
    """A named reward function with options bound; callable like any reward function."""

    def __init__(self, name: str, fn: RewardFn, options: dict | None = None, batch: Callable[..., Any] | None = None):
        self.name, self.fn, self.options, self.batch = name, fn, dict(options or {}), batch
        self.__name__ = name

    def __call__(self, prompt: Any, completion: Any, **row: Any) -> float | None:
        return self.fn(prompt, as_text(completion), **{**_extra(row), **self.options})

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, options={self.options!r})"


def get(name: str, **options: Any) -> Reward:
    """The reward registered as `name`, with `options` bound (a factory is called with them)."""
    target, factory, batch = _resolve(name)
    if factory:
        made = target(**options)
        return Reward(name, made, {}, getattr(made, "batch", None))
    if "arg" in options:
        raise RewardSpecError(name, f"reward {name!r} takes no positional argument (got {options['arg']!r}): "
                              f"give options as key=value")
    if name in _BUILTIN:  # a registered function may pass options on to its batch scorer
        _check_options(name, target, options)
    return Reward(name, target, options, batch)


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _check_options(name: str, fn: Callable[..., Any], options: dict) -> None:
    """An option a built-in reward function does not name would be swallowed by its `**_` and
    ignored: refuse it, listing the options it has."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    known = [p for p, v in params.items() if v.kind in _NAMED and p not in _RESERVED]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise RewardSpecError(name, f"reward {name!r} has no option {unknown[0]!r}; its options: "
                              + (", ".join(known) or "none"))


# ------------------------------------------------------------------ spec parsing



def _split_top(text: str, sep: str, spec: str, flag: str) -> list[str]:
    """Split on `sep` outside parentheses (unbalanced ones are a `RewardSpecError` for `spec`)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise RewardSpecError(spec, "unbalanced ')': every '(' needs its ')'", flag)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise RewardSpecError(spec, "unbalanced '(': every '(' needs its ')'", flag)
    parts.append("".join(cur))
    return parts


_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*(?::\s*([^:()]*?))?\s*", re.S)


_COLON_ARG = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:([^()]+)", re.S)


def parse_spec(spec: str, flag: str = "--reward") -> list[tuple[str, float, dict[str, Any]]]:
    """`"math,format:0.2"` -> `[("math", 1.0, {}), ("format", 0.2, {})]` (grammar in the module doc).
    A malformed spec raises `RewardSpecError` naming `flag` and the spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(str(spec or ""), f"empty reward spec: {_SPEC_FORM}", flag)

    def fail(problem: str):
        raise RewardSpecError(spec, problem, flag)

    out = []
    for item in _split_top(spec, ",", spec, flag):
        short = _COLON_ARG.fullmatch(item)
        is_factory = bool(short) and _REGISTRY.get(short.group(1), (None, False, None))[1]
        if short and is_factory and not _NUMBER.fullmatch(short.group(2).strip()):
            # NAME:ARG[:WEIGHT], the short form for one positional argument ("judge:judge.yaml",
            # "reward_model:runs/rm/final:0.5"); an argument holding a colon needs NAME(ARG).
            arg, sep, tail = short.group(2).strip().rpartition(":")
            arg, weight = (arg.strip(), float(tail)) if sep and _NUMBER.fullmatch(tail.strip()) else (short.group(2).strip(), 1.0)
            out.append((short.group(1), weight, {"arg": arg}))
            continue
        m = _ITEM.fullmatch(item)
        if not m:
            fail(f"cannot parse the item {item.strip()!r}: {_SPEC_FORM}")
        name, args, weight_text = m.group(1), m.group(2), m.group(3)
        weight = 1.0
        if weight_text is not None:
            if not _NUMBER.fullmatch(weight_text.strip()):
                fail(f"the weight {weight_text.strip()!r} of reward {name!r} is not a number (e.g. {name}:0.5)")
            weight = float(weight_text)
            if not _math.isfinite(weight):
                fail(f"the weight of reward {name!r} must be a finite number")
        options: dict[str, Any] = {}
        if args is not None and args.strip():
            for i, arg in enumerate(_split_top(args, ",", spec, flag)):
                key, eq, value = arg.partition("=")
                if eq and re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", key):
                    key = key.strip()
                    if key in options:
                        fail(f"option {key!r} given twice for reward {name!r}")
                    options[key] = parse_value(value)
                elif i == 0:
                    options["arg"] = arg.strip()
                else:
                    fail(f"reward {name!r}: only the first argument may be positional, got {arg.strip()!r}: "
                         "write the others as key=value")
        out.append((name, weight, options))
    return out


# ------------------------------------------------------------------ combination


def _total(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """Weighted sum over the parts that judged; None when no part did (rule in the module doc)."""
    judged = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not judged:
        return None
    return float(sum(w * float(v) for v, w in judged))


class Combined:
    """Several rewards with weights; `__call__` gives the total, `score` also each part."""

    def __init__(self, parts: Sequence[tuple[str, RewardFn, float]]):
        if not parts:
            raise ValueError("combine needs at least one reward")
        self.parts = list(parts)
        self.names = [n for n, _, _ in self.parts]
        self.weights = [float(w) for _, _, w in self.parts]
        self.__name__ = "+".join(self.names)

    def score(self, prompt: Any, completion: Any, **row: Any) -> tuple[float | None, dict[str, float | None]]:
        extra = _extra(row)
        text = as_text(completion)
        values = {name: fn(prompt, text, **extra) for name, fn, _ in self.parts}
        return _total(list(values.values()), self.weights), values

    def __call__(self, prompt: Any, completion: Any, **row: Any) -> float | None:
        return self.score(prompt, completion, **row)[0]

    def __repr__(self) -> str:
        return "Combined(" + ", ".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights)) + ")"


def _name_of(fn: Any) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def combine(items: Sequence[tuple[RewardFn, float] | tuple[str, RewardFn, float]]) -> Combined:
    """`combine([(fn, weight), ...])`; names come from `Reward.name` or `__name__`, and a
    repeated name gets a suffix (`format`, `format_2`) so metrics `reward/<name>` stay distinct."""
    parts, seen = [], {}
    for item in items:
        name, fn, weight = item if len(item) == 3 else (_name_of(item[0]), item[0], item[1])
        if not _math.isfinite(float(weight)):
            raise ValueError(f"weight of reward {name!r} must be finite")
        seen[name] = seen.get(name, 0) + 1
        parts.append((name if seen[name] == 1 else f"{name}_{seen[name]}", fn, float(weight)))
    return Combined(parts)


def from_spec(spec: str, flag: str = "--reward") -> Combined:
    """`from_spec("math,format:0.2")`: parse, look up each reward, combine. A wrong spec raises
    `RewardSpecError` naming `flag` and the whole spec."""
    items = parse_spec(spec, flag)
    try:
        return combine([(get(name, **options), weight) for name, weight, options in items])
    except RewardSpecError as e:
        raise e.naming(spec, flag) from e


# ------------------------------------------------------------------ batch scoring


def default_workers() -> int:
    """Worker processes for parallel rewards: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _batch_of(fn: Any) -> Callable[..., Any] | None:
    batch = getattr(fn, "batch", None)
    if batch is not None:
        return batch
    # the raw code reward, passed without going through `get`
    if getattr(fn, "__module__", None) == "posttrain.rewards.code" and getattr(fn, "__name__", "") == "code_reward":
        return _load("posttrain.rewards.code:code_rewards")
    return None


def _score_part(fn: Any, prompts, completions, rows, max_workers: int) -> list[float | None]:
    batch = _batch_of(fn)
    if batch is not None:
        options = getattr(fn, "options", {})
        full = [{**_extra(r), **options, "prompt": p} for p, r in zip(prompts, rows)]
        values = list(batch(full, completions, max_workers=max_workers))
        if len(values) != len(completions):
            raise RuntimeError(f"batch reward {_name_of(fn)!r} returned {len(values)} values for {len(completions)}")
        return values
    return [fn(p, c, **_extra(r)) for p, c, r in zip(prompts, completions, rows)]


def score_batch(
    fn: RewardFn | Combined,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict] | None = None,
    max_workers: int | None = None,
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Score a batch: `(totals, {name: values})`, one value per completion.

    Rewards with a batch scorer (the code reward) run in at most `max_workers` worker
    processes (default: the core count); every other reward runs inline, in order.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    rows = [{}] * n if rows is None else list(rows)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} rows for {n} completions")
    workers = max(1, min(max_workers or default_workers(), max(n, 1)))
    texts = [as_text(c) for c in completions]
    combined = fn if isinstance(fn, Combined) else combine([(fn, 1.0)])
    parts = {name: _score_part(part, prompts, texts, rows, workers) for name, part, _ in combined.parts}
    columns = list(parts.values())
    totals = [_total([col[i] for col in columns], combined.weights) for i in range(n)]
    return totals, parts


def mean(values: Sequence[float | None]) -> float | None:
    """Mean over the values that are not None (None when there are none)."""
    judged = [float(v) for v in values if v is not None]
    return sum(judged) / len(judged) if judged else None


def reward_metrics(totals: Sequence[float | None], parts: dict[str, Sequence[float | None]]) -> dict[str, float]:
    """Metrics of one scored batch, named as in DESIGN.md: `reward/mean`, `reward/std`
    (population std), `reward/none` (samples no part could judge), and per part
    `reward/<name>` (mean over judged samples) and `reward/<name>/none` (its None count).
    A mean over nothing is left out rather than reported as 0."""
    out: dict[str, float] = {}
    judged = [float(v) for v in totals if v is not None]
    if judged:
        m = sum(judged) / len(judged)
        out["reward/mean"] = m
        out["reward/std"] = (sum((v - m) ** 2 for v in judged) / len(judged)) ** 0.5
    out["reward/none"] = float(len(totals) - len(judged))
    for name, values in parts.items():
        part_mean = mean(values)
        if part_mean is not None:
            out[f"reward/{name}"] = part_mean
        out[f"reward/{name}/none"] = float(sum(v is None for v in values))
    return out


__all__ = [
    "Combined",
    "Reward",
    "RewardFn",
    "RewardSpecError",
    "UnknownRewardError",
    "as_text",
    "combine",
    "default_workers",
    "from_spec",
    "get",
    "list_rewards",
    "mean",
    "parse_spec",
    "parse_value",
    "register",
    "reward_metrics",
    "score_batch",
    "unregister",
]
