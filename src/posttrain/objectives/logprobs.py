"""Log-probs of chosen tokens without materialising [B, T, V] logits.

Every trainer needs ``log pi(token_t | tokens_<t)`` for the completion tokens, and the vocabulary
is large (49,152 for SmolLM2; 150k+ for recent models), so the naive path (full logits, then
log_softmax, then gather) holds a float32 [B, T, V] tensor in forward and another one (its
gradient) in backward: for B=8, T=512, V=49,152 that is 0.8 GB each, more than the whole model.

`completion_logprobs` instead:

1. runs the model's trunk once (``model.get_decoder()``, found by ``posttrain.models.split``), giving
   hidden states [B, T, H];
2. keeps only the N positions that predict a completion token (prompts are about half the tokens,
   and their logits are never needed), giving h [N, H];
3. applies the output head to h in chunks of `chunk_size` rows inside a custom autograd function
   (`_ChunkedLinearLogprob`): forward keeps per row only logsumexp (and entropy); backward
   recomputes each chunk's logits and turns them into the gradient right away. At most a few
   [chunk_size, V] buffers exist at any time, forward or backward. When the head's weight is frozen
   (LoRA elsewhere, the usual RL setup) the gradient with respect to h is computed in forward
   instead, ``(onehot(y) - softmax(z)) @ W`` per row, so backward does not recompute anything.
   A trainable head with few scored tokens (all chunks' probabilities within
   `KEEP_PROBS_MAX_BYTES`, 256 MB) keeps them from forward instead of recomputing its logits.

A head that is not a plain ``nn.Linear`` (a PEFT LoRA layer on ``lm_head``, a ``modules_to_save``
wrapper, a sharded/ZeRO-3 weight) is called as a module per chunk under activation checkpointing:
still chunked, still exact, a little slower.

Models whose logits are ``transform(head(trunk(x)))`` (Gemma-2's soft-capping c * tanh(z / c),
Granite's and Cohere's logit scaling: ``models.split.LogitTransform``, and the sampling temperature
as a last z / T) get the transform per chunk too: a pure scale on a bias-free linear head is folded
into h (W (a h) = a W h: the plain path, nothing added); otherwise each chunk's logits z become
u = transform(z) and the gradient dL/du is multiplied by the transform's slope du/dz (for the
soft-cap 1 - tanh(z / c)^2) before the matmuls, in forward (frozen head) or in the recomputing
backward. With no transform nothing changes. Models whose logits are not that (a final bias, PEFT
prompt learning, a transform `split_model` does not know) and models without a separable head use
the naive path, with a one-time warning.

The chunked head is the technique of Liger-Kernel's fused linear cross-entropy and of torchtune's
``chunked_output`` (here on CPU-friendly plain torch ops, and for log-probs + entropy rather than a
mean loss).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from posttrain.models.split import LogitTransform, split_model

DEFAULT_CHUNK_SIZE = 512
KEEP_PROBS_MAX_BYTES = 256 * 2**20
"""A trainable plain head keeps its softmax chunks from forward for backward (instead of
recomputing the logits there, a third of the head's backward work) when they take at most this
much memory in all: a few hundred scored tokens at a 50k vocabulary. Larger batches recompute."""


# ---------------------------------------------------------------------------------------------
# Small pieces


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., token]`` for each position: ``logits[tok] - logsumexp(logits)``.

    `logits` is [..., V], `tokens` the matching [...] integer tensor (e.g. [B, T, V] and [B, T]).
    The work goes one leading row at a time so no full float32 log-softmax copy is kept (TRL
    ``selective_log_softmax``). float16/bfloat16 logits are evaluated in float32, row by row
    (logsumexp in half precision loses too much); the result is float32 then.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"selective_log_softmax: logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}"
        )
    if logits.dim() == 1:
        return selective_log_softmax(logits[None], tokens[None])[0]
    out = []
    for row_logits, row_tokens in zip(logits, tokens):
        if row_logits.dtype not in (torch.float32, torch.float64):
            row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logsumexp(z) - sum(softmax(z) * z)``,
    one leading row at a time (float32 at least). The logits are shifted by their max first:
    then logsumexp >= 0 and -sum(p z) >= 0, and the difference of two large numbers (logits of
    a trained model are ~30) does not eat float32's precision."""
    if logits.dim() == 1:
        return entropy_from_logits(logits[None])[0]
    out = []
    for z in logits:
        z = z.float() if z.dtype not in (torch.float32, torch.float64) else z
        z = z - z.max(dim=-1, keepdim=True).values.detach()  # both terms below are then >= 0
        p = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.stack(out)


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"completion_logprobs: {reason}; using the naive path (full [B, T, V] logits), "
        "which needs much more memory",
        RuntimeWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------
# The chunked head for a plain linear layer


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges of at most `chunk_size`, balanced: no small remainder chunk. (CPU BLAS switches to
    a less accurate kernel for matmuls of a few rows: [7, 49152] @ [49152, 576] has ~5x the float32
    error of [16, ...]; so the chunking must not create small ones the naive path would not have.)"""
    if n == 0:
        return []
    k = -(-n // chunk_size)
    size = -(-n // k)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _linear_forward(h_NH, W_VH, b_V, tok_N, chunk_size, with_entropy, precompute, keep_probs=False, tf=None,
                    shift=False):
    """Chunked forward: returns logp_N, entropy_N, lse_N, m_N, ezs_N, dh_NH, probs (None when not
    computed).

    With `with_entropy` (or `shift`) the logits z are shifted by their row max m first (m_N), and
    then ``lse = logsumexp(z - m)`` (>= 0), and with `with_entropy` ``ezs = sum softmax(z) * (z - m)``
    (<= 0) and ``entropy = lse - ezs``: two non-negative terms, accurate in float32. Without either,
    lse is ``logsumexp(z)`` and m_N is None. `shift` alone gives the log-probs of the entropy pass to
    the bit, without the entropy's work.
    ``dh_NH`` = d logp / d h = (onehot(y) - softmax(z)) @ W, only when `precompute` (frozen head).
    ``probs``: the list of softmax(z) chunks, only when `keep_probs`.
    With a logit transform `tf` (`models.split.LogitTransform`), z above is tf(W h + b), and
    ``dh_NH`` is ((onehot(y) - softmax(z)) * tf'(W h + b)) @ W."""
    N = h_NH.shape[0]
    dt = _out_dtype(h_NH.dtype)
    logp_N = torch.empty(N, dtype=dt, device=h_NH.device)
    lse_N = torch.empty_like(logp_N)
    ent_N = torch.empty_like(logp_N) if with_entropy else None
    ezs_N = torch.empty_like(logp_N) if with_entropy else None
    shift = shift or with_entropy
    m_N = torch.empty_like(logp_N) if shift else None
    dh_NH = torch.empty_like(h_NH) if precompute else None
    probs = [] if keep_probs else None
    for s, e in _chunks(N, chunk_size):
        z_CV = nn.functional.linear(h_NH[s:e], W_VH, b_V).to(dt)
        slope = None
        if tf is not None:
            z_CV, slope = tf.value_and_slope(z_CV)
        if shift:
            m_C1 = z_CV.max(dim=-1, keepdim=True).values
            m_N[s:e] = m_C1.squeeze(1)
            z_CV.sub_(m_C1)  # z - m from here on
        lse_C = torch.logsumexp(z_CV, dim=-1)
        logp_N[s:e] = z_CV.gather(1, tok_N[s:e, None]).squeeze(1) - lse_C
        lse_N[s:e] = lse_C
        if with_entropy or precompute or keep_probs:
            p_CV = torch.sub(z_CV, lse_C[:, None]).exp_()
            if with_entropy:  # torch's sum (not a BLAS dot): its cascade summation keeps float32 exact enough
                ezs_C = z_CV.mul_(p_CV).sum(-1)
                ezs_N[s:e] = ezs_C
                ent_N[s:e] = lse_C - ezs_C
            del z_CV
            if keep_probs:
                probs.append(p_CV)
            if precompute:  # (onehot - p) @ W, not W[y] - p @ W: that cancels when p_y is near 1
                d_CV = p_CV.neg_().scatter_add_(1, tok_N[s:e, None], torch.ones_like(p_CV[:, :1]))
                if slope is not None:
                    d_CV = d_CV.mul_(slope)
                dh_NH[s:e] = d_CV.to(W_VH.dtype) @ W_VH
    return logp_N, ent_N, lse_N, m_N, ezs_N, dh_NH, probs


class _ChunkedLinearLogprob(torch.autograd.Function):
    """``(logp_N, entropy_N) = f(h_NH, W_VH, b_V)`` for logits ``z = h @ W.T + b``, chunked over N.

    With p = softmax(z), y the token and Ez = sum p*z (= m + ezs, see `_linear_forward`):
      d logp / dz    = onehot(y) - p
      d entropy / dz = -p * (z - Ez) = -p * ((z - m) - ezs)
    Backward recomputes z chunk by chunk, forms dz in place, and accumulates dh = dz @ W,
    dW += dz.T @ h, db += sum dz. With `precompute` (W and b frozen) forward already stored
    d logp / dh, and backward only recomputes chunks if the entropy's gradient is needed. With
    `keep_probs` forward kept p chunk by chunk, and backward forms dz from it for logp's gradient
    (the entropy's still recomputes; the kept chunks are consumed, a second backward recomputes).
    With a logit transform `tf` the logits are u = tf(z): the formulas above hold for u, and
    dL/dz = dL/du * tf'(z) (recomputed with z; `keep_probs` is not used then).
    """

    @staticmethod
    def forward(ctx, h_NH, W_VH, b_V, tok_N, chunk_size, with_entropy, precompute, keep_probs=False, tf=None,
                shift=False):
        logp_N, ent_N, lse_N, m_N, ezs_N, dh_NH, probs = _linear_forward(
            h_NH, W_VH, b_V, tok_N, chunk_size, with_entropy, precompute, keep_probs, tf, shift
        )
        ctx.tf = tf
        ctx.probs = probs
        if ent_N is None:
            ent_N = logp_N.new_zeros(0)
            ctx.mark_non_differentiable(ent_N)
        ctx.save_for_backward(h_NH, W_VH, b_V, tok_N, lse_N, m_N, ezs_N, dh_NH)
        ctx.chunk_size, ctx.with_entropy, ctx.precompute = chunk_size, with_entropy, precompute
        ctx.set_materialize_grads(False)
        return logp_N, ent_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp_N, g_ent_N):
        h_NH, W_VH, b_V, tok_N, lse_N, m_N, ezs_N, dh_NH = ctx.saved_tensors
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        if not ctx.with_entropy:
            g_ent_N = None
        grad_h = grad_W = grad_b = None
        if ctx.precompute and g_logp_N is not None and need_h:
            grad_h = g_logp_N[:, None].to(dh_NH.dtype) * dh_NH
            g_logp_N = None  # its part of the gradient is done
        if g_logp_N is None and g_ent_N is None:
            return grad_h, None, None, None, None, None, None, None, None, None
        if need_h and grad_h is None:
            grad_h = torch.zeros_like(h_NH)
        if need_W:
            grad_W = torch.zeros_like(W_VH)
        if need_b and b_V is not None:
            grad_b = torch.zeros_like(b_V)
        dt = lse_N.dtype
        probs, ctx.probs = ctx.probs, None
        if probs is not None and g_ent_N is not None:
            probs = None  # the entropy's gradient needs z: recompute
        for i, (s, e) in enumerate(_chunks(h_NH.shape[0], ctx.chunk_size)):
            h_CH = h_NH[s:e]
            if probs is not None:  # -g_logp * p + g_logp * onehot(y), from the kept p
                dz_CV = probs[i].mul_(-g_logp_N[s:e, None].to(dt))
                probs[i] = None
                dz_CV.scatter_add_(1, tok_N[s:e, None], g_logp_N[s:e, None].to(dt))
                _accumulate(dz_CV.to(W_VH.dtype), h_CH, W_VH, grad_h, grad_W, grad_b, s, e)
                continue
            z_CV = nn.functional.linear(h_CH, W_VH, b_V).to(dt)
            slope = None
            if ctx.tf is not None:
                z_CV, slope = ctx.tf.value_and_slope(z_CV)
            if m_N is not None:
                z_CV.sub_(m_N[s:e, None])  # the same shifted logits as in forward
            lse_C1 = lse_N[s:e, None]
            if g_ent_N is not None:
                p_CV = torch.sub(z_CV, lse_C1).exp_()
                # g_ent * (z - Ez) = g_ent * ((z - m) - ezs)
                coef_CV = z_CV.sub_(ezs_N[s:e, None]).mul_(g_ent_N[s:e, None].to(dt))
                if g_logp_N is not None:
                    coef_CV.add_(g_logp_N[s:e, None].to(dt))
                dz_CV = p_CV.mul_(coef_CV).neg_()  # -p * (g_logp + g_ent * (z - Ez))
                del coef_CV, z_CV
            else:
                dz_CV = z_CV.sub_(lse_C1).exp_().mul_(-g_logp_N[s:e, None].to(dt))  # -g_logp * p
            if g_logp_N is not None:  # + g_logp * onehot(y)
                dz_CV.scatter_add_(1, tok_N[s:e, None], g_logp_N[s:e, None].to(dt))
            if slope is not None:  # dL/dz = dL/du * du/dz
                dz_CV = dz_CV.mul_(slope)
                del slope
            _accumulate(dz_CV.to(W_VH.dtype), h_CH, W_VH, grad_h, grad_W, grad_b, s, e)
        return grad_h, grad_W, grad_b, None, None, None, None, None, None, None


def _accumulate(dz_CV, h_CH, W_VH, grad_h, grad_W, grad_b, s, e) -> None:
    """Add one chunk's dz = dL/dz to the gradients of h (rows s:e), W and b."""
    if grad_h is not None:
        grad_h[s:e] += dz_CV @ W_VH
    if grad_W is not None:
        grad_W.addmm_(dz_CV.t(), h_CH)
    if grad_b is not None:
        grad_b += dz_CV.sum(0)


# ---------------------------------------------------------------------------------------------
# The chunked head for any module


def _logp_entropy(z_CV: torch.Tensor, tok_C: torch.Tensor, with_entropy: bool, shift: bool = False):
    z_CV = z_CV.to(_out_dtype(z_CV.dtype))
    if with_entropy or shift:  # shift by the max: see _linear_forward
        z_CV = z_CV - z_CV.max(dim=-1, keepdim=True).values.detach()
    lse_C = torch.logsumexp(z_CV, dim=-1)
    logp_C = z_CV.gather(1, tok_C[:, None]).squeeze(1) - lse_C
    if not with_entropy:
        return logp_C, None
    return logp_C, lse_C - (torch.softmax(z_CV, dim=-1) * z_CV).sum(-1)


def _module_chunk(head, h_CH, tok_C, with_entropy, tf=None, shift=False):
    z_CV = head(h_CH)
    return _logp_entropy(z_CV if tf is None else tf(z_CV.to(_out_dtype(z_CV.dtype))), tok_C, with_entropy, shift)


def _module_head(head, h_NH, tok_N, chunk_size, with_entropy, grad, tf=None, shift=False):
    """Call `head` on chunks of rows; with `grad`, each chunk under non-reentrant activation
    checkpointing (its logits are recomputed in backward, RNG state included for dropout)."""
    logps, ents = [], []
    for s, e in _chunks(h_NH.shape[0], chunk_size):
        args = (head, h_NH[s:e], tok_N[s:e], with_entropy, tf, shift)
        if grad:
            lp, en = checkpoint(_module_chunk, *args, use_reentrant=False)
        else:
            lp, en = _module_chunk(*args)
        logps.append(lp)
        ents.append(en)
    if not logps:
        empty = h_NH.new_zeros(0, dtype=_out_dtype(h_NH.dtype))
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def _is_plain_weight(w) -> bool:
    """A weight we may matmul directly: a full local tensor (not sharded, ZeRO-3 or DTensor)."""
    return isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor and w.numel() > 0 and not hasattr(w, "ds_id")


def head_logprobs(
    head: nn.Module,
    h_NH: torch.Tensor,
    tok_N: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    transform: LogitTransform | None = None,
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(transform(head(h)))[tok]`` (and the entropy) for each row of `h_NH`, chunked
    over rows (`transform`: the model's logit transform from `split_model`, then the temperature;
    None: the identity). `shifted`: the log-probs as the entropy pass computes them (on the logits
    less their row max), to the bit, without the entropy (a reference pass whose log-probs must
    equal the policy's entropy pass at equal weights).

    Plain ``nn.Linear`` heads go through `_ChunkedLinearLogprob`; other modules are called per chunk
    under activation checkpointing. Returns ``(logp_N, entropy_N or None)`` in float32 (float64 for
    float64 inputs)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tf = transform
    if type(head) is nn.Linear and _is_plain_weight(head.weight):
        W, b = head.weight, head.bias
        if tf is not None and b is None and tf.factor is not None:  # a W h = W (a h): the plain path
            h_NH, tf = h_NH * tf.factor, None
        grad = torch.is_grad_enabled() and (
            h_NH.requires_grad or W.requires_grad or (b is not None and b.requires_grad)
        )
        if not grad:
            with torch.no_grad():
                logp, ent = _linear_forward(h_NH, W, b, tok_N, chunk_size, with_entropy, False, tf=tf, shift=shifted)[:2]
            return logp, ent
        precompute = h_NH.requires_grad and not W.requires_grad and (b is None or not b.requires_grad)
        probs_bytes = h_NH.shape[0] * W.shape[0] * _out_dtype(h_NH.dtype).itemsize
        keep = not precompute and tf is None and probs_bytes <= KEEP_PROBS_MAX_BYTES  # (tf: the slope needs z)
        logp, ent = _ChunkedLinearLogprob.apply(h_NH, W, b, tok_N, chunk_size, with_entropy, precompute, keep, tf,
                                                shifted)
        return logp, (ent if with_entropy else None)
    # a module may use tensors that are not its parameters: checkpoint whenever grad mode is on
    return _module_head(head, h_NH, tok_N, chunk_size, with_entropy, torch.is_grad_enabled(), tf, shifted)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _is_ddp(model) -> bool:
    return type(model).__name__ == "DistributedDataParallel" and isinstance(getattr(model, "module", None), nn.Module)


def _hidden_through_forward(model, kw, head, T, tf=None):
    """Final hidden states from the wrapper's own forward (DDP must see the forward to sync
    gradients): ``output_hidden_states=True`` with the logits of one position only. Returns None
    unless the model's logits there equal ``head(hidden)``, i.e. the last hidden state is the head's
    input (checked on the spot, for free)."""
    try:
        out = model(**kw, output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        return None
    hidden_BTH = out.hidden_states[-1][:, -T:]
    with torch.no_grad():
        mine = head(hidden_BTH[:, -1:].detach()).float()
        mine = mine if tf is None else tf(mine)
        ok = mine.shape == out.logits.shape and torch.allclose(mine, out.logits.float(), rtol=1e-3, atol=1e-3)
    return hidden_BTH if ok else None


def _forward_kwargs(input_ids_BT, attention_mask_BT, position_ids_BT):
    kw = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT, "use_cache": False}
    if position_ids_BT is not None:
        kw["position_ids"] = position_ids_BT
    return kw


def _targets(input_ids_BT, completion_mask_BT):
    """Positions (b, t) whose token is scored: completion tokens with a predecessor (t >= 1)."""
    target_BT = completion_mask_BT.bool().clone()
    target_BT[:, 0] = False
    return target_BT


def naive_completion_logprobs(
    model, input_ids_BT, attention_mask_BT, completion_mask_BT, with_entropy=False, position_ids_BT=None
):
    """Reference path: full logits from ``model(...)``, then log_softmax + gather (and entropy).
    Same contract as `completion_logprobs`; used as its fallback and to test it."""
    out = model(**_forward_kwargs(input_ids_BT, attention_mask_BT, position_ids_BT))
    logits_BTV = out.logits
    T = input_ids_BT.shape[1]
    if logits_BTV.shape[1] != T:  # e.g. virtual tokens prepended by prompt tuning
        logits_BTV = logits_BTV[:, -T:]
    target_BT = _targets(input_ids_BT, completion_mask_BT)
    zero = torch.zeros((), dtype=_out_dtype(logits_BTV.dtype), device=logits_BTV.device)
    logp_BT = torch.zeros(target_BT.shape, dtype=zero.dtype, device=zero.device)
    logp_BT[:, 1:] = selective_log_softmax(logits_BTV[:, :-1], input_ids_BT[:, 1:])
    logp_BT = torch.where(target_BT, logp_BT, zero)
    if not with_entropy:
        return logp_BT
    ent_BT = torch.zeros_like(logp_BT)
    ent_BT[:, 1:] = entropy_from_logits(logits_BTV[:, :-1])
    return logp_BT, torch.where(target_BT, ent_BT, zero)


def completion_logprobs(
    model,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None,
    completion_mask_BT: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    position_ids_BT: torch.Tensor | None = None,
):
    """Log-prob of each completion token given everything before it, without [B, T, V] logits.

    ``logp_BT[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` where ``completion_mask[b, t]``
    is 1, and 0 elsewhere (position 0 has no predecessor and is always 0). With `with_entropy`,
    returns ``(logp_BT, entropy_BT)``, the entropy of the same next-token distributions (0 where
    the mask is 0). Both are float32 (float64 for a float64 model) and differentiable.

    `attention_mask_BT` may be None; `position_ids_BT` is passed to the trunk (for padding-free
    packed sequences). `chunk_size` is the number of scored tokens per head chunk: the peak extra
    memory is a few ``chunk_size x V`` float32 buffers. Models that cannot be split into trunk +
    head (see `split_model`) take the naive path, with a one-time warning. A DistributedDataParallel
    wrapper is run through its own forward (so gradients are synchronised) asking for the hidden
    states and one position's logits; FSDP and DeepSpeed engines take the naive path.
    """
    if input_ids_BT.shape != completion_mask_BT.shape:
        raise ValueError(
            f"completion_logprobs: input_ids {tuple(input_ids_BT.shape)} and completion_mask "
            f"{tuple(completion_mask_BT.shape)} differ in shape"
        )
    ddp = _is_ddp(model)
    split = split_model(model.module if ddp else model)
    kw = _forward_kwargs(input_ids_BT, attention_mask_BT, position_ids_BT)
    hidden_BTH = None
    if not isinstance(split, str):
        trunk, head, tf = split
        if ddp:
            hidden_BTH = _hidden_through_forward(model, kw, head, input_ids_BT.shape[1], tf)
            if hidden_BTH is None:
                split = "the DDP-wrapped model's last hidden state is not its head's input"
        else:
            out = trunk(**kw)
            hidden_BTH = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if isinstance(split, str):
        _warn_once(split)
        return naive_completion_logprobs(
            model, input_ids_BT, attention_mask_BT, completion_mask_BT, with_entropy, position_ids_BT
        )

    target_BT = _targets(input_ids_BT, completion_mask_BT)
    b_N, t_N = target_BT.nonzero(as_tuple=True)
    h_NH = hidden_BTH[b_N, t_N - 1]  # the hidden state at t-1 predicts the token at t
    tok_N = input_ids_BT[b_N, t_N]
    logp_N, ent_N = head_logprobs(head, h_NH, tok_N, chunk_size, with_entropy, tf)

    logp_BT = logp_N.new_zeros(target_BT.shape).index_put((b_N, t_N), logp_N)
    if not with_entropy:
        return logp_BT
    return logp_BT, ent_N.new_zeros(target_BT.shape).index_put((b_N, t_N), ent_N)
