"""Shared flag checks of the verbs: numeric domains at parse time, flags that do not apply, model specs.

- ``int_at_least(n)`` / ``float_in(low, high)``: argparse ``type=`` functions. A value out of its
  domain is refused while the command line is parsed (argparse prints
  ``error: argument --n: must be >= 1, got 0`` and exits 2), before anything loads or is written.
  NaN and infinities are refused by every float type.
- ``remember_defaults(parser)`` at the end of a verb's ``add_arguments``, then
  ``refuse_inapplicable(args, rules)`` in its ``run``: a flag given (its value differs from its
  default) where a rule says it does not apply is refused with the rule's reason. Each verb states its
  rules as a table of :class:`Rule`.
- ``load_model_flag(flag, spec)`` (``models.check_model_flag`` checks without loading): a bad model spec becomes a
  ``ModelError`` naming the flag and the path, checked before any output is written.
- ``reward_flag``, ``task_flag``, ``out_file``, ``resumable_out``: a reward spec, the
  columns its rewards read, a task name and split, an output path; each refusal names the flag (or file and line).
  ``write_jsonl`` writes an ``out_file``.

This module's name starts with ``_``, so ``posttrain.cli`` does not take it for a verb.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Sequence

from posttrain.runtime.config import ConfigError


class FlagError(ConfigError):
    """A command-line flag does not apply to the chosen input, or conflicts with another flag."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval from ``low`` to ``high`` (open ends as asked)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    parse.__name__ = f"float_in_{interval}"
    return parse


nonnegative_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
probability = float_in(0.0, 1.0, low_open=True)
"""(0, 1]: top-p."""


def memory_size(text: str) -> float:
    """An argparse type: a memory size such as 24GB or 80GiB, in GB (1e9 bytes), > 0."""
    from posttrain.doctrine.memory import parse_memory

    try:
        value = parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


# ------------------------------------------------------------------ flags that do not apply


def remember_defaults(parser: argparse.ArgumentParser) -> None:
    """Record each flag's default and its name, so that ``given`` can tell which flags were set."""
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    parser.set_defaults(_defaults={a.dest: a.default for a in actions},
                        _flags={a.dest: max(a.option_strings, key=len) for a in actions})


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether flag ``dest`` was given with a value other than its default."""
    return getattr(args, dest) != args._defaults[dest]


def flag(args: argparse.Namespace, dest: str) -> str:
    """The flag's name on the command line (``max_new_tokens`` -> ``--max-new-tokens``)."""
    return args._flags[dest]


@dataclasses.dataclass(frozen=True)
class Rule:
    """The flags ``dests`` do not apply when ``when(args)`` is true, for ``reason``."""

    dests: tuple[str, ...]
    when: Callable[[argparse.Namespace], Any]
    reason: str


def refuse_inapplicable(args: argparse.Namespace, rules: Sequence[Rule]) -> None:
    """Raise FlagError for the first flag given where a rule says it does not apply."""
    for rule in rules:
        if not rule.when(args):
            continue
        for dest in rule.dests:
            if given(args, dest):
                raise FlagError(f"{flag(args, dest)} does not apply here: {rule.reason}")


def exactly_one(args: argparse.Namespace, *dests: str) -> str:
    """The one of ``dests`` that was given; FlagError when none or several were."""
    chosen = [d for d in dests if getattr(args, d) is not None]
    names = ", ".join(flag(args, d) for d in dests)
    if len(chosen) != 1:
        raise FlagError(f"give exactly one of {names}" + (f" (got {len(chosen)})" if chosen else ""))
    return chosen[0]


# ------------------------------------------------------------------ model specs


def load_model_flag(flag_name: str, spec: str, **kwargs):
    """``load_model(spec, **kwargs)`` with a failure naming the flag."""
    from posttrain.models import ModelError, load_model

    try:
        return load_model(spec, **kwargs)
    except ModelError as e:
        raise ModelError.of_flag(flag_name, spec, e) from e


# ------------------------------------------------------------------ reward specs and tasks


def reward_flag(flag_name: str, spec: str):
    """``rewards.from_spec(spec)``; a bad spec (unknown name, syntax) is a ``RewardSpecError`` naming the flag."""
    from posttrain import rewards

    return rewards.from_spec(spec, flag=flag_name)


def task_flag(flag_name: str, name: str, split: str | None = None):
    """The TaskInfo of a built-in task spec (NAME or NAME(ARGS)); an unknown name, a bad option or
    split names the flag."""
    from posttrain.data.tasks import TaskError, check_options, task_info

    try:
        info = task_info(name)
        check_options(name)
    except TaskError as e:
        raise FlagError(f"{flag_name} {name!r}: {e} (see `posttrain tasks`)") from e
    if split is not None and split not in info.splits:
        raise FlagError(f"--split {split!r}: task {name!r} has no such split (it has: {', '.join(info.splits)})")
    return info


def out_file(flag_name: str, path: str, overwrite: bool = False) -> str:
    """An output file flag's value, refused when it names a directory, or a file that is not empty
    unless ``overwrite`` (a user's file is never replaced unasked); checked before anything loads."""
    from pathlib import Path

    out = Path(path).expanduser()
    if out.is_dir():
        raise FlagError(f"{flag_name} {path}: is a directory; give a file path, e.g. {Path(path) / 'out.jsonl'}")
    if out.is_file() and out.stat().st_size > 0 and not overwrite:
        raise FlagError(f"{flag_name} {path}: the file exists and is not empty; give a new path, or pass "
                        "--overwrite to replace it")
    return path


def write_jsonl(path: str, rows) -> None:
    """Write ``rows`` as JSON lines to ``path`` (an ``out_file``), creating its missing parent directories."""
    import json
    from pathlib import Path

    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a failure leaves the old file
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)


def resumable_out(flag_name: str, path: str, verb: str, overwrite: bool) -> str:
    """The --out of a resumable verb (``rlaif.resume.ResumableJsonl``): not a directory, and, unless
    ``overwrite``, not a non-empty file without its progress log, which no run of ``verb`` made (resuming
    would append to it, or cut it at its first line that is not JSON)."""
    from pathlib import Path

    out = Path(out_file(flag_name, path, overwrite=True)).expanduser()
    progress = out.with_name(out.name + ".progress.jsonl")  # ResumableJsonl's progress log
    if not overwrite and out.is_file() and out.stat().st_size and not progress.is_file():
        raise FlagError(f"{flag_name} {path}: exists without {progress.name}, so `posttrain {verb}` did not make "
                        "it; choose another file, or pass --overwrite to replace it")
    return path


def lora_rank(text: str) -> int | str:
    """An argparse type: a LoRA rank >= 1, or ``auto`` (the doctrine's rank)."""
    return text if text == "auto" else positive_int(text)
