"""A deterministic preference set from the arithmetic task: a correct answer in the requested
format (chosen) against a wrong one (rejected), for reward-model tests and demos
(`posttrain train rm --task arithmetic`).

`arithmetic_preferences(n, seed=0, split="train", digits=2, ops="+", same_format=0.5) ->
[{"prompt", "chosen", "rejected", "answer"}]`: the prompts are the arithmetic task's rows for
(split, seed), so the train and test pairs never share a problem. The chosen answer is correct and
ends with the "Answer: <n>" line the prompt asks for (a phrasing from `FORMATTED`); the rejected
result is off by a small amount (1, 2, 10, 11 or 20, either sign: a wrong last digit, a wrong tens
digit, or both). In a `same_format` share of the pairs the rejected answer uses the chosen one's
phrasing, so only checking the arithmetic tells them apart; in the rest it also ignores the
requested format (a phrasing from `LOOSE`), the kind of cue a reward model learns first, as raters
prefer answers that are both right and well presented. Deterministic in all arguments.
"""

from __future__ import annotations

import random
import re

from posttrain.data.tasks.arithmetic import arithmetic

FORMATTED = (
    "{a} {op} {b} = {r}.\nAnswer: {r}",
    "Answer: {r}",
    "The result is {r}.\nAnswer: {r}",
)
LOOSE = (
    "I think it is {r}.",
    "{r}",
    "It might be {r}, but I am not sure.",
)
OFFSETS = (1, 2, 10, 11, 20)
_PROBLEM = re.compile(r"What is (-?\d+) ([+*-]) (-?\d+)\?")


def arithmetic_preferences(n: int, seed: int = 0, split: str = "train", digits: int = 2, ops: str = "+",
                           same_format: float = 0.5) -> list[dict]:
    """`n` preference rows built on the arithmetic task's `split` (see the module docstring)."""
    if not 0.0 <= same_format <= 1.0:
        raise ValueError(f"same_format must be in [0, 1], got {same_format}")
    rows = arithmetic(n, seed, digits=digits, ops=ops, split=split)
    rng = random.Random(f"posttrain/arithmetic_prefs/{split}/{seed}/{digits}/{ops}/{same_format}")
    out = []
    for row in rows:
        a, op, b = _PROBLEM.match(row["prompt"]).groups()
        right = int(row["answer"])
        wrong = right + rng.choice((-1, 1)) * rng.choice(OFFSETS)
        style = rng.choice(FORMATTED)
        loose = rng.random() >= same_format
        out.append({
            "prompt": row["prompt"],
            "chosen": style.format(a=a, op=op, b=b, r=right),
            "rejected": (rng.choice(LOOSE) if loose else style).format(a=a, op=op, b=b, r=wrong),
            "answer": row["answer"],
        })
    return out


__all__ = ["arithmetic_preferences", "FORMATTED", "LOOSE", "OFFSETS"]
