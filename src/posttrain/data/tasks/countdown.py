"""Countdown task: reach a target from given numbers with + - * / and parentheses.

`countdown(n, seed, count=4, max_number=25, max_target=100, split="train")`
-> rows {"prompt", "target", "numbers", "solution"}, scored by the `countdown` reward.

Generated backwards so that a solution exists: draw `count` numbers in 1..max_number, then
combine two random entries of the pool with a random operator, keeping every intermediate a
positive integer (a - b only when a > b, a / b only when b > 1 divides a, products up to
10,000), until one value is left; it becomes the target when 1 <= target <= max_target
(otherwise draw again). `solution` is that expression, for checking; the numbers are shown
shuffled, so their order does not give it away.

Splits as in `posttrain.data.tasks`: the key is (sorted numbers, target), hashed into test (1 in 10)
or train. Rows are prefix-stable per (split, seed, options); test rows are distinct.
"""

from __future__ import annotations

import random

from posttrain.data.tasks import SPLITS, TaskError, in_split

PROMPT = (
    "Using the numbers {numbers}, write an expression that equals {target}. "
    "Use each number exactly once, with only + - * / and parentheses. "
    "Put the final expression after 'Answer:'."
)


def problem_key(numbers: list[int], target: int) -> str:
    return f"{sorted(numbers)}->{target}"


def _combine(rng: random.Random, a: tuple[int, str], b: tuple[int, str]) -> tuple[int, str]:
    """A random valid operation on two pool entries; sub-expressions carry their own parentheses."""
    (x, ex), (y, ey) = a, b
    options = [(x + y, f"{ex} + {ey}")]
    if x > y:
        options.append((x - y, f"{ex} - {ey}"))
    if x * y <= 10_000 and x > 1 and y > 1:
        options.append((x * y, f"{ex} * {ey}"))
    if y > 1 and x % y == 0:
        options.append((x // y, f"{ex} / {ey}"))
    value, expr = rng.choice(options)
    return value, f"({expr})"


def _strip_outer(expr: str) -> str:
    if not (expr.startswith("(") and expr.endswith(")")):
        return expr
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(expr) - 1:
            return expr  # the first "(" closes before the end: not one outer pair
    return expr[1:-1]


def _one(rng: random.Random, count: int, max_number: int, max_target: int) -> tuple[list[int], int, str]:
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        pool = [(v, str(v)) for v in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            a, b = pool[i], pool[j]
            pool = [p for k, p in enumerate(pool) if k not in (i, j)]
            pool.append(_combine(rng, a, b))
        target, solution = pool[0]
        if 1 <= target <= max_target:
            shown = numbers[:]
            rng.shuffle(shown)
            return shown, target, _strip_outer(solution)


def countdown(
    n: int, seed: int = 0, count: int = 4, max_number: int = 25, max_target: int = 100, split: str = "train"
) -> list[dict]:
    """`n` solvable countdown rows of the given split (rules in the module docstring)."""
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
    if not 2 <= count <= 6 or max_number < 2 or max_target < 1:
        raise TaskError(f"need 2 <= count <= 6, max_number >= 2, max_target >= 1; got {count}, {max_number}, {max_target}")
    rng = random.Random(f"posttrain/countdown/{split}/{seed}/{count}/{max_number}/{max_target}")
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, budget = 0, 100 * n + 10_000
    while len(rows) < n:
        attempts += 1
        if attempts > budget:
            raise TaskError(f"only {len(rows)} distinct {split} countdown problems found; asked {n}")
        numbers, target, solution = _one(rng, count, max_number, max_target)
        key = problem_key(numbers, target)
        if not in_split(key, split) or (split == "test" and key in seen):
            continue
        seen.add(key)
        prompt = PROMPT.format(numbers=", ".join(map(str, numbers)), target=target)
        rows.append({"prompt": prompt, "target": target, "numbers": numbers, "solution": solution})
    return rows


__all__ = ["countdown", "problem_key", "PROMPT"]
