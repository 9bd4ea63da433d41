"""The Judge: score one response, or compare two, with any backend; counted, cached, bias-checked.

    judge = Judge.from_config("judge.yaml")
    judge.score("What is 2+2?", "4")                    # -> 0.89 (rating 9 on 1..10), or None
    judge.compare("What is 2+2?", "4", "5")             # -> Preference(winner="a", confidence=1.0, ...)
    judge.score_batch(prompts, responses)               # concurrent (HTTP) or batched (local)
    judge.compare_batch(prompts, responses_a, responses_b)
    judge.metrics()                                     # {"judge/requests": ..., "judge/failures": ...}

A *request* is one prompt sent to the judge model: a score is one request, a compare with
``position_swap`` (the default) two: (a, b) and (b, a). Every request ends in exactly one of
``by_probability`` (read from the judge's token probabilities, see below), ``parsed`` (one sampled
answer parsed), ``unparsable`` (the judge answered, but with no verdict in a recognised form) or
``failures`` (no answer after the retries), so
``requests == by_probability + parsed + unparsable + failures``.
``cache_hits`` counts the requests answered from the cache or by an identical request in the same
batch, ``attempts`` the calls actually made to the backend and ``retries`` the repeated ones, so
``attempts - retries == requests - cache_hits`` (each request sent is tried at least once).

Scoring by probability (``scoring: auto``, the default, where the backend exposes token
probabilities; :mod:`posttrain.rlaif.probability`): a score is the expected rating under the
judge's distribution over the rating tokens, renormalised over the valid ratings (G-Eval), mapped to
[0, 1]; a comparison is p(A) / (p(A) + p(B)) in each order, averaged over the two orders (in the
caller's labels), so position bias cancels instead of voiding the verdict: the winner is the side
above 1/2 (a tie only at exactly 1/2), ``confidence = |2 p_a - 1|``, ``reason="probability"``.
Where the backend gives no usable probabilities for a request (an API without log-probs, or no
rating among the top log-probs) that request's sampled answer is parsed; a parsed verdict counts as
p = 1, 0 or 1/2 (tie) when the other order was read by probability. ``scoring: parse`` always
parses; ``scoring: probability`` refuses a backend or a server that gives no log-probs.

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
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from posttrain.data import as_text
from posttrain.errors import UserError
from posttrain.rlaif.backends import Backend, Messages, Outcome, make_backend, redact
from posttrain.rlaif.cache import JudgeCache, cache_key
from posttrain.rlaif.config import JudgeConfig, judge_config, load_judge_config, number_text, render
from posttrain.rlaif.parse import Verdict, normalise_rating, parse_rating, parse_verdict
from posttrain.rlaif.probability import VERDICT_LABELS, Probe, expected_rating, rating_labels, read_probabilities

log = logging.getLogger("posttrain.rlaif")

DEAD_AFTER = 4
"""Failed requests (after their retries) after which a judge that has never answered is taken as down."""
COUNTERS = ("requests", "by_probability", "parsed", "unparsable", "failures", "cache_hits", "attempts", "retries")


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
    unparsable, failed, probability; `p_a` is the probability that `a` is the better one, averaged
    over the orders, when the verdict was read by probability (else None)."""

    winner: Optional[str]
    confidence: float
    votes: tuple[Optional[str], ...] = ()
    reason: str = ""
    p_a: Optional[float] = None


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
        self._warned_no_logprobs = False
        by_probability = config.scoring != "parse" and self.backend.probabilities
        if config.scoring == "probability" and not self.backend.probabilities:
            raise JudgeError(f"judge {config.identity!r}: scoring: probability, but the {self.backend.name} backend "
                             "gives no token probabilities; use scoring: parse or auto")
        labels = rating_labels(config.score_min, config.score_max)
        self.score_probe: Optional[Probe] = (
            Probe("rating", config.rating_prefix, labels, config.score_min, config.score_max)
            if by_probability and len(labels) >= 2 else None)
        """What score() measures when it reads probabilities (None: it parses sampled answers)."""
        self.compare_probe: Optional[Probe] = (Probe("verdict", config.verdict_prefix, VERDICT_LABELS)
                                               if by_probability else None)
        """What compare() measures when it reads probabilities (None: it parses sampled answers)."""

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

    def ask(self, requests: Sequence[Messages], parse, probe: Optional[Probe] = None,
            read=None) -> list[tuple[Optional[str], Any]]:
        """Send `requests` (cache first, identical requests once), read each answer, count everything,
        check the failure rate. Returns (reply or None, value or None) per request.

        With a `probe`, the backend also measures the label probabilities; `read(probs)` turns them
        into the value (counted ``by_probability``); an answer without usable probabilities is
        parsed with `parse` (``parsed`` or ``unparsable``). The cache keeps a probed answer with its
        probabilities, under a key that includes the probe."""
        t0 = time.perf_counter()
        settings = {**self._settings, "probe": probe.key()} if probe is not None else self._settings
        keys = [cache_key(self.config.identity, settings, m) for m in requests]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        todo: dict[str, Messages] = {}
        for k, m in zip(keys, requests):
            if k not in cached and k not in todo:
                todo[k] = m
        outcomes: dict[str, Outcome] = (dict(zip(todo, self.backend.complete_many(list(todo.values()), probe)))
                                        if todo else {})
        if self.cache is not None:
            self.cache.put_many([(k, _stored(o, probe)) for k, o in outcomes.items() if o.ok], self.config.identity)

        results: list[tuple[Optional[str], Any]] = []
        counts = dict.fromkeys(COUNTERS, 0)
        failed_flags: list[bool] = []
        last_error = None
        seen: set[str] = set()
        for k in keys:
            counts["requests"] += 1
            extra = None
            if k in cached:
                counts["cache_hits"] += 1
                reply, extra = _loaded(cached[k], probe)
            else:
                o = outcomes[k]
                if k in seen:  # an identical request in this batch: answered once
                    counts["cache_hits"] += 1
                else:
                    counts["attempts"] += o.attempts
                    counts["retries"] += max(0, o.attempts - 1)
                seen.add(k)
                reply, extra = o.reply, o.extra
                if not o.ok:
                    last_error = o.error
            if reply is None:
                counts["failures"] += 1
                failed_flags.append(True)
                results.append((None, None))
                continue
            failed_flags.append(False)
            probs = None
            if probe is not None:
                self._check_logprobs(extra)
                probs = read_probabilities(extra, reply, probe)
            if probs:
                counts["by_probability"] += 1
                results.append((reply, read(probs)))
                continue
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

    def _check_logprobs(self, extra: Optional[dict]) -> None:
        """A server that sent no log-probs: an error with scoring: probability, a warning (once) with auto."""
        if extra is None or extra.get("logprobs") is not None or extra.get("tokens") is not None:
            return
        cfg = self.config
        where = f" at {cfg.base_url}" if cfg.base_url else ""
        if cfg.scoring == "probability":
            raise JudgeError(f"judge {cfg.identity!r}: scoring: probability, but the server{where} returned no "
                             "logprobs; use scoring: auto (parse when there are none) or parse")
        if not self._warned_no_logprobs:
            self._warned_no_logprobs = True
            log.warning("judge %s: the server%s returned no logprobs; parsing sampled answers (scoring: auto)",
                        cfg.identity, where)

    def check_failure_rate(self) -> None:
        """Raise JudgeFailureRate when the recent failure rate passes the configured threshold, or
        when a judge that has never answered has failed ``DEAD_AFTER`` requests (each already retried):
        an endpoint that is down or misconfigured stops a run at its first step, not after
        ``min_requests``."""
        cfg = self.config
        with self._lock:
            n = len(self._window)
            failed = sum(self._window)
            answered = self._counts["by_probability"] + self._counts["parsed"] + self._counts["unparsable"]
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
        return self.ask(requests, self._parse_score, self.score_probe, self._read_score)

    def _read_score(self, probs: dict[str, float]) -> float:
        cfg = self.config
        return normalise_rating(expected_rating(probs), cfg.score_min, cfg.score_max)

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
        answers = self.ask(requests, parse_verdict, self.compare_probe, lambda probs: probs["A"])
        per = 2 if swap else 1
        return [self._preference(answers[i * per:(i + 1) * per]) for i in range(len(prompts))]

    def compare(self, prompt: Any, a: Any, b: Any) -> Preference:
        """Which of `a` and `b` answers `prompt` better (see the module docstring on position bias)."""
        return self.compare_batch([prompt], [a], [b])[0]

    @staticmethod
    def _preference(answers: list[tuple[Optional[str], Any]]) -> Preference:
        if any(isinstance(value, float) for _, value in answers):
            return Judge._preference_by_probability(answers)
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

    @staticmethod
    def _preference_by_probability(answers: list[tuple[Optional[str], Any]]) -> Preference:
        """Each order's p(first shown is better) in the caller's labels, averaged; a parsed verdict
        counts as 1, 0 or 1/2; an order with no answer leaves the other alone."""
        share = {"a": 1.0, "b": 0.0, "tie": 0.5}
        p_as, votes = [], []
        for i, (reply, value) in enumerate(answers):
            if isinstance(value, Verdict):
                value = share[value.winner]
            if not isinstance(value, float):
                votes.append(None)
                continue
            p = value if i == 0 else 1.0 - value
            p_as.append(p)
            votes.append("a" if p > 0.5 else "b" if p < 0.5 else "tie")
        p_a = sum(p_as) / len(p_as)
        winner = "a" if p_a > 0.5 else "b" if p_a < 0.5 else None
        return Preference(winner, abs(2 * p_a - 1), tuple(votes), "probability" if winner else "tie", p_a)

    # ------------------------------------------------------------ metrics

    def counts(self) -> dict[str, int]:
        """The raw counters (see the module docstring for how they add up)."""
        with self._lock:
            return dict(self._counts)

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        """Counters as metrics: judge/requests, judge/by_probability, judge/parsed, judge/unparsable, judge/failures,
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


def _stored(outcome: Outcome, probe: Optional[Probe]) -> str:
    """What the cache keeps of an answer: the reply text, or with a probe the reply and what it measured."""
    if probe is None:
        return outcome.reply
    return json.dumps({"reply": outcome.reply, "extra": outcome.extra}, ensure_ascii=False)


def _loaded(value: str, probe: Optional[Probe]) -> tuple[str, Optional[dict]]:
    """(reply, extra) from a cached value written by :func:`_stored`."""
    if probe is None:
        return value, None
    data = json.loads(value)
    return data["reply"], data.get("extra")
