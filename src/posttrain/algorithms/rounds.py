"""Rounds: the skeleton shared by rejection-sampling fine-tuning (``rft``) and online DPO
(``online_dpo``). A run is a sequence of rounds, each on data the current policy made:

    groups   = sample(policy, prompts_per_round prompts, group_size each)   # GRPO's sampler, no grad
    rows     = method.build(k, groups)            # RFT: the passing completions; DPO: best vs worst
    write      rounds/round-<k>.jsonl             # atomically: kept for review, read back on resume
    train      steps_per_round optimizer steps (or epochs_per_round passes) on the round's rows

Everything else (the loop, checkpoints, evaluation, the time budget) is ``loop.py``'s. A round is
made inside the loop's ``collect`` when the current one is used up, before any weight changes,
so a Ctrl-C there checkpoints the last step and ``--resume`` redoes it exactly.

The data position is ``RoundStream``, the ``stream`` of ``loop.Trainer``: the prompt stream's
position, the round number, the steps done in the round and the position in the round's own
seeded order. On resume the round's file is read back and encoded again (everything a round needs
is in it, DPO's reference log-probs too), so a run resumed mid-round continues with the same rows
in the same order, and resume equals an uninterrupted run. A round that makes no training data
(no completion passed, no pair) is written and counted, and the next is sampled at once; after
``max_empty_rounds`` such rounds in a row the run stops early, saying why and what to change
(``stopped.json``), with its last step checkpointed, evaluated and saved as ``final/`` (an online
DPO policy whose samples all score the top reward has nothing left to learn from).

Departures: rounds run on one process (several are refused: the round is made by one sampler and
its reference pass is not sharded yet); the run's length is ``max_steps`` (a round's steps are
fixed by ``steps_per_round``, or by ``epochs_per_round`` over what the round kept, known only
once it is made).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Optional

import torch

from posttrain.algorithms import common, inputs, loop, offline
from posttrain.algorithms.collect import collect
from posttrain.algorithms.evaluate import greedy_eval_sharded
from posttrain.algorithms.optim import OptimizerStep, trainable_params
from posttrain.algorithms.run import Phase, Run, RunResult
from posttrain.runtime import distributed
from posttrain.runtime.config import ConfigError, NonNegative, Positive
from posttrain.sampling.rollout_model import rollout_model

ROUNDS_DIR = "rounds"

_NEVER = "never in a trainer of rounds (it samples {} prompts per round, not per step)"


@dataclasses.dataclass
class RoundsConfig(common.RolloutConfig):
    """Fields of the trainers of rounds: how much each round samples and how long it trains."""

    prompts_per_round: Annotated[int, Positive] = 32
    """Prompts drawn from the prompt stream per round; each gets group_size samples from the current policy."""
    steps_per_round: Annotated[int, NonNegative] = 0
    """Optimizer steps on each round's data; 0 = set by epochs_per_round and how much the round kept."""
    epochs_per_round: Annotated[float, Positive] = 1.0
    """With steps_per_round 0: passes over each round's data (its steps: ceil(epochs x rows / batch_size))."""
    batch_size: Annotated[int, Positive] = 8
    """Training rows per optimizer step (cycling through the round's rows in a seeded order)."""
    micro_batch_size: Annotated[int, NonNegative] = 0
    """Rows per forward/backward (gradient accumulation); 0 = the whole step at once. Does not change the result."""
    sample_batch_prompts: Annotated[int, Positive] = 16
    """Prompts sampled together (one generation batch of sample_batch_prompts x group_size sequences)."""
    max_empty_rounds: Annotated[int, Positive] = 3
    """Rounds in a row that may make no training data before the run stops with what to change."""
    chunk_size: Annotated[int, Positive] = 512
    """Trained tokens per output-head chunk (peak extra memory: a few chunk_size x vocab floats)."""

    APPLIES_WHEN: ClassVar[dict] = {
        "prompts_per_step": (_NEVER.format("--prompts-per-round"), lambda c: False),
        "epochs_per_round": ("with --steps-per-round 0", lambda c: c.steps_per_round == 0),
        "policy_loss": ("never in a trainer of rounds (no policy-gradient loss)", lambda c: False),
        "clip_ratio_c": ("never in a trainer of rounds (no policy-gradient loss)", lambda c: False),
        "rollout_correction": ("never in a trainer of rounds (it trains on its rows, not on log-prob ratios)",
                               lambda c: False),
        "rollout_correction_cap": ("never in a trainer of rounds", lambda c: False),
        "rollout_correction_low": ("never in a trainer of rounds", lambda c: False),
        "rollout_correction_high": ("never in a trainer of rounds", lambda c: False),
    }

    def round_steps(self, n_rows: int) -> int:
        """Optimizer steps of a round that kept ``n_rows`` training rows."""
        if self.steps_per_round > 0:
            return self.steps_per_round
        return max(1, math.ceil(self.epochs_per_round * n_rows / self.batch_size))


# --------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class Group:
    """One prompt's samples: its dataset row, the completions and their rewards (None: unjudged)."""

    row: dict
    texts: list[str]
    rewards: list[Optional[float]]


def sample_round(policy, tok, prompts: common.PromptStream, config: RoundsConfig, reward_fn, generator, rollout
                 ) -> tuple[list[Group], float]:
    """``prompts_per_round`` groups from the current policy (``collect.collect``: GRPO's sampler,
    per-prompt generators seeded from ``generator``), in batches of ``sample_batch_prompts``;
    returns them and the seconds spent generating."""
    groups: list[Group] = []
    seconds, left, G = 0.0, config.prompts_per_round, config.group_size
    while left > 0:
        n = min(left, config.sample_batch_prompts)
        batch, metrics = collect(policy, tok, prompts, n, G, config.sampling(), reward_fn, generator,
                                 config.chat_template, rollout=rollout)
        seconds += metrics["time/gen"]
        rewards = [None if v != v else float(v) for v in batch.rewards_B.tolist()]
        groups += [Group(row, batch.texts[p * G:(p + 1) * G], rewards[p * G:(p + 1) * G])
                   for p, row in enumerate(batch.rows)]
        left -= n
    return groups, seconds


def sample_metrics(groups: list[Group]) -> dict[str, float]:
    """The round's reward statistics over its judged samples."""
    judged = [r for g in groups for r in g.rewards if r is not None]
    n = sum(len(g.rewards) for g in groups)
    mean = sum(judged) / len(judged) if judged else float("nan")
    std = math.sqrt(sum((r - mean) ** 2 for r in judged) / len(judged)) if judged else float("nan")
    flat = sum(len({r for r in g.rewards if r is not None}) <= 1 for g in groups)
    return {"reward/mean": mean, "reward/std": std, "round/samples": n, "round/unjudged": n - len(judged),
            "round/frac_all_equal": flat / max(1, len(groups))}


def review(groups: list[Group], n: int, marks: Callable[[int], dict]) -> list[dict]:
    """The first ``n`` groups for samples.jsonl, each with the method's ``marks(p)`` (what it kept)."""
    from posttrain import rewards as rw

    return [{"prompt": rw.as_text(g.row["prompt"]), "completions": g.texts, "rewards": g.rewards, **marks(p)}
            for p, g in enumerate(groups[:n])]


# --------------------------------------------------------------------------------------- the stream


def round_path(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round-{k}.jsonl"


def write_round(run_dir: Path, k: int, rows: list[dict]) -> Path:
    """``rounds/round-<k>.jsonl``, atomically (a kill mid-write leaves the old file or none)."""
    path = round_path(run_dir, k)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def read_round(run_dir: Path, k: int) -> list[dict]:
    path = round_path(run_dir, k)
    if not path.is_file():
        from posttrain.errors import ResumeError

        raise ResumeError(f"--resume {run_dir}: the checkpoint is in round {k} but {path} is missing: the round's "
                          "rows cannot be rebuilt (the policy has moved since); put the file back, or start a new run")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class RoundStream:
    """The data position of a run of rounds (``loop.Trainer.stream``; module docstring). ``encode``
    turns a round's rows (and its file's name, for errors) into (training examples, what the method's
    loss needs besides them)."""

    def __init__(self, run_dir: Path, prompts: common.PromptStream, config: RoundsConfig,
                 encode: Callable[[list[dict], str], tuple[list, Any]]):
        self.run_dir, self.prompts, self.config, self.encode = Path(run_dir), prompts, config, encode
        self.round, self.steps_done, self.steps_total = 0, 0, 0
        self.examples: list = []
        self.context: Any = None
        self.order: Optional[common.PromptStream] = None

    def exhausted(self) -> bool:
        return self.order is None or self.steps_done >= self.steps_total

    def start(self, k: int, rows: list[dict]) -> None:
        """Make round ``k`` current: write its rows, encode them, put its position at 0."""
        write_round(self.run_dir, k, rows)
        self._load(k, rows)

    def _load(self, k: int, rows: list[dict]) -> None:
        self.round, self.steps_done = k, 0
        self.examples, self.context = self.encode(rows, str(round_path(self.run_dir, k)))
        self.steps_total = self.config.round_steps(len(self.examples)) if self.examples else 0
        self.order = common.PromptStream(self.examples, self.config.seed + 7919 * k) if self.examples else None

    def take(self, n: int) -> list:
        self.steps_done += 1
        return self.order.take(n)

    def state(self) -> dict:
        return {"prompts": self.prompts.state(), "round": self.round, "steps_done": self.steps_done,
                "order": self.order.state() if self.order is not None else None}

    def restore(self, state: dict) -> None:
        self.prompts.restore(state["prompts"])
        k = int(state["round"])
        if k == 0:
            self.round, self.steps_done, self.steps_total, self.order = 0, 0, 0, None
            self.examples, self.context = [], None
            return
        self._load(k, read_round(self.run_dir, k))
        self.steps_done = int(state["steps_done"])
        if self.order is not None and state["order"] is not None:
            self.order.restore(state["order"])


# --------------------------------------------------------------------------------------- the trainer


def setup(config: RoundsConfig, lora_rank_for) -> inputs.RolloutSetup:
    """``inputs.rollout_setup`` (rows, reward, model, prompts against the context) with the method's
    LoRA rank, on one process; before the run directory exists, so a bad input leaves nothing behind."""
    if distributed.launched():
        raise ConfigError(f"posttrain train {config.method} runs on one process for now; launch it without "
                          "accelerate/torchrun", ())
    return inputs.rollout_setup(config, lora_rank_for)


@dataclasses.dataclass
class Method:
    """What a trainer of rounds adds to the skeleton."""

    build: Callable[[int, list[Group]], tuple[list[dict], dict, Callable[[int], dict]]]
    """(round number, groups) -> (the round's rows, its metrics, marks(p) for samples.jsonl)."""
    encode: Callable[[list[dict], str], tuple[list, Any]]
    """(a round's rows, its file) -> (training examples, the loss's context); also on resume, from the file."""
    accumulate: Callable[[OptimizerStep, list, Any], tuple[dict, int]]
    """(rule, a step's examples, context) -> (metrics, tokens fed): the backward passes, no update."""
    full_ft_lr: float


def train(config: RoundsConfig, s: inputs.RolloutSetup, run: Run, method: Method) -> RunResult:
    """Run rounds through ``loop.train`` (module docstring); returns the run's result."""
    policy, tok = s.policy, s.tok
    optimizer = common.build_optimizer(policy, config, common.resolve_lr(config, method.full_ft_lr))
    scheduler = common.build_scheduler(optimizer, config)
    stream = RoundStream(run.run_dir, common.PromptStream(s.rows.train, config.seed), config, method.encode)
    generator = torch.Generator().manual_seed(config.seed)
    run.generators["sampling"] = generator
    start, _ = run.restore(policy, optimizer, scheduler, stream)
    rule = OptimizerStep(optimizer, [trainable_params(policy)], config.max_grad_norm, [policy],
                         distributed.data_parallel(policy))
    rollout = rollout_model(policy, config.rollout_dtype)
    eval_tokens = config.completion_budgets()["held"][1]

    def evaluate(step: int):
        if s.rows.held:
            run.log_eval(step, greedy_eval_sharded(policy, tok, s.rows.held, s.eval_reward, eval_tokens,
                                                   config.chat_template))

    def next_round(timer) -> tuple[dict, list]:
        """Sample, build and start rounds until one has training data (``max_empty_rounds``)."""
        for empty in range(config.max_empty_rounds):
            k = stream.round + 1
            t0 = time.perf_counter()
            policy.eval()
            groups, gen_seconds = sample_round(policy, tok, stream.prompts, config, s.reward_fn, generator, rollout)
            rows, metrics, marks = method.build(k, groups)
            stream.start(k, rows)
            timer.add("gen", gen_seconds)
            timer.add("round", time.perf_counter() - t0 - gen_seconds)
            if stream.examples:
                out = {**sample_metrics(groups), **metrics, "round/rows": len(rows),
                       "round/examples": len(stream.examples), "round/steps": stream.steps_total,
                       "round/empty_before": empty}
                return out, review(groups, config.samples_per_step, lambda p: {"round": k, **marks(p)})
            run.tracker.console.print(f"round {k}: no training data ({metrics}); sampling another round")
        stats = sample_metrics(groups)
        raise NoTrainingData(f"{config.max_empty_rounds} rounds in a row made no training data (the last, round "
                             f"{stream.round}: mean reward {stats['reward/mean']:.3g}, "
                             f"{stats['round/frac_all_equal']:.0%} of prompts with all samples scored the same): "
                             + NO_DATA_FIXES.get(config.method, "raise --group-size or --temperature"))

    def collect_step(step: int, timer) -> tuple:
        made, samples = {}, None
        if stream.exhausted():
            try:
                made, samples = next_round(timer)
            except NoTrainingData as e:
                e.step = step
                raise
        with Phase(timer, "update"):
            batch = stream.take(config.batch_size)
            sums, tokens = method.accumulate(rule, batch, stream.context)
        return sums, tokens, made, samples

    def update_step(collected) -> loop.StepResult:
        sums, tokens, made, samples = collected
        metrics = {**sums, **offline.step_optimizer(rule), "tokens": tokens, "round": stream.round,
                   "round/step": stream.steps_done, **made}
        return loop.StepResult(metrics, tokens, samples)

    trainer = loop.Trainer(run, policy, optimizer, scheduler, stream, collect_step, update_step, evaluate)
    try:
        metrics = loop.train(trainer, start)
    except NoTrainingData as e:  # nothing left to learn from: the run ends here, its model saved
        last = e.step - 1
        run.tracker.console.print(f"[yellow]stopped after step {last}:[/yellow] {e}", highlight=False)
        run.tracker.write_json("stopped.json", {"step": last, "reason": str(e)})
        if last > start:
            trainer.checkpoint(last)
        run.final_eval(last, evaluate)
        metrics = run.tracker.history[-1] if run.tracker.history else {}
    return run.finish(policy, tok, metrics)


class NoTrainingData(Exception):
    """``max_empty_rounds`` rounds in a row made no training data: the run stops early (its model is saved)."""

    step = 0


NO_DATA_FIXES = {
    "rft": "lower --reward-threshold, raise --group-size or --temperature, or train with SFT first",
    "online-dpo": "every prompt's samples scored the same: raise --group-size or --temperature, or use a reward "
                  "with more levels (a reward model, a judge scoring by probability)",
}
