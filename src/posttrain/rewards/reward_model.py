"""A trained reward model as a reward function: ``--reward 'reward_model(runs/rm/final)'``.

`make_reward_model_reward(arg, batch_size=16, device="cpu")` loads the model written by
``posttrain train rm`` (a run directory or its ``final/``) once and returns a reward function with a
batch scorer: ``score_batch`` scores a whole rollout batch in forward passes of ``batch_size``
responses, no grad, each prompt run once for the completions that share it. The score is the
model's raw scalar (no clipping or normalisation: train the reward model with ``--center-coef``
to keep it near 0). It never returns None.

Loaded models are cached by path (and file time), so building the same spec again, as an
evaluation does, does not load the weights twice.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: float, device: str):
    from posttrain.algorithms.reward_model import load_reward_model

    return load_reward_model(path, device=device)


def cached_reward_model(path: str | Path, device: str = "cpu"):
    from posttrain.algorithms.reward_model import resolve_path
    from posttrain.value_head import HEAD_FILE

    p = resolve_path(path)
    if not (p / HEAD_FILE).is_file():
        raise FileNotFoundError(f"reward_model: {path} is not a reward model directory (no {HEAD_FILE}); "
                                f"train one with `posttrain train rm`")
    return _load(str(p.resolve()), (p / HEAD_FILE).stat().st_mtime, device)


def make_reward_model_reward(arg: str | None = None, path: str | None = None, batch_size: int = 16,
                             device: str = "cpu", **_: Any):
    """Factory for the ``reward_model`` reward (see the module docstring)."""
    where = arg or path
    if not where:
        raise ValueError("reward_model needs the model's directory: reward_model(runs/<rm>/final)")
    rm = cached_reward_model(where, device)

    def reward_model(prompt: Any, completion: Any, **_: Any) -> float:
        return rm.score([prompt], [completion], batch_size=1)[0]

    def batch(rows: Sequence[dict], completions: Sequence[Any], max_workers: int | None = None) -> list[float]:
        return rm.score([r["prompt"] for r in rows], list(completions), batch_size=batch_size)

    reward_model.batch = batch
    reward_model.model = rm
    return reward_model


__all__ = ["make_reward_model_reward", "cached_reward_model"]
