"""Judging by probability: a rating as the expected rating under the judge's distribution, a
comparison as the probability of each verdict, instead of one sampled answer parsed.

G-Eval (Liu et al. 2023) weights each rating by the probability the judge gives its token and
renormalises over the valid rating tokens only: score = sum_r r * p(r) / sum_r p(r). That needs
no parsing (a judge that would have rambled still has a distribution over "1".."10" where the
rating goes), gives a continuous reward (two responses rated "7" by sampling differ as 6.8 and
7.3), and ties only when the probabilities are equal. The same holds for a pairwise verdict:
p(A) / (p(A) + p(B)) where the verdict goes.

Where the probabilities come from (a :class:`Probe` says what is measured):
- ``local`` backend: the judge's reply is *prefilled* with the verdict line's start
  (``rating_prefix`` "Rating:", ``verdict_prefix`` "Winner:") right after the prompt, and the exact
  probability of each label's token sequence is computed by teacher forcing
  (:func:`label_logprobs`; a label spanning several tokens, "10" = "1" "0" with SmolLM2's digit
  splitting, is the product of its tokens' probabilities, and a label that is a prefix of another,
  "1" of "10", takes in addition the probability that no digit or letter follows it). One forward
  pass of the prompt per request and per trie path (one for a 1-10 scale), no generation.
- OpenAI-compatible servers (``logprobs: true, top_logprobs: k``): the reply is sampled as usual;
  the verdict is found in it by the parser (:func:`verdict_position`) and the top-k alternatives of
  the token there are read (:func:`labels_from_top_logprobs`). Labels outside the top k count as 0.
  A label that is a prefix of another ("1" of "10", with a digit-splitting tokenizer) is split
  with the next token's alternatives only along the sampled path; elsewhere it stays the shorter label.

Departures: G-Eval asks for the rating alone, with the chain of thought before it produced once in
a separate step; the local backend here prefills the verdict line right after the prompt, so the
judge gives no reasoning first (the template still asks for one sentence: it is skipped). Over
HTTP the reasoning is sampled first and the probabilities are read where the sampled verdict sits,
so a reply with no verdict in a recognised form has no place to read them and falls back to
parsing (then it is unparsable). TRL's judges (``PairRMJudge``, ``OpenAIPairwiseJudge``) parse one
sampled answer or use a dedicated reward model; none reads the judge's token probabilities.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

from posttrain.rlaif.parse import parse_rating, parse_verdict

VERDICT_LABELS = ("A", "B")
_STRIP = " \t\n\r*_`\"'[(:="


@dataclasses.dataclass(frozen=True)
class Probe:
    """What to measure for a request: the distribution over `labels` where the verdict goes.

    `kind` is "rating" (labels are the integer ratings of the scale, as text) or "verdict" ("A",
    "B"); `prefix` is the start of the verdict line the local backend prefills; `lo`, `hi` the
    rating scale (to find the rating in a sampled reply)."""

    kind: str
    prefix: str
    labels: tuple[str, ...]
    lo: float = 0.0
    hi: float = 0.0

    def key(self) -> list:
        """What makes a probe's answers differ (part of the cache key)."""
        return [self.kind, self.prefix, list(self.labels)]


def rating_labels(lo: float, hi: float) -> tuple[str, ...]:
    """The integer ratings of the scale [lo, hi] as text ("1".."10"); G-Eval's scales are integers."""
    return tuple(str(r) for r in range(math.ceil(lo), math.floor(hi) + 1))


def renormalise(logprobs: dict[str, float]) -> dict[str, float]:
    """Probabilities over the labels only (softmax of their log-probs); {} when none has mass."""
    finite = {k: v for k, v in logprobs.items() if v is not None and math.isfinite(v)}
    if not finite:
        return {}
    top = max(finite.values())
    weights = {k: math.exp(v - top) for k, v in finite.items()}
    total = sum(weights.values())
    return {k: weights.get(k, 0.0) / total for k in logprobs}


def expected_rating(probs: dict[str, float]) -> float:
    """sum_r r * p(r) over renormalised probabilities (labels are numbers as text)."""
    return sum(float(label) * p for label, p in probs.items())


# ------------------------------------------------------------------ local: exact label probabilities


def label_continuations(tokenizer, prefix: str, labels: Sequence[str]) -> list[list[int]]:
    """The token ids each label adds after `prefix` as the model would write it ("Rating:" + " 7"):
    the ids of ``prefix + " " + label`` after those of ``prefix`` (or of ``" " + label`` alone when
    the prefix does not tokenize as a prefix of the whole)."""
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for label in labels:
        whole = tokenizer(f"{prefix} {label}", add_special_tokens=False)["input_ids"]
        if whole[:len(head)] == head and len(whole) > len(head):
            out.append(whole[len(head):])
        else:
            out.append(tokenizer(f" {label}", add_special_tokens=False)["input_ids"])
    return out


def continuing_tokens(tokenizer) -> list[int]:
    """Ids of tokens that would continue a label ("0" after "1", "pple" after "A"): their text starts
    with a letter, a digit or '.'."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if text[:1].isalnum() or text[:1] == "."]


def trie_paths(conts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[bool]]:
    """(paths to run after the context, whether each label needs a stop probability).

    Label k needs the next-token distribution after each proper prefix of its ids, and, when its
    ids are a proper prefix of another label's, after all of them (to take the probability that it
    ends there). A forward pass over a path gives the distributions after all of its prefixes, so
    only paths that are not a prefix of another are run."""
    ids = [tuple(c) for c in conts]
    needs_stop = [any(len(o) > len(c) and o[:len(c)] == c for o in ids) for c in ids]
    wanted = {c if stop else c[:-1] for c, stop in zip(ids, needs_stop)}
    paths = sorted(p for p in wanted if not any(len(q) > len(p) and q[:len(p)] == p for q in wanted))
    return paths, needs_stop


def label_logprobs(model, contexts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]],
                   continuing: Sequence[int], batch_size: int = 16) -> list[list[float]]:
    """log p(label k | context i) for every context and label, by teacher forcing (see the module
    docstring): ``out[i][k]``. Only the positions needed go through the output head."""
    import torch

    from posttrain.models.split import split_model

    paths, needs_stop = trie_paths(conts)
    device = next(model.parameters()).device
    split = split_model(model)
    seqs = [(i, p) for i in range(len(contexts)) for p in paths]
    dists: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # (context, node) -> log-probs [V]
    pad = 0
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            rows = [list(contexts[i]) + list(p) for i, p in chunk]
            T = max(len(r) for r in rows)
            ids_BT = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)
            mask_BT = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
            # positions whose next-token distribution is needed: the context's last, then each path token
            where = [(b, len(contexts[i]) - 1 + j, (i, p[:j]))
                     for b, (i, p) in enumerate(chunk) for j in range(len(p) + 1)]
            b_N = torch.tensor([w[0] for w in where], device=device)
            t_N = torch.tensor([w[1] for w in where], device=device)
            if isinstance(split, str):
                logits_NV = model(input_ids=ids_BT, attention_mask=mask_BT).logits[b_N, t_N]
            else:
                hidden_BTH = split.trunk(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state
                logits_NV = split.head(hidden_BTH[b_N, t_N])
                if split.transform is not None:
                    logits_NV = split.transform(logits_NV)
            logp_NV = torch.log_softmax(logits_NV.float(), dim=-1).cpu()
            for n, (_, _, node) in enumerate(where):
                dists[node] = logp_NV[n]
    cont_idx = torch.tensor(list(continuing), dtype=torch.long)
    out = []
    for i in range(len(contexts)):
        row = []
        for c, stop in zip(conts, needs_stop):
            c = tuple(c)
            lp = sum(float(dists[(i, c[:j])][c[j]]) for j in range(len(c)))
            if stop:
                go = float(torch.logsumexp(dists[(i, c)][cont_idx], 0)) if len(cont_idx) else -math.inf
                lp += math.log(max(1e-30, -math.expm1(go)))  # log(1 - p(a continuing token))
            row.append(lp)
        out.append(row)
    return out


# ------------------------------------------------------------------ HTTP: top log-probs of a sampled reply


def tokens_of(logprobs: Any) -> Optional[list]:
    """The compact form kept of an OpenAI ``choice.logprobs``: ``[[token, logprob, [[alt, logprob],
    ...]], ...]``, or None when the server sent none (llm-katan, many gateways)."""
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if not content:
        return None
    return [[t.token, float(t.logprob), [[a.token, float(a.logprob)] for a in (t.top_logprobs or [])]]
            for t in content]


def verdict_position(text: str, probe: Probe) -> Optional[int]:
    """Where, in `text`, the verdict the parser reads starts (the last standalone occurrence of the
    parsed rating or verdict word), or None when the reply holds none."""
    if probe.kind == "rating":
        value = parse_rating(text, probe.lo, probe.hi)
        if value is None:
            return None
        number = str(int(value)) if float(value).is_integer() else f"{value:g}"
        pattern = rf"(?<![\d.]){re.escape(number)}(?:\.0+)?(?![\d.])"
    else:
        verdict = parse_verdict(text)
        if verdict is None:
            return None
        pattern = {"a": r"\bA\b", "b": r"\bB\b", "tie": r"(?i)\btie\b"}[verdict.winner]
    found = list(re.finditer(pattern, text))
    return found[-1].start() if found else None


def _label_of(token: str, labels: Sequence[str]) -> Optional[str]:
    text = token.strip(_STRIP)
    return text if text in labels else None


def labels_from_top_logprobs(tokens: list, probe: Probe) -> Optional[dict[str, float]]:
    """log p of each label at the verdict's token of a sampled reply (the compact form of
    :func:`tokens_of`), or None when the reply has no verdict or no label is among the top
    alternatives there."""
    text = "".join(t[0] for t in tokens)
    pos = verdict_position(text, probe)
    if pos is None:
        return None
    offset, index = 0, None
    for n, (token, _, _) in enumerate(tokens):
        if offset <= pos < offset + len(token):
            index = n
            break
        offset += len(token)
    if index is None:
        return None
    token, logprob, alts = tokens[index]
    alts = alts if any(a == token for a, _ in alts) else [*alts, [token, logprob]]
    mass: dict[str, list[float]] = {}
    for alt, lp in alts:
        label = _label_of(alt, probe.labels)
        if label is not None:
            mass.setdefault(label, []).append(lp)
    if not mass:
        return None
    out = {label: _logsumexp(mass[label]) if label in mass else -math.inf for label in probe.labels}
    sampled = _label_of(token, probe.labels)
    longer = [l for l in probe.labels if sampled and len(l) > len(sampled) and l.startswith(sampled)]
    if longer and index + 1 < len(tokens):  # "1" sampled, "10" possible: split with the next token
        _, next_lp, next_alts = tokens[index + 1]
        next_alts = next_alts or [[tokens[index + 1][0], next_lp]]
        base, cont = out[sampled], 0.0
        for alt, lp in next_alts:
            whole = sampled + alt.strip()
            if alt[:1].isalnum() or alt[:1] == ".":
                cont += math.exp(lp)
                if whole in longer:
                    out[whole] = _logsumexp([out[whole], base + lp])
        out[sampled] = base + math.log(max(1e-30, 1.0 - cont))
    return out


def _logsumexp(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def read_probabilities(extra: Optional[dict], reply: Optional[str], probe: Probe) -> Optional[dict[str, float]]:
    """The renormalised label probabilities of one answered request, or None when the backend gave
    no usable probabilities (then the reply is parsed)."""
    if not extra:
        return None
    if extra.get("logprobs") is not None:
        logprobs = dict(zip(probe.labels, extra["logprobs"]))
    elif extra.get("tokens"):
        logprobs = labels_from_top_logprobs(extra["tokens"], probe)
    else:
        return None
    probs = renormalise(logprobs) if logprobs else {}
    return probs or None
