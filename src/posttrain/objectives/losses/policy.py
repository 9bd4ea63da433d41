"""Clipped policy-gradient loss (PPO, GRPO, REINFORCE++, RLOO all use it) and the entropy bonus.

PPO (Schulman et al. 2017, eq. 7), per token, with r = exp(logp - old_logp):

    loss_t = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)

``clip_high > clip_low`` is DAPO's "clip-higher" (Yu et al. 2025): it lets low-probability tokens
grow more before the clip stops them. The per-token loss is reduced with `losses.reduce`
(``token-mean`` as DAPO / verl default, ``seq-mean-token-mean`` as the GRPO paper,
``seq-mean-token-sum-norm`` as Dr. GRPO). Metric names follow verl's ``pg_clipfrac`` / ``ppo_kl``.
"""

from __future__ import annotations

import torch

from posttrain.objectives.losses.kl import kl_estimate
from posttrain.objectives.losses.reduce import reduce as _reduce


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    reduce: str = "token-mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss; returns ``(loss, metrics)``.

    `adv` is either ``adv_B`` (one advantage per sequence, broadcast over its tokens: GRPO, RLOO)
    or ``adv_BT`` (per token: PPO with GAE, REINFORCE++). `old_logp_BT` is the log-prob under the
    policy that sampled the tokens; it is treated as a constant. ``clip_high=None`` clips
    symmetrically (``clip_high = clip_low``).

    Metrics (0-d tensors, detached, over valid tokens):
      ``clip_frac``  fraction of tokens where the clipped term was the one chosen (strictly larger loss),
      ``ratio/mean`` mean of r,
      ``approx_kl``  k3 estimate of KL(pi_old || pi) from the sampled tokens: mean of (r - 1) - log r.
    """
    if logp_BT.shape != old_logp_BT.shape or logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"policy_loss: logp {tuple(logp_BT.shape)}, old_logp {tuple(old_logp_BT.shape)} and "
            f"mask {tuple(mask_BT.shape)} must have the same [B, T] shape"
        )
    if adv.dim() == 1:
        if adv.shape[0] != logp_BT.shape[0]:
            raise ValueError(f"policy_loss: adv_B has {adv.shape[0]} entries for a batch of {logp_BT.shape[0]}")
        adv_BT = adv.unsqueeze(-1)
    elif adv.shape == logp_BT.shape:
        adv_BT = adv
    else:
        raise ValueError(f"policy_loss: adv must be [B] or [B, T], got {tuple(adv.shape)}")
    if clip_high is None:
        clip_high = clip_low
    adv_BT = adv_BT.detach().to(logp_BT.dtype)
    old_logp_BT = old_logp_BT.detach()

    # Masked slots may hold anything (padding): zero the log-ratio there so exp() cannot overflow.
    valid_BT = mask_BT != 0
    log_ratio_BT = torch.where(valid_BT, logp_BT - old_logp_BT, torch.zeros_like(logp_BT))
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    loss = _reduce(loss_BT, mask_BT, reduce, max_len)

    with torch.no_grad():
        metrics = {
            "clip_frac": _reduce((clipped_BT > unclipped_BT).to(logp_BT.dtype), mask_BT),
            "ratio/mean": _reduce(ratio_BT, mask_BT),
            "approx_kl": _reduce(kl_estimate(old_logp_BT, logp_BT.detach(), "k3"), mask_BT),
        }
    return loss, metrics


def entropy_bonus(
    entropy_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    coef: float,
    reduce: str = "token-mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Entropy bonus term ``-coef * reduce(entropy_BT)`` (PPO eq. 9), to add to the policy loss.

    `entropy_BT` comes from ``completion_logprobs(..., with_entropy=True)``: no second logits pass.
    Metric ``entropy`` is the token-mean entropy over valid tokens.
    """
    loss = -coef * _reduce(entropy_BT, mask_BT, reduce, max_len)
    return loss, {"entropy": _reduce(entropy_BT.detach(), mask_BT, "token-mean")}
