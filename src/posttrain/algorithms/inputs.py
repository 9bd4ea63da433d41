"""A trainer's inputs, checked before its run directory exists: the rows of ``--data`` or ``--task``
(train and held out, with where each came from), the reward spec, and the prompts against the
model's context; and the set-up GRPO and PPO share (``rollout_setup``). The set-up order and the
prompt-length policy are ``common``'s docstring's.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple, Optional

from posttrain.algorithms.common import RolloutConfig, TrainConfig, load_policy, start
from posttrain.doctrine.select import check_reward_columns
from posttrain.models import rl_lora_rank
from posttrain.runtime import distributed
from posttrain.runtime.config import ConfigError, flag


class Rows(NamedTuple):
    """A trainer's rows: train, held out, the task's reward spec (None for --data), and where each
    part came from, for messages: ``origin[part] = (file or task split, 1-based row numbers)``."""

    train: list[dict]
    held: list[dict]
    reward: Optional[str]
    origin: dict[str, tuple[str, list[int]]]


def rows_of(source: str, train: list[dict] = (), held: list[dict] = (), reward: Optional[str] = None) -> Rows:
    """``Rows`` read whole from one ``source`` (a file, a task's split): each part numbered from 1."""
    train, held = list(train), list(held)
    return Rows(train, held, reward, {"train": (source, list(range(1, len(train) + 1))),
                                      "held": (source, list(range(1, len(held) + 1)))})


def load_rows_for(config: TrainConfig, kind: str) -> Rows:
    """The rows of ``config.data`` or ``config.task`` (the config guarantees exactly one), split
    into train and held-out rows (``eval_fraction`` of --data, the task's test split)."""
    from posttrain.data import load_rows

    if config.task is not None:
        from posttrain.data.tasks import get_task, task_info

        info = task_info(config.task)
        train = get_task(config.task, "train", n=config.task_size, seed=config.seed) if "train" in info.splits else []
        test = get_task(config.task, "test", n=config.eval_size, seed=config.seed)
        split = "train" if train else "test"
        origin = {"train": (f"task {config.task} ({split} split)", list(range(1, len(train or test) + 1))),
                  "held": (f"task {config.task} (test split)", list(range(1, len(test) + 1)))}
        return Rows(train or test, test, info.reward, origin)
    from posttrain.rewards import row_checks

    rows = load_rows(config.data, kind, checks=row_checks(getattr(config, "reward", None)) + config.row_checks())
    held: set[int] = set()
    n_eval = int(round(len(rows) * config.eval_fraction))
    if n_eval:
        rng = random.Random(config.seed)
        order = list(range(len(rows)))
        rng.shuffle(order)
        held = set(order[:n_eval])
    parts = {"train": [i for i in range(len(rows)) if i not in held], "held": sorted(held)}
    return Rows([rows[i] for i in parts["train"]], [rows[i] for i in parts["held"]], None,
                {k: (str(config.data), [i + 1 for i in v]) for k, v in parts.items()})


def reward_spec(config: "RolloutConfig", task_reward: Optional[str]) -> str:
    """The run's reward spec: ``--reward``, else the task's; none is an error naming the flag."""
    spec = config.reward or task_reward
    if spec is None:
        raise ConfigError(f"field 'reward': --data {config.data} has no reward of its own: pass --reward (e.g. "
                          "math, code, 'math,format:0.2', 'reward_model(runs/rm/final)')", ("reward",))
    return spec


# ------------------------------------------------------------------------------ prompt-length policy

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Where a model's config states its context length, in the order looked up."""
TEMPLATE_SLACK = 16
"""Tokens a tokenizer may add beyond one per UTF-8 byte of the text (BOS/EOS, a SentencePiece prefix)."""


def context_length(model) -> Optional[int]:
    """The model's context length in tokens (None when its config states none)."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in CONTEXT_FIELDS:
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


class RolloutSetup(NamedTuple):
    """What GRPO and PPO set up before their run directory (``rollout_setup``)."""

    rows: Rows
    reward_fn: Any
    eval_reward: Any
    """The evaluation reward: a spec, re-read at each evaluation so that evaluation never shares the
    training reward's state (a judge's counters), or a function built from ``--eval-reward``."""
    policy: Any
    tok: Any


def rollout_setup(config: "RolloutConfig", lora_rank_for=rl_lora_rank) -> RolloutSetup:
    """The set-up of the trainers that sample (GRPO, PPO, distillation, rounds), in the order of
    the module docstring: start, the rows, the reward and evaluation reward (a bad
    ``--eval-reward`` is an error now, not at the first evaluation), the policy (LoRA at
    ``lora_rank_for``'s rank), then the prompts against its context."""
    from posttrain import rewards

    start(config)
    distributed.check_divisible("prompts_per_step", config.prompts_per_step)
    if getattr(config, "env", None) is not None:
        return _env_setup(config, lora_rank_for)
    rows = load_rows_for(config, "prompt")
    spec = reward_spec(config, rows.reward)
    if config.data is not None:  # a column the reward scores against that no row holds: refused now
        check_reward_columns(config.data, rows.train + rows.held, spec)
    reward_fn = rewards.from_spec(spec)
    eval_spec = config.eval_reward or rows.reward or spec
    eval_reward = eval_spec if eval_spec == spec else rewards.from_spec(eval_spec, flag="--eval-reward")
    policy, tok = load_policy(config, lora_rank_for=lora_rank_for)
    check_context(policy, tok, rows, config.completion_budgets(), config.chat_template)
    return RolloutSetup(rows, reward_fn, eval_reward, policy, tok)


def _env_setup(config, lora_rank_for) -> RolloutSetup:
    """``--env``: the environment's rows (train, and its held-out side for evaluation) and its
    episode runner, which stands for the reward (``collect`` and ``evaluate`` play episodes with it)."""
    from posttrain.algorithms.episodes import EpisodeRunner
    from posttrain.envs import get_env
    from posttrain.sampling.turns import TurnLimits

    factory = get_env(config.env)
    rows = rows_of(f"environment {config.env}", factory.rows("train", config.task_size, config.seed),
                   factory.rows("test", config.eval_size, config.seed))
    runner = EpisodeRunner(factory, TurnLimits(config.max_turns, config.max_episode_tokens), config.env_timeout)
    policy, tok = load_policy(config, lora_rank_for=lora_rank_for)
    n_ctx = context_length(policy)
    if n_ctx is not None and config.max_episode_tokens >= n_ctx:  # the first messages need room too
        raise ConfigError(f"field 'max_episode_tokens': --max-episode-tokens {config.max_episode_tokens} fills the "
                          f"model's context of {n_ctx} tokens and leaves no room for the first messages: lower it",
                          ("max_episode_tokens",))
    return RolloutSetup(rows, runner, runner, policy, tok)


def check_context(model, tok, rows: Rows, budgets: dict[str, tuple[str, int]], chat_template: bool) -> None:
    """The prompt-length policy of the trainers that sample (GRPO, PPO; DPO's greedy evaluation):
    a prompt whose tokens plus the completion budget exceed the model's context is an error naming
    its file (or task split) and 1-based row, never truncated silently nor left to allocate a cache
    past the context. ``budgets[part] = (field, tokens)``: the completion limit of the train and
    held-out rows. A completion budget that fills the context on its own is refused first.

    Byte-level BPE and SentencePiece with byte fallback make at most one token per UTF-8 byte, so
    only prompts whose rendered text is long enough to overflow are tokenized."""
    from posttrain.data import DataError, encode_prompt, prompt_text

    n_ctx = context_length(model)
    if n_ctx is None:
        return
    for part, (field, budget) in budgets.items():
        if budget >= n_ctx:
            raise ConfigError(f"field '{field}': {flag(field)} {budget} fills the model's context of {n_ctx} tokens "
                              f"and leaves no room for a prompt: lower {flag(field)}", (field,))
        source, numbers = rows.origin[part]
        for number, row in zip(numbers, getattr(rows, part)):
            try:
                if len(prompt_text(tok, row["prompt"], chat_template).encode()) + TEMPLATE_SLACK + budget <= n_ctx:
                    continue
                n = len(encode_prompt(tok, row["prompt"], chat_template))
            except ValueError as e:  # e.g. a conversational prompt and a tokenizer without a chat template
                raise DataError(source, number, "prompt", str(e), unit="row") from None
            if n + budget > n_ctx:
                fixes = f"shorten the prompt to at most {n_ctx - budget} tokens" + (
                    f" or lower {flag(field)} to at most {n_ctx - n}" if n < n_ctx else "")
                raise DataError(source, number, "prompt", f"the prompt is {n} tokens, and with {field} {budget} "
                                f"that is {n + budget}, over the model's context of {n_ctx} tokens: {fixes}",
                                unit="row")


def check_max_length(model, config) -> None:
    """DPO and the reward model truncate pairs to ``max_length``: it must fit the model's context."""
    n_ctx = context_length(model)
    if n_ctx is not None and config.max_length > n_ctx:
        raise ConfigError(f"field 'max_length': {flag('max_length')} {config.max_length} is over the model's context "
                          f"of {n_ctx} tokens: lower it to at most {n_ctx}", ("max_length",))
