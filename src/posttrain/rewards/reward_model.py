"""A trained reward model as a reward function: ``--reward 'reward_model(runs/rm/final)'``.

``RewardModel`` scores (prompt, response) pairs with a model written by ``posttrain train rm``
(``algorithms/reward_model.py`` trains it; ``load_reward_model`` reads a run directory, its
``final/`` or a PPO run's ``final/value``): the response is tokenized as in training
(``data/chat.py``), the trunk runs each shared prompt once (``value_head.sequence_scores``).

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

import torch

from posttrain.data import encode_prompt
from posttrain.data.chat import completion_text
from posttrain.objectives.value_head import HEAD_FILE, ValueHead, load_head, sequence_scores, trunk_of


class RewardModel:
    """A trained reward model: ``score(prompts, responses)`` -> one float per response."""

    def __init__(self, model, tokenizer, head: ValueHead, meta: dict | None = None):
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.meta = dict(meta or {})
        self.trunk = trunk_of(model)
        self.chat_template = bool(self.meta.get("chat_template", True))
        self.max_length = int(self.meta.get("max_length", 512))
        self.max_prompt_length = int(self.meta.get("max_prompt_length", 256))

    def encode(self, prompt: Any, response: Any) -> tuple[list[int], list[int]]:
        """Token ids of (prompt, response) as in training (``dpo_data``), with its truncation."""
        p = encode_prompt(self.tokenizer, prompt, self.chat_template)
        text = completion_text(self.tokenizer, prompt, "" if response is None else response, self.chat_template)
        c = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(p) + len(c) > self.max_length:
            p = p[-self.max_prompt_length:] if len(p) > self.max_prompt_length else p
            c = c[:max(1, self.max_length - len(p))]
        return p, c

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[Any], batch_size: int = 16) -> list[float]:
        """Scores in batches, no grad. Consecutive runs of one prompt (a group of completions) share
        the prompt's forward pass."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        self.head.eval()
        G = _run_length(prompts)
        step = max(G, batch_size // G * G)
        out: list[float] = []
        for i in range(0, len(responses), step):
            enc = [self.encode(p, r) for p, r in zip(prompts[i:i + step], responses[i:i + step])]
            s = sequence_scores(self.trunk, self.head, [e[0] for e in enc[::G]], [e[1] for e in enc],
                                self.tokenizer.pad_token_id)
            out.extend(float(v) for v in s)
        return out


def _run_length(prompts: Sequence[Any]) -> int:
    """G when ``prompts`` is made of consecutive runs of exactly G equal prompts, else 1."""
    g = 1
    while g < len(prompts) and prompts[g] == prompts[0]:
        g += 1
    if len(prompts) % g or any(prompts[i] != prompts[i - i % g] for i in range(len(prompts))):
        return 1
    return g


def resolve_path(path: str | Path) -> Path:
    """A reward model directory, or a run directory holding one in ``final/``."""
    p = Path(path).expanduser()
    if not (p / "value_head.safetensors").is_file() and (p / "final" / "value_head.safetensors").is_file():
        p = p / "final"
    return p


def load_reward_model(path: str | Path, device: str = "cpu", merge: bool = True) -> RewardModel:
    """Load a reward (or value) model directory written by ``train_reward_model`` (or a PPO run's
    ``final/value``). ``merge`` folds a LoRA adapter into the weights: faster scoring, the same
    function up to float rounding."""
    from posttrain.models import load_model, resolve_device

    p = resolve_path(path)
    head, meta = load_head(p, resolve_device(device))
    model, tok = load_model(str(p), device=resolve_device(device))
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return RewardModel(model, tok, head, meta)


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: float, device: str):
    return load_reward_model(path, device=device)


def cached_reward_model(path: str | Path, device: str = "cpu"):
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


__all__ = ["make_reward_model_reward", "cached_reward_model", "RewardModel", "load_reward_model", "resolve_path"]
