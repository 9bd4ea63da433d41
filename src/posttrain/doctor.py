"""The training doctor: the doctrine's debugging table and reward-hacking section as rules that
read a run's metrics (and samples), live during training and after it (`posttrain doctor`).

Each rule is a small function ``rule(ctx) -> Event | None`` that says whether its symptom holds at
the latest step, with the evidence. The rules and where they come from (RL_DOCTRINE.md):

    rule                 doctrine                                   reads
    reward_plateau       Debugging: "Reward not improving"          reward/mean (DPO: rewards/margin), reward/std,
                         (LR too low, bad reward fn)                frac_zero_std, reward/none, samples
    reward_none          Debugging: "bad reward fn"                 samples' rewards, reward/mean, reward/none
    reward_crash         Debugging: "Reward spikes then crashes"    reward/mean (DPO: rewards/margin)
    kl_above_target      Debugging: "KL exploding" (weak penalty)   kl
    kl_exploding         Debugging: "KL exploding"                  kl
    length_hacking       Reward Hacking: "Length hacking"           reward/mean vs len/mean over a window
    length_clipped       Reward Hacking: "Length hacking"           len/clipped_frac
    format_hacking       Reward Hacking: "Format hacking"           samples: stock phrases, repeated closers
    entropy_collapse     Training Tips: "Monitor reward vs KL"      entropy
    clip_frac_high       PPO objective: clip ratio 0.2              clip_frac
    nonfinite            Training Tips: "RL can be unstable"        nonfinite_steps, loss, grad_norm
    judge_failures       RLAIF: "Strong AI labeler"                 judge/failure_rate, judge/failures

`Doctor.check(history, samples)` returns only NEW events: a rule that keeps firing is reported once,
and again only after it has cleared (quiet for a window of steps, so a metric hovering at a threshold
is not reported over and over; a non-finite step clears at once). `Doctor.watch(run_dir, history)`
does that every ``every`` steps, reads new samples from ``samples.jsonl`` itself, appends events to
``doctor.jsonl`` and prints them. A trainer needs three lines (on the main process only: they write files):

    doctor = Doctor()                                   # before the loop (thresholds as keywords)
    doctor.watch(run.run_dir, run.tracker.history)      # after each tracker.log(...): checks every 10 steps
    doctor.finish(run.run_dir, run.tracker.history)     # at the end: a last check, then report.html

`diagnose(history, samples)` replays a finished run and returns every event with its step.
Judge health is read from ``judge/failure_rate`` (and ``judge/<name>/failure_rate``), the judge's
own recent-window rate, else from the cumulative ``judge/failures`` / ``judge/requests`` counters
(posttrain.rewards.judge).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Event:
    step: int
    rule: str
    severity: str
    """'error' (stop and fix), 'warning' (likely a problem), 'info'."""
    symptom: str
    cause: str
    fix: str
    evidence: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"[step {self.step}] {self.severity} {self.rule}: {self.symptom}. Likely cause: {self.cause}. Fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class Thresholds:
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


STOCK_PHRASES = (
    "i hope this helps", "hope this helps", "let me know if you have any", "feel free to ask",
    "great question", "i'm glad you asked", "happy to help", "i hope that helps", "as an ai",
    "i'm here to help", "thank you for your question", "is there anything else",
)


# -- reading metric streams ---------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    return None


def series(history: Sequence[dict], key: str, last: int | None = None, first: int | None = None) -> list[float]:
    """Finite values of ``key`` over the history: all, the ``last`` n or the ``first`` n that have it
    (scanning only as far as needed, so a check stays cheap on long runs)."""
    out: list[float] = []
    rows = reversed(history) if last else history
    for h in rows:
        v = _num(h.get(key))
        if v is not None and math.isfinite(v):
            out.append(v)
            if len(out) == (last or first):
                break
    return out[::-1] if last else out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _corr(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = min(len(xs), len(ys))
    xs, ys = xs[-n:], ys[-n:]
    sx, sy = _std(xs), _std(ys)
    if n < 3 or sx == 0 or sy == 0:
        return 0.0
    mx, my = _mean(xs), _mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / ((n - 1) * sx * sy)


def _slope(ys: Sequence[float], with_se: bool = False):
    """Least-squares slope per step (and its standard error)."""
    n = len(ys)
    mx, my = (n - 1) / 2, _mean(ys)
    den = sum((i - mx) ** 2 for i in range(n))
    b = sum((i - mx) * (y - my) for i, y in enumerate(ys)) / den if den else 0.0
    if not with_se:
        return b
    resid = sum((y - my - b * (i - mx)) ** 2 for i, y in enumerate(ys))
    return b, math.sqrt(resid / max(1, n - 2) / den) if den else 0.0


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def _primary(history: Sequence[dict]) -> str:
    """The reward series to watch: reward/mean (GRPO/PPO) or rewards/margin (DPO)."""
    for key in ("reward/mean", "rewards/margin", "rewards/accuracy"):
        if any(key in h for h in history[-5:]):
            return key
    return "reward/mean"


@dataclasses.dataclass
class Context:
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
        return [None if _num(r) is None or not math.isfinite(_num(r)) else _num(r)
                for s in self.recent_samples(first_step) for r in s.get("rewards", [])]


# -- rules --------------------------------------------------------------------------------------------


def reward_plateau(c: Context) -> Event | None:
    key, w = _primary(c.history), c.th.plateau_window
    r = series(c.history, key, w)
    if len(r) < w:
        return None
    slope, se = _slope(r, with_se=True)
    gain, gain_se = slope * (w - 1), se * (w - 1)  # least-squares trend over the window, and its error
    spread = _mean(series(c.history, "reward/std", w)) if key == "reward/mean" else float("nan")
    scale = spread if spread == spread and spread > 1e-9 else _std(r)
    zero_std = _mean(series(c.history, "frac_zero_std", w))
    need = c.th.plateau_min_gain * (2 if "reward_plateau" in c.active else 1)  # hysteresis
    if scale > 1e-9 and gain + gain_se >= need * scale:  # fire only when confidently below the need
        return None
    nones = [v is None for v in c.sample_rewards(c.step - w)]
    none_frac = sum(nones) / len(nones) if nones else float("nan")
    causes = []
    if zero_std == zero_std and zero_std > 0.5:
        causes.append(f"{zero_std:.0%} of groups have zero reward variance (every completion scored the same), "
                      "so their advantages are 0: prompts too easy or too hard for the model")
    if none_frac == none_frac and none_frac > 0.1:
        causes.append(f"the reward returned None for {none_frac:.0%} of samples (missing answer/tests columns or "
                      "unparseable completions)")
    if not causes:
        causes.append("learning rate too low, or a reward function that does not measure progress")
    return c.event("reward_plateau", "warning", f"{key} has not improved over {w} steps (gain {gain:+.3g})",
                   "; ".join(causes),
                   "increase the learning rate (doctrine: 'Increase LR, check reward'); check the reward with "
                   "`posttrain score` on a few completions; drop prompts whose groups all score the same "
                   "(--dynamic-sampling)", gain=gain, scale=scale, frac_zero_std=zero_std, none_frac=none_frac)


def reward_none(c: Context) -> Event | None:
    k = c.th.window
    rewards = c.sample_rewards(c.step - k)
    if rewards:
        frac = sum(r is None for r in rewards) / len(rewards)
    else:
        recent = c.history[-c.th.recent:]
        if len(recent) < c.th.recent or any("reward/mean" in h for h in recent):
            return None
        frac = 1.0 if all((_num(h.get("reward/none")) or 0) > 0 for h in recent) else 0.0
    if frac <= c.th.none_frac:
        return None
    return c.event("reward_none", "warning", f"the reward could not judge {frac:.0%} of recent samples (None)",
                   "the data lacks the columns the reward needs (math: answer; code: tests), or completions "
                   "never contain a parseable answer", "check the reward on real completions with `posttrain "
                   "score`; add a format reward or an instruction saying where to put the answer", none_frac=frac)


def reward_crash(c: Context) -> Event | None:
    key = _primary(c.history)
    r = series(c.history, key, 4 * c.th.window)
    if len(r) < c.th.window:
        return None
    k = c.th.recent
    s = _smooth(r, k)[k - 1:]  # full windows only: the first values would be raw noise
    r = r[k - 1:]
    peak_i = max(range(len(s)), key=s.__getitem__)
    base = min(s[: peak_i + 1])
    gain, cur = s[peak_i] - base, max(s[-k:])  # the fall must last: the best of the last k smoothed values
    if peak_i >= len(s) - k:
        return None
    spread = _mean(series(c.history, "reward/std", 4 * c.th.window)) if key == "reward/mean" else float("nan")
    scale = spread if spread == spread and spread > 1e-9 else _std(r)
    recent_peak = len(s) - 1 - peak_i <= 2 * c.th.window
    noise = _std([x - y for x, y in zip(r, s)]) / math.sqrt(k)  # of the smoothed series
    drop = s[peak_i] - cur
    if (gain <= max(c.th.crash_min_gain * scale, 4 * noise) or drop < max(c.th.crash_frac * gain, 3 * noise)
            or not recent_peak):
        return None
    steps = [h.get("step") for h in c.history[-8 * c.th.window:] if _num(h.get(key)) is not None
             and math.isfinite(_num(h.get(key)))][-len(r):]
    peak_step = steps[peak_i] if peak_i < len(steps) else None
    return c.event("reward_crash", "error", f"{key} rose to {s[peak_i]:.3g} (step {peak_step}) then fell to {cur:.3g}",
                   "learning rate too high: an update pushed the policy off a cliff",
                   f"reduce the learning rate (doctrine: 'Reduce LR'), e.g. by 3-10x, and resume from the last "
                   f"checkpoint before step {peak_step}; lower max_grad_norm", peak=s[peak_i], peak_step=peak_step,
                   base=base, current=cur)


def kl_above_target(c: Context) -> Event | None:
    kl = series(c.history, "kl", c.th.recent)
    if len(kl) < c.th.recent or _mean(kl) <= c.th.kl_target:
        return None
    return c.event("kl_above_target", "warning", f"KL to the reference is {_mean(kl):.3g} per token, above the "
                   f"target {c.th.kl_target:g}", "the KL penalty is too weak for this learning rate",
                   "increase beta / kl_coef (doctrine: 'Increase beta/kl_coef') or lower the learning rate",
                   kl=_mean(kl), target=c.th.kl_target)


def kl_exploding(c: Context) -> Event | None:
    k, half = c.th.recent, max(2, c.th.window // 2)
    kl = series(c.history, "kl", 2 * half + k)
    if len(kl) < 2 * half + k:
        return None
    then, mid, now = _mean(kl[:k]), _mean(kl[half:half + k]), _mean(kl[-k:])
    accelerating = now - mid >= 2 * max(mid - then, 0.0)  # growing faster and faster, not a steady ramp
    if now <= c.th.kl_floor or now < c.th.kl_explode_factor * max(mid, 1e-9) or not accelerating:
        return None
    return c.event("kl_exploding", "error", f"KL grew {now / max(mid, 1e-9):.1f}x in {half} steps and is "
                   f"accelerating ({then:.3g} -> {mid:.3g} -> {now:.3g})",
                   "weak KL penalty: the policy is running away from the reference",
                   "increase beta / kl_coef (doctrine: 'Increase beta/kl_coef'), lower the learning rate, and "
                   "read recent samples for reward hacking", then=then, mid=mid, now=now)


def length_hacking(c: Context) -> Event | None:
    w = c.th.window
    rows = [h for h in c.history if _num(h.get("reward/mean")) is not None and _num(h.get("len/mean")) is not None][-w:]
    if len(rows) < w:
        return None
    r = [_num(h["reward/mean"]) for h in rows]
    n = [_num(h["len/mean"]) for h in rows]
    third = max(1, w // 3)
    growth = _mean(n[-third:]) / max(_mean(n[:third]), 1e-9) - 1
    corr = _corr(r, n)
    # within recent samples: does each completion's reward follow its length?
    pairs = [(float(v), len(str(t).split())) for smp in c.recent_samples(c.step - w)
             for t, v in zip(smp.get("completions", []), smp.get("rewards", []))
             if _num(v) is not None and math.isfinite(_num(v))]
    sample_corr = _corr([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 20 else 0.0
    by_steps = corr >= c.th.length_corr and growth >= c.th.length_growth
    by_samples = sample_corr >= c.th.sample_length_corr and _slope(r) > 0 and growth > 0
    if not (by_steps or by_samples):
        return None
    return c.event("length_hacking", "warning", f"reward rises with completion length (correlation {corr:.2f} "
                   f"over steps, {sample_corr:.2f} over samples; length {_mean(n[:third]):.0f} -> "
                   f"{_mean(n[-third:]):.0f} tokens)",
                   "reward hacking: the reward pays for longer completions rather than better ones",
                   "review the reward function (doctrine: 'High reward, bad outputs'): add a length penalty "
                   "(--reward 'math,length:0.2'), raise beta, read samples.jsonl", corr=corr, growth=growth,
                   sample_corr=sample_corr)


def length_clipped(c: Context) -> Event | None:
    now = _mean(series(c.history, "len/clipped_frac", c.th.recent))
    start = series(c.history, "len/clipped_frac", first=c.th.recent)
    if len(c.history) < c.th.recent * 2 or len(start) < c.th.recent:
        return None
    start = _mean(start)
    if now < c.th.clipped_frac or (now < start + 0.2 and now < 0.9):
        return None
    return c.event("length_clipped", "warning", f"{now:.0%} of completions hit max_new_tokens (was {start:.0%})",
                   "length hacking, or answers that do not fit: truncated completions lose their final answer",
                   "add a length penalty or raise max_new_tokens; read samples.jsonl for padding and repetition",
                   now=now, start=start)


_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


def _closer(text: str) -> str | None:
    """The normalized last sentence of a completion, when it can be boilerplate (>= 3 words, no digits)."""
    parts = [p.strip() for p in _SENT.split(text.strip()) if p.strip()]
    if not parts:
        return None
    last = re.sub(r"\s+", " ", parts[-1].lower()).strip(" .!?")
    return last if len(last.split()) >= 3 and not re.search(r"\d", last) else None


def _phrase_shares(samples: Iterable[dict]) -> tuple[Counter, int, float]:
    """(count of completions per stock phrase / repeated closer, completions, mean reward)."""
    counts: Counter = Counter()
    n, rewards = 0, []
    for s in samples:
        prompt = str(s.get("prompt", "")).lower()
        for i, text in enumerate(s.get("completions", [])):
            n += 1
            low = str(text).lower()
            found = {p for p in STOCK_PHRASES if p in low and p not in prompt}
            closer = _closer(str(text))
            if closer and closer not in prompt:
                found.add(closer)
            counts.update(p for p in found if not any(p != q and p in q for q in found))  # longest match
            rs = s.get("rewards", [])
            v = _num(rs[i]) if i < len(rs) else None
            if v is not None and math.isfinite(v):
                rewards.append(v)
    return counts, n, _mean(rewards)


def format_hacking(c: Context) -> Event | None:
    if not c.samples:
        return None
    w = c.th.window
    first_step = c.samples[0].get("step", 0)
    early = list(itertools.takewhile(lambda s: s.get("step", 0) < first_step + w, c.samples))
    recent = c.recent_samples(c.step - w)
    if c.step - first_step < 2 * w or not early or not recent:
        return None
    key = ("early phrases", first_step, len(early), id(early[-1]))
    if key not in c.cache:
        c.cache.clear()
        c.cache[key] = _phrase_shares(early)
    e_counts, e_n, e_reward = c.cache[key]
    r_counts, r_n, r_reward = _phrase_shares(recent)
    if not e_n or not r_n or not (r_reward > e_reward):
        return None
    best, best_share, best_rise = None, 0.0, 0.0
    for phrase, count in r_counts.items():
        share = count / r_n
        rise = share - e_counts.get(phrase, 0) / e_n
        if share >= c.th.phrase_frac and rise >= c.th.phrase_rise and share > best_share:
            best, best_share, best_rise = phrase, share, rise
    if best is None:
        return None
    stock = best in STOCK_PHRASES
    return c.event("format_hacking", "warning", f"{best_share:.0%} of recent completions contain "
                   f"{'the stock phrase' if stock else 'the same closing line'} {best!r} (+{best_rise:.0%} since "
                   f"the start), while the reward rose {e_reward:.3g} -> {r_reward:.3g}",
                   "reward hacking: a judge or reward model scores boilerplate (doctrine: 'Adding \"I hope this "
                   "helps!\" boosts score')", "review the reward function or the judge's rubric; penalize the phrase; "
                   "use diverse reward signals and raise beta", phrase=best, share=best_share, rise=best_rise)


def entropy_collapse(c: Context) -> Event | None:
    if len(series(c.history, "entropy", c.th.window)) < c.th.window:
        return None
    start = _mean(series(c.history, "entropy", first=c.th.recent))
    now = _mean(series(c.history, "entropy", c.th.recent))
    if start <= 0.02 or now >= c.th.entropy_frac * start:
        return None
    return c.event("entropy_collapse", "warning", f"entropy fell to {now:.3g} from {start:.3g} nats/token",
                   "the policy became near-deterministic: groups stop differing, so GRPO has no signal left",
                   "lower the learning rate, raise the temperature, add an entropy bonus (--entropy-coef) or use "
                   "clip-higher (--clip-high 0.28)", start=start, now=now)


def clip_frac_high(c: Context) -> Event | None:
    cf = series(c.history, "clip_frac", c.th.window)
    if len(cf) < c.th.window // 2 or _mean(cf) <= c.th.clip_frac or min(cf) <= c.th.clip_frac / 2:
        return None
    return c.event("clip_frac_high", "warning", f"clip fraction {_mean(cf):.0%} over the last {len(cf)} steps",
                   "updates are too large: most tokens' probability ratios leave [1 - eps, 1 + eps]",
                   "lower the learning rate or num_iterations (PPO epochs); the doctrine's clip ratio is 0.2",
                   clip_frac=_mean(cf))


def nonfinite(c: Context) -> Event | None:
    bad = []
    for h in c.history:
        if h.get("step", 0) <= c.since:
            continue
        if (_num(h.get("nonfinite_steps")) or 0) > 0 or any(
                (v := _num(h.get(k))) is not None and not math.isfinite(v) for k in ("loss", "grad_norm", "reward/mean", "kl")):
            bad.append(h.get("step"))
    if not bad:
        return None
    return c.event("nonfinite", "error", f"non-finite loss or gradient at step(s) {bad[:5]}",
                   "numerical instability: learning rate too high, fp16 overflow, or an extreme log-prob ratio",
                   "reduce the learning rate; keep max_grad_norm on; use bf16/fp32 instead of fp16; the step "
                   "was skipped, not trained on", steps=bad[:20])


def judge_failures(c: Context) -> Event | None:
    recent = c.history[-c.th.recent:]
    if not recent:
        return None
    rate_keys = sorted({k for h in recent for k in h if k.startswith("judge/") and k.endswith("failure_rate")})
    rates = {k: _mean(series(recent, k)) for k in rate_keys}
    if not rates:  # cumulative counters: failures / requests over the recent steps
        prev = c.history[-len(recent) - 1] if len(c.history) > len(recent) else {}
        d_fail = (_num(recent[-1].get("judge/failures")) or 0.0) - (_num(prev.get("judge/failures")) or 0.0)
        d_req = (_num(recent[-1].get("judge/requests")) or 0.0) - (_num(prev.get("judge/requests")) or 0.0)
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


POINT_RULES = {"nonfinite"}
"""Rules about single steps: they clear at the first quiet check (each new occurrence is reported)."""

RULES: dict[str, Callable[[Context], Event | None]] = {f.__name__: f for f in (
    reward_plateau, reward_none, reward_crash, kl_above_target, kl_exploding, length_hacking, length_clipped,
    format_hacking, entropy_collapse, clip_frac_high, nonfinite, judge_failures)}


# -- the doctor -----------------------------------------------------------------------------------------


class Doctor:
    """Runs the rules on a growing history and reports each problem once, when it appears."""

    def __init__(self, thresholds: Thresholds | None = None, every: int = 10, rules: Iterable[str] | None = None,
                 echo: bool = True, **overrides: Any):
        self.th = dataclasses.replace(thresholds or Thresholds(), **overrides)
        self.every = max(1, every)
        self.rules = {name: RULES[name] for name in (rules or RULES)}
        self.echo = echo
        self.active: set[str] = set()
        self.events: list[Event] = []
        self._since = -1
        self._samples: list[dict] = []
        self._offset = 0
        self._started = False
        self._cache: dict = {}
        self._quiet_since: dict[str, int] = {}

    def check(self, history: Sequence[dict], samples: Sequence[dict] = ()) -> list[Event]:
        """New events at the latest step of ``history`` (rules that fire now and did not at the last check)."""
        if not history:
            return []
        ctx = Context(history, samples, self.th, self._since, self._cache, frozenset(self.active))
        new = []
        for name, rule in self.rules.items():
            ev = rule(ctx)
            if ev is not None:
                self._quiet_since.pop(name, None)
                if name not in self.active:
                    self.active.add(name)
                    new.append(ev)
            elif name in self.active:  # clears after a window of quiet steps: no flapping near a threshold
                quiet = self._quiet_since.setdefault(name, ctx.step)
                if name in POINT_RULES or ctx.step - quiet >= self.th.window:
                    self.active.discard(name)
                    self._quiet_since.pop(name)
        self._since = ctx.step
        self.events.extend(new)
        return new

    def _read_samples(self, path: Path) -> list[dict]:
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            self._offset += len(complete.encode("utf-8"))
            self._samples.extend(json.loads(line) for line in complete.splitlines() if line.strip())
        if self._samples:  # rules read the first window (format_hacking's baseline) and the last ones
            first, last, w = self._samples[0].get("step", 0), self._samples[-1].get("step", 0), self.th.window
            keep = max(2 * w, self.th.plateau_window)
            self._samples = [s for s in self._samples
                             if s.get("step", 0) < first + w or s.get("step", 0) > last - keep]
        return self._samples

    def watch(self, run_dir: str | Path, history: Sequence[dict], samples: Sequence[dict] | None = None,
              force: bool = False) -> list[Event]:
        """Every ``every`` steps (or with ``force``): check, append new events to
        ``<run_dir>/doctor.jsonl``, print them. Samples are read from ``samples.jsonl`` when not given.
        On the first call of a resumed run, events logged after the current step are dropped and the
        rules' state is rebuilt by replaying the history."""
        if not history:
            return []
        run_dir = Path(run_dir)
        step = int(history[-1].get("step", len(history)))
        if samples is None:
            samples = self._read_samples(run_dir / "samples.jsonl")
        log = run_dir / "doctor.jsonl"
        if not self._started:
            self._started = True
            if log.is_file():
                kept = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
                log.write_text("".join(ln + "\n" for ln in kept))
                for i in range(self.every, len(history), self.every):  # rebuild which rules are active
                    self.check(history[:i], _upto(samples, history[i - 1].get("step", i)))
                self.events.clear()
        if not force and step % self.every:
            return []
        new = self.check(history, samples)
        if new:
            with log.open("a", encoding="utf-8") as f:
                for ev in new:
                    f.write(json.dumps(ev.to_dict()) + "\n")
            if self.echo:
                from rich.console import Console

                console = Console(stderr=True)
                for ev in new:
                    style = {"error": "bold red", "warning": "yellow"}.get(ev.severity, "")
                    console.print(f"doctor: {ev.line()}", style=style, highlight=False)
        return new


    def finish(self, run_dir: str | Path, history: Sequence[dict], report: bool = True) -> Path | None:
        """End of a run: a last check (whatever the step), then ``report.html`` (posttrain.report).
        A failing report only warns: `posttrain report runs/<name>` can write it again."""
        self.watch(run_dir, history, force=True)
        if not report:
            return None
        try:
            from posttrain.report import write_report

            return write_report(run_dir)
        except Exception as e:  # noqa: BLE001 - never lose a finished run to a plotting error
            import warnings

            warnings.warn(f"could not write the report of {run_dir}: {type(e).__name__}: {e}", stacklevel=2)
            return None


def _upto(samples: Sequence[dict], step: int) -> Sequence[dict]:
    steps = [s.get("step", 0) for s in samples]
    return samples[: bisect.bisect_right(steps, step)]


def diagnose(history: Sequence[dict], samples: Sequence[dict] = (), thresholds: Thresholds | None = None,
             every: int | None = None, **overrides: Any) -> list[Event]:
    """Replay a finished run: every event with the step it appeared at (checked every ``every``
    steps; default: each step for runs up to 500 steps, else ~500 checks)."""
    every = every or max(1, len(history) // 500)
    doc = Doctor(thresholds, every=every, echo=False, **overrides)
    samples = sorted(samples, key=lambda s: s.get("step", 0))
    steps = [s.get("step", 0) for s in samples]
    for i in range(1, len(history) + 1):
        if i % every == 0 or i == len(history):
            doc.check(history[:i], samples[: bisect.bisect_right(steps, history[i - 1].get("step", i))])
    return doc.events


def diagnose_run(run_dir: str | Path, **overrides: Any) -> list[Event]:
    from posttrain.tracking import read_jsonl

    run_dir = Path(run_dir)
    return diagnose(read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "samples.jsonl"), **overrides)
