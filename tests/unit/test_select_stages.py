"""The decision tree's stages around RL (posttrain.doctrine.select, .stages, .probe): a teacher ->
on-policy distillation, the base model's pass rate near zero -> RFT first (SFT and distillation named),
and `posttrain recommend` / `train auto` measuring it on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from posttrain.doctrine.probe import Probe, probe_reasons, rft_group_size, summarise, with_success
from posttrain.doctrine.select import choose_method, recommend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def never_solved(tmp_path):
    """Prompts whose answer a random tiny model never writes: the math reward is 0 on every sample."""
    return _jsonl(tmp_path / "hard.jsonl", [{"prompt": f"What is {i} times 7919?", "answer": str(i * 7919 + 123456789)}
                                            for i in range(12)])


def _probe(rate: float, prompts: int = 16, samples: int = 4) -> Probe:
    return Probe("math", prompts, samples, rate, min(1.0, rate * samples), rate, 1 - rate, 0)


# ---------------------------------------------------------------- the probe's arithmetic


def test_summarise_counts_passes_groups_and_flat_groups():
    pr = summarise([[0.0, 0.0, 0.0], [1.0, 0.0, None], [1.0, 1.0, 1.0], [float("nan"), 0.0, 0.0]], "math")
    assert (pr.prompts, pr.samples, pr.unjudged) == (4, 3, 2)
    assert pr.pass_rate == pytest.approx(4 / 10) and pr.pass_at_k == pytest.approx(2 / 4)
    assert pr.flat_frac == pytest.approx(3 / 4)  # [0,0,0], [1,1,1], [0,0]: GRPO's frac_zero_std
    assert not pr.near_zero and not pr.too_easy
    assert summarise([[0.0] * 4] * 3, "math").near_zero and summarise([[1.0] * 4] * 3, "math").too_easy


def test_rft_group_size_grows_with_rarer_successes():
    assert rft_group_size(0.03) == 23 and with_success(0.03, 23) >= 0.5  # issue 18's task: 3%
    assert rft_group_size(0.3) == 16  # at least twice GRPO's 8
    assert rft_group_size(0.0) == rft_group_size(0.001) == 32  # capped
    hard = probe_reasons(_probe(0.03))[0]
    assert "near zero" in hard and "78% of GRPO's groups of 8" in hard
    assert "no success in 64 samples" in probe_reasons(_probe(0.0))[0]
    assert "enough signal for GRPO" in probe_reasons(_probe(0.3))[0]
    assert "little left to learn" in probe_reasons(_probe(1.0))[0]


# ---------------------------------------------------------------- the tree's new branches


def test_near_zero_pass_rate_proposes_rft_first_with_reasons(tmp_path):
    math = _jsonl(tmp_path / "math.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}] * 3)
    asked = []
    rec = recommend(math, probe=lambda spec: asked.append(spec) or _probe(0.03))
    assert asked == ["math"]  # the verifiable reward the data implies
    assert rec.method == rec.train_method == "rft" and rec.defaults["group_size"] == 23
    assert rec.defaults["lora_rank"] == 64 and rec.defaults["lr"] == 2e-4  # the SFT rank and learning rate
    assert rec.command.startswith(f"posttrain train rft --data {math} --reward math")
    assert any("-> RFT first" in r and "SFT comes first instead when demonstrations exist" in r for r in rec.reasons)
    assert rec.probe["pass_rate"] == 0.03 and rec.probe["near_zero"]
    alts = {a["method"]: a["command"] for a in rec.alternatives}
    assert alts["sft"].startswith("posttrain train sft --data") and "--teacher" in alts["distill"]
    assert "--dynamic-sampling" in alts["grpo"]
    healthy = recommend(math, probe=lambda spec: _probe(0.3))
    assert healthy.method == "grpo" and any("enough signal for GRPO" in r for r in healthy.reasons)
    assert recommend(math).probe is None  # no probe given: nothing measured, GRPO as before


def test_learned_rewards_and_judges_are_not_probed(tmp_path):
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "Write a haiku."}] * 2)
    never = lambda spec: pytest.fail("probed a reward with no pass threshold")  # noqa: E731
    assert recommend(plain, reward="reward_model(rm)", probe=never).method == "ppo"
    assert recommend(plain, judge="judge.yaml", probe=never).method == "rlaif"


def test_a_teacher_gives_on_policy_distillation(tmp_path, tiny_dir):
    rec = recommend("arithmetic", teacher=tiny_dir, model=tiny_dir,
                    probe=lambda spec: pytest.fail("a teacher needs no probe"))
    assert rec.method == rec.train_method == "distill"
    line = next(r for r in rec.reasons if r.startswith("a stronger teacher? yes"))
    assert "not larger" in line and "reverse KL" in line  # the same model: it must be better on the task
    assert rec.defaults["teacher"] == tiny_dir and rec.defaults["reward"] == "math"
    assert rec.command.startswith(f"posttrain train distill --task arithmetic --model {tiny_dir} --teacher {tiny_dir}")
    method, _, fields = choose_method(task="arithmetic", teacher=tiny_dir, model=tiny_dir)
    assert method == "distill" and fields["teacher"] == tiny_dir
    # demonstrations still come first; a teacher without prompts is not used
    demos = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "2 + 3?", "completion": "5"}] * 2)
    assert recommend(demos, teacher=tiny_dir).method == "sft"
    assert recommend(teacher=tiny_dir, reward="math").method == "grpo"


def test_train_auto_launches_each_new_stage(tmp_path, tiny_dir):
    """The methods the tree now picks are `posttrain train` methods whose configs take its fields."""
    from posttrain.commands.train import resolve
    from posttrain.runtime import config

    math = _jsonl(tmp_path / "math.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}] * 3)
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "Write a haiku."}] * 2)
    picks = [(choose_method(data=math, probe=lambda spec: _probe(0.0)), {"data": math}),
             (choose_method(task="arithmetic", teacher=tiny_dir, model=tiny_dir), {"task": "arithmetic"}),
             (choose_method(data=plain, reward="reward_model(rm)", model="8B", gpu_memory_gb=24), {"data": plain})]
    assert [p[0][0] for p in picks] == ["rft", "distill", "online-dpo"]
    for (method, _, fields), source in picks:
        cls, _ = resolve(method)
        names = {f.name for f in __import__("dataclasses").fields(cls)}
        assert set(fields) <= names, set(fields) - names
        config.build(cls, {**fields, **source}, source="test")  # a valid config


# ---------------------------------------------------------------- the probe on the tiny model, and the CLI


def test_probe_on_the_tiny_model_is_deterministic_and_near_zero_proposes_rft(never_solved, tiny_dir):
    from posttrain.commands.recommend import measure_probe

    a = measure_probe(never_solved, "math", tiny_dir, prompts=6, samples=3, max_new_tokens=8, seed=1)
    b = measure_probe(never_solved, "math", tiny_dir, prompts=6, samples=3, max_new_tokens=8, seed=1)
    assert (a.prompts, a.samples) == (6, 3) and a.pass_rate == 0.0 and a.near_zero and a.flat_frac == 1.0
    assert {k: v for k, v in a.to_dict().items() if k != "seconds"} == {k: v for k, v in b.to_dict().items()
                                                                        if k != "seconds"}
    easy = measure_probe(never_solved, "format(pattern=(?s).*)", tiny_dir, prompts=4, samples=2, max_new_tokens=4)
    assert easy.pass_rate == 1.0 and easy.too_easy and not easy.near_zero
    rec = recommend(never_solved, model=tiny_dir, probe=lambda spec: measure_probe(
        never_solved, spec, tiny_dir, prompts=6, samples=3, max_new_tokens=8, seed=1))
    assert rec.method == "rft" and rec.probe["pass_rate"] == 0.0 and rec.defaults["group_size"] == 32


def test_cli_recommend_probes_the_base_model(never_solved, tiny_dir):
    proc = terminal.posttrain("recommend", "--data", never_solved, "--model", tiny_dir, "--probe-prompts", "4",
                              "--probe-samples", "2", "--probe-max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["method"] == "rft" and out["probe"]["prompts"] == 4 and out["probe"]["samples"] == 2
    assert out["probe"]["pass_rate"] == 0.0 and out["command"].startswith("posttrain train rft")
    assert any("base model's pass rate?" in r and "near zero" in r for r in out["reasons"])
    skipped = terminal.posttrain("recommend", "--data", never_solved, "--model", tiny_dir, "--no-probe", "--json")
    assert skipped.returncode == 0 and json.loads(skipped.stdout)["method"] == "grpo"


def test_cli_bad_probe_flag_and_a_teacher_with_another_tokenizer_are_refused(never_solved, tiny_dir, tmp_path):
    terminal.assert_user_error(terminal.posttrain("recommend", "--data", never_solved, "--probe-prompts", "0"),
                               "--probe-prompts", "must be >= 1")
    from posttrain.models import load_tokenizer

    other = tmp_path / "other-teacher"
    tok = load_tokenizer(tiny_dir)
    tok.add_tokens(["<only-the-teacher-has-this>"])
    tok.save_pretrained(other)
    (other / "config.json").write_text((Path(tiny_dir) / "config.json").read_text())
    before = terminal.snapshot(tmp_path)
    err = terminal.assert_user_error(terminal.posttrain("train", "auto", "--data", never_solved, "--model", tiny_dir,
                                                        "--teacher", str(other), "--dry-run", cwd=tmp_path),
                                     "--teacher", "tokenizer")
    assert "vocabularies differ" in err and terminal.snapshot(tmp_path) == before  # nothing loaded, nothing written


def test_a_task_spec_keeps_its_arguments_in_the_command():
    rec = recommend("arithmetic(digits=3)")
    assert rec.data.task == "arithmetic(digits=3)" and "--task 'arithmetic(digits=3)'" in rec.command
