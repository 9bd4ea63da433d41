r"""Is an extracted final answer finished? Shared by the rewards that extract one (math, format).

A completion cut off by the token budget, or written carelessly, can end in the middle of its
answer: `\boxed{\frac{1}{`, `Answer: 1 +`, `Answer: \left( 5`. Grading the fragment it ends with
(the last number, a prefix that happens to parse) scores an unfinished answer as if it were
complete, a reward leak GRPO finds quickly. So a reward scores such an answer as no answer (0.0)
rather than falling back to something shorter.

`cut_off(answer) -> bool` is True when the answer cannot be complete as written:
  * an unescaped `{` that never closes (LaTeX groups must balance; `\{` is a literal brace);
  * more `\left` than `\right` (a delimiter pair left open);
  * it ends on something that needs more after it (`DANGLING`): a binary operator or relation
    (`+ - / ^ = < >`, `\cdot`, `\times`, `\le`, ...), a comma, an opening bracket, a space then
    `*`, or a LaTeX command whose argument is missing (`\frac`, `\sqrt`, `\text`, ...).
    Closing tags at the very end (`5</answer>`) are markup, not the operator `>`: they are looked
    past; an opening tag at the end (`<answer>`, the answer not yet written) is not.
It cannot see a cut that leaves a well-formed answer (`Answer: 12` cut to `Answer: 1`): without
the sampler's finish reason no text rule can, and the length penalty is the tool for those.
"""

from __future__ import annotations

import re

_ESCAPED = re.compile(r"\\.", re.DOTALL)
_BRACE = re.compile(r"[{}]")
_LEFT = re.compile(r"\\left(?![A-Za-z])")
_RIGHT = re.compile(r"\\right(?![A-Za-z])")
_COMMANDS = ("cdot", "times", "div", "pm", "mp", "le", "ge", "leq", "geq", "ne", "neq", "approx", "to",
             "frac", "dfrac", "tfrac", "sqrt", "left", "boxed", "text", "mathrm", "mathbf", "operatorname")
DANGLING = re.compile(r"(?:[-+/^=<>,(\[{]|\s\*|\\(?:" + "|".join(_COMMANDS) + r"))\s*\Z")
"""The end of an answer that needs more written after it."""


def open_braces(text: str) -> int:
    """Unescaped `{` in `text` that no later `}` closes (stray `}` are ignored)."""
    depth = 0
    for m in _BRACE.finditer(_ESCAPED.sub("", text)):
        if m.group(0) == "{":
            depth += 1
        elif depth:
            depth -= 1
    return depth


_CLOSING_TAGS = re.compile(r"(?:\s*</[A-Za-z][\w-]*\s*>)+\s*\Z")
"""Closing tags at the end (`5</answer>`): markup after a finished answer, not an operator `>`."""


def cut_off(answer: str) -> bool:
    """True when `answer` is unfinished as written (rules in the module docstring)."""
    return (bool(DANGLING.search(_CLOSING_TAGS.sub("", answer))) or open_braces(answer) > 0
            or len(_LEFT.findall(answer)) > len(_RIGHT.findall(answer)))


__all__ = ["DANGLING", "cut_off", "open_braces"]
