"""What the side-by-side benchmarks share: each measurement runs in a child process of its own
(``run_child``: the same script with ``--child SPEC``, one JSON line back), the model's weights
are paged in before memory is measured (``touch``), and TRL's steps are timed by a callback
(``trl_timer``) as ours are by the loop's ``time/step``.

``measure_ours`` instruments one of our trainers the same way in every benchmark: memory is counted
from after the model has loaded and been paged in, and each step's process-CPU time from the first
backward pass to the optimizer update.

A child gets ``OMP_NUM_THREADS`` from its spec and no tokenizer threads; and
``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns freed blocks >= 128 KiB at once, so RSS follows
live memory) unless its spec says ``"measure": "time"``: every large allocation then page-faults
afresh, which slowed both sides' SFT steps by 60-100% on the 2-core machine, so a benchmark that
reads time and memory runs one child for each (as ``grpo_vs_trl.py`` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from peak_memory import reset_peak, status_kb  # bench/peak_memory.py


def run_child(script: str, spec: dict, keep_errors: bool = False) -> dict:
    """Run ``script --child SPEC`` and return its last stdout line as JSON. A failed child stops the
    benchmark with its stderr, or, with ``keep_errors``, returns ``{"error": its last line}`` (a
    table row that says why)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    if spec.get("measure") != "time":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        if keep_errors:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        raise SystemExit(f"child {spec.get('impl')}/{spec.get('mode')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def touch(model) -> None:
    """Read every weight once: safetensors are memory-mapped, and pages first read during the
    first step would otherwise count as that trainer's memory."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def trl_timer(times: list, cpu: list):
    """A transformers ``TrainerCallback`` appending each step's wall and process-CPU seconds."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    return Timer()


@contextlib.contextmanager
def measure_ours(trainer_module, step_module):
    """While inside, ``common.load_policy`` resets the peak-memory counter once the model is loaded
    and paged in (``state["base"]``: RSS then; ``state["method"]``: how the peak is read), and
    ``trainer_module.accumulate`` .. ``step_module.step_optimizer`` is timed in process-CPU seconds
    (``state["cpu"]``, one entry per step). Yields ``state``; the patched functions are restored."""
    import posttrain.algorithms.common as common

    state: dict = {"cpu": []}
    load, accumulate, step = common.load_policy, trainer_module.accumulate, step_module.step_optimizer

    def load_and_reset(*a, **k):  # the baseline: the model loaded (and paged in), nothing else
        model, tok = load(*a, **k)
        touch(model)
        state["base"], state["method"] = status_kb("VmRSS"), reset_peak()
        return model, tok

    def timed_accumulate(*a, **k):
        state["c0"] = time.process_time()
        return accumulate(*a, **k)

    def timed_step(*a, **k):
        try:
            return step(*a, **k)
        finally:
            state["cpu"].append(time.process_time() - state["c0"])

    common.load_policy, trainer_module.accumulate, step_module.step_optimizer = load_and_reset, timed_accumulate, timed_step
    try:
        yield state
    finally:
        common.load_policy, trainer_module.accumulate, step_module.step_optimizer = load, accumulate, step
