"""Reference-free preference losses on length-normalised sequence log-probs (the mean log-prob of
a completion's tokens, ``a = sum log pi(y_t | x, y_<t) / |y|``): no reference model, no reference
log-probs.

- ``simpo`` (Meng, Xia & Chen 2024, "SimPO", eq. 6): ``-logsigmoid(beta * (a_c - a_r) - gamma)``:
  the implicit reward is ``beta * a`` and gamma is a target reward margin. With label smoothing
  ``e`` (TRL's CPOTrainer ``loss_type="simpo"``): ``-(1 - e) * logsigmoid(z) - e * logsigmoid(-z)``.
  Paper defaults (their Table 7 ranges): beta 2.0, gamma / beta 0.5, i.e. gamma 1.0. TRL's CPOConfig
  writes gamma as ``simpo_gamma`` (its default 0.5 with beta 0.1) and adds a chosen NLL term scaled by
  ``cpo_alpha`` (default 1.0: set it to 0 for the paper's SimPO); here SimPO has no NLL term.
- ``orpo`` (Hong, Lee & Thorne 2024, "ORPO", eqs. 6-7): ``L_SFT + lambda * L_OR`` with
  ``L_SFT = -a_c`` (the chosen completion's mean token NLL) and
  ``L_OR = -logsigmoid(log odds(y_c) - log odds(y_r))``, ``log odds(y) = a - log(1 - exp(a))``
  (computed as ``a - log1p(-exp(a))``). lambda 0.1 as the paper and TRL's ORPOConfig (which calls it
  ``beta``). Departure from TRL: TRL's NLL is the token mean over the whole batch's chosen tokens;
  here, as in the paper's eq. 6, it is the mean over pairs of each chosen completion's token mean
  (the two agree when the chosen completions have equal lengths).

Both return ``(loss, metrics)``; the loss is the mean over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reward_metrics(chosen_B: torch.Tensor, rejected_B: torch.Tensor, a_c: torch.Tensor, a_r: torch.Tensor) -> dict:
    return {
        "rewards/chosen": chosen_B.mean(),
        "rewards/rejected": rejected_B.mean(),
        "rewards/margin": (chosen_B - rejected_B).mean(),
        "rewards/accuracy": (chosen_B > rejected_B).to(chosen_B.dtype).mean(),
        "logps/chosen": a_c.mean(),
        "logps/rejected": a_r.mean(),
    }


def simpo_loss(chosen_avg_logps_B: torch.Tensor, rejected_avg_logps_B: torch.Tensor, beta: float = 2.0,
               gamma: float = 1.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO over a batch of pairs of length-normalised log-probs ([B] each). Metrics (detached):
    ``rewards/chosen`` = mean beta*a_c, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``
    (share of pairs whose chosen reward is strictly larger), ``logps/chosen``, ``logps/rejected``
    (the mean log-probs per token)."""
    if beta <= 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    e = float(label_smoothing)
    if not 0.0 <= e < 0.5:
        raise ValueError(f"simpo_loss: label_smoothing must be in [0, 0.5), got {e}")
    z_B = beta * (chosen_avg_logps_B - rejected_avg_logps_B) - gamma
    losses_B = -(1.0 - e) * F.logsigmoid(z_B) - e * F.logsigmoid(-z_B)
    with torch.no_grad():
        a_c, a_r = chosen_avg_logps_B.detach(), rejected_avg_logps_B.detach()
        metrics = _reward_metrics(beta * a_c, beta * a_r, a_c, a_r)
    return losses_B.mean(), metrics


def log_odds(avg_logps_B: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = exp(a)``, for a mean log-prob ``a < 0``."""
    return avg_logps_B - torch.log1p(-torch.exp(avg_logps_B))


def orpo_loss(chosen_avg_logps_B: torch.Tensor, rejected_avg_logps_B: torch.Tensor,
              lam: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO over a batch of pairs of length-normalised log-probs ([B] each, < 0). Metrics (detached):
    ``nll`` (mean chosen token NLL), ``or_loss``, ``log_odds_ratio`` (mean log odds(y_c) - log odds(y_r)),
    ``rewards/*`` with the log odds as the reward (accuracy: share of pairs whose chosen log odds are
    strictly larger, the same as a larger mean log-prob), ``logps/chosen``, ``logps/rejected``."""
    if lam < 0:
        raise ValueError(f"orpo_loss: lambda must be >= 0, got {lam}")
    odds_c_B, odds_r_B = log_odds(chosen_avg_logps_B), log_odds(rejected_avg_logps_B)
    ratio_B = odds_c_B - odds_r_B
    nll = -chosen_avg_logps_B.mean()
    or_loss = -F.logsigmoid(ratio_B).mean()
    loss = nll + lam * or_loss
    with torch.no_grad():
        metrics = {"nll": nll.detach(), "or_loss": or_loss.detach(), "log_odds_ratio": ratio_B.detach().mean(),
                   **_reward_metrics(odds_c_B.detach(), odds_r_B.detach(), chosen_avg_logps_B.detach(),
                                     rejected_avg_logps_B.detach())}
    return loss, metrics
