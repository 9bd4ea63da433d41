"""Finds a causal LM's trunk, output head and logit transform: ``split_model(model)`` returns
``(trunk, head, transform)`` with
``model(x).logits == transform(head(trunk(x).last_hidden_state))``, or a string saying why the
model cannot be split that way (a final bias, PEFT prompt learning, a sharded wrapper, no separable
head, a logit transform this table does not know).

The transform is data, not code: a `LogitTransform`, a tuple of elementwise steps (``scale``:
z * a; ``softcap``: c * tanh(z / c)) in the order the model's forward applies them, read from the
config by the `FAMILIES` table (model_type -> the config fields it applies, in order), or None when
the model applies none (the common case: then nothing is added anywhere). The same field name means
different things in different families (Granite divides by ``logits_scaling``, HyperCLOVAX multiplies
by it), so the table is keyed by the config's ``model_type``, each entry read from that
family's ``modeling_*.py`` in transformers; a transform field set on a family the table does not list
is refused, never guessed. The sampling temperature is one more step (``then_scale(1 / T)``), applied
after the model's own (the sampler divides the model's returned logits by T).

Used by the chunked log-probs (``posttrain.objectives.logprobs``), the trainers that call the trunk
and heads directly, and FSDP (``posttrain.runtime.distributed.fsdp``), which shards the trunk's
decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

# ------------------------------------------------------------------------------ elementwise steps


def scale(z: torch.Tensor, a: float) -> torch.Tensor:
    """z * a (Cohere's logit_scale, Granite's 1 / logits_scaling, the temperature's 1 / T)."""
    return z * a


def scale_slope(z: torch.Tensor, a: float) -> tuple[torch.Tensor, float]:
    """(z * a, d/dz = a), in place on `z`."""
    return z.mul_(a), a


def softcap(z: torch.Tensor, c: float) -> torch.Tensor:
    """c * tanh(z / c) (Gemma-2/3's final_logit_softcapping), as the model's forward computes it."""
    return torch.tanh(z / c) * c


def softcap_slope(z: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c * tanh(z / c), d/dz = 1 - tanh(z / c)^2), in place on `z` (one extra buffer for the slope)."""
    t = z.div_(c).tanh_()
    slope = torch.mul(t, t).neg_().add_(1.0)
    return t.mul_(c), slope


class Step(NamedTuple):
    apply: Callable  # (z, value) -> transformed z, out of place (autograd-friendly)
    slope: Callable  # (z, value) -> (transformed z, its derivative): in place, for the custom backward
    linear: bool  # a multiplication: it commutes with a bias-free linear head


STEPS = {"scale": Step(scale, scale_slope, True), "softcap": Step(softcap, softcap_slope, False)}


@dataclass(frozen=True)
class LogitTransform:
    """Elementwise steps ``((kind, value), ...)`` applied to the head's logits, first to last."""

    steps: tuple[tuple[str, float], ...]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        for kind, value in self.steps:
            z = STEPS[kind].apply(z, value)
        return z

    def value_and_slope(self, z: torch.Tensor):
        """(transform(z), d transform / dz elementwise: a tensor, or a float for pure scales).
        Overwrites `z`."""
        slope = 1.0
        for kind, value in self.steps:
            z, s = STEPS[kind].slope(z, value)
            slope = s * slope  # chain rule: each step's slope is taken at its own input
        return z, slope

    @property
    def factor(self) -> float | None:
        """The single multiplier when every step is a scale (then transform(W h) = W (factor h) for a
        bias-free head), else None."""
        out = 1.0
        for kind, value in self.steps:
            if not STEPS[kind].linear:
                return None
            out *= value
        return out

    def then_scale(self, a: float) -> LogitTransform:
        return LogitTransform(self.steps + (("scale", float(a)),))


def then_scale(transform: LogitTransform | None, a: float) -> LogitTransform | None:
    """`transform` followed by z * a (None stays None when a == 1)."""
    if a == 1.0:
        return transform
    return (transform or LogitTransform(())).then_scale(a)


# ---------------------------------------------------------------------- what each family applies

# What a field means in a family -> (the step, how the field's value becomes the step's parameter).
_FIELDS = {
    "softcap": ("softcap", float),
    "times": ("scale", float),
    "divide": ("scale", lambda v: 1.0 / float(v)),
}

_SOFTCAP = (("final_logit_softcapping", "softcap"),)
_GRANITE = (("logits_scaling", "divide"),)
_COHERE = (("logit_scale", "times"),)

FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    # final_logit_softcapping: logits = c * tanh(logits / c) after lm_head (when set)
    # (Gemma3ForConditionalGeneration, model_type "gemma3", applies none: not listed, so refused if set)
    "gemma2": _SOFTCAP, "gemma3_text": _SOFTCAP, "gemma3n_text": _SOFTCAP, "gemma3n": _SOFTCAP,
    "gemma4_text": _SOFTCAP, "gemma4": _SOFTCAP, "vaultgemma": _SOFTCAP, "nanochat": _SOFTCAP,
    "mistral_large4": _SOFTCAP,
    # logits = lm_head(h) / logits_scaling
    "granite": _GRANITE, "granitemoe": _GRANITE, "granitemoehybrid": _GRANITE, "granitemoeshared": _GRANITE,
    "granite_swa": _GRANITE, "granitemoe_swa": _GRANITE,
    "minicpm3": _GRANITE,  # divides the hidden state before a bias-free lm_head: the same logits
    # logits = lm_head(h) * scale
    "cohere": _COHERE, "cohere2": _COHERE, "cohere2_moe": _COHERE,
    "hyperclovax": (("logits_scaling", "times"),),  # MuP: multiplies (Granite divides)
    "falcon_h1": (("lm_head_multiplier", "times"),),
}
"""The model's config.model_type -> the fields (read on its text config) that its forward applies
to lm_head's output, in order."""

# Every config field known to transform the logits somewhere, with its neutral value: set to
# anything else on a family whose FAMILIES entry does not apply it, the model is refused.
TRANSFORM_FIELDS = {
    "final_logit_softcapping": None,
    "logit_softcapping": None,
    "logits_scaling": 1.0,
    "logit_scale": 1.0,
    "lm_head_multiplier": 1.0,
    "output_multiplier": 1.0,
    "unpadded_vocab_size": None,
}


def logit_transform(config) -> LogitTransform | None | str:
    """The transform `config`'s model applies to ``lm_head(h)``: a `LogitTransform`, None (none), or
    a string saying why it cannot be told."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = getattr(config, "model_type", None)
    steps: list[tuple[str, float]] = []
    applied = set()
    for field, meaning in FAMILIES.get(family, ()):
        value = getattr(text, field, None)
        applied.add(field)
        if value is None:  # e.g. Gemma-3's final_logit_softcapping=None: the forward skips it
            continue
        kind, param = _FIELDS[meaning]
        steps.append((kind, param(value)))
    for cfg in {id(c): c for c in (config, text) if c is not None}.values():
        for field, neutral in TRANSFORM_FIELDS.items():
            value = getattr(cfg, field, None)
            if field not in applied and value is not None and value != neutral:
                return f"{family or type(cfg).__name__} transforms its logits in a way posttrain does not know ({field}={value})"
    steps = [(k, v) for k, v in steps if not (k == "scale" and v == 1.0)]
    return LogitTransform(tuple(steps)) if steps else None


# ------------------------------------------------------------------------------------------ split


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


class Split(NamedTuple):
    trunk: nn.Module
    head: nn.Module
    transform: LogitTransform | None  # None: the model's logits are head(hidden) as they are


def split_model(model) -> Split | str:
    """``(trunk, head, transform)`` such that
    ``model(x).logits == transform(head(trunk(x).last_hidden_state))`` (transform None: the
    identity), or a string saying why this model cannot be split that way. (A
    DistributedDataParallel wrapper is handled by ``logprobs.completion_logprobs`` itself: pass
    ``model.module`` here.)"""
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
    transform = logit_transform(config) if config is not None else None
    if isinstance(transform, str):
        return f"{type(inner).__name__}: {transform}"
    if getattr(inner, "final_logits_bias", None) is not None:
        return f"{type(inner).__name__} adds final_logits_bias to its logits"
    return Split(trunk, head, transform)
