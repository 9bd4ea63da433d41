"""On-policy distillation (``posttrain train distill --teacher SPEC``): Agarwal et al. 2024 (GKD,
on-policy, reverse KL); Thinking Machines 2025, "On-Policy Distillation".

Each step reads as GRPO's stages, with the teacher in place of the group baseline:

    batch   = collect(student, prompts, group_size)               # collect.py: the student samples
    t_BT    = teacher_scores(teacher, batch)                       # frozen teacher, T = 1, chunked head
    adv_BT  = -(log pi_student(y_t) - log pi_teacher(y_t))         # objectives/distill.py
    metrics = grpo.optimise(student, batch, Prepared(adv_BT))      # PPO-clip / TIS, GRPO's update

Choices, and where they depart from the papers and from TRL:
- The per-token advantage is the negative reverse KL's one-sample estimate of each sampled token,
  discount 0, no baseline, no whitening (the Thinking Machines recipe). GKD differentiates the full
  token-level divergence over the vocabulary; TRL's ``GKDTrainer`` takes a generalised JSD over
  both models' full [B, T, V] logits. Here neither model's full logits are materialised.
- ``log pi_student(y_t)`` is the sampler's (``Rollouts.sample_logp_BC``: the distribution the token
  was drawn from, at the sampling temperature, from the bfloat16 rollout copy when there is one),
  as in the recipe: no extra student pass. The loss is ``--policy-loss`` (default ppo_clip) with
  GRPO's rollout correction (TIS by default), reductions and micro-batching, via
  ``grpo.optimise``; with ``num_iterations`` > 1 the old log-probs are computed once per batch.
- The teacher (any model spec: a model directory, a run's ``final/``, a LoRA adapter directory,
  merged on load) is loaded once, frozen, in eval mode, and scored at temperature 1 whatever the
  student's sampling temperature. It must share the student's tokenizer (same vocabulary, same
  special tokens): checked from the tokenizer files before either model loads, a ``ConfigError``
  naming ``--teacher`` otherwise.
- A reward (``--reward``, or the task's) is optional: when there is one, it is reported
  (``reward/*``) and drives greedy evaluation as in GRPO, never the loss. Completions no reward
  judges are still trained on.
- Metrics: ``distill/reverse_kl`` (per sampled token), ``distill/agreement`` (fraction of sampled
  tokens that are the teacher's argmax), ``distill/teacher_prob``, plus GRPO's update metrics.
- No reference model and no KL penalty: the teacher is the anchor.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal, Optional

import torch

from posttrain.algorithms import common, inputs, loop
from posttrain.algorithms import grpo
from posttrain.algorithms.collect import (ScoredBatch, collect_timed, micro_groups, review_samples, step_metrics,
                                          tokens_of)
from posttrain.algorithms.evaluate import greedy_eval_sharded
from posttrain.algorithms.optim import OptimizerStep, trainable_params
from posttrain.algorithms.run import Run, RunResult, closes_runs_on_failure
from posttrain.objectives import distill as dobj
from posttrain.objectives import losses
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.runtime import distributed
from posttrain.runtime.config import ConfigError, NonNegative, Positive, refuse
from posttrain.sampling.rollout_model import rollout_model

FULL_FT_LR = common.RL_FULL_FT_LR


@dataclasses.dataclass
class DistillConfig(common.RolloutConfig):
    """On-policy distillation: the student samples, a frozen teacher scores every token, reward = -reverse KL."""

    teacher: Optional[str] = None
    """Teacher model spec (required): a model directory, a run's final/ or run directory, a LoRA
    adapter directory, a .gguf file; it must share the student's tokenizer."""
    kl_coef: Annotated[float, Positive] = 1.0
    """Weight of the per-token reverse KL in the advantage (the recipe's 1)."""
    group_size: Annotated[int, Positive] = 4
    """Completions sampled per prompt (no baseline is taken from the group: 1 works; larger groups
    share each prompt's forward pass)."""
    micro_batch_prompts: Annotated[int, NonNegative] = 1
    """Prompts per forward/backward pass (gradient accumulation; 0 = all at once). Does not change
    the result, only memory and speed."""
    clip_low: Optional[Annotated[float, common.ClipRange]] = None
    """Clip: the ratio is kept within [1 - clip_low, 1 + clip_high] (None = the policy loss's default)."""
    clip_high: Optional[Annotated[float, Positive]] = None
    """Upper clip (None = clip_low when given, else the policy loss's default)."""
    num_iterations: Annotated[int, Positive] = 1
    """Optimizer updates per sampled batch (1 = on-policy)."""
    reduce: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses are reduced."""
    entropy_coef: Annotated[float, NonNegative] = 0.0
    """Entropy bonus weight (0 = off; entropy is always reported)."""

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model", "teacher")
    advantage: ClassVar[str] = "reinforce_pp"
    """For ``grpo.optimise``: an estimator whose KL is not a loss term (there is no reference here)."""

    @property
    def method(self) -> str:
        return "distill"

    def check(self) -> None:
        super().check()
        if self.teacher is None:
            raise refuse("teacher", "on-policy distillation needs a teacher: give --teacher SPEC (a model "
                         "directory, a run directory or its final/, an adapter directory)")


# ------------------------------------------------------------------------------ set-up checks


def tokenizer_difference(student_tok, teacher_tok) -> Optional[str]:
    """Why two tokenizers cannot be used as student and teacher (None when they agree): the
    vocabularies (token -> id) and the special tokens must be the same."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:3]
        only_t = sorted(set(tv) - set(sv))[:3]
        moved = sum(1 for k in set(sv) & set(tv) if sv[k] != tv[k])
        return (f"the vocabularies differ ({len(sv)} vs {len(tv)} tokens; only the student's: {only_s}, only the "
                f"teacher's: {only_t}, same token with another id: {moved})")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if a != b:
            return f"{name} differs ({a} vs {b})"
    return None


def check_tokenizers(config: DistillConfig) -> None:
    """The student's and the teacher's tokenizers, loaded without their weights, must agree: a
    ``ConfigError`` naming ``--teacher`` otherwise (before any model loads)."""
    from posttrain.models import EMBEDDED, load_tokenizer, local_dir

    def tok(spec: str):
        return load_tokenizer(spec if spec == EMBEDDED else str(local_dir(spec)))

    why = tokenizer_difference(tok(config.model), tok(config.teacher))
    if why:
        raise ConfigError(f"field 'teacher': --teacher {config.teacher} does not share the student's tokenizer "
                          f"(--model {config.model}): {why}. On-policy distillation scores the student's tokens with "
                          "the teacher, so both must use one tokenizer: pick a teacher of the same family", ("teacher",))


def load_teacher(config: DistillConfig):
    """The frozen teacher, in eval mode, an adapter merged into its base."""
    from posttrain.models import load_model, resolve_device
    from posttrain.models.split import split_model

    teacher, _ = load_model(config.teacher, device=resolve_device(config.device))
    if hasattr(teacher, "merge_and_unload"):  # a LoRA adapter directory: one plain model, faster
        teacher = teacher.merge_and_unload()
    teacher.eval()
    teacher.requires_grad_(False)
    why = split_model(teacher)
    if isinstance(why, str):
        raise ConfigError(f"field 'teacher': --teacher {config.teacher}: its output head cannot be applied by chunks "
                          f"({why})", ("teacher",))
    return teacher


def unjudged(prompt, completion, **_) -> None:
    """The reward of a run without one: judges nothing (distillation needs no reward)."""
    return None


# ------------------------------------------------------------------------------ 2. advantages


@torch.no_grad()
def advantages(policy, teacher, config: DistillConfig, batch: ScoredBatch) -> tuple[grpo.Prepared, dict]:
    """Stage 2: the teacher's log-probs of the sampled tokens, the per-token advantages against the
    sampler's log-probs, and what ``grpo.optimise`` needs (``grpo.Prepared``); plus the distill metrics."""
    r = batch.rollouts
    mask_BC = r.completion_mask_BC.float()
    micro = micro_groups(r.num_prompts, r.group_size, config.micro_batch_prompts)
    order = torch.cat([b for _, b in micro])
    parts = [dobj.teacher_scores(teacher, r, rows=mb) for mb, _ in micro]
    teacher_BC = grpo._in_batch_order([p[0] for p in parts], order, mask_BC.shape)
    agree_BC = grpo._in_batch_order([p[1].float() for p in parts], order, mask_BC.shape)
    student_BC = r.sample_logp_BC.float()
    adv_BC = dobj.reverse_kl_advantages(student_BC, teacher_BC, mask_BC, config.kl_coef)
    dmetrics = dobj.distill_metrics(student_BC, teacher_BC, agree_BC, mask_BC)
    old_BC = None
    if config.num_iterations > 1:
        old_BC = grpo._in_batch_order([rollout_logprobs(policy, r, config.temperature, rows=mb) for mb, _ in micro],
                                      order, mask_BC.shape)
    start_BC = old_BC
    if start_BC is None and losses.ROLLOUT_CORRECTIONS[config.rollout_correction].masks:
        start_BC = grpo._in_batch_order([rollout_logprobs(policy, r, config.temperature, rows=mb)
                                         for mb, _ in micro], order, mask_BC.shape)
    weight_BC = mismatch = None
    if start_BC is not None:
        weight_BC, keep_BC, mm = config.correction(start_BC, r.sample_logp_BC, mask_BC)
        mask_BC = mask_BC * keep_BC.to(mask_BC.dtype)
        mismatch = {k: float(v) for k, v in mm.items()}
    whole = distributed.all_sum(losses.reduction_counts(mask_BC))
    return grpo.Prepared(mask_BC, whole, micro, None, old_BC, adv_BC, weight_BC, mismatch), dmetrics


def update(policy, teacher, rule: OptimizerStep, config: DistillConfig, batch: ScoredBatch) -> dict:
    """Stages 2 and 3 for one sampled batch; returns their metrics (over every process)."""
    prepared, dmetrics = advantages(policy, teacher, config, batch)
    n = float(prepared.mask_BC.sum())
    dmetrics = {k: distributed.all_sum(torch.tensor(v * n, dtype=torch.float64)) for k, v in dmetrics.items()}
    total = max(1.0, float(distributed.all_sum(torch.tensor(n, dtype=torch.float64))))
    return {**{k: float(v) / total for k, v in dmetrics.items()}, **grpo.optimise(policy, rule, config, batch, prepared)}


# ------------------------------------------------------------------------------ the run


@closes_runs_on_failure
def train_distill(config: DistillConfig) -> RunResult:
    """On-policy distillation from ``config.teacher``; returns the run directory and metrics."""
    from posttrain import rewards

    common.start(config)
    distributed.check_divisible("prompts_per_step", config.prompts_per_step)
    rows = inputs.load_rows_for(config, "prompt")
    spec = config.reward or rows.reward
    if config.data is not None and spec:
        inputs.check_reward_columns(config.data, rows.train + rows.held, spec)
    reward_fn = rewards.from_spec(spec) if spec else rewards.combine([(unjudged, 1.0)])
    eval_spec = config.eval_reward or rows.reward or spec
    eval_fn = None if not eval_spec else (eval_spec if eval_spec == spec
                                          else rewards.from_spec(eval_spec, flag="--eval-reward"))
    check_tokenizers(config)  # before either model loads
    policy, tok = common.load_policy(config)
    teacher = load_teacher(config)
    inputs.check_context(policy, tok, rows, config.completion_budgets(), config.chat_template)
    run = Run(config, "distill", total_steps=config.max_steps)
    common.shard(config, policy)
    optimizer = common.build_optimizer(policy, config, common.resolve_lr(config, FULL_FT_LR))
    scheduler = common.build_scheduler(optimizer, config)
    stream = common.PromptStream(rows.train, config.seed)
    sampler_gen = torch.Generator().manual_seed(config.seed)
    run.generators["sampling"] = sampler_gen
    start, _ = run.restore(policy, optimizer, scheduler, stream)
    dp = distributed.data_parallel(policy)
    rule = OptimizerStep(optimizer, [trainable_params(policy)], config.max_grad_norm, [policy], dp)
    rollout = rollout_model(policy, config.rollout_dtype)
    sampling = config.sampling()
    eval_tokens = config.completion_budgets()["held"][1]

    def evaluate(step: int):
        if rows.held and eval_fn is not None:
            run.log_eval(step, greedy_eval_sharded(policy, tok, rows.held, eval_fn, eval_tokens, config.chat_template))

    def collect_step(step: int, timer):
        return collect_timed(timer, policy, tok, stream, config.prompts_per_step, config.group_size, sampling,
                             reward_fn, sampler_gen, config.chat_template, rollout=rollout)

    def update_step(collected) -> loop.StepResult:
        batch, cmetrics = collected
        umetrics = update(policy, teacher, rule, config, batch)
        umetrics.pop("adv/abs_mean", None)
        smetrics = step_metrics(batch, reward_fn, cmetrics) if spec else {}
        smetrics.pop("frac_zero_std", None)  # no group baseline: equal rewards do not matter here
        samples = review_samples(batch, config.samples_per_step)
        if not spec:  # no reward: the samples carry none (not a column of Nones the doctor would flag)
            samples = [{k: v for k, v in s.items() if k not in ("rewards", "parts")} for s in samples]
        return loop.StepResult({**smetrics, **umetrics}, tokens_of(batch), samples)

    trainer = loop.Trainer(run, policy, optimizer, scheduler, stream, collect_step, update_step, evaluate)
    metrics = loop.train(trainer, start)
    return run.finish(policy, tok, metrics)
