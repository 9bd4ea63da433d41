"""Per-token KL estimators between the policy and a reference (Schulman, "Approximating KL
Divergence", 2020; used as `kl_penalty` in verl `core_algos.py` and as `beta * per_token_kl` in
TRL's GRPO).

With tokens sampled from the policy and ``d = ref_logp - logp`` (log of r = pi_ref / pi):

- ``k1`` = -d                  unbiased, high variance, can be negative
- ``k2`` = d**2 / 2            biased, low variance, always >= 0
- ``k3`` = exp(d) - d - 1      unbiased, low variance, always >= 0 (the GRPO paper's choice)

The estimators are returned per token, unreduced: pair them with `losses.reduce`.
"""

from __future__ import annotations

import torch

from posttrain.objectives.losses.reduce import reduce as _reduce

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (see module doc)."""
    d_BT = ref_logp_BT - logp_BT
    if kind == "k1":
        return -d_BT
    if kind == "k2":
        return 0.5 * d_BT * d_BT
    if kind == "k3":
        # expm1(d) - d == exp(d) - 1 - d, without the cancellation of exp(d) - 1 near d = 0.
        return torch.expm1(d_BT) - d_BT
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; choose one of {KL_KINDS}")


def kl_penalty(
    logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    beta: float,
    kind: str = "k3",
    reduce: str = "token-mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL term added to a policy loss: ``beta * reduce(kl_estimate(logp, ref_logp, kind))``.

    GRPO (Shao et al. 2024, eq. 3) puts ``beta * k3`` in the loss rather than in the reward.
    Metric ``kl`` is the token-mean of the estimate over valid tokens, whatever `reduce` is.
    """
    kl_BT = kl_estimate(logp_BT, ref_logp_BT, kind)
    loss = beta * _reduce(kl_BT, mask_BT, reduce, max_len)
    kl_mean = _reduce(kl_BT.detach(), mask_BT, "token-mean")
    return loss, {"kl": kl_mean}
