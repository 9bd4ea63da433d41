"""Clipped policy-gradient loss (PPO, GRPO, REINFORCE++, RLOO all use it), its dual-clip bound,
the entropy bonus, and what every policy loss shares (`policy_inputs`).

PPO (Schulman et al. 2017, eq. 7), per token, with r = exp(logp - old_logp):

    loss_t = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)

``clip_high > clip_low`` is DAPO's "clip-higher" (Yu et al. 2025): it lets low-probability tokens
grow more before the clip stops them. Dual-clip (Ye et al. 2020, "Mastering Complex Control in
MOBA Games with Deep RL", eq. 5; verl ``clip_ratio_c``, 3.0): for A < 0 the loss is also bounded
by ``-A * c`` (c > 1), so a token whose ratio grew far past 1 while its advantage is negative
cannot produce an unbounded loss:

    loss_t = min(max(-A r, -A clip(r)), -A c)   if A < 0,   else as PPO.

The per-token loss is multiplied by an optional detached weight (``weight_BT``: the rollout
correction's, `losses.correction`) and reduced with `losses.reduce` (``token-mean`` as DAPO /
verl default, ``seq-mean-token-mean`` as the GRPO paper, ``seq-mean-token-sum-norm`` as Dr. GRPO).
Metric names follow verl's ``pg_clipfrac`` / ``ppo_kl``. The sequence-level and REINFORCE-style
losses (GSPO, CISPO) are `policy_seq.py`, with the same signature.
"""

from __future__ import annotations

from typing import Optional

import torch

from posttrain.objectives.losses.kl import kl_estimate
from posttrain.objectives.losses.reduce import reduce as _reduce


def policy_inputs(name: str, logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv: torch.Tensor,
                  mask_BT: torch.Tensor, weight_BT: Optional[torch.Tensor]):
    """Checked, broadcast inputs of a policy loss: ``(adv_BT, old_logp_BT, valid_BT, log_ratio_BT,
    weight_BT)``, all but `logp_BT` detached. `adv` is ``adv_B`` (broadcast over the tokens) or
    ``adv_BT``; the log-ratio is 0 at masked slots (padding may hold anything: exp cannot overflow
    there); ``weight_BT`` is ones when not given."""
    if logp_BT.shape != old_logp_BT.shape or logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"{name}: logp {tuple(logp_BT.shape)}, old_logp {tuple(old_logp_BT.shape)} and "
            f"mask {tuple(mask_BT.shape)} must have the same [B, T] shape"
        )
    if adv.dim() == 1:
        if adv.shape[0] != logp_BT.shape[0]:
            raise ValueError(f"{name}: adv_B has {adv.shape[0]} entries for a batch of {logp_BT.shape[0]}")
        adv_BT = adv.unsqueeze(-1).expand_as(logp_BT)
    elif adv.shape == logp_BT.shape:
        adv_BT = adv
    else:
        raise ValueError(f"{name}: adv must be [B] or [B, T], got {tuple(adv.shape)}")
    if weight_BT is None:
        weight_BT = torch.ones_like(logp_BT)
    elif weight_BT.shape != logp_BT.shape:
        raise ValueError(f"{name}: weight {tuple(weight_BT.shape)} must have logp's shape {tuple(logp_BT.shape)}")
    adv_BT = adv_BT.detach().to(logp_BT.dtype)
    old_logp_BT = old_logp_BT.detach()
    valid_BT = mask_BT != 0
    log_ratio_BT = torch.where(valid_BT, logp_BT - old_logp_BT, torch.zeros_like(logp_BT))
    return adv_BT, old_logp_BT, valid_BT, log_ratio_BT, weight_BT.detach().to(logp_BT.dtype)


def policy_metrics(clipped_BT: torch.Tensor, ratio_BT: torch.Tensor, logp_BT: torch.Tensor,
                   old_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three metrics every policy loss reports, token means over valid tokens (detached):
    ``clip_frac`` (share of tokens the loss counts as clipped: each loss says what that is),
    ``ratio/mean`` and ``approx_kl`` (k3 estimate of KL(pi_old || pi): mean of (r - 1) - log r)."""
    with torch.no_grad():
        return {
            "clip_frac": _reduce(clipped_BT.to(logp_BT.dtype), mask_BT),
            "ratio/mean": _reduce(ratio_BT.detach(), mask_BT),
            "approx_kl": _reduce(kl_estimate(old_logp_BT, logp_BT.detach(), "k3"), mask_BT),
        }


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    reduce: str = "token-mean",
    max_len: int | None = None,
    weight_BT: torch.Tensor | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (``ppo_clip``), optionally dual-clipped; returns ``(loss, metrics)``.

    `adv` is either ``adv_B`` (one advantage per sequence, broadcast over its tokens: GRPO, RLOO)
    or ``adv_BT`` (per token: PPO with GAE, REINFORCE++). `old_logp_BT` is the log-prob under the
    policy that sampled the tokens; it is treated as a constant. ``clip_high=None`` clips
    symmetrically (``clip_high = clip_low``). ``clip_ratio_c`` (None = off; > 1) is the dual-clip
    bound for negative advantages. ``weight_BT`` (detached) multiplies each token's loss.

    Metrics (0-d tensors, detached, over valid tokens):
      ``clip_frac``  fraction of tokens where a clipped term was the one taken: the PPO clip
                     (strictly larger loss than the unclipped term, gradient 0) or, with dual-clip,
                     the ``-A c`` bound (strictly smaller, gradient 0 too),
      ``ratio/mean`` mean of r,
      ``approx_kl``  k3 estimate of KL(pi_old || pi) from the sampled tokens: mean of (r - 1) - log r.
    """
    adv_BT, old_logp_BT, valid_BT, log_ratio_BT, w_BT = policy_inputs(
        "policy_loss", logp_BT, old_logp_BT, adv, mask_BT, weight_BT)
    if clip_high is None:
        clip_high = clip_low
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"policy_loss: clip_ratio_c must be > 1 (dual-clip bound), got {clip_ratio_c}")
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    was_clipped_BT = clipped_BT > unclipped_BT
    if clip_ratio_c is not None:
        bound_BT = -adv_BT * clip_ratio_c
        dual_BT = (adv_BT < 0) & (bound_BT < loss_BT)
        loss_BT = torch.where(adv_BT < 0, torch.minimum(loss_BT, bound_BT), loss_BT)
        was_clipped_BT = was_clipped_BT | dual_BT
    loss = _reduce(loss_BT * w_BT, mask_BT, reduce, max_len)
    return loss, policy_metrics(was_clipped_BT, ratio_BT, logp_BT, old_logp_BT, mask_BT)


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
