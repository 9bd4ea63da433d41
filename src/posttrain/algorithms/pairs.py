"""Preference pairs from a model's own samples: the doctrine's recipe for DPO data.

For each prompt: sample ``n`` completions (``rollout.generate_and_score``: the GRPO sampler, one
prompt pre-fill per group), score them with a reward spec, and pair the highest-scored
completion (chosen) with the lowest (rejected). Ties for highest or lowest go to the first sampled
(samples are i.i.d., so this is a random pick that favours neither long nor short answers).
Prompts whose scores are all equal (nothing to prefer) or that have fewer than two judged samples
are skipped and counted.

Output rows are TRL preference rows: ``prompt`` as given (string or messages), ``chosen`` and
``rejected`` in the same format (a string, or one assistant message), ``chosen_score``,
``rejected_score``, and the prompt row's other columns (e.g. ``answer``) kept for review.

Resumable: every finished prompt is recorded in ``<out>.progress.jsonl`` (its row number and a
hash of the row, its status and scores) after its pair, if any, was written to ``<out>``; both are
flushed per batch. Re-running with the same ``out`` skips recorded prompts; a pair line written
without its progress record (a crash between the two) is dropped first, so no prompt is paired
twice. The first progress line holds the settings; a different model, reward, n or sampling
configuration refuses to continue the file. ``check_output`` makes these checks without writing (the
command runs it before the model loads); its refusals are ``PairsFileError``s, user errors naming
the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from posttrain.data import is_conversational
from posttrain.errors import UserError

RESERVED = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")


@dataclasses.dataclass
class PairsReport:
    prompts: int = 0
    """Prompts in the input."""
    already_done: int = 0
    """Prompts skipped because an earlier run with the same output finished them."""
    sampled: int = 0
    """Prompts sampled in this run."""
    pairs: int = 0
    """Pairs written in this run."""
    skipped_equal: int = 0
    """Prompts whose samples all scored the same (no preference)."""
    skipped_unjudged: int = 0
    """Prompts with fewer than two samples the reward could judge."""
    total_pairs: int = 0
    """Pairs in the output file after this run."""
    mean_score: float = float("nan")
    """Mean score of the samples judged in this run."""
    seconds: float = 0.0
    seconds_sampling: float = 0.0

    def summary(self) -> str:
        return (f"{self.pairs} pairs written ({self.total_pairs} in the file) from {self.sampled} prompts sampled "
                f"({self.already_done} already done); skipped: {self.skipped_equal} all-equal, "
                f"{self.skipped_unjudged} unjudged; mean sample score {self.mean_score:.3f}; "
                f"{self.seconds:.1f}s ({self.seconds_sampling:.1f}s sampling)")


def row_key(index: int, row: dict) -> str:
    return f"{index}:" + hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose_pair(scores: Sequence[float | None]) -> tuple[int, int] | str:
    """(chosen index, rejected index), or 'unjudged' / 'equal' when the group makes no pair."""
    judged = [(i, s) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    if len(judged) < 2:
        return "unjudged"
    hi = max(judged, key=lambda t: t[1])  # max/min return the first of equals: the first sampled
    lo = min(judged, key=lambda t: t[1])
    if hi[1] == lo[1]:
        return "equal"
    return hi[0], lo[0]


def _as_completion(prompt: Any, text: str):
    return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text


def make_pair_row(row: dict, chosen: str, rejected: str, chosen_score: float, rejected_score: float) -> dict:
    extra = {k: v for k, v in row.items() if k not in RESERVED}
    return {"prompt": row["prompt"], "chosen": _as_completion(row["prompt"], chosen),
            "rejected": _as_completion(row["prompt"], rejected), "chosen_score": chosen_score,
            "rejected_score": rejected_score, **extra}


class PairsFileError(UserError, ValueError):
    """``--out`` cannot be continued: made by another command or with other settings, a directory,
    or its progress log damaged. The message names the file (and line) and says what to do."""

    def __init__(self, out: Path, problem: str):
        super().__init__(f"--out {out}: {problem}")


STATUSES = ("paired", "equal", "unjudged")
"""What a progress record says of its prompt (``choose_pair``)."""


def _rewrite(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(lines))
    os.replace(tmp, path)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.is_file() else []


def _complete(lines: list[bytes]) -> list[bytes]:
    """The lines that end in a newline (a torn last line, a crash while writing, is left out)."""
    return lines[:-1] if lines and not lines[-1].endswith(b"\n") else lines


def _log_records(out: Path, log: Path, lines: list[bytes]) -> list[dict]:
    """The progress log's records, each checked: the settings first, then one record per prompt done."""
    start_over = f"delete {out} and {log} to start over"
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PairsFileError(out, f"{log}:{number}: not a JSON line ({e}): the progress log is damaged; "
                                 f"{start_over}") from None
        wanted = ("settings",) if not records else ("key", "status")
        if not isinstance(record, dict) or any(k not in record for k in wanted) or (
                records and record["status"] not in STATUSES):
            raise PairsFileError(out, f"{log}:{number}: not a record of `posttrain pairs` (expected the fields "
                                 f"{', '.join(wanted)}); choose another --out, or {start_over}")
        records.append(record)
    return records


@dataclasses.dataclass
class OutputState:
    """What an earlier run left in ``out`` and its progress log (``check_output``)."""

    records: list[dict]
    """The progress log's complete records (the settings first)."""
    log_lines: list[bytes]
    """The progress log's complete lines."""
    pair_lines: list[bytes]
    """The output's complete lines."""
    paired: int
    """Prompts the log records as paired: the output's first ``paired`` lines are theirs."""
    trim: bool
    """The output or the log holds lines to cut (a torn line, or pairs whose record was never written)."""


def check_output(out: str | Path, settings: dict) -> OutputState:
    """Check, without writing anything, that ``out`` can be created or continued with ``settings``;
    a ``PairsFileError`` says why not. ``posttrain pairs`` calls it before the model loads."""
    out = Path(out)
    log = out.with_name(out.name + ".progress.jsonl")
    for path in (out, log):
        if path.is_dir():
            raise PairsFileError(out, f"{path} is a directory: give a file path, e.g. {path / 'pairs.jsonl'}")
    log_raw, raw = _lines(log), _lines(out)
    records = _log_records(out, log, _complete(log_raw))
    if records and records[0]["settings"] != settings:
        raise PairsFileError(out, f"{log} was made with other settings ({records[0]['settings']}); use another "
                             f"--out, or delete {out} and {log} to start over")
    if not records and out.is_file() and out.stat().st_size:
        raise PairsFileError(out, f"exists without {log.name}: not made by `posttrain pairs`; choose another --out")
    paired = sum(r["status"] == "paired" for r in records[1:])
    lines = _complete(raw)
    if len(lines) < paired:
        raise PairsFileError(out, f"holds {len(lines)} pairs but {log.name} records {paired}: delete both to "
                             "start over")
    return OutputState(records, _complete(log_raw), lines, paired, len(_complete(log_raw)) < len(log_raw)
                       or len(raw) > paired)


class _Progress:
    """The output file and its progress log, reconciled on open (``check_output``)."""

    def __init__(self, out: Path, settings: dict):
        self.out, self.log = out, out.with_name(out.name + ".progress.jsonl")
        state = check_output(out, settings)
        if state.trim:  # a torn line, or pair lines whose progress record was never written
            for path, lines in ((self.log, state.log_lines), (out, state.pair_lines[:state.paired])):
                if path.is_file():
                    _rewrite(path, lines)
        self.done = {r["key"] for r in state.records[1:]}
        self.total_pairs = state.paired
        out.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(out, "a", encoding="utf-8")
        self._log = open(self.log, "a", encoding="utf-8")
        if not state.records:
            self._log.write(json.dumps({"settings": settings}) + "\n")
            self._log.flush()

    def write(self, pairs: list[dict], records: list[dict]) -> None:
        for p in pairs:
            self._out.write(json.dumps(p, ensure_ascii=False) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())
        for r in records:
            self._log.write(json.dumps(r) + "\n")
            self.done.add(r["key"])
        self._log.flush()
        self.total_pairs += len(pairs)

    def close(self) -> None:
        self._out.close()
        self._log.close()


def make_pairs(policy, tokenizer, rows: Sequence[dict], out: str | Path, n: int, reward_fn, sampling,
               settings: dict, seed: int = 0, batch_prompts: int = 8, chat_template: bool = True,
               on_batch: Callable[[PairsReport], None] | None = None) -> PairsReport:
    """Sample, score and pair every row not already done in ``out``; returns the report.

    ``settings`` (JSON-able) identifies the configuration in the progress log. Batch b (rows
    b*batch_prompts ...) samples with a generator seeded by (seed, b), so the draws of a batch
    do not depend on what ran before it."""
    from posttrain.algorithms.collect import generate_and_score

    if n < 2:
        raise ValueError(f"n must be >= 2 samples per prompt to make a pair, got {n}")
    t0 = time.perf_counter()
    progress = _Progress(Path(out), settings)
    report = PairsReport(prompts=len(rows))
    keys = [row_key(i, r) for i, r in enumerate(rows)]
    report.already_done = sum(k in progress.done for k in keys)
    score_sum, score_n = 0.0, 0
    policy.eval()
    try:
        for b in range(0, len(rows), batch_prompts):
            todo = [i for i in range(b, min(b + batch_prompts, len(rows))) if keys[i] not in progress.done]
            if not todo:
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + b // batch_prompts)
            batch = generate_and_score(policy, tokenizer, [rows[i] for i in todo], n, sampling, reward_fn, gen,
                                       chat_template)
            report.seconds_sampling += batch.rollouts.seconds
            pairs, records = [], []
            for j, i in enumerate(todo):
                scores = [None if v != v else float(v) for v in batch.rewards_B[j * n:(j + 1) * n].tolist()]
                texts = batch.texts[j * n:(j + 1) * n]
                judged = [s for s in scores if s is not None]
                score_sum, score_n = score_sum + sum(judged), score_n + len(judged)
                pick = choose_pair(scores)
                status = "paired" if isinstance(pick, tuple) else pick
                if isinstance(pick, tuple):
                    c, r = pick
                    pairs.append(make_pair_row(rows[i], texts[c], texts[r], scores[c], scores[r]))
                    report.pairs += 1
                elif pick == "equal":
                    report.skipped_equal += 1
                else:
                    report.skipped_unjudged += 1
                records.append({"key": keys[i], "status": status, "scores": scores})
            progress.write(pairs, records)
            report.sampled += len(todo)
            report.total_pairs = progress.total_pairs
            report.mean_score = score_sum / score_n if score_n else float("nan")
            report.seconds = time.perf_counter() - t0
            if on_batch:
                on_batch(report)
    finally:
        progress.close()
    report.total_pairs = progress.total_pairs
    report.seconds = time.perf_counter() - t0
    return report
