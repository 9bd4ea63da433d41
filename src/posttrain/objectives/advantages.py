"""Advantage estimators: pure tensor functions, importable with torch alone.

Shapes: ``_P`` prompts, ``_G`` samples per prompt (a group), ``_B`` sequences (B = P*G, groups
contiguous), ``_T`` tokens. Outcome-reward methods (GRPO, RLOO) give one advantage per sequence;
REINFORCE++ and GAE give one per token.

A group whose rewards are all equal carries no signal: every estimator here gives it exactly 0
(not a float-rounding residue divided by eps), and none produces NaN.

Statistics over the whole batch (``whiten``, ``grpo(scale="batch")``, ``reinforce_pp``) take an
optional ``all_sum``: a function that sums a tensor over the parts of a batch held by several
processes (``posttrain.runtime.distributed.all_sum``), so each process computes the whole batch's
statistics from its own part. Without it the batch is the tensor given.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import torch

AllSum = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _summer(all_sum: AllSum) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda t: t) if all_sum is None else all_sum

GRPO_SCALES = ("group", "batch", "none")


def _check_PG(rewards_PG: torch.Tensor, name: str) -> None:
    if rewards_PG.dim() != 2:
        raise ValueError(f"{name}: expected rewards of shape [P, G], got {tuple(rewards_PG.shape)}")


def _constant_group_P1(rewards_PG: torch.Tensor) -> torch.Tensor:
    """True for groups whose rewards are all exactly equal: their advantage is exactly 0."""
    return (rewards_PG == rewards_PG[:, :1]).all(dim=-1, keepdim=True)


def grpo(rewards_PG: torch.Tensor, scale: str = "group", eps: float = 1e-8, all_sum: AllSum = None) -> torch.Tensor:
    """Group-relative advantages, ``adv_PG``.

    ``A = (r - mean_G(r)) / (std + eps)`` with std the unbiased (torch.std) std of the group for
    ``scale="group"`` (GRPO, Shao et al. 2024, sec. 4.1.2), of the whole batch for ``"batch"``
    (as REINFORCE++ / Hu et al. 2025 suggest), and no division for ``"none"`` (Dr. GRPO, Liu et
    al. 2025: the std division up-weights near-constant groups). verl `compute_grpo_outcome_advantage`.
    """
    _check_PG(rewards_PG, "grpo")
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo: unknown scale {scale!r}; choose one of {GRPO_SCALES}")
    rewards_PG = rewards_PG.float() if not rewards_PG.is_floating_point() else rewards_PG
    centered_PG = rewards_PG - rewards_PG.mean(dim=-1, keepdim=True)
    centered_PG = torch.where(_constant_group_P1(rewards_PG), torch.zeros_like(centered_PG), centered_PG)
    if scale == "none":
        return centered_PG
    if scale == "group":
        G = rewards_PG.shape[-1]
        std_P1 = rewards_PG.std(dim=-1, keepdim=True) if G > 1 else torch.zeros_like(rewards_PG[:, :1])
    else:
        std_P1 = _std(rewards_PG.reshape(-1), all_sum)
    return centered_PG / (std_P1 + eps)


def _std(x_N: torch.Tensor, all_sum: AllSum) -> torch.Tensor:
    """Unbiased std of ``x_N`` (of every process's ``x_N`` with ``all_sum``); 0 for fewer than 2."""
    total = _summer(all_sum)
    n = total(torch.tensor(float(x_N.numel()), dtype=x_N.dtype, device=x_N.device))
    mean = total(x_N.sum()) / n.clamp(min=1)
    var = total(((x_N - mean) ** 2).sum()) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def dr_grpo(rewards_PG: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO advantages: ``grpo(rewards_PG, scale="none")``, the group mean subtracted, no std."""
    return grpo(rewards_PG, scale="none")


def rloo(rewards_PG: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each reward minus the mean
    of the other G-1 rewards of its group, ``r_i - (sum(r) - r_i) / (G - 1)``.  Needs G >= 2."""
    _check_PG(rewards_PG, "rloo")
    G = rewards_PG.shape[-1]
    if G < 2:
        raise ValueError("rloo: needs at least 2 samples per group (G >= 2)")
    rewards_PG = rewards_PG.float() if not rewards_PG.is_floating_point() else rewards_PG
    others_mean_PG = (rewards_PG.sum(dim=-1, keepdim=True) - rewards_PG) / (G - 1)
    adv_PG = rewards_PG - others_mean_PG
    return torch.where(_constant_group_P1(rewards_PG), torch.zeros_like(adv_PG), adv_PG)


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
    all_sum: AllSum = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the valid entries of `mask` (all when None); the
    variance is unbiased (n - 1). With ``shift_mean=False`` the mean is added back (only the scale
    changes). Masked entries come out 0; fewer than 2 valid entries leave the scale unchanged.
    verl `masked_whiten`; TRL `masked_whiten`.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"whiten: x {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    total = _summer(all_sum)
    valid = mask != 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xm = torch.where(valid, x, zero)
    n = total(valid.sum())
    mean = total(xm.sum()) / n.clamp(min=1)
    centered = torch.where(valid, x - mean, zero)
    var = total((centered * centered).sum()) / (n - 1).clamp(min=1)
    inv_std = torch.where(n > 1, torch.rsqrt(var + eps), torch.ones_like(var))  # n < 2: scale 1
    out = centered * inv_std
    if not shift_mean:
        out = torch.where(valid, out + mean, zero)
    return out


def token_rewards(rewards_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """``r_BT``: ``-kl_coef * kl_t`` on every valid token, plus the sequence reward on the last valid
    token (Ziegler et al. 2019; Ouyang et al. 2022); 0 on masked tokens and on sequences without a
    valid token. REINFORCE++ and PPO's GAE start from it."""
    B, T = mask_BT.shape
    valid_BT = mask_BT != 0
    dtype = kl_BT.dtype if kl_BT.is_floating_point() else torch.float32
    zero = torch.zeros((), dtype=dtype, device=kl_BT.device)
    r_BT = torch.where(valid_BT, -kl_coef * kl_BT.to(dtype), zero)
    has_B = valid_BT.any(dim=-1)
    positions_BT = torch.arange(T, device=mask_BT.device).expand(B, T)
    last_B = torch.where(valid_BT, positions_BT, -1).max(dim=-1).values.clamp(min=0)
    r_BT = r_BT.clone()
    r_BT[has_B, last_B[has_B]] += rewards_B.to(dtype)[has_B]
    return r_BT


def reinforce_pp(
    rewards_B: torch.Tensor,
    kl_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    group_size: int | None = None,
    all_sum: AllSum = None,
) -> torch.Tensor:
    """REINFORCE++ advantages ``adv_BT`` (Hu et al. 2025; OpenRLHF; verl
    `compute_reinforce_plus_plus_outcome_advantage`).

    1. If `group_size` is given ("REINFORCE++-baseline"), subtract each group's mean reward.
    2. Per-token reward ``-kl_coef * kl_t`` on valid tokens, plus the sequence reward on the last
       valid token.
    3. Returns-to-go ``G_t = r_t + gamma * G_{t+1}`` over valid tokens (masked tokens are skipped:
       they are not actions, so they neither add reward nor count as a discount step).
    4. Whiten over all valid tokens of the batch.
    """
    B, T = mask_BT.shape
    if rewards_B.shape != (B,) or kl_BT.shape != (B, T):
        raise ValueError(
            f"reinforce_pp: rewards {tuple(rewards_B.shape)}, kl {tuple(kl_BT.shape)} and mask {(B, T)} disagree"
        )
    valid_BT = mask_BT != 0
    dtype = kl_BT.dtype if kl_BT.is_floating_point() else torch.float32
    rewards_B = rewards_B.to(dtype)
    if group_size is not None:
        if group_size < 1 or B % group_size:
            raise ValueError(f"reinforce_pp: batch {B} is not a whole number of groups of {group_size}")
        r_PG = rewards_B.view(-1, group_size)
        rewards_B = (r_PG - r_PG.mean(dim=-1, keepdim=True)).view(B)
    zero = torch.zeros((), dtype=dtype, device=kl_BT.device)
    token_rewards_BT = token_rewards(rewards_B, kl_BT, mask_BT, kl_coef)

    returns_BT = torch.zeros_like(token_rewards_BT)
    running_B = torch.zeros(B, dtype=dtype, device=kl_BT.device)
    for t in range(T - 1, -1, -1):
        running_B = torch.where(valid_BT[:, t], token_rewards_BT[:, t] + gamma * running_B, running_B)
        returns_BT[:, t] = running_B
    returns_BT = torch.where(valid_BT, returns_BT, zero)
    return whiten(returns_BT, valid_BT, all_sum=all_sum)


def gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), returns ``(adv_BT, returns_BT)``.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next`` where
    "next" is the next valid token (masked tokens are skipped) and both are 0 after the last valid
    token (no bootstrap past the end). ``returns = A + V``. Masked positions are 0 in both outputs.
    Not whitened: call `whiten` if wanted. verl `compute_gae_advantage_return`.
    """
    if not (rewards_BT.shape == values_BT.shape == mask_BT.shape):
        raise ValueError("gae: rewards, values and mask must share one [B, T] shape")
    B, T = mask_BT.shape
    valid_BT = mask_BT != 0
    values_BT = values_BT.detach()
    zero = torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)
    rewards_BT = torch.where(valid_BT, rewards_BT.to(values_BT.dtype), zero)
    adv_BT = torch.zeros_like(values_BT)
    next_value_B = torch.zeros(B, dtype=values_BT.dtype, device=values_BT.device)
    next_adv_B = torch.zeros_like(next_value_B)
    for t in range(T - 1, -1, -1):
        v_B = values_BT[:, t]
        delta_B = rewards_BT[:, t] + gamma * next_value_B - v_B
        a_B = delta_B + gamma * lam * next_adv_B
        m_B = valid_BT[:, t]
        next_adv_B = torch.where(m_B, a_B, next_adv_B)
        next_value_B = torch.where(m_B, v_B, next_value_B)
        adv_BT[:, t] = torch.where(m_B, a_B, zero)
    returns_BT = torch.where(valid_BT, adv_BT + values_BT, zero)
    return adv_BT, returns_BT


# ------------------------------------------------------------------------------ the trainers' table


@dataclasses.dataclass
class AdvantageInputs:
    """What an estimator may read: the batch's rewards ``[P, G]`` (an unjudged one already filled
    with its group's mean), the completion mask, the per-token KL to the reference when the
    estimator puts it in the reward (k1 of the sampled tokens, else None), its coefficient, GRPO's
    std scaling, and the sum over processes for batch-wide statistics."""

    rewards_PG: torch.Tensor
    mask_BT: torch.Tensor
    kl_BT: Optional[torch.Tensor] = None
    kl_coef: float = 0.0
    scale: str = "group"
    all_sum: AllSum = None


def _grpo(x: AdvantageInputs) -> torch.Tensor:
    return grpo(x.rewards_PG, scale=x.scale, all_sum=x.all_sum).reshape(-1)


def _dr_grpo(x: AdvantageInputs) -> torch.Tensor:
    return dr_grpo(x.rewards_PG).reshape(-1)


def _rloo(x: AdvantageInputs) -> torch.Tensor:
    return rloo(x.rewards_PG).reshape(-1)


def _reinforce_pp(x: AdvantageInputs) -> torch.Tensor:
    kl_BT = x.kl_BT if x.kl_BT is not None else torch.zeros_like(x.mask_BT, dtype=torch.float32)
    return reinforce_pp(x.rewards_PG.reshape(-1), kl_BT, x.mask_BT, kl_coef=x.kl_coef,
                        group_size=x.rewards_PG.shape[1], all_sum=x.all_sum)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An advantage estimator as a trainer uses it: ``compute(AdvantageInputs)`` gives ``adv_B``
    (one per sequence) or ``adv_BT`` (one per token), and where the KL to the reference goes:
    ``"loss"`` (beta * k3 added to the policy loss, GRPO) or ``"reward"`` (-beta * k1 of the sampled
    tokens in the per-token reward, REINFORCE++; the trainer then needs the log-probs of the
    policy that sampled them, before any update)."""

    compute: Callable[[AdvantageInputs], torch.Tensor]
    kl: Literal["loss", "reward"] = "loss"


ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(_grpo),                        # group-relative, scaled by the std (``scale``)
    "dr_grpo": Estimator(_dr_grpo),                  # group mean subtracted, no std (Dr. GRPO)
    "rloo": Estimator(_rloo),                        # leave-one-out baseline
    "reinforce_pp": Estimator(_reinforce_pp, kl="reward"),  # REINFORCE++-baseline, whitened per token
}
"""The group-baseline estimators by name (``--advantage``); a new one is a pure function above and
one entry here. PPO's GAE needs a critic and is PPO's own."""

