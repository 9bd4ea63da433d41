"""GRPO (Shao et al. 2024, DeepSeekMath), with Dr. GRPO, REINFORCE++ and RLOO advantages.

Each step reads as the doctrine's four stages:

    batch   = collect(policy, prompts, group_size)      # generate (no grad) + score (plain Python)
    adv     = advantage(batch.rewards_PG)                # pure tensors (posttrain.advantages)
    metrics = update(policy, batch, adv)                 # clipped policy loss (+ beta * KL)

No value model: the group's mean reward is the baseline. Choices and departures from the paper:
- ``advantage``: ``grpo`` (reward minus group mean, over group std), ``dr_grpo`` (not divided by
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
- Micro-batches hold whole groups, so each prompt is computed once per group in the training
  forward too (``posttrain.grouped``); gradient accumulation weights micro-batches so the result
  equals one big batch.
- A completion no reward function could judge (None) is masked out of the loss; a non-finite loss
  or gradient skips the step (counted in ``nonfinite_steps``) instead of training on it.
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
from typing import Literal, Optional

import torch

from posttrain import advantages as advmod
from posttrain import distributed, losses
from posttrain import rewards as rw
from posttrain.algorithms import common
from posttrain.algorithms.rollout import ScoredBatch, collect, step_metrics, tokens_of
from posttrain.generation import SamplingConfig
from posttrain.grouped import rollout_logprobs
from posttrain.rollout_model import rollout_model

FULL_FT_LR = 1e-6
"""The doctrine's RL learning rate ("Use lower LR for RL - 1e-6 instead of 1e-5")."""


@dataclasses.dataclass
class GRPOConfig(common.TrainConfig):
    """GRPO, Dr. GRPO, REINFORCE++ and RLOO on verifiable rewards."""

    reward: Optional[str] = None
    """Reward spec, e.g. 'math', 'math,format:0.2', 'code' (default: the task's reward)."""
    eval_reward: Optional[str] = None
    """Reward used for held-out evaluation (default: the task's reward, else --reward)."""
    advantage: Literal["grpo", "dr_grpo", "reinforce_pp", "rloo"] = "grpo"
    """Advantage estimator (see the module docstring)."""
    group_size: int = 8
    """Completions sampled per prompt (the doctrine's K)."""
    prompts_per_step: int = 8
    """Prompts per step, over all processes (a multiple of their number; each samples and trains on
    prompts_per_step / N of them, whole groups); a step trains on prompts_per_step x group_size completions."""
    micro_batch_prompts: int = 1
    """Prompts per forward/backward pass on each process (gradient accumulation); 0 = all of the
    process's prompts at once. Does not change the result, only memory and speed. Default: one
    group per pass (group_size rows, TRL's default micro-batch of 8 at the default group size):
    activation memory is one group's, whatever prompts_per_step is."""
    max_new_tokens: int = 256
    """Completion length limit."""
    min_new_tokens: int = 0
    """Forbid EOS before this many tokens (for benchmarks that force equal lengths)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    beta: float = 0.04
    """KL coefficient (k3 estimator in the loss; in the reward for reinforce_pp); 0 = no reference."""
    clip_low: float = 0.2
    """PPO clip: the ratio is kept within [1 - clip_low, 1 + clip_high]."""
    clip_high: Optional[float] = None
    """Upper clip (None = clip_low; DAPO's clip-higher uses 0.28)."""
    num_iterations: int = 1
    """Optimizer updates per generated batch (1 = on-policy, no old-log-prob pass)."""
    reduce: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses are reduced."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """For advantage=grpo: divide by the group's std, the batch's std, or not at all."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0 = off; entropy is always reported)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: draw more prompts until the batch holds informative groups."""
    max_sampling_rounds: int = 3
    """Bound on sampling rounds per step with dynamic_sampling."""
    chat_template: bool = True
    """Wrap plain-string prompts in the tokenizer's chat template."""
    samples_per_step: int = 2
    """Groups per step written to samples.jsonl for human review."""
    eval_max_new_tokens: int = 0
    """Completion limit during evaluation (0 = max_new_tokens)."""

    @property
    def method(self) -> str:
        return "grpo"


def advantages_of(config: GRPOConfig, batch: ScoredBatch, kl_BC: torch.Tensor | None, mask_BC: torch.Tensor):
    """adv_B (grpo, dr_grpo, rloo) or adv_BC (reinforce_pp) for a scored batch."""
    rewards_PG = batch.rewards_PG()
    if config.advantage == "grpo":
        return advmod.grpo(rewards_PG, scale=config.scale_rewards, all_sum=distributed.all_sum).reshape(-1)
    if config.advantage == "dr_grpo":
        return advmod.grpo(rewards_PG, scale="none").reshape(-1)
    if config.advantage == "rloo":
        return advmod.rloo(rewards_PG).reshape(-1)
    kl = kl_BC if kl_BC is not None else torch.zeros_like(mask_BC, dtype=torch.float32)
    return advmod.reinforce_pp(rewards_PG.reshape(-1), kl, mask_BC, kl_coef=config.beta, group_size=batch.group_size,
                               all_sum=distributed.all_sum)


def micro_batches(n_prompts: int, size: int) -> list[torch.Tensor]:
    size = size if size > 0 else n_prompts
    return [torch.arange(i, min(i + size, n_prompts)) for i in range(0, n_prompts, size)]


class _Reference:
    """Log-probs under the frozen reference: the adapter disabled (LoRA) or a frozen copy."""

    def __init__(self, policy, config: GRPOConfig):
        self.policy = policy
        self.copy = None if config.lora or config.beta == 0 else common.frozen_copy(policy)
        self.enabled = config.beta > 0

    @torch.no_grad()
    def logprobs(self, batch: ScoredBatch, temperature: float, rows: torch.Tensor) -> torch.Tensor:
        # with_entropy=True: the same arithmetic as the policy's pass in `update`, so an unchanged
        # policy has a KL of exactly 0 (the entropy path computes log-probs on shifted logits)
        if self.copy is not None:
            return rollout_logprobs(self.copy, batch.rollouts, temperature, with_entropy=True, rows=rows)[0]
        with self.policy.disable_adapter():
            return rollout_logprobs(self.policy, batch.rollouts, temperature, with_entropy=True, rows=rows)[0]


def update(policy, optimizer, scheduler, config: GRPOConfig, batch: ScoredBatch, reference: _Reference,
           dp: distributed.DataParallel | None = None) -> dict:
    """One generated batch -> num_iterations optimizer steps. Returns the step's metrics (over
    every process's part of the batch). ``dp``: the policy under DDP (data-parallel runs)."""
    r = batch.rollouts
    mask_BC = r.completion_mask_BC * batch.valid_B[:, None].to(r.completion_mask_BC.dtype)
    whole = distributed.all_sum(losses.reduction_counts(mask_BC))  # the global batch's normalisers
    mbs = micro_batches(r.num_prompts, config.micro_batch_prompts)
    G, T = r.group_size, config.temperature
    rows_of = [(mb[:, None] * G + torch.arange(G)[None, :]).reshape(-1) for mb in mbs]
    ref_BC = torch.cat([reference.logprobs(batch, T, mb) for mb in mbs]) if reference.enabled else None
    order = torch.cat(rows_of)
    if ref_BC is not None:  # back to batch order
        ref_BC = torch.empty_like(ref_BC).index_copy_(0, order, ref_BC)
    # old log-probs: for several updates per batch, or REINFORCE++'s KL in the reward (with a reference)
    need_old = config.num_iterations > 1 or (config.advantage == "reinforce_pp" and reference.enabled)
    old_BC = None
    if need_old:
        with torch.no_grad():
            old_BC = torch.empty(mask_BC.shape).index_copy_(0, order, torch.cat(
                [rollout_logprobs(policy, r, T, rows=mb) for mb in mbs]))
    kl_reward_BC = losses.kl_estimate(old_BC, ref_BC, "k1") * mask_BC if (
        config.advantage == "reinforce_pp" and ref_BC is not None) else None
    adv = advantages_of(config, batch, kl_reward_BC, mask_BC)
    kl_in_loss = reference.enabled and config.advantage != "reinforce_pp"

    sums: dict[str, float] = {}
    grad_norms, nonfinite = [], 0
    policy.train()
    sharded = distributed.is_sharded(policy)

    def micro_loss(mb: torch.Tensor, b: torch.Tensor):
        """(loss, stats) of one micro-batch (run through DDP's forward in data-parallel runs)."""
        logp, ent = rollout_logprobs(policy, r, T, with_entropy=True, rows=mb)
        m = mask_BC[b]
        old = logp.detach() if old_BC is None else old_BC[b]
        a = adv[b]
        loss, pm = losses.policy_loss(logp, old, a, m, config.clip_low, config.clip_high, config.reduce,
                                      max_len=config.max_new_tokens)
        stats = {"pg_loss": float(loss.detach()), "clip_frac": float(pm["clip_frac"]), "entropy": float(losses.masked_mean(ent.detach(), m))}
        if reference.enabled:
            kl_BC = losses.kl_estimate(logp, ref_BC[b], "k3")
            kl = losses.reduce(kl_BC, m, config.reduce, config.max_new_tokens)
            stats["kl"] = float(losses.masked_mean(kl_BC.detach(), m))
            if kl_in_loss:
                loss = loss + config.beta * kl
        if config.entropy_coef:
            loss = loss - config.entropy_coef * losses.reduce(ent, m, config.reduce, config.max_new_tokens)
        stats["loss"] = float(loss.detach())
        return loss, stats

    for it in range(config.num_iterations):
        step_ok = True
        for j, (mb, b) in enumerate(zip(mbs, rows_of)):
            last_mb = j == len(mbs) - 1
            loss, stats = distributed.run(dp, micro_loss, mb, b, sync=last_mb)
            m = mask_BC[b]
            w = losses.reduction_share(config.reduce, m, whole)
            if not torch.isfinite(loss):
                step_ok = False
                if not sharded and dp is None:
                    continue
            # FSDP and DDP: every rank runs every backward (they communicate); a non-finite one is
            # dropped with the step below. Gradients are reduced once, in the last micro-batch's backward.
            distributed.grad_sync(policy, last_mb)
            (loss * w).backward()
            if not step_ok:
                continue
            if it == 0:
                tok_w = float(m.sum()) / max(1.0, float(whole[0]))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * (w if k in ("loss", "pg_loss") else tok_w)
        if not distributed.all_true(step_ok):
            policy.zero_grad(set_to_none=True)
            scheduler.step()
            nonfinite += 1
            continue
        norm, ok = common.grad_step(policy, optimizer, scheduler, config.max_grad_norm)
        grad_norms.append(norm)
        nonfinite += 0 if ok else 1
    lengths = r.completion_mask_BC.sum(1).float()
    metrics = {**sums, "grad_norm": sum(grad_norms) / max(1, len(grad_norms)), "nonfinite_steps": nonfinite,
               "lr": scheduler.get_last_lr()[0], "len/mean": float(lengths.mean()),
               "len/clipped_frac": float(r.clipped_B.float().mean()), "adv/abs_mean": float(adv.abs().mean())}
    return distributed.reduce_metrics(metrics, sum_keys=sums)


def _samples(batch: ScoredBatch, n_groups: int) -> list[dict]:
    out = []
    G = batch.group_size
    for p in range(min(n_groups, len(batch.rows))):
        out.append({
            "prompt": rw.as_text(batch.rows[p]["prompt"]),
            "completions": batch.texts[p * G:(p + 1) * G],
            "rewards": [None if v != v else float(v) for v in batch.rewards_B[p * G:(p + 1) * G].tolist()],
            "parts": {k: v[p * G:(p + 1) * G] for k, v in batch.parts.items()},
        })
    return out


def train_grpo(config: GRPOConfig) -> common.RunResult:
    """Train with GRPO (or Dr. GRPO / REINFORCE++ / RLOO); returns the run directory and metrics."""
    if config.group_size < 2:
        raise ValueError("group_size must be >= 2: the group mean is the baseline")
    common.start(config)
    distributed.check_divisible("prompts_per_step", config.prompts_per_step)
    train_rows, eval_rows, task_reward = common.load_rows_for(config, "prompt")
    reward_spec = config.reward or task_reward
    if reward_spec is None:
        raise ValueError("no reward: pass --reward (e.g. math, code, 'math,format:0.2')")
    reward_fn = rw.from_spec(reward_spec)
    eval_spec = config.eval_reward or task_reward or reward_spec
    run = common.Run(config, "grpo", total_steps=config.max_steps)
    policy, tok = common.load_policy(config)
    reference = _Reference(policy, config)  # before restore: a frozen copy must hold the initial weights
    common.shard(config, policy, reference.copy)  # FSDP: the frozen copy is sharded like the policy
    lr = common.resolve_lr(config, FULL_FT_LR)
    optimizer = common.build_optimizer(policy, config, lr)
    scheduler = common.build_scheduler(optimizer, config)
    stream = common.PromptStream(train_rows, config.seed)
    sampler_gen = torch.Generator().manual_seed(config.seed)
    run.generators["sampling"] = sampler_gen
    start, _ = run.restore(policy, optimizer, scheduler, stream)
    dp = distributed.data_parallel(policy)  # data-parallel runs: DDP reduces the gradients
    rollout = rollout_model(policy, config.rollout_dtype)
    sampling = SamplingConfig(config.temperature, config.top_p, config.top_k, config.max_new_tokens, config.min_new_tokens)
    eval_tokens = config.eval_max_new_tokens or config.max_new_tokens

    def evaluate(step: int):
        if eval_rows:
            res = common.greedy_eval_sharded(policy, tok, eval_rows, eval_spec, eval_tokens, config.chat_template)
            run.log_eval(step, res)

    if start == 0 and config.eval_at_start:
        evaluate(0)
    metrics: dict = {}
    last = config.max_steps
    for step in range(start + 1, config.max_steps + 1):
        timer = common.StepTimer()
        policy.eval()
        with run.stop_safely(step, policy, optimizer, scheduler, stream):
            batch, cmetrics = collect(policy, tok, stream, config.prompts_per_step, config.group_size, sampling,
                                      reward_fn, sampler_gen, config.chat_template, config.dynamic_sampling,
                                      config.max_sampling_rounds, rollout)
        for k in ("time/gen", "time/score"):
            timer.add(k[5:], cmetrics.pop(k))
        with common.Phase(timer, "update"):
            umetrics = update(policy, optimizer, scheduler, config, batch, reference, dp)
        metrics = {**step_metrics(batch, reward_fn, cmetrics), **umetrics, **timer.metrics()}
        metrics["tokens_per_s"] = tokens_of(batch) / max(1e-9, metrics["time/step"])
        run.log(step, metrics, _samples(batch, config.samples_per_step))
        last = run.end_step(step, last, evaluate, lambda s: run.checkpoint(s, policy, optimizer, scheduler, stream))
        if step == last:
            break
    run.final_eval(last, evaluate)
    return run.finish(policy, tok, metrics)
