"""What every trainer shares: the base config, model/optimizer/schedule set-up, the prompt stream,
the run (directory, tracker, checkpoints, exact resume, final model), and greedy evaluation.

Each algorithm file keeps only its own loop; everything here is written once (DESIGN.md: no
copy-paste between algorithm loops).

Under several processes (``posttrain.distributed``) the run directory, metrics, samples, evals,
reports and ``final/`` are written by rank 0 only; every rank loads the same checkpoint and its
own RNG state; the trainers run their losses through DDP (``distributed.DataParallel``), or under
FSDP ``grad_step`` sums the replicated tensors' gradients before clipping; evaluation is split
across the ranks and gathered.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from posttrain import checkpoint as ckpt
from posttrain import cpu_allocator
from posttrain import config as cfgmod
from posttrain import distributed
from posttrain.models import EMBEDDED, add_lora, count_parameters, load_model, resolve_device, rl_lora_rank
from posttrain.tracking import Tracker, make_run_dir, read_jsonl

LORA_LR_MULTIPLIER = 10.0
"""LoRA's best learning rate is about 10x full fine-tuning's (Thinking Machines, "LoRA Without
Regret", 2025, with alpha=32 and 1/r scaling; the same 10x as the doctrine's 1e-6 full-FT RL rate)."""


@dataclasses.dataclass
class TrainConfig:
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
    """A built-in task instead of --data (see `posttrain tasks`), e.g. arithmetic."""
    task_size: int = 5000
    """Rows drawn from the built-in task's train split."""
    eval_size: int = 200
    """Held-out rows for evaluation (task test split, or the tail of --data when eval_fraction > 0)."""
    eval_fraction: float = 0.0
    """With --data: fraction of rows held out for evaluation (0 = none)."""
    name: Optional[str] = None
    """Run name: the run directory is <output_dir>/<name> (default: <method>-<date>-<time>)."""
    output_dir: str = "runs"
    """Where run directories are created."""
    seed: int = 0
    """Seeds python, numpy, torch, data order and sampling."""
    max_steps: int = 100
    """Training steps to run."""
    max_minutes: float = 0.0
    """Stop after the step that passes this wall-clock budget (0 = no limit); the run still
    checkpoints, evaluates and saves final/ as at max_steps."""
    lr: Optional[float] = None
    """Learning rate; default: the method's full fine-tuning rate, times 10 with LoRA."""
    lora: bool = True
    """Train a LoRA adapter (peft) instead of all weights."""
    lora_rank: Optional[int] = None
    """LoRA rank; default: the doctrine's table for the method and model size."""
    lora_alpha: float = 32.0
    """LoRA alpha (scale = alpha / rank); 32 as in "LoRA Without Regret"."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target: str = "all-linear"
    """Modules that get adapters: 'all-linear' or a comma-separated list of module names."""
    warmup_steps: int = 0
    """Linear learning-rate warmup steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    checkpoint_every: int = 50
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """How many checkpoints to keep."""
    eval_every: int = 0
    """Evaluate on the held-out rows every N steps (0 = only before and after training)."""
    eval_at_start: bool = True
    """Evaluate before the first step (the 'before' number)."""
    log_every: int = 1
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


def resolve_lr(config: TrainConfig, full_ft_lr: float) -> float:
    if config.lr is not None:
        return config.lr
    return full_ft_lr * (LORA_LR_MULTIPLIER if config.lora else 1.0)


def start(config: TrainConfig) -> None:
    """Join the other processes when launched with several (no-op otherwise), then seed every RNG
    with ``config.seed``: the same on every rank, so models and adapters start identical. On CPU,
    freed memory is kept for reuse (``config.cpu_memory``)."""
    distributed.setup(config.device)
    seed_everything(config.seed)
    if config.cpu_memory == "retain" and resolve_device(config.device).type == "cpu":
        cpu_allocator.retain_freed_memory()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_policy(config: TrainConfig, lora_rank_for=rl_lora_rank):
    """Load the model and tokenizer, with a fresh LoRA adapter when ``config.lora``."""
    model, tok = load_model(config.model, device=resolve_device(config.device))
    if config.lora:
        rank = config.lora_rank or lora_rank_for(count_parameters(model))
        targets = config.lora_target if config.lora_target == "all-linear" else [
            t.strip() for t in config.lora_target.split(",") if t.strip()]
        model = add_lora(model, rank=rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                         target_modules=targets)
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


def frozen_copy(model):
    """A frozen reference for full fine-tuning (with LoRA, disabling the adapter is the reference)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


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


def load_rows_for(config: TrainConfig, kind: str) -> tuple[list[dict], list[dict], Optional[str]]:
    """(train rows, held-out rows, the task's default reward spec or None)."""
    from posttrain.data import load_rows

    if (config.data is None) == (config.task is None):
        raise ValueError("give exactly one of --data FILE or --task NAME")
    if config.task is not None:
        from posttrain.tasks import get_task, task_info

        info = task_info(config.task)
        train = get_task(config.task, "train", n=config.task_size, seed=config.seed) if "train" in info.splits else []
        test = get_task(config.task, "test", n=config.eval_size, seed=config.seed)
        return (train or test), test, info.reward
    from posttrain.rewards import row_checks

    rows = load_rows(config.data, kind, checks=row_checks(getattr(config, "reward", None)))
    n_eval = int(round(len(rows) * config.eval_fraction))
    if n_eval:
        rng = random.Random(config.seed)
        order = list(range(len(rows)))
        rng.shuffle(order)
        held = set(order[:n_eval])
        return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)], None
    return rows, [], None


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    """The last step's metrics."""
    evals: list[dict[str, Any]]
    """Every evaluation: {"step", "accuracy"/"reward", ...}."""

    @property
    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "metrics.jsonl")


class Run:
    """A run directory with its tracker, checkpoints and resume logic."""

    def __init__(self, config: TrainConfig, method: str, total_steps: int):
        self.config, self.method = config, method
        self.main = distributed.is_main()
        if config.resume:
            run_dir = Path(config.resume)
            self.run_dir = make_run_dir(run_dir.parent, run_dir.name, resume=True)
        else:  # rank 0 names and creates it (the default name has the time in it)
            self.run_dir = distributed.broadcast(
                make_run_dir(config.output_dir, config.name, method=method) if self.main else None)
        self.resume_from = ckpt.latest_checkpoint(self.run_dir) if config.resume else None
        if config.resume and self.resume_from is None:
            raise ckpt_error(self.run_dir)
        resume_step = int(self.resume_from.name.split("-")[1]) if self.resume_from else None
        self.tracker = Tracker(self.run_dir, cfgmod.to_dict(config), header=f"posttrain train {method}",
                               resume_step=resume_step, enabled=self.main,
                               tensorboard=config.tensorboard, total_steps=total_steps, print_every=config.log_every)
        self.evals: list[dict[str, Any]] = read_jsonl(self.run_dir / "evals.jsonl") if resume_step else []
        if resume_step is not None:
            self.evals = [e for e in self.evals if e["step"] <= resume_step]
        self.generators: dict[str, torch.Generator] = {}
        self.started = time.time()
        from posttrain.doctor import Doctor

        self.doctor = Doctor()

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict] | None = None) -> None:
        """Log a step's metrics (and samples for review), then let the doctor read them."""
        self.tracker.log(step, metrics)
        if samples:
            self.tracker.log_samples(step, samples)
        if self.main:
            self.doctor.watch(self.run_dir, self.tracker.history)

    def out_of_time(self) -> bool:
        """True once the run has used its max_minutes budget (never when it is 0); rank 0's clock
        decides for every rank."""
        if self.config.max_minutes <= 0:
            return False
        return bool(distributed.broadcast(time.time() - self.started > 60 * self.config.max_minutes))

    def restore(self, model, optimizer, scheduler, stream: PromptStream | None) -> tuple[int, dict]:
        """Load the newest checkpoint when resuming; returns (step done, saved extra state)."""
        if self.resume_from is None:
            return 0, {}
        state = ckpt.load_checkpoint(self.resume_from, model, optimizer, scheduler, generators=self.generators,
                                     rank=distributed.rank(), world_size=distributed.world_size())
        if stream is not None and "stream" in state:
            stream.restore(state["stream"])
        self.tracker.console.print(f"resumed {self.run_dir} at step {state['step']}")
        return int(state["step"]), state.get("extra", {})

    def checkpoint(self, step: int, model, optimizer, scheduler, stream: PromptStream | None, extra: dict | None = None):
        """Save ``checkpoints/step-<step>/`` (every rank calls it: each adds its RNG state)."""
        distributed.check_in_sync(trainable(model, optimizer))
        state = {"stream": stream.state() if stream else None, "extra": extra or {}}
        path = ckpt.save_checkpoint(self.run_dir, step, model, optimizer, scheduler, state=state,
                                    generators=self.generators, keep_last=self.config.keep_last,
                                    rank=distributed.rank(), world_size=distributed.world_size())
        distributed.barrier()
        return path

    @contextlib.contextmanager
    def stop_safely(self, step: int, model, optimizer, scheduler, stream: PromptStream | None,
                    extra: dict[str, Any] | None = None):
        """Wrap one step: if it is interrupted (Ctrl-C) or a judge keeps failing
        (``JudgeFailureRate``), put the data position and generators back to where the step
        began, checkpoint the last completed step, and re-raise: nothing done is lost, and
        ``--resume`` redoes this step exactly. Under several processes the others may be inside a
        collective, so nothing is saved: ``--resume`` continues from the last periodic checkpoint."""
        from posttrain.rlaif import JudgeFailureRate

        saved = (stream.state() if stream else None, {k: g.get_state() for k, g in self.generators.items()})
        try:
            yield
        except (JudgeFailureRate, KeyboardInterrupt) as e:
            if distributed.world_size() > 1:
                self.tracker.console.print(f"stopped at step {step} ({type(e).__name__}); resume from the last "
                                           f"checkpoint with --resume {self.run_dir}")
                self.tracker.close()
                raise
            if stream is not None:
                stream.restore(saved[0])
            for k, g in self.generators.items():
                g.set_state(saved[1][k])
            path = self.checkpoint(step - 1, model, optimizer, scheduler, stream, extra=extra)
            self.tracker.console.print(f"stopped at step {step} ({type(e).__name__}); saved {path}: "
                                       f"resume with --resume {self.run_dir}")
            self.tracker.close()
            raise

    def due(self, step: int, every: int, last: int) -> bool:
        return step == last or (every > 0 and step % every == 0)

    def end_step(self, step: int, last: int, evaluate, checkpoint) -> int:
        """The end of a training step, the same in every trainer: the step becomes the last one
        when the time budget is spent; ``evaluate(step)`` every ``eval_every`` steps (the last
        step's evaluation is ``final_eval``'s); ``checkpoint(step)`` when due. Returns the last step."""
        if self.out_of_time():
            last = step
        if self.config.eval_every and step % self.config.eval_every == 0 and step != last:
            evaluate(step)
        if self.due(step, self.config.checkpoint_every, last):
            checkpoint(step)
        return last

    def final_eval(self, last: int, evaluate) -> None:
        """Evaluate after the last step unless that step was evaluated already."""
        if not self.evals or self.evals[-1]["step"] != last:
            evaluate(last)

    def log_eval(self, step: int, result: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **result}
        self.evals.append(record)
        if self.main:
            with open(self.run_dir / "evals.jsonl", "a", encoding="utf-8") as f:
                import json

                f.write(json.dumps(record) + "\n")
        summary = "  ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
        self.tracker.console.print(f"eval @ step {step}: {summary}", highlight=False)
        return record

    def finish(self, model, tokenizer, metrics: dict[str, Any]) -> RunResult:
        """Save final/ (HF format), run the doctor's last check and write report.html (rank 0)."""
        distributed.check_in_sync(trainable(model))
        full = distributed.full_state_dict(model) if distributed.is_sharded(model) else None  # every rank
        if self.main:
            ckpt.save_model(model, self.run_dir / "final", tokenizer, state_dict=full)
        self.tracker.close()
        if self.main:
            self.doctor.finish(self.run_dir, self.tracker.history)
        distributed.barrier()
        return RunResult(self.run_dir, metrics, self.evals)


def trainable(*holders) -> list[torch.Tensor]:
    """The trainable tensors of models and of ``TrainState``-like holders (their ``parts``), in a
    fixed order: what must stay identical on every rank."""
    out: list[torch.Tensor] = []
    for h in holders:
        if isinstance(h, torch.nn.Module):
            out += [p for p in h.parameters() if p.requires_grad]
        for part in getattr(h, "parts", {}).values():
            params = part.parameters()
            out += [p for p in params if p.requires_grad]
    return out


def greedy_eval_sharded(policy, tok, rows: list[dict], reward, max_new_tokens: int, chat_template: bool = True) -> dict:
    """``evaluate.greedy_eval`` with the rows split across the processes and the results combined
    (accuracy over every judged row; rank 0's examples)."""
    from posttrain.evaluate import greedy_eval

    with distributed.gathered(policy):  # FSDP: the ranks generate different numbers of tokens
        part = greedy_eval(policy, tok, rows[distributed.shard(len(rows))], reward, max_new_tokens,
                           chat_template=chat_template)
    every = distributed.gather(part)
    if len(every) == 1:
        return part
    judged = [r["n"] - r["none"] for r in every]
    total = sum(j * r["accuracy"] for j, r in zip(judged, every) if j)
    return {"accuracy": total / sum(judged) if sum(judged) else float("nan"), "n": sum(r["n"] for r in every),
            "none": sum(r["none"] for r in every), "examples": every[0]["examples"]}


def ckpt_error(run_dir: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{run_dir}: no complete checkpoint to resume from (checkpoints/step-N/state.json)")


class StepTimer:
    """Wall-clock phases of one step, reported as time/<phase>."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.phases.items()}
        out["time/step"] = time.perf_counter() - self.t0
        return out


class Phase:
    """``with Phase(timer, "update"):`` adds the block's wall-clock time to ``time/update``."""

    def __init__(self, timer: StepTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> "Phase":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.add(self.name, time.perf_counter() - self.t0)


def grad_step(model, optimizer, scheduler, max_grad_norm: float) -> tuple[float, bool]:
    """Clip, check and take the optimizer step. A non-finite gradient skips the step (gradients
    dropped, nothing trained on it) and returns (norm, False). Under several processes the
    gradients not reduced in backward (by DDP or FSDP: the replicated ones under FSDP) are first
    summed over them (each rank's loss was scaled by its share of the batch)."""
    distributed.sum_gradients(model.parameters())
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if any(distributed.is_dtensor(p) for p in params):  # FSDP: sharded and replicated gradients
        norm = distributed.clip_grad_norm(params, max_grad_norm)
    elif max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params])) if params else torch.tensor(0.0)
    ok = bool(torch.isfinite(norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(norm), ok
