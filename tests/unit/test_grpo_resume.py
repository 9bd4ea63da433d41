"""A GRPO run killed with SIGKILL after a checkpoint, then resumed, logs the same metrics step for
step as an uninterrupted run with the same seed."""

import json
import os
import sys

import pytest


def command(model_dir, data, out, name, extra=()):
    return [sys.executable, "-m", "posttrain.cli", "train", "grpo", "--model", model_dir, "--data", data,
            "--reward", "format(pattern=[a-m].*)", "--max-steps", "6", "--group-size", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "3", "--lr", "1e-2", "--beta", "0.04", "--checkpoint-every", "2",
            "--output-dir", str(out), "--name", name, "--seed", "3", *extra]


# full fine-tuning: the frozen reference copy must hold the initial weights after a resume, not the
# checkpoint's (the KL after step 2 would differ)
@pytest.mark.parametrize("extra", [(), ("--no-lora",)], ids=["lora", "full"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, peaked_dir, toy_prompts, kill_and_resume, extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight, resumed = kill_and_resume(lambda name: command(peaked_dir, toy_prompts, tmp_path, name, extra), "grpo",
                                        tmp_path, env)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == straight
    samples = lambda name: [json.loads(l)["completions"] for l in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
    assert samples("killed") == samples("straight")
