"""Reward progress rules (doctrine, Debugging: "Reward not improving", "Reward spikes then
crashes"; a reward that cannot judge most samples)."""

from __future__ import annotations

import math

from posttrain.doctrine.doctor.context import Context, annealed, has_critic, reward_key
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import as_float, mean, moving_mean, series, std, trend


def reward_plateau(c: Context) -> Event | None:
    """The reward (DPO: the margin) has confidently not gained plateau_min_gain spreads over plateau_window steps."""
    key, w = reward_key(c.history), c.th.plateau_window
    r = series(c.history, key, w)
    if len(r) < w or annealed(c.history, c.th.recent, c.th.annealed_lr_frac):
        return None
    slope, se = trend(r, with_se=True)
    gain, gain_se = slope * (w - 1), se * (w - 1)  # least-squares trend over the window, and its error
    spread = mean(series(c.history, "reward/std", w)) if key == "reward/mean" else float("nan")
    scale = spread if spread == spread and spread > 1e-9 else std(r)
    zero_std = mean(series(c.history, "frac_zero_std", w))
    need = c.th.plateau_min_gain * (2 if "reward_plateau" in c.active else 1)  # hysteresis
    if scale > 1e-9 and gain + gain_se >= need * scale:  # fire only when confidently below the need
        return None
    nones = [v is None for v in c.sample_rewards(c.step - w)]
    none_frac = sum(nones) / len(nones) if nones else float("nan")
    if key == "reward/mean":
        cause, fix = _policy_plateau(zero_std if not has_critic(c.history) else float("nan"), none_frac)
    else:
        cause, fix = _preference_plateau()
    return c.event("reward_plateau", "warning", f"{key} has not improved over {w} steps (gain {gain:+.3g})",
                   cause, fix, gain=gain, scale=scale, frac_zero_std=zero_std, none_frac=none_frac)


def _policy_plateau(zero_std: float, none_frac: float) -> tuple[str, str]:
    """(cause, fix) of a sampled reward (GRPO, PPO) that does not improve. ``zero_std`` is nan when
    advantages do not come from the spread within a group (PPO's critic)."""
    causes = []
    if zero_std == zero_std and zero_std > 0.5:
        causes.append(f"{zero_std:.0%} of groups have zero reward variance (every completion scored the same), "
                      "so their advantages are 0: prompts too easy or too hard for the model")
    if none_frac == none_frac and none_frac > 0.1:
        causes.append(f"the reward returned None for {none_frac:.0%} of samples (missing answer/tests columns or "
                      "unparseable completions)")
    if not causes:
        causes.append("learning rate too low, or a reward function that does not measure progress")
    return ("; ".join(causes), "increase the learning rate (doctrine: 'Increase LR, check reward'); check the reward "
            "with `posttrain score` on a few completions; drop prompts whose groups all score the same "
            "(--dynamic-sampling)")


def _preference_plateau() -> tuple[str, str]:
    """(cause, fix) of a preference margin (DPO, reward model) that does not improve: no sampled reward
    and no groups here, so the pairs themselves are the suspects."""
    return ("learning rate too low, or pairs the model cannot tell apart: near-identical, tied or noisy "
            "chosen/rejected labels", "increase the learning rate (doctrine: 'Increase LR, check reward'); read a "
            "few pairs for ties, near-duplicates and flipped labels; keep only pairs with a clear preference "
            "(`posttrain label --min-margin`)")


def reward_none(c: Context) -> Event | None:
    """More than none_frac of recent samples got a None reward (or no step logged a reward at all)."""
    k = c.th.window
    rewards = c.sample_rewards(c.step - k)
    if rewards:
        frac = sum(r is None for r in rewards) / len(rewards)
    else:
        recent = c.history[-c.th.recent:]
        if len(recent) < c.th.recent or any("reward/mean" in h for h in recent):
            return None
        frac = 1.0 if all((as_float(h.get("reward/none")) or 0) > 0 for h in recent) else 0.0
    if frac <= c.th.none_frac:
        return None
    return c.event("reward_none", "warning", f"the reward could not judge {frac:.0%} of recent samples (None)",
                   "the data lacks the columns the reward needs (math: answer; code: tests), or completions "
                   "never contain a parseable answer", "check the reward on real completions with `posttrain "
                   "score`; add a format reward or an instruction saying where to put the answer", none_frac=frac)


def reward_crash(c: Context) -> Event | None:
    """The smoothed reward rose well above its noise, then lost crash_frac of the rise, and stays down."""
    key = reward_key(c.history)
    r = series(c.history, key, 4 * c.th.window)
    if len(r) < c.th.window:
        return None
    k = c.th.recent
    s = moving_mean(r, k)[k - 1:]  # full windows only: the first values would be raw noise
    r = r[k - 1:]
    peak_i = max(range(len(s)), key=s.__getitem__)
    base = min(s[: peak_i + 1])
    gain, cur = s[peak_i] - base, max(s[-k:])  # the fall must last: the best of the last k smoothed values
    if peak_i >= len(s) - k:
        return None
    spread = mean(series(c.history, "reward/std", 4 * c.th.window)) if key == "reward/mean" else float("nan")
    within = spread == spread and spread > 1e-9
    scale = spread if within else std(r)
    recent_peak = len(s) - 1 - peak_i <= 2 * c.th.window
    noise = std([x - y for x, y in zip(r, s)]) / math.sqrt(k)  # of the smoothed series
    # without a within-batch spread (a DPO or reward-model margin) the rise is measured against the noise
    # alone, and the peak is the largest of ~len(s)/k independent noisy values: sqrt(2 ln n) noise units
    # above the level on a flat series, which the drop must exceed as well
    bias = 0.0 if within else math.sqrt(2 * math.log(max(2.0, len(s) / k)))
    drop = s[peak_i] - cur
    if (gain <= max(c.th.crash_min_gain * scale, 4 * noise)
            or drop < max(c.th.crash_frac * gain, (3 + bias) * noise)
            or not recent_peak):
        return None
    steps = [h.get("step") for h in c.history[-8 * c.th.window:] if as_float(h.get(key)) is not None
             and math.isfinite(as_float(h.get(key)))][-len(r):]
    peak_step = steps[peak_i] if peak_i < len(steps) else None
    return c.event("reward_crash", "error", f"{key} rose to {s[peak_i]:.3g} (step {peak_step}) then fell to {cur:.3g}",
                   "learning rate too high: an update pushed the policy off a cliff",
                   f"reduce the learning rate (doctrine: 'Reduce LR'), e.g. by 3-10x, and resume from the last "
                   f"checkpoint before step {peak_step}; lower max_grad_norm", peak=s[peak_i], peak_step=peak_step,
                   base=base, current=cur)
