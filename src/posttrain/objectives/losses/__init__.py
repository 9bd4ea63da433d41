"""Loss functions: pure tensor code, importable with torch alone, each returning ``(loss, metrics)``.

Per-token losses are reduced with `reduce` (``token-mean``, ``seq-mean-token-mean``,
``seq-mean-token-sum-norm``) so a trainer picks the aggregation by name, not by branching.
"""

import dataclasses
from typing import Callable

from posttrain.objectives.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from posttrain.objectives.losses.kl import KL_KINDS, kl_estimate, kl_penalty
from posttrain.objectives.losses.policy import entropy_bonus, policy_loss
from posttrain.objectives.losses.reduce import REDUCE_MODES, masked_mean, reduce, reduction_counts, reduction_share
from posttrain.objectives.losses.preference import bradley_terry_loss
from posttrain.objectives.losses.value import value_loss



@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A policy-gradient loss as the trainers use it: ``compute(logp_BT, old_logp_BT, adv, mask_BT,
    clip_low, clip_high, reduce, max_len) -> (loss, metrics)`` with metrics ``clip_frac``,
    ``ratio/mean`` and ``approx_kl``. ``clip_frac`` is the share of valid tokens whose clipped term
    was the one taken (their gradient is 0)."""

    compute: Callable


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": PolicyLoss(policy_loss),  # PPO's clipped surrogate, per token (GRPO, PPO; DAPO's clip-higher)
}
"""Policy losses by name (``--policy-loss``); a new one is a pure function in this package and
one entry here."""

__all__ = [
    "POLICY_LOSSES",
    "PolicyLoss",
    "DPO_LOSS_TYPES",
    "KL_KINDS",
    "REDUCE_MODES",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_bonus",
    "kl_estimate",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "reduce",
    "reduction_counts",
    "reduction_share",
    "value_loss",
]
