"""Rollout-mismatch rule: the sampler's probabilities drift away from the trainer's.

Not in the doctrine's debugging table (it predates the problem): Yao et al. 2025, "Your efficient
RL framework secretly brings you off-policy RL training", and the collapse reports of AReaL and
open-instruct, where the gap between the sampler's and the trainer's log-probs of the same tokens
kept growing until the run fell apart. The trainers log ``mismatch/kl`` every step
(posttrain.objectives.losses.correction); a steady small value is bfloat16 rounding and is fine.
"""

from __future__ import annotations

import statistics

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import mean, series


def rollout_mismatch(c: Context) -> Event | None:
    """The median ``mismatch/kl`` of the recent steps is mismatch_growth times that of the first
    steps, and above mismatch_floor (a window of history needed; medians, so one odd step does
    not fire it)."""
    k = c.th.recent
    recent = series(c.history, "mismatch/kl", c.th.window)
    if len(recent) < c.th.window:
        return None
    start = statistics.median(series(c.history, "mismatch/kl", first=k))
    now = statistics.median(recent[-k:])
    if now <= c.th.mismatch_floor or now < c.th.mismatch_growth * start:
        return None
    ratio_max = series(c.history, "mismatch/ratio_max", k)
    masked = series(c.history, "mismatch/masked_frac", k)
    growth = f"{now / start:.1f}x" if start > 0 else "from 0"
    extra = f"; max ratio {max(ratio_max):.3g}" if ratio_max else ""
    extra += f", {mean(masked):.0%} of tokens masked" if masked and mean(masked) > 0 else ""
    return c.event(
        "rollout_mismatch", "warning",
        f"the sampler-trainer mismatch grew {growth}: mismatch/kl {start:.3g} -> {now:.3g} nats per token{extra}",
        "the sampler's probabilities drift away from the trainer's: sampling from a bfloat16 copy "
        "(--rollout-dtype) whose rounding matters more as the policy moves, or a stale rollout copy "
        "(its weights not synced after the updates), so the update is increasingly off-policy",
        "correct it with --rollout-correction tis (or seq_mask, which drops the sequences that drifted); "
        "remove it with --rollout-dtype float32; lower the learning rate if it grows with the policy's "
        "drift (kl)", start=start, now=now, ratio_max=max(ratio_max) if ratio_max else None,
        masked_frac=mean(masked) if masked else None)
