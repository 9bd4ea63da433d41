"""Training health rules: entropy collapse, clip fraction, non-finite steps, judge failures."""

from __future__ import annotations

import math

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import as_float, mean, series


def entropy_collapse(c: Context) -> Event | None:
    """Entropy fell below entropy_frac of its starting value."""
    if len(series(c.history, "entropy", c.th.window)) < c.th.window:
        return None
    start = mean(series(c.history, "entropy", first=c.th.recent))
    now = mean(series(c.history, "entropy", c.th.recent))
    if start <= 0.02 or now >= c.th.entropy_frac * start:
        return None
    return c.event("entropy_collapse", "warning", f"entropy fell to {now:.3g} from {start:.3g} nats/token",
                   "the policy became near-deterministic: groups stop differing, so GRPO has no signal left",
                   "lower the learning rate, raise the temperature, add an entropy bonus (--entropy-coef) or use "
                   "clip-higher (--clip-high 0.28)", start=start, now=now)


def clip_frac_high(c: Context) -> Event | None:
    """The clip fraction stayed above clip_frac over the window (never below half of it)."""
    cf = series(c.history, "clip_frac", c.th.window)
    if len(cf) < c.th.window // 2 or mean(cf) <= c.th.clip_frac or min(cf) <= c.th.clip_frac / 2:
        return None
    return c.event("clip_frac_high", "warning", f"clip fraction {mean(cf):.0%} over the last {len(cf)} steps",
                   "updates are too large: most tokens' probability ratios leave [1 - eps, 1 + eps]",
                   "lower the learning rate or num_iterations (PPO epochs); the doctrine's clip ratio is 0.2",
                   clip_frac=mean(cf))


def nonfinite(c: Context) -> Event | None:
    """A step since the last check was skipped as non-finite, or logged a nan/inf loss, grad norm, reward or KL."""
    bad = []
    for h in c.history:
        if h.get("step", 0) <= c.since:
            continue
        if (as_float(h.get("nonfinite_steps")) or 0) > 0 or any(
                (v := as_float(h.get(k))) is not None and not math.isfinite(v)
                for k in ("loss", "grad_norm", "reward/mean", "kl")):
            bad.append(h.get("step"))
    if not bad:
        return None
    return c.event("nonfinite", "error", f"non-finite loss or gradient at step(s) {bad[:5]}",
                   "numerical instability: learning rate too high, fp16 overflow, or an extreme log-prob ratio",
                   "reduce the learning rate; keep max_grad_norm on; use bf16/fp32 instead of fp16; the step "
                   "was skipped, not trained on", steps=bad[:20])


def judge_failures(c: Context) -> Event | None:
    """More than judge_failure_rate of recent judge calls failed (any judge's rate, or the counters)."""
    recent = c.history[-c.th.recent:]
    if not recent:
        return None
    rate_keys = sorted({k for h in recent for k in h if k.startswith("judge/") and k.endswith("failure_rate")})
    rates = {k: mean(series(recent, k)) for k in rate_keys}
    if not rates:  # cumulative counters: failures / requests over the recent steps
        prev = c.history[-len(recent) - 1] if len(c.history) > len(recent) else {}
        d_fail = (as_float(recent[-1].get("judge/failures")) or 0.0) - (as_float(prev.get("judge/failures")) or 0.0)
        d_req = (as_float(recent[-1].get("judge/requests")) or 0.0) - (as_float(prev.get("judge/requests")) or 0.0)
        if not d_req > 0:
            return None
        rates = {"judge/failures": d_fail / d_req}
    key, rate = max(rates.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else -1)
    if not rate > c.th.judge_failure_rate:
        return None
    return c.event("judge_failures", "warning", f"{rate:.0%} of judge calls failed recently ({key})",
                   "the judge endpoint is down, rate-limited or timing out, or its replies do not parse as a score",
                   "check the judge URL and model with a single request; raise its timeout; fix the scoring "
                   "prompt so the reply ends with the score; failed calls score None and are skipped",
                   rate=rate, metric=key)
