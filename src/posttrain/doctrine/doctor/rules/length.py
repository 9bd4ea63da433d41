"""Length hacking rules (doctrine, Reward Hacking: "Longer responses get higher reward")."""

from __future__ import annotations

import math

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import as_float, mean, pearson, series, trend


def length_hacking(c: Context) -> Event | None:
    """Reward and mean length rise together over the window, or each sample's reward follows its length."""
    w = c.th.window
    rows = [h for h in c.history
            if as_float(h.get("reward/mean")) is not None and as_float(h.get("len/mean")) is not None][-w:]
    if len(rows) < w:
        return None
    r = [as_float(h["reward/mean"]) for h in rows]
    n = [as_float(h["len/mean"]) for h in rows]
    third = max(1, w // 3)
    growth = mean(n[-third:]) / max(mean(n[:third]), 1e-9) - 1
    corr = pearson(r, n)
    # within recent samples: does each completion's reward follow its length?
    pairs = [(float(v), len(str(t).split())) for smp in c.recent_samples(c.step - w)
             for t, v in zip(smp.get("completions", []), smp.get("rewards", []))
             if as_float(v) is not None and math.isfinite(as_float(v))]
    sample_corr = pearson([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 20 else 0.0
    by_steps = corr >= c.th.length_corr and growth >= c.th.length_growth
    by_samples = sample_corr >= c.th.sample_length_corr and trend(r) > 0 and growth > 0
    if not (by_steps or by_samples):
        return None
    return c.event("length_hacking", "warning", f"reward rises with completion length (correlation {corr:.2f} "
                   f"over steps, {sample_corr:.2f} over samples; length {mean(n[:third]):.0f} -> "
                   f"{mean(n[-third:]):.0f} tokens)",
                   "reward hacking: the reward pays for longer completions rather than better ones",
                   "review the reward function (doctrine: 'High reward, bad outputs'): add a length penalty "
                   "(--reward 'math,length:0.2'), raise beta, read samples.jsonl", corr=corr, growth=growth,
                   sample_corr=sample_corr)


def length_clipped(c: Context) -> Event | None:
    """Many completions hit max_new_tokens, more than at the start (or nearly all of them)."""
    now = mean(series(c.history, "len/clipped_frac", c.th.recent))
    start = series(c.history, "len/clipped_frac", first=c.th.recent)
    if len(c.history) < c.th.recent * 2 or len(start) < c.th.recent:
        return None
    start = mean(start)
    if now < c.th.clipped_frac or (now < start + 0.2 and now < 0.9):
        return None
    return c.event("length_clipped", "warning", f"{now:.0%} of completions hit max_new_tokens (was {start:.0%})",
                   "length hacking, or answers that do not fit: truncated completions lose their final answer",
                   "add a length penalty or raise max_new_tokens; read samples.jsonl for padding and repetition",
                   now=now, start=start)
