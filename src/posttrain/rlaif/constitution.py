"""Constitutional AI (Bai et al. 2022): generate, critique against written principles, revise.

The doctrine's loop, for a batch of prompts at once::

    response = model(prompt)
    for principle in principles:
        critique = model(critique_template(prompt, response, principle.critique))
        response = model(revision_template(prompt, response, critique, principle.revision))
    pair = {"prompt": prompt, "chosen": response, "rejected": original, "critiques": [...]}

The same model answers, critiques and revises (self-critique), through any `generate(requests,
max_tokens, temperature) -> replies` function: `LocalBackend.generate` for a local model spec. Each
step's critique and revision are kept in the pair for human review. Departures from the paper: the
paper draws one principle at random per revision round; here every principle is applied in order
by default (the doctrine's `constitutional_critique`), and `principles_per_prompt` draws a random
subset per prompt instead. A revision that comes back empty keeps the previous response.

Principles file (YAML), either a list, or a mapping with `principles` and optional templates::

    principles:
      - "Is this response helpful and harmless?"          # a critique request; the revision request is derived
      - name: accuracy
        critique: "Is this factually accurate?"
        revision: "Rewrite the response to correct any factual errors."
    critique_template: "..."    # placeholders {prompt} {response} {critique_request}
    revision_template: "..."    # placeholders {prompt} {response} {critique} {revision_request}

Without a file, the doctrine's three example principles are used (`DEFAULT_PRINCIPLES`; the same set,
as a file to copy, is `posttrain/rlaif/principles.yaml`).
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from posttrain.runtime.config import ConfigError
from posttrain.rlaif.config import render

Generate = Callable[[Sequence[list[dict[str, str]]], int, float], list[str]]


@dataclasses.dataclass(frozen=True)
class Principle:
    """One principle: a critique request and the matching revision request."""

    name: str
    critique: str
    revision: str


def _derive_revision(critique: str) -> str:
    return ("Rewrite the response to address the critique, so that the answer to the question "
            f"\"{critique}\" is what it should be. Keep everything that was already good.")


DEFAULT_PRINCIPLES: tuple[Principle, ...] = (
    Principle("helpful_harmless", "Is this response helpful and harmless?",
              "Rewrite the response so that it is helpful and harmless."),
    Principle("violence", "Does this encourage violence?",
              "Rewrite the response so that it does not encourage violence in any way."),
    Principle("accuracy", "Is this factually accurate?",
              "Rewrite the response so that it is factually accurate, correcting any errors."),
)
"""The doctrine's three example principles (RL_DOCTRINE.md, "Constitutional AI Pattern")."""

DEFAULT_CRITIQUE_TEMPLATE = """Here is a request from a user and the response of an AI assistant.

User request: {prompt}

Assistant response: {response}

Critique request: {critique_request}
Point out, briefly and specifically, what in the response falls short of this. If nothing does, say so."""

DEFAULT_REVISION_TEMPLATE = """Here is a request from a user, the response of an AI assistant, and a critique of that response.

User request: {prompt}

Assistant response: {response}

Critique: {critique}

Revision request: {revision_request}
Write only the revised response, without any preamble."""

_PREAMBLE = re.compile(r"^\s*(?:\*\*)?(?:revised response|revision|revised answer|rewritten response|here is the revised "
                       r"response)(?:\*\*)?\s*[:\-]\s*(?:\*\*)?\s*", re.I)


@dataclasses.dataclass
class ConstitutionConfig:
    """Settings of the critique/revise loop."""

    principles: tuple[Principle, ...] = DEFAULT_PRINCIPLES
    """Principles applied in order (or a random subset per prompt, see principles_per_prompt)."""
    principles_per_prompt: int = 0
    """Critique/revise rounds per prompt, each with a principle drawn at random (0 = every principle in order)."""
    critique_template: str = DEFAULT_CRITIQUE_TEMPLATE
    """User message asking for a critique: {prompt} {response} {critique_request}."""
    revision_template: str = DEFAULT_REVISION_TEMPLATE
    """User message asking for a revision: {prompt} {response} {critique} {revision_request}."""
    max_new_tokens: int = 128
    """Token limit of each response, critique and revision."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    seed: int = 0
    """Seed of the principle draws."""


def load_principles(path: str | Path) -> tuple[tuple[Principle, ...], dict[str, str]]:
    """(principles, template overrides) from a principles YAML file; errors name file:line: field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: principles file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(e, 'problem', e)}") from None
    templates: dict[str, str] = {}
    items_node = node
    if isinstance(data, dict):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
        for key, value in data.items():
            if key in ("critique_template", "revision_template"):
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"{path}:{lines.get(key, 1)}: field '{key}': expected a non-empty string")
                templates[key] = value
            elif key != "principles":
                raise ConfigError(f"{path}:{lines.get(key, 1)}: field '{key}': unknown (expected principles, "
                                  "critique_template, revision_template)")
        if "principles" not in data:
            raise ConfigError(f"{path}:1: field 'principles': missing")
        items_node = next(v for k, v in node.value if k.value == "principles")
        data = data["principles"]
    if not isinstance(data, list) or not data:
        line = (items_node.start_mark.line + 1) if items_node is not None else 1
        raise ConfigError(f"{path}:{line}: field 'principles': expected a non-empty list")
    principles = []
    for i, (item, item_node) in enumerate(zip(data, items_node.value)):
        where = f"{path}:{item_node.start_mark.line + 1}: field 'principles[{i}]'"
        if isinstance(item, str):
            if not item.strip():
                raise ConfigError(f"{where}: empty principle")
            principles.append(Principle(f"principle_{i + 1}", item.strip(), _derive_revision(item.strip())))
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a string or a mapping with critique (and revision, name)")
        unknown = set(item) - {"name", "critique", "revision"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected name, critique, revision)")
        critique = item.get("critique")
        if not isinstance(critique, str) or not critique.strip():
            raise ConfigError(f"{where}.critique: missing or empty")
        revision = item.get("revision") or _derive_revision(critique.strip())
        if not isinstance(revision, str):
            raise ConfigError(f"{where}.revision: expected a string")
        principles.append(Principle(str(item.get("name") or f"principle_{i + 1}"), critique.strip(), revision.strip()))
    for key, needed in (("critique_template", ("response", "critique_request")),
                        ("revision_template", ("response", "critique", "revision_request"))):
        if key in templates:
            missing = [p for p in needed if "{" + p + "}" not in templates[key]]
            if missing:
                raise ConfigError(f"{path}: field '{key}': must contain the placeholder {{{missing[0]}}}")
    return tuple(principles), templates


def _user(prompt: Any) -> str:
    from posttrain.rlaif.judges import prompt_as_text

    return prompt_as_text(prompt)


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, list):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    return [{"role": "user", "content": str(prompt)}]


def clean_revision(text: str) -> str:
    """A revision without a "Revised response:" preamble or surrounding quotes."""
    text = _PREAMBLE.sub("", text.strip()).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def critique_and_revise(generate: Generate, prompts: Sequence[Any], responses: Sequence[str],
                        config: ConstitutionConfig, rng: random.Random | None = None
                        ) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Run the critique -> revise rounds for every prompt at once (one batched call per stage).

    Returns the final responses and, per prompt, the trace: one
    {"principle", "critique_request", "critique", "revision"} per round."""
    rng = rng or random.Random(config.seed)
    n = len(prompts)
    if config.principles_per_prompt > 0:
        plan = [[rng.choice(config.principles) for _ in range(config.principles_per_prompt)] for _ in range(n)]
    else:
        plan = [list(config.principles) for _ in range(n)]
    current = list(responses)
    traces: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for r in range(len(plan[0]) if plan else 0):
        crit_requests = [[{"role": "user", "content": render(
            config.critique_template, prompt=_user(prompts[i]), response=current[i],
            critique_request=plan[i][r].critique)}] for i in range(n)]
        critiques = [c.strip() for c in generate(crit_requests, config.max_new_tokens, config.temperature)]
        rev_requests = [[{"role": "user", "content": render(
            config.revision_template, prompt=_user(prompts[i]), response=current[i], critique=critiques[i],
            revision_request=plan[i][r].revision)}] for i in range(n)]
        revisions = [clean_revision(t) for t in generate(rev_requests, config.max_new_tokens, config.temperature)]
        for i in range(n):
            traces[i].append({"principle": plan[i][r].name, "critique_request": plan[i][r].critique,
                              "critique": critiques[i], "revision": revisions[i]})
            if revisions[i]:
                current[i] = revisions[i]
    return current, traces


def constitutional_pairs(generate: Generate, prompts: Sequence[Any], config: ConstitutionConfig,
                         rng: random.Random | None = None) -> list[tuple[Optional[dict[str, Any]], str]]:
    """Generate, critique, revise; one (pair or None, skip reason) per prompt.

    A pair is {"prompt", "chosen" (the final revision), "rejected" (the original), "critiques"};
    it is skipped (None) when the original is empty or the revision did not change it."""
    originals = [t.strip() for t in generate([_as_messages(p) for p in prompts], config.max_new_tokens,
                                             config.temperature)]
    revised, traces = critique_and_revise(generate, prompts, originals, config, rng)
    out: list[tuple[Optional[dict[str, Any]], str]] = []
    for prompt, original, final, trace in zip(prompts, originals, revised, traces):
        if not original:
            out.append((None, "empty original response"))
        elif not final or final == original:
            out.append((None, "the revisions left the response unchanged"))
        else:
            out.append(({"prompt": prompt, "chosen": final, "rejected": original, "critiques": trace}, ""))
    return out
