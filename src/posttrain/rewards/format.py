r"""Format reward: 1.0 when the completion has the expected shape, else 0.0.

`format_reward(prompt, completion, pattern="answer_line", **_)`: the *whole* completion
(leading and trailing whitespace ignored) must match `pattern` (`re.fullmatch`, DOTALL).
`pattern` is a preset name or a regular expression:

  answer_line   some reasoning, then a last line "Answer: <something>" and nothing after it;
                the shape the built-in tasks ask for ("Put the final answer after 'Answer:'").
                A bare "Answer: 5" with no reasoning before it does not match.
  think_answer  "<think>...</think>" then "<answer>...</answer>", both non-empty
                (DeepSeek-R1 / open-r1 `format_reward`, whitespace between tags allowed).
  boxed         some reasoning, then a final \boxed{...} as the last thing written.

The final answer each preset finds (the text after "Answer:", inside `<answer>`, inside the box;
a custom pattern's group named `answer`) must be finished as written: an answer that ends
mid-expression (`Answer: \frac{1}{`, `Answer: 3 +`: `rewards.answers.cut_off`) is a completion
cut off by the token budget, not the expected shape, and scores 0.0.

Used as a small-weight shaping term next to a correctness reward (`math,format:0.2`): on its
own it is easy to satisfy without solving anything. Patterns are compiled once and cached.
The presets are linear-time on any input; a custom pattern is the caller's responsibility.
"""

from __future__ import annotations

import re
from functools import lru_cache

from posttrain.rewards import as_text
from posttrain.rewards.answers import cut_off

_NOT_END_THINK = r"(?:(?!</think>).)"
_NOT_END_ANSWER = r"(?:(?!</answer>).)"
_BRACED = r"(?:[^{}\n]|\{(?:[^{}\n]|\{[^{}\n]*\})*\})*"  # up to two levels of {} inside the box

# Each preset is written so the engine never backtracks quadratically: no two adjacent
# unbounded repeats that can match the same characters.
PRESETS: dict[str, str] = {
    "answer_line": r"\S.*\n[ \t]*(?:\*\*)?Answer:(?:\*\*)?[ \t]*(?P<answer>\S[^\n]*)",
    "think_answer": (
        rf"<think>\s*(?!</think>)\S{_NOT_END_THINK}*</think>\s*"
        rf"<answer>\s*(?P<answer>(?!</answer>)\S{_NOT_END_ANSWER}*)</answer>"
    ),
    "boxed": rf"\S.*\\boxed\{{(?P<answer>{_BRACED})\}}[ \t.$]*",
}
DEFAULT_PATTERN = "answer_line"


@lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(PRESETS.get(pattern, pattern), re.DOTALL)


def format_reward(prompt, completion, pattern: str = DEFAULT_PATTERN, **_) -> float:
    """1.0 when `completion.strip()` fully matches `pattern` (a preset name or a regex) and the
    answer it finds is finished, else 0.0."""
    match = _compile(pattern).fullmatch(as_text(completion).strip())
    if match is None:
        return 0.0
    answer = match.groupdict().get("answer")
    return 0.0 if answer is not None and cut_off(answer.strip()) else 1.0


__all__ = ["format_reward", "PRESETS", "DEFAULT_PATTERN"]
