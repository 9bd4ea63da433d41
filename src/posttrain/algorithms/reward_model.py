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
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from posttrain import distributed
from posttrain.algorithms import common
from posttrain.models import sft_lora_rank
from posttrain.value_head import TrainState, ValueHead, hidden_size, load_head, save_head, sequence_scores, trunk_of

FULL_FT_LR = 1e-5
"""Full fine-tuning learning rate of a reward model (InstructGPT: 9e-6; times 10 with LoRA)."""
FORMAT = "posttrain-reward-model"


@dataclasses.dataclass
class RewardModelConfig(common.TrainConfig):
    """Reward model: Bradley-Terry on preference pairs (scalar head on a causal LM)."""

    eval_fraction: float = 0.1
    """With --data: fraction of pairs held out for accuracy and margin (0 = none)."""
    batch_size: int = 8
    """Preference pairs per optimizer step, over all processes (a multiple of their number; each
    scores batch_size / N)."""
    max_length: int = 512
    """Longest prompt + response in tokens (longer pairs are truncated: prompt from the left)."""
    max_prompt_length: int = 256
    """Prompt tokens kept when a pair is too long."""
    margin_column: str = "margin"
    """Column with a required score gap per pair (Llama 2); rows without it use 0."""
    center_coef: float = 0.0
    """Reward-centering weight (Eisenstein et al. 2023 used 0.01): adds coef * (r_c + r_r)^2."""
    chat_template: bool = True
    """Wrap plain-string prompts in the tokenizer's chat template."""
    eval_batch_size: int = 16
    """Pairs per forward pass in evaluation."""

    @property
    def method(self) -> str:
        return "rm"


def bradley_terry_loss(r_chosen_B: torch.Tensor, r_rejected_B: torch.Tensor, margin_B: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``; returns
    ``(loss, metrics)`` with ``bt_loss``, ``center_loss``, ``rewards/accuracy`` (r_c > r_r),
    ``rewards/margin`` (mean r_c - r_r), ``rewards/chosen`` and ``rewards/rejected``."""
    diff_B = r_chosen_B - r_rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B.to(diff_B.dtype)
    bt = -F.logsigmoid(diff_B).mean()
    center = ((r_chosen_B + r_rejected_B) ** 2).mean()
    loss = bt + center_coef * center if center_coef else bt
    with torch.no_grad():
        metrics = {
            "bt_loss": bt.detach(), "center_loss": center.detach(),
            "rewards/accuracy": (r_chosen_B > r_rejected_B).float().mean(),
            "rewards/margin": (r_chosen_B - r_rejected_B).mean(),
            "rewards/chosen": r_chosen_B.mean(), "rewards/rejected": r_rejected_B.mean(),
        }
    return loss, metrics


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
        if config.data is not None:
            raise ValueError("give exactly one of --data FILE or --task NAME")
        if config.task != "arithmetic":
            raise ValueError(f"task {config.task!r} has no preference pairs; built in: arithmetic (or pass --data)")
        from posttrain.tasks.arithmetic_prefs import arithmetic_preferences

        return (arithmetic_preferences(config.task_size, config.seed, "train"),
                arithmetic_preferences(config.eval_size, config.seed, "test"))
    train, held, _ = common.load_rows_for(config, "preference")
    return train, held


def train_reward_model(config: RewardModelConfig) -> common.RunResult:
    """Train a reward model on preference pairs; returns the run (``final/`` is the model)."""
    from posttrain.algorithms.dpo_data import encode_pairs

    common.start(config)
    distributed.check_divisible("batch_size", config.batch_size)
    train_rows, eval_rows = _rows(config)
    run = common.Run(config, "rm", total_steps=config.max_steps)
    model, tok = common.load_policy(config, lora_rank_for=sft_lora_rank)
    encode = functools.partial(encode_pairs, tok, chat_template=config.chat_template, max_length=config.max_length,
                               max_prompt_length=config.max_prompt_length)
    examples, stats = encode(train_rows, source=config.data or "task")
    eval_examples, _ = encode(eval_rows, source=config.data or "task") if eval_rows else ([], None)
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
    pad_id = tok.pad_token_id

    def evaluate(step: int):
        if eval_examples:
            run.log_eval(step, evaluate_pairs(trunk, head, eval_examples, eval_rows, pad_id, config))

    if start == 0 and config.eval_at_start:
        evaluate(0)
    metrics: dict[str, Any] = {}
    last = config.max_steps
    for step in range(start + 1, config.max_steps + 1):
        timer = common.StepTimer()
        batch = stream.take(config.batch_size)[distributed.shard(config.batch_size)]
        share = len(batch) / config.batch_size  # of the global batch: the processes' gradients add up to its
        model.train(), head.train()
        with common.Phase(timer, "update"):
            def batch_loss():
                rc, rr = pair_scores(trunk, head, batch, pad_id)
                return bradley_terry_loss(rc, rr, _margins(train_rows, batch, config.margin_column), config.center_coef)

            loss, m = distributed.run(dp, batch_loss)
            finite = distributed.all_true(bool(torch.isfinite(loss)))
            if finite or dp is not None:  # DDP: every rank runs every backward; a non-finite step is dropped
                (loss * share).backward()
            if finite:
                norm, ok = common.grad_step(both, optimizer, scheduler, config.max_grad_norm)
            else:
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                norm, ok = float("nan"), False
        shares = {"loss": float(loss.detach()) * share, **{k: float(v) * share for k, v in m.items()},
                  "tokens": sum(e.shared_length for e in batch)}
        metrics = {**distributed.reduce_metrics(shares, sum_keys=shares), "grad_norm": norm,
                   "nonfinite_steps": 0 if ok else 1, "lr": scheduler.get_last_lr()[0], **timer.metrics()}
        metrics["tokens_per_s"] = metrics.pop("tokens") / max(1e-9, metrics["time/step"])
        run.log(step, metrics)
        last = run.end_step(step, last, evaluate, lambda s: run.checkpoint(s, model, state, scheduler, stream))
        if step == last:
            break
    run.final_eval(last, evaluate)
    meta = {"format": FORMAT, "chat_template": config.chat_template, "max_length": config.max_length,
            "max_prompt_length": config.max_prompt_length,
            "eval": {k: v for k, v in (run.evals[-1] if run.evals else {}).items() if k != "examples"}}
    if distributed.is_main():
        save_head(head, run.run_dir / "final", meta)
    return run.finish(model, tok, metrics)


# --------------------------------------------------------------------------------------- loading


class RewardModel:
    """A trained reward model: ``score(prompts, responses)`` -> one float per response."""

    def __init__(self, model, tokenizer, head: ValueHead, meta: dict | None = None):
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.meta = dict(meta or {})
        self.trunk = trunk_of(model)
        self.chat_template = bool(self.meta.get("chat_template", True))
        self.max_length = int(self.meta.get("max_length", 512))
        self.max_prompt_length = int(self.meta.get("max_prompt_length", 256))

    def encode(self, prompt: Any, response: Any) -> tuple[list[int], list[int]]:
        """Token ids of (prompt, response) as in training (``dpo_data``), with its truncation."""
        from posttrain.algorithms.dpo_data import completion_text
        from posttrain.data import encode_prompt

        p = encode_prompt(self.tokenizer, prompt, self.chat_template)
        text = completion_text(self.tokenizer, prompt, "" if response is None else response, self.chat_template)
        c = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(p) + len(c) > self.max_length:
            p = p[-self.max_prompt_length:] if len(p) > self.max_prompt_length else p
            c = c[:max(1, self.max_length - len(p))]
        return p, c

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[Any], batch_size: int = 16) -> list[float]:
        """Scores in batches, no grad. Consecutive runs of one prompt (a group of completions) share
        the prompt's forward pass."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        self.head.eval()
        G = _run_length(prompts)
        step = max(G, batch_size // G * G)
        out: list[float] = []
        for i in range(0, len(responses), step):
            enc = [self.encode(p, r) for p, r in zip(prompts[i:i + step], responses[i:i + step])]
            s = sequence_scores(self.trunk, self.head, [e[0] for e in enc[::G]], [e[1] for e in enc],
                                self.tokenizer.pad_token_id)
            out.extend(float(v) for v in s)
        return out


def _run_length(prompts: Sequence[Any]) -> int:
    """G when ``prompts`` is made of consecutive runs of exactly G equal prompts, else 1."""
    g = 1
    while g < len(prompts) and prompts[g] == prompts[0]:
        g += 1
    if len(prompts) % g or any(prompts[i] != prompts[i - i % g] for i in range(len(prompts))):
        return 1
    return g


def resolve_path(path: str | Path) -> Path:
    """A reward model directory, or a run directory holding one in ``final/``."""
    p = Path(path).expanduser()
    if not (p / "value_head.safetensors").is_file() and (p / "final" / "value_head.safetensors").is_file():
        p = p / "final"
    return p


def load_reward_model(path: str | Path, device: str = "cpu", merge: bool = True) -> RewardModel:
    """Load a reward (or value) model directory written by ``train_reward_model`` (or a PPO run's
    ``final/value``). ``merge`` folds a LoRA adapter into the weights: faster scoring, the same
    function up to float rounding."""
    from posttrain.models import load_model, resolve_device

    p = resolve_path(path)
    head, meta = load_head(p, resolve_device(device))
    model, tok = load_model(str(p), device=resolve_device(device))
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return RewardModel(model, tok, head, meta)


__all__ = ["RewardModelConfig", "train_reward_model", "bradley_terry_loss", "RewardModel", "load_reward_model",
           "evaluate_pairs", "pair_scores"]
