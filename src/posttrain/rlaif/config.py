"""Judge configuration: one YAML file, loaded into :class:`JudgeConfig` with errors naming file:line:field.

A judge YAML file (every field optional except ``model`` for the HTTP backends)::

    backend: openai                 # local | openai | anthropic
    model: gpt-4o-mini              # API model name; for `local`, any spec load_model accepts
    base_url: http://127.0.0.1:8000/v1   # any OpenAI-compatible server (vLLM, Ollama, llama.cpp, TGI)
    api_key_env: OPENAI_API_KEY     # NAME of the environment variable holding the key
    timeout: 60                     # seconds per HTTP request
    max_retries: 4                  # on 429 / 5xx / timeouts / connection errors, exponential backoff + jitter
    concurrency: 8                  # requests in flight at once
    cache: auto                     # auto ($POSTTRAIN_HOME/judge-cache/judge.sqlite) | false | a path
    score_min: 1                    # the rubric's scale, mapped to [0, 1]
    score_max: 10
    position_swap: true             # compare asks in both orders; None when the two disagree
    scoring: auto                   # probability | parse | auto (probability where the backend gives log-probs)
    max_failure_rate: 0.5           # stop a run when more than this share of recent requests failed
    rubric: "Judge how helpful, correct and harmless the response is."
    score_template: "..."           # placeholders: {rubric} {prompt} {response} {min} {max}
    compare_template: "..."         # placeholders: {rubric} {prompt} {a} {b}

API keys are never read from the file: a field ``api_key`` is refused, and only the *name* of the
variable is stored (``api_key_env``), so a config can be written to a run directory safely. When
``api_key_env`` is not given, the SDK's usual variable (``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``) is
used if set, else a placeholder key (local servers such as vLLM or llm-katan need none).

Relative ``cache`` paths, and a ``local`` model given as a relative path that exists, are resolved
against the config file's directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

from posttrain.runtime.config import ConfigError, build, read_yaml

DEFAULT_SYSTEM = "You are an impartial and careful judge of AI assistant responses."

DEFAULT_RUBRIC = "Judge how helpful, correct and harmless the response is for the user's request."

DEFAULT_SCORE_TEMPLATE = """{rubric}

[User request]
{prompt}

[Response]
{response}

Rate the response on a scale of {min} to {max}, where {min} is the worst and {max} is the best. \
Give at most one sentence of reasoning, then end your reply with a final line of the form \
"Rating: N", where N is an integer from {min} to {max}."""

DEFAULT_COMPARE_TEMPLATE = """{rubric}

[User request]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response is better? Do not let the order or the length of the responses influence you. \
Give at most one sentence of reasoning, then end your reply with a final line of the form \
"Winner: A", "Winner: B" or "Winner: tie"."""

SCORE_FIELDS = ("rubric", "prompt", "response", "min", "max")
COMPARE_FIELDS = ("rubric", "prompt", "a", "b")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SDK_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclasses.dataclass
class JudgeConfig:
    """An AI judge: which model answers, how it is asked, and how failures are handled."""

    backend: Literal["local", "openai", "anthropic"] = "openai"
    """Where the judge runs: in-process (`local`), an OpenAI-compatible server, or the Anthropic Messages API."""
    model: Optional[str] = None
    """API model name (openai, anthropic); for `local`, a model spec (default: the embedded model)."""
    base_url: Optional[str] = None
    """Server URL (default: the SDK's: api.openai.com / api.anthropic.com)."""
    api_key_env: Optional[str] = None
    """Name of the environment variable holding the API key (never the key itself)."""
    name: Optional[str] = None
    """The judge's identity in the cache and in messages (default: backend:model)."""
    max_tokens: int = 256
    """Longest judge reply, in tokens."""
    temperature: float = 0.0
    """Judge sampling temperature (0 = greedy, reproducible and cacheable); openai and local backends."""
    timeout: float = 60.0
    """Seconds per HTTP request before it counts as timed out (and is retried)."""
    max_retries: int = 4
    """Retries of a request after a 429, a 5xx, a timeout or a connection error."""
    backoff_base: float = 1.0
    """First retry delay in seconds; doubles at each retry, with jitter (x0.5 to x1)."""
    backoff_max: float = 30.0
    """Cap on one retry delay, in seconds (also caps a server's Retry-After)."""
    concurrency: int = 8
    """HTTP requests in flight at once."""
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra JSON fields sent with every HTTP request (e.g. {temperature: 0} for an Anthropic-compatible
    server: the anthropic SDK has no temperature parameter, so `temperature` only reaches openai backends)."""
    batch_size: int = 16
    """Local backend: judge prompts generated together in one batch."""
    device: str = "auto"
    """Local backend: cpu, cuda or auto."""
    cache: Optional[str] = "auto"
    """On-disk cache of replies: auto ($POSTTRAIN_HOME/judge-cache/judge.sqlite), a path, or false (off)."""
    score_min: float = 1.0
    """Lowest rating of the rubric's scale (maps to reward 0)."""
    score_max: float = 10.0
    """Highest rating of the rubric's scale (maps to reward 1)."""
    position_swap: bool = True
    """compare() asks in both orders and gives no winner when the two answers disagree (position bias)."""
    max_failure_rate: float = 0.5
    """Share of failed requests, over the last failure_window, above which JudgeFailureRate is raised."""
    min_requests: int = 20
    """Requests seen before the failure rate is checked."""
    failure_window: int = 200
    """How many recent requests the failure rate is measured over."""
    system_prompt: str = DEFAULT_SYSTEM
    """System message sent with every judge request (empty = none)."""
    rubric: str = DEFAULT_RUBRIC
    """What to judge; inserted into the templates as {rubric}."""
    score_template: str = DEFAULT_SCORE_TEMPLATE
    """User message for score(): placeholders {rubric} {prompt} {response} {min} {max}."""
    compare_template: str = DEFAULT_COMPARE_TEMPLATE
    """User message for compare(): placeholders {rubric} {prompt} {a} {b}."""
    scoring: Literal["auto", "probability", "parse"] = "auto"
    """How a verdict is read: `probability` = the expected rating under the judge's distribution over
    the rating tokens, and p(A) vs p(B) for a comparison (G-Eval; the local backend, or an
    OpenAI-compatible server that returns logprobs: an error if it returns none); `parse` = parse
    one sampled answer; `auto` = probability where the backend gives log-probs, else parse."""
    top_logprobs: int = 20
    """OpenAI backend, scoring by probability: alternatives returned per token (the OpenAI API allows 0-20)."""
    rating_prefix: str = "Rating:"
    """Local backend, scoring by probability: the start of the verdict line prefilled before the rating."""
    verdict_prefix: str = "Winner:"
    """Local backend, scoring by probability: the start of the verdict line prefilled before A or B."""

    @property
    def identity(self) -> str:
        """The judge's name: `name`, else backend:model."""
        return self.name or f"{self.backend}:{self.model_spec}"

    @property
    def model_spec(self) -> str:
        if self.model:
            return self.model
        if self.backend == "local":
            from posttrain.models import EMBEDDED

            return EMBEDDED
        return ""

    def cache_path(self) -> Optional[Path]:
        """Where the reply cache lives, or None when caching is off."""
        if self.cache is None or str(self.cache).lower() in ("false", "off", "no", "none", ""):
            return None
        if str(self.cache).lower() in ("auto", "true", "on", "yes"):
            from posttrain.models import posttrain_home

            return posttrain_home() / "judge-cache" / "judge.sqlite"
        return Path(self.cache).expanduser()

    def api_key(self) -> str:
        """The API key, read from the environment now (it is never stored on the config).

        A missing variable that the config names explicitly is an error; without `api_key_env`,
        the SDK's usual variable is used when set, else a placeholder (servers without auth)."""
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ConfigError(
                    f"judge {self.identity!r}: the environment variable {self.api_key_env} (named by "
                    f"api_key_env) is not set; export it with the API key")
            return value
        return os.environ.get(_SDK_KEY_ENV.get(self.backend, ""), "") or "none"

    def __repr__(self) -> str:  # short: templates are long
        return (f"JudgeConfig(backend={self.backend!r}, model={self.model_spec!r}, base_url={self.base_url!r}, "
                f"api_key_env={self.api_key_env!r})")


def render(template: str, **values: Any) -> str:
    """Fill `{name}` placeholders with `values`; any other brace (a JSON example) is left as is."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        return str(values[key]) if key in values else m.group(0)

    return _PLACEHOLDER.sub(sub, template)


def number_text(x: float) -> str:
    """`10.0` -> `10`, `2.5` -> `2.5` (how a scale bound reads in a prompt)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _normalise_values(values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    if isinstance(values.get("cache"), bool):
        values["cache"] = "auto" if values["cache"] else None
    return values


def check(cfg: JudgeConfig, source: str = "judge config", lines: dict[str, int] | None = None) -> JudgeConfig:
    """Semantic checks beyond types; errors name source:line: field."""
    lines = lines or {}

    def fail(field: str, problem: str):
        where = f"{source}:{lines[field]}" if field in lines else source
        raise ConfigError(f"{where}: field '{field}': {problem}")

    if cfg.backend in ("openai", "anthropic") and not cfg.model:
        fail("model", f"required for backend {cfg.backend!r} (the API model name, e.g. "
                      f"{'gpt-4o-mini' if cfg.backend == 'openai' else 'claude-sonnet-4-5'})")
    if cfg.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.api_key_env):
        fail("api_key_env", "must be the NAME of an environment variable (letters, digits, _), not a key")
    for field, minimum in (("max_tokens", 1), ("concurrency", 1), ("batch_size", 1), ("min_requests", 1),
                           ("failure_window", 1)):
        if getattr(cfg, field) < minimum:
            fail(field, f"must be >= {minimum}")
    for field in ("timeout", "backoff_max"):
        if getattr(cfg, field) <= 0:
            fail(field, "must be > 0")
    if cfg.max_retries < 0:
        fail("max_retries", "must be >= 0")
    if cfg.backoff_base < 0:
        fail("backoff_base", "must be >= 0")
    if cfg.temperature < 0:
        fail("temperature", "must be >= 0")
    if not 0 < cfg.max_failure_rate <= 1:
        fail("max_failure_rate", "must be in (0, 1]")
    if cfg.score_max <= cfg.score_min:
        fail("score_max", f"must be greater than score_min ({cfg.score_min:g})")
    if not 1 <= cfg.top_logprobs <= 20:
        fail("top_logprobs", "must be between 1 and 20 (the OpenAI API's limit)")
    if cfg.scoring == "probability":
        if cfg.backend == "anthropic":
            fail("scoring", "the Anthropic API returns no token probabilities; use scoring: parse (or auto)")
        if len(range(math.ceil(cfg.score_min), math.floor(cfg.score_max) + 1)) < 2:
            fail("scoring", f"probability scoring weighs the integer ratings of the scale, and "
                            f"[{cfg.score_min:g}, {cfg.score_max:g}] holds fewer than two; use scoring: parse or auto")
    for field in ("rating_prefix", "verdict_prefix"):
        if not getattr(cfg, field).strip():
            fail(field, "must not be empty (the start of the verdict line, e.g. 'Rating:')")
    for field, allowed, needed in (("score_template", SCORE_FIELDS, ("response",)),
                                   ("compare_template", COMPARE_FIELDS, ("a", "b"))):
        text = getattr(cfg, field)
        unknown = sorted({p for p in _PLACEHOLDER.findall(text) if p not in allowed})
        if unknown:
            fail(field, f"unknown placeholder {{{unknown[0]}}}; known: " + " ".join(f"{{{a}}}" for a in allowed))
        missing = [p for p in needed if f"{{{p}}}" not in text]
        if missing:
            fail(field, f"must contain the placeholder {{{missing[0]}}}")
    return cfg


def judge_config(values: dict[str, Any] | None = None, source: str = "judge config",
                 lines: dict[str, int] | None = None, base_dir: Path | None = None) -> JudgeConfig:
    """A checked JudgeConfig from a mapping (YAML values, or spec options)."""
    values = _normalise_values(values or {})
    lines = lines or {}
    if "api_key" in values:
        where = f"{source}:{lines['api_key']}" if "api_key" in lines else source
        raise ConfigError(f"{where}: field 'api_key': keys are never read from config files; put the key in an "
                          "environment variable and name it with api_key_env (e.g. api_key_env: OPENAI_API_KEY)")
    cfg = build(JudgeConfig, values, source, lines)
    if base_dir is not None:
        cache = cfg.cache_path()
        if cache is not None and str(cfg.cache).lower() not in ("auto", "true", "on", "yes") and not cache.is_absolute():
            cfg.cache = str(base_dir / cache)
        if cfg.backend == "local" and cfg.model and not Path(cfg.model).expanduser().is_absolute():
            candidate = base_dir / cfg.model
            if candidate.exists():
                cfg.model = str(candidate)
    return check(cfg, source, lines)


def load_judge_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JudgeConfig:
    """Read a judge YAML file; `overrides` (e.g. options of a reward spec) win over the file."""
    values, lines = read_yaml(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}:1: a judge config must be a mapping of field: value")
    for key in overrides or {}:
        lines.pop(key, None)
    values = {**values, **(overrides or {})}
    return judge_config(values, str(path), lines, Path(path).resolve().parent)
