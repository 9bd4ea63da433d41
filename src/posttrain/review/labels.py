"""A person's labels of a run's samples: ``runs/<name>/reviews.jsonl``, and the preference pairs they make.

A label record: ``{"id", "step", "group", "index", "label", "note", "prompt", "completion", "reward",
"time"}``, with ``label`` one of ``good``, ``bad``, ``hacked`` (reward-hacked) or ``clear`` (takes a
label back). The file is a history: the last record of an id is its label. The sample's prompt and
completion are copied into the record, so an export needs nothing else.

Writes are atomic and serialised: each label takes an ``fcntl.flock`` on ``reviews.jsonl.lock``,
then writes the whole file anew (a temporary file, fsynced, renamed over the old one, the directory
fsynced), so a crash leaves the old file or the new one, and two review pages on one run (or a
concurrent write) never interleave lines. The training run never writes this file (its resume
truncates only ``metrics/samples/evals.jsonl``), so labels outlive a resumed run.

Pairs (:func:`pairs`): for each prompt, every completion labelled ``good`` against every completion
labelled ``bad`` or ``hacked``: ``{"prompt", "chosen", "rejected"}``, the input of ``train dpo`` and
``train rm``. A multi-turn episode is not a completion of one prompt, so episodes make no pairs
(they are counted). Where this departs from a plain ranking export: ``hacked`` is a rejected answer
like ``bad``, because what a person flags as gaming the reward is exactly what the reward model
should learn to score lower.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from posttrain.doctrine.doctor.human import REVIEWS, latest
from posttrain.errors import UserError
from posttrain.review.samples import LABELS, Sample, conversation
from posttrain.runtime.tracking import read_jsonl

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

CLEAR = "clear"
MAX_NOTE = 2000


class LabelError(UserError, ValueError):
    """A label write the page (or a caller) sent is wrong: says which field."""


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(run_dir / (REVIEWS + ".lock"), "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def history(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / REVIEWS)


def current(records: list[dict]) -> dict[str, dict]:
    """The label of each sample id: its last record, unless that one clears it."""
    return {sid: rec for sid, rec in latest(records).items() if rec.get("label") != CLEAR}


def add_label(run_dir: str | Path, sample: Sample, label: str, note: str = "") -> dict:
    """Record ``label`` (or ``clear``) for ``sample``; returns the record written."""
    if label not in (*LABELS, CLEAR):
        raise LabelError(f"label must be one of {', '.join((*LABELS, CLEAR))}, got {label!r}")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise LabelError(f"note must be text of at most {MAX_NOTE} characters")
    run_dir = Path(run_dir)
    record = {"id": sample.id, "step": sample.step, "group": sample.group, "index": sample.index, "label": label,
              "note": note, "prompt": sample.prompt, "completion": sample.completion, "reward": sample.reward,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with _locked(run_dir):
        lines = [json.dumps(r) for r in history(run_dir)]
        _write_durably(run_dir / REVIEWS, "".join(line + "\n" for line in [*lines, json.dumps(record)]))
    return record


def pairs(labels: dict[str, dict]) -> tuple[list[dict], int]:
    """(preference pairs of the labelled samples, labelled episodes left out): module docstring."""
    by_prompt: dict[str, dict[str, list[str]]] = {}
    episodes = 0
    for rec in labels.values():
        if conversation(str(rec.get("completion", ""))) is not None:
            episodes += 1
            continue
        side = {"good": "chosen", "bad": "rejected", "hacked": "rejected"}.get(rec.get("label"))
        if side:
            texts = by_prompt.setdefault(str(rec["prompt"]), {"chosen": [], "rejected": []})[side]
            if rec["completion"] not in texts:
                texts.append(rec["completion"])
    out = [{"prompt": prompt, "chosen": c, "rejected": r}
           for prompt, sides in by_prompt.items() for c in sides["chosen"] for r in sides["rejected"] if c != r]
    return out, episodes


def export_pairs(run_dirs: list[Path], out: str | Path) -> tuple[int, int]:
    """Write the pairs of the runs' labels to ``out`` (JSON lines, atomically); (pairs, episodes left
    out). No pair: a :class:`LabelError` saying what to label, and no file written."""
    rows, episodes = [], 0
    for run_dir in run_dirs:
        found, skipped = pairs(current(history(run_dir)))
        rows += found
        episodes += skipped
    if not rows:
        raise LabelError("--export-pairs: no preference pair yet: label at least one completion 'good' and one "
                         "'bad' or 'hacked' of the same prompt"
                         + (f" ({episodes} labelled multi-turn episodes make no pairs)" if episodes else ""))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_durably(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows), episodes


__all__ = ["CLEAR", "LabelError", "REVIEWS", "add_label", "current", "export_pairs", "history", "pairs"]
