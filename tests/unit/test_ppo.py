"""PPO: the value head (shapes, masking, agreement with a plain forward), the value adapter's
isolation from the policy, the KL controller's update rule, per-token rewards, and learning on the
tiny model with a toy reward. GAE against hand-worked values is in test_advantages.py."""

import dataclasses
import math

import pytest
import torch

from posttrain.algorithms.ppo import PPOConfig, train_ppo
from posttrain.algorithms.ppo_parts import KLController, explained_variance, make_value_model, token_rewards
from posttrain.algorithms.reference import Reference
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.sampling.generation import SamplingConfig, positions, sample_groups
from posttrain.objectives.value_head import ValueHead, ValueModel, adapter_params, sequence_scores, trunk_of, use_adapter

TOY_REWARD = "format(pattern=[a-m].*)"  # 1 when the completion starts with a letter a-m: ~40% at the start


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model ops are too small to split across threads; on a shared 2-core machine a second
    intra-op thread only adds contention (measured on a toy PPO step: 0.5 s with one thread,
    1.4-13 s with two while other jobs ran)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prompts_of(tok):
    return [tok("hello there")["input_ids"], tok("a much longer prompt about many things")["input_ids"]]


def naive_values(trunk, head, r):
    """V for every completion token from a plain full-sequence forward (each row its own prompt copy):
    the state predicting token t is the last state of prompt + completion[:t]."""
    G = r.group_size
    ids = torch.cat([r.prompt_ids_PL.repeat_interleave(G, 0), r.completion_ids_BC], 1)
    attn = torch.cat([r.prompt_mask_PL.repeat_interleave(G, 0), torch.ones_like(r.completion_ids_BC)], 1)
    h = trunk(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).last_hidden_state
    L = r.prompt_ids_PL.shape[1]
    return head(h[:, L - 1:-1]) * r.completion_mask_BC


def _lora_policy(tiny, seed=0):
    from posttrain.models import add_lora

    model, tok = tiny
    return add_lora(model, rank=4), tok


def _cfg(**kw):
    return PPOConfig(**{"lora": True, "value_model": "auto", "task": "arithmetic", **kw})


def test_value_head_shapes_masking_and_agreement_with_plain_forward(tiny):
    policy, tok = _lora_policy(tiny)
    critic = make_value_model(_cfg(), policy, seed=0)
    with torch.no_grad():  # move the value adapter off zero so it matters
        for p in adapter_params(policy, "value").parameters():
            p.normal_(0, 0.05)
    r = sample_groups(policy, tok, prompts_of(tok), 3, SamplingConfig(max_new_tokens=6),
                      generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([6, 2, 4, 1, 6, 3])  # as if some completions had ended early
    r = dataclasses.replace(r, completion_mask_BC=(torch.arange(6)[None, :] < lengths[:, None]).long())
    with torch.no_grad():
        v = critic.values(r)
        with use_adapter(policy, "value"):
            ref = naive_values(trunk_of(policy), critic.head, r)
        policy_view = naive_values(trunk_of(policy), critic.head, r)  # default adapter: a different trunk
    assert v.shape == r.completion_mask_BC.shape == (6, r.completion_ids_BC.shape[1])
    assert torch.all(v[r.completion_mask_BC == 0] == 0)
    assert torch.allclose(v, ref, atol=1e-5)
    assert not torch.allclose(v, policy_view, atol=1e-3)
    # micro-batch rows select whole groups
    assert torch.allclose(critic.values(r, rows=torch.tensor([1])).detach(), v[3:], atol=1e-5)


def test_sequence_scores_read_the_last_token_and_share_prompts(tiny):
    model, tok = tiny
    head = ValueHead(64, seed=1)
    trunk = trunk_of(model)
    p = tok("what is two plus two")["input_ids"]
    comps = [tok(" four")["input_ids"], tok(" it is four, surely")["input_ids"]]
    with torch.no_grad():
        grouped = sequence_scores(trunk, head, [p], comps, tok.pad_token_id)
        single = torch.cat([sequence_scores(trunk, head, [p], [c], tok.pad_token_id) for c in comps])
        plain = torch.stack([head(trunk(input_ids=torch.tensor([p + c])).last_hidden_state[0, -1]) for c in comps])
    assert grouped.shape == (2,)
    assert torch.allclose(grouped, plain, atol=1e-5) and torch.allclose(single, plain, atol=1e-5)


def test_value_adapter_is_separate_from_the_policy(tiny):
    policy, tok = _lora_policy(tiny)
    critic = make_value_model(_cfg(), policy, seed=0)
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    r = sample_groups(policy, tok, prompts_of(tok), 2, SamplingConfig(max_new_tokens=4),
                      generator=torch.Generator().manual_seed(0))
    with Reference(policy, lora=True).model() as ref:  # peft's disable_adapter() re-enables "default" only
        rollout_logprobs(ref, r, 1.0, rows=torch.arange(2))
    critic.values(r).sum().backward()
    assert policy.active_adapter == "default"
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags  # peft's flips are undone
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if ".default." in n)  # no value gradient reaches the policy
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".value." in n)
    assert critic.head.linear.weight.grad is not None
    with pytest.raises(ValueError, match="lora"):
        make_value_model(_cfg(lora=False, value_model="adapter"), policy, seed=0)


def test_adaptive_kl_controller_update_rule():
    # e = clip(kl / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon)
    c = KLController(0.1, target=6.0, horizon=1000)
    assert math.isclose(c.update(6.6, 100), 0.1 * (1 + 0.1 * 0.1))          # e = 0.1
    assert math.isclose(c.update(60.0, 100), 0.101 * (1 + 0.2 * 0.1))       # e clipped to +0.2
    before = c.value
    assert math.isclose(c.update(0.0, 500), before * (1 - 0.2 * 0.5))       # e clipped to -0.2
    assert c.update(float("nan"), 100) == c.value                           # no valid token: unchanged
    fixed = KLController(0.1)
    assert fixed.update(100.0, 1000) == 0.1 and not fixed.adaptive


def test_token_rewards_put_the_score_on_the_last_valid_token():
    kl = torch.tensor([[0.5, 1.0, 2.0], [1.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    # row 0: -0.05, -0.1, -0.2 + 2 ; row 1: -0.1 - 1 on its only token, masked tokens 0
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, 1.8], [-1.1, 0.0, 0.0]]))
    assert torch.equal(token_rewards(torch.tensor([float("nan")]), torch.zeros(1, 2), torch.tensor([[1, 0]]), 0.1),
                       torch.zeros(1, 2))


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert math.isclose(explained_variance(ret, ret, mask), 1.0)
    assert abs(explained_variance(torch.full_like(ret, 2.0), ret, mask)) < 1e-9  # the mean: 0
    assert explained_variance(-ret, ret, mask) < 0
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask))


def toy_config(tmp_path, model_dir, data, **kw):
    base = dict(model=model_dir, data=data, reward=TOY_REWARD, max_steps=40, prompts_per_step=4, group_size=8,
                max_new_tokens=2, output_dir=str(tmp_path), checkpoint_every=0, eval_at_start=False, log_every=100,
                lr=1e-2, value_lr=1e-3, lora=False, ppo_epochs=1, kl_coef=0.02, entropy_coef=0.0)
    base.update(kw)
    return PPOConfig(**base)


def test_reward_rises_on_the_toy_task(tmp_path, peaked_dir, toy_prompts):
    # full fine-tuning (a separate critic), the KL penalty in the reward; 32 completions a step
    res = train_ppo(toy_config(tmp_path, peaked_dir, toy_prompts, name="learn"))
    h = res.history
    rewards = [m["reward/mean"] for m in h]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert len(rewards) == 40
    assert last - first > 0.3, (first, last, rewards)
    # the critic follows: its values move toward the returns as the reward rises
    assert h[-1]["value/mean"] > h[0]["value/mean"] + 0.3
    for key in ("value_loss", "explained_variance", "value_clip_frac", "kl_coef", "returns/mean", "kl", "entropy",
                "loss", "pg_loss", "clip_frac", "len/mean", "grad_norm", "value_grad_norm", "lr", "frac_zero_std",
                "reward/format", "time/step", "tokens_per_s"):
        assert key in h[-1], key


def test_adapter_critic_learns_while_a_frozen_policy_stays_put(tmp_path, peaked_dir, toy_prompts):
    # policy lr 0: only the critic (its LoRA adapter + head) trains. The returns' mean is ~0.4 (the
    # reward rate) and the fresh critic starts near 0: its values must close most of that gap.
    res = train_ppo(toy_config(tmp_path, peaked_dir, toy_prompts, name="critic", lora=True, lr=0.0, value_lr=1e-2,
                               max_steps=12, checkpoint_every=12, kl_coef=0.1, entropy_coef=0.01, ppo_epochs=2,
                               minibatches=2, seed=3))  # seed 0's last batches' returns happen to swing
    h = res.history
    gap = [abs(m["value/mean"] - m["returns/mean"]) for m in h]
    assert gap[0] > 0.25 and sum(gap[-3:]) / 3 < 0.1, gap
    assert sum(m["value_loss"] for m in h[-3:]) < sum(m["value_loss"] for m in h[:3])
    final = res.run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert (final / "value" / "value_head.safetensors").is_file() and (final / "value" / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    policy_b = [v for k, v in load_file(final / "adapter_model.safetensors").items() if "lora_B" in k]
    value_b = [v for k, v in load_file(final / "value" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert all(torch.count_nonzero(b) == 0 for b in policy_b)  # lr 0: the policy adapter is still at init
    assert any(torch.count_nonzero(b) > 0 for b in value_b)
    # the saved critic reads back as a scalar model and predicts the last values it was trained to
    from posttrain.algorithms.reward_model import load_reward_model

    rm = load_reward_model(final / "value", merge=False)
    assert isinstance(rm.head, ValueHead) and rm.meta.get("format") == "posttrain-value-model"


def test_bad_settings_are_refused(tmp_path, peaked_dir, toy_prompts):
    with pytest.raises(ValueError, match="minibatches"):
        train_ppo(toy_config(tmp_path, peaked_dir, toy_prompts, minibatches=8))
    with pytest.raises(ValueError, match="reward"):
        train_ppo(toy_config(tmp_path, peaked_dir, toy_prompts, reward=None, name="noreward"))


def test_schedule_counts_ppo_steps_not_minibatch_updates(tmp_path, peaked_dir, toy_prompts):
    # 2 epochs x 2 minibatches = 4 optimizer updates a step; a linear decay over 4 steps must still
    # be at 3/4 after the first step (counting updates would reach 0 there)
    res = train_ppo(toy_config(tmp_path, peaked_dir, toy_prompts, name="sched", max_steps=4, schedule="linear",
                               ppo_epochs=2, minibatches=2, lr=1e-2, max_new_tokens=1))
    assert [m["lr"] for m in res.history] == pytest.approx([1e-2 * 0.75, 1e-2 * 0.5, 1e-2 * 0.25, 0.0])


def _one_ppo_update(tmp_path, peaked_dir, toy_prompts, micro, value_model, lora):
    from posttrain import rewards as rw
    from posttrain.algorithms import common, inputs, ppo
    from posttrain.algorithms.collect import collect
    from posttrain.algorithms.optim import OptimizerStep
    from posttrain.algorithms.ppo_parts import policy_params

    cfg = toy_config(tmp_path, peaked_dir, toy_prompts, micro_batch_prompts=micro, lora=lora, value_model=value_model,
                     group_size=4, ppo_epochs=2, minibatches=2, kl_coef=0.1, entropy_coef=0.01)
    common.seed_everything(0)
    policy, tok = common.load_policy(cfg)
    critic = make_value_model(cfg, policy, 0)
    sets = (policy_params(policy), [p for p in critic.parameters() if p.requires_grad])
    # plain SGD: the weights move by lr * gradient, so they compare the accumulated gradients
    opt = torch.optim.SGD([{"params": sets[0]}, {"params": sets[1]}], lr=1e-2)
    rule = OptimizerStep(opt, sets, cfg.max_grad_norm, [policy, critic.model if critic.adapter is None else None])
    stream = common.PromptStream(inputs.load_rows_for(cfg, "prompt")[0], 0)
    batch, _ = collect(policy, tok, stream, 4, 4, SamplingConfig(max_new_tokens=2), rw.from_spec(TOY_REWARD),
                       torch.Generator().manual_seed(0))
    ro = ppo.rollout_stats(policy, critic, Reference(policy, cfg.lora), cfg, batch, cfg.kl_coef)
    metrics = ppo.update(policy, critic, rule, cfg, batch, ro, torch.Generator().manual_seed(1))
    weights = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    weights.update({f"critic.{i}": p.detach().clone() for i, p in enumerate(sets[1])})
    return weights, metrics


@pytest.mark.parametrize("value_model, lora", [("adapter", True), ("separate", False)])
def test_micro_batches_inside_a_minibatch_equal_one_pass(tmp_path, peaked_dir, toy_prompts, value_model, lora):
    """Two epochs of two minibatches (2 prompts x 4 each): one prompt per forward/backward gives the
    whole minibatch's update (policy and critic) and the same statistics."""
    whole, m0 = _one_ppo_update(tmp_path / "whole", peaked_dir, toy_prompts, 0, value_model, lora)
    parts, m1 = _one_ppo_update(tmp_path / "parts", peaked_dir, toy_prompts, 1, value_model, lora)
    assert whole.keys() == parts.keys() and any(k.startswith("critic.") for k in whole)
    for name in whole:
        assert torch.allclose(whole[name], parts[name], atol=1e-6), name
    # value_clip_frac is left out: it counts tokens whose clipped error is strictly larger, and in the
    # first epoch the values equal the old ones up to rounding, so it counts float ties, which
    # differ with the pass's shape (seen: 0.047 against 0.094 with equal weights)
    for key in ("loss", "pg_loss", "value_loss", "clip_frac", "approx_kl", "ratio/mean", "entropy", "grad_norm",
                "value_grad_norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("micro, group, prompts, minibatches, per_pass", [
    (None, 1, 16, 1, 8), (None, 4, 8, 1, 2), (None, 8, 4, 1, 1), (None, 16, 4, 2, 1), (None, 1, 16, 4, 4),
    (0, 8, 4, 1, 4), (0, 2, 8, 4, 2), (3, 2, 8, 4, 2), (1, 1, 16, 1, 1)])
def test_default_micro_batch_is_8_rows_of_whole_groups_within_a_minibatch(micro, group, prompts, minibatches,
                                                                          per_pass):
    from posttrain.algorithms.ppo import pass_prompts

    cfg = _cfg(micro_batch_prompts=micro, minibatches=minibatches, prompts_per_step=prompts, group_size=group)
    assert pass_prompts(cfg, prompts, group) == per_pass
