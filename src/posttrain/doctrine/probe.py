"""The base model's pass rate on a sample of the data, and what the decision tree makes of it.

`posttrain recommend` and `train auto` sample ``samples`` completions for each of ``prompts``
prompts of the data with the model that would be trained, score them with the reward, and hand the
[P, G] rewards to ``summarise``. The sampling is the trainers' own (``algorithms.collect``, done in
``commands.recommend.measure_probe``: the doctrine does not import the trainers); this module is
the arithmetic and the verdict, pure and cheap:

    pass_rate   share of judged completions with reward >= threshold (RFT's reward_threshold, 1)
    pass_at_k   share of prompts with at least one passing completion (k = samples)
    flat_frac   share of prompts whose completions all scored the same: GRPO's frac_zero_std
    near_zero   pass_rate <= NEAR_ZERO: GRPO would see almost no group whose rewards differ

Why it matters: a group of G completions of a prompt solved p of the time has a success only in
1 - (1 - p)^G of the groups; the others score 0 everywhere, their advantages are 0, and GRPO
learns nothing from them (issue 18: p = 3%, G = 8, a run of 29 steps and 50-100% of groups flat).
Rejection-sampling fine-tuning keeps exactly those rare successes, and distillation and SFT need
no success at all, so the tree proposes them first (``posttrain.doctrine.select``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

NEAR_ZERO = 0.05
"""A pass rate at or below this is "near zero": at p = 5% and G = 8, 66% of GRPO's groups are flat."""
TOO_EASY = 0.95
"""A pass rate at or above this leaves little to learn from this data."""
PASS_THRESHOLD = 1.0
"""A completion passes when its reward is >= this (RFT's default: math, code and the tasks score 1 right)."""
KEEP_TARGET = 0.5
"""RFT's group size is raised until about this share of prompts has a passing completion..."""
MAX_GROUP = 32
"""...up to this many samples per prompt."""


@dataclasses.dataclass
class Probe:
    """The base model's pass rate on a sample of the data (``summarise``)."""
    reward: str
    prompts: int
    samples: int
    """Completions per prompt (the k of pass@k)."""
    pass_rate: float
    pass_at_k: float
    mean_reward: float
    flat_frac: float
    unjudged: int
    """Completions the reward could not judge (None): left out of the rates."""
    threshold: float = PASS_THRESHOLD
    seconds: float = 0.0

    @property
    def near_zero(self) -> bool:
        return self.pass_rate <= NEAR_ZERO

    @property
    def too_easy(self) -> bool:
        return self.pass_rate >= TOO_EASY

    def describe(self) -> str:
        return (f"{self.pass_rate:.1%} of {self.prompts} prompts x {self.samples} samples pass (reward {self.reward} "
                f">= {self.threshold:g}; mean {self.mean_reward:.3g}); pass@{self.samples} {self.pass_at_k:.0%}; "
                f"{self.flat_frac:.0%} of the prompts' samples all score the same; {self.seconds:.0f}s")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "near_zero": self.near_zero}


def summarise(rewards_PG: Sequence[Sequence[float | None]], reward: str, threshold: float = PASS_THRESHOLD,
              seconds: float = 0.0) -> Probe:
    """A ``Probe`` from each prompt's sampled rewards (None = not judged; NaN is read as None)."""
    clean = [[None if r is None or r != r else float(r) for r in group] for group in rewards_PG]
    judged = [r for g in clean for r in g if r is not None]
    passed = [r >= threshold for r in judged]
    groups = [[r for r in g if r is not None] for g in clean]
    groups = [g for g in groups if g]
    return Probe(
        reward=reward, prompts=len(clean), samples=max((len(g) for g in clean), default=0),
        pass_rate=sum(passed) / len(judged) if judged else 0.0,
        pass_at_k=sum(any(r >= threshold for r in g) for g in groups) / len(groups) if groups else 0.0,
        mean_reward=sum(judged) / len(judged) if judged else float("nan"),
        flat_frac=sum(max(g) == min(g) for g in groups) / len(groups) if groups else 1.0,
        unjudged=sum(r is None for g in clean for r in g), threshold=threshold, seconds=seconds)


def with_success(p: float, group: int) -> float:
    """Share of groups of ``group`` samples with at least one success at pass rate ``p``."""
    return 1.0 - (1.0 - p) ** group


def rft_group_size(p: float, current: int = 8) -> int:
    """Samples per prompt for RFT at pass rate ``p``: enough for about KEEP_TARGET of the prompts to keep
    a sample, at least twice ``current`` and at most MAX_GROUP. With p = 0 measured, MAX_GROUP."""
    if p <= 0:
        return MAX_GROUP
    need = math.ceil(math.log(1 - KEEP_TARGET) / math.log(1 - min(p, 0.999)))
    return max(2 * current, min(MAX_GROUP, need))


def probe_reasons(probe: Probe, group_size: int = 8) -> list[str]:
    """The tree's lines about a probe: the measurement and, when near zero, why GRPO would stall."""
    line = f"base model's pass rate? {probe.describe()}"
    if probe.near_zero:
        flat = 1 - with_success(probe.pass_rate, group_size)
        seen = (f"no success in {probe.prompts * probe.samples} samples (the rate is likely below "
                f"{3 / max(1, probe.prompts * probe.samples):.0%})" if probe.pass_rate == 0 else
                f"at {probe.pass_rate:.1%}, about {flat:.0%} of GRPO's groups of {group_size}")
        return [line + f" -> near zero (<= {NEAR_ZERO:.0%}): {seen} would score 0 on every completion, so their "
                "advantages are 0 and GRPO would learn almost nothing (the doctor's no_signal); a stage that "
                "needs few or no successes comes first"]
    if probe.too_easy:
        return [line + f" -> {probe.pass_rate:.0%} already: little left to learn from this data; harder prompts "
                "would give RL more to do"]
    return [line + f" -> enough signal for GRPO (about {with_success(probe.pass_rate, group_size):.0%} of groups "
            f"of {group_size} hold a success)"]
