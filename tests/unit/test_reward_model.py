"""Reward model: the Bradley-Terry loss with its margin and centering terms (hand-worked values),
learning on a toy preference set, the save/load round trip, the `reward_model` reward, and the
arithmetic preference set."""

import json
import math
import random

import pytest
import torch

from posttrain.algorithms.reward_model import (RewardModelConfig, bradley_terry_loss, load_reward_model,
                                               train_reward_model)

GOOD = ["apple", "bread", "candle", "dragon", "eagle", "forest", "garden", "harbor"]
BAD = ["night", "ocean", "piano", "quartz", "rocket", "silver", "tiger", "violet"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model ops gain nothing from a second thread on a shared 2-core machine (see test_ppo)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_prefs(tmp_path_factory):
    """Chosen: a word from GOOD; rejected: a word from BAD, under varied prompts (a quarter of the
    pairs held out by the run: the same words, paired differently, under new prompts)."""
    rng = random.Random(0)
    rows = [{"prompt": f"Name a thing, number {i}.", "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD)}
            for i in range(64)]
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def toy_config(tmp_path, model_dir, data, **kw):
    base = dict(model=model_dir, data=str(data), output_dir=str(tmp_path), max_steps=30, batch_size=8, lr=3e-3,
                eval_fraction=0.25, checkpoint_every=0, log_every=100, lora_rank=8)
    base.update(kw)
    return RewardModelConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, toy_prefs):
    out = tmp_path_factory.mktemp("rm-runs")
    return train_reward_model(toy_config(out, tiny_dir, toy_prefs[0], name="plain"))


def test_bradley_terry_loss_hand_values():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = 0.313262, -log sigmoid(0) = 0.693147
    loss, m = bradley_terry_loss(rc, rr)
    assert math.isclose(float(loss), (0.313262 + 0.693147) / 2, abs_tol=1e-5)
    assert float(m["rewards/accuracy"]) == 0.5 and math.isclose(float(m["rewards/margin"]), 0.5)
    # a margin m asks for r_c - r_r > m: -log sigmoid(1 - 0.5) = 0.474077, -log sigmoid(0 - 1) = 1.313262
    loss, _ = bradley_terry_loss(rc, rr, margin_B=torch.tensor([0.5, 1.0]))
    assert math.isclose(float(loss), (0.474077 + 1.313262) / 2, abs_tol=1e-5)
    # centering: + coef * mean((r_c + r_r)^2) = 0.1 * (1 + 0) / 2
    loss, m = bradley_terry_loss(rc, rr, center_coef=0.1)
    assert math.isclose(float(loss), (0.313262 + 0.693147) / 2 + 0.05, abs_tol=1e-5)
    assert math.isclose(float(m["center_loss"]), 0.5)


def test_centering_pins_the_level_that_bradley_terry_leaves_free():
    rc, rr = torch.tensor([2.0, 1.0]), torch.tensor([0.5, -1.0])
    shifted = [bradley_terry_loss(rc + c, rr + c)[0] for c in (0.0, 3.0, -7.0)]
    assert all(math.isclose(float(s), float(shifted[0]), abs_tol=1e-6) for s in shifted)  # shift-invariant
    centered = {c: float(bradley_terry_loss(rc + c, rr + c, center_coef=0.01)[0]) for c in (-3.0, -1.25, 0.0, 3.0)}
    # mean of r_c + r_r is 0.75 + 2c: the penalty is least at c = -0.375, so -1.25 and 0 beat +-3
    assert min(centered, key=centered.get) in (-1.25, 0.0) and centered[3.0] > centered[0.0]
    shift = torch.zeros((), requires_grad=True)
    bradley_terry_loss(rc + shift, rr + shift, center_coef=0.01)[0].backward()
    assert float(shift.grad) > 0  # the gradient pushes the scores' level down, toward 0


def test_bradley_terry_learns_the_toy_preferences(trained):
    before, after = trained.evals[0], trained.evals[-1]
    assert before["step"] == 0 and after["step"] == 30 and after["n"] == 16
    assert before["accuracy"] < 0.8, before  # not solved by the random head
    assert after["accuracy"] >= 0.9 and after["margin"] > before["margin"] + 1.0, (before, after)
    losses = [m["loss"] for m in trained.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_save_load_round_trip_and_reward_function(trained, toy_prefs):
    from posttrain import rewards as rw

    final = trained.run_dir / "final"
    for f in ("adapter_model.safetensors", "value_head.safetensors", "value_head.json", "tokenizer_config.json"):
        assert (final / f).is_file(), f
    meta = json.loads((final / "value_head.json").read_text())
    assert meta["format"] == "posttrain-reward-model" and meta["eval"]["accuracy"] == trained.evals[-1]["accuracy"]
    from posttrain.algorithms import inputs

    held = inputs.load_rows_for(toy_config(".", "m", toy_prefs[0]), "preference")[1]  # the run's held-out pairs
    prompts = [r["prompt"] for r in held]
    rm = load_reward_model(trained.run_dir)  # a run directory resolves to its final/
    chosen, rejected = rm.score(prompts, [r["chosen"] for r in held]), rm.score(prompts, [r["rejected"] for r in held])
    unmerged = load_reward_model(final, merge=False).score(prompts, [r["chosen"] for r in held])
    assert max(abs(a - b) for a, b in zip(chosen, unmerged)) < 1e-4
    # the loaded model reproduces the run's last evaluation on those pairs
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held) == trained.evals[-1]["accuracy"]
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(held)
    assert margin == pytest.approx(trained.evals[-1]["margin"], abs=1e-3)
    # as a reward: one batched forward per batch_size completions, the same numbers
    fn = rw.from_spec(f"reward_model({final}):2")
    totals, parts = rw.score_batch(fn, prompts[:4], [r["chosen"] for r in held[:4]], held[:4])
    assert parts["reward_model"] == pytest.approx(chosen[:4], abs=1e-5)
    assert totals == pytest.approx([2 * c for c in chosen[:4]], abs=1e-5)


def test_grouped_scoring_equals_one_by_one(trained):
    rm = load_reward_model(trained.run_dir)
    prompts = ["Name a thing, number 1."] * 3 + ["Name a thing, number 2."] * 3
    responses = ["apple", "ocean", "tiger", "bread", "piano", "garden"]
    grouped = rm.score(prompts, responses, batch_size=6)  # runs of 3 equal prompts: each run once
    single = [rm.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert grouped == pytest.approx(single, abs=1e-5)


def test_margin_column_enters_the_loss(tmp_path, tiny_dir, toy_prefs, trained):
    rows = [{**r, "margin": 3.0} for r in toy_prefs[1]]
    path = tmp_path / "margin.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train_reward_model(toy_config(tmp_path, tiny_dir, path, name="margin", max_steps=3, eval_at_start=False))
    plain, margin = trained.history[0], res.history[0]
    # step 1 scores the same pairs with the same weights: the same gap, but the loss asks for 3 more;
    # with gaps near 0, -log sigmoid(d - 3) is about 3.05 against 0.69
    assert margin["rewards/margin"] == pytest.approx(plain["rewards/margin"], abs=1e-6)
    assert margin["loss"] > plain["loss"] + 2.0, (plain["loss"], margin["loss"])


def test_centering_sets_the_level_that_bradley_terry_cannot_see(tmp_path, tiny_dir, toy_prefs, trained):
    from safetensors.torch import load_file

    res = train_reward_model(toy_config(tmp_path, tiny_dir, toy_prefs[0], name="center", center_coef=0.5,
                                        eval_at_start=False))
    bias = lambda run: float(load_file(run.run_dir / "final" / "value_head.safetensors")["linear.bias"])
    assert bias(trained) == 0.0  # r_c - r_r cancels the head's bias: its gradient is exactly 0
    assert bias(res) != 0.0
    centered = res.evals[-1]
    assert abs(centered["score/mean"]) < 0.1 and centered["accuracy"] >= 0.9, centered


def test_checkpoint_holds_the_head_and_resume_continues(tmp_path, tiny_dir, toy_prefs):
    cfg = toy_config(tmp_path, tiny_dir, toy_prefs[0], name="ck", max_steps=4, checkpoint_every=2, eval_at_start=False)
    straight = train_reward_model(cfg)
    ck = straight.run_dir / "checkpoints" / "step-4"
    state = torch.load(ck / "optimizer.pt", weights_only=False)
    assert set(state) == {"optimizer", "head"} and state["head"]["linear.weight"].shape == (1, 64)
    # resume from step 2 in a copy of the run: the last two steps repeat exactly
    import shutil

    copy = tmp_path / "ck-resumed"
    shutil.copytree(straight.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    shutil.rmtree(copy / "final")
    resumed = train_reward_model(toy_config(tmp_path, tiny_dir, toy_prefs[0], max_steps=4, checkpoint_every=2,
                                            eval_at_start=False, resume=str(copy)))
    strip = lambda h: [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per_s"))} for m in h]
    assert strip(resumed.history) == strip(straight.history)


def test_arithmetic_preferences_are_deterministic_and_disjoint():
    from posttrain.data.tasks.arithmetic_prefs import arithmetic_preferences

    a, b = arithmetic_preferences(50, seed=1), arithmetic_preferences(50, seed=1)
    assert a == b and a != arithmetic_preferences(50, seed=2)
    for r in a:
        assert r["chosen"] != r["rejected"]
        assert r["chosen"].endswith(f"Answer: {r['answer']}") and not r["rejected"].endswith(f"Answer: {r['answer']}")
    test = arithmetic_preferences(50, seed=1, split="test")
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in test}


def test_rm_task_needs_preference_pairs(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="preference"):
        train_reward_model(RewardModelConfig(model=tiny_dir, task="countdown", output_dir=str(tmp_path)))


def test_trained_reward_model_is_the_reward_of_grpo_and_pairs(trained, tmp_path, tiny_dir, toy_prompts):
    """`reward_model(PATH)` in `train grpo` and in `posttrain pairs`: the rewards logged and written
    are the reward model's scores of those very completions."""
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo
    from posttrain.cli import main

    final = trained.run_dir / "final"
    rm = load_reward_model(final)
    spec = f"reward_model({final})"
    res = train_grpo(GRPOConfig(model=tiny_dir, data=toy_prompts, reward=spec, max_steps=2, group_size=4,
                                prompts_per_step=2, max_new_tokens=4, output_dir=str(tmp_path), name="grpo-rm",
                                checkpoint_every=0, eval_size=0, samples_per_step=2))
    assert all("reward/reward_model" in m for m in res.history)
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        scores = rm.score([s["prompt"]] * len(s["completions"]), s["completions"])
        assert s["rewards"] == pytest.approx(scores, abs=1e-4)

    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--model", tiny_dir, "--data", toy_prompts, "--reward", spec, "--n", "4",
                 "--max-new-tokens", "4", "--out", str(out), "--limit", "4"]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs
    for p in pairs:
        chosen, rejected = rm.score([p["prompt"]] * 2, [p["chosen"], p["rejected"]])
        assert p["chosen_score"] == pytest.approx(chosen, abs=1e-4)
        assert p["rejected_score"] == pytest.approx(rejected, abs=1e-4) and chosen > rejected
