"""Greedy evaluation: the mean reward of greedy completions on held-out rows ("accuracy" for
0/1 rewards such as math answers or test cases); ``greedy_eval_sharded`` splits the rows across
the processes of a multi-process run and combines their results."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from posttrain import rewards as rw
from posttrain.data import encode_prompt
from posttrain.runtime import distributed
from posttrain.sampling.generation import SamplingConfig, sample_groups


def was_training(model) -> bool:
    return bool(getattr(model, "training", False))


@torch.no_grad()
def greedy_eval(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    reward: str | Any,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    chat_template: bool = True,
    examples: int = 2,
) -> dict[str, Any]:
    """Generate greedily for every row, score with ``reward`` (a spec or a function); return
    {"accuracy": mean reward over judged rows, "n", "none", "examples": [...]}."""
    fn = rw.from_spec(reward) if isinstance(reward, str) else reward
    training = was_training(model)
    model.eval()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    totals: list[float | None] = []
    shown: list[dict[str, Any]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = list(rows[start:start + batch_size])
            ids = [encode_prompt(tokenizer, r["prompt"], chat_template) for r in chunk]
            texts = sample_groups(model, tokenizer, ids, 1, cfg).texts(tokenizer)
            scores, _ = rw.score_batch(fn, [r["prompt"] for r in chunk], texts, chunk)
            totals.extend(scores)
            for r, t, s in zip(chunk, texts, scores):
                if len(shown) < examples:
                    shown.append({"prompt": rw.as_text(r["prompt"]), "completion": t, "reward": s})
    finally:
        model.train(training)
    judged = [float(s) for s in totals if s is not None]
    return {
        "accuracy": sum(judged) / len(judged) if judged else float("nan"),
        "n": len(totals),
        "none": len(totals) - len(judged),
        "examples": shown,
    }


def greedy_eval_sharded(policy, tok, rows: list[dict], reward, max_new_tokens: int, chat_template: bool = True) -> dict:
    """``evaluate.greedy_eval`` with the rows split across the processes and the results combined
    (accuracy over every judged row; rank 0's examples)."""
    mine = rows[distributed.shard(len(rows))]
    with distributed.gathered(policy):  # FSDP: the ranks generate different numbers of tokens
        if hasattr(reward, "evaluate"):  # --env: greedy episodes, scored by the environment
            part = reward.evaluate(policy, tok, mine, max_new_tokens)
        else:
            part = greedy_eval(policy, tok, mine, reward, max_new_tokens, chat_template=chat_template)
    every = distributed.gather(part)
    if len(every) == 1:
        return part
    judged = [r["n"] - r["none"] for r in every]
    total = sum(j * r["accuracy"] for j, r in zip(judged, every) if j)
    return {"accuracy": total / sum(judged) if sum(judged) else float("nan"), "n": sum(r["n"] for r in every),
            "none": sum(r["none"] for r in every), "examples": every[0]["examples"]}
