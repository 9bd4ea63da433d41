"""Golden runs: short fixed-seed runs of every trainer, recorded once and compared on every test run.

The refactor of issue 15 (one training loop, one optimizer-step rule, a new layout) promised no
behaviour change: these files were recorded before it, and the same runs must reproduce them.
A golden file holds a run's metrics.jsonl (timings dropped), evals.jsonl and, for each tensor of
each safetensors file in ``final/``, its float64 sum and sum of absolute values.

Float results depend on the CPU kernels torch dispatches to (AVX2 vs AVX512 reductions round
differently, and sampling turns a rounding into another token), so a file is compared only on a
machine with the capability and torch version it was recorded with; elsewhere the test is skipped
with that reason. Re-record (after a change that is meant to change numbers, say why in the
commit) with ``POSTTRAIN_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests -k "golden or distributed"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
RECORD = os.environ.get("POSTTRAIN_RECORD_GOLDEN") == "1"
TIMING = ("time/", "tokens_per_s")


def fingerprint() -> dict:
    import torch

    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(final: Path) -> dict[str, list[float]]:
    """Per tensor: the exact (``math.fsum``, correctly rounded) sum and sum of absolute values. A
    plain float64 sum is not reproducible to the last bit: torch's multi-threaded sum varies from call
    to call, numpy's pairwise sum with the array's memory alignment."""
    import numpy as np
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(final.rglob("*.safetensors")):
        for name, t in sorted(load_file(f).items()):
            values = t.astype(np.float64).reshape(-1).tolist()
            out[f"{f.relative_to(final)}:{name}"] = [math.fsum(values), math.fsum(map(abs, values))]
    return out


def summary(run_dir: Path) -> dict:
    metrics = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in _jsonl(run_dir / "metrics.jsonl")]
    evals = [{k: v for k, v in r.items() if k not in ("seconds", "examples")} for r in _jsonl(run_dir / "evals.jsonl")]
    return {"metrics": metrics, "evals": evals, "weights": _weights(run_dir / "final")}


def _same(a, b, where: str, atol: float) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(set(a) ^ set(b)))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}", atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, len(a), len(b) if isinstance(b, list) else b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", atol)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        if math.isnan(a):
            assert math.isnan(b), (where, a, b)
        else:
            assert abs(a - b) <= atol * max(1.0, abs(a)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def check(name: str, run_dir: Path, atol: float = 0.0) -> None:
    """Compare ``run_dir`` with golden file ``name`` (or record it under POSTTRAIN_RECORD_GOLDEN=1).
    ``atol`` 0 means bit-identical numbers; a test that already compares runs within a tolerance
    passes that tolerance (relative for values above 1)."""
    path = GOLDEN_DIR / f"{name}.json"
    got = summary(Path(run_dir))
    if RECORD:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"recorded_on": fingerprint(), **got}, indent=1) + "\n")
        return
    assert path.is_file(), f"no golden file {path}: record it with POSTTRAIN_RECORD_GOLDEN=1"
    want = json.loads(path.read_text())
    recorded = want.pop("recorded_on")
    if recorded != fingerprint():
        pytest.skip(f"{path.name} was recorded on {recorded}, this machine is {fingerprint()}")
    assert got["metrics"], f"{run_dir}: no metrics"
    _same(want, got, name, atol)
