"""The Bradley-Terry loss of a reward model (Bradley & Terry 1952; as used for RLHF reward models
by Stiennon et al. 2020 and Ouyang et al. 2022), with two additions from later work:

- a per-pair required margin (Llama 2, Touvron et al. 2023): ``-logsigmoid(r_c - r_r - margin)``;
- reward centering (Eisenstein et al. 2023): ``+ coef * mean((r_c + r_r)^2)``, which pins the
  scores near 0 without changing which response wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen_B: torch.Tensor, r_rejected_B: torch.Tensor, margin_B: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``; returns
    ``(loss, metrics)`` with ``bt_loss``, ``center_loss``, ``rewards/accuracy`` (r_c > r_r),
    ``rewards/margin`` (mean r_c - r_r), ``rewards/chosen`` and ``rewards/rejected``."""
    diff_B = r_chosen_B - r_rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B.to(diff_B.dtype)
    bt = -F.logsigmoid(diff_B).mean()
    center = ((r_chosen_B + r_rejected_B) ** 2).mean()
    loss = bt + center_coef * center if center_coef else bt
    with torch.no_grad():
        metrics = {
            "bt_loss": bt.detach(), "center_loss": center.detach(),
            "rewards/accuracy": (r_chosen_B > r_rejected_B).float().mean(),
            "rewards/margin": (r_chosen_B - r_rejected_B).mean(),
            "rewards/chosen": r_chosen_B.mean(), "rewards/rejected": r_rejected_B.mean(),
        }
    return loss, metrics
