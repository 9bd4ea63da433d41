"""``tool_arithmetic``: multi-digit multiplication with a calculator tool.

``tool_arithmetic(min_digits=3, max_digits=4, max_turns=4)``: "What is 4821 * 937?", where each
operand has between ``min_digits`` and ``max_digits`` digits: products a 135M model cannot work out
by itself, but can get exactly by calling the ``calculator`` tool (``posttrain.envs.tools``). Episode:
a turn holding a ``<tool_call>`` gets the tool results back as ``tool`` messages and the episode goes
on; the first turn without a tool call is the final answer, scored by the ``math`` reward's answer
extraction (``posttrain.rewards.math``: the text after "Answer:", else the last number): 1.0 when it
is the product, else 0.0, and the episode ends. A model still calling tools at its ``max_turns``-th
turn gets 0. ``info`` on the last step: ``correct`` (1.0/0.0), ``tool_calls`` (turns that called
a tool), ``tool_errors`` and ``tool_parse_failures`` (the episode's ToolBox counters).

Rows are ``{"prompt", "answer", "a", "b"}``, split as the ``arithmetic`` task splits its problems
(a stable hash of the sorted operands puts 1 problem in 10 in ``test``), so a held-out product was
never asked in training. The tool schemas reach the chat template through ``tools`` (the runner
renders them, or puts ``tools_system_prompt`` in a system message when the template ignores them).
"""

from __future__ import annotations

import random

from posttrain.data.tasks import in_split
from posttrain.envs.base import Environment, EnvError, Step, check_split

PROMPT = "What is {a} * {b}? You may use the calculator tool. Put the final answer after 'Answer:'."


def _key(a: int, b: int) -> str:
    return f"{min(a, b)}*{max(a, b)}"


def multiplication_rows(split: str, n: int, seed: int, min_digits: int, max_digits: int) -> list[dict]:
    """``n`` rows of ``split``: train rows are seeded draws (may repeat), test rows distinct problems."""
    check_split(split)
    rng = random.Random(f"posttrain/tool_arithmetic/{split}/{seed}/{min_digits}/{max_digits}")
    lo, hi = 10 ** (min_digits - 1), 10**max_digits - 1
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n + 10_000):
        if len(rows) >= n:
            break
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if not in_split(_key(a, b), split) or (split == "test" and _key(a, b) in seen):
            continue
        seen.add(_key(a, b))
        rows.append({"prompt": PROMPT.format(a=a, b=b), "answer": str(a * b), "a": a, "b": b})
    if len(rows) < n:
        raise EnvError(f"tool_arithmetic: only {len(rows)} distinct {split} problems found; asked {n}")
    return rows


class ToolArithmetic(Environment):
    name = "tool_arithmetic"
    description = ("multiply two 3-4 digit numbers with a calculator tool; options: min_digits=3, max_digits=4, "
                   "max_turns=4")

    def __init__(self, min_digits: int = 3, max_digits: int = 4, max_turns: int = 4):
        if not 1 <= min_digits <= max_digits <= 18:
            raise EnvError(f"tool_arithmetic: need 1 <= min_digits <= max_digits <= 18, got "
                           f"min_digits={min_digits}, max_digits={max_digits}")
        if max_turns < 1:
            raise EnvError(f"tool_arithmetic: max_turns must be >= 1, got {max_turns}")
        from posttrain.envs.tools import ToolBox, calculator

        self.min_digits, self.max_digits, self.max_turns = min_digits, max_digits, max_turns
        self.tools = [calculator]
        self.toolbox = ToolBox(self.tools)
        self.row: dict | None = None
        self.turns = self.tool_turns = 0

    def rows(self, split: str, n: int, seed: int) -> list[dict]:
        return multiplication_rows(split, n, seed, self.min_digits, self.max_digits)

    def reset(self, row: dict, seed: int) -> list[dict]:
        if "a" in row and "b" in row:
            row = {"prompt": PROMPT.format(a=row["a"], b=row["b"]), "answer": str(int(row["a"]) * int(row["b"])), **row}
        if "prompt" not in row or "answer" not in row:
            raise EnvError("tool_arithmetic: a row needs 'a' and 'b', or 'prompt' and 'answer'")
        self.row, self.turns, self.tool_turns = row, 0, 0
        self.toolbox.reset_stats()
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, assistant_text: str) -> Step:
        from posttrain.rewards.math import math_reward

        if self.row is None:
            raise RuntimeError("tool_arithmetic: step before reset")
        self.turns += 1
        results = self.toolbox.handle(assistant_text)
        if results is None:  # no tool call: the final answer
            correct = math_reward(self.row["prompt"], assistant_text, answer=str(self.row["answer"])) or 0.0
            return Step([], reward=correct, done=True, info=self._info(correct))
        self.tool_turns += 1
        if self.turns >= self.max_turns:
            return Step([], reward=0.0, done=True, info=self._info(0.0))
        return Step(list(results))

    def _info(self, correct: float) -> dict:
        stats = self.toolbox.stats
        return {"correct": correct, "tool_calls": float(self.tool_turns),
                "tool_errors": float(stats.tool_errors), "tool_parse_failures": float(stats.parse_failures)}


__all__ = ["ToolArithmetic", "multiplication_rows", "PROMPT"]
