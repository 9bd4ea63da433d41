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

The loss is the mean over pairs. Each loss type is one entry of ``DPO_LOSSES`` (per-pair loss of
``z = beta * h``, ``h`` and ``e``); the reference-free SimPO and ORPO are in ``ref_free.py`` and KTO
in ``kto.py``; the trainer's table of all of them (what each needs) is ``algorithms/dpo_losses.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sigmoid(z, h, beta, e):
    return -(1.0 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


def _ipo(z, h, beta, e):
    return (h - 1.0 / (2.0 * beta)) ** 2


def _hinge(z, h, beta, e):
    return torch.relu(1.0 - z)


def _robust(z, h, beta, e):
    return (-(1.0 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1.0 - 2.0 * e)


DPO_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge, "robust": _robust}
"""Per-pair loss of each DPO loss type: ``f(z = beta * h, h, beta, e) -> losses_B``."""
SMOOTHED = ("sigmoid", "robust")
"""The loss types that take ``label_smoothing``."""
DPO_LOSS_TYPES = tuple(DPO_LOSSES)


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
    if loss_type in SMOOTHED:
        if not 0.0 <= e < 0.5:
            raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {e}")
    elif e != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing applies to 'sigmoid' and 'robust' only, not {loss_type!r}")

    ref_chosen_logps = ref_chosen_logps.detach()
    ref_rejected_logps = ref_rejected_logps.detach()
    chosen_logratio_B = policy_chosen_logps - ref_chosen_logps
    rejected_logratio_B = policy_rejected_logps - ref_rejected_logps
    h_B = chosen_logratio_B - rejected_logratio_B

    losses_B = DPO_LOSSES[loss_type](beta * h_B, h_B, beta, e)
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
