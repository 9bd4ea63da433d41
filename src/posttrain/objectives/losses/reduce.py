"""How a per-token loss becomes one number: `reduce(x_BT, mask_BT, mode)`.

Kept apart from the losses themselves so every loss can be aggregated any of the three ways
(verl `core_algos.agg_loss`; Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training").

- ``token-mean``:              sum(x*m) / sum(m)                    (every valid token weighs the same)
- ``seq-mean-token-mean``:     mean over sequences of sum_t(x*m)/sum_t(m)   (GRPO paper; each sequence weighs the same)
- ``seq-mean-token-sum-norm``: sum(x*m) / (B * max_len)             (Dr. GRPO: a constant normaliser, no length bias)

A sequence with no valid token contributes nothing: it adds 0 to every numerator, is left out of
the sequence count of ``seq-mean-token-mean``, and never produces NaN. An all-masked batch reduces
to 0 (still attached to the graph of ``x_BT``, so ``backward`` works and gives zero gradients).
"""

from __future__ import annotations

import torch

REDUCE_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def reduce(
    x_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    mode: str = "token-mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token quantity `x_BT` over the valid tokens of `mask_BT` to a 0-d tensor.

    `mask_BT` may be bool or float (0/1, or weights). `max_len` is only used by
    ``seq-mean-token-sum-norm`` and defaults to T (``x_BT.shape[-1]``).
    """
    if x_BT.shape != mask_BT.shape:
        raise ValueError(f"reduce: x {tuple(x_BT.shape)} and mask {tuple(mask_BT.shape)} differ in shape")
    if x_BT.dim() != 2:
        raise ValueError(f"reduce: expected [B, T] tensors, got {x_BT.dim()} dims")
    m_BT = mask_BT.to(x_BT.dtype)
    # where() rather than x*m: a NaN/inf in a masked slot (e.g. exp of padding) must not leak in.
    xm_BT = torch.where(m_BT != 0, x_BT * m_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))
    if mode == "token-mean":
        return xm_BT.sum() / m_BT.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        count_B = m_BT.sum(-1)
        seq_B = xm_BT.sum(-1) / count_B.clamp(min=1.0)
        has_B = (count_B > 0).to(x_BT.dtype)
        return (seq_B * has_B).sum() / has_B.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum-norm":
        B, T = x_BT.shape
        denom = B * (T if max_len is None else max_len)
        if denom <= 0:
            raise ValueError(f"reduce: B * max_len must be positive, got B={B}, max_len={max_len}")
        return xm_BT.sum() / denom
    raise ValueError(f"reduce: unknown mode {mode!r}; choose one of {REDUCE_MODES}")


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean of `x_BT` over valid tokens (0 when none): the ``token-mean`` reduction, for metrics."""
    return reduce(x_BT, mask_BT, "token-mean")


def reduction_counts(mask_BT: torch.Tensor) -> torch.Tensor:
    """``[valid tokens, sequences with a valid token, sequences]`` of a batch: the normalisers of
    the three modes. Summed over the parts of a batch (micro-batches, or processes), they are the
    whole batch's."""
    m = mask_BT != 0
    return torch.tensor([float(m.sum()), float(m.any(-1).sum()), float(mask_BT.shape[0])], dtype=torch.float64)


def reduction_share(mode: str, mask_part_BT: torch.Tensor, whole_counts: torch.Tensor) -> float:
    """Weight of a part's ``reduce(x, mask_part, mode)`` in the whole batch's: the part's count over
    the whole's (``reduction_counts``). Summing ``share * reduce(part)`` over the parts gives
    ``reduce(whole)`` exactly, which makes gradient accumulation and data parallelism equal one
    big batch."""
    if mode not in REDUCE_MODES:
        raise ValueError(f"reduce: unknown mode {mode!r}; choose one of {REDUCE_MODES}")
    i = REDUCE_MODES.index(mode)
    return float(reduction_counts(mask_part_BT)[i]) / max(1.0, float(whole_counts[i]))
