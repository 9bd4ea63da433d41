"""``single_turn``: today's single-turn tasks as the one-step special case of an environment.

``single_turn(task=arithmetic)``, ``single_turn(task='rg:chain_sum(min_terms=3)', reward='math,format:0.2')``:
the rows are the task's (``posttrain.data.tasks.get_task``, same splits and seeds); ``reset`` gives the
row's prompt as the trainers give it (a plain string as one user message, a conversational prompt
as its messages, as ``posttrain.data.prompt_text`` renders them); ``step`` scores the text with the
reward spec (the task's own reward when ``reward`` is not given) exactly as the single-turn trainers
do (``posttrain.rewards.from_spec``, called with the prompt, the text and the row's columns) and ends
the episode. So a run through this environment sees the same rewards as the same run on ``--task``.

Departure: a reward of None ("cannot judge", skipped by the single-turn trainers' means) becomes 0.0
here, since a Step's reward is a number; ``info["reward_none"]`` is 1.0 for such a turn so that a
runner can leave it out. ``info`` also holds each part of a combined reward as ``reward/<name>``.
"""

from __future__ import annotations

from typing import Any

from posttrain import rewards
from posttrain.data import is_conversational
from posttrain.data.tasks import check_options, get_task, task_info
from posttrain.envs.base import Environment, EnvError, Step


def prompt_messages(prompt: Any) -> list[dict]:
    """A row's prompt as chat messages: a conversational prompt as it is, a string as one user message."""
    if is_conversational(prompt):
        return [dict(m) for m in prompt]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    raise EnvError(f"single_turn: a row's prompt must be a string or a list of messages, got {type(prompt).__name__}")


class SingleTurn(Environment):
    name = "single_turn"
    description = "a --task spec as a one-step environment, scored by its reward: single_turn(task=arithmetic)"

    def __init__(self, task: str, reward: str | None = None):
        info = task_info(task)  # an unknown task or bad options: a TaskError (a UserError) now
        check_options(task)
        self.task, self.reward_spec = task, reward or info.reward
        self.reward_fn = rewards.from_spec(self.reward_spec, flag="single_turn(reward=...)")
        self.max_turns = 1
        self.row: dict | None = None

    def rows(self, split: str, n: int, seed: int) -> list[dict]:
        return get_task(self.task, split, n=n, seed=seed)

    def reset(self, row: dict, seed: int) -> list[dict]:
        if "prompt" not in row:
            raise EnvError(f"single_turn: a row needs a 'prompt' column; got {', '.join(sorted(row)) or 'none'}")
        self.row = row
        return prompt_messages(row["prompt"])

    def step(self, assistant_text: str) -> Step:
        if self.row is None:
            raise RuntimeError("single_turn: step before reset")
        extra = {k: v for k, v in self.row.items() if k != "prompt"}
        total, parts = self.reward_fn.score(self.row["prompt"], assistant_text, **extra)
        info: dict[str, float] = {f"reward/{k}": float(v) for k, v in parts.items() if v is not None}
        info["reward_none"] = float(total is None)
        return Step([], reward=0.0 if total is None else float(total), done=True, info=info)


__all__ = ["SingleTurn", "prompt_messages"]
