"""Clipped value-function loss for PPO's critic (PPO2 baselines; verl `compute_value_loss`;
TRL `PPOTrainer`):

    loss_t = 0.5 * max((v - R)**2, (old + clamp(v - old, -clip, clip) - R)**2)

token-mean over valid tokens. ``clip=None`` disables clipping (plain 0.5 * MSE).
"""

from __future__ import annotations

import torch

from posttrain.objectives.losses.reduce import reduce as _reduce


def value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss; returns ``(loss, metrics)``.

    `old_values_BT` (values at rollout time) and `returns_BT` are constants. Metrics:
    ``value_clip_frac`` fraction of valid tokens where the clipped error was strictly larger,
    ``value/mean`` mean predicted value.
    """
    if not (values_BT.shape == old_values_BT.shape == returns_BT.shape == mask_BT.shape):
        raise ValueError("value_loss: values, old_values, returns and mask must share one [B, T] shape")
    old_values_BT = old_values_BT.detach()
    returns_BT = returns_BT.detach()
    unclipped_BT = (values_BT - returns_BT) ** 2
    if clip is None:
        loss_BT = unclipped_BT
        clipped_more_BT = torch.zeros_like(values_BT, dtype=torch.bool)
    else:
        v_clipped_BT = old_values_BT + torch.clamp(values_BT - old_values_BT, -clip, clip)
        clipped_BT = (v_clipped_BT - returns_BT) ** 2
        loss_BT = torch.maximum(unclipped_BT, clipped_BT)
        clipped_more_BT = clipped_BT > unclipped_BT
    loss = 0.5 * _reduce(loss_BT, mask_BT, "token-mean")
    with torch.no_grad():
        metrics = {
            "value_clip_frac": _reduce(clipped_more_BT.to(values_BT.dtype), mask_BT),
            "value/mean": _reduce(values_BT, mask_BT),
        }
    return loss, metrics
