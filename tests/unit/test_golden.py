"""Every trainer reproduces its golden run (tests/golden.py): short fixed-seed runs of GRPO with each
advantage estimator (LoRA and full fine-tuning, several micro-batches, two iterations per batch,
the entropy bonus), DPO (sigmoid and IPO), the reward model and PPO (adapter and separate critic,
adaptive KL), recorded before the one-loop refactor. The two-process DDP and FSDP cases are
checked against their golden files in test_distributed.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import golden  # noqa: E402

WORKER = Path(__file__).with_name("golden_worker.py")
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light"]
TOY_REWARD = "format(pattern=[a-m].*)"


def specs(peaked: str, tiny: str, prompts: str, pairs: str, out: Path) -> dict[str, dict]:
    common = dict(output_dir=str(out), eval_at_start=True, log_every=100, device="cpu", seed=3,
                  rollout_dtype="float32")
    grpo = dict(common, model=peaked, data=prompts, reward=TOY_REWARD, max_steps=3, group_size=4, prompts_per_step=2,
                max_new_tokens=3, lr=1e-3, lora=True, beta=0.04, eval_fraction=0.25, checkpoint_every=2)
    dpo = dict(common, model=tiny, data=pairs, lora=True, lr=1e-3, batch_size=4, micro_batch_size=2, max_steps=3,
               eval_fraction=0.25, checkpoint_every=0)
    rm = dict(common, model=tiny, data=pairs, lora=True, lr=3e-3, batch_size=4, max_steps=3, eval_fraction=0.25,
              eval_batch_size=2, checkpoint_every=0)
    ppo = dict(common, model=peaked, data=prompts, reward=TOY_REWARD, max_steps=2, group_size=2, prompts_per_step=4,
               max_new_tokens=3, lr=1e-3, value_lr=1e-3, lora=True, kl_coef=0.1, ppo_epochs=2, minibatches=2,
               eval_fraction=0.25, checkpoint_every=0)
    runs = {
        "grpo-lora": ("grpo", dict(grpo, warmup_steps=1, schedule="cosine")),
        "grpo-full": ("grpo", dict(grpo, lora=False, lr=1e-4, micro_batch_prompts=0)),
        "dr_grpo-lora": ("grpo", dict(grpo, advantage="dr_grpo", reduce="seq-mean-token-sum-norm")),
        "rloo-lora": ("grpo", dict(grpo, advantage="rloo", beta=0.0, reduce="seq-mean-token-mean")),
        "reinforce_pp-lora": ("grpo", dict(grpo, advantage="reinforce_pp", beta=0.01)),
        "grpo-iterations": ("grpo", dict(grpo, num_iterations=2, scale_rewards="batch", entropy_coef=0.01,
                                         clip_high=0.28)),
        "dpo-lora": ("dpo", dpo),
        "dpo-full-ipo": ("dpo", dict(dpo, lora=False, lr=1e-4, loss_type="ipo", micro_batch_size=0)),
        "rm-lora": ("rm", rm),
        "rm-full": ("rm", dict(rm, lora=False, lr=1e-4, center_coef=0.01)),
        "ppo-lora": ("ppo", ppo),
        "ppo-full": ("ppo", dict(ppo, lora=False, lr=1e-4, value_lr=1e-4, value_model="separate", kl_target=1.0,
                                 kl_horizon=100.0, minibatches=1)),
    }
    return {name: {"method": m, "config": {**c, "name": name}} for name, (m, c) in runs.items()}


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory, peaked_dir, tiny_dir) -> tuple[Path, dict]:
    """Every single-process golden run, in one subprocess with one thread."""
    tmp = tmp_path_factory.mktemp("golden")
    prompts, pairs = tmp / "prompts.jsonl", tmp / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say a word like {w}."}) + "\n" for w in WORDS))
    pairs.write_text("".join(json.dumps({"prompt": f"Say the word {w}.", "chosen": w,
                                         "rejected": f"No, here is {WORDS[i - 1]} instead."}) + "\n"
                             for i, w in enumerate(WORDS)))
    runs = specs(peaked_dir, tiny_dir, str(prompts), str(pairs), tmp / "runs")
    path = tmp / "specs.json"
    path.write_text(json.dumps(list(runs.values())))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP")}
    proc = subprocess.run([sys.executable, str(WORKER), str(path)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "runs", runs


NAMES = ["grpo-lora", "grpo-full", "dr_grpo-lora", "rloo-lora", "reinforce_pp-lora", "grpo-iterations", "dpo-lora",
         "dpo-full-ipo", "rm-lora", "rm-full", "ppo-lora", "ppo-full"]


@pytest.mark.parametrize("name", NAMES)
def test_trainer_reproduces_its_golden_run(golden_runs, name):
    out, runs = golden_runs
    assert set(runs) == set(NAMES)
    golden.check(f"single-{name}", out / name)
