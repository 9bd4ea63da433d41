"""Peak memory of a training run, per method x model size x LoRA, from a stated formula.

The doctrine's "Memory Efficiency" table (GRPO section) gives, for an 8B model: PPO (policy + value)
~48 GB, GRPO (policy only) ~24 GB, GRPO + LoRA ~16 GB. ``estimate`` computes such numbers for any
model, method and setting, and shows the parts, so a user can see *why* a run fits or not.

The formula (bytes; N = parameters of a model, n = trainable parameters, b_x = bytes per element):

    static   = sum over the models on the device of N * b_weights           (policy, value, reference, reward)
             + n * (b_grad [0 with a fused step] + b_optimizer + 4 [fp32 master copy, if kept])
    train    = activations + one head-chunk of logits + the gradient of the largest parameter
               activations = tokens * layers * a   (no checkpointing: every layer's saved tensors)
                           = tokens * layers * h * b + tokens * a   (checkpointing: layer inputs + one layer)
               a = (7h + q + 3kv + 4f) * b  per token per layer (Llama-style decoder, SDPA/flash attention:
                   norm inputs/outputs, q/k/v, rotated q/k, attention output, 4 MLP tensors)
               logits = 3 * min(completion tokens, 512) * V * 4  (posttrain.objectives.logprobs: chunked head, fp32)
    step     = the whole gradient buffer + one temporary of the largest parameter (AdamW's denominator)
    generate = KV cache: 2 * layers * kv * b * gen_batch * (prompt + completion tokens)
    peak     = static + max(train, step, generate)

Gradients and activations are not counted together: in backward each layer's activations are freed
as its gradients appear, so the train transient is the activations plus the first (largest)
gradient, or the gradient buffer at the optimizer step, whichever is larger. The per-token-layer
count ``a`` is within a few percent of the bytes autograd saves in Llama layers (counted with
``saved_tensors_hooks``: 690 MB measured vs 696 MB predicted for SmolLM2-135M on 512 tokens);
``tests/integration/test_memory_real.py`` compares the whole estimate with the measured peak of real
steps on CPU (full fine-tuning: 1.73 GB estimated vs 1.85 GB measured; LoRA: 0.88 vs 0.76).

Methods: ``grpo`` (also rloo, reinforce_pp, rlaif: one trained policy, generation), ``ppo`` (policy
+ value model of the same backbone, + frozen reward model, generation), ``dpo`` (chosen + rejected
per pair, no generation), ``rm`` (reward model training). With LoRA the reference is the base with
the adapter disabled (no copy); with full fine-tuning it is a frozen copy.

Default assumptions, ``device="gpu"`` (the doctrine's table; each is a field of `Assumptions`):
  bf16 weights, gradients and activations; full fine-tuning with the optimizer step fused into
  backward (no full gradient buffer; torchtune's ``optimizer_in_bwd``) and an 8-bit single-state
  optimizer (1 byte/param, bitsandbytes ``Lion8bit``); no fp32 master copy; gradient checkpointing;
  micro-batches of 2 sequences of 512 prompt + 512 completion tokens; generation one group (8
  sequences) at a time from the policy's own weights; frozen models (reference, reward model) served
  on another device, as the doctrine's table counts policy and value only (OpenRLHF/verl placement).
  LoRA adapters are float32 (peft's default). Under these, the 8B table comes out at PPO 50.1,
  GRPO 26.8, GRPO+LoRA 17.8 GB (``doctrine_table()``). Standard mixed-precision AdamW (fp32 states
  and master weights) needs 16 bytes/param: ~130 GB for 8B full fine-tuning (``--optimizer adamw
  --master-weights --no-fused-step``).

``device="cpu"`` assumes what posttrain's trainers do on CPU: float32 everywhere, torch AdamW (two
float32 states), a full gradient buffer, no checkpointing, frozen models in the same process.
GB means 1e9 bytes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

# measuring a real step (CPU peak RSS growth) lives in posttrain.doctrine.measure; re-exported here
from posttrain.doctrine.measure import _measure_worker, _reset_peak, _rss_bytes, measure  # noqa: F401
from posttrain.errors import UserError


class EstimateError(UserError, ValueError):
    """A model, method or setting the estimate cannot use: a size or model spec whose config cannot
    be read, an unknown method, device, dtype or optimizer, full fine-tuning of quantized weights."""

GB = 1e9
DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
               "int8": 1.0, "nf4": 0.5, "int4": 0.5}
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw-bf16": 4.0, "adamw8bit": 2.0, "lion": 4.0, "lion8bit": 1.0,
                   "sgd": 0.0, "adafactor": 0.0}
"""Optimizer state per trainable parameter (adafactor's factored statistics are ~0 per parameter)."""
METHODS = ("grpo", "ppo", "dpo", "rm", "rloo", "reinforce_pp", "rlaif")
LOGIT_CHUNK = 512  # posttrain.objectives.logprobs.DEFAULT_CHUNK_SIZE


# -- model shapes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    n_params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def head_params(self) -> int:
        """Parameters of the output head that a value model does not have (0 when tied)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def largest_param(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.ffn)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*$", re.I)
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(text: Any) -> float | None:
    """'8B' -> 8e9, '135M' -> 1.35e8, '7e9' -> 7e9; None when ``text`` is not a size."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _SIZE.match(str(text))
    if not m:
        return None
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    return value if value >= 1e5 else None


def parse_memory(text: Any) -> float:
    """'24GB', '24', '24 GiB', '80G', '512MB' -> gigabytes (1e9 bytes)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tb|t)?\s*", str(text), re.I)
    if not m:
        raise EstimateError(f"not a memory size: {text!r} (use e.g. 24GB, 80GiB, 512MB)")
    unit = (m.group(2) or "gb").lower()
    factor = {"gib": 2**30 / GB, "gb": 1, "g": 1, "mib": 2**20 / GB, "mb": 1e-3, "m": 1e-3, "tb": 1e3, "t": 1e3}[unit]
    return float(m.group(1)) * factor


def _params_of(h: int, layers: int, q: int, kv: int, f: int, vocab: int, tied: bool) -> int:
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    return vocab * h * (1 if tied else 2) + layers * per_layer + h


def shape_from_size(n_params: float) -> ModelShape:
    """A Llama-3-shaped model of about ``n_params`` parameters: head_dim 128, 8 KV heads, FFN 3.5h,
    vocabulary 128,256, one layer per 128 hidden units (8B -> h 4096, 32 layers; 70B -> h 8192, 64)."""
    vocab, tied = 128_256, n_params < 5e9

    def build(h: float) -> ModelShape:
        hh = max(128, int(round(h / 128)) * 128)
        layers = max(2, hh // 128)
        kv_heads = min(8, hh // 128)
        f = int(round(3.5 * hh / 256)) * 256
        n = _params_of(hh, layers, hh, kv_heads * 128, f, vocab, tied)
        return ModelShape(n, hh, layers, hh // 128, kv_heads, 128, f, vocab, tied, f"size {n_params / 1e9:g}B")

    lo, hi = 128.0, 65536.0
    for _ in range(60):  # bisection on a continuous hidden size, then rounded to 128
        mid = (lo + hi) / 2
        layers = mid / 128
        n = vocab * mid * (1 if tied else 2) + layers * (2 * mid * mid + 2 * mid * 1024 + 10.5 * mid * mid)
        lo, hi = (mid, hi) if n < n_params else (lo, mid)
    shape = build(lo)
    return dataclasses.replace(shape, n_params=int(n_params))  # the size asked for, not the rounding


def shape_from_config(cfg: dict[str, Any], source: str = "config") -> ModelShape:
    """Shape of a decoder-only transformer from its HF ``config.json`` fields (text config)."""
    cfg = cfg.get("text_config") or cfg
    missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise EstimateError(f"{source}: field '{missing[0]}': missing or not an integer (not the config of a "
                            "decoder-only transformer?); give a size such as 8B instead")
    h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg.get("num_attention_heads") or h // 64)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    f = int(cfg.get("intermediate_size") or 4 * h)
    vocab = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    n = _params_of(h, layers, heads * head_dim, kv_heads * head_dim, f, vocab, tied)
    return ModelShape(n, h, layers, heads, kv_heads, head_dim, f, vocab, tied, source)


def _read_config(path: Path) -> dict[str, Any]:
    """A ``config.json``; one that is not a JSON object is an ``EstimateError`` naming the file and line."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EstimateError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise EstimateError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(cfg, dict):
        raise EstimateError(f"{path}: expected a JSON object of model config fields")
    return cfg


def _config_of(spec: str) -> tuple[dict[str, Any], str]:
    """A model's config without loading its weights."""
    from posttrain import models

    if spec == models.EMBEDDED:
        path = models.embedded_cache_dir() / "config.json"
        if path.is_file():
            return _read_config(path), f"{spec} (config.json)"
        gguf = models.embedded_gguf_path()
        return _gguf_config(gguf), f"{spec} (GGUF header)"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EstimateError(f"{path}: no such GGUF file")
        return _gguf_config(path), f"{path} (GGUF header)"
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _config_of(models._adapter_base(path))
    if path.is_dir() and (path / "config.json").is_file():
        return _read_config(path / "config.json"), str(path / "config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True).to_dict(), f"{spec} (HF cache)"
    except (OSError, ValueError) as e:  # not in the cache, or not a valid hub id
        raise EstimateError(f"{spec!r}: not a size like 8B, nor a model whose config is on this machine") from e


def _gguf_config(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


def model_shape(model: Any) -> ModelShape:
    """A `ModelShape` from a size ('8B', 8e9), a model spec (read from its config, no weights), or
    a loaded model (its config; parameters counted)."""
    if isinstance(model, ModelShape):
        return model
    size = parse_size(model) if not hasattr(model, "config") else None
    if size is not None:
        return shape_from_size(size)
    if hasattr(model, "config"):
        base = getattr(model, "get_base_model", lambda: model)()
        shape = shape_from_config(base.config.to_dict(), type(base).__name__)
        return dataclasses.replace(shape, n_params=sum(p.numel() for p in base.parameters()))
    cfg, source = _config_of(str(model))
    return shape_from_config(cfg, source)


def lora_params(shape: ModelShape, rank: int) -> int:
    """Adapter parameters for LoRA on every linear layer but the head (peft ``all-linear``)."""
    h, q, kv, f = shape.hidden, shape.q_dim, shape.kv_dim, shape.ffn
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h)
    return rank * per_layer * shape.layers


def default_lora_rank(method: str, n_params: float) -> int:
    """The doctrine's LoRA rank: RL methods use the "LoRA for RL" table (8B -> 8, 70B -> 32);
    DPO its "Key Parameters" table (32); SFT and reward models the SFT rank (8B -> 64, 70B -> 256)."""
    from posttrain.models import rl_lora_rank, sft_lora_rank

    if method == "dpo":
        return 32
    if method in ("rm", "sft"):
        return sft_lora_rank(n_params)
    return rl_lora_rank(n_params)


# -- assumptions ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Assumptions:
    dtype: str = "bf16"
    """Weights, gradients and activations of the models on the device (int8/nf4: quantized frozen base)."""
    optimizer: str = "lion8bit"
    """Optimizer state per trainable parameter: one of OPTIMIZER_BYTES."""
    fused_step: bool = True
    """Optimizer step inside backward: only one parameter's gradient exists at a time."""
    master_weights: bool = False
    """Keep a float32 master copy of half-precision trainable weights (mixed precision)."""
    grad_checkpointing: bool = True
    """Store only each layer's input; recompute the layer in backward."""
    frozen_on_device: bool = False
    """Reference and reward models on the same device (False: another device serves them)."""
    micro_batch: int = 2
    """Sequences per forward/backward (DPO: pairs, each two sequences)."""
    prompt_len: int = 512
    completion_len: int = 512
    gen_batch: int = 8
    """Sequences generated at once (one group of K = 8)."""
    adapter_dtype: str = "fp32"
    """LoRA adapter weights and gradients (peft keeps them in float32)."""

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len

    def describe(self) -> str:
        ckpt = "gradient checkpointing" if self.grad_checkpointing else "no checkpointing"
        step = "optimizer step fused into backward" if self.fused_step else "full gradient buffer"
        frozen = ("frozen models on this device" if self.frozen_on_device
                  else "frozen models (reference, reward) on another device")
        return (f"{self.dtype} weights/activations, {self.optimizer} optimizer ({OPTIMIZER_BYTES[self.optimizer]:g} B/param)"
                f"{', fp32 master weights' if self.master_weights else ''}, {step}, {ckpt}, micro-batch "
                f"{self.micro_batch} x ({self.prompt_len} + {self.completion_len}) tokens, generation batch "
                f"{self.gen_batch}, {frozen}")


GPU = Assumptions()
CPU = Assumptions(dtype="fp32", optimizer="adamw", fused_step=False, grad_checkpointing=False,
                  frozen_on_device=True, micro_batch=4, prompt_len=64, completion_len=64, gen_batch=8)
PROFILES = {"gpu": GPU, "cpu": CPU}


# -- the estimate -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Estimate:
    model: str
    method: str
    lora_rank: int
    """0 = full fine-tuning."""
    shape: ModelShape
    assumptions: Assumptions
    parts: dict[str, float]
    """Bytes on the device at the peak, by component."""
    elsewhere: dict[str, float]
    """Bytes of models assumed on another device (not in the total)."""
    phase: str
    """Which transient sets the peak: 'train' or 'generate'."""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "lora_rank": self.lora_rank, "total_gb": self.total_gb,
                "phase": self.phase, "n_params": self.shape.n_params,
                "parts_gb": {k: v / GB for k, v in self.parts.items()},
                "elsewhere_gb": {k: v / GB for k, v in self.elsewhere.items()},
                "assumptions": dataclasses.asdict(self.assumptions), "shape": dataclasses.asdict(self.shape)}


def activation_bytes(shape: ModelShape, tokens: int, a: Assumptions, scored: int = 0) -> float:
    """Saved activations of ``tokens`` tokens through the trunk, + head logits for ``scored`` tokens
    (the completion tokens; the head runs on at most one chunk of them at a time)."""
    b = DTYPE_BYTES[a.dtype] if DTYPE_BYTES[a.dtype] >= 2 else 2.0  # quantized bases compute in bf16
    h, q, kv, f = shape.hidden, shape.q_dim, shape.kv_dim, shape.ffn
    per_token_layer = (7 * h + q + 3 * kv + 4 * f) * b
    if a.grad_checkpointing:
        act = tokens * shape.layers * h * b + tokens * per_token_layer
    else:
        act = tokens * shape.layers * per_token_layer
    act += tokens * h * b  # final hidden states
    if scored:
        act += 3 * min(scored, LOGIT_CHUNK) * shape.vocab * 4
    return act


def estimate(model: Any = "8B", method: str = "grpo", lora_rank: int | None = 0, device: str = "gpu",
             beta: float = 0.04, **overrides: Any) -> Estimate:
    """Peak memory of one training run (see the module docstring for the formula).

    ``model``: a size ('8B'), a spec, or a `ModelShape`. ``lora_rank``: 0 or None = full fine-tuning,
    "auto" = the doctrine's rank. ``device``: 'gpu' (the doctrine's assumptions) or 'cpu' (posttrain's
    trainers on CPU). ``beta``: 0 means no reference model (GRPO/DPO without a KL term).
    ``overrides``: any `Assumptions` field (dtype, optimizer, micro_batch, prompt_len, ...)."""
    if method not in METHODS:
        raise EstimateError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if device not in PROFILES:
        raise EstimateError(f"device must be one of {', '.join(PROFILES)}")
    a = dataclasses.replace(PROFILES[device], **{k: v for k, v in overrides.items() if v is not None})
    if a.dtype not in DTYPE_BYTES or a.optimizer not in OPTIMIZER_BYTES:
        raise EstimateError(f"dtype must be one of {sorted(DTYPE_BYTES)}, optimizer one of {sorted(OPTIMIZER_BYTES)}")
    shape = model_shape(model)
    kind = {"rloo": "grpo", "reinforce_pp": "grpo", "rlaif": "grpo"}.get(method, method)
    rank = default_lora_rank(kind, shape.n_params) if lora_rank == "auto" else int(lora_rank or 0)
    if rank == 0 and DTYPE_BYTES[a.dtype] < 2:
        raise EstimateError(f"{a.dtype} weights cannot be fully fine-tuned: use LoRA (QLoRA)")

    bw, opt = DTYPE_BYTES[a.dtype], OPTIMIZER_BYTES[a.optimizer]
    parts: dict[str, float] = {}
    elsewhere: dict[str, float] = {}
    value_n = shape.n_params - shape.head_params + shape.hidden
    trained = {"policy": shape.n_params} if kind != "rm" else {"reward model": value_n}
    if kind == "ppo":
        trained["value model"] = value_n

    grad_all, grad_first = 0.0, 0.0
    emb = shape.vocab * shape.hidden * (1 if shape.tied else 2)  # quantized bases keep these in bf16
    for name, n in trained.items():
        parts[f"{name} weights"] = n * bw if bw >= 2 else (n - emb) * bw + emb * 2
        if rank:
            n_train, bt = lora_params(shape, rank), DTYPE_BYTES[a.adapter_dtype]
            parts[f"{name} LoRA adapter (r={rank})"] = n_train * (bt + opt)
            grad_all += n_train * bt
            grad_first = max(grad_first, n_train / shape.layers * bt)
        else:
            n_train, bt = n, bw
            parts[f"{name} optimizer ({a.optimizer})"] = n * opt
            if a.master_weights and bw < 4:
                parts[f"{name} fp32 master weights"] = n * 4.0
            grad_all += 0.0 if a.fused_step else n * bt
            grad_first = max(grad_first, shape.largest_param * bt)

    frozen: dict[str, float] = {}
    if not rank and beta > 0 and kind in ("grpo", "ppo", "dpo"):
        frozen["reference model"] = shape.n_params * bw
    if kind == "ppo":
        frozen["reward model (frozen)"] = value_n * bw
    for name, size in frozen.items():
        (parts if a.frozen_on_device else elsewhere)[name] = size

    seqs = a.micro_batch * (2 if kind in ("dpo", "rm") else 1)
    tokens = seqs * a.seq_len
    scored = 0 if kind == "rm" else seqs * a.completion_len
    train = activation_bytes(shape, tokens, a, scored) + grad_first
    if kind == "ppo":
        train += activation_bytes(shape, tokens, a)
    grad_buffer = grad_all + grad_first if grad_all else 0.0
    generate = 0.0
    if kind in ("grpo", "ppo"):
        generate = 2 * shape.layers * shape.kv_dim * max(bw, 2.0) * a.gen_batch * a.seq_len
        generate += a.gen_batch * shape.vocab * 4 * 2
    transient = max(train, grad_buffer, generate)
    phase = "generate" if transient == generate and generate > train else "train"
    if phase == "generate":
        parts["KV cache (generation)"] = generate
    else:
        parts["activations + logits chunk"] = train - grad_first
        if grad_buffer > train:
            parts["gradients + optimizer-step temporary"] = grad_buffer
            parts["activations + logits chunk"] = 0.0
        else:
            parts["gradient in flight"] = grad_first
    parts = {k: v for k, v in parts.items() if v > 0}
    return Estimate(str(model), method, rank, shape, a, parts, elsewhere, phase)


DOCTRINE_TABLE_8B = {"PPO (policy + value)": 48.0, "GRPO (policy only)": 24.0, "GRPO + LoRA": 16.0}


def doctrine_table(model: Any = "8B") -> dict[str, float]:
    """The doctrine's three rows, estimated with the default (GPU) assumptions, in GB."""
    return {
        "PPO (policy + value)": estimate(model, "ppo", 0).total_gb,
        "GRPO (policy only)": estimate(model, "grpo", 0).total_gb,
        "GRPO + LoRA": estimate(model, "grpo", "auto").total_gb,
    }


if __name__ == "__main__":  # the measurement worker (`measure` runs it as posttrain.doctrine.measure)
    import sys

    print(json.dumps(_measure_worker(*json.loads(sys.argv[1]))))
