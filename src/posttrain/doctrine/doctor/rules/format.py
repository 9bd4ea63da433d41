"""Format hacking (doctrine, Reward Hacking: "Adding 'I hope this helps!' boosts score"): stock
phrases or one repeated closing line spreading through the completions as the reward rises; and
prompt echo, completions that copy their prompt as the reward rises (an answer extractor that falls
back to the last number scores a copied question: measured on rg:number_sequence, README)."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from typing import Iterable

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import as_float, mean

STOCK_PHRASES = (
    "i hope this helps", "hope this helps", "let me know if you have any", "feel free to ask",
    "great question", "i'm glad you asked", "happy to help", "i hope that helps", "as an ai",
    "i'm here to help", "thank you for your question", "is there anything else",
)


_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


def closing_line(text: str) -> str | None:
    """The normalized last sentence of a completion, when it can be boilerplate (>= 3 words, no digits)."""
    parts = [p.strip() for p in _SENT.split(text.strip()) if p.strip()]
    if not parts:
        return None
    last = re.sub(r"\s+", " ", parts[-1].lower()).strip(" .!?")
    return last if len(last.split()) >= 3 and not re.search(r"\d", last) else None


ECHO_MIN_CHARS = 5


def echoes(prompt: str, completion: str) -> bool:
    """Whether ``completion`` (whitespace normalised, at least 5 characters) is a piece of ``prompt``."""
    copied = " ".join(str(completion).split()).rstrip(" .")
    return len(copied) >= ECHO_MIN_CHARS and copied in " ".join(str(prompt).split())


def _completions(samples: Iterable[dict]) -> Iterable[tuple[str, str, float | None]]:
    """(prompt, completion, finite reward or None) of every completion of the sample records."""
    for s in samples:
        rs = s.get("rewards", [])
        for i, text in enumerate(s.get("completions", [])):
            v = as_float(rs[i]) if i < len(rs) else None
            yield str(s.get("prompt", "")), str(text), v if v is not None and math.isfinite(v) else None


def _echo_share(samples: Iterable[dict]) -> tuple[float, int, float]:
    """(share of completions that echo their prompt, completions, mean reward)."""
    rows = list(_completions(samples))
    hits = sum(echoes(prompt, text) for prompt, text, _ in rows)
    return hits / max(1, len(rows)), len(rows), mean([v for _, _, v in rows if v is not None])


def _windows(c: Context) -> tuple[list[dict], list[dict]] | None:
    """(the first ``window`` steps' sample records, the last ``window`` steps'), once the run has two
    windows of samples; else None."""
    if not c.samples:
        return None
    w = c.th.window
    first_step = c.samples[0].get("step", 0)
    early = list(itertools.takewhile(lambda s: s.get("step", 0) < first_step + w, c.samples))
    recent = c.recent_samples(c.step - w)
    if c.step - first_step < 2 * w or not early or not recent:
        return None
    return early, recent


def phrase_shares(samples: Iterable[dict]) -> tuple[Counter, int, float]:
    """(count of completions per stock phrase / repeated closer, completions, mean reward)."""
    counts: Counter = Counter()
    n, rewards = 0, []
    for prompt, text, v in _completions(samples):
        n += 1
        prompt, low = prompt.lower(), text.lower()
        found = {p for p in STOCK_PHRASES if p in low and p not in prompt}
        closer = closing_line(text)
        if closer and closer not in prompt:
            found.add(closer)
        counts.update(p for p in found if not any(p != q and p in q for q in found))  # longest match
        if v is not None:
            rewards.append(v)
    return counts, n, mean(rewards)


def format_hacking(c: Context) -> Event | None:
    """A stock phrase or one closing line spread through the recent completions while the reward rose."""
    windows = _windows(c)
    if windows is None:
        return None
    early, recent = windows
    key = ("early phrases", early[0].get("step", 0), len(early), id(early[-1]))
    if key not in c.cache:
        c.cache.clear()
        c.cache[key] = phrase_shares(early)
    e_counts, e_n, e_reward = c.cache[key]
    r_counts, r_n, r_reward = phrase_shares(recent)
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


def prompt_echo(c: Context) -> Event | None:
    """The share of recent completions that copy their prompt rose while the reward rose."""
    windows = _windows(c)
    if windows is None:
        return None
    early, recent = windows
    e_share, e_n, e_reward = _echo_share(early)
    r_share, r_n, r_reward = _echo_share(recent)
    if not e_n or not r_n or not r_reward > e_reward:
        return None
    if r_share < c.th.phrase_frac or r_share - e_share < c.th.phrase_rise:
        return None
    return c.event("prompt_echo", "warning", f"{r_share:.0%} of recent completions copy their prompt "
                   f"(+{r_share - e_share:.0%} since the start), while the reward rose {e_reward:.3g} -> {r_reward:.3g}",
                   "reward hacking: the reward scores a copy of the question (an answer extractor that falls back "
                   "to the last number finds the question's last number)", "require the answer's form in the "
                   "reward (a format reward, or an extractor without the fallback); read the samples "
                   "(`posttrain review`, flag 'echo')", share=r_share, rise=r_share - e_share)
