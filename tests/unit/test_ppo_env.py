"""`train ppo --env`: PPO on multi-turn episodes (tiny model): the run trains the policy and the
critic on the episodes' model tokens, logs episode metrics and evaluates by greedy episodes; the
environment's tokens move neither the policy's nor the critic's gradient."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.ppo import PPOConfig, train_ppo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from terminal import assert_user_error, posttrain  # noqa: E402


def test_ppo_trains_on_guess_number_episodes(tmp_path, stoppable_dir):
    cfg = PPOConfig(model=stoppable_dir, env="guess_number(hi=8)", max_turns=3, max_new_tokens=8, group_size=2,
                    prompts_per_step=2, max_steps=2, eval_size=3, output_dir=str(tmp_path), checkpoint_every=0,
                    rollout_dtype="float32", lora=False, lr=1e-3, log_every=100, samples_per_step=1, ppo_epochs=2)
    res = train_ppo(cfg)
    assert len(res.history) == 2
    m = res.history[-1]
    assert 1.0 <= m["episode/turns"] <= 3.0 and m["episode/model_tokens"] > 0 and m["episode/env_tokens"] > 0
    assert all(k in m for k in ("value_loss", "explained_variance", "kl", "episode/truncated"))
    assert all(e["n"] == 3 and 0.0 <= e["accuracy"] <= 1.0 for e in res.evals)
    assert (res.run_dir / "final" / "value" / "value_head.safetensors").exists()
    sample = json.loads((res.run_dir / "samples.jsonl").read_text().splitlines()[-1])
    assert len(sample["advantages"]) == 2 and all(math.isfinite(a) for a in sample["advantages"])  # GAE, per sequence


def test_ppo_refuses_env_with_task_before_anything_loads(tmp_path):
    out = tmp_path / "runs"
    assert_user_error(posttrain("train", "ppo", "--env", "guess_number", "--task", "arithmetic", "--output-dir", out),
                      "--env", "--task")
    assert_user_error(posttrain("train", "ppo", "--env", "guess_numbr", "--output-dir", out), "--env", "guess_number")
    assert not out.exists()


def _grads(policy, critic, cfg, r, ro):
    from posttrain.algorithms.ppo import micro_loss, normalisers

    for q in list(policy.parameters()) + list(critic.parameters()):
        q.grad = None
    mb, rows = torch.arange(r.num_prompts), torch.arange(r.num_prompts * r.group_size)
    loss = micro_loss(policy, critic, cfg, r, ro, normalisers(ro, rows), mb, rows)[0]
    loss.backward()
    params = list(policy.parameters()) + [p for p in critic.parameters() if p.requires_grad]
    return torch.cat([q.grad.flatten() for q in dict.fromkeys(params) if q.grad is not None]).clone()


@pytest.mark.parametrize("value_model", ["separate", "adapter"])
def test_environment_tokens_move_neither_policy_nor_critic(stoppable_dir, value_model, scripted_episodes):
    """Old log-probs, advantages, old values, returns and sampler log-probs at the environment's
    tokens are perturbed: the gradient of the whole PPO loss (policy, entropy, value) is unchanged;
    the same perturbation at the model's tokens changes it (the test can fail). GAE runs over the
    holes: the advantage of a turn's last token depends on the next turn's values."""
    import dataclasses

    from posttrain.algorithms.collect import ScoredBatch
    from posttrain.algorithms.ppo import rollout_stats
    from posttrain.algorithms.ppo_parts import make_value_model
    from posttrain.models import add_lora, load_model

    policy, tok = load_model(stoppable_dir)
    policy.eval()
    r = scripted_episodes(policy, tok, 2).rollouts
    lora = value_model == "adapter"
    if lora:
        policy = add_lora(policy, 4)
    cfg = PPOConfig(env="guess_number", group_size=2, prompts_per_step=2, kl_coef=0.1, value_model=value_model,
                    lora=lora, rollout_correction="none", **({"lora_rank": 4} if lora else {}))
    critic = make_value_model(cfg, policy, 0)
    env_BC = (r.completion_mask_BC == 0) & (r.completion_ids_BC != tok.pad_token_id)
    assert env_BC.sum() >= 6
    batch = ScoredBatch([{}, {}], r, [""] * 4, torch.tensor([0.0, 1.0, 0.5, 1.0]), {})
    ro = rollout_stats(policy, critic, None, cfg, batch, 0.0)
    assert float((ro["adv"] * env_BC).abs().sum()) == 0.0 and float((ro["returns"] * env_BC).abs().sum()) == 0.0

    policy.train()
    critic.train()
    before = _grads(policy, critic, cfg, r, ro)
    noise = torch.Generator().manual_seed(0)
    junk = torch.randn(r.completion_ids_BC.shape, generator=noise) * 5
    moved = {k: (ro[k] + junk * env_BC) for k in ("old", "adv", "values", "returns")}
    r2 = dataclasses.replace(r, sample_logp_BC=r.sample_logp_BC + junk * env_BC)
    assert before.abs().sum() > 0 and torch.allclose(before, _grads(policy, critic, cfg, r2, {**ro, **moved}), atol=1e-7)
    model_BC = r.completion_mask_BC.bool()
    for k in ("adv", "returns"):
        assert not torch.allclose(before, _grads(policy, critic, cfg, r, {**ro, k: ro[k] + junk * model_BC}), atol=1e-6), k


def test_gae_over_an_episode_bridges_the_environments_tokens():
    """One episode, two model turns with the environment's reply between: the reward at the end
    reaches the first turn through the second turn's value (gamma = lambda = 1, the default gamma)."""
    from posttrain.objectives import advantages as advmod

    mask_BT = torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=torch.float32)  # turn 1, env reply, turn 2
    rewards_BT = torch.tensor([[0.0, 0.0, 9.0, 9.0, 0.0, 1.0]]) * mask_BT  # the env's junk never counts
    values_BT = torch.tensor([[0.1, 0.2, 7.0, 7.0, 0.4, 0.5]])
    adv, ret = advmod.gae(rewards_BT, values_BT, mask_BT, gamma=1.0, lam=0.5)
    # t5: 1 - 0.5 = 0.5; t4: 0.5 - 0.4 + 0.5*0.5 = 0.35; (holes) t1: 0.4 - 0.2 + 0.5*0.35 = 0.375
    # t0: 0.2 - 0.1 + 0.5*0.375 = 0.2875; the values at the holes (7.0) are never read
    assert torch.allclose(adv, torch.tensor([[0.2875, 0.375, 0.0, 0.0, 0.35, 0.5]]))
    assert torch.allclose(ret[mask_BT.bool()], (adv + values_BT)[mask_BT.bool()])
