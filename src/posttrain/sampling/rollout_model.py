"""The rollout model: a bfloat16 copy of the policy that does the sampling, synced before each
generation (the split verl and OpenRLHF make between the trainer's weights and the inference
engine's, here inside one process).

Why: sampling decodes one token at a time, so each step reads every weight for a handful of rows;
on a CPU (and on a GPU at small batch) that is bound by memory traffic, and bfloat16 halves it.
Measured on the 2-core AVX512-BF16 machine of DESIGN.md: the decode linears of SmolLM2-135M at
16 rows run 2.6x faster in bfloat16 than in float32.

What stays float32: training (forward, backward, optimizer), the old/reference log-probs used in
the loss (always recomputed by the trainer in float32: `sample_logp_BC` from generation is not
used in any loss), and greedy evaluation. So the only effect of the copy is that completions are
drawn from a bfloat16 rounding of the policy, as they are with a vLLM rollout in verl/OpenRLHF.

Sync: LoRA adapters are merged into the copy (W + scale * B @ A, computed in float32, then
rounded once); with full fine-tuning every trainable weight is copied. Frozen weights are copied
once. An FSDP-sharded policy (``distributed.shard_layers``) is gathered for each sync, so the
copy always holds the full weights. `auto` picks bfloat16 where it is fast (CUDA with bf16 support, or a CPU with AVX512-BF16 or
AMX) and otherwise samples from the policy itself (no copy, no extra memory).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from posttrain.runtime import distributed
from posttrain.sampling import lean_decode

RolloutDtype = Literal["auto", "bfloat16", "float32"]
_PEFT_PREFIX = "base_model.model."
ATTENTION = {True: "sdpa", False: "eager"}
"""Attention of the copy, by whether `lean_decode` takes its decode steps. With the lean step, the
copy's forward only pre-fills, and ``sdpa`` computes attention as the lean step does (torch's fused
kernel) and a little faster (g=8 sampling 2.80 s -> 2.75 s). Without it, every step goes through
transformers' forward, where in bfloat16 on CPU ``sdpa`` with a padding mask was slower than the
plain matmul path (eager; its softmax in float32): 16 x 64 tokens sampled in 3.9 s vs 5.8 s."""


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(choice: RolloutDtype, device: torch.device) -> torch.dtype:
    """The dtype sampling runs in for ``choice`` on ``device``."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def _lora_modules(policy) -> dict[str, torch.nn.Module]:
    """{name in the plain model: peft LoRA layer} for every LoRA-wrapped module of ``policy``."""
    out = {}
    for name, module in policy.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            out[name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name] = module
    return out


def _plain_name(name: str) -> str:
    """A policy parameter's name in the plain (adapter-free) model."""
    name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def merged_weight(layer) -> torch.Tensor:
    """A LoRA layer's effective weight: the base weight plus every active, enabled adapter's delta."""
    w = layer.base_layer.weight
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return w
    for name in layer.active_adapters:
        if name in layer.lora_A:
            w = w + layer.get_delta_weight(name)
    return w


class RolloutModel:
    """Holds the sampling copy of ``policy`` (or the policy itself when ``dtype`` is float32).

    ``model`` is what to pass to ``generation.sample_groups``; call ``sync()`` after every
    optimizer step that should be visible to the next generation (``collect`` does it)."""

    def __init__(self, policy, dtype: torch.dtype):
        self.policy = policy
        self.dtype = dtype
        if dtype == torch.float32:
            self.model = policy
            return
        from transformers import AutoModelForCausalLM

        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        device = next(policy.parameters()).device
        lean = lean_decode.supports(base.config)
        self.model = AutoModelForCausalLM.from_config(base.config, dtype=dtype, attn_implementation=ATTENTION[lean]).to(device).eval()
        self.model.requires_grad_(False)
        self.model.generation_config = base.generation_config
        if lean:  # before the parameters are listed below: it replaces some
            self.model.lean_decoder = lean_decode.LeanDecoder(self.model, lean_decode.fuse_weights(self.model))
        self._lora = _lora_modules(policy)
        lora_weights = {f"{n}.weight" for n in self._lora}
        own = dict(self.model.named_parameters())
        self._dynamic: list[tuple[torch.Tensor, str]] = []
        with torch.no_grad(), distributed.gathered(policy):  # FSDP: full weights to copy from
            for name, p in policy.named_parameters():
                if ".lora_" in name:
                    continue
                target = _plain_name(name)
                if target in lora_weights or target not in own:
                    continue  # merged below / a tied weight already copied under its other name
                own[target].copy_(p)
                if p.requires_grad:
                    self._dynamic.append((own[target], name))
        self._lora_targets = [(own[f"{n}.weight"], layer) for n, layer in self._lora.items()]
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights (merged adapters, trainable weights) into the copy.
        An FSDP-sharded policy is gathered for it (every rank must call)."""
        if self.model is self.policy:
            return
        with distributed.gathered(self.policy):
            params = dict(self.policy.named_parameters()) if self._dynamic else {}
            for target, layer in self._lora_targets:
                target.copy_(merged_weight(layer))
            for target, name in self._dynamic:
                target.copy_(params[name])


def rollout_model(policy, choice: RolloutDtype = "auto") -> RolloutModel:
    """The sampling model for ``policy`` under the ``rollout_dtype`` setting ``choice``."""
    device = next(policy.parameters()).device
    return RolloutModel(policy, resolve_dtype(choice, device))
