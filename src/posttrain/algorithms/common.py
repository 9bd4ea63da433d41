"""What every trainer sets up the same way: the base config (``TrainConfig``) and the sampling
trainers' (``RolloutConfig``), seeding and process start, the model with its LoRA adapter, FSDP
sharding, AdamW and the learning-rate schedule, the prompt stream and the dataset rows.

Set-up order, the same in every trainer: the config is checked when it is built (its fields'
domains and cross-field rules, ``posttrain.runtime.config``), then the rows are read and checked
and the reward spec parsed, then the model loads, then the rows are checked against the tokenizer
and the model's context, and only then is the run directory created: a setup that fails leaves
nothing behind.

Prompt-length policy (``inputs.check_context``): a prompt whose tokens plus the completion limit
(``max_new_tokens``; ``eval_max_new_tokens`` for held-out rows) exceed the model's context
(``max_position_embeddings`` or equivalent) is an error naming the dataset file (or task split),
the 1-based row and the numbers, asking to shorten the prompt or lower the limit; it is never
truncated silently nor sampled past the context. DPO and the reward model truncate pairs to
``max_length`` (``dpo_data``'s stated policy, counted), which must itself fit the context.

The run directory and its checkpoints are ``run.py``; the training loop is ``loop.py``; the
optimizer-step rule is ``optim.py``: each written once (DESIGN.md: no copy-paste between trainers).

Under several processes (``posttrain.runtime.distributed``) the run directory, metrics, samples, evals,
reports and ``final/`` are written by rank 0 only; every rank loads the same checkpoint and its
own RNG state; the trainers run their losses through DDP (``distributed.DataParallel``), or under
FSDP ``grad_step`` sums the replicated tensors' gradients before clipping; evaluation is split
across the ranks and gathered.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Annotated, ClassVar, Literal, Optional

import numpy as np
import torch

from posttrain.runtime import cpu_allocator
from posttrain.runtime import distributed
from posttrain.runtime.tracking import check_new_run_dir
from posttrain.runtime.config import (Checked, ConfigError, Fraction, NonNegative, PerProcess, Positive, Range, Seed,
                                      flag, refuse)
from posttrain.sampling.generation import SamplingConfig
from posttrain.objectives.losses import MASK_BAND, POLICY_LOSSES, ROLLOUT_CORRECTIONS, TIS_CAP, rollout_correction
from posttrain.models import (EMBEDDED, LORA_LR_MULTIPLIER, add_lora, check_model_flag, count_parameters,
                              load_model, local_dir, resolve_device, rl_lora_rank)

@dataclasses.dataclass
class TrainConfig(Checked):
    """Fields every trainer has.

    Batch sizes under several processes (``accelerate launch`` / ``torchrun``): a step's batch
    (``prompts_per_step``, ``batch_size``) is the *global* batch, summed over the processes; each
    process trains on 1/N of it, so it must be a multiple of N, and the same config gives the same
    run whatever N is. Micro-batch sizes (``micro_batch_prompts``, ``micro_batch_size``) are per
    process: they bound memory on one device; each process accumulates its micro-batches, then the
    processes' gradients are summed once per optimizer step.
    """

    model: str = EMBEDDED
    """Model spec: the embedded default, a local HF directory, a .gguf file, an adapter dir, or a cached hub id."""
    data: Optional[str] = None
    """Dataset file (.jsonl/.json/.parquet/.csv) or datasets directory, in TRL's format."""
    task: Optional[str] = None
    """A built-in task instead of --data (see `posttrain tasks`), e.g. arithmetic, 'arithmetic(digits=3)', 'reasoning_gym(chain_sum, min_terms=3)'."""
    task_size: Annotated[int, Positive] = 5000
    """Rows drawn from the built-in task's train split."""
    eval_size: Annotated[int, NonNegative] = 200
    """Held-out rows for evaluation (task test split, or the tail of --data when eval_fraction > 0)."""
    eval_fraction: Annotated[float, Fraction] = 0.0
    """With --data: fraction of rows held out for evaluation (0 = none)."""
    name: Optional[str] = None
    """Run name: the run directory is <output_dir>/<name> (default: <method>-<date>-<time>)."""
    output_dir: str = "runs"
    """Where run directories are created."""
    seed: Annotated[int, Seed] = 0
    """Seeds python, numpy, torch, data order and sampling."""
    max_steps: Annotated[int, Positive] = 100
    """Training steps to run."""
    max_minutes: Annotated[float, NonNegative] = 0.0
    """Stop after the step that passes this wall-clock budget (0 = no limit); the run still
    checkpoints, evaluates and saves final/ as at max_steps."""
    lr: Optional[Annotated[float, NonNegative]] = None
    """Learning rate; default: the method's full fine-tuning rate, times 10 with LoRA (0 freezes
    the policy: PPO then trains its critic alone)."""
    lora: bool = True
    """Train a LoRA adapter (peft) instead of all weights."""
    lora_rank: Optional[Annotated[int, Positive]] = None
    """LoRA rank; default: the doctrine's table for the method and model size."""
    lora_alpha: Annotated[float, Positive] = 32.0
    """LoRA alpha (scale = alpha / rank); 32 as in "LoRA Without Regret"."""
    lora_dropout: Annotated[float, Fraction] = 0.0
    """Dropout on the LoRA branch."""
    lora_target: str = "all-linear"
    """Modules that get adapters: 'all-linear' or a comma-separated list of module names."""
    warmup_steps: Annotated[int, NonNegative] = 0
    """Linear learning-rate warmup steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup."""
    weight_decay: Annotated[float, NonNegative] = 0.0
    """AdamW weight decay."""
    max_grad_norm: Annotated[float, NonNegative] = 1.0
    """Gradient clipping by global norm (0 = off)."""
    checkpoint_every: Annotated[int, NonNegative] = 50
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: Annotated[int, NonNegative] = 2
    """How many checkpoints to keep (0 = all)."""
    eval_every: Annotated[int, NonNegative] = 0
    """Evaluate on the held-out rows every N steps (0 = only before and after training)."""
    eval_at_start: bool = True
    """Evaluate before the first step (the 'before' number)."""
    log_every: Annotated[int, Positive] = 1
    """Print a progress line every N steps (metrics.jsonl always gets every step)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <run>/tb."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    rollout_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Trainers that sample (GRPO family, PPO): dtype of the sampling copy of the policy, synced
    before each generation (``rollout_model``). 'auto' = bfloat16 where it is fast (CUDA, or a CPU
    with AVX512-BF16/AMX), else float32 (no copy). Training and the loss's log-probs stay float32."""
    resume: Optional[str] = None
    """Run directory to continue from its newest checkpoint (set by --resume)."""
    cpu_memory: Literal["retain", "release"] = "retain"
    """On CPU (Linux, glibc): 'retain' keeps freed memory in the process for the next step's
    tensors instead of returning it to the OS and page-faulting it back in (``cpu_allocator``: a
    full fine-tuning GRPO update of the embedded model took 10-13 s with the defaults, 9.5 s so);
    resident memory then stays at its peak. 'release' keeps glibc's defaults. Ignored when a
    MALLOC_* variable or a preloaded allocator (jemalloc, tcmalloc) is set."""
    fsdp: bool = False
    """Under several processes, shard the decoder layers over them with torch's FSDP2 (also turned
    on by an FSDP accelerate config, ACCELERATE_USE_FSDP). Every trainer; ignored by a single
    process (see README: Scaling out)."""

    @property
    def method(self) -> str:
        return "run"

    def check(self) -> None:
        super().check()
        self.check_inputs()
        if self.task is not None:  # its name and options (the task of training rows or of the greedy evaluation)
            from posttrain.data.tasks import TaskError, check_options

            try:
                check_options(self.task)
            except TaskError as e:
                raise refuse("task", f"{e} (see `posttrain tasks`)") from None
        rank_default = next(f.default for f in dataclasses.fields(self) if f.name == "lora_rank")
        if not self.lora and self.lora_rank != rank_default:  # a rank given for an adapter there is not
            raise refuse("lora_rank", f"--lora-rank {self.lora_rank} with --no-lora: full fine-tuning has no adapter "
                         "rank; drop one of them", "lora")
        check_device(self.device)

    def row_checks(self) -> list:
        """The method's own checks of each ``--data`` row (``data.RowCheck``), beside its reward's."""
        return []

    APPLIES_WHEN: ClassVar[dict] = {
        "task_size": ("with --task (it sizes the task's train split)", lambda c: c.task is not None),
        "eval_fraction": ("with --data (a task has its own test split)", lambda c: c.data is not None),
        "lora_alpha": ("with --lora", lambda c: c.lora),
        "lora_dropout": ("with --lora", lambda c: c.lora),
        "lora_target": ("with --lora", lambda c: c.lora),
    }
    """Fields that do something only with others (``config.inapplicable``: refused when given alone)."""

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("model",)
    """The fields naming a model to load: checked (``models.check_model_flag``) before anything loads."""

    def check_inputs(self) -> None:
        """Where the rows come from: exactly one of ``data`` and ``task`` (DPO: ``data``)."""
        if self.data is None and self.task is None:
            raise refuse("data", "no training rows: give --data FILE or --task NAME", "task")
        if self.data is not None and self.task is not None:
            raise refuse("task", "give only one of --data FILE and --task NAME", "data")


def check_device(device: str) -> None:
    """``ConfigError`` for a device torch does not know or this machine does not have."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise refuse("device", f"{device!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}
    if not available.get(kind, lambda: True)():
        raise refuse("device", f"{device!r}: this machine (or this torch build) has no {kind} device; use auto or cpu")


RL_FULL_FT_LR = 1e-6
"""The doctrine's RL learning rate for full fine-tuning ("Use lower LR for RL - 1e-6 instead of
1e-5"; times ``LORA_LR_MULTIPLIER`` with LoRA): GRPO and its estimators, and PPO."""


def resolve_lr(config: TrainConfig, full_ft_lr: float) -> float:
    if config.lr is not None:
        return config.lr
    return full_ft_lr * (LORA_LR_MULTIPLIER if config.lora else 1.0)


def start(config: TrainConfig) -> None:
    """Check the model specs (a missing path or a directory that holds no model is an error naming
    the flag, before anything loads), join the other processes when launched with several (no-op
    otherwise), then seed every RNG with ``config.seed``: the same on every rank, so models and
    adapters start identical. On CPU, freed memory is kept for reuse (``config.cpu_memory``)."""
    for field in config.MODEL_FIELDS:
        spec = getattr(config, field)
        if spec is not None:
            check_model_flag(flag(field), spec)
    if not config.resume:  # the run directory can be made (name, output dir), before anything loads
        check_new_run_dir(config.output_dir, config.name)
    distributed.setup(config.device)
    seed_everything(config.seed)
    if config.cpu_memory == "retain" and resolve_device(config.device).type == "cpu":
        cpu_allocator.retain_freed_memory()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_policy(config: TrainConfig, lora_rank_for=rl_lora_rank):
    """Load the model and tokenizer, with a fresh LoRA adapter when ``config.lora``. A model that is
    a LoRA adapter directory (the ``final/`` of an earlier LoRA stage: SFT, then RL) is merged
    into its base first: the new run trains (and, with LoRA, references) that merged model, and
    its own adapter names that directory as its base (``load_model`` merges it again on loading)."""
    model, tok = load_model(config.model, device=resolve_device(config.device))
    if hasattr(model, "merge_and_unload"):  # a PeftModel: the adapter of an earlier stage
        model = model.merge_and_unload()
        model.config._name_or_path = model.name_or_path = str(local_dir(config.model).resolve())
    if config.lora:
        rank = config.lora_rank or lora_rank_for(count_parameters(model))
        targets = config.lora_target if config.lora_target == "all-linear" else [
            t.strip() for t in config.lora_target.split(",") if t.strip()]
        from peft import NoMatchingPeftModuleError

        try:
            model = add_lora(model, rank=rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                             target_modules=targets)
        except NoMatchingPeftModuleError as e:  # no module of the model has one of those names
            raise ConfigError(f"--lora-target {config.lora_target}: {str(e).splitlines()[0]}", ("lora_target",)) from None
    distributed.sync_params(p for p in model.parameters() if p.requires_grad)
    return model, tok


def shard(config: TrainConfig, *models) -> bool:
    """Shard the decoder layers of ``models`` (the trainable policy or reward model, a frozen
    full-fine-tuning reference, PPO's separate critic) with FSDP when the run asks for it under
    several processes; returns whether it did. Call it before building the optimizer (sharding
    replaces the parameters: look up any list of them again)."""
    if not distributed.use_fsdp(config.fsdp):
        return False
    for m in models:
        if m is not None:
            distributed.shard_layers(m)
    return True


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) where torch has it for the parameters' device:
    on CPU it steps the 135M-parameter model in 0.05 s against 0.4 s (foreach) and seconds
    (the per-tensor loop torch uses on CPU by default)."""
    params = [dict(g, params=list(g["params"])) for g in params] if isinstance(params[0], dict) else list(params)
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    if any(len({distributed.is_dtensor(p) for p in g["params"]}) > 1 for g in groups):
        # FSDP with replicated weights next to sharded ones (full fine-tuning: embeddings, norm; a
        # value head beside LoRA weights): each group split in two, as torch's fused/foreach
        # kernels take no mix of DTensors and tensors
        params = [dict(g, params=part) for g in groups
                  for part in ([p for p in g["params"] if not distributed.is_dtensor(p)],
                               [p for p in g["params"] if distributed.is_dtensor(p)]) if part]
    tensors = [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params
    fused = all(p.is_floating_point() for p in tensors) and {p.device.type for p in tensors} <= {"cpu", "cuda"}
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def build_optimizer(model, config: TrainConfig, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return adamw(params, lr, config.weight_decay)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps, config.schedule))


class PromptStream:
    """Rows in a seeded random order, epoch after epoch; its position is part of a checkpoint."""

    def __init__(self, rows: list[dict], seed: int):
        if not rows:
            raise ValueError("no training rows")
        self.rows, self.seed = rows, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm(self.epoch)


MISMATCH_MAX = ("mismatch/ratio_max",)
"""Mismatch metrics reduced by max over the step (micro-batches and processes), not by mean."""
ClipRange = Range(0, 1, low_open=True, high_open=True)
"""A PPO clip range: the ratio is kept within [1 - clip, 1 + clip]."""
NO_SIGNAL_AT_T0 = ("the sampling trainers divide the logits by the temperature, and at 0 every completion of a "
                   "group is the same greedy one: no differences to learn from (use e.g. 0.7 to 1)")


@dataclasses.dataclass
class RolloutConfig(TrainConfig):
    """Fields of the trainers that sample from the policy and score with a reward (GRPO and its
    estimators, PPO): what they sample, how, and what they keep for review."""

    reward: Optional[str] = None
    """Reward spec, e.g. 'math', 'math,format:0.2', 'code', 'reward_model(runs/rm/final)' (default: the task's reward)."""
    eval_reward: Optional[str] = None
    """Reward used for held-out evaluation (default: the task's reward, else --reward)."""
    prompts_per_step: Annotated[int, Positive, PerProcess] = 8
    """Prompts per step, over all processes (a multiple of their number; each samples and trains on
    prompts_per_step / N of them, whole groups); a step trains on prompts_per_step x group_size completions."""
    group_size: Annotated[int, Positive] = 8
    """Completions sampled per prompt (the doctrine's K)."""
    max_new_tokens: Annotated[int, Positive] = 256
    """Completion length limit."""
    min_new_tokens: Annotated[int, NonNegative] = 0
    """Forbid EOS before this many tokens (for benchmarks that force equal lengths). The sampler
    bans EOS before it takes the token's log-prob, so its distribution truly differs from the
    trainer's there: such runs show a rollout mismatch (``mismatch/kl`` > 0) even in float32."""
    temperature: Annotated[float, Range(0, low_open=True, why=NO_SIGNAL_AT_T0)] = 1.0
    """Sampling temperature."""
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: Annotated[int, NonNegative] = 0
    """Top-k sampling (0 = off)."""
    chat_template: bool = True
    """Wrap plain-string prompts in the tokenizer's chat template."""
    samples_per_step: Annotated[int, NonNegative] = 2
    """Groups per step written to samples.jsonl for human review."""
    eval_max_new_tokens: Annotated[int, NonNegative] = 0
    """Completion limit during evaluation (0 = max_new_tokens)."""
    policy_loss: Literal[tuple(POLICY_LOSSES)] = "ppo_clip"
    """Policy loss, an entry of ``losses.POLICY_LOSSES``: ppo_clip (PPO's clipped token surrogate),
    gspo / gspo_token (sequence-level ratio, Zheng et al. 2025), cispo (clipped stop-gradient IS
    weight times REINFORCE, MiniMax-M1). Each has its own default clip range, used when the run
    gives none (``losses.clip_range``: ppo_clip 0.2/0.2, gspo 3e-4/4e-4, cispo no lower bound and
    a weight cap of 5)."""
    clip_ratio_c: Optional[Annotated[float, Range(1, low_open=True)]] = None
    """Dual-clip bound for negative advantages (Ye et al. 2020; verl uses 3.0): the per-token loss
    of a token with A < 0 is at most -A * c. None = off. ppo_clip only."""
    rollout_correction: Literal[tuple(ROLLOUT_CORRECTIONS)] = "tis"
    """Correction of the sampler/trainer mismatch (``losses.correction``): tis (token weight
    min(r, cap), Yao et al. 2025), seq_tis, token_mask, seq_mask (drop tokens/sequences whose ratio
    leaves the band: one extra no-grad pass per step for the start-of-update log-probs), none.
    The mismatch metrics (``mismatch/kl``, ``mismatch/ratio_max``, ...) are logged whatever it is."""
    rollout_correction_cap: Annotated[float, Positive] = TIS_CAP
    """Truncation C of tis / seq_tis (Yao et al. 2025's 2; TRL's default is 3)."""
    rollout_correction_low: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = MASK_BAND[0]
    """Lower end of the ratio band kept by token_mask / seq_mask."""
    rollout_correction_high: Annotated[float, Range(1, low_open=True)] = MASK_BAND[1]
    """Upper end of the ratio band kept by token_mask / seq_mask."""

    APPLIES_WHEN: ClassVar[dict] = {
        "rollout_correction_cap": ("with --rollout-correction tis or seq_tis (the truncating kinds)",
                                   lambda c: c.rollout_correction in ("tis", "seq_tis")),
        "rollout_correction_low": ("with --rollout-correction token_mask or seq_mask (the masking kinds)",
                                   lambda c: ROLLOUT_CORRECTIONS[c.rollout_correction].masks),
        "rollout_correction_high": ("with --rollout-correction token_mask or seq_mask (the masking kinds)",
                                    lambda c: ROLLOUT_CORRECTIONS[c.rollout_correction].masks),
    }

    def check(self) -> None:
        super().check()
        if self.clip_ratio_c is not None and not POLICY_LOSSES[self.policy_loss].dual_clip:
            raise refuse("clip_ratio_c", f"dual-clip bounds the PPO clip loss; --policy-loss {self.policy_loss} has "
                         "no such bound: drop --clip-ratio-c or use --policy-loss ppo_clip", "policy_loss")
        self.check_policy_loss()
        if self.min_new_tokens > self.max_new_tokens:
            raise refuse("min_new_tokens", f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                         f"({self.max_new_tokens})", "max_new_tokens")

    def correction(self, train_logp_BC: torch.Tensor, sample_logp_BC: torch.Tensor, mask_BC: torch.Tensor):
        """``losses.rollout_correction`` with the run's kind, cap and band: ``(weight_BC, keep_BC,
        metrics)`` from the trainer's log-probs at the start of the update and the sampler's."""
        return rollout_correction(train_logp_BC, sample_logp_BC, mask_BC, self.rollout_correction,
                                  self.rollout_correction_cap, (self.rollout_correction_low, self.rollout_correction_high))

    def per_token_advantages(self) -> bool:
        """Whether the trainer's advantages are per token (``adv_BT``)."""
        return True

    def check_policy_loss(self) -> None:
        """A loss that takes one advantage per sequence (gspo) refused where they are per token."""
        if self.per_token_advantages() and not POLICY_LOSSES[self.policy_loss].per_token_adv:
            raise refuse("policy_loss", f"{self.policy_loss} clips one ratio per sequence with one advantage per "
                         "sequence, but this run's advantages are per token; use --policy-loss gspo_token",
                         *(("advantage",) if hasattr(self, "advantage") else ()))

    def completion_budgets(self) -> dict[str, tuple[str, int]]:
        """The completion limit of the train and held-out rows, with the field that sets it
        (``check_context``)."""
        held = ("eval_max_new_tokens", self.eval_max_new_tokens) if self.eval_max_new_tokens else None
        return {"train": ("max_new_tokens", self.max_new_tokens), "held": held or ("max_new_tokens", self.max_new_tokens)}

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.min_new_tokens)


@dataclasses.dataclass
class EpisodeConfig(RolloutConfig):
    """The rollout trainers that can sample episodes of an environment (GRPO and its estimators,
    PPO): ``--env`` replaces the rows and the reward (``inputs.rollout_setup``)."""

    env: Optional[str] = None
    """A multi-turn environment instead of --task/--data and --reward: guess_number, tool_arithmetic,
    single_turn(task=...), ta:GAME (textarena) or module:Class (see README: environments). Its
    episodes are the group's samples; the episode's reward (the sum of its turns') is the reward."""
    max_turns: Annotated[int, Positive] = 4
    """Model turns per episode (with --env; --max-new-tokens caps each turn)."""
    max_episode_tokens: Annotated[int, Positive] = 1024
    """Tokens per episode after its first messages, the model's and the environment's (with --env)."""
    env_timeout: Annotated[float, Positive] = 30.0
    """Seconds an environment call may take before its episode ends as an error (with --env)."""

    APPLIES_WHEN: ClassVar[dict] = {
        "max_turns": ("with --env", lambda c: c.env is not None),
        "max_episode_tokens": ("with --env", lambda c: c.env is not None),
        "env_timeout": ("with --env", lambda c: c.env is not None),
    }

    def check_inputs(self) -> None:
        if self.env is None:
            return super().check_inputs()
        given = [f for f in ("data", "task", "reward") if getattr(self, f) is not None]
        if given:
            raise refuse("env", f"--env gives the rows and the reward; drop --{given[0]} (a task as an environment: "
                         "--env 'single_turn(task=arithmetic)')", *given)
        from posttrain.envs import EnvError, get_env

        try:
            get_env(self.env)
        except EnvError as e:
            raise refuse("env", f"{e} (see `posttrain tasks`)") from None
