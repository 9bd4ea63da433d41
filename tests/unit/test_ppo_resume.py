"""A PPO run killed with SIGKILL after a checkpoint, then resumed, logs the same metrics step for
step as an uninterrupted run with the same seed: the policy adapter, the critic (its own LoRA
adapter and head), the optimizer, the adaptive KL coefficient, the minibatch order and the
sampler all come back exactly."""

import json
import os
import sys


def command(model_dir, data, out, name):
    # LoRA with the critic on a second adapter (the default); adaptive KL with a short horizon so
    # the coefficient moves every step; 2 epochs x 2 minibatches so the shuffled order matters
    return [sys.executable, "-m", "posttrain.cli", "train", "ppo", "--model", model_dir, "--data", data,
            "--reward", "format(pattern=[a-m].*)", "--max-steps", "6", "--group-size", "2", "--prompts-per-step", "4",
            "--max-new-tokens", "3", "--lr", "1e-2", "--value-lr", "1e-2", "--kl-target", "0.5", "--kl-horizon", "20",
            "--ppo-epochs", "2", "--minibatches", "2", "--checkpoint-every", "2", "--no-eval-at-start",
            "--output-dir", str(out), "--name", name, "--seed", "3"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, peaked_dir, toy_prompts, kill_and_resume):
    # one intra-op thread: the tiny model gains nothing from two on a shared machine (see test_ppo)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    straight, resumed = kill_and_resume(lambda name: command(peaked_dir, toy_prompts, tmp_path, name), "ppo",
                                        tmp_path, env)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    kl_coefs = [m["kl_coef"] for m in straight]
    assert len(set(kl_coefs)) == 6, kl_coefs  # the adaptive coefficient moved every step
    assert all(m["value_grad_norm"] > 0 for m in straight)
    assert resumed == straight
    samples = lambda name: [json.loads(l)["completions"] for l in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
    assert samples("killed") == samples("straight")
    # the checkpoint carries the critic: its adapter in HF format and its tensors with the optimizer
    step = tmp_path / "straight" / "checkpoints" / "step-6"
    assert (step / "value" / "adapter_model.safetensors").is_file()
    import torch

    state = torch.load(step / "optimizer.pt", weights_only=False)
    assert set(state["value"]) == {"weights", "head"} and state["value"]["weights"]
