"""The frozen reference model of GRPO, PPO and DPO, in one helper.

With LoRA the reference is the policy with its adapters disabled (no second copy in memory; the
trainable flags of every adapter, e.g. PPO's critic adapter, are kept as they were); with full
fine-tuning it is a frozen copy made before the first step (``copy=True``), or, where the trainer
computes every reference log-prob before training (DPO), the policy itself as it is then
(``copy=False``). Under FSDP the trainers shard a copy like the policy (``common.shard``).
"""

from __future__ import annotations

import contextlib
import copy as copymod

from posttrain.objectives.value_head import keep_requires_grad


def frozen_copy(model):
    """A frozen copy of ``model`` in eval mode."""
    ref = copymod.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class Reference:
    """``with reference.model() as m:`` runs ``m`` as the frozen reference (see the module docstring)."""

    def __init__(self, policy, lora: bool, copy: bool = True):
        self.policy, self.lora = policy, lora
        self.copy = frozen_copy(policy) if copy and not lora else None

    @contextlib.contextmanager
    def model(self):
        if self.copy is not None:
            yield self.copy
        elif self.lora:
            with keep_requires_grad(self.policy), self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.policy
