"""SFT's data side: TRL's three SFT formats -> token ids with the tokens to train on, truncation,
and packing into padding-free rows.

Tokenization (``encode_row``), as the model meets the text when it generates, so SFT trains the
same tokens that sampling, DPO and the evaluation see:
- ``{"prompt", "completion"}``: the prompt is encoded exactly as for generation
  (``data.encode_prompt``), the completion as the text it adds after that prompt
  (``data.chat.completion_text``: the assistant turn up to its end-of-turn token; the text and
  EOS without a template). Trained: the completion's tokens.
- ``{"messages"}``: the conversation rendered by the chat template and cut into pieces at each
  assistant turn: the text before a turn is the template's rendering of the earlier messages with
  the generation prompt; the turn is what the next rendering adds, up to its end-of-turn token.
  Each piece is tokenized on its own (the generation prompt is a token boundary, as in sampling).
  Trained: the assistant turns' tokens. A template that renders earlier turns differently once
  later ones follow (one that drops earlier ``<think>`` blocks) cannot be cut so; such a row is
  an error naming it, and ``--loss-on all`` trains on its full rendering.
- ``{"text"}``: the tokenizer's encoding (with its BOS, if it adds one) and EOS. Trained: all.
With ``loss_on="all"`` every token but the first is trained, whatever the format (TRL's
``completion_only_loss=False``; its ``assistant_only_loss`` is our default for messages).

Truncation: an example keeps its first ``max_length`` tokens (TRL's ``keep_start``); one left with
no token to train on is dropped. Both are counted (``SFTStats``) and reported, never silent.

Packing (``pack``): padding-free (``packing=True``) puts examples one after another into rows of
up to ``row_tokens`` tokens (first-fit decreasing; a longer example gets a row of its own). With
``row_tokens=0`` the width is chosen per batch: of the widths from the longest example's length up
to one row holding the whole batch, the one whose rows cost least, rows x width x (1 + width /
``ATTENTION_WIDTH``): the linear layers cost per token fed, pad or not, and attention per token
per key (``_best_rows``). The longest example's width is always a candidate, so packing never
feeds more tokens than padding; on varied lengths it fills rows far better (bench data: 98% real
tokens against 77% at the longest example's width). Rows have
position ids restarting at each example and a block-diagonal causal mask, so no example attends
to another (for attention backends that take no custom mask, FlashAttention, the position ids
alone tell the examples apart). Padded (``packing=False``) gives each example its own row,
right-padded to the batch's longest, with a 2D padding mask, as TRL's default collator does.
The last token of an example is not fed (nothing is predicted from it); log-probs are taken at
the trained positions only (``dpo_data.scored_logprobs``: no [R, L, V] logits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import torch

from posttrain.algorithms.dpo_data import _model_mask, scored_logprobs, supports_shared_prompt
from posttrain.data import DataError, encode_prompt, row_form
from posttrain.data.chat import completion_text
from posttrain.objectives.logprobs import DEFAULT_CHUNK_SIZE

LossOn = Literal["completion", "all"]


@dataclasses.dataclass
class SFTExample:
    """One tokenized example: ``ids``, and ``target[t]`` True when token t is trained (predicted
    from position t - 1; ``target[0]`` is always False). ``index`` is its row in the dataset."""

    index: int
    ids: list[int]
    target: list[bool]

    @property
    def n_targets(self) -> int:
        return sum(self.target)

    @property
    def fed(self) -> int:
        """Tokens fed (the last is not)."""
        return len(self.ids) - 1


@dataclasses.dataclass
class SFTStats:
    """What encoding did to the rows (written to ``data.json``, printed when non-zero)."""

    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.truncated} of {self.rows} examples truncated to max_length, {self.dropped_no_target} dropped "
                "(no token left to train on)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- tokenize


def _render(tok, messages: list, generation_prompt: bool = False) -> str:
    """The chat template's text; a template's own refusal (roles that must alternate, ...) as a ValueError."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, or whatever a template raises
        raise ValueError(f"the chat template refused the conversation: {e}") from None


def _end_of_turn(tok, text: str) -> int:
    """Where an assistant turn's scored text ends: after its last EOS when only whitespace follows."""
    eos = tok.eos_token
    if eos and (k := text.rfind(eos)) >= 0 and not text[k + len(eos):].strip():
        return k + len(eos)
    return len(text)


def message_pieces(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is an assistant turn) pieces (module docstring)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("conversational data, but the tokenizer has no chat template")
    full = _render(tok, messages)
    pieces, at = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation opens with an assistant message: there is no prompt to cut it from; "
                             "start with a user (or system) message, or train on every token with --loss-on all")
        before, upto = _render(tok, messages[:i], True), _render(tok, messages[:i + 1])
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= at):
            raise ValueError(f"the chat template renders message {i} (assistant) differently once later messages "
                             "follow (it may drop earlier turns' reasoning), so its tokens cannot be cut out; train "
                             "on every token with --loss-on all, or give one row per assistant turn")
        end = len(before) + _end_of_turn(tok, upto[len(before):])
        pieces += [(full[at:len(before)], False), (full[len(before):end], True)]
        at = end
    pieces.append((full[at:], False))
    return [p for p in pieces if p[0]]


def encode_row(tok, row: dict, chat_template: bool = True, loss_on: LossOn = "completion") -> tuple[list[int], list[bool]]:
    """(token ids, trained flags) of one SFT row (module docstring)."""
    form = row_form(row, "sft")
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if form == "sft_text":
        ids = tok(row["text"])["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        target = [True] * len(ids)
    elif form == "sft_pc":
        prompt = encode_prompt(tok, row["prompt"], chat_template)
        completion = enc(completion_text(tok, row["prompt"], row["completion"], chat_template))
        ids, target = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    elif loss_on == "all":
        ids = enc(_render(tok, row["messages"]))
        target = [True] * len(ids)
    else:
        ids, target = [], []
        for text, trained in message_pieces(tok, row["messages"]):
            piece = enc(text)
            ids += piece
            target += [trained] * len(piece)
    if loss_on == "all":
        target = [True] * len(ids)
    return ids, [False] + target[1:] if ids else []


def encode_examples(tok, rows: Sequence[dict], chat_template: bool = True, loss_on: LossOn = "completion",
                    max_length: int = 1024, source: str = "<rows>") -> tuple[list[SFTExample], SFTStats]:
    """Tokenize and truncate SFT rows. Errors name the source, the 1-based row and the field."""
    stats = SFTStats()
    out: list[SFTExample] = []
    for i, row in enumerate(rows):
        try:
            ids, target = encode_row(tok, row, chat_template, loss_on)
        except ValueError as e:
            field = {"sft": "messages", "sft_pc": "completion", "sft_text": "text"}[row_form(row, "sft")]
            raise DataError(source, i + 1, field, str(e), unit="row") from None
        stats.rows += 1
        if len(ids) > max_length:
            ids, target = ids[:max_length], target[:max_length]
            stats.truncated += 1
        if len(ids) < 2 or not any(target):
            stats.dropped_no_target += 1
            continue
        out.append(SFTExample(i, ids, target))
        stats.tokens += len(ids)
        stats.target_tokens += sum(target)
    return out, stats


def prompt_of(row: dict) -> Any:
    """The prompt an SFT row answers, for the greedy evaluation: a prompt-completion row's prompt, a
    conversation's messages before its last assistant turn; None for ``{"text"}`` rows."""
    form = row_form(row, "sft")
    if form == "sft_pc":
        return row["prompt"]
    if form == "sft":
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        return row["messages"][:last] or None
    return None


# ----------------------------------------------------------------------------------------- pack


@dataclasses.dataclass
class Packed:
    """A batch of examples in rows. Trained token n is ``token_N[n]``, predicted from the hidden
    state at (``row_N[n]``, ``pred_N[n]``)."""

    input_ids_RL: torch.Tensor
    position_ids_RL: torch.Tensor
    mask: torch.Tensor | None
    """Padding-free: who attends to whom, [R, L, L] (True = attend), or None (position ids alone);
    padded: the [R, L] padding mask."""
    row_N: torch.Tensor
    pred_N: torch.Tensor
    token_N: torch.Tensor
    n_tokens: int
    """Real (non-pad) tokens fed."""


def _rows(examples: Sequence[SFTExample], cap: int) -> list[list[SFTExample]]:
    """First-fit decreasing by tokens fed, rows of at most ``cap`` (a longer example: its own row)."""
    rows: list[list[SFTExample]] = []
    fill: list[int] = []
    for e in sorted(examples, key=lambda e: -e.fed):
        k = next((i for i in range(len(rows)) if fill[i] + e.fed <= cap), None)
        if k is None:
            rows.append([])
            fill.append(0)
            k = len(rows) - 1
        rows[k].append(e)
        fill[k] += e.fed
    return rows


ATTENTION_WIDTH = 3072
"""Row width at which attention costs as much per token as the linear layers: SmolLM2-135M spends
4 x 576 FLOPs per token per key and 2 x 3.5M per token per layer. Larger models reach it at wider
rows (Llama-8B: ~27k), so this constant errs toward narrow rows."""


def _row_cost(rows: list[list[SFTExample]]) -> float:
    width = max(sum(e.fed for e in row) for row in rows)
    return len(rows) * width * (1 + width / ATTENTION_WIDTH)


def _best_rows(examples: Sequence[SFTExample]) -> list[list[SFTExample]]:
    """The cheapest first-fit-decreasing rows over widths from the longest example to the whole batch."""
    longest, total = max(e.fed for e in examples), sum(e.fed for e in examples)
    widths = sorted({longest} | {max(longest, -(-total // r)) for r in range(1, len(examples) + 1)})
    return min((_rows(examples, w) for w in widths), key=_row_cost)  # ties: the narrowest


def pack(examples: Sequence[SFTExample], pad_id: int, packing: bool = True, row_tokens: int = 0,
         custom_mask: bool = True, device: torch.device | str = "cpu") -> Packed:
    """Lay out ``examples`` in rows, padding-free or padded (module docstring)."""
    if not packing:
        rows = [[e] for e in examples]
    else:
        rows = _rows(examples, max(row_tokens, max(e.fed for e in examples))) if row_tokens else _best_rows(examples)
    R, L = len(rows), max(sum(e.fed for e in row) for row in rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), -1, dtype=torch.long)
    row_n, pred_n, tok_n = [], [], []
    sid = 0
    for r, row in enumerate(rows):
        off = 0
        for e in row:
            n = e.fed
            ids[r, off:off + n] = torch.tensor(e.ids[:-1])
            pos[r, off:off + n] = torch.arange(n)
            seg[r, off:off + n] = sid
            sid += 1
            for t in range(1, len(e.ids)):
                if e.target[t]:
                    row_n.append(r)
                    pred_n.append(off + t - 1)
                    tok_n.append(e.ids[t])
            off += n
    real = seg >= 0
    if not packing:
        mask = real.long()
    elif custom_mask:  # each pad token its own segment: it attends only to itself (no all-masked rows)
        seg = torch.where(real, seg, sid + torch.arange(R * L).view(R, L))
        mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones((L, L), dtype=torch.bool).tril_()[None]
    else:
        mask = None
    dev = torch.device(device)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    return Packed(ids.to(dev), pos.to(dev), None if mask is None else mask.to(dev), t(row_n), t(pred_n), t(tok_n),
                  int(real.sum()))


def token_logprobs(model, batch: Packed, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Log-probs of the batch's trained tokens, [N] (differentiable when grad is enabled)."""
    dtype = next(model.parameters()).dtype
    mask = batch.mask if batch.mask is None or batch.mask.dim() == 2 else _model_mask(model, batch.mask, dtype)
    return scored_logprobs(model, batch.input_ids_RL, batch.position_ids_RL, mask, batch.row_N, batch.pred_N,
                           batch.token_N, chunk_size)


def takes_custom_mask(model) -> bool:
    """Whether a block-diagonal 4D mask reaches the model's attention (sdpa, eager)."""
    return supports_shared_prompt(model)
