"""The rollout mismatch seen and corrected by the trainers (GRPO, PPO): the sampler's log-probs
(``Rollouts.sample_logp_BC``) against the trainer's at the start of the update, on the tiny model.

bfloat16 sampling shows a clear ``mismatch/kl``; float32 sampling shows rounding only; with TIS the
gradient is the one of the policy loss weighted by the truncated ratios; a masking kind's
normalisers are the corrected mask's; every mismatch metric reaches metrics.jsonl."""

import json

import pytest
import torch

from posttrain import rewards as rw
from posttrain.algorithms import common, grpo, inputs
from posttrain.algorithms.collect import collect
from posttrain.algorithms.grpo import GRPOConfig, train_grpo
from posttrain.algorithms.optim import OptimizerStep, trainable_params
from posttrain.algorithms.ppo import PPOConfig, train_ppo
from posttrain.objectives import losses
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.sampling.rollout_model import rollout_model

TOY_REWARD = "format(pattern=[a-m].*)"
MISMATCH_KEYS = ("mismatch/kl", "mismatch/ratio_max", "mismatch/masked_frac", "mismatch/weight_mean")


def _cfg(tmp_path, model_dir, data, **kw):
    base = dict(model=model_dir, data=data, reward=TOY_REWARD, max_steps=1, group_size=8, prompts_per_step=4,
                max_new_tokens=3, output_dir=str(tmp_path), checkpoint_every=0, lr=0.0, lora=False, beta=0.0,
                eval_at_start=False, log_every=100, micro_batch_prompts=0)
    base.update(kw)
    return GRPOConfig(**base)


def _setup(cfg):
    """The policy, an SGD rule (lr from cfg) and one batch sampled from the cfg's rollout dtype."""
    common.seed_everything(0)
    policy, tok = common.load_policy(cfg)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    stream = common.PromptStream(inputs.load_rows_for(cfg, "prompt")[0], 0)
    batch, _ = collect(policy, tok, stream, cfg.prompts_per_step, cfg.group_size, cfg.sampling(),
                       rw.from_spec(TOY_REWARD), torch.Generator().manual_seed(0),
                       rollout=rollout_model(policy, cfg.rollout_dtype))
    rule = OptimizerStep(opt, [trainable_params(policy)], cfg.max_grad_norm, [policy])
    return policy, rule, batch


@pytest.mark.usefixtures("one_thread")
def test_bfloat16_sampling_shows_mismatch_float32_only_rounding(tmp_path, peaked_dir, toy_prompts):
    seen = {}
    for dtype in ("bfloat16", "float32"):
        cfg = _cfg(tmp_path, peaked_dir, toy_prompts, rollout_dtype=dtype, rollout_correction="none")
        policy, rule, batch = _setup(cfg)
        seen[dtype] = grpo.update(policy, rule, cfg, batch, None)
    bf, f32 = seen["bfloat16"], seen["float32"]
    # bfloat16 keeps 8 bits of mantissa: weights and logits move by ~0.4%, log-probs by a few
    # 1e-2 on this peaked model, k3 ~ (3e-2)^2 / 2 ~ 5e-4 per token; measured 6.3e-4, ratio_max 1.127
    assert bf["mismatch/kl"] > 1e-5 and bf["mismatch/ratio_max"] > 1.005, bf
    # float32: the sampler (KV cache, one token at a time) and the trainer (whole sequence) round
    # differently only: |log r| ~ 1e-6, so k3 ~ 1e-12 (measured 6.9e-13, ratio_max 1 + 2.9e-6);
    # bounds: k3 < 1e-9 (|log r| < 4e-5) and the ratio within 1e-4 of 1
    assert f32["mismatch/kl"] < 1e-9 and abs(f32["mismatch/ratio_max"] - 1.0) < 1e-4, f32
    assert bf["mismatch/kl"] > 1e4 * max(f32["mismatch/kl"], 1e-12)
    assert bf["mismatch/masked_frac"] == 0.0 and f32["mismatch/masked_frac"] == 0.0


def _grads(policy):
    return [p.grad.detach().clone() for p in policy.parameters() if p.requires_grad]


def test_tis_gradient_is_the_loss_weighted_by_truncated_ratios(tmp_path, peaked_dir, toy_prompts):
    # cap 1.002: below the largest bfloat16 ratios, so the truncation is active on some tokens
    cfg = _cfg(tmp_path, peaked_dir, toy_prompts, rollout_dtype="bfloat16", rollout_correction="tis",
               rollout_correction_cap=1.002)
    policy, _, batch = _setup(cfg)
    p = grpo.advantages(policy, None, cfg, batch)
    assert p.weight_BC is None  # on-policy, no masking: weights taken inside the micro-batch, no extra pass
    (mb, b), = p.micro
    policy.zero_grad()
    loss, stats = grpo.micro_loss(policy, cfg, batch, p, True, mb, b)
    loss.backward()
    trainer = _grads(policy)
    # by hand: r = exp(logp - sample_logp) at valid tokens, w = min(r, 1.002), loss = ppo_clip weighted by w
    policy.zero_grad()
    logp, _ = rollout_logprobs(policy, batch.rollouts, cfg.temperature, with_entropy=True, rows=mb)
    m = p.mask_BC[b]
    r = torch.exp(torch.where(m != 0, logp.detach() - batch.rollouts.sample_logp_BC[b], torch.zeros(())))
    w = torch.clamp(r, max=1.002)
    assert float((w[m != 0] < r[m != 0]).float().mean()) > 0.01  # some tokens truncated
    assert float((w[m != 0] < 1.0).float().mean()) > 0.01       # and some weighted below 1
    manual, _ = losses.policy_loss(logp, logp.detach(), p.adv[b], m, 0.2, 0.2, cfg.reduce, cfg.max_new_tokens,
                                   weight_BT=w)
    manual.backward()
    for got, want in zip(trainer, _grads(policy)):
        torch.testing.assert_close(got, want)
    # the weights matter: without them the gradient differs
    policy.zero_grad()
    logp, _ = rollout_logprobs(policy, batch.rollouts, cfg.temperature, with_entropy=True, rows=mb)
    losses.policy_loss(logp, logp.detach(), p.adv[b], m, 0.2, 0.2, cfg.reduce, cfg.max_new_tokens)[0].backward()
    assert any(not torch.allclose(g, u, rtol=1e-4, atol=1e-7) for g, u in zip(trainer, _grads(policy)))
    assert stats["mismatch/weight_mean"] < 1.0


def test_masking_kind_normalisers_are_the_corrected_masks(tmp_path, peaked_dir, toy_prompts):
    # a band of +-2% (about the spread of bfloat16's log-prob error on this model, |log r| ~ 2e-2)
    # drops some tokens and keeps others; the old log-probs come from one extra no-grad pass
    cfg = _cfg(tmp_path, peaked_dir, toy_prompts, rollout_dtype="bfloat16", rollout_correction="token_mask",
               rollout_correction_low=0.98, rollout_correction_high=1.02, micro_batch_prompts=1)
    policy, rule, batch = _setup(cfg)
    p = grpo.advantages(policy, None, cfg, batch)
    r = batch.rollouts
    valid = r.completion_mask_BC * batch.valid_B[:, None].to(r.completion_mask_BC.dtype)
    with torch.no_grad():
        start = rollout_logprobs(policy, r, cfg.temperature)
    ratio = torch.exp(start - r.sample_logp_BC)
    keep = ((ratio >= 0.98) & (ratio <= 1.02)).to(valid.dtype)
    torch.testing.assert_close(p.mask_BC, valid * keep)
    dropped = float(((valid != 0) & (keep == 0)).sum())
    assert 0 < dropped < float(valid.sum())
    torch.testing.assert_close(p.whole, losses.reduction_counts(valid * keep))
    assert p.mismatch["mismatch/masked_frac"] == pytest.approx(dropped / float(valid.sum()))
    assert p.old_BC is None  # the ratio of the loss stays the on-policy one (exactly 1)


def test_ratio_max_is_the_steps_max_not_a_mean(tmp_path, peaked_dir, toy_prompts):
    got = {}
    for micro in (0, 1):  # one micro-batch, or one per prompt
        cfg = _cfg(tmp_path, peaked_dir, toy_prompts, rollout_dtype="bfloat16", micro_batch_prompts=micro)
        policy, rule, batch = _setup(cfg)
        got[micro] = grpo.update(policy, rule, cfg, batch, None)
    assert got[1]["mismatch/ratio_max"] == pytest.approx(got[0]["mismatch/ratio_max"], rel=1e-5)
    assert got[1]["mismatch/kl"] == pytest.approx(got[0]["mismatch/kl"], rel=1e-3)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_every_mismatch_metric_in_metrics_jsonl(tmp_path, peaked_dir, toy_prompts, method):
    common_kw = dict(model=peaked_dir, data=toy_prompts, reward=TOY_REWARD, max_steps=2, prompts_per_step=2,
                     group_size=2, max_new_tokens=2, output_dir=str(tmp_path), checkpoint_every=0,
                     eval_at_start=False, log_every=100, lora=False, rollout_dtype="bfloat16", name=method)
    if method == "grpo":
        res = train_grpo(GRPOConfig(**common_kw, beta=0.0, lr=1e-3))
    else:
        res = train_ppo(PPOConfig(**common_kw, lr=1e-3, ppo_epochs=1, kl_coef=0.02, rollout_correction="seq_mask"))
    rows = _jsonl(res.run_dir / "metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        for k in MISMATCH_KEYS:
            assert k in row, (method, k)
        assert row["mismatch/kl"] > 0 and row["mismatch/ratio_max"] >= 1.0


def test_policy_losses_train_through_grpo_and_ppo(tmp_path, peaked_dir, toy_prompts):
    # each loss runs in the trainers (2 steps; gspo_token under PPO's per-token GAE advantages)
    kw = dict(model=peaked_dir, data=toy_prompts, reward=TOY_REWARD, max_steps=2, prompts_per_step=2, group_size=2,
              max_new_tokens=2, output_dir=str(tmp_path), checkpoint_every=0, eval_at_start=False, log_every=100,
              lora=False, rollout_dtype="float32", lr=1e-3)
    for loss in ("gspo", "cispo"):
        res = train_grpo(GRPOConfig(**kw, beta=0.0, num_iterations=2, policy_loss=loss, name=f"g-{loss}"))
        assert all(r["nonfinite_steps"] == 0 for r in res.history)
    res = train_ppo(PPOConfig(**kw, ppo_epochs=2, kl_coef=0.0, policy_loss="gspo_token", name="p-gspo"))
    assert all(r["nonfinite_steps"] == 0 for r in res.history)
