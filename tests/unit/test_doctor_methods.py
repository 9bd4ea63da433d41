"""The doctor on each trainer's own metrics: DPO, reward-model and PPO streams carry other keys than
GRPO's (no reward/mean, no samples; a critic instead of groups), and a rule must stay silent when
its metrics are absent and say things that make sense for the method when it fires.

The key sets below are the ones the trainers log (algorithms/dpo.py, reward_model.py, ppo.py).
"""

from __future__ import annotations

import math
import random

import pytest

from posttrain.doctrine.doctor import RULES, Context, Thresholds, diagnose

N = 150


def lr_at(step: int, n: int, schedule: str, peak: float = 5e-6, warmup: int = 10) -> float:
    """The trainers' schedules: linear warmup, then constant or cosine to 0 (algorithms/common.py)."""
    if step <= warmup:
        return peak * step / warmup
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (n - warmup)))
    return peak


def pairs_step(rng: random.Random, level: float, spread: float, batch: int = 8) -> dict:
    """One batch of preference pairs whose implicit-reward margins are ~ N(level, spread): the metrics
    DPO and the reward model compute from them (loss = mean softplus(-margin))."""
    margins = [rng.gauss(level, spread) for _ in range(batch)]
    chosen = [m / 2 + rng.gauss(0, 0.1) for m in margins]
    return {"loss": sum(math.log1p(math.exp(-m)) for m in margins) / batch,
            "rewards/chosen": sum(chosen) / batch, "rewards/rejected": sum(c - m for c, m in zip(chosen, margins)) / batch,
            "rewards/margin": sum(margins) / batch, "rewards/accuracy": sum(m > 0 for m in margins) / batch}


def dpo_stream(n: int = N, seed: int = 0, schedule: str = "constant", rate: float = 0.02) -> list[dict]:
    """A DPO run: the margin grows in proportion to the learning rate (``rate`` per step at the peak)."""
    rng = random.Random(seed)
    history, level = [], 0.0
    for step in range(1, n + 1):
        lr = lr_at(step, n, schedule)
        level += rate * lr / 5e-6
        m = pairs_step(rng, level, 0.5 + 0.3 * level)
        history.append({"step": step, **m, "logps/chosen": -40 + level, "logps/rejected": -60 - level,
                        "grad_norm": 8 + rng.random() * 4, "nonfinite_steps": 0, "tokens": 790 + rng.randint(-50, 50),
                        "lr": lr, "epoch": step / 60, "time/update": 5.0, "time/step": 5.1, "tokens_per_s": 150.0})
    return history


def rm_stream(n: int = N, seed: int = 0, rate: float = 0.05) -> list[dict]:
    """A reward-model run: a Bradley-Terry loss plus the centering term, margins growing."""
    rng = random.Random(seed)
    history, level = [], 0.0
    for step in range(1, n + 1):
        level += rate
        m = pairs_step(rng, level, 1.0)
        history.append({"step": step, **m, "bt_loss": m["loss"], "center_loss": abs(rng.gauss(0.5, 0.3)),
                        "grad_norm": 2 + rng.random(), "nonfinite_steps": 0, "lr": 1e-5, "time/update": 0.5,
                        "time/step": 0.5, "tokens_per_s": 900.0})
    return history


def ppo_stream(n: int = N, seed: int = 0, gain: float = 2.0) -> list[dict]:
    """A PPO run with one completion per prompt (group_size 1: every "group" has zero variance, which
    says nothing under a critic) scored by a reward model, the mean score rising by ``gain``."""
    rng = random.Random(seed)
    history = []
    for step in range(1, n + 1):
        mean = -0.5 + gain * step / n + rng.gauss(0, 0.15)
        kl = 0.002 + 0.02 * step / n + abs(rng.gauss(0, 0.002))
        history.append({
            "step": step, "reward/mean": mean, "reward/std": 1.2, "reward/none": 0.0, "reward/reward_model": mean,
            "reward/reward_model/none": 0.0, "frac_zero_std": 1.0, "returns/mean": mean - 0.1, "value/mean": mean - 0.2,
            "explained_variance": min(0.6, step / n), "kl_coef": 0.1, "kl": kl, "kl/k1": kl * 1.1, "kl/seq": kl * 40,
            "non_score_reward": -0.1 * kl * 40, "loss": rng.gauss(0.1, 0.05), "pg_loss": rng.gauss(0, 0.01),
            "value_loss": 0.3 + rng.random() * 0.1, "clip_frac": abs(rng.gauss(0.05, 0.02)), "approx_kl": 1e-3,
            "ratio/mean": 1.0, "entropy": 1.8 - 0.3 * step / n + rng.gauss(0, 0.03), "value_clip_frac": 0.1,
            "grad_norm": 0.8, "value_grad_norm": 3.0, "nonfinite_steps": 0, "lr": 1e-5,
            "len/mean": 40 + rng.gauss(0, 3), "len/clipped_frac": abs(rng.gauss(0.05, 0.02)), "adv/abs_mean": 0.8})
    return history


@pytest.mark.parametrize("seed", range(4))
def test_healthy_dpo_streams_trigger_nothing(seed):
    for schedule in ("constant", "cosine"):
        assert diagnose(dpo_stream(seed=seed, schedule=schedule)) == [], schedule


@pytest.mark.parametrize("seed", range(4))
def test_healthy_reward_model_and_ppo_streams_trigger_nothing(seed):
    assert diagnose(rm_stream(seed=seed)) == []
    assert diagnose(ppo_stream(seed=seed)) == []


def test_rules_skip_when_their_metrics_are_absent():
    """Each rule, on every prefix of a DPO and a reward-model stream (and of a bare loss stream), returns
    None: nothing here carries KL, entropy, lengths, clip fractions, judge counters or samples."""
    bare = [{"step": s, "loss": 0.7 - 0.001 * s} for s in range(1, 101)]
    for history in (dpo_stream(n=100), rm_stream(n=100), bare):
        for i in range(1, len(history) + 1):
            ctx = Context(history[:i], [], Thresholds())
            fired = {name for name, rule in RULES.items() if rule(ctx) is not None}
            assert not fired & {"kl_above_target", "kl_exploding", "length_hacking", "length_clipped",
                                "format_hacking", "entropy_collapse", "clip_frac_high", "judge_failures",
                                "reward_none"}, (i, fired)
            if history is bare:
                assert fired == set(), (i, fired)


def test_stuck_dpo_margin_is_a_plateau_about_the_pairs_not_a_reward_function():
    history = dpo_stream(rate=0.0)  # the margin never moves: learning rate far too low, or pairs that are ties
    events = [e for e in diagnose(history) if e.rule == "reward_plateau"]
    assert events and events[0].step <= 60
    for ev in events:
        assert "rewards/margin" in ev.symptom
        assert "pairs" in ev.cause and "learning rate too low" in ev.cause
        assert "posttrain score" not in ev.fix and "dynamic-sampling" not in ev.fix
        assert "increase the learning rate" in ev.fix


def test_flat_reward_at_the_end_of_a_decaying_schedule_is_not_a_plateau():
    """A margin flattening as a cosine schedule anneals the learning rate is quiet (the rule is off once
    the rate is below a quarter of its peak: the last ~45 of 150 steps); a margin that never moved is
    reported long before that."""
    cosine = dpo_stream(schedule="cosine", seed=3)
    assert [e.rule for e in diagnose(cosine)] == []
    assert "reward_plateau" in {e.rule for e in diagnose(cosine, annealed_lr_frac=0.0)}
    stuck = dpo_stream(schedule="cosine", rate=0.0)
    assert [e.step for e in diagnose(stuck) if e.rule == "reward_plateau"][0] <= 60  # long before annealing


def test_stuck_ppo_reward_does_not_blame_zero_variance_groups_under_a_critic():
    history = ppo_stream(gain=0.0)
    events = [e for e in diagnose(history) if e.rule == "reward_plateau"]
    assert len(events) == 1 and "zero reward variance" not in events[0].cause
    assert "learning rate too low" in events[0].cause
    for h in history:  # the same stream from GRPO (no critic): identical groups do explain it
        for k in ("value_loss", "value/mean", "explained_variance", "value_clip_frac", "value_grad_norm"):
            h.pop(k)
    grpo = [e for e in diagnose(history) if e.rule == "reward_plateau"]
    assert "100% of groups have zero reward variance" in grpo[0].cause
