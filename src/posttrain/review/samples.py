"""A run's samples as the review page shows them: one row per completion, with an id, flags and filters.

``samples.jsonl`` holds one record per reviewed group: ``{"step", "prompt", "completions", "rewards",
"parts", "advantages"?}`` (``posttrain.algorithms.collect.review_samples``). Here each completion
becomes a :class:`Sample` with the id ``"<step>-<group>-<k>"``: the step, the record's place among
that step's records (file order), the completion's place in its group. A resumed run rewrites the
steps after its checkpoint identically (exact resume), so ids stay valid.

Flags are the doctor's reward-hacking signs, per completion (``posttrain.doctrine.doctor.rules``):
``long`` (among the run's longest tenth of completions and rewarded above its group's mean: the
length-hacking rule's correlation, one sample at a time), ``stock_phrase`` (one of the format rule's
stock phrases, not in the prompt), ``repeated_closer`` (a closing line that ends at least a fifth of
the run's completions, the format rule's other sign), ``echo`` (the completion, at least 5 characters,
is a piece of its prompt: a copied question that an answer extractor falling back to the last number
scores; seen on rg:number_sequence, README). A multi-turn episode is stored as one text of
``[role] content`` lines (``posttrain.algorithms.episodes``); :func:`conversation` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from posttrain.doctrine.doctor.rules.format import STOCK_PHRASES, closing_line, echoes
from posttrain.runtime.tracking import bad_line, read_jsonl

ROLES = ("system", "user", "assistant", "tool")
_TURN = re.compile(rf"^\[({'|'.join(ROLES)})\] ", re.MULTILINE)
LONG_QUANTILE = 0.9
CLOSER_SHARE = 0.2
FLAGS = ("long", "stock_phrase", "repeated_closer", "echo")
LABELS = ("good", "bad", "hacked")


@dataclasses.dataclass
class Sample:
    id: str
    step: int
    group: int
    index: int
    prompt: str
    completion: str
    reward: float | None
    parts: dict[str, float | None]
    advantage: float | None
    flags: list[str] = dataclasses.field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.completion)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["length"] = self.length
        turns = conversation(self.completion)
        if turns is not None:
            out["conversation"] = turns
        return out


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def conversation(text: str) -> list[dict] | None:
    """The messages of an episode's text (``[role] content`` lines), or None for a plain completion."""
    starts = list(_TURN.finditer(text))
    if not starts or starts[0].start() != 0:
        return None
    out = []
    for m, nxt in zip(starts, starts[1:] + [None]):
        end = nxt.start() - 1 if nxt else len(text)
        out.append({"role": m.group(1), "content": text[m.end():end]})
    return out


def _samples(records: Iterable[dict], per_step: Counter) -> list[Sample]:
    """The completions of ``records`` as samples, no flags; ``per_step`` counts the records already
    seen per step (a record's group is its place among its step's), and is updated."""
    out = []
    for rec in records:
        step = int(rec.get("step", 0))
        group = per_step[step]
        per_step[step] += 1
        rewards, parts = rec.get("rewards") or [], rec.get("parts") or {}
        advantages = rec.get("advantages") or []
        for k, text in enumerate(rec.get("completions") or []):
            out.append(Sample(
                id=f"{step}-{group}-{k}", step=step, group=group, index=k, prompt=str(rec.get("prompt", "")),
                completion=str(text), reward=_number(rewards[k]) if k < len(rewards) else None,
                parts={name: _number(v[k]) if isinstance(v, list) and k < len(v) else None
                       for name, v in parts.items()},
                advantage=_number(advantages[k]) if k < len(advantages) else None))
    return out


def samples_of(records: Iterable[dict]) -> list[Sample]:
    """One :class:`Sample` per completion of the ``samples.jsonl`` records, flags set."""
    out = _samples(records, Counter())
    set_flags(out)
    return out


@dataclasses.dataclass(frozen=True)
class Signs:
    """What a sample's flags take from the sample alone (computed once per sample)."""

    closer: str | None
    closer_in_prompt: bool
    stock_phrase: bool
    echo: bool


def signs_of(s: Sample) -> Signs:
    low, prompt = s.completion.lower(), s.prompt.lower()
    closer = closing_line(s.completion)
    return Signs(closer, bool(closer) and closer in prompt, any(p in low and p not in prompt for p in STOCK_PHRASES),
                 echoes(s.prompt, s.completion))


def set_flags(samples: list[Sample], signs: list[Signs] | None = None) -> None:
    """Set each sample's ``flags`` (module docstring) from the run's samples as a whole; ``signs``:
    each sample's own (``signs_of``), when already known."""
    if not samples:
        return
    signs = signs if signs is not None else [signs_of(s) for s in samples]
    lengths = sorted(s.length for s in samples)
    long_from = lengths[min(len(lengths) - 1, int(LONG_QUANTILE * len(lengths)))]
    closer_counts = Counter(g.closer for g in signs if g.closer)
    common = {c for c, n in closer_counts.items() if n >= max(2, CLOSER_SHARE * len(samples))}
    group_rewards: dict[tuple[int, int], list[float]] = {}
    for s in samples:  # one pass: the group means of a long run
        group_rewards.setdefault((s.step, s.group), []).extend([s.reward] if s.reward is not None else [])
    group_mean = {k: sum(rs) / len(rs) if rs else math.nan for k, rs in group_rewards.items()}
    for s, g in zip(samples, signs):
        flags = []
        if s.length >= long_from and s.reward is not None and s.reward > group_mean[(s.step, s.group)]:
            flags.append("long")
        if g.stock_phrase:
            flags.append("stock_phrase")
        if g.closer in common and not g.closer_in_prompt:
            flags.append("repeated_closer")
        if g.echo:
            flags.append("echo")
        s.flags = flags


def read_samples(run_dir: str | Path) -> list[Sample]:
    return samples_of(read_jsonl(Path(run_dir) / "samples.jsonl"))


class SampleLog:
    """A run's ``samples.jsonl`` read as it grows (the review server keeps one per run): a read
    parses only the whole lines appended since the last (a line still being written waits for the
    next read) and sets the flags over all samples from each one's ``Signs``, computed once. A file
    replaced (a resumed run rewrites it atomically: a new inode) or shorter than what was read is
    read afresh. A line that is not a JSON object: ``RunFileError`` naming the file and line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._start(None)

    def _start(self, inode: int | None) -> None:
        self.inode, self.offset, self.lines = inode, 0, 0
        self.per_step: Counter = Counter()
        self.samples: list[Sample] = []
        self.signs: list[Signs] = []

    def read(self) -> list[Sample]:
        """The samples so far (a new list each call; the samples' flags are set again as it grows)."""
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._start(None)
                return []
            if st.st_ino != self.inode or st.st_size < self.offset:
                self._start(st.st_ino)
            if st.st_size > self.offset:
                with self.path.open("rb") as f:
                    f.seek(self.offset)
                    chunk = f.read(st.st_size - self.offset)
                whole = chunk[:chunk.rfind(b"\n") + 1]
                records = []
                for line in whole.decode("utf-8", errors="replace").split("\n")[:-1]:
                    self.lines += 1
                    if line.strip():
                        records.append(self._record(line))
                self.offset += len(whole)
                new = _samples(records, self.per_step)
                self.samples += new
                self.signs += [signs_of(s) for s in new]
                if new:
                    set_flags(self.samples, self.signs)
            return list(self.samples)

    def _record(self, line: str) -> dict:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise bad_line(self.path, self.lines, line)
        return record


# -------------------------------------------------------------------------------- filters


def _within(v: float | None, lo: float | None, hi: float | None) -> bool:
    """No bound: always; else ``v`` is a number within the bounds given."""
    if lo is None and hi is None:
        return True
    return v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)


@dataclasses.dataclass
class Filter:
    """What the page's filter bar asks; None is no constraint. ``label``: a label, or "none" (unlabelled)."""

    step_min: int | None = None
    step_max: int | None = None
    reward_min: float | None = None
    reward_max: float | None = None
    length_min: int | None = None
    length_max: int | None = None
    reward_fn: str | None = None
    """Only samples this reward function scored, within ``fn_min``..``fn_max``."""
    fn_min: float | None = None
    fn_max: float | None = None
    flag: str | None = None
    label: str | None = None
    text: str | None = None

    def keeps(self, s: Sample, label: str | None) -> bool:
        return (_within(s.step, self.step_min, self.step_max)
                and _within(s.reward, self.reward_min, self.reward_max)
                and _within(s.length, self.length_min, self.length_max)
                and (self.reward_fn is None or _within(s.parts.get(self.reward_fn), self.fn_min, self.fn_max)
                     and s.parts.get(self.reward_fn) is not None)
                and (self.flag is None or self.flag in s.flags)
                and (self.label is None or (label or "none") == self.label)
                and (self.text is None or self.text.lower() in f"{s.prompt}\n{s.completion}".lower()))


def apply(samples: list[Sample], flt: Filter, labels: dict[str, dict]) -> list[Sample]:
    return [s for s in samples if flt.keeps(s, (labels.get(s.id) or {}).get("label"))]


def group(samples: list[Sample], step: int, group_index: int) -> list[Sample]:
    """The K completions of one prompt at one step, in sampling order."""
    return [s for s in samples if s.step == step and s.group == group_index]


def same_prompt(samples: list[Sample], prompt: str) -> list[Sample]:
    """Every completion of ``prompt`` across the run's steps."""
    return [s for s in samples if s.prompt == prompt]


__all__ = ["FLAGS", "LABELS", "Filter", "Sample", "apply", "conversation", "group", "read_samples", "same_prompt",
           "samples_of", "set_flags"]
