"""Rejection-sampling fine-tuning (``posttrain train rft``): expert iteration (Anthony et al. 2017),
STaR (Zelikman et al. 2022), ReST-EM (Singh et al. 2023), RAFT (Dong et al. 2023).

Each round (``rounds.py``: sampling, the round files, resume) keeps the sampled completions whose
reward passes a threshold and fine-tunes on them with SFT's loss:

    groups = sample(policy, prompts_per_round prompts, group_size each)       # the current policy
    keep_p = keep(rewards_G, texts_G, reward_threshold, keep_per_prompt)       # pure function below
    rows   = [{prompt, completion, reward, ...the prompt row's columns}]       # rounds/round-<k>.jsonl
    steps  = sft.accumulate(...) + optimizer step, steps_per_round times       # SFT's loss and packing

Choices, and where they depart from the papers and from TRL (which has no RFT trainer; its
``BestOfNSampler`` only samples):
- The policy samples anew each round and the fine-tuning continues from the current weights (as
  expert iteration and RAFT). ReST-EM restarts every round from the base model; STaR too (and adds
  "rationalisation" with the answer as a hint): not done here.
- Kept per prompt: at most ``keep_per_prompt`` (ReST-EM caps at 10 so easy prompts do not swamp
  the round), the highest rewards first (ties: in sampled order), exact duplicate texts once.
- Completions cut at ``max_new_tokens`` are kept when they pass (the reward judged them as they
  are); SFT then trains them as ending there.
- The loss is SFT's (``sft.batch_loss``: mean NLL per completion token, padding-free packing,
  the chunked head). Defaults as SFT: LoRA at the doctrine's SFT rank, learning rate 2e-5 for
  full fine-tuning and 10x with LoRA.
- Metrics per round: ``round/kept_frac`` (kept samples / samples), ``round/prompts_kept`` (prompts
  with at least one kept), ``reward/mean`` of the samples (the policy's pass rate for a 0/1 reward).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Callable, ClassVar, Optional

from posttrain.algorithms import rounds
from posttrain.algorithms import sft
from posttrain.algorithms import sft_data as sd
from posttrain.algorithms.run import Run, RunResult, closes_runs_on_failure
from posttrain.data import SFT_FORMS, is_conversational
from posttrain.models import sft_lora_rank
from posttrain.runtime.config import Positive, Range


@dataclasses.dataclass
class RFTConfig(rounds.RoundsConfig):
    """Rejection-sampling fine-tuning (expert iteration, ReST-EM, STaR): SFT on the policy's own samples
    that pass a reward threshold, round after round."""

    reward_threshold: float = 1.0
    """Keep a sample when its reward is >= this (math, code and the tasks' rewards: 1 = correct)."""
    keep_per_prompt: Annotated[int, Positive] = 4
    """At most this many kept samples per prompt (distinct texts; the highest rewards first)."""
    max_length: Annotated[int, Range(2)] = 1024
    """Longest prompt + completion in tokens; longer rows keep their first max_length tokens."""
    packing: bool = True
    """Padding-free batches (SFT's): rows packed without attending across examples."""
    row_tokens: Annotated[int, Positive] = 1024
    """Longest packed row (SFT's)."""
    APPLIES_WHEN: ClassVar[dict] = {"row_tokens": ("with --packing", lambda c: c.packing)}

    @property
    def method(self) -> str:
        return "rft"


def keep(rewards_G: list[Optional[float]], texts_G: list[str], threshold: float, k: int) -> list[int]:
    """Indices of the samples kept from one group: judged, reward >= ``threshold``, distinct texts,
    the highest rewards first (ties in sampled order), at most ``k``."""
    passing = sorted((i for i, r in enumerate(rewards_G) if r is not None and r >= threshold),
                     key=lambda i: -rewards_G[i])  # sorted is stable: ties stay in sampled order
    out, seen = [], set()
    for i in passing:
        if texts_G[i] not in seen and len(out) < k:
            seen.add(texts_G[i])
            out.append(i)
    return out


def completion_of(prompt, text: str):
    """The completion in the prompt's format: a string, or one assistant message."""
    return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text


RESERVED = (*SFT_FORMS, "reward")


def build(config: RFTConfig, groups: list[rounds.Group]) -> tuple[list[dict], dict, Callable[[int], dict]]:
    """A round's SFT rows ({prompt, completion, reward, the prompt row's other columns}) and metrics."""
    rows, kept_P = [], []
    for g in groups:
        idx = keep(g.rewards, g.texts, config.reward_threshold, config.keep_per_prompt)
        kept_P.append(idx)
        extra = {k: v for k, v in g.row.items() if k not in RESERVED}
        rows += [{"prompt": g.row["prompt"], "completion": completion_of(g.row["prompt"], g.texts[i]),
                  "reward": g.rewards[i], **extra} for i in idx]
    n = sum(len(g.texts) for g in groups)
    metrics = {"round/kept": len(rows), "round/kept_frac": len(rows) / max(1, n),
               "round/prompts_kept": sum(bool(i) for i in kept_P),
               "round/prompts_kept_frac": sum(bool(i) for i in kept_P) / max(1, len(groups))}
    return rows, metrics, lambda p: {"kept": kept_P[p]}


@closes_runs_on_failure
def train_rft(config: RFTConfig) -> RunResult:
    """Rejection-sampling fine-tuning; returns the run directory and metrics."""
    s = rounds.setup(config, sft_lora_rank)
    run = Run(config, "rft", total_steps=config.max_steps)
    pad, custom_mask = s.tok.pad_token_id, sd.takes_custom_mask(s.policy)

    def encode(rows: list[dict], source: str):
        examples, _ = sd.encode_examples(s.tok, rows, config.chat_template, "completion", config.max_length, source)
        return examples, None

    def accumulate(rule, batch, _context):
        total = sum(e.n_targets for e in batch)
        sums, tokens = sft.accumulate(s.policy, rule, batch, total, config, pad, custom_mask)
        return {**sums, "target_tokens": total}, tokens

    method = rounds.Method(lambda k, groups: build(config, groups), encode, accumulate, sft.FULL_FT_LR)
    return rounds.train(config, s, run, method)
