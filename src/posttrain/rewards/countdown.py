r"""Countdown reward: the completion's expression reaches `target` using each of `numbers` once.

`countdown_reward(prompt, completion, target, numbers, **_) -> float | None`
(the Countdown game of TinyZero / "Countdown" RL demos):

  The expression is taken from, first that applies: the last `<answer>...</answer>`; else
  the text after the last "Answer:" up to the end of that line; else the last line of the
  completion. A trailing "= <number>" is dropped (`(3 + 5) * 2 = 16` counts as `(3 + 5) * 2`).
  An `<answer>` opened after the last `</answer>` and never closed is a cut-off answer: no
  expression (0.0), never the last line inside it. An expression cut off elsewhere fails on its
  own: a dangling operator or parenthesis is a syntax error, and a prefix cannot use every number.

  1.0 when all of:
    * it parses as a Python expression (`ast.parse(mode="eval")`, never `eval`) built only
      from non-negative integer literals, the binary operators + - * / and parentheses
      (no unary minus, no `**`, `//`, `%`, names, calls, floats);
    * its literals, as a multiset, equal `numbers`: each given number used exactly once, all used;
    * evaluated exactly (fractions; `/` is true division, so 7/2 is 3.5) it equals `target`,
      with no division by zero.
  0.0 otherwise (including no expression, over 300 characters, or a syntax error).
  None when `target` or `numbers` is missing: the row cannot be judged.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

from posttrain.rewards import as_text

MAX_EXPR_CHARS = 300
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}


def extract_expression(completion) -> str | None:
    """The candidate expression in a completion (rules in the module docstring), or None."""
    text = as_text(completion)
    tags = list(_ANSWER_TAG.finditer(text))
    if _OPEN_TAG.search(text, tags[-1].end() if tags else 0):
        return None  # an <answer> never closed: cut off mid-answer
    if tags:
        expr = tags[-1].group(1)
    else:
        last = None
        for last in _MARKER.finditer(text):
            pass
        if last is not None:
            expr = text[last.end() :].strip().split("\n", 1)[0]
        else:
            lines = [line for line in text.strip().split("\n") if line.strip()]
            expr = lines[-1] if lines else ""
    expr = expr.strip(" \t*`$.")  # markdown, math delimiters, a final period
    expr = re.sub(r"\s*=\s*[-+]?\d+(?:\.\d+)?\s*$", "", expr)
    expr = expr.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-")
    return expr or None


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _OPS[type(node.op)](left, right)  # ZeroDivisionError on x/0
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def check_expression(expr: str, target, numbers) -> bool:
    """True when `expr` uses exactly `numbers` (each once) with + - * / and equals `target`."""
    if not expr or len(expr) > MAX_EXPR_CHARS or not re.fullmatch(r"[0-9\s+\-*/()]+", expr):
        return False
    try:
        tree = ast.parse(expr, mode="eval")
        used: list[int] = []
        value = _evaluate(tree, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return False
    return Counter(used) == Counter(int(n) for n in numbers) and value == Fraction(target)


def countdown_reward(prompt, completion, target=None, numbers=None, **_) -> float | None:
    """1.0 for a valid expression reaching `target` from `numbers`, else 0.0; None without them."""
    if target is None or numbers is None:
        return None
    try:
        return 1.0 if check_expression(extract_expression(completion) or "", target, numbers) else 0.0
    except (TypeError, ValueError):  # a malformed row (non-numeric target or numbers)
        return None


__all__ = ["countdown_reward", "check_expression", "extract_expression"]
