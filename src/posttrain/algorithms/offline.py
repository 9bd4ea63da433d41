"""What the trainers on a fixed dataset share (DPO and its losses, SFT): a run's length in epochs,
micro-batches and their accumulation into one optimizer update, activation checkpointing.

The sampling trainers (GRPO, PPO) draw prompts, not examples, and accumulate in their own update
(``grpo``, ``ppo_parts``); the optimizer-step rule itself (clipping, the non-finite rule, the
reduction over processes) is ``optim.OptimizerStep``, the same for all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from posttrain.algorithms import common
from posttrain.algorithms.optim import OptimizerStep, trainable_params
from posttrain.errors import ResumeError
from posttrain.runtime import distributed


class Training(NamedTuple):
    """What an offline trainer steps with (``prepare``)."""

    optimizer: Any
    scheduler: Any
    stream: common.PromptStream
    start: int
    """The last completed step: 0, or the checkpoint's when resuming."""
    rule: OptimizerStep


def prepare(run, policy, config, examples: list, full_ft_lr: float) -> Training:
    """AdamW at the run's learning rate (``full_ft_lr``, times 10 with LoRA, unless given), the
    schedule, the seeded stream of ``examples``, all restored from the newest checkpoint when
    resuming, and the optimizer-step rule (through DDP when data-parallel)."""
    optimizer = common.build_optimizer(policy, config, common.resolve_lr(config, full_ft_lr))
    scheduler = common.build_scheduler(optimizer, config)
    stream = common.PromptStream(examples, config.seed)
    start, _ = run.restore(policy, optimizer, scheduler, stream)
    dp = distributed.data_parallel(policy)  # data-parallel runs: DDP reduces the gradients
    rule = OptimizerStep(optimizer, [trainable_params(policy)], config.max_grad_norm, [policy], dp)
    return Training(optimizer, scheduler, stream, start, rule)


def micro_batches(batch: list, size: int) -> list[list]:
    """``batch`` in consecutive pieces of ``size`` (0 = one piece)."""
    size = size or len(batch)
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def accumulate(rule: OptimizerStep, loss_fn: Callable, policy, micro: Sequence[list], weights: Sequence[float],
               *args) -> tuple[dict, int]:
    """Forward/backward of each micro-batch (``loss_fn(policy, mb, *args)`` -> (loss, metrics, tokens
    fed)), its loss weighted by ``weights[k]``, its share of the step's global normaliser (pairs,
    or target tokens), so that the gradient, summed over micro-batches and processes, equals one
    big batch's. Returns (metrics weighted the same way, tokens fed); a non-finite loss stops it on
    a single process (``optim.py``'s rule)."""
    policy.train()
    sums: dict[str, float] = {}
    tokens = 0
    for k, (mb, w) in enumerate(zip(micro, weights)):
        last = k == len(micro) - 1
        out = rule.forward(loss_fn, policy, mb, *args, last=last)
        if out is None:
            break
        loss, metrics, n = out
        tokens += n
        if rule.backward(loss, w, last):
            for key, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + w * v
    return sums, tokens


def step_optimizer(rule: OptimizerStep) -> dict:
    """The optimizer update (skipped, gradients dropped, when a loss or the gradient is not finite)."""
    (norm,), ok = rule.step()
    return {"grad_norm": norm, "nonfinite_steps": 0 if ok else 1}


def total_steps(config, n_train: int) -> int:
    """``max_steps``, or ``ceil(epochs * examples / batch_size)`` when the run is sized in epochs."""
    if config.epochs > 0:
        return max(1, math.ceil(config.epochs * n_train / config.batch_size))
    return config.max_steps


def check_resumed_length(config) -> None:
    """On resume, a run whose length is set by ``epochs`` (> 0) changes its length with a new
    ``--epochs`` (recorded in ``resumes.jsonl`` with the ``max_steps`` it gives): a changed
    ``--max-steps`` would be overwritten by the epochs, so it is refused with the reason."""
    from posttrain.algorithms.run import saved_config

    if not config.resume or config.epochs <= 0:
        return
    saved = saved_config(type(config), Path(config.resume))
    if saved is not None and config.max_steps != saved.max_steps:
        raise ResumeError(f"--resume {config.resume}: --max-steps {config.max_steps} would be ignored: the run's "
                          f"length is set by --epochs {config.epochs:g} (now {saved.max_steps} steps); change it "
                          f"with --epochs alone, or give --epochs 0 with --max-steps")


def enable_activation_checkpointing(model, every_n_layers: int) -> None:
    """Non-reentrant activation checkpointing of the decoder layers (through a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
        inner.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError("activation_checkpointing > 1 needs transformers with activation_checkpointing_enable")
