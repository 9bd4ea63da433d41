"""Judge backends: who answers a list of chat messages, and how failures are retried.

Every backend has ``complete_many(requests, probe=None) -> list[Outcome]``: one Outcome per request
(a list of ``{"role", "content"}`` messages), each either a reply or a failure, never an exception,
so one bad request never takes down a batch. With a ``probe`` (:mod:`posttrain.rlaif.probability`),
a backend that exposes token probabilities (``probabilities = True``) also returns them in
``Outcome.extra``: the local backend the exact log-probability of each label (no generation), the
OpenAI backend the top log-probs of the sampled reply's tokens (``logprobs``/``top_logprobs``; None
when the server sends none). The Anthropic API has no log-probs: it ignores the probe.

- ``LocalBackend``: any model ``load_model`` accepts, in-process, prompts generated in batches with
  ``posttrain.sampling.generation.sample_groups`` (greedy at temperature 0).
- ``OpenAIBackend``: the ``openai`` SDK's Chat Completions against any OpenAI-compatible base URL
  (OpenAI, vLLM, Ollama, llama.cpp server, TGI, llm-katan).
- ``AnthropicBackend``: the ``anthropic`` SDK's Messages API (the system message goes in ``system``).

Reliability of the HTTP backends (the SDKs' own retries are turned off: ours are counted):
- each request has a timeout (``timeout`` seconds, the SDK's httpx timeout);
- a 408/409/425/429, a 5xx, a timeout or a connection error is retried up to ``max_retries`` times,
  after ``min(backoff_max, backoff_base * 2**n)`` seconds times a random factor in [0.5, 1] (jitter,
  so that many clients do not retry in lockstep), or after the server's ``Retry-After`` when longer
  (capped by ``backoff_max``); other errors (400, 401, 403, 404) fail at once;
- at most ``concurrency`` requests are in flight (a thread pool).
So a request takes at most about ``(max_retries + 1) * timeout + max_retries * backoff_max`` seconds.

Secrets: the API key lives only inside the SDK client. Every error message is passed through
:func:`redact` (which knows every key a backend has loaded) before it is stored, logged or raised,
since servers do echo keys back ("invalid API key: got 'sk-...'").
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from posttrain.rlaif.config import JudgeConfig

log = logging.getLogger("posttrain.rlaif")

Messages = list[dict[str, str]]

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()


def remember_secret(value: str) -> None:
    """Register a secret so that :func:`redact` hides it from then on."""
    if value and len(value) >= 4 and value != "none":
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: object) -> str:
    """`text` as a string with every registered secret replaced by `***`."""
    out = str(text)
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for s in secrets:
        out = out.replace(s, "***")
    return out


class _RedactingFilter(logging.Filter):
    """Last line of defence: a posttrain.rlaif log record never carries a registered secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg = redact(record.getMessage())
            record.args = None
        return True


log.addFilter(_RedactingFilter())


@dataclasses.dataclass
class Outcome:
    """The end of one request: `reply` text, or `error` (already redacted); `attempts` calls were made."""

    reply: Optional[str] = None
    error: Optional[str] = None
    attempts: int = 0
    status: Optional[int] = None
    """HTTP status of the last failed attempt, if any."""
    extra: Optional[dict] = None
    """What a probe measured: {"logprobs": [per label]} (local) or {"tokens": [[token, logprob,
    [[alternative, logprob], ...]], ...]} (OpenAI top log-probs); None when nothing was measured."""

    @property
    def ok(self) -> bool:
        return self.reply is not None


class Backend:
    """Base class: subclasses implement `complete_many`."""

    name = "backend"
    probabilities = False
    """Whether a probe gets token probabilities back (see the module docstring)."""

    def __init__(self, config: JudgeConfig):
        self.config = config

    def complete_many(self, requests: Sequence[Messages], probe=None) -> list[Outcome]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ HTTP


def classify(exc: BaseException) -> tuple[bool, Optional[int]]:
    """(retryable?, HTTP status or None) of an SDK exception."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return (status in (408, 409, 425, 429) or status >= 500), status
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"APITimeoutError", "APIConnectionError", "TimeoutException", "TransportError", "TimeoutError",
                "ConnectionError"}:
        return True, None
    return False, None


def _retry_after(exc: BaseException) -> Optional[float]:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def backoff_delay(retry: int, base: float, cap: float, retry_after: Optional[float] = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `retry` (0-based): exponential, capped, jittered."""
    rng = rng or random
    delay = min(cap, base * (2 ** retry)) * rng.uniform(0.5, 1.0)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(cap, retry_after))
    return delay


def _describe(exc: BaseException, status: Optional[int]) -> str:
    text = str(exc).strip() or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    return redact(f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {text}")


class HTTPBackend(Backend):
    """Retries, backoff and the concurrency limit shared by the OpenAI and Anthropic backends."""

    def __init__(self, config: JudgeConfig):
        super().__init__(config)
        key = config.api_key()  # read now, so a missing variable fails at start-up, not mid-run
        remember_secret(key)
        self._client = self._make_client(key)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()
        self._rng = random.Random()

    def _make_client(self, key: str):
        raise NotImplementedError

    def _call(self, messages: Messages, probe=None) -> tuple[str, Optional[dict]]:
        """One HTTP request: (reply, what the probe measured or None); raises the SDK's exceptions."""
        raise NotImplementedError

    def complete(self, messages: Messages, probe=None) -> Outcome:
        """One request with retries: never raises (but KeyboardInterrupt)."""
        cfg = self.config
        attempts = 0
        while True:
            attempts += 1
            try:
                reply, extra = self._call(messages, probe)
                return Outcome(reply=reply, attempts=attempts, extra=extra)
            except Exception as exc:  # noqa: BLE001 - every SDK error becomes an Outcome
                retryable, status = classify(exc)
                if not retryable or attempts > cfg.max_retries:
                    error = _describe(exc, status)
                    log.warning("judge %s: request failed after %d attempt(s): %s", cfg.identity, attempts, error)
                    return Outcome(error=error, attempts=attempts, status=status)
                delay = backoff_delay(attempts - 1, cfg.backoff_base, cfg.backoff_max, _retry_after(exc), self._rng)
                log.debug("judge %s: attempt %d failed (%s); retrying in %.2fs", cfg.identity, attempts,
                          _describe(exc, status), delay)
                time.sleep(delay)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency,
                                                thread_name_prefix=f"judge-{self.name}")
            return self._pool

    def complete_many(self, requests: Sequence[Messages], probe=None) -> list[Outcome]:
        if not requests:
            return []
        if len(requests) == 1 or self.config.concurrency == 1:
            return [self.complete(m, probe) for m in requests]
        return list(self._executor().map(lambda m: self.complete(m, probe), requests))

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        close = getattr(self._client, "close", None)
        if close is not None:
            close()


class OpenAIBackend(HTTPBackend):
    """Chat Completions through the `openai` SDK (any OpenAI-compatible server)."""

    name = "openai"
    probabilities = True
    _logprobs_refused = False  # set when a server answered 400 to logprobs in scoring: auto

    def _make_client(self, key: str):
        import openai

        kwargs = {"api_key": key, "timeout": self.config.timeout, "max_retries": 0}
        if self.config.base_url:
            kwargs["base_url"] = self.config.base_url
        return openai.OpenAI(**kwargs)

    def _call(self, messages: Messages, probe=None) -> tuple[str, Optional[dict]]:
        import openai

        from posttrain.rlaif.probability import tokens_of

        cfg = self.config
        kwargs = dict(model=cfg.model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                      extra_body=cfg.extra_body or None)
        ask = probe is not None and not self._logprobs_refused
        try:
            response = self._client.chat.completions.create(
                **kwargs, **({"logprobs": True, "top_logprobs": cfg.top_logprobs} if ask else {}))
        except openai.BadRequestError as exc:
            if not ask or cfg.scoring != "auto":
                raise
            # scoring: auto on a server that refuses the logprobs parameters: parse from now on
            log.warning("judge %s: the server refused logprobs (%s); parsing sampled answers instead",
                        cfg.identity, _describe(exc, 400))
            self._logprobs_refused, ask = True, False
            response = self._client.chat.completions.create(**kwargs)
        if not response.choices:
            raise ValueError("the response has no choices")
        choice = response.choices[0]
        extra = {"tokens": tokens_of(choice.logprobs)} if ask else None
        return choice.message.content or "", extra


class AnthropicBackend(HTTPBackend):
    """The Messages API through the `anthropic` SDK."""

    name = "anthropic"

    def _make_client(self, key: str):
        import anthropic

        # The SDK sends the key as a bearer token; Anthropic-compatible servers and gateways commonly
        # read the classic x-api-key header, so it is sent as well.
        kwargs = {"api_key": key, "timeout": self.config.timeout, "max_retries": 0,
                  "default_headers": {"x-api-key": key}}
        if self.config.base_url:
            kwargs["base_url"] = self.config.base_url
        return anthropic.Anthropic(**kwargs)

    def _call(self, messages: Messages, probe=None) -> tuple[str, Optional[dict]]:
        cfg = self.config
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        kwargs = {"system": system} if system else {}
        response = self._client.messages.create(model=cfg.model, max_tokens=cfg.max_tokens, messages=turns,
                                                extra_body=cfg.extra_body or None, **kwargs)
        return "".join(getattr(block, "text", "") for block in response.content
                       if getattr(block, "type", "text") == "text"), None


# ------------------------------------------------------------------ local


class LocalBackend(Backend):
    """An in-process model: batched generation, no network. The model loads on first use."""

    name = "local"
    probabilities = True

    def __init__(self, config: JudgeConfig, model=None, tokenizer=None, seed: int = 0):
        super().__init__(config)
        self.model, self.tokenizer = model, tokenizer
        self.seed = seed
        self._lock = threading.Lock()
        self._generator = None
        self._continuing: Optional[list[int]] = None

    def _ensure_model(self) -> None:
        if self.model is None:
            from posttrain.models import load_model

            self.model, self.tokenizer = load_model(self.config.model_spec, device=self.config.device)
            self.model.eval()
        if self._generator is None:
            import torch

            self._generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(self.seed)

    def encode(self, messages: Messages) -> list[int]:
        """Token ids of a conversation, ready for the assistant's reply."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return tok(text)["input_ids"]

    def generate(self, requests: Sequence[Messages], max_tokens: int, temperature: float) -> list[str]:
        """Replies to `requests`, generated `batch_size` at a time (shortest prompts together)."""
        from posttrain.sampling.generation import SamplingConfig, sample_groups

        with self._lock:
            self._ensure_model()
            ids = [self.encode(m) for m in requests]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            out: list[str] = [""] * len(ids)
            cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_tokens)
            size = self.config.batch_size
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                rollouts = sample_groups(self.model, self.tokenizer, [ids[i] for i in chunk], 1, cfg, self._generator)
                for i, text in zip(chunk, rollouts.texts(self.tokenizer)):
                    out[i] = text.strip()
            return out

    def probe(self, requests: Sequence[Messages], probe) -> list[Outcome]:
        """The exact log-probability of each of the probe's labels after the prefilled verdict line
        (no generation); the reply is the verdict line with the most probable label."""
        from posttrain.rlaif.probability import continuing_tokens, label_continuations, label_logprobs

        with self._lock:
            self._ensure_model()
            if self._continuing is None:
                self._continuing = continuing_tokens(self.tokenizer)
            head = self.tokenizer(probe.prefix, add_special_tokens=False)["input_ids"]
            contexts = [self.encode(m) + head for m in requests]
            conts = label_continuations(self.tokenizer, probe.prefix, probe.labels)
            rows = label_logprobs(self.model, contexts, conts, self._continuing, self.config.batch_size)
        out = []
        for lps in rows:
            best = max(range(len(lps)), key=lambda k: lps[k])
            out.append(Outcome(reply=f"{probe.prefix} {probe.labels[best]}", attempts=1, extra={"logprobs": lps}))
        return out

    def complete_many(self, requests: Sequence[Messages], probe=None) -> list[Outcome]:
        if not requests:
            return []
        try:
            if probe is not None:
                return self.probe(requests, probe)
            replies = self.generate(requests, self.config.max_tokens, self.config.temperature)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the batch fails, the run goes on
            error = redact(f"{type(exc).__name__}: {exc}")
            log.warning("judge %s: local generation failed: %s", self.config.identity, error)
            return [Outcome(error=error, attempts=1) for _ in requests]
        return [Outcome(reply=r, attempts=1) for r in replies]


class FunctionBackend(Backend):
    """A Python function as the judge model: `fn(messages) -> reply text` (raise to fail a request).

    For rule-based judges, experiments, and tests of everything above the backend; `calls` counts
    the requests it answered or failed."""

    name = "function"

    def __init__(self, config: JudgeConfig, fn):
        super().__init__(config)
        self.fn = fn
        self.calls = 0
        self._lock = threading.Lock()

    def complete_many(self, requests: Sequence[Messages], probe=None) -> list[Outcome]:
        out = []
        for messages in requests:
            with self._lock:
                self.calls += 1
            try:
                out.append(Outcome(reply=str(self.fn(messages)), attempts=1))
            except Exception as exc:  # noqa: BLE001
                out.append(Outcome(error=redact(f"{type(exc).__name__}: {exc}"), attempts=1))
        return out


def make_backend(config: JudgeConfig) -> Backend:
    """The backend a config names."""
    if config.backend == "local":
        return LocalBackend(config)
    if config.backend == "openai":
        return OpenAIBackend(config)
    if config.backend == "anthropic":
        return AnthropicBackend(config)
    raise ValueError(f"unknown judge backend {config.backend!r}")
