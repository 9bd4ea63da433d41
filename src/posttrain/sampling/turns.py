"""Multi-turn sampling: K episodes per prompt, the model and an environment taking turns, token in
and token out, each turn continuing from the episode's KV cache.

``sample_episodes`` starts like ``generation.sample_groups`` (the P prompts pre-filled once, each
cache repeated K times) and decodes every episode's first turn. When an episode's turn ends (its
end-of-turn token, or a cap), ``respond(b, turn_ids, cut)`` is called: the caller decodes the turn,
steps the environment and returns the token ids to append (the chat template's rendering of the
observation messages, as a delta) or None when the episode is over. The episodes that continue
then take their next turn together.

Token in, token out: an episode's tokens are the prompt's, then exactly the sampled ids of each
turn and the ids ``respond`` returned, never a re-tokenization of the conversation, so a chat
template that renders earlier turns differently cannot change what was sampled and is trained.

The KV cache: an episode leaving the decode batch keeps its keys and values (its real positions
only); the next turn lays the continuing episodes' caches side by side, left-padded, and pre-fills
only the tokens not yet in them: the turn's last sampled token and the environment's delta.
``reuse_cache=False`` instead re-fills each episode's whole sequence every turn (the benchmark's
baseline, and the fallback for caches that are not plain full-attention layers). Either way the
draws are the same: a prompt's group draws from its own generator, in token order.

The result is a ``Rollouts`` whose completion region holds each episode's tokens after its prompt,
contiguous (turns and environment deltas), right-padded; ``completion_mask_BC`` is 1 on the
model's own tokens only, so environment tokens are context, never trained, and the grouped
log-prob forward (``objectives.grouped``) reads it unchanged. Departure from TRL/verl's
multi-turn rollouts: no re-tokenization and no re-prefill of earlier turns.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from posttrain.sampling.generation import (Rollouts, SamplingConfig, decode_step, eos_ids, left_pad, positions,
                                           prefill, sample_next)
from posttrain.sampling.kv_cache import decode_cache, set_reserve
from posttrain.sampling.skinny_linear import skinny_linears

Respond = Callable[[int, list[int], bool], "list[int] | None"]
"""``respond(episode, turn_ids, cut)``: the ids to append after the turn, or None: the episode is over.
``cut`` is True when the turn ended at ``max_new_tokens`` instead of its end-of-turn token: the
environment still answers it, and the episode goes on after the end-of-turn token (appended, not
trained), as a chat would."""


@dataclasses.dataclass(frozen=True)
class TurnLimits:
    max_turns: int = 4
    """Model turns per episode."""
    max_total_tokens: int = 1024
    """Tokens per episode after its prompt, the model's and the environment's; an episode that would
    pass it ends (truncated)."""


@dataclasses.dataclass
class Episodes:
    rollouts: Rollouts
    """Completion region: each episode's turns and environment tokens; mask on the model's tokens."""
    turns_B: list[int]
    model_tokens_B: list[int]
    env_tokens_B: list[int]
    truncated_B: list[bool]
    """Ended by a cap (turns, tokens), not by the environment."""
    cut_turns_B: list[int]
    """Turns that reached ``max_new_tokens`` without their end-of-turn token."""
    prefill_tokens: int = 0
    """Tokens run through the model outside decoding (prompts, deltas, re-fills): the cache's saving."""


@dataclasses.dataclass
class _Episode:
    seq: list[int] = dataclasses.field(default_factory=list)
    model: list[bool] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    pending: list[int] = dataclasses.field(default_factory=list)
    """Ids in the sequence but not yet in its cache (the turn's last token and the delta)."""
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer ([H, n, D] keys, values) of the tokens fed so far."""
    turns: int = 0
    cut_turns: int = 0
    turn: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    truncated: bool = False


def _plain_cache(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, DynamicLayer) and not getattr(layer, "is_sliding", False)
                                for layer in layers)


@torch.no_grad()
def sample_episodes(model, tokenizer, prompt_ids: Sequence[Sequence[int]], group_size: int, cfg: SamplingConfig,
                    respond: Respond, limits: TurnLimits = TurnLimits(), generator: torch.Generator | None = None,
                    prompt_generators: Sequence[torch.Generator] | None = None, reuse_cache: bool = True) -> Episodes:
    """K = ``group_size`` episodes per prompt; ``cfg.max_new_tokens`` caps each turn (module docstring)."""
    with skinny_linears(model):
        return _Sampler(model, tokenizer, prompt_ids, group_size, cfg, respond, limits, generator,
                        prompt_generators, reuse_cache).run()


class _Sampler:
    def __init__(self, model, tokenizer, prompt_ids, G, cfg, respond, limits, generator, prompt_generators,
                 reuse_cache):
        self.model, self.cfg, self.respond, self.limits, self.G = model, cfg, respond, limits, G
        self.generator, self.prompt_generators, self.reuse = generator, prompt_generators, reuse_cache
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        self.stop = torch.tensor(eos_ids(model, tokenizer), device=self.device)
        self.eot = tokenizer.eos_token_id
        self.prompts = [list(p) for p in prompt_ids]
        self.eps = [_Episode() for _ in range(len(self.prompts) * G)]
        self.prefilled = 0

    # ------------------------------------------------------------------------------------ turns

    def run(self) -> Episodes:
        t0 = time.time()
        rows = torch.arange(len(self.eps), device=self.device)
        state = self._first_turn_cache()
        while len(rows):
            self._decode(rows, *state)
            rows = self._after_turn(rows)
            if len(rows):
                state = self._continue_cache(rows)
        return self._result(time.time() - t0)

    def _caps(self, rows: torch.Tensor) -> torch.Tensor:
        left = [self.limits.max_total_tokens - len(self.eps[b].seq) for b in rows.tolist()]
        return torch.tensor([max(1, min(self.cfg.max_new_tokens, n)) for n in left], device=self.device)

    def _after_turn(self, rows: torch.Tensor) -> torch.Tensor:
        keep = []
        for b in rows.tolist():
            ep = self.eps[b]
            ep.turns += 1
            cut = not bool(torch.isin(torch.tensor(ep.turn[-1:], device=self.device), self.stop).any())
            delta = self.respond(b, list(ep.turn), cut)
            ep.pending = ep.turn[-1:]  # the turn's last token is sampled, not yet fed
            ep.turn = []
            ep.cut_turns += int(cut)
            if cut and delta is not None and self.eot is not None:  # close the turn with its end-of-turn token
                delta = [self.eot] + list(delta)  # (not sampled, so not trained)
            capped = ep.turns >= self.limits.max_turns
            if delta is None:
                ep.done = True
            elif capped or len(ep.seq) + len(delta) >= self.limits.max_total_tokens:
                ep.done = ep.truncated = True
            else:
                ep.seq += list(delta)
                ep.model += [False] * len(delta)
                ep.logp += [0.0] * len(delta)
                ep.pending += list(delta)
                keep.append(b)
            if ep.done:
                ep.kv = None
        return torch.tensor(keep, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------- the caches

    def _first_turn_cache(self):
        prompt_PL, pmask_PL = (x.to(self.device) for x in left_pad(self.prompts, self.pad_id))
        self.prompt_PL, self.pmask_PL = prompt_PL, pmask_PL  # the result's prompts
        cache = decode_cache(getattr(self.model, "config", None), reserve=self.cfg.max_new_tokens)
        cache, logits_PV = prefill(self.model, prompt_PL, pmask_PL, positions(pmask_PL), cache)
        self.prefilled += int(pmask_PL.sum())
        cache.batch_repeat_interleave(self.G)
        self.reuse = self.reuse and _plain_cache(cache)
        attn_BL = pmask_PL.repeat_interleave(self.G, dim=0)
        return cache, attn_BL, attn_BL.sum(-1), logits_PV.repeat_interleave(self.G, dim=0)

    def _continue_cache(self, rows: torch.Tensor):
        """The cache, mask, next positions and next-token logits of ``rows`` for their next turn."""
        eps = [self.eps[b] for b in rows.tolist()]
        cache = decode_cache(getattr(self.model, "config", None), reserve=self.cfg.max_new_tokens)
        if self.reuse:
            n_B = torch.tensor([ep.kv[0][0].shape[1] for ep in eps], device=self.device)
            width = int(n_B.max())
            past_BL = (torch.arange(width, device=self.device)[None, :] >= (width - n_B)[:, None]).long()
            for i in range(len(eps[0].kv)):
                k0 = eps[0].kv[i][0]
                keys = k0.new_zeros((len(eps), k0.shape[0], width, k0.shape[2]))
                values = torch.zeros_like(keys)
                for j, ep in enumerate(eps):
                    n = ep.kv[i][0].shape[1]
                    keys[j, :, width - n:], values[j, :, width - n:] = ep.kv[i]
                cache.update(keys, values, i)
            feed_BF, fmask_BF = (x.to(self.device) for x in left_pad([ep.pending for ep in eps], self.pad_id))
            pos_BF = n_B[:, None] + positions(fmask_BF)
            attn_BL = torch.cat([past_BL, fmask_BF], dim=-1)
        else:  # the whole sequence again
            feed_BF, fmask_BF = (x.to(self.device) for x in left_pad(
                [self.prompts[b // self.G] + self.eps[b].seq for b in rows.tolist()], self.pad_id))
            pos_BF, attn_BL = positions(fmask_BF), fmask_BF
        for ep in eps:
            ep.kv, ep.pending = None, []
        cache, logits_BV = prefill(self.model, feed_BF, attn_BL, pos_BF, cache)
        self.prefilled += int(fmask_BF.sum())
        return cache, attn_BL, attn_BL.sum(-1), logits_BV

    def _keep_kv(self, cache, attn_BL: torch.Tensor, i: int, b: int) -> None:
        """Episode b (row i of the decode batch) leaves it: keep its real positions' keys and values."""
        if self.reuse:
            real = attn_BL[i].bool()
            self.eps[b].kv = [(layer.keys[i][:, real].clone(), layer.values[i][:, real].clone())
                              for layer in cache.layers]

    # ------------------------------------------------------------------------------ one turn

    def _decode(self, rows, cache, attn_BL, next_pos_B, logits_BV) -> None:
        """Decode one turn of each episode in ``rows`` (token by token; a finished episode leaves the batch)."""
        caps_B = self._caps(rows)
        active = torch.arange(len(rows), device=self.device)  # positions in ``rows``, in cache order
        t = 0
        while True:
            if t < self.cfg.min_new_tokens and len(self.stop):  # each turn at least min_new_tokens, as single-turn
                logits_BV = logits_BV.index_fill(-1, self.stop, float("-inf"))
            groups = ((rows[active] // self.G), self.prompt_generators) if self.prompt_generators is not None else None
            token_A, logp_A = sample_next(logits_BV, self.cfg, self.generator, groups)
            for j, (tok, lp) in enumerate(zip(token_A.tolist(), logp_A.tolist())):
                ep = self.eps[int(rows[active[j]])]
                ep.seq.append(tok)
                ep.model.append(True)
                ep.logp.append(lp)
                ep.turn.append(tok)
            t += 1
            finished_A = torch.isin(token_A, self.stop) | (t >= caps_B[active])
            for j in finished_A.nonzero().squeeze(-1).tolist():
                self._keep_kv(cache, attn_BL, j, int(rows[active[j]]))
            if bool(finished_A.all()):
                return
            if bool(finished_A.any()):
                keep = (~finished_A).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                set_reserve(cache, self.cfg.max_new_tokens - t)
                active, token_A, attn_BL, next_pos_B = active[keep], token_A[keep], attn_BL[keep], next_pos_B[keep]
            attn_BL = torch.cat([attn_BL, attn_BL.new_ones((attn_BL.shape[0], 1))], dim=-1)
            logits_BV = decode_step(self.model, token_A, attn_BL, next_pos_B, cache)
            next_pos_B = next_pos_B + 1

    # ------------------------------------------------------------------------------ the result

    def _result(self, seconds: float) -> Episodes:
        width = max(1, max(len(ep.seq) for ep in self.eps))
        B = len(self.eps)
        ids_BC = torch.full((B, width), self.pad_id, dtype=torch.long, device=self.device)
        mask_BC = torch.zeros((B, width), dtype=torch.long, device=self.device)
        logp_BC = torch.zeros((B, width), dtype=torch.float32, device=self.device)
        for b, ep in enumerate(self.eps):
            n = len(ep.seq)
            ids_BC[b, :n] = torch.tensor(ep.seq, dtype=torch.long)
            mask_BC[b, :n] = torch.tensor(ep.model, dtype=torch.long)
            logp_BC[b, :n] = torch.tensor(ep.logp)
        truncated = [ep.truncated for ep in self.eps]
        rollouts = Rollouts(self.prompt_PL, self.pmask_PL, ids_BC, mask_BC, logp_BC,
                            torch.tensor(truncated, device=self.device), self.G, seconds)
        return Episodes(rollouts, [ep.turns for ep in self.eps], [sum(ep.model) for ep in self.eps],
                        [len(ep.seq) - sum(ep.model) for ep in self.eps], truncated, [ep.cut_turns for ep in self.eps],
                        self.prefilled)
