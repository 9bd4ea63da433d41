"""Rollout-mismatch measurement and correction: the sampler's probabilities are not the trainer's.

posttrain samples from a bfloat16 copy of the policy (`sampling/rollout_model.py`) and trains in
float32, so the token the sampler drew with probability ``mu(y_t)`` has probability
``pi(y_t)`` under the trainer at the start of the update, and the update is (slightly) off-policy.
Per valid token, with ``train_logp`` the trainer's log-prob of the sampled token ("old" log-prob,
before any optimizer step) and ``sample_logp`` the sampler's (`Rollouts.sample_logp_BC`):

    r_t = pi(y_t) / mu(y_t) = exp(train_logp_t - sample_logp_t)

`rollout_correction(train_logp_BT, sample_logp_BT, mask_BT, kind)` returns
``(weight_BT, keep_BT, metrics)``: the policy loss multiplies its per-token terms by the detached
``weight_BT`` and reduces over ``keep_BT`` instead of ``mask_BT``. The kinds (`ROLLOUT_CORRECTIONS`):

- ``none``        w = 1, keep = mask. The metrics are still measured (the mismatch must be visible).
- ``tis``         token-level truncated importance sampling, w_t = min(r_t, C)
                  (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
                  training"; TRL ``vllm_importance_sampling_mode="token_truncate"``, verl
                  ``rollout_is="token"``). Default C = 2 (`TIS_CAP`: the paper's C and verl's
                  ``rollout_is_threshold``; TRL's cap was 2 with token TIS alone, 3 since its four modes).
- ``seq_tis``     sequence-level truncated IS, w_b = min(prod_t r_t, C) on every token of sequence b,
                  the product taken in log space (TRL ``sequence_truncate``, verl ``rollout_is="sequence"``).
- ``token_mask``  tokens whose r_t leaves [low, high] are dropped from the loss, w = 1 on the rest
                  (IcePop's band, Ling team 2025; verl ``rollout_rs="token"``; TRL ``token_mask``
                  drops the same tokens).
- ``seq_mask``    whole sequences dropped when their length-normalised ratio, the geometric mean
                  exp(mean_t log r_t), leaves [low, high]; w = 1 on the rest (masked importance
                  sampling, MIS, from "When Speed Kills Stability", 2025, which verl cites; the
                  ratio is verl's ``rollout_rs="geometric"``). Default band [0.5, 2] (`MASK_BAND`): symmetric in log
                  space, verl's default lower bound 1/upper with its threshold 2.

Departures, stated: ``token_mask`` keeps weight 1 on the kept tokens (verl's rejection sampling
alone); IcePop and TRL's ``token_mask`` also multiply the kept tokens by r_t (masking on top of
importance weighting), which posttrain does not offer as one kind. ``seq_mask`` uses the
geometric mean (verl) rather than TRL's ``sequence_mask`` product, which drops long completions
for their length rather than for their mismatch. A masked slot's weight is 1 (verl zeroes it):
``keep_BT`` already removes it, and ``none`` then returns exactly ones.

Numerics: log-ratios are formed only at valid tokens (``where``: padding may hold inf or NaN in
either input), and every log-ratio (token or summed over a sequence) is clamped to
[-20, 20] before ``exp`` (`LOG_RATIO_BOUND`, verl's ``SAFETY_BOUND``: exp(20) ~ 4.9e8). Band tests
are done on the log-ratio against log(low), log(high) (inclusive bounds, as verl).

Metrics, always the same four keys whatever the kind (0-d detached tensors):

- ``mismatch/kl``          token-mean over valid tokens of k3 = r - 1 - log r, an estimate of
                           KL(sampler || trainer) from the sampler's own tokens. It is
                           `losses.kl.kl_estimate(sample_logp, train_logp, "k3")` (the sampled-from
                           distribution first, as for the policy and reference there) and verl's
                           ``rollout_corr/k3_kl``.
- ``mismatch/ratio_max``   max r over valid tokens (1.0 when there is none; at most exp(20)).
- ``mismatch/masked_frac`` share of valid tokens removed by keep (0 for non-masking kinds).
- ``mismatch/weight_mean`` token-mean of the weight over kept tokens (1.0 when nothing is kept).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from posttrain.objectives.losses.kl import kl_estimate

TIS_CAP = 2.0
"""Default truncation C of ``tis`` / ``seq_tis`` (Yao et al. 2025; verl ``rollout_is_threshold``)."""
MASK_BAND = (0.5, 2.0)
"""Default band [low, high] of ``token_mask`` / ``seq_mask`` (IcePop-style masking; verl's 1/2 .. 2)."""
LOG_RATIO_BOUND = 20.0
"""|log r| is clamped to this before exp (verl ``SAFETY_BOUND``), for token and sequence ratios."""


def _clamped(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def _seq_log_ratio_B(log_ratio_BT: torch.Tensor, valid_BT: torch.Tensor, mean: bool) -> torch.Tensor:
    """Sum (or mean) over each sequence's valid tokens of the log-ratio; 0 for an empty sequence."""
    zero = torch.zeros((), dtype=log_ratio_BT.dtype, device=log_ratio_BT.device)
    total_B = torch.where(valid_BT, log_ratio_BT, zero).sum(-1)
    if not mean:
        return total_B
    return total_B / valid_BT.sum(-1).clamp(min=1).to(log_ratio_BT.dtype)


def _in_band(log_x: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    low, high = band
    return (log_x >= math.log(low)) & (log_x <= math.log(high))


# Each compute: (log_ratio_BT [0 at invalid slots, unclamped], valid_BT bool, cap, band)
#               -> (weight_BT, keep_BT bool: what the kind keeps among all slots).
def _none(log_ratio_BT, valid_BT, cap, band):
    return torch.ones_like(log_ratio_BT), torch.ones_like(valid_BT)


def _tis(log_ratio_BT, valid_BT, cap, band):
    # min(exp(x), C) == exp(min(x, log C)): no overflow whatever x is.
    w_BT = torch.exp(_clamped(log_ratio_BT).clamp(max=math.log(cap)))
    return w_BT, torch.ones_like(valid_BT)


def _seq_tis(log_ratio_BT, valid_BT, cap, band):
    log_w_B = _clamped(_seq_log_ratio_B(log_ratio_BT, valid_BT, mean=False)).clamp(max=math.log(cap))
    return torch.exp(log_w_B).unsqueeze(-1).expand_as(log_ratio_BT), torch.ones_like(valid_BT)


def _token_mask(log_ratio_BT, valid_BT, cap, band):
    return torch.ones_like(log_ratio_BT), _in_band(log_ratio_BT, band)


def _seq_mask(log_ratio_BT, valid_BT, cap, band):
    keep_B = _in_band(_seq_log_ratio_B(log_ratio_BT, valid_BT, mean=True), band)
    return torch.ones_like(log_ratio_BT), keep_B.unsqueeze(-1).expand_as(valid_BT)


@dataclasses.dataclass(frozen=True)
class Correction:
    """One entry of ROLLOUT_CORRECTIONS."""

    compute: Callable
    """(log_ratio_BT, valid_BT, cap, band) -> (weight_BT, keep_BT): see the module doc."""
    masks: bool
    """True when it removes tokens/sequences from the loss (changes the mask)."""
    help: str
    """One line for the CLI/README."""


ROLLOUT_CORRECTIONS: dict[str, Correction] = {
    "none": Correction(_none, False, "no correction; the mismatch metrics are still logged"),
    "tis": Correction(_tis, False, "token-level truncated importance sampling, weight min(r, cap) (Yao et al. 2025)"),
    "seq_tis": Correction(_seq_tis, False, "sequence-level truncated importance sampling, weight min(prod r, cap)"),
    "token_mask": Correction(_token_mask, True, "drop tokens whose ratio r leaves the band (IcePop)"),
    "seq_mask": Correction(_seq_mask, True, "drop sequences whose geometric-mean ratio leaves the band (MIS)"),
}
"""Rollout-mismatch corrections by name (``--rollout-correction``)."""

CORRECTION_LEVELS: dict[str, str | None] = {
    "none": None,
    "tis": "token",
    "seq_tis": "sequence",
    "token_mask": "token",
    "seq_mask": "sequence",
}
"""Whether a kind decides per token or per sequence (None: it decides nothing)."""


def check_correction_args(kind: str, cap: float, band: tuple[float, float]) -> None:
    """ValueError naming the argument when `kind`, `cap` or `band` is out of its domain."""
    if kind not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction: unknown kind {kind!r}; choose one of {tuple(ROLLOUT_CORRECTIONS)}")
    try:
        cap_ok = math.isfinite(float(cap)) and float(cap) > 0
    except (TypeError, ValueError):
        cap_ok = False
    if not cap_ok:
        raise ValueError(f"rollout_correction: cap must be a finite number > 0, got {cap!r}")
    try:
        low, high = (float(x) for x in band)
    except (TypeError, ValueError):
        raise ValueError(f"rollout_correction: band must be a pair (low, high), got {band!r}") from None
    if not (0 < low < 1 < high < math.inf):
        raise ValueError(f"rollout_correction: band must satisfy 0 < low < 1 < high, got {band!r}")


def rollout_correction(
    train_logp_BT: torch.Tensor,
    sample_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kind: str = "tis",
    cap: float = TIS_CAP,
    band: tuple[float, float] = MASK_BAND,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """r = exp(train_logp - sample_logp) per valid token (train_logp: the trainer's log-prob of the
    sampled token at the start of the update; both detached inside). Returns
    ``(weight_BT, keep_BT, metrics)``:

    - ``weight_BT``: detached float weights to multiply the per-token policy loss by (1 where no correction),
    - ``keep_BT``: float 0/1 mask of what stays in the loss (== mask_BT != 0 unless the kind masks),
    - ``metrics``: ``mismatch/kl``, ``mismatch/ratio_max``, ``mismatch/masked_frac``,
      ``mismatch/weight_mean`` (module doc), whatever the kind.

    Both tensors are in the wider float dtype of the two log-probs (at least float32).
    """
    check_correction_args(kind, cap, band)
    if train_logp_BT.shape != sample_logp_BT.shape or train_logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"rollout_correction: train_logp {tuple(train_logp_BT.shape)}, sample_logp "
            f"{tuple(sample_logp_BT.shape)} and mask {tuple(mask_BT.shape)} must have the same [B, T] shape"
        )
    if train_logp_BT.dim() != 2:
        raise ValueError(f"rollout_correction: expected [B, T] tensors, got {train_logp_BT.dim()} dims")
    dtype = torch.promote_types(torch.promote_types(train_logp_BT.dtype, sample_logp_BT.dtype), torch.float32)
    with torch.no_grad():
        valid_BT = mask_BT != 0
        train_BT = train_logp_BT.detach().to(dtype)
        sample_BT = sample_logp_BT.detach().to(dtype)
        zero = torch.zeros((), dtype=dtype, device=train_BT.device)
        # Padding may hold anything: the difference is only formed where the token is valid.
        log_ratio_BT = torch.where(valid_BT, train_BT - sample_BT, zero)
        weight_BT, kept_BT = ROLLOUT_CORRECTIONS[kind].compute(log_ratio_BT, valid_BT, cap, band)
        weight_BT = torch.where(valid_BT, weight_BT, torch.ones((), dtype=dtype, device=zero.device))
        keep_BT = valid_BT & kept_BT
        metrics = _metrics(log_ratio_BT, valid_BT, weight_BT, keep_BT)
    return weight_BT, keep_BT.to(dtype), metrics


def _metrics(log_ratio_BT, valid_BT, weight_BT, keep_BT) -> dict[str, torch.Tensor]:
    dtype = log_ratio_BT.dtype
    one = torch.ones((), dtype=dtype, device=log_ratio_BT.device)
    n_valid = valid_BT.sum().to(dtype)
    n_keep = keep_BT.sum().to(dtype)
    lr_BT = _clamped(log_ratio_BT)
    # k3(sampler || trainer) = r - 1 - log r: kl_estimate(logp=sample, ref=train) with d = log r.
    k3_BT = kl_estimate(torch.zeros_like(lr_BT), lr_BT, "k3")
    kl = torch.where(valid_BT, k3_BT, 0.0).sum() / n_valid.clamp(min=1.0)
    max_lr = torch.where(valid_BT, lr_BT, -math.inf).amax() if valid_BT.numel() else -math.inf
    ratio_max = torch.where(n_valid > 0, torch.exp(torch.as_tensor(max_lr, dtype=dtype)), one)
    masked_frac = torch.where(n_valid > 0, 1.0 - n_keep / n_valid.clamp(min=1.0), 0.0 * one)
    weight_mean = torch.where(
        n_keep > 0, torch.where(keep_BT, weight_BT, 0.0).sum() / n_keep.clamp(min=1.0), one
    )
    return {
        "mismatch/kl": kl,
        "mismatch/ratio_max": ratio_max,
        "mismatch/masked_frac": masked_frac,
        "mismatch/weight_mean": weight_mean,
    }
