"""Online DPO on the tiny model with a toy reward: the pairs of a round (best vs worst, skipped groups
counted), the reference (the initial model, or the policy at each round's start) stored with the
round's pairs, learning, a reference-free loss, exact resume mid-round, and the CLI's errors."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from posttrain.algorithms import dpo_data as dd
from posttrain.algorithms import rounds
from posttrain.algorithms.online_dpo import OnlineDPOConfig, pair_groups, train_online_dpo
from posttrain.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

TOY_REWARD = "format(pattern=[a-m].*)"
TIMING = ("time/", "tokens_per_s")


def config(tmp_path, model_dir, data, **kw):
    base = dict(model=model_dir, data=data, reward=TOY_REWARD, rollout_dtype="float32", max_steps=8, group_size=8,
                prompts_per_round=8, steps_per_round=4, batch_size=8, max_new_tokens=2, output_dir=str(tmp_path),
                checkpoint_every=0, lr=1e-2, lora=False, eval_at_start=False, log_every=100)
    base.update(kw)
    return OnlineDPOConfig(**base)


def untimed(history):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in history]


def read_round(run_dir, k):
    return [json.loads(line) for line in (Path(run_dir) / "rounds" / f"round-{k}.jsonl").read_text().splitlines()]


def test_pairs_are_best_against_worst_and_skips_are_counted():
    groups = [rounds.Group({"prompt": "p1", "answer": "1"}, ["a", "b", "c"], [0.2, 0.9, 0.1]),
              rounds.Group({"prompt": "p2"}, ["d", "e"], [0.5, 0.5]),
              rounds.Group({"prompt": "p3"}, ["f", "g"], [None, 1.0]),
              rounds.Group({"prompt": "p4"}, ["h", "i", "j"], [1.0, 0.0, 1.0])]
    rows, metrics, picks = pair_groups(groups)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p1", "b", "c"), ("p4", "h", "i")]
    assert rows[0]["answer"] == "1" and rows[0]["chosen_score"] == 0.9 and rows[0]["rejected_score"] == 0.1
    assert picks == [(1, 2), "equal", "unjudged", (0, 1)]  # ties go to the first sampled
    assert metrics["round/pairs"] == 2 and metrics["round/skipped_equal"] == 1
    assert metrics["round/skipped_unjudged"] == 1
    assert metrics["round/chosen_reward"] == pytest.approx(0.95)
    assert metrics["round/rejected_reward"] == pytest.approx(0.05)


@pytest.mark.usefixtures("one_thread")
def test_reward_rises(tmp_path, peaked_dir, toy_prompts):
    # seed 1, lr 1e-2, 4 steps per round: the sampled reward went 0.38 -> 0.98 by round 9 (measured;
    # seed 0 got there too, from round 8); when every sample scores 1 there is no pair left and the run
    # stops early with its model saved. On an AVX512 Xeon of another model (family 6 model 167) the
    # float rounding differs and the same seed got there at round 12 (0.39 -> 0.97; seed 0 at round
    # 11), hence up to 15 rounds
    res = train_online_dpo(config(tmp_path, peaked_dir, toy_prompts, max_steps=60, seed=1, name="up"))
    per_round = [m["reward/mean"] for m in res.history if "reward/mean" in m]
    assert max(per_round[-2:]) - sum(per_round[:2]) / 2 > 0.35, per_round
    assert any(m.get("rewards/margin", 0) > 0 for m in res.history)
    assert (res.run_dir / "final").is_dir()


@pytest.mark.parametrize("ref_update", ["initial", "round"])
def test_reference_is_the_initial_model_or_the_round_start(tmp_path, peaked_dir, toy_prompts, ref_update):
    res = train_online_dpo(config(tmp_path, peaked_dir, toy_prompts, ref_update=ref_update, name=ref_update))
    rows = read_round(res.run_dir, 2)
    assert rows and all(len(r["ref_logps"]) == 2 for r in rows)
    initial, tok = load_model(peaked_dir)
    examples, _ = dd.encode_pairs(tok, rows, source="round")
    fresh = dd.sequence_logps(initial, examples, tok.pad_token_id)
    stored = {e.index: rows[e.index]["ref_logps"] for e in examples}
    gap = max(abs(a - b) for i in stored for a, b in zip(stored[i], fresh[i]))
    if ref_update == "initial":
        assert gap < 1e-3
    else:  # the policy after round 1's four steps scores the pairs differently
        assert gap > 1e-2


def test_reference_free_loss_stores_no_reference(tmp_path, tiny_dir, toy_prompts):
    res = train_online_dpo(config(tmp_path, tiny_dir, toy_prompts, loss_type="simpo", max_steps=4, name="simpo"))
    rows = read_round(res.run_dir, 1)
    assert rows and all("ref_logps" not in r for r in rows)
    assert res.history[-1]["loss"] == res.history[-1]["loss"]  # finite


def test_resume_in_the_middle_of_a_round_is_exact(tmp_path, peaked_dir, toy_prompts):
    # LoRA with the initial reference (the adapter disabled): the stored reference log-probs are read
    # back, not recomputed from the moved weights
    kw = dict(lora=True, lora_rank=4, lr=1e-2)
    full = train_online_dpo(config(tmp_path, peaked_dir, toy_prompts, max_steps=10, name="full", **kw))
    part = config(tmp_path, peaked_dir, toy_prompts, max_steps=6, name="part", checkpoint_every=6, **kw)
    train_online_dpo(part)
    resumed = train_online_dpo(dataclasses.replace(part, max_steps=10, resume=str(tmp_path / "part"))).history
    assert [m["step"] for m in resumed] == list(range(1, 11))
    assert untimed(resumed) == untimed(full.history)
    for k in (1, 2, 3):
        assert read_round(tmp_path / "part", k) == read_round(full.run_dir, k)


def test_cli_errors_name_the_flag_and_leave_nothing(tmp_path, tiny_dir, toy_prompts):
    r = terminal.posttrain("train", "online-dpo", "--model", tiny_dir, "--data", toy_prompts, "--reward", TOY_REWARD,
                           "--group-size", "1", "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "--group-size", "a pair needs two samples")
    r = terminal.posttrain("train", "online-dpo", "--model", tiny_dir, "--data", toy_prompts, "--reward", TOY_REWARD,
                           "--loss-type", "simpo", "--ref-update", "round", "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "--ref-update")
    r = terminal.posttrain("train", "online-dpo", "--model", tiny_dir, "--data", toy_prompts,
                           "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "--reward")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
