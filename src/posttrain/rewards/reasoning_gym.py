"""The `reasoning_gym` reward: a reasoning-gym dataset's own `score_answer` on our extracted answer.

`reasoning_gym_reward(prompt, completion, answer, metadata, **_) -> float | None`
  None  when the row has no reference `answer` or no `metadata.source_dataset` (a row of
        another task in a mixed dataset: it cannot be judged here);
  0.0   when no final answer is found (`rewards.math.extract_answer`: the last `\\boxed{}`, the
        text after the last 'Answer:', else the last number; a cut-off answer is none);
  else  `score_answer(extracted, entry)` of the row's dataset, in [0, 1], with the entry rebuilt
        from the row ({"question", "answer", "metadata"}).

Departs from reasoning-gym: it scores the whole answer string a caller hands it; we hand it the
final answer only, so reasoning before it is not graded (its base scorer gives partial credit
when the reference appears inside a longer answer, which a whole completion would earn freely).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from posttrain.rewards import as_text
from posttrain.rewards.math import extract_answer


@lru_cache(maxsize=None)
def _scorer(dataset: str) -> Callable[[str, dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset)


def reasoning_gym_reward(prompt, completion, answer=None, metadata: Any = None, **_) -> float | None:
    """The row's reasoning-gym score of the completion's final answer (rules in the module docstring)."""
    if answer is None or not isinstance(metadata, dict) or not metadata.get("source_dataset"):
        return None
    pred = extract_answer(as_text(completion))
    if pred is None:
        return 0.0
    entry = {"question": as_text(prompt), "answer": str(answer), "metadata": metadata}
    return float(_scorer(str(metadata["source_dataset"]))(pred, entry))


__all__ = ["reasoning_gym_reward"]
