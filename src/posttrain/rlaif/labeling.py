"""AI labeling: N responses per prompt -> one chosen/rejected pair, judged by score or by comparison.

Input rows (``posttrain label --data``)::

    {"prompt": "Explain X", "responses": ["first answer", "second answer", ...], ...extra columns}

``prompt`` is a string or a list of chat messages (TRL's formats); ``responses`` holds at least two
strings (or assistant message lists). Extra columns are carried into the output row.

Output rows are TRL preference rows, with the judge's evidence under ``label``::

    {"prompt": ..., "chosen": ..., "rejected": ..., ...extra columns,
     "label": {"row": 0, "strategy": "score", "judge": "openai:gpt-4o-mini",
               "scores": [0.8, 0.3, null], "chosen_index": 0, "rejected_index": 1}}

Strategies (the doctrine: "pair highest (chosen) with lowest (rejected)"):
- ``score``: each response is rated (N requests); chosen = the highest, rejected = the lowest;
  skipped when fewer than two could be rated or the gap is not above ``min_margin``.
- ``compare``: every two responses are compared, both orders (N(N-1) requests); chosen = most
  wins, rejected = fewest; kept only when the judge, asked directly, prefers chosen over rejected
  consistently in both orders.

A judge that scores by probability (``scoring`` auto or probability, see
posttrain.rlaif.probability) gives continuous scores and p(A) vs p(B) verdicts: every request is
usable, and a row is skipped for a tie only when the probabilities are equal.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from posttrain.data import DataError, check_text, load_rows
from posttrain.rlaif.judges import Judge, response_as_text

JUDGE_FAILED = "the judge failed (no answer after its retries)"
"""Skip reason of a row left without a pair because judge requests failed: the labeling commands do
not mark such a row done, so running the command again retries it."""


def _line_numbers(path: Path) -> Optional[list[int]]:
    """1-based line of each row of a .jsonl file (blank lines skipped), or None for other formats."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return [i for i, line in enumerate(f, start=1) if line.strip()]


def load_response_rows(source: str | Path, field: str = "responses") -> list[dict[str, Any]]:
    """Rows with a prompt and at least two responses; DataError names file:line: field."""
    rows = load_rows(source, "prompt")
    lines = _line_numbers(Path(source))
    for i, row in enumerate(rows):
        number, unit = (lines[i], "line") if lines else (i + 1, "row")

        def fail(f: str, problem: str, number=number, unit=unit):
            raise DataError(str(source), number, f, problem, unit)

        value = row.get(field)
        if value is None:
            fail(field, "missing (a list of at least two responses to the prompt)")
        if not isinstance(value, list):
            fail(field, f"wrong type: expected a list of responses, got {type(value).__name__}")
        if len(value) < 2:
            fail(field, f"needs at least two responses to make a pair, got {len(value)}")
        for j, response in enumerate(value):
            check_text(response, f"{field}[{j}]", fail)
    return rows


def pair_by_scores(scores: Sequence[Optional[float]], min_margin: float = 0.0) -> tuple[Optional[tuple[int, int]], str]:
    """(chosen index, rejected index) from scores, or (None, why not)."""
    rated = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(rated) < 2:
        return None, "fewer than two responses could be rated"
    best = max(rated, key=lambda t: (t[0], -t[1]))
    worst = min(rated, key=lambda t: (t[0], t[1]))
    if best[0] - worst[0] <= min_margin:
        return None, "no score gap between the best and worst responses"
    return (best[1], worst[1]), ""


def _record(row: dict[str, Any], field: str, chosen: int, rejected: int, label: dict[str, Any]) -> dict[str, Any]:
    responses = row[field]
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", field, "label")}
    return {"prompt": row["prompt"], "chosen": responses[chosen], "rejected": responses[rejected], **extra,
            "label": {**label, "chosen_index": chosen, "rejected_index": rejected}}


def label_rows(judge: Judge, rows: Sequence[dict[str, Any]], strategy: str = "score", field: str = "responses",
               min_margin: float = 0.0) -> list[tuple[Optional[dict[str, Any]], str]]:
    """One (preference row or None, skip reason) per input row; all judge requests of the rows in
    one batch (concurrent over HTTP, batched locally)."""
    base = {"strategy": strategy, "judge": judge.config.identity}
    out: list[tuple[Optional[dict[str, Any]], str]] = []
    if strategy == "score":
        flat = [(r["prompt"], resp) for r in rows for resp in r[field]]
        answers = judge.score_answers([p for p, _ in flat], [resp for _, resp in flat])
        k = 0
        for row in rows:
            mine = [score for _, score in answers[k:k + len(row[field])]]
            failed = any(reply is None for reply, _ in answers[k:k + len(row[field])])
            k += len(row[field])
            pair, why = pair_by_scores(mine, min_margin)
            why = JUDGE_FAILED if pair is None and failed else why
            if pair is not None and response_as_text(row[field][pair[0]]) == response_as_text(row[field][pair[1]]):
                pair, why = None, "the best and worst responses are identical"
            out.append((_record(row, field, *pair, {**base, "scores": mine}), "") if pair else (None, why))
        return out
    if strategy != "compare":
        raise ValueError(f"unknown labeling strategy {strategy!r} (score or compare)")
    triples, owners = [], []
    for n, row in enumerate(rows):
        for i, j in itertools.combinations(range(len(row[field])), 2):
            triples.append((row["prompt"], row[field][i], row[field][j]))
            owners.append((n, i, j))
    prefs = judge.compare_batch([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples])
    by_row: dict[int, dict[tuple[int, int], Any]] = {}
    for (n, i, j), pref in zip(owners, prefs):
        by_row.setdefault(n, {})[(i, j)] = pref
    for n, row in enumerate(rows):
        m = len(row[field])
        wins = [0.0] * m
        for (i, j), pref in by_row.get(n, {}).items():
            if pref.winner == "a":
                wins[i] += 1
            elif pref.winner == "b":
                wins[j] += 1
        prefs_n = by_row.get(n, {})
        if max(wins) == min(wins):
            if any(p.reason == "failed" for p in prefs_n.values()):
                out.append((None, JUDGE_FAILED))
                continue
            why = collections.Counter(p.reason for p in prefs_n.values()).most_common(1)[0][0]
            out.append((None, f"no response won more comparisons than another ({why})"))
            continue
        chosen = max(range(m), key=lambda i: (wins[i], -i))
        rejected = min(range(m), key=lambda i: (wins[i], i))
        direct = prefs_n[(min(chosen, rejected), max(chosen, rejected))]
        if direct.winner != ("a" if chosen < rejected else "b"):
            out.append((None, f"the judge did not prefer the most-winning response over the least-winning one "
                              f"directly ({direct.reason})"))
            continue
        label = {**base, "wins": wins, "confidence": direct.confidence}
        if direct.p_a is not None:  # read by probability: p(the first of the two indices is better)
            label["p_first"] = direct.p_a
        out.append((_record(row, field, chosen, rejected, label), ""))
    return out


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a pairs file (for tests and summaries)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
