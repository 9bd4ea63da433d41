"""Linear layers for decoding: a few rows at a time, on a CPU, in float32.

Token-by-token decoding multiplies a few rows (one per sequence still being written) by every
weight of the model, so each step streams all the weights from memory. On CPU, MKL's float32 GEMM
for ``x @ W.T`` with few rows reads W far below the memory bandwidth; the same product computed
as ``(W @ x.T).T`` (W as the left operand, a thin right operand) is much faster. Measured on the
2-core AMD EPYC (AVX2) machine of README, 16 rows, the 210 linears of SmolLM2-135M's decoder
layers: 64 ms -> 41 ms per decode step; its [49152 x 576] output head: 22 ms -> 14 ms. From about
256 rows on the plain call is as fast or faster, so larger inputs (pre-fill, training) keep it.

`skinny_linears(model)` switches every plain ``nn.Linear`` of a float32 CPU model to that form for
the duration of a ``with`` block (sampling); outside it nothing changes. The two forms compute the
same sums in a different order, so results differ by float32 rounding only.

PEFT LoRA layers (plain LoRA on an ``nn.Linear``, adapters active and unmerged, no dropout in
effect) get the same form with the adapter folded in: ``W @ x.T + s * B @ (A @ x.T)`` in three
matmuls, without PEFT's per-call bookkeeping, which costs as much as the matmuls at 16 rows.
Anything else (DoRA and other variants, mixed-adapter batches, LoRA biases) takes PEFT's forward.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn

MAX_ROWS = 128
"""Inputs with more rows than this use the plain ``F.linear``: at 256 rows the two are even."""


def _few_rows(x: torch.Tensor) -> int:
    """The number of rows of `x` when the few-row form applies to it (float32, no grad, 1 to
    MAX_ROWS rows), else 0."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > MAX_ROWS or x.dtype != torch.float32 or torch.is_grad_enabled():
        return 0
    return rows


def _as_rows(y_OR: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W @ x.T`` ([out, rows]) back to the layout of ``linear(x)``, plus the bias."""
    y = y_OR.t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = _few_rows(x)
    if not rows:
        return nn.functional.linear(x, self.weight, self.bias)
    return _as_rows(torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()), x, self.bias)


def _is_lora_linear(m: nn.Module) -> bool:
    """PEFT's LoRA ``Linear`` itself (not a quantized or other subclass) on a plain ``nn.Linear``."""
    if type(m).__module__ != "peft.tuners.lora.layer" or type(m).__name__ != "Linear":
        return False
    return type(m.base_layer) is nn.Linear


def _plain_lora(self) -> list | None:
    """[(A, B, scale)] of the active adapters when the layer is plain LoRA, else None."""
    if self.disable_adapters or self.merged or getattr(self, "lora_variant", None) and any(
            a in self.lora_variant for a in self.active_adapters):
        return None
    out = []
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if A.bias is not None or B.bias is not None or (drop.training and getattr(drop, "p", 0) > 0) \
                or A.weight.dtype != torch.float32:
            return None
        out.append((A.weight, B.weight, self.scaling[name]))
    return out


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    rows = 0 if args or kwargs else _few_rows(x)
    adapters = _plain_lora(self) if rows else None
    if adapters is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    xt = x.reshape(rows, x.shape[-1]).t()
    y = torch.mm(base.weight, xt)
    for A, B, scale in adapters:
        y.addmm_(B, torch.mm(A, xt), alpha=scale)
    return _as_rows(y, x, base.bias)


def _eligible(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32


@contextlib.contextmanager
def skinny_linears(model: nn.Module):
    """Within the block, the plain ``nn.Linear`` and PEFT LoRA linear modules of `model` (float32,
    on CPU) compute few-row, no-grad inputs as ``(W @ x.T).T``. A no-op for other models."""
    if not _eligible(model):
        yield model
        return
    patched = []
    for m in model.modules():
        if "forward" in vars(m):
            continue
        if type(m) is nn.Linear:
            m.forward = types.MethodType(_forward, m)
        elif _is_lora_linear(m):
            m.forward = types.MethodType(_lora_forward, m)
        else:
            continue
        patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward
