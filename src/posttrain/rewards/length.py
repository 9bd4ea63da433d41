r"""Soft overlong penalty (DAPO, Yu et al. 2025, eq. 13; TRL `get_soft_overlong_punishment`).

With L = the completion's length in tokens, L_max = `max_len`, L_cache = `buffer`:

    R(L) = 0                                    if L <= L_max - L_cache
           ((L_max - L_cache) - L) / L_cache    if L_max - L_cache < L <= L_max
           -1                                   if L > L_max

so the penalty is 0 under `max_len - buffer` tokens and falls linearly to -1 at `max_len`.
It punishes running long, never rewards being short. Set `max_len` to the generation budget
(`max_new_tokens`): a completion cut off by the budget then gets -1.

How tokens are counted, first that applies:
  1. `completion_ids` (a row column; TRL passes the generated ids under this name): its length;
  2. `tokenizer`: `tokenizer.encode(text, add_special_tokens=False)` for a HF tokenizer, or any
     callable returning a list of ids (or an int count);
  3. otherwise whitespace-separated words, `len(completion.split())`: a rough stand-in (English
     runs ~1.3 tokens per word), so pass a tokenizer or `completion_ids` when lengths matter.
"""

from __future__ import annotations

from posttrain.rewards import as_text

DEFAULT_MAX_LEN = 1024
DEFAULT_BUFFER = 256


def count_tokens(completion, tokenizer=None, completion_ids=None) -> int:
    """Length of a completion in tokens, by the rules in the module docstring."""
    if completion_ids is not None:
        return len(completion_ids)
    text = as_text(completion)
    if tokenizer is None:
        return len(text.split())
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # an encoder without that keyword (e.g. tiktoken)
            ids = tokenizer.encode(text)
        ids = getattr(ids, "ids", ids)  # a `tokenizers.Encoding`
    else:
        ids = tokenizer(text)
    return int(ids) if isinstance(ids, int) else len(ids)


def length_penalty(
    prompt,
    completion,
    max_len: int = DEFAULT_MAX_LEN,
    buffer: int = DEFAULT_BUFFER,
    tokenizer=None,
    completion_ids=None,
    **_,
) -> float:
    """DAPO soft overlong penalty in [-1, 0] (formula and token counting in the module docstring)."""
    if max_len <= 0 or not 0 <= buffer <= max_len:
        raise ValueError(f"length_penalty needs max_len > 0 and 0 <= buffer <= max_len, got {max_len}, {buffer}")
    n = count_tokens(completion, tokenizer, completion_ids)
    free = max_len - buffer
    if n <= free:
        return 0.0
    if n > max_len:
        return -1.0
    return (free - n) / buffer


__all__ = ["length_penalty", "count_tokens", "DEFAULT_MAX_LEN", "DEFAULT_BUFFER"]
