"""Finds a causal LM's trunk and output head: ``split_model(model)`` returns ``(trunk, head)`` with
``model(x).logits == head(trunk(x).last_hidden_state)``, or a string saying why the model cannot
be split that way (logit soft-capping or scaling, a final bias, PEFT prompt learning, a sharded
wrapper, no separable head).

Used by the chunked log-probs (``posttrain.objectives.logprobs``), the trainers that call the trunk
and heads directly, and FSDP (``posttrain.runtime.distributed.fsdp``), which shards the trunk's
decoder layers.
"""

from __future__ import annotations

import torch.nn as nn

# Config fields that put something between head(hidden) and the logits a model returns
# (checked on the text config; a value equal to the neutral element is fine).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: logits = c * tanh(logits / c)
    "logit_softcapping": None,
    "logits_scaling": 1.0,  # Granite: logits / s
    "logit_scale": 1.0,  # Cohere: logits * s
    "output_multiplier": 1.0,
    "unpadded_vocab_size": None,
}


def _unwrap_peft(model):
    """(the transformers model inside a PEFT wrapper, or `model`; a reason to refuse, or None)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and hasattr(model, "get_base_model"):
        active = getattr(model, "active_adapter", None)
        names = [active] if isinstance(active, str) else list(active or [])
        for name in names:
            cfg = peft_config.get(name)
            if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                return model, "PEFT prompt learning adds virtual tokens in PeftModel.forward"
            if cfg is not None and getattr(cfg, "alora_invocation_tokens", None):
                return model, "activated LoRA needs offsets computed in PeftModel.forward"
        return model.get_base_model(), None
    return model, None


_SHARDED_WRAPPERS = ("FullyShardedDataParallel", "DeepSpeedEngine")


def split_model(model) -> tuple[nn.Module, nn.Module] | str:
    """``(trunk, head)`` such that ``model(x).logits == head(trunk(x).last_hidden_state)``, or a
    string saying why this model cannot be split that way. (A DistributedDataParallel wrapper is
    handled by ``logprobs.completion_logprobs`` itself: pass ``model.module`` here.)"""
    name = type(model).__name__
    if name in _SHARDED_WRAPPERS or name.startswith("FSDP"):
        return f"{name} shards the parameters outside its forward; the head cannot be applied by chunks"
    inner, reason = _unwrap_peft(model)
    if reason:
        return reason
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return f"{type(inner).__name__} exposes no output head (get_output_embeddings() is None)"
    trunk = None
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        try:
            trunk = get_decoder()
        except Exception:  # noqa: BLE001 - transformers raises for models without a rule
            trunk = None
    if not isinstance(trunk, nn.Module) or trunk is inner or trunk is head:
        trunk = getattr(inner, "base_model", None)
    if not isinstance(trunk, nn.Module) or trunk is inner or trunk is head:
        return f"cannot find the trunk of {type(inner).__name__} (get_decoder() / base_model)"
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(c): c for c in (config, text_config) if c is not None}.values():
        for field, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, field, None)
            if value is not None and value != neutral:
                return f"{type(inner).__name__} transforms its logits ({field}={value})"
    if getattr(inner, "final_logits_bias", None) is not None:
        return f"{type(inner).__name__} adds final_logits_bias to its logits"
    return trunk, head
