"""Tasks from reasoning-gym (PyPI `reasoning-gym`): its ~100 procedural generators as prompt sets.

    --task "reasoning_gym(chain_sum, min_terms=3, max_terms=3)"

`reasoning_gym_rows(n, seed, split="train", dataset=..., **config)` -> rows
{"prompt", "answer", "metadata"}, scored by the `reasoning_gym` reward (`rewards.reasoning_gym`),
which calls the dataset's own `score_answer` on the final answer we extract.

Where we depart from reasoning-gym's own use:
  * the prompt is its question plus our one-line instruction to put the answer after 'Answer:'
    (as the built-in tasks do), so one extractor serves every task; reasoning-gym leaves
    extraction to the caller;
  * splits: reasoning-gym has none (a seed and a size). We draw items 0, 1, 2, ... of the
    dataset seeded with `seed` and keep those whose question hashes into the split
    (`posttrain.data.tasks.in_split`, 1 in 10 to `test`), so no test question appears in any
    train set of the same options; test rows are distinct, train rows may repeat;
  * options are the fields of the dataset's config (`seed` and `size` excepted), checked for
    name and type, then by the config's own `validate()`, before anything is generated.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from posttrain.data.tasks import TaskError, in_split

INSTRUCTION = "Put the final answer after 'Answer:'."
_OWN = ("seed", "size")  # config fields we set ourselves
_SCAN = 20  # indices scanned per row wanted, at most (the test split keeps 1 in 10)


def _registry() -> dict[str, tuple[type, type]]:
    from reasoning_gym.factory import DATASETS

    return DATASETS


def _field_type(field: dataclasses.Field) -> type | None:
    """int, float, bool or str for a config field (Optional[...] unwrapped), else None."""
    kind = field.type
    if typing.get_origin(kind) is typing.Union:
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else None
    return kind if kind in (int, float, bool, str) else None


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is kind


def check(options: dict[str, Any]) -> None:
    """Refuse (TaskError) a missing or unknown dataset, an option its config lacks, a value of the
    wrong type, or values its config's `validate()` rejects."""
    config = dict(options)
    dataset = config.pop("dataset", None)
    known = _registry()
    if not isinstance(dataset, str) or not dataset:
        raise TaskError("task 'reasoning_gym' needs a dataset: reasoning_gym(chain_sum, min_terms=3); "
                        f"{len(known)} are installed (see reasoning_gym.factory.DATASETS)")
    if dataset not in known:
        near = difflib.get_close_matches(dataset, known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise TaskError(f"task reasoning_gym: no dataset {dataset!r} in reasoning-gym{hint}")
    config_cls = known[dataset][1]
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.name not in _OWN}
    for key, value in config.items():
        if key not in fields:
            raise TaskError(f"task reasoning_gym({dataset}) has no option {key!r} (it takes: {', '.join(fields)})")
        kind = _field_type(fields[key])
        if kind is None:
            raise TaskError(f"task reasoning_gym({dataset}) option {key}: its type {fields[key].type} "
                            "cannot be given on the command line")
        if not _fits(value, kind):
            raise TaskError(f"task reasoning_gym({dataset}) option {key}={value!r}: must be {kind.__name__}")
    try:
        config_cls(**config, seed=0, size=1).validate()
    except (AssertionError, ValueError, TypeError) as e:
        raise TaskError(f"task reasoning_gym({dataset}): {e or 'options rejected by its config'}") from e


def reasoning_gym_rows(n: int, seed: int, split: str = "train", dataset: str = "", **config) -> list[dict]:
    """`n` rows of `dataset` for `split` (rules in the module docstring)."""
    check({"dataset": dataset, **config})
    import reasoning_gym

    limit = _SCAN * n + 200
    items = reasoning_gym.create_dataset(dataset, seed=seed, size=limit, **config)
    rows, seen = [], set()
    for idx in range(limit):
        if len(rows) == n:
            break
        entry = items[idx]
        question = str(entry["question"])
        if not in_split(question, split) or (split == "test" and question in seen):
            continue
        seen.add(question)
        rows.append({"prompt": f"{question}\n{INSTRUCTION}", "answer": str(entry["answer"]),
                     "metadata": _plain(entry.get("metadata", {}))})
    if len(rows) < n:
        raise TaskError(f"task reasoning_gym({dataset}): only {len(rows)} distinct {split} problems in the "
                        f"first {limit} items with these options; ask for fewer (n={n}) or widen the options")
    return rows


def _plain(value: Any) -> Any:
    """Metadata as JSON values (tuples to lists), so rows save and reload unchanged."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["check", "reasoning_gym_rows", "INSTRUCTION"]
