"""Human-flagged reward hacking: samples a reviewer marked ``hacked`` on the review page (doctrine,
Reward Hacking: "Human oversight: periodic quality checks"), as a doctor event.

The rules read metrics and samples; this reads the run's labels (``reviews.jsonl``, written by
``posttrain review``), whose last record per sample is its label. One event names how many samples
were flagged, at which steps, and the first notes. It is an error: a person saw the policy game the
reward, which no threshold can overrule.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.doctrine.doctor.events import Event

RULE = "human_flagged_hacking"
REVIEWS = "reviews.jsonl"


def latest(records) -> dict[str, dict]:
    """The last label record of each sample id (``reviews.jsonl`` is a history: the last one counts)."""
    return {r["id"]: r for r in records if isinstance(r, dict) and r.get("id") is not None}


def flagged(run_dir: str | Path) -> list[dict]:
    """The label records of the samples whose current label is ``hacked`` (a torn last line skipped)."""
    path = Path(run_dir) / REVIEWS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            continue
    return sorted((r for r in latest(records).values() if r.get("label") == "hacked"),
                  key=lambda r: (r.get("step", 0), r["id"]))


def reported(events) -> int:
    """How many flagged samples the logged events (dicts) already reported (0 if none did)."""
    return max((int(e.get("evidence", {}).get("flagged", 0)) for e in events if e.get("rule") == RULE), default=0)


def human_event(records: list[dict], step: int | None = None) -> Event | None:
    """The event for the ``hacked`` label records (None when there are none), at ``step`` (default:
    the first flagged sample's step)."""
    if not records:
        return None
    steps = sorted({int(r.get("step", 0)) for r in records})
    notes = [str(r["note"]) for r in records if r.get("note")][:3]
    return Event(
        step=steps[0] if step is None else step, rule=RULE, severity="error",
        symptom=f"a reviewer marked {len(records)} sample(s) reward-hacked (steps {', '.join(map(str, steps[:10]))}"
                f"{', ...' if len(steps) > 10 else ''})" + (f": {'; '.join(notes)}" if notes else ""),
        cause="the policy found a way to score that the reward should not pay for (a person saw it in the samples)",
        fix="fix the reward (a rule, a penalty or a reward model trained on the review's pairs: "
            "`posttrain review RUN --export-pairs pairs.jsonl`, then `train rm`), and resume from a checkpoint "
            "before the first flagged step",
        evidence={"flagged": len(records), "steps": steps, "ids": [r["id"] for r in records][:20]})


__all__ = ["RULE", "flagged", "human_event", "latest", "reported"]
