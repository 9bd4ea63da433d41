"""A reward model, then PPO against it, on the real embedded model (SmolLM2-135M-Instruct, CPU).

1. `train rm` on the built-in arithmetic preference set (`tasks.arithmetic_prefs`: a correct
   answer in the requested "Answer: <n>" format against a wrong one; in half the pairs the wrong
   one also ignores the format, in the other half only the number differs). Held-out accuracy is
   reported overall and per half: in this budget (20 steps of 8 pairs, LoRA r16) the model learns
   the format cue; telling a right sum from a near miss in the same words stays near chance.
2. PPO (LoRA policy, the critic on its own adapter, doctrine defaults for the clip, KL, value and
   entropy coefficients and GAE) with that reward model as the reward raises the mean reward-model
   score of greedy completions on held-out prompts, while the KL to the reference stays below a
   stated bound: mean per-token KL < 0.3 nats and mean per-sequence KL < 6 nats (Ziegler et al.'s
   target) over the last three steps.

Measured on a shared 2-core machine (see the numbers printed with -s).
"""

import pytest

from posttrain.algorithms.ppo import PPOConfig, train_ppo
from posttrain.algorithms.reward_model import RewardModelConfig, load_reward_model, train_reward_model
from posttrain.data.tasks.arithmetic_prefs import arithmetic_preferences

pytestmark = pytest.mark.integration

KL_TOKEN_BOUND = 0.3
KL_SEQ_BOUND = 6.0


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    return train_reward_model(RewardModelConfig(task="arithmetic", task_size=400, eval_size=32, output_dir=str(out),
                                                name="rm", max_steps=20, batch_size=8, lr=1e-3, lora_rank=16,
                                                center_coef=0.01, checkpoint_every=0, log_every=5))


def test_reward_model_learns_the_arithmetic_preferences(rm_run):
    before, after = rm_run.evals[0], rm_run.evals[-1]
    rows = arithmetic_preferences(32, 0, "test")
    rm = load_reward_model(rm_run.run_dir)
    prompts = [r["prompt"] for r in rows]
    chosen = rm.score(prompts, [r["chosen"] for r in rows])
    rejected = rm.score(prompts, [r["rejected"] for r in rows])
    loose = ["Answer:" not in r["rejected"] for r in rows]
    acc = lambda sel: sum(c > r for c, r, s in zip(chosen, rejected, sel) if s) / max(1, sum(sel))
    acc_loose, acc_same = acc(loose), acc([not s for s in loose])
    print(f"\nreward model held-out accuracy: {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
          f"(margin {after['margin']:.2f}); wrong format: {acc_loose:.3f} ({sum(loose)} pairs), "
          f"same format: {acc_same:.3f} ({len(rows) - sum(loose)} pairs)")
    # the loaded (LoRA-merged) model agrees with the run's own evaluation, up to a near-tie flipping
    assert after["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(rows), abs=1.01 / len(rows))
    assert acc_loose >= 0.9 and after["margin"] > before["margin"] + 0.5


def test_ppo_raises_the_reward_model_score_within_a_kl_bound(rm_run, tmp_path):
    spec = f"reward_model({rm_run.run_dir / 'final'})"
    res = train_ppo(PPOConfig(task="arithmetic", task_size=500, eval_size=16, reward=spec, eval_reward=spec,
                              output_dir=str(tmp_path), name="ppo", max_steps=8, prompts_per_step=8, group_size=2,
                              max_new_tokens=20, lr=3e-4, value_lr=1e-3, ppo_epochs=1, checkpoint_every=0,
                              log_every=3))
    before, after = res.evals[0]["accuracy"], res.evals[-1]["accuracy"]  # greedy eval: mean reward-model score
    last = res.history[-3:]
    kl_tok = sum(m["kl"] for m in last) / 3
    kl_seq = sum(m["kl/seq"] for m in last) / 3
    print(f"\nPPO: held-out mean RM score {before:.3f} -> {after:.3f}; train reward "
          f"{res.history[0]['reward/mean']:.3f} -> {sum(m['reward/mean'] for m in last) / 3:.3f}; "
          f"KL (last 3 steps) {kl_tok:.4f}/token, {kl_seq:.3f}/sequence; "
          f"explained variance {last[-1]['explained_variance']:.3f}")
    print("after:", [e["completion"] for e in res.evals[-1]["examples"]])
    # measured on 2 cores (8 steps): held-out -1.17 -> -0.84, train reward -1.07 -> -0.73 (RM score std ~1.4).
    # The held-out greedy score is the measure asserted on. The train reward (16 samples a step) is only
    # printed: its first step is one noisy draw, and on an AVX512 Xeon of another model (family 6 model
    # 167) with one thread (the suite's workers) the first step drew -0.63 and the last three -0.72,
    # while the held-out score still rose by more than 0.15 (the same numbers before and after issue
    # 19's PPO changes)
    assert after > before + 0.15, (before, after)
    assert kl_tok < KL_TOKEN_BOUND and kl_seq < KL_SEQ_BOUND, (kl_tok, kl_seq)
    assert (res.run_dir / "final" / "value" / "value_head.safetensors").is_file()
