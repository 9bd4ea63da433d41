"""On-policy distillation on the real embedded model (SmolLM2-135M-Instruct): the per-token reverse
KL to a teacher falls.

The teacher is made here, cheaply and for real: the embedded model with its final norm's weight
doubled, i.e. the base model's next-token distributions at temperature 1/2 (a sharper, more
confident version of the student, sharing its tokenizer), saved as a model directory and passed
as ``--teacher``. The student (LoRA on the base model, sampling at temperature 1) must sharpen to
match it: the reverse KL estimate, the mean of log pi_student - log pi_teacher over the sampled
tokens, falls. Task: two-digit addition prompts (the task's reward is reported, not trained on).

Measured (seed 0, 10 steps of 4 prompts x 4 completions, 16 tokens, LoRA r16, lr 3e-4): the reverse
KL went 0.82, 0.63, 0.20, ... 0.08, 0.13 nats/token (first three steps' mean 0.55, last three 0.11)
and the agreement with the teacher's argmax 0.54 -> 0.83; 10 minutes on a 2-core machine at load
average 5 (steps of ~55 s; not timed on an idle machine).
"""

import pytest
import torch

from posttrain.algorithms.distill import DistillConfig, train_distill


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory) -> str:
    from posttrain.models import load_model

    path = tmp_path_factory.mktemp("sharp-teacher")
    model, tok = load_model()
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reverse_kl_to_the_teacher_falls(tmp_path, sharp_teacher):
    res = train_distill(DistillConfig(
        teacher=sharp_teacher, task="arithmetic", task_size=64, eval_size=0, max_steps=10, prompts_per_step=4,
        group_size=4, max_new_tokens=16, lr=3e-4, lora_rank=16, output_dir=str(tmp_path), name="distill",
        checkpoint_every=0, eval_at_start=False, log_every=100, seed=0))
    kl = [m["distill/reverse_kl"] for m in res.history]
    agree = [m["distill/agreement"] for m in res.history]
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert len(kl) == 10
    assert last < 0.7 * first, kl
    assert sum(agree[-3:]) > sum(agree[:3]), agree
    assert "reward/mean" in res.history[-1]
