"""Arithmetic task: "What is 17 + 58? Put the final answer after 'Answer:'." -> "75".

`arithmetic(n, seed, digits=2, ops="+", split="train") -> [{"prompt", "answer"}]`

  * operands have exactly `digits` digits (digits=2: 10..99), drawn uniformly;
  * `ops` is a string of operators among "+", "-", "*", one picked uniformly per row;
  * the prompt is exactly "What is {a} {op} {b}? Put the final answer after 'Answer:'." (the
    phrasing of the measured baselines in DESIGN.md: about 23% greedy accuracy for
    SmolLM2-135M-Instruct on two-digit addition);
  * `answer` is the exact result as a string ("75", "-12"), scored by the `math` reward.

Splits (see `posttrain.data.tasks`): a problem's key is "a+b" with the operands sorted for + and *;
a stable hash of the key assigns it to test (1 in 10) or train, so the splits never share a
problem. Each (split, seed, digits, ops) has its own random stream, and rows are prefix-stable:
the first k rows for n=100 are the rows for n=k. Test rows are distinct problems (TaskError
when fewer than n exist); train rows are independent draws and may repeat.
"""

from __future__ import annotations

import random

from posttrain.data.tasks import SPLITS, TaskError, in_split

PROMPT = "What is {a} {op} {b}? Put the final answer after 'Answer:'."
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def problem_key(a: int, op: str, b: int) -> str:
    """Canonical key of a problem: commutative operands sorted, so 58+17 is 17+58."""
    if op in "+*":
        a, b = min(a, b), max(a, b)
    return f"{a}{op}{b}"


def arithmetic(n: int, seed: int = 0, digits: int = 2, ops: str = "+", split: str = "train") -> list[dict]:
    """`n` rows {"prompt", "answer"} of the given split (rules in the module docstring)."""
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= digits <= 18:
        raise TaskError(f"digits must be in 1..18, got {digits}")
    if not ops or any(op not in _APPLY for op in ops):
        raise TaskError(f"ops must be made of '+', '-', '*', got {ops!r}")
    ops_list = sorted(set(ops), key=ops.index)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rng = random.Random(f"posttrain/arithmetic/{split}/{seed}/{digits}/{''.join(ops_list)}")
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, budget = 0, 100 * n + 10_000
    while len(rows) < n:
        attempts += 1
        if attempts > budget:
            raise TaskError(f"only {len(rows)} distinct {split} problems found for digits={digits} ops={ops!r}; asked {n}")
        op = rng.choice(ops_list)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        key = problem_key(a, op, b)
        if not in_split(key, split) or (split == "test" and key in seen):
            continue
        seen.add(key)
        rows.append({"prompt": PROMPT.format(a=a, op=op, b=b), "answer": str(_APPLY[op](a, b))})
    return rows


__all__ = ["arithmetic", "problem_key", "PROMPT"]
