"""KTO, Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, eq. 8), on unpaired examples.

Each example is a completion ``y`` of a prompt ``x`` labelled desirable or undesirable, with the
implicit reward ``r = log pi(y|x) - log pi_ref(y|x)`` (summed log-probs) and the reference point
``z0 = max(0, KL estimate)``:

    desirable:   w_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: w_U * (1 - sigmoid(beta * (z0 - r)))

The loss is the mean over the batch's examples (TRL's ``KTOTrainer``: ``losses.nanmean()`` over
desirable and undesirable concatenated). As in the paper and TRL, ``z0`` is estimated from
mismatched pairs, each prompt with another example's completion ``y'``:
``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``, detached (no gradient flows through it).
Paper / TRL ``KTOConfig`` defaults: beta 0.1, desirable and undesirable weights 1.0 (the paper
advises ``w_D * n_D / (w_U * n_U)`` in [1, 4/3] when the classes are unbalanced).
"""

from __future__ import annotations

import torch


def kto_loss(policy_logps_B: torch.Tensor, ref_logps_B: torch.Tensor, policy_kl_logps_K: torch.Tensor,
             ref_kl_logps_K: torch.Tensor, desirable_B: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KTO over a batch of examples ([B] summed log-probs, ``desirable_B`` bool) and the mismatched
    pairs of the KL estimate ([K]). Metrics (detached): ``kto/kl`` (z0), ``rewards/chosen`` and
    ``rewards/rejected`` (mean beta*r over the desirable and the undesirable examples; 0 when there
    are none), ``rewards/accuracy`` (share of examples on their side of the reference point:
    r > z0 for desirable, r < z0 for undesirable), ``desirable_frac``."""
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("kto_loss: the desirable and undesirable weights must be >= 0")
    z0 = (policy_kl_logps_K - ref_kl_logps_K.detach()).mean().clamp(min=0).detach()
    r_B = policy_logps_B - ref_logps_B.detach()
    d_B = desirable_B.to(torch.bool)
    one = r_B.new_ones(())  # the policy's dtype (python scalars in torch.where would give float32 weights)
    sign_B = torch.where(d_B, one, -one)
    weight_B = torch.where(d_B, one * desirable_weight, one * undesirable_weight)
    losses_B = weight_B * (1.0 - torch.sigmoid(beta * sign_B * (r_B - z0)))
    with torch.no_grad():
        rd = r_B.detach()
        n_d, n_u = int(d_B.sum()), int((~d_B).sum())
        zero = rd.new_zeros(())
        metrics = {
            "kto/kl": z0,  # not "kl": the doctor reads that as a policy-reference KL per token
            "rewards/chosen": beta * rd[d_B].mean() if n_d else zero,
            "rewards/rejected": beta * rd[~d_B].mean() if n_u else zero,
            "rewards/accuracy": (sign_B * (rd - z0) > 0).to(rd.dtype).mean(),
            "desirable_frac": d_B.to(rd.dtype).mean(),
            "logps/completion": policy_logps_B.detach().mean(),
        }
    return losses_B.mean(), metrics
