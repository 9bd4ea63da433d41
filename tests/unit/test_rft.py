"""Rejection-sampling fine-tuning on the tiny model with a toy reward: what a round keeps (threshold,
at most k per prompt, distinct texts), the round files, learning (the sampled reward rises round
after round), exact resume in the middle of a round, an early stop when no sample passes, and the
CLI's errors."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from posttrain.algorithms import rounds
from posttrain.algorithms.rft import RFTConfig, build, keep, train_rft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

TOY_REWARD = "format(pattern=[a-m].*)"  # 1 when the completion starts with a letter a-m: ~36% at the start
TIMING = ("time/", "tokens_per_s")


def config(tmp_path, model_dir, data, **kw):
    base = dict(model=model_dir, data=data, reward=TOY_REWARD, rollout_dtype="float32", max_steps=12, group_size=8,
                prompts_per_round=8, steps_per_round=4, batch_size=8, max_new_tokens=2, output_dir=str(tmp_path),
                checkpoint_every=0, lr=1e-2, lora=False, eval_at_start=False, log_every=100)
    base.update(kw)
    return RFTConfig(**base)


def untimed(history):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in history]


def read_round(run_dir, k):
    return [json.loads(line) for line in (Path(run_dir) / "rounds" / f"round-{k}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------- what a round keeps


def test_keep_threshold_distinct_texts_best_first_at_most_k():
    rewards = [0.5, 1.0, None, 1.0, 2.0, 1.0, 0.9]
    texts = ["a", "b", "c", "b", "d", "e", "f"]
    # >= 1.0: indices 1, 3, 4, 5; 3 repeats 1's text; the highest reward (4) first, ties in sampled order
    assert keep(rewards, texts, 1.0, 10) == [4, 1, 5]
    assert keep(rewards, texts, 1.0, 2) == [4, 1]
    assert keep(rewards, texts, 3.0, 10) == []
    assert keep([None, None], ["a", "b"], 0.0, 4) == []  # unjudged samples never pass


def test_build_rows_and_round_metrics():
    cfg = RFTConfig(task="arithmetic", reward_threshold=1.0, keep_per_prompt=1)
    groups = [rounds.Group({"prompt": "p1", "answer": "3"}, ["x", "y", "z"], [1.0, 1.0, 0.0]),
              rounds.Group({"prompt": [{"role": "user", "content": "p2"}]}, ["u", "v", "w"], [0.0, None, 0.0])]
    rows, metrics, marks = build(cfg, groups)
    assert rows == [{"prompt": "p1", "completion": "x", "reward": 1.0, "answer": "3"}]
    assert metrics["round/kept"] == 1 and metrics["round/kept_frac"] == pytest.approx(1 / 6)
    assert metrics["round/prompts_kept"] == 1 and metrics["round/prompts_kept_frac"] == 0.5
    assert marks(0) == {"kept": [0]} and marks(1) == {"kept": []}
    # a conversational prompt gets its completion as an assistant message
    cfg2 = dataclasses.replace(cfg, reward_threshold=0.0)
    rows2, _, _ = build(cfg2, groups[1:])
    assert rows2[0]["completion"] == [{"role": "assistant", "content": "u"}]


# ----------------------------------------------------------------------------------------- training


@pytest.mark.usefixtures("one_thread")
def test_reward_rises_round_after_round_and_rounds_are_kept(tmp_path, peaked_dir, toy_prompts):
    # one thread: sampling turns float rounding into other draws. Seed 0, lr 1e-2, 8 rounds of 4 steps:
    # the sampled reward went 0.36 -> 0.92 (seed 1: 0.38 -> 0.98; measured)
    res = train_rft(config(tmp_path, peaked_dir, toy_prompts, max_steps=32, name="rft", keep_per_prompt=3))
    hist = res.history
    per_round = [m["reward/mean"] for m in hist if "reward/mean" in m]
    assert len(per_round) == 8 and [m["round"] for m in hist] == [k for k in range(1, 9) for _ in range(4)]
    assert sum(per_round[-2:]) / 2 - sum(per_round[:2]) / 2 > 0.35, per_round
    for k in range(1, 9):
        rows = read_round(res.run_dir, k)
        made = next(m for m in hist if m["round"] == k and "round/kept" in m)
        assert len(rows) == made["round/kept"] > 0
        assert all(r["reward"] >= 1.0 and set(r) == {"prompt", "completion", "reward"} for r in rows)
        per_prompt = {}
        for r in rows:
            per_prompt.setdefault(r["prompt"], []).append(r["completion"])
        assert all(len(c) <= 3 and len(set(c)) == len(c) for c in per_prompt.values())
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"round", "kept", "completions", "rewards"} <= set(samples[0])
    assert (res.run_dir / "final").is_dir()


def test_epochs_per_round_sets_the_round_length(tmp_path, tiny_dir, toy_prompts):
    res = train_rft(config(tmp_path, tiny_dir, toy_prompts, steps_per_round=0, epochs_per_round=2.0, batch_size=4,
                           max_steps=3, reward_threshold=-1.0, keep_per_prompt=1, name="ep"))
    first = res.history[0]
    # every sample passes a threshold of -1: one kept per prompt, 8 rows, 2 epochs of batch 4 = 4 steps
    assert first["round/kept"] == 8 and first["round/steps"] == 4


def test_resume_in_the_middle_of_a_round_is_exact(tmp_path, peaked_dir, toy_prompts):
    full = train_rft(config(tmp_path, peaked_dir, toy_prompts, max_steps=10, name="full", checkpoint_every=0))
    part = config(tmp_path, peaked_dir, toy_prompts, max_steps=6, name="part", checkpoint_every=6)
    train_rft(part)  # stops at step 6: round 2, after 2 of its 4 steps
    resumed = train_rft(dataclasses.replace(part, max_steps=10, resume=str(tmp_path / "part"))).history
    assert [m["step"] for m in resumed] == list(range(1, 11))
    assert untimed(resumed) == untimed(full.history)
    for k in (1, 2, 3):
        assert read_round(tmp_path / "part", k) == read_round(full.run_dir, k)


def test_no_sample_passes_stops_early_with_the_model_saved(tmp_path, tiny_dir, toy_prompts):
    res = train_rft(config(tmp_path, tiny_dir, toy_prompts, reward_threshold=2.0, max_empty_rounds=2, name="none",
                           eval_at_start=True, task=None))
    stopped = json.loads((res.run_dir / "stopped.json").read_text())
    assert stopped["step"] == 0 and "--reward-threshold" in stopped["reason"]
    assert (res.run_dir / "final").is_dir()
    assert [read_round(res.run_dir, k) for k in (1, 2)] == [[], []]  # the empty rounds are kept for review


# ----------------------------------------------------------------------------------------- terminal


def test_cli_bad_flag_is_refused_naming_it_and_nothing_is_left(tmp_path, tiny_dir, toy_prompts):
    r = terminal.posttrain("train", "rft", "--model", tiny_dir, "--data", toy_prompts, "--reward", TOY_REWARD,
                           "--keep-per-prompt", "0", "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "--keep-per-prompt")
    r = terminal.posttrain("train", "rft", "--model", tiny_dir, "--data", toy_prompts, "--reward", TOY_REWARD,
                           "--prompts-per-step", "4", "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "--prompts-per-step", "--prompts-per-round")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_bad_prompt_row_names_file_and_line(tmp_path, tiny_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Say a word."}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    r = terminal.posttrain("train", "rft", "--model", tiny_dir, "--data", data, "--reward", TOY_REWARD,
                           "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "bad.jsonl:2", "prompt")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
