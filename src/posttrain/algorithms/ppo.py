"""PPO for language models (Schulman et al. 2017; as applied to LMs by Ziegler et al. 2019,
Stiennon et al. 2020 and Ouyang et al. 2022): a policy, a value model, a frozen reference and a
reward (typically a trained reward model, ``reward_model(runs/<rm>/final)``).

Each step reads as the GRPO trainer's stages, with the critic in the middle (the loop, checkpoints
and evaluations are ``loop.py``'s, the same for every trainer):

    batch   = collect(policy, prompts, group_size)                      # generate (no grad) + score
    r_t     = -kl_coef * (logp_old - logp_ref)_t  (+ R at the last token) # per-token reward (k1)
    adv, G  = gae(r, V_old, gamma, lambda); adv = whiten(adv)            # pure tensors
    metrics = update(policy, critic, batch, adv, G)                      # ppo_epochs x minibatches

    loss = policy_loss(ratio, adv, clip_ratio) - entropy_coef * H + value_coef * value_loss(V, V_old, G, value_clip)

The doctrine's objective E[min(r A, clip(r) A) - beta KL] is implemented the way the LM papers
do: the KL term lives in the reward (so it is also credited by GAE), not in the loss.

Choices and departures:
- The critic is a scalar head on the policy's own trunk under its own LoRA adapter (peft
  multi-adapter; ``value_model=adapter``, the default with LoRA), or a separate model
  (``value_model=separate``, the default with full fine-tuning). The papers use a separate
  model of the reward model's size, often initialised from the reward model; here the critic's
  head starts at random (small) and its adapter at the base model.
- The critic reads V(s_t) from the state that predicts token t (``value_head.ValueModel``); the
  last valid token's successor is terminal (no bootstrap), ``gamma=1`` by default.
- Policy and critic get separate learning rates (``value_lr``, default 10x the policy's) and
  separate gradient clipping, in one optimizer with two parameter groups. The learning-rate
  schedule advances once per PPO step, whatever ``ppo_epochs`` x ``minibatches`` is (as in every
  trainer: ``loop.py``).
- The KL coefficient is fixed (doctrine 0.1) unless ``kl_target`` is set: then Ziegler et al.'s
  adaptive controller (``ppo_parts.KLController``) moves it after every batch.
- Old log-probs, values and reference log-probs are computed in no-grad passes before the update;
  log-probs use the sampling temperature. A completion no reward could judge (None) is masked out
  of both losses; a non-finite loss or gradient skips that minibatch's update (``nonfinite_steps``;
  the rule of ``optim.py``, the same in every trainer).
- Prompts longer than the model's context with ``max_new_tokens`` are refused by row before the
  run starts, as in GRPO (``inputs.check_context``).
- Rollout mismatch: the old log-probs (the trainer's at the start of the update) against the
  sampler's (``sample_logp_BC``) give the ``mismatch/*`` metrics and the ``rollout_correction``
  weights of the policy loss; a masking kind narrows the policy loss's mask (and its normalisers),
  the critic still fits every token. ``policy_loss`` picks the loss (``gspo`` is refused: GAE's
  advantages are per token; ``gspo_token`` takes them); ``clip_ratio`` None = the loss's range.
- ``--env`` (``common.EpisodeConfig``): a completion is an episode of the environment (its turns,
  the environment's messages between them as holes in the mask: ``episodes.EpisodeRunner``). The
  episode's reward sits at its last model token; GAE steps from each model token to the next one,
  over the holes; the critic is fitted and the policy trained on model tokens only.
- ``group_size > 1`` samples several completions per prompt (each prompt still run once per group
  in every forward); the critic, not the group, is the baseline.
- Under several processes each takes 1/N of the prompts; every process splits its part into
  ``minibatches`` shuffled minibatches, so a global minibatch is the union of the processes' (the
  same size as one process's, not the same prompts). Each minibatch's losses are weighted by the
  process's share of the global minibatch's tokens (sequences, rows: ``reduce``); advantage
  whitening and the adaptive KL's sequence KL are taken over every process's completions. The
  critic (its adapter and head, or the separate model) is trained and kept in step like the
  policy; the reference (adapters disabled, or a frozen copy) is never trained nor synchronised.
- FSDP (``--fsdp`` or an FSDP accelerate config, several processes; ``distributed.shard_layers``):
  the policy's decoder layers are sharded, with both LoRA adapters inside them (the policy's and
  the critic's ``value_model=adapter``); a separate critic's layers are sharded the same way; the
  reference is the sharded policy with its adapters disabled (LoRA) or a frozen copy sharded like
  it (full fine-tuning). Embeddings, final norms and the value head stay replicated, their
  gradients summed. Every rank runs the same passes (one per minibatch of its prompts, the same
  number everywhere); sampling and evaluation gather the weights. A checkpoint holds the policy's
  full weights (rank 0) and, per rank, the optimizer state and the critic's weights as local
  shards (``TrainState``); ``final/value`` holds the critic's full weights. A reward model used as
  the reward (``reward_model(...)``) is frozen and replicated, not sharded: each rank scores its
  own completions in batches of its own number, and a frozen model has no gradients or optimizer
  state, FSDP's main saving; sharding it would gather its full weights for every scoring anyway.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, ClassVar, Literal, Optional

import torch

from posttrain.objectives import advantages as advmod
from posttrain.algorithms import common, inputs, loop
from posttrain.algorithms.collect import (ScoredBatch, collect_timed, group_rows, micro_groups, review_samples,
                                          sequence_advantages, step_metrics, tokens_of)
from posttrain.algorithms.optim import OptimizerStep
from posttrain.algorithms.ppo_parts import (KLController, build_optimizer, explained_variance, make_value_model,
                                            policy_params, token_rewards)
from posttrain.algorithms.reference import Reference
from posttrain.algorithms.evaluate import greedy_eval_sharded
from posttrain.algorithms.run import Run, RunResult, closes_runs_on_failure
from posttrain.objectives import losses
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.objectives.value_head import TrainState, ValueModel
from posttrain.runtime import distributed
from posttrain.runtime.config import NonNegative, Positive, Probability, processes, refuse
from posttrain.sampling.rollout_model import rollout_model

FULL_FT_LR = common.RL_FULL_FT_LR
VALUE_LR_MULTIPLIER = 10.0
"""Critic learning rate / policy learning rate by default (OpenRLHF's defaults: 9e-6 vs 5e-7)."""


@dataclasses.dataclass
class PPOConfig(common.EpisodeConfig):
    """PPO with a value model and a KL penalty to the reference (reward model or any reward).

    Memory: PPO trains a second network, the critic. With ``value_model=adapter`` (the default
    with LoRA) the critic shares the policy's frozen base weights and adds one LoRA adapter and a
    hidden_size+1 head, so memory stays close to GRPO + LoRA (one more adapter's optimizer state
    and one more forward/backward's activations). ``value_model=separate`` holds a second full
    model with its own gradients and optimizer state: the doctrine's table gives ~48 GB for PPO
    (policy + value) against ~24 GB for GRPO on an 8B model (``posttrain memory --method ppo``).
    A reward model used as the reward is one more frozen model in memory.
    """

    group_size: Annotated[int, Positive] = 1
    """Completions sampled per prompt (1 = classic PPO; the critic is the baseline either way)."""
    clip_ratio: Optional[Annotated[float, common.ClipRange]] = None
    """Clip: the probability ratio is kept within [1 - clip_ratio, 1 + clip_ratio]. None = the policy
    loss's default (``losses.clip_range``: 0.2 for ppo_clip, the doctrine's; gspo_token 3e-4/4e-4;
    cispo no lower bound and a weight cap of 5)."""
    kl_coef: Annotated[float, NonNegative] = 0.1
    """KL penalty beta in the per-token reward -beta * (logp - logp_ref) (doctrine 0.1; 0 = no reference);
    the initial value when kl_target is set."""
    kl_target: Optional[Annotated[float, Positive]] = None
    """Adaptive KL (Ziegler et al. 2019): target KL per sequence in nats (they used 6); None = fixed kl_coef."""
    kl_horizon: Annotated[float, Positive] = 10000.0
    """Adaptive KL horizon in sequences: beta changes by at most 20% per horizon sequences."""
    APPLIES_WHEN: ClassVar[dict] = {
        "kl_horizon": ("with --kl-target (the adaptive KL controller)", lambda c: c.kl_target is not None),
    }
    value_coef: Annotated[float, NonNegative] = 0.5
    """Weight of the value loss (doctrine 0.5)."""
    value_clip: Optional[Annotated[float, Positive]] = 0.2
    """Value clipping range around the rollout-time values (None = unclipped squared error)."""
    entropy_coef: Annotated[float, NonNegative] = 0.01
    """Entropy bonus weight (doctrine 0.01)."""
    gamma: Annotated[float, Probability] = 1.0
    """Discount per token (1 = none: the episode is one completion)."""
    gae_lambda: Annotated[float, Probability] = 0.95
    """GAE lambda (doctrine 0.95): 1 = Monte Carlo returns, 0 = one-step TD."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch's valid tokens."""
    ppo_epochs: Annotated[int, Positive] = 4
    """Passes over each rollout batch (TRL's default 4)."""
    minibatches: Annotated[int, Positive] = 1
    """Optimizer steps per pass: the batch's prompts are split into this many shuffled minibatches (each
    process splits its own prompts_per_step / N, so at most that many)."""
    micro_batch_prompts: Optional[Annotated[int, NonNegative]] = None
    """Prompts per forward/backward inside a minibatch (gradient accumulation; 0 = the whole
    minibatch at once). Changes only memory, speed and float rounding, not the math. Default: whole
    groups up to 8 completions per pass, at least one group (``pass_prompts``): the activations of
    the policy's and the critic's passes stay those of 8 rows, however large the minibatch."""
    value_model: Literal["auto", "adapter", "separate"] = "auto"
    """Critic: 'adapter' (own LoRA adapter on the policy's base), 'separate' (a second model), 'auto' (adapter with LoRA)."""
    value_lr: Optional[Annotated[float, Positive]] = None
    """Critic learning rate (default: 10x the policy's: a fresh head must fit the returns quickly)."""
    reduce: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How the per-token policy loss is reduced."""

    @property
    def method(self) -> str:
        return "ppo"

    def check(self) -> None:
        super().check()
        if self.value_model == "adapter" and not self.lora:
            raise refuse("value_model", "value_model=adapter puts the critic's LoRA adapter on the policy's frozen "
                         "base: it needs --lora (or use --value-model separate)", "lora")
        per_process = self.prompts_per_step // processes()
        if self.minibatches > per_process:
            raise refuse("minibatches", f"{self.minibatches} minibatches, but each process has only {per_process} "
                         f"prompts per step (prompts_per_step {self.prompts_per_step} over {processes()} "
                         "processes): a minibatch holds whole prompts; lower --minibatches or raise "
                         "--prompts-per-step", "prompts_per_step")


PASS_ROWS = 8
"""The default micro-batch: whole groups up to this many completions (TRL's default per-device batch)."""


def pass_prompts(config: PPOConfig, n_prompts: int, group_size: int) -> int:
    """Prompts per forward pass: ``micro_batch_prompts`` (default: ``PASS_ROWS`` rows of whole
    groups), at most a minibatch's."""
    minibatch = -(-n_prompts // config.minibatches)
    size = config.micro_batch_prompts
    size = max(1, PASS_ROWS // group_size) if size is None else size
    return minibatch if size == 0 else min(size, minibatch)


@torch.no_grad()
def rollout_stats(policy, critic: ValueModel, reference: Reference | None, config: PPOConfig, batch: ScoredBatch,
                  kl_coef: float) -> dict:
    """The no-grad passes before an update: old log-probs, reference log-probs, old values; then
    the per-token rewards, GAE advantages and returns."""
    r = batch.rollouts
    mask_BC = r.completion_mask_BC * batch.valid_B[:, None].to(r.completion_mask_BC.dtype)
    T, G = config.temperature, r.group_size
    old_BC = torch.zeros(mask_BC.shape)
    ref_BC = torch.zeros(mask_BC.shape)
    v_BC = torch.zeros(mask_BC.shape)
    for mb, b in micro_groups(r.num_prompts, G, pass_prompts(config, r.num_prompts, G)):
        old_BC[b] = rollout_logprobs(policy, r, T, rows=mb)
        if reference is not None:
            with reference.model() as ref_model:
                ref_BC[b] = rollout_logprobs(ref_model, r, T, rows=mb)
        v_BC[b] = critic.values(r, rows=mb).float()
    kl_BC = (old_BC - ref_BC) * mask_BC if reference is not None else torch.zeros_like(old_BC)  # k1
    rewards_BC = token_rewards(batch.rewards_B, kl_BC, mask_BC, kl_coef)
    adv_BC, returns_BC = advmod.gae(rewards_BC, v_BC, mask_BC, config.gamma, config.gae_lambda)
    if config.whiten_advantages:
        adv_BC = advmod.whiten(adv_BC, mask_BC, all_sum=distributed.all_sum)
    has_B = mask_BC.sum(1) > 0
    # the rollout correction from the old log-probs (the trainer's at the start of the update):
    # its weights multiply the policy loss; a masking kind narrows the policy loss's mask (the
    # critic still fits every token)
    weight_BC, keep_BC, mismatch = config.correction(old_BC, r.sample_logp_BC, mask_BC)
    stats = {"returns/mean": float(losses.masked_mean(returns_BC, mask_BC)),
             "value/mean": float(losses.masked_mean(v_BC, mask_BC)),
             "explained_variance": explained_variance(v_BC, returns_BC, mask_BC),
             "kl_coef": kl_coef}
    if reference is not None:
        stats["kl"] = float(losses.masked_mean(losses.kl_estimate(old_BC, ref_BC, "k3"), mask_BC))
        stats["kl/k1"] = float(losses.masked_mean(kl_BC, mask_BC))
        kl_n = distributed.all_sum(torch.stack([kl_BC.sum(1)[has_B].sum().double(), has_B.sum().double()]))
        stats["kl/seq"] = float(kl_n[0] / kl_n[1]) if float(kl_n[1]) > 0 else float("nan")  # every process's
        stats["non_score_reward"] = -kl_coef * stats["kl/seq"]
    stats.update({k: float(v) for k, v in mismatch.items()})
    stats = distributed.reduce_metrics(stats, max_keys=common.MISMATCH_MAX)
    return {"mask": mask_BC, "old": old_BC, "values": v_BC, "adv": adv_BC, "returns": returns_BC, "stats": stats,
            "pg_mask": mask_BC * keep_BC.to(mask_BC.dtype), "weight": weight_BC}


def normalisers(ro: dict, rows_B: torch.Tensor) -> tuple:
    """The minibatch ``rows_B``'s normalisers (``losses.reduction_counts``) of the value loss's and
    the policy loss's masks: over every process (the loss's weights), and this process's (its stats')."""
    local = (losses.reduction_counts(ro["mask"][rows_B]), losses.reduction_counts(ro["pg_mask"][rows_B]))
    return tuple(distributed.all_sum(c) for c in local), local


def micro_loss(policy, critic: ValueModel, config: PPOConfig, r, ro: dict, whole: tuple, mb: torch.Tensor,
               b: torch.Tensor):
    """The micro-batch ``mb`` (prompts; ``b`` their completion rows)'s weighted loss and its stats:
    the policy loss and entropy bonus over ``ro["pg_mask"]``, the value loss over ``ro["mask"]``
    (model tokens only: environment tokens in an episode are holes in both), each weighted by its
    share of the minibatch's ``whole`` normalisers (global, and this process's for the stats).
    Called through DDP's forward in data-parallel runs (``OptimizerStep.forward``)."""
    m, pm_BC = ro["mask"][b], ro["pg_mask"][b]  # the critic's mask, the policy loss's (corrected)
    (whole_v, whole_pg), (local_v, local_pg) = whole
    clip = losses.clip_range(config.policy_loss, config.clip_ratio, config.clip_ratio)
    logp, ent = rollout_logprobs(policy, r, config.temperature, with_entropy=True, rows=mb)
    pg, pm = losses.POLICY_LOSSES[config.policy_loss].compute(
        logp, ro["old"][b], ro["adv"][b], pm_BC, *clip, config.reduce, max_len=config.max_new_tokens,
        weight_BT=ro["weight"][b], clip_ratio_c=config.clip_ratio_c)
    ent_loss, em = losses.entropy_bonus(ent, pm_BC, config.entropy_coef, config.reduce, config.max_new_tokens)
    v = critic.values(r, rows=mb)
    vl, vm = losses.value_loss(v, ro["values"][b], ro["returns"][b], m, clip=config.value_clip)
    w_pg = losses.reduction_share(config.reduce, pm_BC, whole_pg)
    w_v = losses.reduction_share("token-mean", m, whole_v)  # the value loss is a token mean
    loss = w_pg * (pg + ent_loss) + w_v * config.value_coef * vl
    # this process's minibatch statistics: losses by their share, per-token rates by token share
    s_pg, s_v = losses.reduction_share(config.reduce, pm_BC, local_pg), losses.reduction_share("token-mean", m, local_v)
    t_pg, t_v = float(pm_BC.sum()) / max(1.0, float(local_pg[0])), float(m.sum()) / max(1.0, float(local_v[0]))
    stats = {"pg_loss": s_pg * float(pg.detach()), "value_loss": s_v * float(vl.detach()),
             "clip_frac": t_pg * float(pm["clip_frac"]), "approx_kl": t_pg * float(pm["approx_kl"]),
             "ratio/mean": t_pg * float(pm["ratio/mean"]), "entropy": t_pg * float(em["entropy"]),
             "value_clip_frac": t_v * float(vm["value_clip_frac"])}
    return loss, stats


def update(policy, critic: ValueModel, rule: OptimizerStep, config: PPOConfig, batch: ScoredBatch, ro: dict,
           generator: torch.Generator) -> dict:
    """``ppo_epochs`` passes over the batch in ``minibatches`` shuffled minibatches of whole groups;
    one optimizer update each (``rule``: the policy and the critic clipped separately), accumulated
    over micro-batches of ``pass_prompts`` prompts. Returns the update's metrics (means over the
    updates taken)."""
    r = batch.rollouts
    P, G = r.num_prompts, r.group_size
    size, per_pass = -(-P // config.minibatches), pass_prompts(config, P, G)
    mask_BC, adv_BC = ro["mask"], ro["adv"]
    sums: dict[str, float] = {}
    n_steps, nonfinite = 0, 0
    policy.train()
    critic.train()

    for _ in range(config.ppo_epochs):
        order = torch.randperm(P, generator=generator)
        for i in range(0, P, size):
            mb = order[i:i + size]
            loss_of = functools.partial(micro_loss, policy, critic, config, r, ro, normalisers(ro, group_rows(mb, G)))
            step = {}
            for k in range(0, len(mb), per_pass):
                sub = mb[k:k + per_pass]
                last = k + per_pass >= len(mb)
                out = rule.forward(loss_of, sub, group_rows(sub, G), last=last)
                if out is None:  # a non-finite loss earlier in this update: it will not step
                    break
                rule.backward(out[0], 1.0, last)
                for name, val in {"loss": float(out[0].detach()), **out[1]}.items():
                    step[name] = step.get(name, 0.0) + val
            (norm_p, norm_v), ok = rule.step()
            if not ok:
                nonfinite += 1
                continue
            for name, val in {**step, "grad_norm": norm_p, "value_grad_norm": norm_v}.items():
                sums[name] = sums.get(name, 0.0) + float(val)
            n_steps += 1
    metrics = distributed.reduce_metrics({k: v / max(1, n_steps) for k, v in sums.items()}, sum_keys=["loss"])
    lengths = r.completion_mask_BC.sum(1).float()
    metrics.update({"nonfinite_steps": nonfinite, "len/mean": float(lengths.mean()),
                    "len/clipped_frac": float(r.clipped_B.float().mean()),
                    "adv/abs_mean": float(losses.masked_mean(adv_BC.abs(), mask_BC))})
    return distributed.reduce_metrics(metrics)


@closes_runs_on_failure
def train_ppo(config: PPOConfig) -> RunResult:
    """Train with PPO; returns the run directory and metrics. ``final/`` holds the policy and
    ``final/value/`` the critic (trunk + ``value_head.safetensors``)."""
    rows, reward_fn, eval_fn, policy, tok = inputs.rollout_setup(config)
    train_rows, eval_rows = rows.train, rows.held
    run = Run(config, "ppo", total_steps=config.max_steps)
    use_ref = config.kl_coef > 0 or config.kl_target is not None
    reference = Reference(policy, config.lora) if use_ref else None
    critic = make_value_model(config, policy, config.seed)
    distributed.sync_params(critic.parameters())  # the critic starts identical on every process too
    separate = critic.model if critic.adapter is None else None
    # FSDP: the policy's layers (with the value adapter's LoRA weights), a separate critic's and a
    # frozen reference copy's; before the optimizer (sharding replaces the parameters)
    if common.shard(config, policy, reference.copy if reference else None, separate):
        critic.refresh()
    rollout = rollout_model(policy, config.rollout_dtype)
    lr = common.resolve_lr(config, FULL_FT_LR)
    param_sets = (policy_params(policy), critic.parameters())
    optimizer = build_optimizer(*param_sets, config, lr, config.value_lr or lr * VALUE_LR_MULTIPLIER)
    scheduler = common.build_scheduler(optimizer, config)
    state = TrainState(optimizer, value=critic)
    stream = common.PromptStream(train_rows, config.seed)
    run.generators["sampling"] = sampler_gen = torch.Generator().manual_seed(config.seed)
    run.generators["minibatch"] = mb_gen = torch.Generator().manual_seed(config.seed + 1)
    kl_ctl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
    start, extra = run.restore(policy, state, scheduler, stream)
    dp = distributed.data_parallel(policy, critic.head, separate,
                                   read=[policy, critic.head, critic.trunk])  # data-parallel runs: DDP
    # the policy's and the critic's gradients are clipped separately (``ppo_parts.build_optimizer``)
    rule = OptimizerStep(optimizer, param_sets, config.max_grad_norm, [policy, separate], dp)
    kl_ctl.value = float(extra.get("kl_coef", kl_ctl.value))
    sampling = config.sampling()
    eval_tokens = config.completion_budgets()["held"][1]

    def evaluate(step: int):
        if eval_rows:
            run.log_eval(step, greedy_eval_sharded(policy, tok, eval_rows, eval_fn, eval_tokens,
                                                          config.chat_template))

    def collect_step(step: int, timer) -> tuple[ScoredBatch, dict]:
        return collect_timed(timer, policy, tok, stream, config.prompts_per_step, config.group_size, sampling,
                             reward_fn, sampler_gen, config.chat_template, rollout=rollout)

    def update_step(collected) -> loop.StepResult:
        batch, cmetrics = collected
        ro = rollout_stats(policy, critic, reference, config, batch, kl_ctl.value)
        umetrics = update(policy, critic, rule, config, batch, ro, mb_gen)
        if "kl/seq" in ro["stats"]:
            kl_ctl.update(ro["stats"]["kl/seq"], int(distributed.all_sum(batch.valid_B.sum())))
        return loop.StepResult({**step_metrics(batch, reward_fn, cmetrics), **ro["stats"], **umetrics},
                               tokens_of(batch), review_samples(batch, config.samples_per_step,
                                                                sequence_advantages(ro["adv"], ro["mask"])))

    trainer = loop.Trainer(run, policy, state, scheduler, stream, collect_step, update_step, evaluate,
                           extra=lambda: {"kl_coef": kl_ctl.value})
    metrics = loop.train(trainer, start)
    full = distributed.full_state_dict(critic.model) if distributed.is_sharded(critic.model) else None  # every rank
    if distributed.is_main():
        critic.save(run.run_dir / "final" / "value", tok, {"format": "posttrain-value-model"}, state_dict=full)
    return run.finish(policy, tok, metrics)
