"""Log-probs of grouped rollouts, each prompt run through the model once per group.

In a GRPO/RLOO/PPO batch the K completions of a prompt share that prompt, and prompt tokens are
about half of all tokens. ``rollout_logprobs`` runs the trunk on the P prompts (with a KV cache and,
in training, with gradients), repeats each prompt's keys/values K times, runs the trunk on the
P*K completions against that cache, and applies the output head only at completion positions,
in chunks (``logprobs.head_logprobs``): no [B, T, V] logits and no K-fold prompt compute, forward
or backward (the gradient of the shared prompt is the sum over its K completions, as autograd
gives through the repeat). The result equals the plain full-sequence computation to float
tolerance; ``tests/unit/test_grouped.py`` checks value and gradient.

The sampling temperature T is applied as softmax(transform(W h) / T), the distribution the sampler
draws from (it divides the model's returned logits, the model's own soft-capping or scaling already
applied, by T): 1 / T is appended to the model's logit transform (``split_model``) as a last scale,
after the soft-cap, never before it. For a bias-free head with no nonlinear transform the whole
scale is folded into the hidden state, W (h a) (``logprobs.head_logprobs``), as before.
"""

from __future__ import annotations

import torch

from posttrain.runtime import distributed
from posttrain.sampling.generation import Rollouts, positions
from posttrain.models.split import split_model, then_scale
from posttrain.objectives.logprobs import DEFAULT_CHUNK_SIZE, completion_logprobs, head_logprobs


def _cache_cls():
    from transformers import DynamicCache

    return DynamicCache


def _select(rollouts: Rollouts, rows: torch.Tensor | None):
    G = rollouts.group_size
    prompt_PL, pmask_PL = rollouts.prompt_ids_PL, rollouts.prompt_mask_PL
    comp_BC, cmask_BC = rollouts.completion_ids_BC, rollouts.completion_mask_BC
    if rows is not None:
        b_idx = (rows[:, None] * G + torch.arange(G, device=rows.device)[None, :]).reshape(-1)
        prompt_PL, pmask_PL = prompt_PL[rows], pmask_PL[rows]
        comp_BC, cmask_BC = comp_BC[b_idx], cmask_BC[b_idx]
    first = int((pmask_PL.sum(0) > 0).nonzero()[0])  # drop left padding shared by every row
    return prompt_PL[:, first:], pmask_PL[:, first:], comp_BC, cmask_BC


def rollout_hidden(trunk, rollouts: Rollouts, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states ``h_BCH`` of ``trunk`` (a model's decoder stack) where ``h_BCH[b, t]`` is the
    state that predicts completion token t (the last prompt position for t = 0), each prompt run
    once per group. Value heads and the output head both read these."""
    G = rollouts.group_size
    prompt_PL, pmask_PL, comp_BC, _ = _select(rollouts, rows)
    cache = _cache_cls()(config=getattr(trunk, "config", None))
    out = trunk(input_ids=prompt_PL, attention_mask=pmask_PL, position_ids=positions(pmask_PL),
                cache=cache, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else cache
    h_last_BH = out.last_hidden_state[:, -1].repeat_interleave(G, dim=0)
    C = comp_BC.shape[1]
    # FSDP: every rank must run the trunk as often as the others (its layers gather their weights
    # in each forward and reduce gradients in each backward), so one-token completions still get
    # a (one-token, zero-weighted) completion pass there
    lockstep = C == 1 and distributed.is_sharded(trunk)
    if C == 1 and not lockstep:
        return h_last_BH[:, None]
    feed = comp_BC[:, :1] if lockstep else comp_BC[:, :-1]
    cache.batch_repeat_interleave(G)
    pmask_BL = pmask_PL.repeat_interleave(G, dim=0)
    attn = torch.cat([pmask_BL, torch.ones_like(feed)], dim=-1)
    pos = pmask_BL.sum(-1, keepdim=True) + torch.arange(feed.shape[1], device=comp_BC.device)[None, :]
    out = trunk(input_ids=feed, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True)
    if lockstep:
        return h_last_BH[:, None] + 0.0 * out.last_hidden_state.sum()
    return torch.cat([h_last_BH[:, None], out.last_hidden_state], dim=1)


def rollout_logprobs(
    model,
    rollouts: Rollouts,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rows: torch.Tensor | None = None,
    shifted: bool = False,
):
    """``logp_BC`` (and ``entropy_BC``) of the completion tokens of ``rollouts`` under ``model``.

    ``rows`` selects whole groups (a micro-batch): indices of prompts; default all. Values are 0
    where the completion mask is 0. Differentiable when grad is enabled. ``shifted``: the log-probs
    of the ``with_entropy`` pass to the bit, without its entropy (``logprobs.head_logprobs``)."""
    T = temperature if temperature > 0 else 1.0
    split = split_model(model)
    if isinstance(split, str):
        return _unshared(model, *_select(rollouts, rows), rollouts.group_size, T, with_entropy, chunk_size)
    trunk, head, transform = split
    comp_BC, cmask_BC = _select(rollouts, rows)[2:]
    h_BCH = rollout_hidden(trunk, rollouts, rows)
    b_N, t_N = cmask_BC.bool().nonzero(as_tuple=True)
    h_NH = h_BCH[b_N, t_N]
    transform = then_scale(transform, 1.0 / T)  # after the model's own transform, as the sampler does
    logp_N, ent_N = head_logprobs(head, h_NH, comp_BC[b_N, t_N], chunk_size, with_entropy, transform, shifted)
    B, C = comp_BC.shape
    logp_BC = logp_N.new_zeros((B, C)).index_put((b_N, t_N), logp_N)
    if not with_entropy:
        return logp_BC
    return logp_BC, ent_N.new_zeros((B, C)).index_put((b_N, t_N), ent_N)


def _unshared(model, prompt_PL, pmask_PL, comp_BC, cmask_BC, G, T, with_entropy, chunk_size):
    """Fallback for models that cannot be split (see ``split_model``): full sequences."""
    if T != 1.0:
        raise ValueError(f"temperature != 1 needs a model whose output head can be split off; this one "
                         f"cannot: {split_model(model)}")
    prompt_BL = prompt_PL.repeat_interleave(G, dim=0)
    pmask_BL = pmask_PL.repeat_interleave(G, dim=0)
    ids = torch.cat([prompt_BL, comp_BC], dim=1)
    attn = torch.cat([pmask_BL, torch.ones_like(comp_BC)], dim=1)
    cmask = torch.cat([torch.zeros_like(pmask_BL), cmask_BC], dim=1)
    out = completion_logprobs(model, ids, attn, cmask, chunk_size=chunk_size, with_entropy=with_entropy,
                              position_ids_BT=positions(attn))
    L = prompt_BL.shape[1]
    if with_entropy:
        return out[0][:, L:], out[1][:, L:]
    return out[:, L:]
