"""A GRPO run killed with SIGKILL again and again, at the fault points of ``runtime/faults.py`` (after
sampling, after the update, in the middle of a checkpoint write, in the middle of a metrics line)
and at random wall-clock times, then resumed each time with ``posttrain train grpo --resume RUN``
and nothing else, ends with the same metrics and the same final weights as a run never stopped.
Only the CLI touches the run directory: nothing is ever edited by hand."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

STEPS = 8
FAULTS = ("collect:2", "update:2", "checkpoint.write:2", "metrics.write:2", "checkpoint.write:1")
"""Each one kills one process of the killed run, in this order (N: the N-th arrival in that process)."""
RANDOM_KILLS = 3


def command(model: str, data: str, out: Path, name: str) -> list[str]:
    return ["train", "grpo", "--model", model, "--data", data, "--reward", "format(pattern=[a-m].*)",
            "--max-steps", str(STEPS), "--checkpoint-every", "1", "--group-size", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "8", "--lr", "1e-2", "--device", "cpu", "--rollout-dtype", "float32",
            "--no-eval-at-start", "--seed", "3", "--output-dir", str(out), "--name", name]


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings (every line must be JSON: no torn line may remain)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def test_sigkill_anywhere_then_resume_matches_the_uninterrupted_run(tmp_path, peaked_dir, toy_prompts):
    import time

    t0 = time.time()
    straight = terminal.posttrain(*command(peaked_dir, toy_prompts, tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    whole = time.time() - t0
    run_dir = tmp_path / "killed"
    resume = ("train", "grpo", "--resume", str(run_dir))

    first = terminal.posttrain(*command(peaked_dir, toy_prompts, tmp_path, "killed"), env={"POSTTRAIN_FAULT": FAULTS[0]})
    assert killed(first), first.stderr[-2000:]
    seen = {"tmp": False, "torn": False}
    for fault in FAULTS[1:]:
        proc = terminal.posttrain(*resume, env={"POSTTRAIN_FAULT": fault})
        assert killed(proc), f"{fault}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert not (run_dir / "final").exists()
        seen["tmp"] |= any((run_dir / "checkpoints").glob(".tmp-step-*"))
        seen["torn"] |= not (run_dir / "metrics.jsonl").read_text().endswith("\n")
    assert seen == {"tmp": True, "torn": True}, "the faults did not leave what they should"

    rng = random.Random(16)
    kills = 0
    for _ in range(RANDOM_KILLS):
        try:
            proc = terminal.posttrain(*resume, timeout=rng.uniform(1.0, whole))
        except subprocess.TimeoutExpired:  # subprocess.run SIGKILLs the child on a timeout
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr[-2000:]
        break
    final = terminal.posttrain(*resume)
    assert final.returncode == 0, final.stderr[-3000:]

    assert metrics(run_dir) == metrics(tmp_path / "straight")
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    mine = load_file(run_dir / "final" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    samples = lambda d: [json.loads(x)["completions"] for x in (d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(run_dir) == samples(tmp_path / "straight")
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))
    resumes = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) >= len(FAULTS) and all(r["changes"] == {} for r in resumes)
    print(f"{len(FAULTS)} kills at fault points, {kills} at random times, {len(resumes)} resumes")
