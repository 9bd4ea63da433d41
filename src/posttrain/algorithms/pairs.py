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
configuration refuses to continue the file.
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


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def _read_complete_lines(path: Path) -> list[dict]:
    """JSON lines of ``path``; a torn last line (a crash while writing) is removed from the file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
        _rewrite(path, lines)
    return [json.loads(x) for x in lines if x.strip()]


class _Progress:
    """The output file and its progress log, reconciled on open."""

    def __init__(self, out: Path, settings: dict):
        self.out, self.log = out, out.with_name(out.name + ".progress.jsonl")
        self.done: set[str] = set()
        records = _read_complete_lines(self.log)
        if records and records[0].get("settings") != settings:
            raise ValueError(f"{self.log}: made with other settings ({records[0].get('settings')}); "
                             f"use another --out, or delete {out} and {self.log} to start over")
        if not records and out.is_file() and out.stat().st_size:
            raise ValueError(f"{out} exists without {self.log.name}: not made by `posttrain pairs`; choose another --out")
        self.done = {r["key"] for r in records[1:]}
        paired = sum(r["status"] == "paired" for r in records[1:])
        lines = out.read_text(encoding="utf-8").splitlines(keepends=True) if out.is_file() else []
        if len(lines) < paired:
            raise ValueError(f"{out} holds {len(lines)} pairs but {self.log.name} records {paired}: delete both to start over")
        if len(lines) > paired or (lines and not lines[-1].endswith("\n")):
            _rewrite(out, lines[:paired])  # pair lines whose progress record was never written
        self.total_pairs = paired
        out.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(out, "a", encoding="utf-8")
        self._log = open(self.log, "a", encoding="utf-8")
        if not records:
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
