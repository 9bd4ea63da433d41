"""Measuring a real training step's memory: the counterpart of `posttrain.doctrine.memory.estimate`.

``measure(...)`` runs a few GRPO-style steps of a real model in a fresh process
(``python -m posttrain.doctrine.measure``) and returns the growth of its peak RSS over the RSS after
loading; ``tests/integration/test_memory_real.py`` compares it with ``estimate(device="cpu")``.
`posttrain.doctrine.memory` re-exports ``measure``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _rss_bytes(field: str = "VmRSS") -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _measure_worker(spec: str, lora_rank: int, micro_batch: int, prompt_len: int, completion_len: int,
                    steps: int) -> dict[str, Any]:
    import gc
    import resource

    import torch

    from posttrain.objectives.logprobs import completion_logprobs
    from posttrain.models import add_lora, load_model

    torch.set_num_threads(1)
    model, _ = load_model(spec)
    if lora_rank:
        model = add_lora(model, rank=lora_rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    g = torch.Generator().manual_seed(0)
    B, T = micro_batch, prompt_len + completion_len
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    completion_mask[:, prompt_len:] = 1
    adv = torch.randn(B, generator=g)
    with torch.no_grad():  # page in weights that are still memory-mapped from the safetensors file
        for p in model.parameters():
            p.sum()
    gc.collect()
    base = _rss_bytes() or 0
    reset = _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(steps):  # a GRPO-style update: chunked log-probs, policy gradient, AdamW
        logp = completion_logprobs(model, ids, torch.ones_like(ids), completion_mask)
        loss = -(logp * adv[:, None]).sum() / completion_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_rss": base, "peak_rss": peak, "growth": peak - base, "peak_reset": reset,
            "maxrss_before_steps": maxrss_before, "trainable": sum(p.numel() for p in params)}


def measure(model: str = "smollm2-135m-instruct", lora_rank: int = 0, micro_batch: int = 4, prompt_len: int = 64,
            completion_len: int = 64, steps: int = 2, timeout: float = 300) -> dict[str, Any]:
    """Run ``steps`` real training steps in a fresh process and return its peak RSS growth over the
    RSS after loading (bytes, key ``growth``): the measured counterpart of ``estimate(device='cpu')``
    minus the weights already loaded."""
    import subprocess
    import sys

    import os

    args = json.dumps([model, lora_rank, micro_batch, prompt_len, completion_len, steps])
    # freed tensors go back to the OS at once, so peak RSS is peak allocated memory (as
    # torch.cuda.max_memory_allocated on a GPU) rather than glibc's heap fragmentation
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "posttrain.doctrine.measure", args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import sys

    print(json.dumps(_measure_worker(*json.loads(sys.argv[1]))))
