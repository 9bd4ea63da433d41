"""Loss functions: pure tensor code, importable with torch alone, each returning ``(loss, metrics)``.

Per-token losses are reduced with `reduce` (``token-mean``, ``seq-mean-token-mean``,
``seq-mean-token-sum-norm``) so a trainer picks the aggregation by name, not by branching.
"""

import dataclasses
from typing import Callable

from posttrain.objectives.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from posttrain.objectives.losses.kto import kto_loss
from posttrain.objectives.losses.ref_free import log_odds, orpo_loss, simpo_loss
from posttrain.objectives.losses.kl import KL_KINDS, kl_estimate, kl_penalty
from posttrain.objectives.losses.correction import MASK_BAND, ROLLOUT_CORRECTIONS, TIS_CAP, rollout_correction
from posttrain.objectives.losses.policy import entropy_bonus, policy_loss
from posttrain.objectives.losses.policy_seq import cispo_loss, gspo_loss, gspo_token_loss
from posttrain.objectives.losses.reduce import REDUCE_MODES, masked_mean, reduce, reduction_counts, reduction_share
from posttrain.objectives.losses.preference import bradley_terry_loss
from posttrain.objectives.losses.value import value_loss



@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A policy-gradient loss as the trainers use it: ``compute(logp_BT, old_logp_BT, adv, mask_BT,
    clip_low, clip_high, reduce, max_len, weight_BT=None, clip_ratio_c=None) -> (loss, metrics)``
    with metrics ``clip_frac``, ``ratio/mean`` and ``approx_kl`` (each loss's docstring says what
    "clipped" means for it)."""

    compute: Callable
    clip: tuple[float, float]
    """The loss's default (clip_low, clip_high), used when the run gives none (``clip_range``)."""
    help: str
    """One line for the CLI and the README."""
    per_token_adv: bool = True
    """Whether it takes per-token advantages (``adv_BT``: PPO's GAE, REINFORCE++), not only ``adv_B``."""
    dual_clip: bool = False
    """Whether it takes the dual-clip bound ``clip_ratio_c``."""


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": PolicyLoss(policy_loss, (0.2, 0.2), "PPO's clipped token surrogate (GRPO and PPO papers; DAPO's "
                           "clip-higher; dual-clip with --clip-ratio-c)", dual_clip=True),
    "gspo": PolicyLoss(gspo_loss, (3e-4, 4e-4), "GSPO: the sequence's geometric-mean ratio, clipped per sequence "
                       "(Zheng et al. 2025)", per_token_adv=False),
    "gspo_token": PolicyLoss(gspo_token_loss, (3e-4, 4e-4), "GSPO-token: the sequence ratio with a per-token "
                             "gradient path and per-token advantages (Zheng et al. 2025)"),
    "cispo": PolicyLoss(cispo_loss, (1.0, 4.0), "CISPO: REINFORCE weighted by the clipped stop-gradient ratio, "
                        "no token's gradient dropped (MiniMax-M1 2025)"),
}
"""Policy losses by name (``--policy-loss``); a new one is a pure function in this package and
one entry here."""


def clip_range(loss: str, clip_low: float | None, clip_high: float | None) -> tuple[float, float]:
    """The (clip_low, clip_high) a run uses: what it gave, else the loss's defaults. A run that
    gives only clip_low clips symmetrically (clip_high = clip_low), as before the table had
    defaults."""
    default_low, default_high = POLICY_LOSSES[loss].clip
    if clip_low is None:
        return default_low, default_high if clip_high is None else clip_high
    return clip_low, clip_low if clip_high is None else clip_high


__all__ = [
    "MASK_BAND",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "TIS_CAP",
    "cispo_loss",
    "clip_range",
    "gspo_loss",
    "gspo_token_loss",
    "rollout_correction",
    "PolicyLoss",
    "DPO_LOSS_TYPES",
    "KL_KINDS",
    "REDUCE_MODES",
    "bradley_terry_loss",
    "dpo_loss",
    "kto_loss",
    "log_odds",
    "orpo_loss",
    "simpo_loss",
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
