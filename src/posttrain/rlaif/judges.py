"""The Judge: score one response, or compare two, with any backend; counted, cached, bias-checked.

    judge = Judge.from_config("judge.yaml")
    judge.score("What is 2+2?", "4")                    # -> 0.89 (rating 9 on 1..10), or None
    judge.compare("What is 2+2?", "4", "5")             # -> Preference(winner="a", confidence=1.0, ...)
    judge.score_batch(prompts, responses)               # concurrent (HTTP) or batched (local)
    judge.compare_batch(prompts, responses_a, responses_b)
    judge.metrics()                                     # {"judge/requests": ..., "judge/failures": ...}

A *request* is one prompt sent to the judge model: a score is one request, a compare with
``position_swap`` (the default) two: (a, b) and (b, a). Every request ends in exactly one of
``parsed``, ``unparsable`` (the judge answered, but with no verdict in a recognised form) or
``failures`` (no answer after the retries), so ``requests == parsed + unparsable + failures``.
``cache_hits`` counts the requests answered from the cache or by an identical request in the same
batch, ``attempts`` the calls actually made to the backend and ``retries`` the repeated ones, so
``attempts - retries == requests - cache_hits`` (each request sent is tried at least once).

Position bias: LLM judges favour one position. With ``position_swap`` both orders are asked, and a
winner is returned only when both answers agree (confidence 1.0, times the judge's own stated
confidence when it gives one); when they disagree the result is a tie (``winner=None``,
``reason="position_bias"``). Without ``position_swap`` one order is asked.

Failure rate: the share of failed requests over the last ``failure_window`` is checked after each
call once ``min_requests`` have been seen; above ``max_failure_rate`` :class:`JudgeFailureRate` is
raised, which a trainer turns into "checkpoint, then stop with this message". A judge that has never
answered is taken as down after ``DEAD_AFTER`` failed requests, whatever ``min_requests`` says. Until
then a failed request just gives None. A command that ends (``label``, ``pairs``) calls ``check_run_failures`` at the
end, so a judge that failed everything, or more than ``max_failure_rate`` of a short run's
requests, is reported even below ``min_requests``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from posttrain.data import as_text
from posttrain.errors import UserError
from posttrain.rlaif.backends import Backend, Messages, Outcome, make_backend, redact
from posttrain.rlaif.cache import JudgeCache, cache_key
from posttrain.rlaif.config import JudgeConfig, judge_config, load_judge_config, number_text, render
from posttrain.rlaif.parse import normalise_rating, parse_rating, parse_verdict

DEAD_AFTER = 4
"""Failed requests (after their retries) after which a judge that has never answered is taken as down."""
COUNTERS = ("requests", "parsed", "unparsable", "failures", "cache_hits", "attempts", "retries")


class JudgeError(UserError, RuntimeError):
    """A judge could not be set up or used as configured."""


class JudgeFailureRate(JudgeError):
    """Too many judge requests failed. Trainers catch it, save a checkpoint and stop.

    Attributes: `rate` (failed share of the window), `threshold`, `window` (requests measured),
    `last_error` (redacted), `metrics` (the judge's counters when it was raised)."""

    def __init__(self, message: str, rate: float, threshold: float, window: int, last_error: Optional[str],
                 metrics: dict[str, float]):
        super().__init__(message)
        self.rate, self.threshold, self.window = rate, threshold, window
        self.last_error, self.metrics = last_error, metrics


@dataclasses.dataclass(frozen=True)
class Preference:
    """The result of compare(prompt, a, b).

    `winner` is "a", "b", or None (a tie, position-biased answers, or no usable answer);
    `confidence` in [0, 1] (0 when there is no winner); `votes` holds each order's verdict in the
    caller's labels ("a", "b", "tie" or None when that request failed or was unparsable), first
    the (a, b) order, then (b, a); `reason` is one of agree, single, tie, position_bias,
    unparsable, failed."""

    winner: Optional[str]
    confidence: float
    votes: tuple[Optional[str], ...] = ()
    reason: str = ""


def prompt_as_text(prompt: Any) -> str:
    """A dataset prompt as text for a judge: strings as they are; a conversation as
    `role: content` lines (a single user message as its content)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        msgs = [m for m in prompt if isinstance(m, dict)]
        if len(msgs) == 1 and msgs[0].get("role") == "user":
            return str(msgs[0].get("content", ""))
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in msgs)
    if isinstance(prompt, dict):
        return str(prompt.get("content", ""))
    return str(prompt)


def response_as_text(response: Any) -> str:
    """A completion as text (TRL conversational completions joined by their contents)."""
    return as_text(response)


def _local_weights_stamp(config: JudgeConfig) -> Optional[list]:
    """A local judge's model directory (a run directory: its ``final/``, which is what loads) as
    (file, size, mtime) of its weight files; None otherwise."""
    from posttrain.models import local_dir

    if config.backend != "local" or not Path(config.model_spec).is_dir():
        return None
    files = sorted(p for p in local_dir(config.model_spec).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


class Judge:
    """score / compare (and their batch forms) over a backend, with a cache and counters."""

    def __init__(self, config: JudgeConfig, backend: Backend | None = None, cache: JudgeCache | None | bool = True):
        self.config = config
        self.backend = backend if backend is not None else make_backend(config)
        if cache is True:
            path = config.cache_path()
            cache = JudgeCache(path) if path is not None else None
        self.cache: Optional[JudgeCache] = cache if isinstance(cache, JudgeCache) else None
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._seconds = 0.0
        self._window: collections.deque[bool] = collections.deque(maxlen=config.failure_window)
        self.last_error: Optional[str] = None
        # what makes a reply differ besides the messages: two servers serving the same model name,
        # or a local model directory trained again, must not share cached replies
        self._settings = {"backend": config.backend, "model": config.model_spec, "base_url": config.base_url,
                          "weights": _local_weights_stamp(config), "max_tokens": config.max_tokens,
                          "temperature": config.temperature, "extra_body": config.extra_body}

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, path_or_config: str | Path | JudgeConfig | dict, **overrides: Any) -> "Judge":
        """A Judge from a YAML path, a JudgeConfig or a mapping of fields (`overrides` win)."""
        if isinstance(path_or_config, JudgeConfig):
            cfg = dataclasses.replace(path_or_config, **overrides) if overrides else path_or_config
        elif isinstance(path_or_config, dict):
            cfg = judge_config({**path_or_config, **overrides})
        else:
            cfg = load_judge_config(path_or_config, overrides)
        return cls(cfg)

    def close(self) -> None:
        self.backend.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Judge({self.config!r}, cache={self.cache!r})"

    # ------------------------------------------------------------ messages

    def _messages(self, user: str) -> Messages:
        msgs = []
        if self.config.system_prompt.strip():
            msgs.append({"role": "system", "content": self.config.system_prompt})
        msgs.append({"role": "user", "content": user})
        return msgs

    def score_messages(self, prompt: Any, response: Any) -> Messages:
        """The messages score() sends."""
        cfg = self.config
        return self._messages(render(cfg.score_template, rubric=cfg.rubric, prompt=prompt_as_text(prompt),
                                     response=response_as_text(response), min=number_text(cfg.score_min),
                                     max=number_text(cfg.score_max)))

    def compare_messages(self, prompt: Any, a: Any, b: Any) -> Messages:
        """The messages compare() sends for the order (a, b)."""
        cfg = self.config
        return self._messages(render(cfg.compare_template, rubric=cfg.rubric, prompt=prompt_as_text(prompt),
                                     a=response_as_text(a), b=response_as_text(b)))

    # ------------------------------------------------------------ asking

    def ask(self, requests: Sequence[Messages], parse) -> list[tuple[Optional[str], Any]]:
        """Send `requests` (cache first, identical requests once), parse each reply with `parse`,
        count everything, check the failure rate. Returns (reply or None, parsed or None) per request."""
        t0 = time.perf_counter()
        keys = [cache_key(self.config.identity, self._settings, m) for m in requests]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        todo: dict[str, Messages] = {}
        for k, m in zip(keys, requests):
            if k not in cached and k not in todo:
                todo[k] = m
        outcomes: dict[str, Outcome] = dict(zip(todo, self.backend.complete_many(list(todo.values())))) if todo else {}
        if self.cache is not None:
            self.cache.put_many([(k, o.reply) for k, o in outcomes.items() if o.ok], self.config.identity)

        results: list[tuple[Optional[str], Any]] = []
        counts = dict.fromkeys(COUNTERS, 0)
        failed_flags: list[bool] = []
        last_error = None
        seen: set[str] = set()
        for k in keys:
            counts["requests"] += 1
            if k in cached:
                counts["cache_hits"] += 1
                reply = cached[k]
            else:
                o = outcomes[k]
                if k in seen:  # an identical request in this batch: answered once
                    counts["cache_hits"] += 1
                else:
                    counts["attempts"] += o.attempts
                    counts["retries"] += max(0, o.attempts - 1)
                seen.add(k)
                reply = o.reply
                if not o.ok:
                    last_error = o.error
            if reply is None:
                counts["failures"] += 1
                failed_flags.append(True)
                results.append((None, None))
                continue
            failed_flags.append(False)
            parsed = parse(reply)
            counts["parsed" if parsed is not None else "unparsable"] += 1
            results.append((reply, parsed))
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n
            self._window.extend(failed_flags)
            self._seconds += time.perf_counter() - t0
            if last_error is not None:
                self.last_error = last_error
        self.check_failure_rate()
        return results

    def check_failure_rate(self) -> None:
        """Raise JudgeFailureRate when the recent failure rate passes the configured threshold, or
        when a judge that has never answered has failed ``DEAD_AFTER`` requests (each already retried):
        an endpoint that is down or misconfigured stops a run at its first step, not after
        ``min_requests``."""
        cfg = self.config
        with self._lock:
            n = len(self._window)
            failed = sum(self._window)
            answered = self._counts["parsed"] + self._counts["unparsable"]
        if n >= cfg.min_requests and failed / n > cfg.max_failure_rate:
            self._raise_failure_rate(f"failed {failed / n:.0%} of its last {n} requests ({failed} failed", failed, n)
        if not answered and failed >= min(cfg.min_requests, DEAD_AFTER):
            self._raise_failure_rate(f"has not answered once: {failed} of {n} requests failed ({failed / n:.0%}",
                                     failed, n)

    def check_run_failures(self) -> None:
        """For a command that has finished its input (``label``, ``pairs``): raise JudgeFailureRate when
        every request failed, or more than ``max_failure_rate`` of all of them, however few there were
        (``min_requests`` only delays the check while a long run warms up)."""
        c = self.counts()
        failed, n = c["failures"], c["requests"]
        if n and (failed == n or failed / n > self.config.max_failure_rate):
            self._raise_failure_rate(f"failed {failed} of its {n} requests ({failed / n:.0%}", failed, n)

    def _raise_failure_rate(self, what: str, failed: int, n: int) -> None:
        cfg = self.config
        raise JudgeFailureRate(
            f"judge {cfg.identity!r} {what}; threshold {cfg.max_failure_rate:.0%}); last error: "
            f"{(self.describe_error() or 'unknown').rstrip('.')}. Check the judge's base_url, model and API key, or raise "
            f"max_failure_rate in the judge config.",
            failed / n, cfg.max_failure_rate, n, self.describe_error() or None, self.metrics())

    # ------------------------------------------------------------ score

    def _parse_score(self, reply: str) -> Optional[float]:
        cfg = self.config
        rating = parse_rating(reply, cfg.score_min, cfg.score_max)
        return None if rating is None else normalise_rating(rating, cfg.score_min, cfg.score_max)

    def score_batch(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[Optional[float]]:
        """score() for many (prompt, response) pairs at once."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return [value for _, value in self.score_answers(prompts, responses)]

    def score_answers(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[tuple[Optional[str], Optional[float]]]:
        """(reply, score) per pair: reply None when the request failed, score None when it failed or
        the reply held no rating (so a caller can tell a judge outage from an unusable answer)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        requests = [self.score_messages(p, r) for p, r in zip(prompts, responses)]
        return self.ask(requests, self._parse_score)

    def score(self, prompt: Any, response: Any) -> Optional[float]:
        """The judge's rating of `response` to `prompt`, mapped to [0, 1]; None when the judge failed
        or its reply held no rating."""
        return self.score_batch([prompt], [response])[0]

    # ------------------------------------------------------------ compare

    def compare_batch(self, prompts: Sequence[Any], responses_a: Sequence[Any],
                      responses_b: Sequence[Any]) -> list[Preference]:
        """compare() for many triples at once (all orders of all triples in one batch)."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError("compare_batch needs as many prompts as responses_a and responses_b")
        swap = self.config.position_swap
        requests = []
        for p, a, b in zip(prompts, responses_a, responses_b):
            requests.append(self.compare_messages(p, a, b))
            if swap:
                requests.append(self.compare_messages(p, b, a))
        answers = self.ask(requests, parse_verdict)
        per = 2 if swap else 1
        return [self._preference(answers[i * per:(i + 1) * per]) for i in range(len(prompts))]

    def compare(self, prompt: Any, a: Any, b: Any) -> Preference:
        """Which of `a` and `b` answers `prompt` better (see the module docstring on position bias)."""
        return self.compare_batch([prompt], [a], [b])[0]

    @staticmethod
    def _preference(answers: list[tuple[Optional[str], Any]]) -> Preference:
        flip = {"a": "b", "b": "a", "tie": "tie"}
        votes, confs = [], []
        for i, (reply, verdict) in enumerate(answers):
            if verdict is None:
                votes.append(None)
                continue
            votes.append(verdict.winner if i == 0 else flip[verdict.winner])
            confs.append(1.0 if verdict.confidence is None else verdict.confidence)
        votes_t = tuple(votes)
        if any(v is None for v in votes):
            failed = any(reply is None for reply, _ in answers)
            return Preference(None, 0.0, votes_t, "failed" if failed else "unparsable")
        if len(set(votes)) > 1:
            return Preference(None, 0.0, votes_t, "position_bias")
        if votes[0] == "tie":
            return Preference(None, 0.0, votes_t, "tie")
        return Preference(votes[0], sum(confs) / len(confs), votes_t, "agree" if len(votes) > 1 else "single")

    # ------------------------------------------------------------ metrics

    def counts(self) -> dict[str, int]:
        """The raw counters (see the module docstring for how they add up)."""
        with self._lock:
            return dict(self._counts)

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        """Counters as metrics: judge/requests, judge/parsed, judge/unparsable, judge/failures,
        judge/cache_hits, judge/attempts, judge/retries (cumulative since the judge was made),
        judge/failure_rate (over the recent window) and judge/seconds (time spent judging)."""
        with self._lock:
            out = {f"{prefix}{k}": float(v) for k, v in self._counts.items()}
            n = len(self._window)
            out[f"{prefix}failure_rate"] = sum(self._window) / n if n else 0.0
            out[f"{prefix}seconds"] = self._seconds
        return out

    def describe_error(self) -> str:
        return redact(self.last_error or "")
