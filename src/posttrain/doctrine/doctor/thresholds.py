"""The rules' thresholds, one field each, with the reasoning for its default."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every threshold the rules use; override by keyword (Doctor(kl_target=0.05)) or --set name=value."""
    window: int = 20
    """Steps most rules look back over."""
    recent: int = 5
    """Steps averaged for "the current value"."""
    plateau_window: int = 40
    """Steps over which the reward must improve."""
    plateau_min_gain: float = 0.1
    """Required gain over the window (least-squares trend x window) in units of the reward's spread
    within a batch (reward/std), or of the series' own std when reward/std is not logged. The rule
    fires when the gain plus its standard error is below it (confidently not improving)."""
    annealed_lr_frac: float = 0.25
    """The plateau rule is silent while the recent learning rate is below this fraction of its peak
    (the tail of a decaying schedule)."""
    crash_min_gain: float = 0.75
    """A rise counts as a spike when it exceeds this many units of the reward's spread."""
    crash_frac: float = 0.5
    """...and it crashed when the reward then lost this fraction of the rise."""
    kl_target: float = 0.1
    """Per-token KL (nats) above which the policy has drifted too far from the reference."""
    kl_explode_factor: float = 2.0
    """KL multiplied by this within half a window, rising faster than in the half-window before..."""
    kl_floor: float = 0.05
    """...and above this value, is exploding (a steady ramp from 0 at the start of training is not)."""
    length_corr: float = 0.7
    """Correlation of reward and mean length over the window above which length may be hacked..."""
    length_growth: float = 0.3
    """...when the mean length also grew by this fraction."""
    sample_length_corr: float = 0.8
    """Or: correlation of reward and length across recent samples above which the reward is mostly
    length (fires when the reward and the length are both rising)."""
    clipped_frac: float = 0.5
    """Share of completions hitting max_new_tokens that is too high (when it has also risen by 0.2,
    or is above 0.9)."""
    phrase_frac: float = 0.25
    """Share of recent completions carrying a stock phrase or repeated closer that is suspicious..."""
    phrase_rise: float = 0.2
    """...when it rose by at least this much since the start, along with the reward."""
    entropy_frac: float = 0.1
    """Entropy below this fraction of its starting value has collapsed."""
    clip_frac: float = 0.3
    """Mean clip fraction over the window above which updates are too large."""
    judge_failure_rate: float = 0.1
    """Share of failed judge calls that is too high."""
    none_frac: float = 0.5
    """Share of samples the reward could not judge (None) that is too high."""
    mismatch_growth: float = 4.0
    """The sampler-trainer mismatch (``mismatch/kl``) is growing when the median of its last
    ``recent`` steps is this many times the median of its first ``recent`` steps. bfloat16 rounding
    gives a mismatch that is roughly constant: on the embedded SmolLM2, bfloat16 sampling measured
    1.5e-3 to 2.1e-3 nats per token over 7 batches of 24 completions (T = 1, same weights), within
    1.5x of each other, so a median of 5 steps moves far less than 4x by noise alone..."""
    mismatch_floor: float = 1e-3
    """...and it is above this many nats per token (k3 estimate of KL(sampler || trainer)). float32
    sampling measures ~1e-11 (rounding), whose relative swings are large: the floor keeps them (and
    any mismatch far below bfloat16's own level) from firing."""
    no_signal_steps: int = 5
    """The no-signal rule reads this many latest steps (and fires from this step on: the Doctor
    checks once at this step as well as every ``every`` steps)."""
    no_signal_frac: float = 0.85
    """Mean share of groups whose rewards are all equal (frac_zero_std) over those steps at or above
    which there is no learning signal. The demo's healthy run (4 groups a step, 14% -> 74%) peaks at 0.8
    over 5 steps, as it starts solving whole groups: it must stay quiet..."""
    no_signal_frac_hard: float = 0.65
    """...or this share, when the mean reward is near 0 as well (a pass rate p leaves (1 - p)^G of the
    groups at 0: at p = 3%, G = 8, 78%). The demo's start has 60% over its first 5 steps, at a mean
    reward of 0.12: above no_signal_reward, so the 0.85 bar applies to it."""
    no_signal_reward: float = 0.1
    """Mean reward at most this (or at least 1 minus this) says the equal rewards are failures
    (successes): the task is too hard (too easy). Rewards scored 0 when wrong, 1 when right. Measured
    (tests/unit/test_doctor_signal.py; 200 synthetic GRPO runs of 4 groups of 8 each): at p = 3% the
    rule fires at step 5 in 191, by step 10 in all; runs learning upward from 12% never fire, from
    10% once, from 8% 6 times. The demo preset on reasoning-gym chain_sum (issue 18's task) logged
    75% of groups flat and a mean reward of 0.053 over its first 5 steps: it fires at step 5 (at 0.05
    it would not have)."""
