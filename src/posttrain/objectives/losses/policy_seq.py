"""GSPO (sequence-level ratio) and CISPO (clipped, stop-gradient importance weight): policy losses
with `policy.policy_loss`'s signature, so a trainer calls any entry of ``POLICY_LOSSES`` alike.

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7). Per sequence i, over its
|y_i| valid tokens, the length-normalised sequence ratio (the geometric mean of the token ratios)

    s_i = exp( (1/|y_i|) sum_t (logp_t - old_logp_t) )
    loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

clipped per sequence, with the paper's ranges as this loss's defaults (clip_low 3e-4, clip_high
4e-4: a sequence ratio moves far less than a token's). ``gspo`` puts loss_i on each of the
sequence's tokens (in GSPO-token's form below, whose value and gradient are then GSPO's), so the
reductions apply: ``seq-mean-token-mean`` is the paper's objective (mean over sequences),
``token-mean`` weighs each sequence by its length (verl's default aggregation). It takes one
advantage per sequence (``adv_B``).

``gspo_token`` (the paper's GSPO-token, eq. 13-14): per token, the straight-through ratio

    s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]     (value s_i, gradient s_i * grad logp_t)
    loss_t = -min(s_i,t A_i,t, clip(s_i,t) A_i,t)

which allows per-token advantages (PPO's GAE, REINFORCE++); with one advantage per sequence its
value and gradient equal ``gspo``'s (verl ``compute_policy_loss_gspo``; TRL
``importance_sampling_level="sequence"``). As verl, the log of the sequence ratio is clamped at
10 before exp (an overflow guard far outside any clip range).

CISPO (MiniMax-M1, 2025, eq. 4-5): REINFORCE weighted by the clipped, stop-gradient token ratio

    loss_t = -sg[clip(r_t, 1 - clip_low, 1 + clip_high)] * A_t * logp_t

so no token's gradient is dropped: a clipped token still gets -w A grad logp_t with its weight
capped. Defaults: no lower bound (clip_low 1, the paper "does not impose a lower bound") and
an upper cap of 5 on the weight (clip_high 4; TRL's recommended ``epsilon_high=5.0`` for
``loss_type="cispo"``, where TRL's epsilon_high is the cap itself, from ScaleRL). Its loss value
is A-weighted log-probs, not comparable to PPO's (its gradient is).

All three multiply each token's loss by the optional detached ``weight_BT`` (the rollout
correction's) before the reduction. With old == logp (on-policy, GRPO's ``num_iterations=1``)
every ratio is 1 and all three give PPO's gradient, -A grad logp per token.
"""

from __future__ import annotations

import torch

from posttrain.objectives.losses.policy import policy_inputs, policy_metrics
from posttrain.objectives.losses.reduce import reduce as _reduce

GSPO_LOG_RATIO_MAX = 10.0
"""The log sequence ratio is clamped at this before exp (verl's guard against overflow)."""
CISPO_LOG_RATIO_BOUND = 20.0
"""|log r| is clamped to this before exp in CISPO (verl's ``clamp(min=-20, max=20)``)."""


def _no_dual_clip(name: str, clip_ratio_c) -> None:
    if clip_ratio_c is not None:
        raise ValueError(f"{name}: dual-clip (clip_ratio_c) is a bound of the PPO clip loss (ppo_clip) only")


def _seq_log_ratio_B(log_ratio_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's valid tokens of the log-ratio (0 for a sequence with none)."""
    count_B = valid_BT.sum(-1).clamp(min=1).to(log_ratio_BT.dtype)
    return log_ratio_BT.sum(-1) / count_B  # log_ratio_BT is 0 at invalid slots


def gspo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
    reduce: str = "seq-mean-token-mean",
    max_len: int | None = None,
    weight_BT: torch.Tensor | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO, the sequence-level clipped surrogate (module doc); ``adv`` is ``adv_B``.

    Metrics: ``clip_frac`` = share of valid tokens that belong to a sequence whose clipped term
    was taken (strictly larger loss; that sequence's gradient is 0); ``ratio/mean`` = token-mean
    of the sequence ratio s_i (each sequence weighted by its length); ``approx_kl`` = the token
    ratios' k3, as for PPO."""
    if adv.dim() != 1:
        raise ValueError(f"gspo_loss: takes one advantage per sequence (adv_B), got {tuple(adv.shape)}; "
                         "gspo_token takes per-token advantages")
    _no_dual_clip("gspo_loss", clip_ratio_c)
    # With one advantage per sequence, GSPO-token's value and (unweighted) gradient are GSPO's: the
    # same computation serves both, and a per-token weight then acts on its own token's gradient
    # (-w_t A s_i grad logp_t), as verl applies its rollout weights to GSPO.
    return gspo_token_loss(logp_BT, old_logp_BT, adv, mask_BT, clip_low, clip_high, reduce, max_len, weight_BT)


def gspo_token_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
    reduce: str = "seq-mean-token-mean",
    max_len: int | None = None,
    weight_BT: torch.Tensor | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token (module doc); ``adv`` is ``adv_B`` or ``adv_BT``.

    Metrics: ``clip_frac`` = share of valid tokens whose clipped term was taken (with one advantage
    per sequence: the tokens of clipped sequences, as ``gspo``); ``ratio/mean`` = token-mean of
    s_i,t (= s_i in value); ``approx_kl`` as for PPO."""
    _no_dual_clip("gspo_token_loss", clip_ratio_c)
    adv_BT, old_logp_BT, valid_BT, log_ratio_BT, w_BT = policy_inputs(
        "gspo_token_loss", logp_BT, old_logp_BT, adv, mask_BT, weight_BT)
    if clip_high is None:
        clip_high = clip_low
    seq_B = _seq_log_ratio_B(log_ratio_BT, valid_BT).detach()
    # logp - sg[logp] is 0 in value and 1 in gradient; formed only at valid slots (padding may be -inf)
    straight_BT = torch.where(valid_BT, logp_BT - logp_BT.detach(), torch.zeros_like(logp_BT))
    s_BT = torch.exp((straight_BT + seq_B.unsqueeze(-1)).clamp(max=GSPO_LOG_RATIO_MAX))
    unclipped_BT = -adv_BT * s_BT
    clipped_BT = -adv_BT * torch.clamp(s_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    loss = _reduce(loss_BT * w_BT, mask_BT, reduce, max_len)
    return loss, policy_metrics(clipped_BT > unclipped_BT, s_BT, logp_BT, old_logp_BT, mask_BT)


def cispo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 1.0,
    clip_high: float | None = 4.0,
    reduce: str = "token-mean",
    max_len: int | None = None,
    weight_BT: torch.Tensor | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (module doc); ``adv`` is ``adv_B`` or ``adv_BT``.

    Metrics: ``clip_frac`` = share of valid tokens whose ratio left [1 - clip_low, 1 + clip_high],
    i.e. whose weight was capped (their gradient is kept, not dropped); ``ratio/mean`` and
    ``approx_kl`` as for PPO."""
    _no_dual_clip("cispo_loss", clip_ratio_c)
    adv_BT, old_logp_BT, valid_BT, log_ratio_BT, w_BT = policy_inputs(
        "cispo_loss", logp_BT, old_logp_BT, adv, mask_BT, weight_BT)
    if clip_high is None:
        clip_high = clip_low
    ratio_BT = torch.exp(log_ratio_BT.clamp(-CISPO_LOG_RATIO_BOUND, CISPO_LOG_RATIO_BOUND))
    is_w_BT = torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high).detach()
    logp_v_BT = torch.where(valid_BT, logp_BT, torch.zeros_like(logp_BT))  # padding may be -inf
    loss_BT = -is_w_BT * adv_BT * logp_v_BT
    loss = _reduce(loss_BT * w_BT, mask_BT, reduce, max_len)
    capped_BT = (ratio_BT < 1.0 - clip_low) | (ratio_BT > 1.0 + clip_high)
    return loss, policy_metrics(capped_BT, ratio_BT, logp_BT, old_logp_BT, mask_BT)
