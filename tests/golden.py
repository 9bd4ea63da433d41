"""Golden runs: short fixed-seed runs of every trainer, recorded once and compared on every test run.

The refactor of issue 15 (one training loop, one optimizer-step rule, a new layout) promised no
behaviour change: these files were recorded before it, and the same runs must reproduce them.
A golden file holds a run's metrics.jsonl (timings dropped), evals.jsonl and, for each tensor of
each safetensors file in ``final/``, its float64 sum and sum of absolute values.

Float results depend on the CPU kernels torch dispatches to (AVX2 vs AVX512 reductions round
differently, and sampling turns a rounding into another token), and two CPUs of the same
capability can still differ in the last bit (measured: an AVX512 Xeon of model 167 with AMX and
the one the top-level files were recorded on). So a file is compared only on a machine with the
torch version, capability and CPU model it was recorded with: ``golden/<cpu model>/<name>.json``
where this machine's model has a recording, else the top-level ``golden/<name>.json`` (recorded
before the model was written down: it holds no ``cpu_model`` and is taken on any CPU of its
capability without a folder of its own); elsewhere the test is skipped with that reason. Re-record (after a change that is meant to change numbers, say why in the
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

    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model()}


def cpu_model() -> str:
    """``vendor-family-model`` from /proc/cpuinfo (e.g. ``GenuineIntel-6-167``), else the platform's name."""
    import platform

    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    parts = [fields.get(k) for k in ("vendor_id", "cpu family", "model")]
    return "-".join(parts) if all(parts) else platform.processor() or platform.machine()


def golden_path(name: str) -> Path:
    """This machine's recording of ``name`` if its CPU model has one, else the top-level file."""
    own = GOLDEN_DIR / cpu_model() / f"{name}.json"
    return own if own.is_file() or RECORD else GOLDEN_DIR / f"{name}.json"


def same_machine(recorded: dict) -> bool:
    """A recording applies here when every key it holds matches (the top-level files hold no cpu_model)."""
    here = fingerprint()
    return all(here.get(k) == v for k, v in recorded.items())


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
    path = golden_path(name)
    got = summary(Path(run_dir))
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"recorded_on": fingerprint(), **got}, indent=1) + "\n")
        return
    assert path.is_file(), f"no golden file {path}: record it with POSTTRAIN_RECORD_GOLDEN=1"
    want = json.loads(path.read_text())
    recorded = want.pop("recorded_on")
    if not same_machine(recorded):
        pytest.skip(f"{path.name} was recorded on {recorded}, this machine is {fingerprint()}")
    assert got["metrics"], f"{run_dir}: no metrics"
    _same(want, got, name, atol)
