"""DPO's data side: preference pairs -> token ids (with a stated truncation policy), packed
padding-free batches, and the sequence log-probs of chosen and rejected in one forward.

Tokenization. The prompt is encoded exactly as for generation (``data.encode_prompt``: the chat
template with the generation prompt). A completion is what the template adds after that prompt
when the completion is appended as the assistant's message(s), up to and including the final
end-of-turn token (text the template writes after it, such as a newline, is not scored). A
plain-string completion under a template is treated as one assistant message, so the string and
the conversational form of a pair give the same completion tokens. Without a template (plain
prompts, ``chat_template=False``) the completion is the text followed by the EOS token, as in TRL.

Truncation (``truncate_pair``), counted in ``TruncationStats`` and reported, never silent: a pair
is over-long when prompt + its longer completion exceeds ``max_length``. Then the prompt keeps its
last ``max_prompt_length`` tokens (the end, nearest the answer), and each completion keeps its
first ``max_length - len(prompt)`` tokens. With ``mode="drop"`` over-long pairs are dropped
instead. A pair whose completions are token-identical (after truncation) carries no signal and is
dropped, also counted.

Packing (``pack``). Chosen and rejected share their prompt, so a pair is laid out once as
``prompt + chosen + rejected`` in one packed row, with position ids restarting after the prompt
for the rejected part and a custom attention mask in which rejected tokens see the prompt and
themselves but not the chosen tokens (prefix sharing: the prompt is computed once per pair,
forward and backward). Several pairs go in one row (block-diagonal mask), rows hold up to
``row_tokens`` tokens (first-fit decreasing), and only rows are padded. The last token of each
completion is never fed (no position is predicted from it). For attention backends that take no
custom mask (FlashAttention), ``share_prompt=False`` packs prompt+chosen and prompt+rejected as
separate sequences told apart by their position ids alone (transformers builds the
block-diagonal mask, or uses varlen kernels). Log-probs come from the model's trunk and a chunked
output head (``logprobs.head_logprobs``) at the scored positions only: no [B, T, V] logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Literal, Sequence

import torch

from posttrain.data import DataError, encode_prompt
from posttrain.data.chat import completion_text
from posttrain.models.split import split_model
from posttrain.objectives.logprobs import DEFAULT_CHUNK_SIZE, head_logprobs, selective_log_softmax
from posttrain.runtime.config import refuse

CHOSEN, REJECTED = 0, 1


@dataclasses.dataclass
class PairExample:
    """One tokenized pair; ``index`` is its row in the dataset (and in the reference table)."""

    index: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def shared_length(self) -> int:
        """Tokens fed for this pair with prefix sharing (each completion's last token is not fed)."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected) - 2


@dataclasses.dataclass
class TruncationStats:
    pairs: int = 0
    """Pairs read."""
    over_length: int = 0
    """Pairs whose prompt + longer completion exceeded max_length."""
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    dropped_over_length: int = 0
    """Dropped: mode 'drop', or no room left for any completion token."""
    dropped_identical: int = 0
    """Dropped: chosen and rejected are the same tokens (after truncation)."""

    @property
    def kept(self) -> int:
        return self.pairs - self.dropped_over_length - self.dropped_identical

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "kept": self.kept}

    def summary(self) -> str:
        return (f"{self.kept}/{self.pairs} pairs kept; over max_length: {self.over_length} (prompt truncated "
                f"{self.prompt_truncated}, chosen {self.chosen_truncated}, rejected {self.rejected_truncated}, "
                f"dropped {self.dropped_over_length}); identical completions dropped: {self.dropped_identical}")


# ----------------------------------------------------------------------------------------- tokenize


def encode_pair(tokenizer, row: dict, chat_template: bool = True) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of a preference row."""
    prompt = row["prompt"]
    ids = encode_prompt(tokenizer, prompt, chat_template)
    out = []
    for field in ("chosen", "rejected"):
        try:
            text = completion_text(tokenizer, prompt, row[field], chat_template)
        except ValueError as e:
            raise ValueError(f"field '{field}': {e}") from None
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, out[0], out[1]


def truncate_pair(p: list[int], c: list[int], r: list[int], max_length: int, max_prompt_length: int,
                  mode: str, stats: TruncationStats):
    """Apply the truncation policy; returns (p, c, r) or None when the pair is dropped."""
    if len(p) + max(len(c), len(r)) > max_length:
        stats.over_length += 1
        if mode == "drop":
            stats.dropped_over_length += 1
            return None
        if len(p) > max_prompt_length:
            p = p[-max_prompt_length:]
            stats.prompt_truncated += 1
        room = max_length - len(p)
        if room < 1:
            stats.dropped_over_length += 1
            return None
        if len(c) > room:
            c, stats.chosen_truncated = c[:room], stats.chosen_truncated + 1
        if len(r) > room:
            r, stats.rejected_truncated = r[:room], stats.rejected_truncated + 1
    if c == r:
        stats.dropped_identical += 1
        return None
    return p, c, r


def check_lengths(config) -> None:
    """A DPO or reward-model config's truncation lengths: ``max_prompt_length < max_length``."""
    if config.max_prompt_length >= config.max_length:
        raise refuse("max_prompt_length", f"max_prompt_length ({config.max_prompt_length}) must be < max_length "
                     f"({config.max_length}): an over-long pair keeps room for its completions", "max_length")


def encode_pairs(tokenizer, rows: Sequence[dict], chat_template: bool = True, max_length: int = 1024,
                 max_prompt_length: int = 512, mode: Literal["truncate", "drop"] = "truncate",
                 source: str = "<rows>", first_index: int = 0) -> tuple[list[PairExample], TruncationStats]:
    """Tokenize and truncate preference rows. Errors name the source, the 1-based row and the field."""
    if max_length < 2 or max_prompt_length < 1 or max_prompt_length >= max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length (got {max_prompt_length}, {max_length})")
    stats = TruncationStats()
    out: list[PairExample] = []
    for i, row in enumerate(rows):
        try:
            p, c, r = encode_pair(tokenizer, row, chat_template)
        except ValueError as e:
            msg = str(e)
            field = msg.split("'")[1] if msg.startswith("field '") else "prompt"
            raise DataError(source, i + 1, field, msg.split(": ", 1)[-1], unit="row") from None
        stats.pairs += 1
        kept = truncate_pair(p, c, r, max_length, max_prompt_length, mode, stats)
        if kept is not None:
            out.append(PairExample(first_index + i, *kept))
    return out, stats


def fingerprint(examples: Sequence[PairExample], *extra: Any) -> str:
    """A hash of the token ids (and ``extra``): the reference table is reused only when it matches."""
    h = hashlib.sha256(repr(extra).encode())
    for e in examples:
        h.update(repr((e.index, e.prompt, e.chosen, e.rejected)).encode())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------- pack


@dataclasses.dataclass
class Packed:
    """A packed batch of pairs. Scored token n is ``token_N[n]``, predicted from the hidden state
    at (``row_N[n]``, ``pred_N[n]``), and belongs to sequence ``seq_N[n]`` = 2 * pair + (0 chosen,
    1 rejected)."""

    input_ids_RL: torch.Tensor
    position_ids_RL: torch.Tensor
    mask_RLL: torch.Tensor | None
    """Who attends to whom (True = attend); None = packed sequences told apart by position ids."""
    row_N: torch.Tensor
    pred_N: torch.Tensor
    token_N: torch.Tensor
    seq_N: torch.Tensor
    lengths_P2: torch.Tensor
    """Completion tokens of each pair's chosen and rejected, [P, 2]."""
    n_tokens: int
    """Real (non-pad) tokens fed."""

    @property
    def n_pairs(self) -> int:
        return self.lengths_P2.shape[0]


def _segments(e: PairExample, share_prompt: bool):
    """[(tokens, positions, parts, scored)] where parts: 0 prompt, 1 chosen, 2 rejected, and scored
    is a list of (predictor offset within the segment, token, which)."""
    p, c, r = e.prompt, e.chosen, e.rejected
    P = len(p)
    if share_prompt:
        toks = p + c[:-1] + r[:-1]
        pos = list(range(P)) + list(range(P, P + len(c) - 1)) + list(range(P, P + len(r) - 1))
        parts = [0] * P + [1] * (len(c) - 1) + [2] * (len(r) - 1)
        scored = [(P - 1 + j, t, CHOSEN) for j, t in enumerate(c)]
        r0 = P + len(c) - 1  # first rejected input token's offset
        scored += [((P - 1) if j == 0 else r0 + j - 1, t, REJECTED) for j, t in enumerate(r)]
        return [(toks, pos, parts, scored)]
    out = []
    for which, comp in ((CHOSEN, c), (REJECTED, r)):
        toks = p + comp[:-1]
        out.append((toks, list(range(len(toks))), [0] * P + [1] * (len(comp) - 1),
                    [(P - 1 + j, t, which) for j, t in enumerate(comp)]))
    return out


def pack(examples: Sequence[PairExample], pad_id: int, share_prompt: bool = True, row_tokens: int = 0,
         device: torch.device | str = "cpu") -> Packed:
    """Pack pairs into rows of at most ``row_tokens`` tokens (0 = one row; a longer pair gets a row
    of its own). With ``share_prompt`` the mask implements prefix sharing (module docstring)."""
    segs = []  # (pair index, segment)
    for k, e in enumerate(examples):
        if not e.chosen or not e.rejected or not e.prompt:
            raise ValueError(f"pair {e.index}: empty prompt or completion")
        segs += [(k, s) for s in _segments(e, share_prompt)]
    longest = max(len(s[0]) for _, s in segs)
    cap = max(longest, row_tokens) if row_tokens > 0 else sum(len(s[0]) for _, s in segs)
    rows: list[list[tuple[int, Any]]] = []
    fill: list[int] = []
    for k, s in sorted(segs, key=lambda ks: -len(ks[1][0])) if row_tokens else segs:
        for i in range(len(rows)):
            if fill[i] + len(s[0]) <= cap:
                rows[i].append((k, s))
                fill[i] += len(s[0])
                break
        else:
            rows.append([(k, s)])
            fill.append(len(s[0]))
    R, L = len(rows), max(fill)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg_id = torch.empty((R, L), dtype=torch.long)
    part = torch.full((R, L), 3, dtype=torch.long)
    row_n, pred_n, tok_n, seq_n = [], [], [], []
    sid = 0
    for ri, row in enumerate(rows):
        off = 0
        for k, (toks, ps, parts, scored) in row:
            n = len(toks)
            ids[ri, off:off + n] = torch.tensor(toks)
            pos[ri, off:off + n] = torch.tensor(ps)
            part[ri, off:off + n] = torch.tensor(parts)
            seg_id[ri, off:off + n] = sid
            sid += 1
            for pred, t, which in scored:
                row_n.append(ri)
                pred_n.append(off + pred)
                tok_n.append(t)
                seq_n.append(2 * k + which)
            off += n
        pad = L - off
        if pad:  # each pad token its own segment: it attends only to itself (no all-masked rows)
            seg_id[ri, off:] = torch.arange(sid, sid + pad)
            pos[ri, off:] = torch.arange(pad) if not share_prompt else 0
            sid += pad
    mask = None
    if share_prompt:
        causal = torch.ones((L, L), dtype=torch.bool).tril_()
        mask = (seg_id[:, :, None] == seg_id[:, None, :]) & causal[None]
        mask &= ~((part[:, :, None] == 2) & (part[:, None, :] == 1))  # rejected does not see chosen
    lengths = torch.tensor([[len(e.chosen), len(e.rejected)] for e in examples], dtype=torch.long)
    dev = torch.device(device)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    return Packed(ids.to(dev), pos.to(dev), None if mask is None else mask.to(dev), t(row_n), t(pred_n), t(tok_n),
                  t(seq_n), lengths.to(dev), int(sum(fill)))


# ----------------------------------------------------------------------------------------- forward


def _attn_impl(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def supports_shared_prompt(model) -> bool:
    """Custom 4D masks reach the attention of these backends unchanged."""
    return _attn_impl(model) in ("sdpa", "eager")


def _model_mask(model, mask_RLL: torch.Tensor | None, dtype: torch.dtype):
    if mask_RLL is None:
        return None
    mask = mask_RLL[:, None]
    if _attn_impl(model) == "sdpa":
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)  # eager adds the mask to the scores


def scored_logprobs(model, input_ids_RL: torch.Tensor, position_ids_RL: torch.Tensor, attention_mask,
                    row_N: torch.Tensor, pred_N: torch.Tensor, token_N: torch.Tensor,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Log-prob of each scored token ``token_N[n]``, predicted from the hidden state at (``row_N[n]``,
    ``pred_N[n]``) of packed rows: the trunk's forward, then the chunked output head at those
    positions only (no [R, L, V] logits); differentiable when grad is enabled. ``attention_mask``
    is given to the model as it is (``_model_mask``'s 4D mask, a 2D padding mask, or None)."""
    split = split_model(model)
    kw = {"input_ids": input_ids_RL, "position_ids": position_ids_RL, "use_cache": False,
          "attention_mask": attention_mask}
    if isinstance(split, str):  # no separable head: full logits, then the scored rows only
        logits = model(**kw).logits
        return selective_log_softmax(logits[row_N, pred_N], token_N)
    trunk, head, transform = split
    out = trunk(**kw)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    logp_N, _ = head_logprobs(head, hidden[row_N, pred_N], token_N, chunk_size, transform=transform)
    return logp_N


def pair_logprobs(model, batch: Packed, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Summed log-probs of each pair's chosen and rejected completion, [P, 2] (differentiable when
    grad is enabled)."""
    split = split_model(model)
    dtype = next(model.parameters()).dtype
    mask = _model_mask(model if isinstance(split, str) else split[0], batch.mask_RLL, dtype)
    logp_N = scored_logprobs(model, batch.input_ids_RL, batch.position_ids_RL, mask, batch.row_N, batch.pred_N,
                             batch.token_N, chunk_size)
    sums = logp_N.new_zeros(2 * batch.n_pairs).index_add(0, batch.seq_N, logp_N)
    return sums.view(-1, 2)


def batches_by_tokens(examples: Sequence[PairExample], max_tokens: int) -> list[list[PairExample]]:
    """Consecutive groups of pairs of about ``max_tokens`` fed tokens each (at least one pair)."""
    out: list[list[PairExample]] = [[]]
    total = 0
    for e in examples:
        if out[-1] and total + e.shared_length > max_tokens:
            out.append([])
            total = 0
        out[-1].append(e)
        total += e.shared_length
    return [b for b in out if b]


@torch.no_grad()
def sequence_logps(model, examples: Sequence[PairExample], pad_id: int, share_prompt: bool = True,
                   batch_tokens: int = 4096, row_tokens: int = 256) -> dict[int, tuple[float, float]]:
    """No-grad [chosen, rejected] summed log-probs of every pair, keyed by pair index (large batches)."""
    training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device
    out: dict[int, tuple[float, float]] = {}
    try:
        for b in batches_by_tokens(examples, batch_tokens):
            lp = pair_logprobs(model, pack(b, pad_id, share_prompt, row_tokens, device)).cpu()
            out.update({e.index: (float(lp[i, 0]), float(lp[i, 1])) for i, e in enumerate(b)})
    finally:
        model.train(training)
    return out
