"""The optimizer step, one rule for every trainer: gradient accumulation, the reduction over
processes, clipping, and what a non-finite loss or gradient does.

A trainer's update is a sequence of optimizer updates (GRPO: ``num_iterations``; PPO: ``ppo_epochs``
x ``minibatches``; DPO and the reward model: one), each made of micro-batches:

    loss, *stats = step.forward(loss_fn, *args, last=is_last)   # through DDP's forward when data-parallel
    counted = step.backward(loss, weight, last=is_last)          # weight: the micro-batch's share of the
                                                                 # global batch's normaliser
    norms, ok = step.step()                                      # reduce, clip, check, AdamW

``weight`` makes accumulated micro-batches (and processes) add up to one big batch
(``losses.reduction_share``). Under DDP the micro-batches before the last run under ``no_sync`` and
the last one's backward reduces; under FSDP only the last backward reduce-scatters
(``distributed.grad_sync``); the replicated tensors FSDP does not own are summed in ``step``
(``distributed.sum_gradients``). Each of ``clip_sets`` is clipped to ``max_grad_norm`` on its own
(PPO: the policy's and the critic's gradients differ in scale; the others have one set).

The non-finite rule, the same in GRPO, PPO, DPO and the reward model:
- a non-finite loss in any micro-batch on any process, or a non-finite gradient norm, skips the
  update on every process: gradients dropped, weights and optimizer state untouched, counted in
  ``nonfinite_steps`` (``step`` returns ok=False and NaN norms);
- a single process stops backpropagating that update's later micro-batches (``forward`` returns
  None for them, ``backward`` returns False: their statistics are not counted); under DDP/FSDP every
  process runs every backward, since they communicate inside it, and drops the result;
- the data is consumed (no retry), and the learning-rate schedule, which the loop advances once
  per training step, moves on as if the update had been taken: which steps were skipped changes
  neither the data order nor the schedule of the rest of the run.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from posttrain.objectives.value_head import clip_and_norm
from posttrain.runtime import distributed


def trainable_params(*modules) -> list[torch.Tensor]:
    """The trainable tensors of ``modules``, in their order (clipping's norm depends on it)."""
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


class OptimizerStep:
    """Accumulate, reduce, clip and step (see the module docstring). ``models``: the trained models
    whose FSDP gradient sync is switched per micro-batch; ``dp``: their DDP holder, or None."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip_sets: Sequence[Sequence[torch.Tensor]],
                 max_grad_norm: float, models: Sequence[torch.nn.Module] = (),
                 dp: distributed.DataParallel | None = None):
        self.optimizer, self.max_grad_norm, self.dp = optimizer, max_grad_norm, dp
        self.clip_sets = [list(s) for s in clip_sets]
        self.models = [m for m in models if m is not None]
        # several processes communicate inside every forward/backward: all must run them
        self.collective = dp is not None or any(distributed.is_sharded(m) for m in self.models)
        self.finite = True

    def forward(self, fn: Callable, *args, last: bool = True):
        """``fn(*args)`` (its first output the loss), through DDP when data-parallel; ``last``: the
        update's last micro-batch, whose backward reduces the gradients. None once a single
        process has met a non-finite loss in this update (nothing more to compute)."""
        if not self.finite and not self.collective:
            return None
        return distributed.run(self.dp, fn, *args, sync=last)

    def backward(self, loss: torch.Tensor, weight: float = 1.0, last: bool = True) -> bool:
        """Backpropagate ``loss * weight``; returns whether this update is still finite (the
        micro-batch's statistics count)."""
        if not torch.isfinite(loss):
            self.finite = False
            if not self.collective:
                return False
        for m in self.models:
            distributed.grad_sync(m, last)
        (loss * weight).backward()
        return self.finite

    def step(self) -> tuple[list[float], bool]:
        """End the update: (gradient norm of each clip set before clipping, whether the optimizer
        stepped). Gradients are zeroed either way."""
        ok = distributed.all_true(self.finite)
        self.finite = True
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            return [math.nan] * len(self.clip_sets), False
        distributed.sum_gradients([p for s in self.clip_sets for p in s])
        norms = [clip_and_norm(s, self.max_grad_norm) for s in self.clip_sets]
        ok = all(math.isfinite(n) for n in norms)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms, ok
