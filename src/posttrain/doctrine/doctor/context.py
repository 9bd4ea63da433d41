"""What a rule reads: the metric history, the samples, the thresholds and the doctor's state."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import as_float, mean, series
from posttrain.doctrine.doctor.thresholds import Thresholds


def reward_key(history: Sequence[dict]) -> str:
    """The reward series to watch: reward/mean (GRPO/PPO) or rewards/margin (DPO)."""
    for key in ("reward/mean", "rewards/margin", "rewards/accuracy"):
        if any(key in h for h in history[-5:]):
            return key
    return "reward/mean"


def has_critic(history: Sequence[dict]) -> bool:
    """True for a run with a value model (PPO: ``value_loss`` logged), whose advantages come from the
    critic rather than from the spread of rewards within a group."""
    return any("value_loss" in h for h in history[-5:])


def annealed(history: Sequence[dict], recent: int, frac: float) -> bool:
    """True when the learning rate over the last ``recent`` steps averages below ``frac`` of its peak
    so far: the tail of a cosine or linear schedule, where a flat reward is the plan, not a problem."""
    lr = series(history, "lr")
    return bool(lr) and max(lr) > 0 and mean(lr[-recent:]) < frac * max(lr)


@dataclasses.dataclass
class Context:
    """What every rule reads at a check: the history so far, the samples, thresholds and doctor state."""
    history: Sequence[dict]
    samples: Sequence[dict]
    th: Thresholds
    since: int = -1
    """Steps after this one are new since the previous check."""
    cache: dict = dataclasses.field(default_factory=dict)
    """Kept by the Doctor across checks (e.g. format_hacking's baseline of the first samples)."""
    active: frozenset = frozenset()
    """Rules firing at the previous check (for hysteresis: an active rule needs more to clear)."""

    @property
    def step(self) -> int:
        return int(self.history[-1].get("step", len(self.history))) if self.history else 0

    def event(self, rule: str, severity: str, symptom: str, cause: str, fix: str, **evidence) -> Event:
        ev = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in evidence.items()}
        return Event(self.step, rule, severity, symptom, cause, fix, ev)

    def recent_samples(self, first_step: int) -> list[dict]:
        """Sample records with step > first_step (samples are in step order)."""
        out = []
        for s in reversed(self.samples):
            if s.get("step", 0) <= first_step:
                break
            out.append(s)
        return out[::-1]

    def sample_rewards(self, first_step: int) -> list[float | None]:
        """Every reward of the samples after first_step, None where the reward could not judge."""
        return [None if as_float(r) is None or not math.isfinite(as_float(r)) else as_float(r)
                for s in self.recent_samples(first_step) for r in s.get("rewards", [])]
