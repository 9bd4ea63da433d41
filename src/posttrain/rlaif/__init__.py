"""RLAIF: AI judges as reward and as labeler, and the Constitutional AI critique/revise loop.

The doctrine's way to scale feedback (RL_DOCTRINE.md, "RLAIF"): a strong model scores responses
(direct RLAIF, `--reward 'judge(judge.yaml)'`) or labels preference pairs (`posttrain label`), and
the Constitutional AI pattern has a model critique and revise its own answers against written
principles (`posttrain constitution`).

Modules:
    config        JudgeConfig, the judge YAML format, templates and their defaults
    parse         reading a rating or a pairwise verdict out of a judge's reply
    probability   the expected rating / p(A) vs p(B) from the judge's token probabilities (G-Eval)
    backends      local (in-process, batched), openai and anthropic SDKs; retries, backoff, redaction
    cache         SQLite cache of replies keyed by (judge, settings, messages)
    judges        Judge.score / compare (+ batch forms), Preference, counters, JudgeFailureRate
    constitution  principles, critique -> revise, constitutional pairs
    resume        resumable JSONL output of the labeling commands
    katan         start/stop an llm-katan server (local OpenAI/Anthropic-compatible endpoint)
"""

from posttrain.rlaif.backends import (AnthropicBackend, Backend, FunctionBackend, LocalBackend, OpenAIBackend, Outcome,
                                      make_backend, redact)
from posttrain.rlaif.cache import JudgeCache, cache_key
from posttrain.rlaif.config import JudgeConfig, judge_config, load_judge_config
from posttrain.rlaif.constitution import (DEFAULT_PRINCIPLES, ConstitutionConfig, Principle, constitutional_pairs,
                                          critique_and_revise, load_principles)
from posttrain.rlaif.judges import Judge, JudgeError, JudgeFailureRate, Preference
from posttrain.rlaif.parse import Verdict, parse_rating, parse_verdict

__all__ = [
    "AnthropicBackend", "Backend", "FunctionBackend", "ConstitutionConfig", "DEFAULT_PRINCIPLES", "Judge", "JudgeCache", "JudgeConfig",
    "JudgeError", "JudgeFailureRate", "LocalBackend", "OpenAIBackend", "Outcome", "Preference", "Principle",
    "Verdict", "cache_key", "constitutional_pairs", "critique_and_revise", "judge_config", "load_judge_config",
    "load_principles", "make_backend", "parse_rating", "parse_verdict", "redact",
]
