"""What the side-by-side benchmarks share: each measurement runs in a child process of its own
(``run_child``: the same script with ``--child SPEC``, one JSON line back), the model's weights
are paged in before memory is measured (``touch``), and TRL's steps are timed by a callback
(``trl_timer``) as ours are by the loop's ``time/step``.

A child gets ``OMP_NUM_THREADS`` from its spec, ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns
freed blocks >= 128 KiB at once, so RSS follows live memory) and no tokenizer threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_child(script: str, spec: dict, keep_errors: bool = False) -> dict:
    """Run ``script --child SPEC`` and return its last stdout line as JSON. A failed child stops the
    benchmark with its stderr, or, with ``keep_errors``, returns ``{"error": its last line}`` (a
    table row that says why)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MALLOC_MMAP_THRESHOLD_="131072",
               TOKENIZERS_PARALLELISM="false")
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
