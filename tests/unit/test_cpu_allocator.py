"""Freed memory kept for reuse (`cpu_allocator`): after it, freeing and re-allocating a large
tensor no longer page-faults; trainers apply it at start unless told not to; a user's own
allocator settings win. Each check runs in a fresh process (the setting is per process)."""

import json
import os
import subprocess
import sys

CHURN = """
import json, resource, sys, torch
from posttrain.runtime import cpu_allocator
from posttrain.algorithms import common
from posttrain.algorithms.grpo import GRPOConfig

def churn():  # allocate, touch and free a 64 MB tensor (above glibc's largest mmap threshold) 5 times
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.ones(16 * 2**20)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f

before = churn()
common.start(GRPOConfig(data="unused", device="cpu", cpu_memory=sys.argv[1]))
for _ in range(3):  # the heap grows to hold the tensor with glibc's alignment slack (a few rounds)
    churn()
print(json.dumps({"applied": cpu_allocator._applied, "tuned": cpu_allocator.user_tuned(),
                  "before": before, "after": churn()}))
"""


def _run(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    clean.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", CHURN, mode], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
    r = _run("retain")
    assert r["applied"] and r["tuned"] is None
    # glibc's defaults map each 64 MB tensor fresh: ~16k faults of 4 KB apiece (fewer with huge pages)
    assert r["before"] > 0
    assert r["after"] <= max(r["before"] // 20, 50), r


def test_release_keeps_glibc_defaults():
    r = _run("release")
    assert not r["applied"]
    assert r["after"] > max(r["before"] // 4, 1), r  # still faulting on every re-allocation


def test_a_users_allocator_setting_wins():
    r = _run("retain", MALLOC_ARENA_MAX="2")
    assert not r["applied"] and r["tuned"] == "MALLOC_ARENA_MAX"
