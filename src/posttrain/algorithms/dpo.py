"""DPO (Rafailov et al. 2023) with the IPO, hinge (SLiC) and robust (rDPO) losses, and the
reference-free SimPO and ORPO, and KTO on unpaired examples (``--loss-type``; what each loss needs
is its entry in ``dpo_losses.LOSS_TYPES``: a reference or not, length-normalised log-probs, KTO's data).

The doctrine's first recommendation: no reward model and no sampling during training; the policy
is pushed to raise the log-ratio to a frozen reference of the chosen completion over the
rejected one (``losses.dpo_loss``). Each step (the loop, checkpoints and evaluations are ``loop.py``'s, the same for every trainer):

    batch   = stream.take(batch_size)                          # tokenized pairs, seeded order
    logps   = pair_logprobs(policy, pack(batch))               # chosen + rejected, one forward
    loss    = LOSS_TYPES[loss_type].compute(logps, reference[batch], ...)  # pure tensors; backward per micro-batch
    metrics = rule.step()                                      # reduce, clip, check, AdamW (optim.py)

Choices and departures from the paper and from TRL:
- The reference is frozen, so its log-probs are computed once, for every pair (train and held
  out), before the first step: no-grad forwards over large packed batches, the adapter disabled
  with LoRA (no second model in memory), the initial weights with full fine-tuning (no frozen
  copy kept either), or ``ref_model`` when given (loaded, used, freed). The table is saved in the
  run directory (``reference_logps.pt``, keyed by a hash of the token ids) and reused on resume.
  The reference-free losses (simpo, orpo) skip all of it: no reference is loaded, run or stored.
- KTO (``kto_data``): each example is packed as a "pair" of its completion and the completion of
  its fixed KL partner, so the same forward, reference table and resume serve it; its held-out
  ``rewards/accuracy`` is the share of examples on their side of the reference point, and
  ``rewards/pair_accuracy`` (for examples split from pairs) the share of pairs ranked right.
- Chosen and rejected of a pair share one copy of their prompt in the forward (prefix sharing
  with a custom attention mask; ``dpo_data``), pairs are packed into rows without padding, and the
  output head is applied to completion positions only, in chunks: no [B, T, V] logits.
- Sequence log-probs are sums over completion tokens (paper); for ``ipo``, ``simpo`` and ``orpo``
  they are divided by the completion length (the IPO authors' and TRL's choice; SimPO's and ORPO's
  definition) so beta means the same across lengths.
- Over-long pairs are truncated by the stated policy in ``dpo_data`` (or dropped), counted,
  printed and written to ``data.json``; ``max_length`` itself must fit the model's context (checked
  when the model has loaded, before the run directory is made), and so must the greedy evaluation's
  prompts plus ``eval_max_new_tokens`` (``inputs.check_context``).
- Defaults from the doctrine: beta 0.1, LoRA rank 32 (SFT-like: DPO learns more per example than
  RL), learning rate 1e-6 for full fine-tuning and 10x that with LoRA ("LoRA Without Regret").
- Evaluation every ``eval_every`` steps (and before/after): preference metrics on the held-out
  pairs (``eval_fraction``), and, when ``task`` names a built-in task, greedy accuracy on its test
  split with its reward (the pairs usually came from its train split via ``posttrain pairs``).
- Under several processes each takes 1/N of a step's pairs (and of the reference and evaluation
  pairs); a micro-batch's loss is weighted by its share of the global batch, so the summed
  gradients equal one process's.
- FSDP (``--fsdp`` or an FSDP accelerate config, several processes): the decoder layers are
  sharded (``distributed.shard_layers``); the reference log-probs and the held-out evaluation run
  with the weights gathered (each rank scores its own share of the pairs). Activation
  checkpointing composes with it: it is switched on before sharding, so a layer's recomputation
  in backward runs inside FSDP's hooks, with the weights the backward gathers.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

import torch

from posttrain.algorithms import common, inputs, loop, offline
from posttrain.algorithms import dpo_data as dd
from posttrain.algorithms import dpo_losses, kto_data
from posttrain.algorithms.dpo_losses import LOSS_TYPES
from posttrain.algorithms.offline import (check_resumed_length, enable_activation_checkpointing, step_optimizer,
                                          total_steps)
from posttrain.algorithms.optim import OptimizerStep
from posttrain.algorithms.reference import Reference
from posttrain.data import DataError
from posttrain.algorithms.evaluate import greedy_eval_sharded
from posttrain.algorithms.run import Phase, Run, RunResult, closes_runs_on_failure
from posttrain.runtime import distributed
from posttrain.runtime.config import Fraction, NonNegative, PerProcess, Positive, Range, refuse

FULL_FT_LR = 1e-6
"""The doctrine's DPO learning range is 1e-5 to 1e-6; 1e-6 for full fine-tuning, 1e-5 with LoRA."""
REFERENCE_FILE = "reference_logps.pt"


@dataclasses.dataclass
class DPOConfig(common.TrainConfig):
    """DPO (and IPO, hinge, robust, SimPO, ORPO) on preference pairs {prompt, chosen, rejected}; KTO on
    unpaired examples {prompt, completion, label} or pairs."""

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model", "ref_model")

    task: Optional[str] = None
    """A built-in task (e.g. arithmetic) whose test split is scored by greedy accuracy at each evaluation
    (DPO trains on --data; the pairs usually came from this task via `posttrain pairs`)."""
    eval_fraction: Annotated[float, Fraction] = 0.1
    """Fraction of the pairs held out for preference evaluation (rewards/accuracy, margin, loss); 0 = none."""
    lora_rank: Optional[Annotated[int, Positive]] = 32
    """LoRA rank (the doctrine's DPO default: 32)."""
    beta: Optional[Annotated[float, Positive]] = None
    """Strength of the pull towards the reference; default by loss type: 0.1 (DPO family, KTO), 2.0 (SimPO,
    the scale of its length-normalised reward); orpo has none (--orpo-lambda). For DPO, 0.05: aggressive
    learning, may overfit to preferences; 0.1: standard, good balance; 0.5: conservative, preserves reference
    behaviour; 1.0+: very conservative, minimal change from the reference."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    """sigmoid (DPO), ipo (length-normalised log-probs), hinge (SLiC), robust (rDPO, noisy labels); without a
    reference model: simpo (length-normalised margin), orpo (chosen NLL + odds ratio); kto (unpaired
    {prompt, completion, label} rows, or pairs split in two)."""
    simpo_gamma: Annotated[float, NonNegative] = 1.0
    """SimPO's target reward margin gamma (paper: gamma / beta = 0.5 with beta 2.0; TRL's CPOConfig simpo_gamma)."""
    orpo_lambda: Annotated[float, NonNegative] = 0.1
    """ORPO's weight of the odds-ratio term against the chosen NLL (paper and TRL's ORPOConfig, which calls it beta)."""
    kto_desirable_weight: Annotated[float, Positive] = 1.0
    """KTO's weight of desirable examples (TRL's KTOConfig desirable_weight; the paper advises
    weight x count of desirable / undesirable in [1, 4/3] when the classes are unbalanced)."""
    kto_undesirable_weight: Annotated[float, Positive] = 1.0
    """KTO's weight of undesirable examples (TRL's KTOConfig undesirable_weight)."""
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0
    """Assumed fraction of flipped preference labels, in [0, 0.5) (sigmoid: conservative DPO; robust: rDPO;
    simpo: as TRL's CPOTrainer)."""
    batch_size: Annotated[int, Positive, PerProcess] = 8
    """Pairs per optimizer step, over all processes (a multiple of their number; each trains on batch_size / N)."""
    micro_batch_size: Annotated[int, NonNegative] = 0
    """Pairs per forward/backward on each process (gradient accumulation); 0 = all of the process's pairs at
    once. Does not change the result, only memory and speed."""
    epochs: Annotated[float, NonNegative] = 0.0
    """Passes over the training pairs; when > 0 it sets max_steps = ceil(epochs * pairs / batch_size) (a resumed
    run then changes its length with --epochs, not --max-steps)."""
    max_length: Annotated[int, Range(2)] = 1024
    """Longest prompt + completion in tokens; longer pairs are truncated (see truncation)."""
    max_prompt_length: Annotated[int, Positive] = 512
    """An over-long pair's prompt keeps its last max_prompt_length tokens; completions then keep their start."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with pairs over max_length: truncate them (policy above) or drop them. Always counted."""
    ref_model: Optional[str] = None
    """Model spec of a different reference (default: the initial policy; with LoRA, the adapter disabled)."""
    ref_batch_tokens: Annotated[int, Positive] = 4096
    """Tokens per no-grad forward when precomputing the reference log-probs."""
    row_tokens: Annotated[int, NonNegative] = 256
    """Longest packed row: pairs are packed into rows of up to this many tokens (a longer pair gets a row of its
    own; attention cost grows with the square of a row's length); 0 = one row per batch."""
    share_prompt: bool = True
    """Chosen and rejected attend to one copy of their prompt (needs an attention backend that takes a custom
    mask: sdpa or eager; otherwise they are packed as two sequences)."""
    chat_template: bool = True
    """Apply the tokenizer's chat template to plain-string prompts (conversational rows always use it)."""
    eval_reward: Optional[str] = None
    """Reward for the greedy evaluation on --task (default: the task's reward)."""
    eval_max_new_tokens: Annotated[int, Positive] = 128
    """Completion limit of the greedy evaluation."""
    APPLIES_WHEN: ClassVar[dict] = {
        "eval_max_new_tokens": ("with --task (the greedy evaluation on its test split)", lambda c: c.task is not None),
        "task_size": ("never in DPO (it trains on --data; --task only evaluates)", lambda c: False),
        "eval_fraction": ("with --data", lambda c: c.data is not None),
        **dpo_losses.applies_when("ref_model"),
    }
    activation_checkpointing: Annotated[int, NonNegative] = 0
    """Recompute the activations of every N-th decoder layer in backward instead of storing them (1 = all
    layers: the least memory, about a third more compute; 0 = off, the fastest; TRL's default is on)."""
    chunk_size: Annotated[int, Positive] = 512
    """Scored tokens per output-head chunk (peak extra memory: a few chunk_size x vocab floats)."""

    @property
    def method(self) -> str:
        return "dpo"

    @property
    def beta_value(self) -> float:
        """``beta``, or the loss type's default."""
        return dpo_losses.beta_of(self)

    def check_inputs(self) -> None:
        """DPO trains on ``data`` (pairs); ``task`` only names the greedy evaluation's task."""
        if self.data is None:
            raise refuse("data", "DPO trains on preference pairs: pass --data pairs.jsonl (make them with "
                         "`posttrain pairs`)")

    def check(self) -> None:
        super().check()
        dpo_losses.check(self)


# --------------------------------------------------------------------------------------- reference


class ReferenceLogps:
    """Summed reference log-probs [chosen, rejected] of every pair, computed once and stored."""

    def __init__(self, table: dict[int, tuple[float, float]]):
        self.table = table

    def of(self, batch: list[dd.PairExample]) -> torch.Tensor:
        return torch.tensor([self.table[e.index] for e in batch], dtype=torch.float32)

    @classmethod
    def prepare(cls, run_dir, policy, tok, examples, config: DPOConfig, share: bool, console) -> tuple["ReferenceLogps", float]:
        """Load the run's table when its fingerprint matches, else compute it (returns seconds spent)."""
        path = run_dir / REFERENCE_FILE
        key = dd.fingerprint(examples, config.ref_model or config.model, config.lora, share)
        saved = _read_table(path, console)
        if saved is not None:
            if saved.get("fingerprint") == key:
                console.print(f"reference log-probs: reusing {path}")
                return cls(dict(zip(saved["index"].tolist(), map(tuple, saved["logps"].tolist())))), 0.0
            console.print(f"reference log-probs: {path} is for other data or settings; recomputing")
        t0 = time.perf_counter()
        pad = tok.pad_token_id
        everything, examples = examples, examples[distributed.shard(len(examples))]  # each rank its part
        if config.ref_model:
            from posttrain.models import load_model, resolve_device

            ref, ref_tok = load_model(config.ref_model, device=resolve_device(config.device))
            if len(ref_tok) != len(tok):
                raise ValueError(f"ref_model {config.ref_model!r} has a different vocabulary ({len(ref_tok)} vs {len(tok)} tokens)")
            table = dd.sequence_logps(ref, examples, pad, share and dd.supports_shared_prompt(ref),
                                      config.ref_batch_tokens, config.row_tokens)
            del ref
        else:  # LoRA: the adapter disabled; full fine-tuning: the policy before its first step (no copy)
            frozen = Reference(policy, config.lora, copy=False)
            # FSDP: gathered, as the ranks run different numbers of batches
            with frozen.model() as ref, distributed.gathered(policy):
                table = dd.sequence_logps(ref, examples, pad, share, config.ref_batch_tokens, config.row_tokens)
        table = {k: v for part in distributed.gather(table) for k, v in part.items()}
        if len(table) != len({e.index for e in everything}):
            raise RuntimeError("reference log-probs: pairs missing after gathering the processes' parts")
        seconds = time.perf_counter() - t0
        idx = sorted(table)
        if distributed.is_main():  # atomically: a kill mid-write leaves the old file or none, never a torn one
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"fingerprint": key, "index": torch.tensor(idx, dtype=torch.long),
                        "logps": torch.tensor([table[i] for i in idx], dtype=torch.float64)}, tmp)
            os.replace(tmp, path)
        console.print(f"reference log-probs: {len(idx)} pairs in {seconds:.1f}s -> {path}")
        return cls(table), seconds


def _read_table(path: Path, console) -> dict | None:
    """The saved reference table, or None when there is none or it cannot be read (it is a cache:
    a damaged one is recomputed, never a reason a run cannot resume)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        console.print(f"reference log-probs: {path} is unreadable ({type(e).__name__}); recomputing")
        return None


# --------------------------------------------------------------------------------------- loss


def _loss(config: DPOConfig, logps_P2, ref_P2, lengths_P2, batch):
    """The loss type's table entry on [P, 2] sequence log-probs (per-token means when it says so)."""
    entry = LOSS_TYPES[config.loss_type]
    if entry.normalise:  # module docstring
        n = lengths_P2.to(logps_P2.dtype)
        logps_P2, ref_P2 = logps_P2 / n, (None if ref_P2 is None else ref_P2 / n)
    labels = kto_data.labels_of(batch).to(logps_P2.device) if entry.unpaired else None
    return entry.compute(logps_P2, ref_P2, labels, config)


def batch_loss(policy, batch: list[dd.PairExample], ref: ReferenceLogps | None, config: DPOConfig, pad_id: int,
               share: bool):
    """(loss, metrics, tokens fed) of one micro-batch; differentiable when grad is enabled."""
    device = next(policy.parameters()).device
    packed = dd.pack(batch, pad_id, share, config.row_tokens, device)
    logps_P2 = dd.pair_logprobs(policy, packed, config.chunk_size)
    ref_P2 = None if ref is None else ref.of(batch).to(device=device, dtype=logps_P2.dtype)
    loss, metrics = _loss(config, logps_P2, ref_P2, packed.lengths_P2, batch)
    return loss, {k: float(v) for k, v in metrics.items()}, packed.n_tokens


def accumulate(policy, rule: OptimizerStep, batch, ref: ReferenceLogps | None, config: DPOConfig, pad_id: int, share: bool,
               total: int | None = None) -> tuple[dict, int]:
    """``offline.accumulate`` of a batch of pairs, each micro-batch weighted by its share of the
    ``total`` pairs of the step (default: this batch; under several processes, the global batch)."""
    micro = offline.micro_batches(batch, config.micro_batch_size)
    weights = [len(mb) / (total or len(batch)) for mb in micro]
    return offline.accumulate(rule, batch_loss, policy, micro, weights, ref, config, pad_id, share)


@torch.no_grad()
def preference_eval(policy, examples, ref: ReferenceLogps | None, config: DPOConfig, pad_id: int, share: bool) -> dict:
    """Loss and rewards/* over held-out pairs (one loss over all of them; the processes score a part
    each). ``rewards/accuracy`` is under the loss type's own implicit reward (``dpo_losses``)."""
    training = getattr(policy, "training", False)
    policy.eval()
    device = next(policy.parameters()).device
    pol, n = [torch.zeros(0, 2, dtype=torch.float64)], [torch.zeros(0, 2, dtype=torch.float64)]
    try:
        with distributed.gathered(policy):  # FSDP: the ranks' batches differ in number
            for b in dd.batches_by_tokens(examples[distributed.shard(len(examples))], config.ref_batch_tokens):
                packed = dd.pack(b, pad_id, share, config.row_tokens, device)
                pol.append(dd.pair_logprobs(policy, packed, config.chunk_size).cpu().double())
                n.append(packed.lengths_P2.cpu().double())
    finally:
        policy.train(training)
    pol_P2, n_P2 = distributed.gather_cat(torch.cat(pol)), distributed.gather_cat(torch.cat(n))
    ref_P2 = None if ref is None else ref.of(examples).double()
    loss, metrics = _loss(config, pol_P2, ref_P2, n_P2, examples)
    out = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "pairs": len(examples)}
    if LOSS_TYPES[config.loss_type].unpaired:  # KTO: examples split from pairs are also ranked pairwise
        paired = kto_data.pair_accuracy(pol_P2[:, 0] - ref_P2[:, 0], examples)
        if paired is not None:
            out["rewards/pair_accuracy"] = paired
    return out


# --------------------------------------------------------------------------------------- train


def _read_rows(config: DPOConfig) -> tuple[list[dict], inputs.Rows]:
    """The preference rows of --data, and the greedy evaluation's rows of --task (as ``Rows``
    held-out rows, for the prompt-length check): read and checked before the model loads."""
    from posttrain.data import load_rows

    rows = load_rows(config.data, "kto" if LOSS_TYPES[config.loss_type].unpaired else "preference")
    greedy = inputs.rows_of("")
    if config.task:
        from posttrain.data.tasks import get_task, task_info

        test = get_task(config.task, "test", n=config.eval_size, seed=config.seed)
        greedy = inputs.rows_of(f"task {config.task} (test split)", held=test,
                                reward=config.eval_reward or task_info(config.task).reward)
    return rows, greedy


def _encode(config: DPOConfig, tok, rows: list[dict], console):
    """Tokenized (train, held-out) pairs and the truncation report."""
    held = set()
    if config.eval_fraction > 0:
        n_eval = max(1, int(round(len(rows) * config.eval_fraction)))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
        held = set(order[:n_eval])
    if LOSS_TYPES[config.loss_type].unpaired:
        examples, stats = kto_data.encode_kto(tok, rows, config.chat_template, config.max_length,
                                              config.max_prompt_length, config.truncation, str(config.data), config.seed)
    else:
        examples, stats = dd.encode_pairs(tok, rows, config.chat_template, config.max_length, config.max_prompt_length,
                                          config.truncation, source=str(config.data))
    if stats.over_length or stats.dropped_identical:
        console.print(f"[yellow]truncation:[/yellow] {stats.summary()}")
    row = lambda e: getattr(e, "row", e.index)  # noqa: E731 - KTO examples: held out by their source row
    train = [e for e in examples if row(e) not in held]
    evals = [e for e in examples if row(e) in held]
    if not train:
        raise DataError(str(config.data), None, None, f"no training pairs left ({stats.summary()}): lower "
                        "--eval-fraction, raise --max-length, or use --truncation truncate")
    return train, evals, stats


@closes_runs_on_failure
def train_dpo(config: DPOConfig) -> RunResult:
    """Train with DPO (or IPO / hinge / robust / SimPO / ORPO / KTO); returns the run directory and metrics."""
    common.start(config)
    distributed.check_divisible("batch_size", config.batch_size)
    check_resumed_length(config)
    rows, greedy = _read_rows(config)
    policy, tok = common.load_policy(config)
    inputs.check_max_length(policy, config)
    if config.task:
        inputs.check_context(policy, tok, greedy, {"held": ("eval_max_new_tokens", config.eval_max_new_tokens)},
                             config.chat_template)
    if config.activation_checkpointing > 0:  # before sharding: FSDP's hooks then run inside the recomputation
        enable_activation_checkpointing(policy, config.activation_checkpointing)
    common.shard(config, policy)  # FSDP: decoder layers sharded (the reference is computed before step 1)
    from rich.console import Console

    console = Console(stderr=True, quiet=not distributed.is_main(), soft_wrap=True)
    train, evals, stats = _encode(config, tok, rows, console)
    greedy_rows, eval_spec = greedy.held, greedy.reward
    config = dataclasses.replace(config, max_steps=total_steps(config, len(train)))
    run = Run(config, "dpo", total_steps=config.max_steps)
    console = run.tracker.console
    share = config.share_prompt and dd.supports_shared_prompt(policy)
    ref, ref_seconds = None, 0.0  # reference-free losses: nothing loaded, run or stored
    if LOSS_TYPES[config.loss_type].reference:
        ref, ref_seconds = ReferenceLogps.prepare(run.run_dir, policy, tok, train + evals, config, share, console)
    run.tracker.write_json("data.json", {"loss_type": config.loss_type, "reference": ref is not None,
                                         "truncation": stats.as_dict(), "train_pairs": len(train),
                                         "eval_pairs": len(evals), "reference_seconds": ref_seconds,
                                         "share_prompt": share})
    optimizer, scheduler, stream, start, rule = offline.prepare(run, policy, config, train, FULL_FT_LR)
    pad = tok.pad_token_id

    def evaluate(step: int):
        t0 = time.perf_counter()
        record = {}
        if evals:
            record.update(preference_eval(policy, evals, ref, config, pad, share))
        if greedy_rows:
            record.update(greedy_eval_sharded(policy, tok, greedy_rows, eval_spec, config.eval_max_new_tokens,
                                                     config.chat_template))
        if record:
            run.log_eval(step, {**record, "seconds": time.perf_counter() - t0})

    def collect_step(step: int, timer) -> tuple[dict, int]:
        """The step's pairs and their backward passes (no weight changes: a Ctrl-C here checkpoints)."""
        with Phase(timer, "update"):
            batch = stream.take(config.batch_size)[distributed.shard(config.batch_size)]
            return accumulate(policy, rule, batch, ref, config, pad, share, total=config.batch_size)

    def update_step(collected) -> loop.StepResult:
        sums, tokens = collected
        smetrics = step_optimizer(rule)
        metrics = {**distributed.reduce_metrics({**sums, "tokens": tokens}, sum_keys=[*sums, "tokens"]), **smetrics,
                   "epoch": stream.epoch + stream.pos / len(train)}
        return loop.StepResult(metrics, tokens)

    metrics = loop.train(loop.Trainer(run, policy, optimizer, scheduler, stream, collect_step, update_step, evaluate),
                         start)
    return run.finish(policy, tok, metrics)
