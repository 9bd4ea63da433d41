"""Supervised fine-tuning (SFT) on TRL's SFT formats: ``{"messages"}``, ``{"prompt", "completion"}``,
``{"text"}`` (``sft_data``: tokenization, truncation, packing).

The next-token negative log-likelihood of the trained tokens (the completion, the assistant
turns; every token of ``{"text"}`` rows or with ``--loss-on all``). Each step (the loop,
checkpoints, evaluations and resume are ``loop.py``'s, the same for every trainer):

    batch   = stream.take(batch_size)                        # tokenized examples, seeded order
    logp_N  = token_logprobs(policy, pack(batch))            # trained tokens only, chunked head
    loss    = -logp_N.sum() / trained tokens of the step     # backward per micro-batch
    metrics = rule.step()                                    # reduce, clip, check, AdamW (optim.py)

Choices, and where they depart from TRL's SFTTrainer:
- The loss is the mean over every trained token of the step (all micro-batches and processes):
  each micro-batch's mean is weighted by its share of the step's trained tokens, so accumulation
  and the number of processes do not change it (TRL does the same with ``num_items_in_batch``).
- Padding-free packing is the default (``sft_data``): no token attends across examples, so it
  trains the same loss as padded batches (a test checks), with fewer tokens fed; TRL's
  ``packing=True`` concatenates and cuts examples by default (``bfd`` keeps them whole).
- Log-probs come from the model's trunk and the chunked output head at trained positions only:
  no [B, T, V] logits (TRL materialises them, or uses Liger kernels on GPU).
- Defaults: LoRA at the doctrine's SFT rank (64 up to ~20B parameters, 256 above:
  ``models.sft_lora_rank``); learning rate 2e-5 for full fine-tuning (TRL's SFTConfig) and 10x
  that with LoRA ("LoRA Without Regret"); ``eval_fraction`` 0.05 of the rows held out.
- Evaluation (before, every ``eval_every`` steps, after): the held-out loss and perplexity; and,
  with ``--task``, greedy accuracy on the task's test split with its reward, or, with
  ``--eval-reward``, on the held-out rows' prompts (a prompt-completion row's prompt, a
  conversation before its last assistant turn), scored with the row's extra columns (``answer``).
- Several processes (DDP, or FSDP with ``--fsdp``) each take 1/N of a step's examples and of the
  held-out rows, as in DPO.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Annotated, ClassVar, Literal, Optional

import torch

from posttrain.algorithms import common, inputs, loop, offline
from posttrain.algorithms import sft_data as sd
from posttrain.algorithms.evaluate import greedy_eval_sharded
from posttrain.algorithms.optim import OptimizerStep
from posttrain.algorithms.run import Phase, Run, RunResult, closes_runs_on_failure
from posttrain.data import DataError
from posttrain.models import load_tokenizer, sft_lora_rank
from posttrain.runtime import distributed
from posttrain.runtime.config import Fraction, NonNegative, PerProcess, Positive, Range, refuse

FULL_FT_LR = 2e-5
"""TRL's SFTConfig default; times ``LORA_LR_MULTIPLIER`` (10) with LoRA."""


@dataclasses.dataclass
class SFTConfig(common.TrainConfig):
    """Supervised fine-tuning on TRL's SFT formats: {messages}, {prompt, completion} or {text}."""

    eval_fraction: Annotated[float, Fraction] = 0.05
    """Fraction of the rows held out for the held-out loss (and the greedy evaluation with --eval-reward); 0 = none."""
    loss_on: Literal["completion", "all"] = "completion"
    """completion: train on the completion of {prompt, completion} rows and the assistant turns of {messages}
    ({text} rows: every token); all: every token of every row."""
    batch_size: Annotated[int, Positive, PerProcess] = 8
    """Examples per optimizer step, over all processes (a multiple of their number)."""
    micro_batch_size: Annotated[int, NonNegative] = 0
    """Examples per forward/backward on each process (gradient accumulation); 0 = all of the process's
    examples at once. Does not change the result, only memory and speed."""
    epochs: Annotated[float, NonNegative] = 0.0
    """Passes over the training rows; when > 0 it sets max_steps = ceil(epochs * examples / batch_size)."""
    max_length: Annotated[int, Range(2)] = 1024
    """Longest example in tokens; longer ones keep their first max_length tokens (counted, reported)."""
    packing: bool = True
    """Padding-free batches: examples packed into rows of up to row_tokens without attending across examples;
    --no-packing pads each example to the batch's longest (see README: SFT, for which is faster when)."""
    row_tokens: Annotated[int, NonNegative] = 0
    """Longest packed row; 0 = chosen per micro-batch: the width from its longest example up to one row for all
    whose rows cost least (the linear layers pay per token fed, attention per token per key: sft_data._best_rows),
    never feeding more tokens than padding."""
    chat_template: bool = True
    """Apply the tokenizer's chat template to plain-string prompts ({messages} rows always use it)."""
    eval_reward: Optional[str] = None
    """Reward of the greedy evaluation (default with --task: the task's; with --data: none, so no greedy
    evaluation; give one, e.g. math, to score the held-out rows' prompts with their extra columns)."""
    eval_max_new_tokens: Annotated[int, Positive] = 128
    """Completion limit of the greedy evaluation."""
    activation_checkpointing: Annotated[int, NonNegative] = 0
    """Recompute the activations of every N-th decoder layer in backward instead of storing them (0 = off)."""
    chunk_size: Annotated[int, Positive] = 512
    """Trained tokens per output-head chunk (peak extra memory: a few chunk_size x vocab floats)."""
    APPLIES_WHEN: ClassVar[dict] = {
        "task_size": ("never in SFT (it trains on --data; --task only evaluates)", lambda c: False),
        "row_tokens": ("with --packing", lambda c: c.packing),
        "eval_max_new_tokens": ("with --task or --eval-reward (the greedy evaluation)",
                                lambda c: c.task is not None or c.eval_reward is not None),
    }

    @property
    def method(self) -> str:
        return "sft"

    def check_inputs(self) -> None:
        """SFT trains on ``data``; ``task`` only names the greedy evaluation's task."""
        if self.data is None:
            raise refuse("data", "SFT trains on examples: pass --data FILE in one of TRL's SFT formats "
                         "({messages}, {prompt, completion} or {text})")


# --------------------------------------------------------------------------------------- loss


def batch_loss(policy, batch: list[sd.SFTExample], config: SFTConfig, pad_id: int, custom_mask: bool):
    """(mean NLL of the micro-batch's trained tokens, metrics, tokens fed); differentiable."""
    device = next(policy.parameters()).device
    packed = sd.pack(batch, pad_id, config.packing, config.row_tokens, custom_mask, device)
    logp_N = sd.token_logprobs(policy, packed, config.chunk_size)
    return -logp_N.mean(), {"target_tokens": float(logp_N.numel())}, packed.n_tokens


def accumulate(policy, rule: OptimizerStep, batch: list[sd.SFTExample], total_targets: int, config: SFTConfig,
               pad_id: int, custom_mask: bool) -> tuple[dict, int]:
    """``offline.accumulate``, each micro-batch's mean weighted by its share of the step's trained tokens."""
    micro = offline.micro_batches(batch, config.micro_batch_size)
    weights = [sum(e.n_targets for e in mb) / total_targets for mb in micro]
    sums, tokens = offline.accumulate(rule, batch_loss, policy, micro, weights, config, pad_id, custom_mask)
    sums.pop("target_tokens", None)  # weighted: meaningless; the step's count is logged instead
    return sums, tokens


@torch.no_grad()
def heldout_loss(policy, examples: list[sd.SFTExample], config: SFTConfig, pad_id: int, custom_mask: bool) -> dict:
    """Mean NLL per trained token over the held-out examples (the processes score a part each)."""
    training = getattr(policy, "training", False)
    policy.eval()
    device = next(policy.parameters()).device
    nll, n = torch.zeros((), dtype=torch.float64), 0
    try:
        with distributed.gathered(policy):  # FSDP: the ranks' batches differ in number
            part = examples[distributed.shard(len(examples))]
            for k in range(0, len(part), max(1, config.batch_size)):
                packed = sd.pack(part[k:k + config.batch_size], pad_id, config.packing, config.row_tokens, custom_mask,
                                 device)
                logp_N = sd.token_logprobs(policy, packed, config.chunk_size)
                nll, n = nll - logp_N.double().sum().cpu(), n + logp_N.numel()
    finally:
        policy.train(training)
    total = distributed.gather_cat(torch.tensor([[float(nll), float(n)]], dtype=torch.float64)).sum(0)
    loss = float(total[0] / total[1])
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "target_tokens": int(total[1]), "n_examples": len(examples)}


# --------------------------------------------------------------------------------------- train


def _read_rows(config: SFTConfig) -> tuple[list[dict], str | None]:
    """The SFT rows of --data (checked before the model loads) and the greedy evaluation's reward."""
    from posttrain.data import load_rows

    rows = load_rows(config.data, "sft")
    reward = config.eval_reward
    if config.task and reward is None:
        from posttrain.data.tasks import task_info

        reward = task_info(config.task).reward
    if reward is not None:
        from posttrain import rewards as rw

        rw.from_spec(reward)  # a bad spec is an error now, not after training
    return rows, reward


def _held_out(config: SFTConfig, rows: list[dict]) -> set[int]:
    """The rows held out for evaluation: a seeded ``eval_fraction`` of them (at least one, when > 0)."""
    if config.eval_fraction <= 0 or len(rows) < 2:
        return set()
    n_eval = max(1, int(round(len(rows) * config.eval_fraction)))
    return set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed)).tolist()[:n_eval])


def _greedy_rows(config: SFTConfig, rows: list[dict], held: set[int]) -> list[dict]:
    """The greedy evaluation's rows: the task's test split, or the held-out rows' prompts."""
    if config.task:
        from posttrain.data.tasks import get_task

        return get_task(config.task, "test", n=config.eval_size, seed=config.seed)
    if config.eval_reward is None:
        return []
    out = [{**rows[i], "prompt": sd.prompt_of(rows[i])} for i in sorted(held)]
    return [r for r in out if r["prompt"] is not None][:config.eval_size or None]


@closes_runs_on_failure
def train_sft(config: SFTConfig) -> RunResult:
    """Supervised fine-tuning; returns the run directory and metrics."""
    common.start(config)
    distributed.check_divisible("batch_size", config.batch_size)
    offline.check_resumed_length(config)
    rows, reward = _read_rows(config)
    held = _held_out(config, rows)
    greedy = _greedy_rows(config, rows, held)
    # tokenized with the tokenizer alone: a row the chat template cannot cut is an error before the model loads
    examples, stats = sd.encode_examples(load_tokenizer(config.model), rows, config.chat_template, config.loss_on,
                                         config.max_length, str(config.data))
    policy, tok = common.load_policy(config, lora_rank_for=sft_lora_rank)
    inputs.check_max_length(policy, config)
    if greedy:
        inputs.check_context(policy, tok, inputs.rows_of(f"task {config.task} (test split)" if config.task else
                                                          str(config.data), held=greedy),
                             {"held": ("eval_max_new_tokens", config.eval_max_new_tokens)}, config.chat_template)
    if config.activation_checkpointing > 0:  # before sharding: FSDP's hooks then run inside the recomputation
        offline.enable_activation_checkpointing(policy, config.activation_checkpointing)
    common.shard(config, policy)
    train = [e for e in examples if e.index not in held]
    evals = [e for e in examples if e.index in held]
    if not train:
        raise DataError(str(config.data), None, None, f"no training examples left ({stats.summary()}): lower "
                        "--eval-fraction or raise --max-length")
    config = dataclasses.replace(config, max_steps=offline.total_steps(config, len(train)))
    run = Run(config, "sft", total_steps=config.max_steps)
    console = run.tracker.console
    if stats.truncated or stats.dropped_no_target:
        console.print(f"[yellow]truncation:[/yellow] {stats.summary()}")
    custom_mask = sd.takes_custom_mask(policy)
    run.tracker.write_json("data.json", {**stats.as_dict(), "train_examples": len(train), "eval_examples": len(evals),
                                         "packing": config.packing, "loss_on": config.loss_on})
    optimizer, scheduler, stream, start, rule = offline.prepare(run, policy, config, train, FULL_FT_LR)
    pad = tok.pad_token_id

    def evaluate(step: int):
        t0 = time.perf_counter()
        record = {}
        if evals:
            record.update(heldout_loss(policy, evals, config, pad, custom_mask))
        if greedy:
            record.update(greedy_eval_sharded(policy, tok, greedy, reward, config.eval_max_new_tokens,
                                              config.chat_template))
        if record:
            run.log_eval(step, {**record, "seconds": time.perf_counter() - t0})

    def collect_step(step: int, timer) -> tuple[dict, int, int]:
        """The step's examples and their backward passes (no weight changes: a Ctrl-C here checkpoints)."""
        with Phase(timer, "update"):
            batch = stream.take(config.batch_size)
            total = sum(e.n_targets for e in batch)
            sums, tokens = accumulate(policy, rule, batch[distributed.shard(config.batch_size)], total, config, pad,
                                      custom_mask)
            return sums, tokens, total

    def update_step(collected) -> loop.StepResult:
        sums, tokens, total = collected
        smetrics = offline.step_optimizer(rule)
        metrics = {**distributed.reduce_metrics({**sums, "tokens": tokens}, sum_keys=[*sums, "tokens"]), **smetrics,
                   "target_tokens": total, "epoch": stream.epoch + stream.pos / len(train)}
        return loop.StepResult(metrics, metrics["tokens"])

    metrics = loop.train(loop.Trainer(run, policy, optimizer, scheduler, stream, collect_step, update_step, evaluate),
                         start)
    return run.finish(policy, tok, metrics)
