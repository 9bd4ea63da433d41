"""Episodes: the environment side of multi-turn sampling, for the trainers' collect phase.

``EpisodeRunner.generate_and_score`` is the multi-turn counterpart of
``collect.generate_and_score``: one environment per episode (``envs.get_env``'s factory, behind
the fault guard), K episodes per dataset row, all of a row's episodes reset with the same row and
seed so that they share the first messages and their pre-filled cache. The first messages go
through the chat template with the generation prompt; an environment's tools are shown through
the template's ``tools=`` when it renders them, else as the Hermes / Qwen tools block in the system
prompt (``envs.tool_calls.with_tools_prompt``: SmolLM2's template ignores ``tools=``).

After each turn the turn's text (its ids decoded, special tokens dropped) goes to the environment's
``step``; its observation messages come back as a chat-template delta (``delta_ids``): the ids of
what the template writes after an assistant turn's end-of-turn token for those messages, up to and
including the next generation prompt. The delta is computed on a fixed reference conversation, never
on the episode's own turns, so a template that renders earlier turns differently (one that drops
earlier ``<think>`` blocks) cannot change an episode's tokens. The episode's reward is the sum of
its turn rewards; it goes to the advantage estimators like a single-turn reward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics

import torch

from posttrain.algorithms.collect import ScoredBatch
from posttrain.envs import EnvFactory, GuardCounts, Guarded
from posttrain.envs.tool_calls import template_renders_tools, with_tools_prompt
from posttrain.envs.tools import tool_schema
from posttrain.errors import UserError
from posttrain.sampling.generation import SamplingConfig
from posttrain.sampling.turns import Episodes, TurnLimits, sample_episodes

_SENTINEL = "\u2400posttrain turn\u2400"


class TemplateError(UserError, ValueError):
    """The chat template cannot append messages after an assistant turn as a delta."""


def delta_text(tokenizer, messages: list[dict]) -> str:
    """What the chat template writes after an assistant turn's end-of-turn token for ``messages``,
    with the generation prompt for the next turn (module docstring)."""
    ref = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    base = tokenizer.apply_chat_template(ref, tokenize=False)
    full = tokenizer.apply_chat_template(ref + list(messages), tokenize=False, add_generation_prompt=True)
    end = base.rfind(_SENTINEL) + len(_SENTINEL)
    if end < len(_SENTINEL) or not full.startswith(base[:end]):
        raise TemplateError("the chat template renders an assistant turn differently once messages follow it; "
                            "multi-turn episodes need a template that appends (see README: environments)")
    rest = full[end:]
    eot = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""
    if eot and rest.startswith(eot):
        return rest[len(eot):]  # the sampled turn ends with the end-of-turn token itself
    raise TemplateError(f"the chat template does not end an assistant turn with the EOS token {eot!r}; "
                        "multi-turn episodes need the turn to end where sampling stops")


def delta_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(delta_text(tokenizer, messages), add_special_tokens=False)["input_ids"]


def row_seed(row: dict) -> int:
    """A row's episode seed: its own ``seed`` column, else a stable hash of the row."""
    if isinstance(row.get("seed"), int):
        return int(row["seed"])
    return int.from_bytes(hashlib.sha256(repr(sorted(row.items())).encode()).digest()[:4], "big")


@dataclasses.dataclass
class _Play:
    env: Guarded
    messages: list[dict]
    reward: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    error: bool = False


class EpisodeRunner:
    """Runs ``factory``'s environments for the trainers (module docstring)."""

    def __init__(self, factory: EnvFactory, limits: TurnLimits = TurnLimits(), timeout_s: float | None = 30.0,
                 max_output_chars: int = 8000, reuse_cache: bool = True):
        self.factory, self.limits, self.reuse_cache = factory, limits, reuse_cache
        self.last: Episodes | None = None
        """The last batch's episodes (turn and token counts, tokens pre-filled)."""
        self._plays: list[_Play] = []
        self.timeout_s, self.max_output_chars = timeout_s, max_output_chars
        self.counts = GuardCounts()
        self.schemas = [tool_schema(fn) for fn in factory.tools]

    def first_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        kwargs = {}
        if self.schemas and template_renders_tools(tokenizer):
            kwargs["tools"] = self.schemas
        elif self.schemas:
            messages = with_tools_prompt(messages, self.schemas)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_and_score(self, policy, tokenizer, rows: list[dict], group_size: int, sampling: SamplingConfig,
                           generator: torch.Generator | None = None,
                           prompt_generators: list[torch.Generator] | None = None) -> tuple[ScoredBatch, dict]:
        plays, prompts = [], []
        self.counts = GuardCounts()  # per batch: the step's faults (and a resumed run's are the same)
        for row in rows:
            group = []
            for _ in range(group_size):
                env = Guarded(self.factory(), self.timeout_s, self.max_output_chars, self.counts)
                first = env.reset(row, row_seed(row))
                group.append(_Play(env, list(first.messages), error=first.done))
            plays += group
            # the group's shared first messages (an episode whose reset failed ends after its first turn)
            first_messages = next((p.messages for p in group if not p.error), None) or [{"role": "user", "content": ""}]
            prompts.append(self.first_ids(tokenizer, first_messages))

        def respond(b: int, turn_ids: list[int], cut: bool):
            play = plays[b]
            text = tokenizer.decode(turn_ids, skip_special_tokens=True)
            play.messages.append({"role": "assistant", "content": text})
            if play.error:
                return None
            step = play.env.step(text)
            play.reward += float(step.reward)
            play.info.update(step.info)
            play.error = "env_error" in step.info
            if step.done or not step.messages:
                return None
            play.messages.extend(step.messages)
            return delta_ids(tokenizer, step.messages)

        try:
            ep = self.last = sample_episodes(policy, tokenizer, prompts, group_size, sampling, respond, self.limits,
                                             generator, prompt_generators, self.reuse_cache)
        finally:
            for play in plays:
                play.env.close()
        self._plays = plays
        rewards_B = torch.tensor([p.reward for p in plays], dtype=torch.float32)
        texts = [_conversation(p.messages) for p in plays]
        parts = {"env": [p.reward for p in plays]}
        return ScoredBatch(list(rows), ep.rollouts, texts, rewards_B, parts), self._metrics(ep, plays)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64,
                 examples: int = 2) -> dict:
        """Greedy episodes, one per row: {"accuracy": mean episode reward, "n", "none": 0, "examples",
        "success" where the environment reports it} (``evaluate.greedy_eval``'s shape)."""
        training = bool(getattr(model, "training", False))
        model.eval()
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
        rewards, shown, success = [], [], []
        try:
            for start in range(0, len(rows), batch_size):
                chunk = list(rows[start:start + batch_size])
                batch, _ = self.generate_and_score(model, tokenizer, chunk, 1, cfg)
                rewards += batch.rewards_B.tolist()
                success += [float(p.info["success"]) for p in self._plays if "success" in p.info]
                shown += [{"prompt": json.dumps(r), "completion": t, "reward": float(v)}
                          for r, t, v in zip(chunk, batch.texts, batch.rewards_B.tolist())][:examples - len(shown)]
        finally:
            model.train(training)
        out = {"accuracy": sum(rewards) / len(rewards) if rewards else float("nan"), "n": len(rewards), "none": 0,
               "examples": shown}
        if success:
            out["success"] = sum(success) / len(success)
        return out

    def _metrics(self, ep, plays: list[_Play]) -> dict[str, float]:
        out = {"episode/turns": statistics.mean(ep.turns_B),
               "episode/model_tokens": statistics.mean(ep.model_tokens_B),
               "episode/env_tokens": statistics.mean(ep.env_tokens_B),
               "episode/truncated": statistics.mean(float(t) for t in ep.truncated_B),
               "episode/cut_turns": statistics.mean(ep.cut_turns_B),
               "episode/env_errors": statistics.mean(float(p.error) for p in plays), **self.counts.metrics()}
        for key in ("success", "correct", "tool_calls", "tool_parse_failures", "tool_errors"):
            vals = [float(p.info[key]) for p in plays if isinstance(p.info.get(key), (int, float))]
            if vals:
                out[f"episode/{key}"] = statistics.mean(vals)
        return out


def _conversation(messages: list[dict]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)
