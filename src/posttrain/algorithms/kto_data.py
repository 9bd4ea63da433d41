"""KTO's data side: unpaired examples {prompt, completion, label} (or pairs, split in two) -> token
ids, each with the mismatched completion of its KL pair, laid out so DPO's packing, forward and
reference table serve KTO unchanged.

Examples. An unpaired row gives one example; a paired row {prompt, chosen, rejected} gives two:
(prompt, chosen, desirable) and (prompt, rejected, undesirable). An example's ``row`` is the row it
came from (the held-out split is by rows, so both halves of a pair land on the same side).

KL pairs (the reference point z0, ``losses.kto_loss``). The paper and TRL estimate the KL term
from the batch's prompts each paired with another example's completion (TRL's ``_get_kl_dataset``
rolls the completions of a batch by one). Here the pairing is fixed once, before training, so the
reference log-probs of the KL pairs can be precomputed with the others: the rows are put in a
seeded random order and each row's example takes, as its KL completion, the completion of the
same slot (chosen / rejected; unpaired: the one) of the next row in that order (the last takes the
first's). So a prompt is never paired with its own row's completion, and every completion serves
once as another prompt's KL completion (TRL 1.16 also fixes the KL completions in its dataset, by
rolling them by one within each batch, and then needs sequential sampling; a fixed pairing over all
rows lets ours keep its shuffled order). The estimate averages over the micro-batch's KL pairs,
detached; departure: under several processes each uses its own (TRL averages the processes' estimates).

Layout. A ``KTOExample`` is a ``dpo_data.PairExample`` whose "chosen" is the example's completion
and whose "rejected" is its KL completion: the two share the prompt in one packed forward
(``dpo_data.pack``), and the reference table stores [completion, KL completion] log-probs. The KL
completion of a held-out example may come from a training row and the other way round; its log-prob
enters the loss only through z0, which is detached, so no gradient trains on a held-out completion.

Truncation: an example is over-long when prompt + completion exceeds ``max_length``; the prompt keeps
its last ``max_prompt_length`` tokens and the completion its first ``max_length - len(prompt)`` (or
the example is dropped with ``mode="drop"``), counted in ``KTOStats``. The KL completion is cut to
the same room silently (it only estimates z0).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch

from posttrain.algorithms.dpo_data import PairExample
from posttrain.data import DataError, encode_prompt
from posttrain.data.chat import completion_text


@dataclasses.dataclass
class KTOExample(PairExample):
    """``chosen`` = the completion, ``rejected`` = the KL pair's completion (module docstring)."""

    desirable: bool = True
    row: int = 0


@dataclasses.dataclass
class KTOStats:
    rows: int = 0
    examples: int = 0
    desirable: int = 0
    over_length: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped_over_length: int = 0

    @property
    def kept(self) -> int:
        return self.examples - self.dropped_over_length

    # the names dpo._encode reads from DPO's TruncationStats
    @property
    def dropped_identical(self) -> int:
        return 0

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "kept": self.kept}

    def summary(self) -> str:
        return (f"{self.kept}/{self.examples} KTO examples kept ({self.desirable} desirable) from {self.rows} rows; "
                f"over max_length: {self.over_length} (prompt truncated {self.prompt_truncated}, completion "
                f"{self.completion_truncated}, dropped {self.dropped_over_length})")


def split_rows(rows: Sequence[dict]) -> list[tuple[int, object, object, bool]]:
    """(row, prompt, completion, desirable) of every example: pairs give two, unpaired rows one."""
    out = []
    for i, row in enumerate(rows):
        if "chosen" in row:
            out += [(i, row["prompt"], row["chosen"], True), (i, row["prompt"], row["rejected"], False)]
        else:
            out.append((i, row["prompt"], row["completion"], bool(row["label"])))
    return out


def kl_partners(examples: Sequence[tuple[int, object, object, bool]], seed: int) -> list[int]:
    """For each example, the index of the example whose completion is its KL completion: the same
    slot of the next row in a seeded order of the rows (module docstring)."""
    by_row: dict[int, list[int]] = {}
    for k, (row, *_) in enumerate(examples):
        by_row.setdefault(row, []).append(k)
    rows = sorted(by_row)
    order = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()]
    nxt = {r: order[(j + 1) % len(order)] for j, r in enumerate(order)}
    partner = []
    for k, (row, *_) in enumerate(examples):
        slot = by_row[row].index(k)
        other = by_row[nxt[row]]
        partner.append(other[min(slot, len(other) - 1)])
    return partner


def encode_kto(tokenizer, rows: Sequence[dict], chat_template: bool = True, max_length: int = 1024,
               max_prompt_length: int = 512, mode: Literal["truncate", "drop"] = "truncate",
               source: str = "<rows>", seed: int = 0) -> tuple[list[KTOExample], KTOStats]:
    """Tokenize KTO rows (unpaired, or pairs split in two), fix the KL pairs, truncate. Errors name
    the source, the 1-based row and the field."""
    if max_length < 2 or max_prompt_length < 1 or max_prompt_length >= max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length (got {max_prompt_length}, {max_length})")
    examples = split_rows(rows)
    if len({e[0] for e in examples}) < 2:
        raise DataError(source, None, None, "KTO needs at least 2 rows: its reference point pairs each prompt "
                        "with another row's completion")
    stats = KTOStats(rows=len(rows), examples=len(examples), desirable=sum(e[3] for e in examples))
    ids = []
    for row, prompt, completion, _ in examples:
        field = "completion" if "completion" in rows[row] else ("chosen" if completion is rows[row]["chosen"] else "rejected")
        try:
            p = encode_prompt(tokenizer, prompt, chat_template)
            text = completion_text(tokenizer, prompt, completion, chat_template)
        except ValueError as e:
            raise DataError(source, row + 1, field, str(e), unit="row") from None
        ids.append((p, tokenizer(text, add_special_tokens=False)["input_ids"]))
    partner = kl_partners(examples, seed)
    out = []
    for k, ((row, _, _, good), (p, c)) in enumerate(zip(examples, ids)):
        if len(p) + len(c) > max_length:
            stats.over_length += 1
            if mode == "drop":
                stats.dropped_over_length += 1
                continue
            if len(p) > max_prompt_length:
                p, stats.prompt_truncated = p[-max_prompt_length:], stats.prompt_truncated + 1
            if len(c) > max_length - len(p):
                c, stats.completion_truncated = c[:max_length - len(p)], stats.completion_truncated + 1
        kl = ids[partner[k]][1][:max_length - len(p)]
        out.append(KTOExample(k, p, c, kl, desirable=good, row=row))
    return out, stats


def labels_of(batch: Sequence[KTOExample]) -> torch.Tensor:
    return torch.tensor([e.desirable for e in batch], dtype=torch.bool)


def pair_accuracy(reward_P: torch.Tensor, batch: Sequence[KTOExample]) -> float | None:
    """For examples split from pairs: the share of pairs (rows with a desirable and an undesirable
    example) whose desirable completion has the larger implicit reward; None when there are none."""
    by_row: dict[int, dict[bool, float]] = {}
    for r, e in zip(reward_P.tolist(), batch):
        by_row.setdefault(e.row, {})[e.desirable] = r
    pairs = [(d[True], d[False]) for d in by_row.values() if len(d) == 2]
    return sum(a > b for a, b in pairs) / len(pairs) if pairs else None
