"""DPO and its variants, on per-sequence log-probs (TRL `DPOTrainer.dpo_loss`; tinker-cookbook
`compute_dpo_loss`; torchtune `rlhf/loss/dpo.py`).

With ``h = (pc - rc) - (pr - rr)`` (policy/reference, chosen/rejected sequence log-probs) and
``e = label_smoothing``:

- ``sigmoid`` (Rafailov et al. 2023; with e > 0 "conservative DPO", Mitchell 2023):
      -(1 - e) * logsigmoid(beta * h) - e * logsigmoid(-beta * h)
- ``ipo`` (Azar et al. 2023, eq. 17): (h - 1 / (2 * beta))**2.  The paper uses length-averaged
  log-probs; pass those in if you want the paper's IPO (TRL does).
- ``hinge`` (SLiC, Zhao et al. 2023): relu(1 - beta * h)
- ``robust`` (rDPO, Chowdhury et al. 2024, eq. 9; e = assumed label-flip rate < 0.5):
      (-(1 - e) * logsigmoid(beta * h) + e * logsigmoid(-beta * h)) / (1 - 2e)

The loss is the mean over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss over a batch of pairs (each argument a [B] tensor); returns ``(loss, metrics)``.

    Metrics (detached 0-d tensors): ``rewards/chosen`` = mean beta*(pc - rc), ``rewards/rejected``
    = mean beta*(pr - rr), ``rewards/margin`` = their mean difference, ``rewards/accuracy`` =
    fraction of pairs whose chosen reward is strictly larger, ``logps/chosen``, ``logps/rejected``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    e = float(label_smoothing)
    if loss_type in ("sigmoid", "robust"):
        if not 0.0 <= e < 0.5:
            raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {e}")
    elif e != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing applies to 'sigmoid' and 'robust' only, not {loss_type!r}")

    ref_chosen_logps = ref_chosen_logps.detach()
    ref_rejected_logps = ref_rejected_logps.detach()
    chosen_logratio_B = policy_chosen_logps - ref_chosen_logps
    rejected_logratio_B = policy_rejected_logps - ref_rejected_logps
    h_B = chosen_logratio_B - rejected_logratio_B

    if loss_type == "sigmoid":
        losses_B = -(1.0 - e) * F.logsigmoid(beta * h_B) - e * F.logsigmoid(-beta * h_B)
    elif loss_type == "ipo":
        losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses_B = torch.relu(1.0 - beta * h_B)
    else:  # robust
        losses_B = (-(1.0 - e) * F.logsigmoid(beta * h_B) + e * F.logsigmoid(-beta * h_B)) / (1.0 - 2.0 * e)
    loss = losses_B.mean()

    with torch.no_grad():
        chosen_rewards_B = beta * chosen_logratio_B
        rejected_rewards_B = beta * rejected_logratio_B
        metrics = {
            "rewards/chosen": chosen_rewards_B.mean(),
            "rewards/rejected": rejected_rewards_B.mean(),
            "rewards/margin": (chosen_rewards_B - rejected_rewards_B).mean(),
            "rewards/accuracy": (chosen_rewards_B > rejected_rewards_B).to(h_B.dtype).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
    return loss, metrics
