"""Loss functions: pure tensor code, importable with torch alone, each returning ``(loss, metrics)``.

Per-token losses are reduced with `reduce` (``token-mean``, ``seq-mean-token-mean``,
``seq-mean-token-sum-norm``) so a trainer picks the aggregation by name, not by branching.
"""

from posttrain.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from posttrain.losses.kl import KL_KINDS, kl_estimate, kl_penalty
from posttrain.losses.policy import entropy_bonus, policy_loss
from posttrain.losses.reduce import REDUCE_MODES, masked_mean, reduce, reduction_counts, reduction_share
from posttrain.losses.value import value_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "KL_KINDS",
    "REDUCE_MODES",
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
