"""Reward model training: a scalar head on a causal LM, fitted to preference pairs with the
Bradley-Terry loss (Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT):

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m)  +  center_coef * (r_chosen + r_rejected)^2

- r(x, y) is ``value_head.ValueHead`` applied to the trunk's hidden state at the last token of
  prompt + response. The prompt is run once per pair (``value_head.sequence_scores``).
- ``m`` is the row's margin column when present (Llama 2, Touvron et al. 2023, sec. 3.2.2: a
  larger required gap for clearer preferences), else 0.
- The centering term is Eisenstein et al. 2023 ("Helping or Herding?"): the loss depends on score
  differences only, so the scores' level drifts freely; the auxiliary term pins the mean score
  near 0, which makes a reward model's scores comparable across runs and keeps PPO's per-token
  rewards on a stable scale. Off by default (``center_coef=0``); the paper used 0.01.

Choices and departures:
- LoRA by default (rank from the doctrine's SFT column, as for DPO: a reward model learns a new
  function) with the head trained fully; ``--no-lora`` trains every weight.
- Pairs are tokenized as DPO's are (``dpo_data.encode_pairs``: chat template, the completion up to
  its end-of-turn token, a stated truncation policy), and scored the same way at run time, so a
  policy's completions reach the model in the form it was trained on.
- InstructGPT puts all K-choose-2 comparisons of one prompt in a batch; here the pair is the unit.
- Held-out accuracy and mean margin on ``eval_fraction`` of ``--data`` (default 10%), or on the
  test split of ``--task arithmetic`` (pairs from ``tasks.arithmetic_prefs``).
- Under several processes each scores 1/N of a step's pairs with its loss weighted by that share
  (the summed gradients equal one process's); evaluation pairs are split and the scores gathered.
  The head starts identical everywhere (seeded) and is trained like the adapter.
- FSDP (``--fsdp`` or an FSDP accelerate config, several processes): the trunk's decoder layers
  (with their LoRA weights) are sharded (``common.shard``), the head, embeddings and final norm
  stay replicated, their gradients summed over the processes. Every rank runs one forward and
  backward per step; evaluation (uneven parts) runs with the layers gathered. A checkpoint holds
  the full trunk weights (rank 0) and each rank's optimizer state (``optimizer-rank<R>.pt``, with
  the head); ``final/`` holds the full weights and the head.

Output: ``final/`` holds the trunk in HF format (a PEFT adapter, or the full model), the tokenizer,
``value_head.safetensors`` and ``value_head.json``. ``load_reward_model(path).score(prompts,
responses)`` reads it back; ``--reward 'reward_model(runs/<rm>/final)'`` uses it as a reward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Annotated, Sequence

import torch
from torch import nn

from posttrain.runtime import distributed
from posttrain.runtime.config import Fraction, NonNegative, PerProcess, Positive, Range, refuse
from posttrain.algorithms import common, inputs, loop
from posttrain.algorithms.dpo_data import check_lengths
from posttrain.algorithms.optim import OptimizerStep, trainable_params
from posttrain.algorithms.run import Phase, Run, RunResult, closes_runs_on_failure
from posttrain.objectives.losses import bradley_terry_loss
from posttrain.rewards.reward_model import RewardModel, load_reward_model  # noqa: F401 (public API, moved)
from posttrain.models import sft_lora_rank
from posttrain.objectives.value_head import TrainState, ValueHead, hidden_size, save_head, sequence_scores, trunk_of

FULL_FT_LR = 1e-5
"""Full fine-tuning learning rate of a reward model (InstructGPT: 9e-6; times 10 with LoRA)."""
FORMAT = "posttrain-reward-model"


def _arithmetic_preferences():
    from posttrain.data.tasks.arithmetic_prefs import arithmetic_preferences

    return arithmetic_preferences


PREFERENCE_TASKS = {"arithmetic": _arithmetic_preferences}
"""Built-in tasks with preference pairs: name -> a function returning their maker (imported lazily)."""


@dataclasses.dataclass
class RewardModelConfig(common.TrainConfig):
    """Reward model: Bradley-Terry on preference pairs (scalar head on a causal LM)."""

    eval_fraction: Annotated[float, Fraction] = 0.1
    """With --data: fraction of pairs held out for accuracy and margin (0 = none)."""
    batch_size: Annotated[int, Positive, PerProcess] = 8
    """Preference pairs per optimizer step, over all processes (a multiple of their number; each
    scores batch_size / N)."""
    max_length: Annotated[int, Range(2)] = 512
    """Longest prompt + response in tokens (longer pairs are truncated: prompt from the left)."""
    max_prompt_length: Annotated[int, Positive] = 256
    """Prompt tokens kept when a pair is too long."""
    margin_column: str = "margin"
    """Column with a required score gap per pair (Llama 2); rows without it use 0."""
    center_coef: Annotated[float, NonNegative] = 0.0
    """Reward-centering weight (Eisenstein et al. 2023 used 0.01): adds coef * (r_c + r_r)^2."""
    chat_template: bool = True
    """Wrap plain-string prompts in the tokenizer's chat template."""
    eval_batch_size: Annotated[int, Positive] = 16
    """Pairs per forward pass in evaluation."""

    @property
    def method(self) -> str:
        return "rm"

    def row_checks(self) -> list:
        column = self.margin_column

        def margin_is_a_number(row: dict):
            value = row.get(column)
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and math.isfinite(value)):
                return None
            return column, f"the margin must be a finite number, got {value!r} (see --margin-column)"

        return [margin_is_a_number]

    def check(self) -> None:
        super().check()
        check_lengths(self)
        if self.task is not None and self.task not in PREFERENCE_TASKS:
            raise refuse("task", f"task {self.task!r} has no preference pairs; built in: "
                         f"{', '.join(PREFERENCE_TASKS)} (or pass --data pairs.jsonl)")


def pair_scores(trunk, head: ValueHead, examples: Sequence, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen_B, r_rejected_B) of ``dpo_data.PairExample``s, each prompt run once."""
    comps = [c for e in examples for c in (e.chosen, e.rejected)]
    s = sequence_scores(trunk, head, [e.prompt for e in examples], comps, pad_id)
    return s[0::2], s[1::2]


def _margins(rows: Sequence[dict], examples: Sequence, column: str) -> torch.Tensor | None:
    if not any(column in r for r in rows):
        return None
    return torch.tensor([float(rows[e.index].get(column) or 0.0) for e in examples])


@torch.no_grad()
def evaluate_pairs(trunk, head: ValueHead, examples: Sequence, rows: Sequence[dict], pad_id: int,
                   config: RewardModelConfig) -> dict[str, float]:
    """Held-out ``accuracy`` (share of pairs scored chosen > rejected), ``margin``, ``loss``,
    ``score/mean`` and ``score/std`` over all scored responses."""
    head.eval()
    rc, rr = [torch.zeros(0)], [torch.zeros(0)]
    mine = examples[distributed.shard(len(examples))]  # each process scores a part
    with distributed.gathered(trunk):  # FSDP: the parts may need different numbers of batches
        for i in range(0, len(mine), config.eval_batch_size):
            c, r = pair_scores(trunk, head, mine[i:i + config.eval_batch_size], pad_id)
            rc.append(c.float().cpu()), rr.append(r.float().cpu())
    rc_B, rr_B = distributed.gather_cat(torch.cat(rc)), distributed.gather_cat(torch.cat(rr))
    loss, m = bradley_terry_loss(rc_B, rr_B, _margins(rows, examples, config.margin_column), config.center_coef)
    both = torch.cat([rc_B, rr_B])
    return {"accuracy": float(m["rewards/accuracy"]), "margin": float(m["rewards/margin"]), "loss": float(loss),
            "score/mean": float(both.mean()), "score/std": float(both.std()) if len(both) > 1 else 0.0,
            "n": len(examples)}


def _rows(config: RewardModelConfig) -> tuple[list[dict], list[dict]]:
    if config.task is not None:
        make = PREFERENCE_TASKS[config.task]()
        return make(config.task_size, config.seed, "train"), make(config.eval_size, config.seed, "test")
    rows = inputs.load_rows_for(config, "preference")
    return rows.train, rows.held


@closes_runs_on_failure
def train_reward_model(config: RewardModelConfig) -> RunResult:
    """Train a reward model on preference pairs; returns the run (``final/`` is the model)."""
    from posttrain.algorithms.dpo_data import encode_pairs

    common.start(config)
    distributed.check_divisible("batch_size", config.batch_size)
    train_rows, eval_rows = _rows(config)
    model, tok = common.load_policy(config, lora_rank_for=sft_lora_rank)
    inputs.check_max_length(model, config)
    encode = functools.partial(encode_pairs, tok, chat_template=config.chat_template, max_length=config.max_length,
                               max_prompt_length=config.max_prompt_length)
    examples, stats = encode(train_rows, source=config.data or "task")
    eval_examples, _ = encode(eval_rows, source=config.data or "task") if eval_rows else ([], None)
    run = Run(config, "rm", total_steps=config.max_steps)
    run.tracker.console.print(f"pairs: {stats.summary()}; held out: {len(eval_examples)}", highlight=False)
    head = ValueHead(hidden_size(model), seed=config.seed).to(next(model.parameters()).device)
    trunk = trunk_of(model)
    common.shard(config, model)  # FSDP: the trunk's decoder layers; the head stays replicated
    both = nn.ModuleList([model, head])  # one optimizer, one gradient clip over adapter + head
    optimizer = common.build_optimizer(both, config, common.resolve_lr(config, FULL_FT_LR))
    scheduler = common.build_scheduler(optimizer, config)
    state = TrainState(optimizer, head=head)
    stream = common.PromptStream(examples, config.seed)
    start, _ = run.restore(model, state, scheduler, stream)
    dp = distributed.data_parallel(model, head, read=[trunk, head])  # data-parallel runs: DDP reduces the gradients
    rule = OptimizerStep(optimizer, [trainable_params(both)], config.max_grad_norm, [model], dp)
    pad_id = tok.pad_token_id

    def evaluate(step: int):
        if eval_examples:
            run.log_eval(step, evaluate_pairs(trunk, head, eval_examples, eval_rows, pad_id, config))

    def batch_loss(batch):
        rc, rr = pair_scores(trunk, head, batch, pad_id)
        return bradley_terry_loss(rc, rr, _margins(train_rows, batch, config.margin_column), config.center_coef)

    def collect_step(step: int, timer):
        """The step's pairs, scored, and the backward pass (no weight changes yet)."""
        with Phase(timer, "update"):
            batch = stream.take(config.batch_size)[distributed.shard(config.batch_size)]
            share = len(batch) / config.batch_size  # of the global batch: the processes' gradients add up to it
            model.train(), head.train()
            loss, m = rule.forward(functools.partial(batch_loss, batch))
            rule.backward(loss, share)
            return batch, share, loss, m

    def update_step(collected) -> loop.StepResult:
        batch, share, loss, m = collected
        (norm,), ok = rule.step()
        shares = {"loss": float(loss.detach()) * share, **{k: float(v) * share for k, v in m.items()},
                  "tokens": sum(e.shared_length for e in batch)}
        metrics = {**distributed.reduce_metrics(shares, sum_keys=shares), "grad_norm": norm,
                   "nonfinite_steps": 0 if ok else 1}
        return loop.StepResult(metrics, metrics.pop("tokens"))

    metrics = loop.train(loop.Trainer(run, model, state, scheduler, stream, collect_step, update_step, evaluate), start)
    meta = {"format": FORMAT, "chat_template": config.chat_template, "max_length": config.max_length,
            "max_prompt_length": config.max_prompt_length,
            "eval": {k: v for k, v in (run.evals[-1] if run.evals else {}).items() if k != "examples"}}
    if distributed.is_main():
        save_head(head, run.run_dir / "final", meta)
    return run.finish(model, tok, metrics)


__all__ = ["RewardModelConfig", "train_reward_model", "bradley_terry_loss", "RewardModel", "load_reward_model",
           "evaluate_pairs", "pair_scores"]
