"""One decoding step of a Llama-type sampling copy as plain tensor calls: the fast path of sampling.

A decode step feeds one token per row through every layer. Its matmuls are bound by reading the
weights (SmolLM2-135M in bfloat16 on the 2-core Xeon of DESIGN.md: ~20 ms for the 210 decoder
linears, near the memory bandwidth), but transformers' forward adds about as much again in
per-module work: module calls and their hooks, mask building, separate q/k/v and gate/up
matmuls, argument plumbing, about 40 small calls a layer. `LeanDecoder.step` computes the
same step from the layers' weights directly:
  * q, k and v in one matmul and gate and up in another: the copy's weights are laid out so that
    `q_proj`, `k_proj`, `v_proj` (and `gate_proj`, `up_proj`) are row blocks of one fused matrix,
    views that the rollout copy's sync writes through, so no weight is held twice;
  * the keys and values go to the same cache layers as transformers' forward (`cache.layers[i]
    .update`), so the pre-fill (still transformers' forward) and batch selection work unchanged;
  * query heads that share a key/value head are stacked as rows against the unexpanded keys;
  * the model's own RMSNorm and rotary modules;
  * attention through torch's fused kernel (`scaled_dot_product_attention`: scores, softmax and the
    weighted sum in float32, rounded to bfloat16 once), as transformers' ``sdpa`` attention computes
    it, which is why the copy runs ``sdpa`` (`rollout_model.ATTENTION`). The plain matmul path
    (eager) took 1.9-3.5x as long (8-32 rows, 40-160 cached tokens): on a CPU, a matmul over the
    cache's views (a buffer with room for more tokens) copies the keys and values into a packed
    tensor first, every layer, every step (16 rows x ~100 cached tokens: 198 us a layer against
    76 us; g=8 sampling 3.09 s -> 2.77 s).
Results equal transformers' ``sdpa`` step up to bfloat16 rounding (the fused matmuls group the same
sums differently); `tests/unit/test_lean_decode.py` checks the logits over several steps, padding
and dropped rows included.

It serves only the bfloat16 sampling copy (`rollout_model`), and only models whose decoder layer
is exactly that arithmetic (`supports`: model types in `LLAMA_LIKE`, SiLU MLP, no biases, no
attention soft-capping or sliding window); anything else decodes through transformers' forward.
"""

from __future__ import annotations

import torch

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen3"})
"""Model types whose decoder layer is pre-norm attention + SwiGLU MLP with RMSNorm (qwen3 adds a
per-head q/k norm, handled below)."""


def supports(config) -> bool:
    """True when `LeanDecoder` computes this model's decode step exactly as its own forward does."""
    return (getattr(config, "model_type", None) in LLAMA_LIKE and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
            and not getattr(config, "attn_logit_softcapping", None) and not getattr(config, "sliding_window", None)
            and getattr(config, "pretraining_tp", 1) == 1)


def _rope(x_AHD: torch.Tensor, cos_A1D: torch.Tensor, sin_A1D: torch.Tensor) -> torch.Tensor:
    half = x_AHD.shape[-1] // 2
    rotated = torch.cat((-x_AHD[..., half:], x_AHD[..., :half]), dim=-1)
    return x_AHD * cos_A1D + rotated * sin_A1D


def fuse_weights(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Lay each layer's q/k/v and gate/up weights out as row blocks of one matrix, in place: the
    modules' weights become views of it (values unchanged). Returns each layer's (qkv, gate_up)."""
    fused_layers = []
    with torch.no_grad():
        for layer in model.model.layers:
            pair = []
            for parts in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                          (layer.mlp.gate_proj, layer.mlp.up_proj)):
                fused = torch.cat([m.weight for m in parts])
                start = 0
                for m in parts:
                    rows = m.weight.shape[0]
                    m.weight = torch.nn.Parameter(fused[start:start + rows], requires_grad=False)
                    start += rows
                pair.append(fused)
            fused_layers.append(tuple(pair))
    return fused_layers


class LeanDecoder:
    """``step(token_A, attn_AL, pos_A, cache) -> logits_AV``, from `model` and its `fuse_weights`."""

    def __init__(self, model, fused: list[tuple[torch.Tensor, torch.Tensor]]):
        cfg = model.config
        self.model = model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.layers = []
        for layer, (qkv, gate_up) in zip(model.model.layers, fused):
            att, mlp = layer.self_attn, layer.mlp
            norms = (getattr(att, "q_norm", None), getattr(att, "k_norm", None))
            self.layers.append((layer.input_layernorm, qkv, att.o_proj.weight, layer.post_attention_layernorm,
                                gate_up, mlp.down_proj.weight, norms))

    @torch.no_grad()
    def step(self, token_A: torch.Tensor, attn_AL: torch.Tensor, pos_A: torch.Tensor, cache) -> torch.Tensor:
        m = self.model
        A, H, K, D = token_A.shape[0], self.heads, self.kv_heads, self.head_dim
        h_AE = m.model.embed_tokens(token_A)
        cos_A1D, sin_A1D = m.model.rotary_emb(h_AE, pos_A[:, None])
        bias_A11L = torch.zeros(attn_AL.shape, dtype=h_AE.dtype, device=h_AE.device).masked_fill_(
            attn_AL == 0, torch.finfo(h_AE.dtype).min)[:, None, None, :]
        for i, (norm1, qkv, wo, norm2, gate_up, down, (q_norm, k_norm)) in enumerate(self.layers):
            x = norm1(h_AE) @ qkv.t()
            q_AHD = x[:, :H * D].view(A, H, D)
            k_AKD = x[:, H * D:(H + K) * D].view(A, K, D)
            v_AK1D = x[:, (H + K) * D:].reshape(A, K, 1, D)
            if q_norm is not None:
                q_AHD, k_AKD = q_norm(q_AHD), k_norm(k_AKD)
            q_AHD, k_AKD = _rope(q_AHD, cos_A1D, sin_A1D), _rope(k_AKD, cos_A1D, sin_A1D)
            keys_AKLD, values_AKLD = cache.layers[i].update(k_AKD[:, :, None], v_AK1D)
            out_AKGD = torch.nn.functional.scaled_dot_product_attention(
                q_AHD.view(A, K, H // K, D), keys_AKLD, values_AKLD, attn_mask=bias_A11L, scale=self.scale)
            h_AE = h_AE + out_AKGD.reshape(A, H * D) @ wo.t()
            gu = norm2(h_AE) @ gate_up.t()
            half = gu.shape[-1] // 2
            h_AE = h_AE + (torch.nn.functional.silu(gu[:, :half]) * gu[:, half:]) @ down.t()
        return m.lm_head(m.model.norm(h_AE))


__all__ = ["LLAMA_LIKE", "LeanDecoder", "fuse_weights", "supports"]
