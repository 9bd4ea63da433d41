"""`train grpo --env`: GRPO on multi-turn episodes (tiny model): the run trains on the episodes'
model tokens, logs episode metrics, evaluates by greedy episodes and writes whole conversations
to samples.jsonl; bad --env input is one error line naming the flag, before anything loads."""

import json
import sys
from pathlib import Path

from posttrain.algorithms.grpo import GRPOConfig, train_grpo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from terminal import assert_user_error, posttrain  # noqa: E402


def test_grpo_trains_on_guess_number_episodes(tmp_path, stoppable_dir):
    cfg = GRPOConfig(model=stoppable_dir, env="guess_number(hi=8)", max_turns=3, max_new_tokens=8, group_size=2,
                     prompts_per_step=2, max_steps=2, eval_size=3, output_dir=str(tmp_path), checkpoint_every=0,
                     rollout_dtype="float32", lora=False, lr=1e-3, beta=0.0, log_every=100, samples_per_step=1)
    res = train_grpo(cfg)
    assert len(res.history) == 2
    m = res.history[-1]
    assert 1.0 <= m["episode/turns"] <= 3.0 and m["episode/model_tokens"] > 0 and "episode/truncated" in m
    assert set(v for h in res.history for v in [h["reward/mean"]]) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert all(e["n"] == 3 and 0.0 <= e["accuracy"] <= 1.0 for e in res.evals)
    sample = json.loads((res.run_dir / "samples.jsonl").read_text().splitlines()[0])
    text = json.dumps(sample)
    assert "secret" in text and "[assistant]" in text and "[user]" in text  # the row and the whole conversation
    # each completion's advantage (the review page's group view): GRPO's, from the group's rewards
    rewards, adv = sample["rewards"], sample["advantages"]
    assert len(adv) == 2 and (adv[0] > adv[1]) == (rewards[0] > rewards[1]) and abs(sum(adv)) < 1e-5


def test_bad_env_input_is_one_error_naming_the_flag(tmp_path):
    out = tmp_path / "runs"
    assert_user_error(posttrain("train", "grpo", "--env", "guess_numbr", "--output-dir", out), "--env", "guess_number")
    assert_user_error(posttrain("train", "grpo", "--env", "guess_number(hi='x')", "--output-dir", out), "--env", "hi")
    assert_user_error(posttrain("train", "grpo", "--env", "guess_number", "--task", "arithmetic", "--output-dir", out),
                      "--env", "--task")
    assert_user_error(posttrain("train", "grpo", "--task", "arithmetic", "--max-turns", "3", "--output-dir", out),
                      "--max-turns", "--env")
    assert not out.exists()


def test_recommend_takes_an_environment_and_names_its_tools():
    from posttrain.doctrine.select import recommend

    rec = recommend(env="tool_arithmetic")
    assert rec.method == "grpo" and rec.defaults["env"] == "tool_arithmetic" and "calculator" in rec.reasons[0]
    assert "--env tool_arithmetic" in rec.command and [a["method"] for a in rec.alternatives] == ["rloo", "ppo", "sft"]
    assert rec.alternatives[1]["command"].startswith("posttrain train ppo --env tool_arithmetic")
    assert [a["method"] for a in recommend(env="guess_number").alternatives] == ["rloo", "ppo"]  # no tools: no SFT
    assert_user_error(posttrain("recommend", "--env", "nope"), "--env", "unknown environment")
    assert_user_error(posttrain("recommend", "--env", "guess_number", "--task", "arithmetic"), "--env", "--task")


def _grads(policy, cfg, batch, p):
    import torch

    from posttrain.algorithms import grpo
    from posttrain.objectives import advantages as advmod

    policy.zero_grad()
    kl_in_loss = advmod.ESTIMATORS[cfg.advantage].kl == "loss"
    for mb, b in p.micro:
        loss, _ = grpo.micro_loss(policy, cfg, batch, p, kl_in_loss, mb, b)
        loss.backward()
    return torch.cat([q.grad.flatten() for q in policy.parameters() if q.grad is not None]).clone()


def test_environment_tokens_get_no_gradient(stoppable_dir, scripted_episodes):
    """Advantages, sampling log-probs and reference log-probs at environment tokens are perturbed (what
    a mask with holes in the wrong place would let into the loss): the gradient does not change."""
    import dataclasses

    import torch

    from posttrain.algorithms import grpo
    from posttrain.algorithms.collect import ScoredBatch
    from posttrain.models import load_model

    policy, tok = load_model(stoppable_dir)
    policy.eval()
    r = scripted_episodes(policy, tok, 4).rollouts
    env_BC = (r.completion_mask_BC == 0) & (r.completion_ids_BC != tok.pad_token_id)
    assert env_BC.sum() >= 6
    batch = ScoredBatch([{}, {}], r, [""] * 8, torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.25, 1.0]), {})
    noise = torch.Generator().manual_seed(0)
    for advantage in ("reinforce_pp", "grpo"):
        cfg = GRPOConfig(env="guess_number", advantage=advantage, group_size=4, prompts_per_step=2, beta=0.04,
                         micro_batch_prompts=1)
        p = grpo.advantages(policy, None, cfg, batch)
        ref = torch.randn(r.completion_ids_BC.shape, generator=noise) - 3.0
        p = dataclasses.replace(p, ref_BC=ref * p.mask_BC)
        policy.train()
        before = _grads(policy, cfg, batch, p)
        junk = torch.randn(r.completion_ids_BC.shape, generator=noise) * 5
        adv = p.adv + junk * env_BC if p.adv.dim() == 2 else p.adv
        perturbed = dataclasses.replace(p, adv=adv, ref_BC=p.ref_BC + junk * env_BC)
        batch2 = dataclasses.replace(batch, rollouts=dataclasses.replace(r, sample_logp_BC=r.sample_logp_BC + junk * env_BC))
        after = _grads(policy, cfg, batch2, perturbed)
        assert before.abs().sum() > 0 and torch.allclose(before, after, atol=1e-7), advantage
        # the same perturbation at the model's tokens does change it: the test can fail
        model_BC = r.completion_mask_BC.bool()
        moved = dataclasses.replace(p, ref_BC=p.ref_BC + junk * model_BC,
                                    adv=p.adv + junk * model_BC if p.adv.dim() == 2 else p.adv + 1.0)
        assert not torch.allclose(before, _grads(policy, cfg, batch, moved), atol=1e-6), advantage
        policy.eval()


def test_sigkill_mid_multi_turn_run_then_resume_matches_the_uninterrupted_run(tmp_path, stoppable_dir, kill_and_resume):
    import os

    def command(name):
        return [sys.executable, "-m", "posttrain.cli", "train", "grpo", "--model", stoppable_dir,
                "--env", "guess_number(hi=8)", "--max-turns", "3", "--max-new-tokens", "6", "--max-steps", "6",
                "--group-size", "2", "--prompts-per-step", "2", "--lr", "1e-2", "--beta", "0.04",
                "--checkpoint-every", "2", "--eval-size", "2", "--output-dir", str(tmp_path), "--name", name,
                "--seed", "3"]

    straight, resumed = kill_and_resume(command, "grpo", tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"})
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6] and resumed == straight
    assert any(m["episode/turns"] > 1 for m in straight)
    samples = lambda name: [json.loads(l)["completions"] for l in (tmp_path / name / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples("killed") == samples("straight")


def test_an_episode_budget_past_the_models_context_is_refused(tmp_path, stoppable_dir):
    proc = posttrain("train", "grpo", "--model", stoppable_dir, "--env", "guess_number", "--max-episode-tokens",
                     "100000", "--output-dir", tmp_path / "runs")
    assert_user_error(proc, "--max-episode-tokens", "context")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
