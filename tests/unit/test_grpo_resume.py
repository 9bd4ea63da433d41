"""A GRPO run killed with SIGKILL after a checkpoint, then resumed, logs the same metrics step for
step as an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMING = ("time/", "tokens_per_s")


def command(model_dir, data, out, name, extra=()):
    return [sys.executable, "-m", "posttrain.cli", "train", "grpo", "--model", model_dir, "--data", data,
            "--reward", "format(pattern=[a-m].*)", "--max-steps", "6", "--group-size", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "3", "--lr", "1e-2", "--beta", "0.04", "--checkpoint-every", "2",
            "--output-dir", str(out), "--name", name, "--seed", "3", *extra]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, peaked_dir, toy_prompts):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(command(peaked_dir, toy_prompts, tmp_path, "straight"), check=True, timeout=600, env=env,
                   capture_output=True)
    proc = subprocess.Popen(command(peaked_dir, toy_prompts, tmp_path, "killed"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "step-2" / "state.json"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the run never wrote its step-2 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_before_kill = len(metrics(tmp_path / "killed"))
    assert done_before_kill < 6, "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "train", "grpo", "--resume", str(tmp_path / "killed")],
                   check=True, timeout=600, env=env, capture_output=True)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == straight
    samples = lambda name: [json.loads(l)["completions"] for l in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
    assert samples("killed") == samples("straight")
