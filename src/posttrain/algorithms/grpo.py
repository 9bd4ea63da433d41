"""GRPO (Shao et al. 2024, DeepSeekMath), with Dr. GRPO, REINFORCE++ and RLOO advantages.

Each step reads as the doctrine's four stages:

    batch   = collect(policy, prompts, group_size)      # generate (no grad) + score (plain Python)
    adv     = advantage(batch.rewards_PG)                # pure tensors (posttrain.objectives.advantages)
    metrics = update(policy, batch, adv)                 # clipped policy loss (+ beta * KL)

No value model: the group's mean reward is the baseline. Choices and departures from the paper:
- ``advantage`` names an entry of ``advantages.ESTIMATORS`` and ``policy_loss`` one of
  ``losses.POLICY_LOSSES``; each entry says what it needs (where the KL goes, old log-probs):
  ``grpo`` (reward minus group mean, over group std), ``dr_grpo`` (not divided by
  the std; Liu et al. 2025; pair it with ``reduce=seq-mean-token-sum-norm``), ``rloo`` (minus the
  mean of the other G-1; Ahmadian et al. 2024), ``reinforce_pp`` (REINFORCE++-baseline, Hu 2025:
  the KL to the reference enters the per-token reward (k1) instead of the loss, group-mean
  baseline, whitened over the batch).
- The KL term in the loss is the k3 estimator against the reference, weighted by ``beta`` (paper:
  0.04); ``beta=0`` drops the reference entirely. With LoRA the reference is the base model with
  the adapter disabled (no second copy); with full fine-tuning, one frozen copy.
- ``reduce`` defaults to ``token-mean`` (DAPO, verl); the paper's is ``seq-mean-token-mean``.
- ``num_iterations=1`` (the default) is on-policy: the old log-probs are the current ones detached,
  so the ratio is 1 and no extra forward pass is made. With more, they are computed once per batch.
- Log-probs are taken under the sampling temperature (softmax(logits / T)), the distribution the
  tokens were drawn from.
- Rollout mismatch (``losses.correction``): the sampler's log-probs (``sample_logp_BC``, from the
  bfloat16 rollout copy when there is one) are compared every step with the trainer's at the start
  of the update: with ``num_iterations=1`` the training pass's own, detached, inside each
  micro-batch (no extra pass); else the old log-probs. ``mismatch/*`` metrics always;
  ``rollout_correction`` (default ``tis``, cap 2) weights the policy loss (not the KL or entropy
  terms, as verl). A masking kind (``token_mask``, ``seq_mask``) needs the corrected mask before
  the first micro-batch (the global normalisers are its): one extra no-grad pass when there are
  no old log-probs. The policy loss's own ratio stays on-policy (exactly 1) either way.
- Micro-batches hold whole groups, so each prompt is computed once per group in the training
  forward too (``posttrain.objectives.grouped``); gradient accumulation weights micro-batches so the result
  equals one big batch.
- A prompt whose tokens plus ``max_new_tokens`` exceed the model's context is refused, naming its
  file and row, after the model loads and before the run directory is made
  (``inputs.check_context``: the prompt-length policy of every trainer that samples).
- A completion no reward function could judge (None) is masked out of the loss; a non-finite loss
  or gradient skips the update (counted in ``nonfinite_steps``) instead of training on it: the rule
  of ``optim.py``, the same in every trainer.
- Under several processes each takes 1/N of the prompts, whole groups (``rollout.collect``); each
  micro-batch's loss is weighted by its share of the *global* batch's normaliser (tokens,
  sequences or rows, summed over processes), so the summed gradients equal one process's; batch
  statistics (``scale_rewards=batch``, REINFORCE++'s whitening) are taken over every process's
  completions.
- FSDP (``--fsdp`` or an FSDP accelerate config, several processes): the policy's decoder layers
  (with their LoRA weights) are sharded, embeddings, final norm and head replicated
  (``distributed.shard_layers``); the reference is the adapter disabled (LoRA) or a frozen copy
  sharded the same way; sampling gathers the weights (the bfloat16 copy is synced from them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, ClassVar, Literal, Optional

import torch

from posttrain.algorithms import common, inputs, loop
from posttrain.algorithms.collect import (ScoredBatch, collect_timed, micro_groups, review_samples,
                                          sequence_advantages, step_metrics, tokens_of)
from posttrain.algorithms.optim import OptimizerStep, trainable_params
from posttrain.algorithms.reference import Reference
from posttrain.algorithms.evaluate import greedy_eval_sharded
from posttrain.algorithms.run import Run, RunResult, closes_runs_on_failure
from posttrain.objectives import advantages as advmod
from posttrain.objectives import losses
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.runtime import distributed
from posttrain.runtime.config import NonNegative, Positive, refuse
from posttrain.sampling.rollout_model import rollout_model

FULL_FT_LR = common.RL_FULL_FT_LR


@dataclasses.dataclass
class GRPOConfig(common.EpisodeConfig):
    """GRPO, Dr. GRPO, REINFORCE++ and RLOO on verifiable rewards."""

    advantage: Literal["grpo", "dr_grpo", "reinforce_pp", "rloo"] = "grpo"
    """Advantage estimator, an entry of ``advantages.ESTIMATORS`` (see the module docstring)."""
    micro_batch_prompts: Annotated[int, NonNegative] = 1
    """Prompts per forward/backward pass on each process (gradient accumulation); 0 = all of the
    process's prompts at once. Does not change the result, only memory and speed. Default: one
    group per pass (group_size rows, TRL's default micro-batch of 8 at the default group size):
    activation memory is one group's, whatever prompts_per_step is."""
    beta: Annotated[float, NonNegative] = 0.04
    """KL coefficient (k3 estimator in the loss; in the reward for reinforce_pp); 0 = no reference."""
    clip_low: Optional[Annotated[float, common.ClipRange]] = None
    """Clip: the ratio is kept within [1 - clip_low, 1 + clip_high]. None = the policy loss's
    default (``losses.clip_range``: 0.2 for ppo_clip, 3e-4 for gspo, no lower bound for cispo)."""
    clip_high: Optional[Annotated[float, Positive]] = None
    """Upper clip (None = clip_low when that is given, else the policy loss's default: 0.2 for
    ppo_clip, 4e-4 for gspo, 4 for cispo (a weight cap of 5); DAPO's clip-higher uses 0.28)."""
    num_iterations: Annotated[int, Positive] = 1
    """Optimizer updates per generated batch (1 = on-policy, no old-log-prob pass)."""
    reduce: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses are reduced."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """For advantage=grpo: divide by the group's std, the batch's std, or not at all."""
    entropy_coef: Annotated[float, NonNegative] = 0.0
    """Entropy bonus weight (0 = off; entropy is always reported)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: draw more prompts until the batch holds informative groups."""
    max_sampling_rounds: Annotated[int, Positive] = 3
    """Bound on sampling rounds per step with dynamic_sampling."""
    APPLIES_WHEN: ClassVar[dict] = {
        "max_sampling_rounds": ("with --dynamic-sampling", lambda c: c.dynamic_sampling),
        "scale_rewards": ("with --advantage grpo (the estimator that divides by a std)", lambda c: c.advantage == "grpo"),
    }

    @property
    def method(self) -> str:
        return "grpo"

    def per_token_advantages(self) -> bool:
        return self.advantage == "reinforce_pp"  # the estimator that puts the KL in the per-token reward

    def check(self) -> None:
        super().check()
        if self.group_size < 2:
            raise refuse("group_size", f"must be >= 2 for GRPO, got {self.group_size}: the group's mean reward is "
                         "the baseline, so a group of one has an advantage of 0 and nothing to learn")


# ------------------------------------------------------------------------------------- 2. advantages


@dataclasses.dataclass
class Prepared:
    """What the update needs besides the batch: the loss mask (completion tokens of judged
    completions), the global batch's normalisers, the micro-batches, the reference's and the
    sampling policy's log-probs (None where not needed), and the advantages."""

    mask_BC: torch.Tensor
    whole: torch.Tensor
    micro: list[tuple[torch.Tensor, torch.Tensor]]
    """(prompt indices, completion rows) of each micro-batch."""
    ref_BC: Optional[torch.Tensor]
    old_BC: Optional[torch.Tensor]
    adv: torch.Tensor
    """adv_B or adv_BC."""
    weight_BC: Optional[torch.Tensor] = None
    """The rollout correction's per-token weights when taken before the update (None: each
    micro-batch takes them from its own detached log-probs, no extra pass)."""
    mismatch: Optional[dict] = None
    """The mismatch metrics of the whole batch when taken before the update."""


def _in_batch_order(parts_BC: list[torch.Tensor], order_B: torch.Tensor, shape) -> torch.Tensor:
    return torch.empty(shape).index_copy_(0, order_B, torch.cat(parts_BC))


@torch.no_grad()
def advantages(policy, reference: Reference | None, config: GRPOConfig, batch: ScoredBatch) -> Prepared:
    """Stage 2: the reference's log-probs (when ``beta`` > 0), the sampling policy's (for several
    updates per batch, or an estimator that puts the KL in the reward), then the estimator."""
    r = batch.rollouts
    estimator = advmod.ESTIMATORS[config.advantage]
    mask_BC = r.completion_mask_BC * batch.valid_B[:, None].to(r.completion_mask_BC.dtype)
    micro = micro_groups(r.num_prompts, r.group_size, config.micro_batch_prompts)
    order = torch.cat([b for _, b in micro])
    T = config.temperature
    ref_BC = None
    if reference is not None:
        # shifted=True: the log-probs of the policy's entropy pass in `optimise` (computed on shifted
        # logits) to the bit, so an unchanged policy has a KL of exactly 0; the entropy is not needed
        with reference.model() as ref_model:
            ref_BC = _in_batch_order([rollout_logprobs(ref_model, r, T, rows=mb, shifted=True)
                                      for mb, _ in micro], order, mask_BC.shape)
    kl_in_reward = estimator.kl == "reward" and ref_BC is not None
    old_BC = None
    if config.num_iterations > 1 or kl_in_reward:
        old_BC = _in_batch_order([rollout_logprobs(policy, r, T, rows=mb) for mb, _ in micro], order, mask_BC.shape)
    kl_BC = losses.kl_estimate(old_BC, ref_BC, "k1") * mask_BC if kl_in_reward else None
    adv = estimator.compute(advmod.AdvantageInputs(batch.rewards_PG(), mask_BC, kl_BC, config.beta,
                                                   config.scale_rewards, distributed.all_sum))
    # The rollout correction from the trainer's log-probs at the start of the update: the old ones
    # when they exist; a masking kind needs them before the first micro-batch (the normalisers are
    # of the corrected mask), so it pays one no-grad pass when they do not; otherwise each
    # micro-batch takes them from its own detached log-probs (``micro_loss``), for free.
    start_BC = old_BC
    if start_BC is None and losses.ROLLOUT_CORRECTIONS[config.rollout_correction].masks:
        start_BC = _in_batch_order([rollout_logprobs(policy, r, T, rows=mb) for mb, _ in micro], order, mask_BC.shape)
    weight_BC = mismatch = None
    if start_BC is not None:
        weight_BC, keep_BC, mm = config.correction(start_BC, r.sample_logp_BC, mask_BC)
        mask_BC = mask_BC * keep_BC.to(mask_BC.dtype)
        mismatch = {k: float(v) for k, v in mm.items()}
    whole = distributed.all_sum(losses.reduction_counts(mask_BC))  # the global batch's normalisers
    return Prepared(mask_BC, whole, micro, ref_BC, old_BC, adv, weight_BC, mismatch)


# ------------------------------------------------------------------------------------- 3. optimise


def micro_loss(policy, config: GRPOConfig, batch: ScoredBatch, p: Prepared, kl_in_loss: bool,
               mb: torch.Tensor, b: torch.Tensor):
    """(loss, stats) of one micro-batch: the policy loss, + beta * KL when it goes in the loss,
    - the entropy bonus (run through DDP's forward in data-parallel runs)."""
    logp, ent = rollout_logprobs(policy, batch.rollouts, config.temperature, with_entropy=True, rows=mb)
    m = p.mask_BC[b]
    old = logp.detach() if p.old_BC is None else p.old_BC[b]
    mismatch = {}
    if p.weight_BC is None:  # on-policy: the trainer's log-prob at the start of the update is this pass's
        weight, keep, mm = config.correction(logp.detach(), batch.rollouts.sample_logp_BC[b], m)
        mismatch = {k: float(v) for k, v in mm.items()}
    else:
        weight = p.weight_BC[b]
    name = config.policy_loss
    loss, pm = losses.POLICY_LOSSES[name].compute(
        logp, old, p.adv[b], m, *losses.clip_range(name, config.clip_low, config.clip_high), config.reduce,
        max_len=config.max_new_tokens, weight_BT=weight, clip_ratio_c=config.clip_ratio_c)
    ent_loss, em = losses.entropy_bonus(ent, m, config.entropy_coef, config.reduce, config.max_new_tokens)
    stats = {"pg_loss": float(loss.detach()), "clip_frac": float(pm["clip_frac"]), "entropy": float(em["entropy"]),
             **mismatch}
    if p.ref_BC is not None:
        kl_loss, km = losses.kl_penalty(logp, p.ref_BC[b], m, config.beta, "k3", config.reduce, config.max_new_tokens)
        stats["kl"] = float(km["kl"])
        if kl_in_loss:
            loss = loss + kl_loss
    if config.entropy_coef:
        loss = loss + ent_loss
    stats["loss"] = float(loss.detach())
    return loss, stats


def optimise(policy, rule: OptimizerStep, config: GRPOConfig, batch: ScoredBatch, p: Prepared) -> dict:
    """Stage 3: ``num_iterations`` optimizer updates over the batch, each accumulated over the
    micro-batches (weighted by their share of the global batch). Returns the metrics of the first
    pass (losses weighted like the gradient, the rest per token) and the updates' gradient norms."""
    kl_in_loss = advmod.ESTIMATORS[config.advantage].kl == "loss"
    loss_fn = functools.partial(micro_loss, policy, config, batch, p, kl_in_loss)
    sums: dict[str, float] = {}
    grad_norms, nonfinite = [], 0
    policy.train()
    for it in range(config.num_iterations):
        for j, (mb, b) in enumerate(p.micro):
            last = j == len(p.micro) - 1
            out = rule.forward(loss_fn, mb, b, last=last)
            if out is None:
                continue
            loss, stats = out
            m = p.mask_BC[b]
            w = losses.reduction_share(config.reduce, m, p.whole)
            if rule.backward(loss, w, last) and it == 0:
                tok_w = float(m.sum()) / max(1.0, float(p.whole[0]))
                for k, v in stats.items():
                    if k in common.MISMATCH_MAX:
                        sums[k] = max(sums.get(k, v), v)
                    else:
                        sums[k] = sums.get(k, 0.0) + v * (w if k in ("loss", "pg_loss") else tok_w)
        (norm,), ok = rule.step()
        if ok:
            grad_norms.append(norm)
        nonfinite += 0 if ok else 1
    lengths = batch.rollouts.completion_mask_BC.sum(1).float()
    metrics = {**sums, "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
               "nonfinite_steps": nonfinite, "len/mean": float(lengths.mean()),
               "len/clipped_frac": float(batch.rollouts.clipped_B.float().mean()),
               "adv/abs_mean": float(p.adv.abs().mean()), **(p.mismatch or {})}
    return distributed.reduce_metrics(metrics, sum_keys=[k for k in sums if k not in common.MISMATCH_MAX],
                                      max_keys=common.MISMATCH_MAX)


def update(policy, rule: OptimizerStep, config: GRPOConfig, batch: ScoredBatch, reference: Reference | None) -> dict:
    """Stages 2 and 3 for one collected batch; returns their metrics (over every process)."""
    return optimise(policy, rule, config, batch, advantages(policy, reference, config, batch))


# ------------------------------------------------------------------------------------- the run


@closes_runs_on_failure
def train_grpo(config: GRPOConfig) -> RunResult:
    """Train with GRPO (or Dr. GRPO / REINFORCE++ / RLOO); returns the run directory and metrics."""
    rows, reward_fn, eval_fn, policy, tok = inputs.rollout_setup(config)
    train_rows, eval_rows = rows.train, rows.held
    run = Run(config, "grpo", total_steps=config.max_steps)
    # before restore: a frozen copy must hold the initial weights
    reference = Reference(policy, config.lora) if config.beta > 0 else None
    common.shard(config, policy, reference.copy if reference else None)  # FSDP: the copy sharded like the policy
    optimizer = common.build_optimizer(policy, config, common.resolve_lr(config, FULL_FT_LR))
    scheduler = common.build_scheduler(optimizer, config)
    stream = common.PromptStream(train_rows, config.seed)
    sampler_gen = torch.Generator().manual_seed(config.seed)
    run.generators["sampling"] = sampler_gen
    start, _ = run.restore(policy, optimizer, scheduler, stream)
    dp = distributed.data_parallel(policy)  # data-parallel runs: DDP reduces the gradients
    rule = OptimizerStep(optimizer, [trainable_params(policy)], config.max_grad_norm, [policy], dp)
    rollout = rollout_model(policy, config.rollout_dtype)
    sampling = config.sampling()
    eval_tokens = config.completion_budgets()["held"][1]

    def evaluate(step: int):
        if eval_rows:
            res = greedy_eval_sharded(policy, tok, eval_rows, eval_fn, eval_tokens, config.chat_template)
            run.log_eval(step, res)

    def collect_step(step: int, timer) -> tuple[ScoredBatch, dict]:
        return collect_timed(timer, policy, tok, stream, config.prompts_per_step, config.group_size, sampling,
                             reward_fn, sampler_gen, config.chat_template, config.dynamic_sampling,
                             config.max_sampling_rounds, rollout)

    def update_step(collected) -> loop.StepResult:
        batch, cmetrics = collected
        prepared = advantages(policy, reference, config, batch)
        umetrics = optimise(policy, rule, config, batch, prepared)
        return loop.StepResult({**step_metrics(batch, reward_fn, cmetrics), **umetrics}, tokens_of(batch),
                               review_samples(batch, config.samples_per_step,
                                              sequence_advantages(prepared.adv, prepared.mask_BC)))

    trainer = loop.Trainer(run, policy, optimizer, scheduler, stream, collect_step, update_step, evaluate)
    metrics = loop.train(trainer, start)
    return run.finish(policy, tok, metrics)
