"""The doctor's rules on synthetic metric streams: each fires on its symptom and stays quiet on a
healthy run (RL_DOCTRINE.md: Debugging table, Reward Hacking)."""

from __future__ import annotations

import json
import math
import random

import pytest

from posttrain.doctrine import doctor
from posttrain.doctrine.doctor import Doctor, Thresholds, diagnose
from posttrain.doctrine.doctor.rules.format import echoes

N = 80


def healthy(n: int = N, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A GRPO arithmetic run that learns: reward 0.2 -> 0.6, small KL, stable length and entropy."""
    rng = random.Random(seed)
    history, samples = [], []
    for step in range(1, n + 1):
        p = 0.2 + 0.4 * step / n
        history.append({
            "step": step, "reward/mean": p + rng.gauss(0, 0.03), "reward/std": 0.45, "reward/math": p,
            "reward/none": 0.0, "kl": 0.001 + 0.01 * step / n + abs(rng.gauss(0, 0.001)),
            "entropy": 0.8 - 0.2 * step / n + rng.gauss(0, 0.02), "clip_frac": abs(rng.gauss(0.02, 0.01)),
            "len/mean": 30 + rng.gauss(0, 2), "len/clipped_frac": abs(rng.gauss(0.05, 0.02)),
            "frac_zero_std": 0.25, "loss": rng.gauss(0, 0.1), "grad_norm": 0.5 + rng.random(),
            "nonfinite_steps": 0, "lr": 1e-5,
        })
        for g in range(2):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            completions, rewards = [], []
            for k in range(4):
                right = rng.random() < p
                c = a + b if right else a + b + rng.randint(1, 9)
                opener = rng.choice(["To add", "Adding", "We compute", "First,"])
                completions.append(f"{opener} {a} and {b}: {a} + {b} = {c}. Answer: {c}")
                rewards.append(1.0 if right else 0.0)
            samples.append({"step": step, "prompt": f"What is {a} + {b}? Put the final answer after 'Answer:'.",
                            "completions": completions, "rewards": rewards})
    return history, samples


def rules_fired(history, samples=(), **kw) -> set[str]:
    return {e.rule for e in diagnose(history, samples, **kw)}


def test_healthy_run_triggers_nothing():
    for seed in range(3):
        history, samples = healthy(seed=seed)
        assert diagnose(history, samples) == [], seed


def noisy(history, seed, p_of_step, k=16):
    """Replace the reward with the mean of k Bernoulli samples, as a real GRPO step of k completions."""
    rng = random.Random(seed)
    for h in history:
        p = p_of_step(h["step"])
        h["reward/mean"] = sum(rng.random() < p for _ in range(k)) / k
        h["reward/std"] = max(0.05, (p * (1 - p)) ** 0.5)
        h["kl"] = 0.0005 * h["step"] * (1 + rng.gauss(0, 0.2))
        h["len/mean"] = 35 + rng.gauss(0, 4)
    return history


def test_noisy_healthy_runs_trigger_nothing():
    """16 completions a step make the mean reward noisy (std ~0.12): no rule may mistake that for a
    plateau, a crash or a KL blow-up."""
    for seed in range(12):
        history, samples = healthy(n=60, seed=seed)
        noisy(history, seed, lambda s: 0.2 + 0.25 * s / 60)
        assert diagnose(history, samples) == [], seed


def test_noisy_flat_reward_is_a_plateau_and_noisy_collapse_a_crash():
    for seed in range(3):
        history, samples = healthy(n=80, seed=seed)
        noisy(history, seed, lambda s: 0.3)
        assert "reward_plateau" in rules_fired(history, samples), seed
        history, samples = healthy(n=80, seed=seed)
        noisy(history, seed, lambda s: 0.2 + 0.6 * min(s, 50) / 50 if s <= 55 else 0.1)
        assert "reward_crash" in rules_fired(history, samples), seed


def test_healthy_dpo_run_triggers_nothing():
    rng = random.Random(1)
    history = [{"step": s, "loss": 0.69 - 0.3 * s / N, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
                "rewards/margin": 0.02 * s + rng.gauss(0, 0.05), "rewards/accuracy": min(1, 0.5 + s / N / 2),
                "grad_norm": 1.0} for s in range(1, N + 1)]
    assert diagnose(history) == []


def test_reward_plateau_fires_and_names_zero_variance_and_none():
    history, samples = healthy()
    for h in history:
        h["reward/mean"] = 0.3 + 0.01 * math.sin(h["step"])
    plain = [e for e in diagnose(history, samples) if e.rule == "reward_plateau"]
    assert len(plain) == 1 and plain[0].step == 40, "a flat reward fires once, when the window is full"
    assert "learning rate too low" in plain[0].cause and "increase the learning rate" in plain[0].fix
    for h in history:
        h["frac_zero_std"] = 0.9
    zero = [e for e in diagnose(history, samples) if e.rule == "reward_plateau"]
    assert "zero reward variance" in zero[0].cause
    for s in samples:
        s["rewards"] = [None, None, 1.0, 0.0]
    none = [e for e in diagnose(history, samples) if e.rule == "reward_plateau"]
    assert "None for 50%" in none[0].cause


def test_reward_plateau_quiet_while_learning_even_if_slow():
    history, samples = healthy(n=120)  # 0.2 -> 0.6 over 120 steps: slow but steady
    assert "reward_plateau" not in rules_fired(history, samples)


def test_reward_crash_fires_after_spike():
    history, samples = healthy()
    for h in history:
        s = h["step"]
        h["reward/mean"] = 0.2 + 0.6 * min(s, 50) / 50 if s <= 55 else 0.05
    events = [e for e in diagnose(history, samples) if e.rule == "reward_crash"]
    assert events and events[0].severity == "error"
    assert 55 < events[0].step <= 62
    assert "Reduce LR" in events[0].fix or "reduce the learning rate" in events[0].fix


def test_kl_above_target_and_exploding():
    history, samples = healthy()
    for h in history:
        if h["step"] > 50:
            h["kl"] = 0.01 * 1.25 ** (h["step"] - 50)
    fired = rules_fired(history, samples)
    assert {"kl_above_target", "kl_exploding"} <= fired
    ev = next(e for e in diagnose(history, samples) if e.rule == "kl_exploding")
    assert "beta" in ev.fix and ev.severity == "error"


def test_steady_kl_ramp_from_zero_is_not_exploding():
    history, samples = healthy()
    for h in history:
        h["kl"] = 0.002 * h["step"]  # 0 -> 0.16: linear, the usual start of a run
    assert "kl_exploding" not in rules_fired(history, samples, kl_target=1.0)
    for h in history:
        h["kl"] = 0.08 * (1 - math.exp(-h["step"] / 10))  # fast rise, then flattening
    assert rules_fired(history, samples) & {"kl_exploding", "kl_above_target"} == set()


def test_kl_jump_after_a_flat_stretch_is_exploding():
    history, samples = healthy()
    for h in history:
        h["kl"] = 0.01 if h["step"] <= 60 else 0.01 + 0.02 * (h["step"] - 60)
    assert "kl_exploding" in rules_fired(history, samples)


def test_kl_target_is_a_threshold():
    history, samples = healthy()
    for h in history:
        h["kl"] = 0.05
    assert "kl_above_target" not in rules_fired(history, samples)
    assert "kl_above_target" in rules_fired(history, samples, kl_target=0.03)


def test_length_hacking_reward_rising_with_length():
    history, samples = healthy()
    for h in history:
        length = 20 + 3 * h["step"]
        h["len/mean"] = length
        h["reward/mean"] = length / 300 + random.Random(h["step"]).gauss(0, 0.01)
    events = [e for e in diagnose(history, samples) if e.rule == "length_hacking"]
    assert events and events[0].evidence["corr"] > 0.9
    assert "length penalty" in events[0].fix


def test_length_hacking_from_samples_when_reward_is_the_length():
    history, samples = healthy()
    rng = random.Random(3)
    for h in history:  # a modest length growth (10%) that the step-level rule alone would not flag
        h["len/mean"] = 40 + 4 * h["step"] / N + rng.gauss(0, 2)
        h["reward/mean"] = h["len/mean"] + rng.gauss(0, 3)
        h["reward/std"] = 8.0
    for s in samples:
        words = [rng.randint(20, 60) for _ in s["completions"]]
        s["completions"] = [" ".join(["word"] * k) for k in words]
        s["rewards"] = [float(k) for k in words]
    events = [e for e in diagnose(history, samples) if e.rule == "length_hacking"]
    assert events and events[0].evidence["sample_corr"] > 0.95 and events[0].evidence["corr"] < 0.7


def test_length_growth_without_reward_correlation_is_not_hacking():
    history, samples = healthy()
    rng = random.Random(5)
    for h in history:
        h["len/mean"] = 20 + 3 * h["step"]
        h["reward/mean"] = 0.4 + rng.gauss(0, 0.1)
        h["reward/std"] = 0.05
    assert "length_hacking" not in rules_fired(history, samples)


def test_length_clipped():
    history, samples = healthy()
    for h in history:
        h["len/clipped_frac"] = min(0.9, 0.05 + 0.02 * max(0, h["step"] - 30))
    assert "length_clipped" in rules_fired(history, samples)
    for h in history:  # high from the start but not rising: only fires when nearly everything is cut
        h["len/clipped_frac"] = 0.6
    assert "length_clipped" not in rules_fired(history, samples)
    for h in history:
        h["len/clipped_frac"] = 0.95
    assert "length_clipped" in rules_fired(history, samples)


def test_format_hacking_stock_phrase_rising_with_reward():
    history, samples = healthy()
    for s in samples:
        if s["step"] > 40:
            s["completions"] = [c + " I hope this helps!" for c in s["completions"]]
    events = [e for e in diagnose(history, samples) if e.rule == "format_hacking"]
    assert events and events[0].evidence["phrase"] == "i hope this helps"


def test_format_hacking_repeated_closer():
    history, samples = healthy()
    for s in samples:
        if s["step"] > 40:
            s["completions"] = [c + "\nThat is the best possible answer to this question." for c in s["completions"]]
    events = [e for e in diagnose(history, samples) if e.rule == "format_hacking"]
    assert events and "best possible answer" in events[0].evidence["phrase"]


def test_format_hacking_needs_reward_to_rise():
    history, samples = healthy()
    for h in history:
        h["reward/mean"] = 0.4
    for s in samples:
        s["rewards"] = [1.0, 0.0, 1.0, 0.0]
        if s["step"] > 40:
            s["completions"] = [c + " I hope this helps!" for c in s["completions"]]
    assert "format_hacking" not in rules_fired(history, samples)


def test_phrase_requested_by_the_prompt_is_not_hacking():
    history, samples = healthy()
    for s in samples:
        s["prompt"] += " End with: i hope this helps"
        if s["step"] > 40:
            s["completions"] = [c + " I hope this helps!" for c in s["completions"]]
    assert "format_hacking" not in rules_fired(history, samples)


def test_prompt_echo_rising_with_reward():
    """Completions that copy their question while the reward rises (rg:number_sequence, README): flagged;
    the same copies at a flat reward are not."""
    history, samples = healthy()
    for s in samples:
        s["prompt"] = f"4, 2, 1, 0, 0, ? (problem {s['step']})"
        if s["step"] > 40:
            s["completions"] = ["4, 2, 1, 0, 0, ?"] * len(s["completions"])
    events = [e for e in diagnose(history, samples) if e.rule == "prompt_echo"]
    assert events and events[0].evidence["share"] >= 0.25 and 41 <= events[0].step <= 50
    assert echoes("Continue: 4, 2, 1, 0, 0, ?", " 4, 2,  1, 0, 0, ? ") and not echoes("4, 2, 1", "0")
    for h in history:
        h["reward/mean"] = 0.4
    for s in samples:
        s["rewards"] = [1.0, 0.0, 1.0, 0.0]
    assert "prompt_echo" not in rules_fired(history, samples)


def test_entropy_collapse():
    history, samples = healthy()
    for h in history:
        h["entropy"] = max(0.01, 0.8 * 0.9 ** h["step"])
    assert "entropy_collapse" in rules_fired(history, samples)


def test_clip_frac_high():
    history, samples = healthy()
    for h in history:
        if h["step"] > 40:
            h["clip_frac"] = 0.45
    assert "clip_frac_high" in rules_fired(history, samples)


def test_nonfinite_fires_on_nan_loss_or_skipped_step():
    history, samples = healthy()
    history[30]["nonfinite_steps"] = 1
    history[60]["loss"] = "nan"
    events = [e for e in diagnose(history, samples) if e.rule == "nonfinite"]
    assert [e.step for e in events] == [31, 61]
    assert all(e.severity == "error" for e in events)


def test_judge_failures_from_rate_and_from_cumulative_counters():
    history, samples = healthy()
    for h in history:  # posttrain.rewards.judge logs a recent-window rate...
        h["judge/failure_rate"] = 0.02 if h["step"] <= 50 else 0.4
    events = [e for e in diagnose(history, samples) if e.rule == "judge_failures"]
    assert len(events) == 1 and events[0].step >= 51
    history, samples = healthy()
    for h in history:  # ...and cumulative counters: 64 requests a step, 2 failures (3%): fine
        h["judge/requests"], h["judge/failures"] = 64.0 * h["step"], 2.0 * h["step"]
    assert "judge_failures" not in rules_fired(history, samples)
    for h in history[60:]:  # then 20 of 64 fail (31%)
        h["judge/failures"] = 120.0 + 20.0 * (h["step"] - 60)
    assert "judge_failures" in rules_fired(history, samples)
    history, samples = healthy()
    for h in history:
        h["judge/judge_2/failure_rate"] = 0.5  # a second judge of a combined spec
    ev = [e for e in diagnose(history, samples) if e.rule == "judge_failures"]
    assert ev and ev[0].evidence["metric"] == "judge/judge_2/failure_rate"


def test_reward_none():
    history, samples = healthy()
    for s in samples[100:]:
        s["rewards"] = [None] * 4
    assert "reward_none" in rules_fired(history, samples)
    history, _ = healthy()
    for h in history[50:]:
        h.pop("reward/mean")
        h["reward/none"] = 16.0
    assert "reward_none" in rules_fired(history, [])


def test_check_reports_new_events_only_and_refires_after_clearing():
    history, samples = healthy(n=120)
    for h in history:
        if 30 < h["step"] <= 45 or 60 < h["step"] <= 62 or h["step"] > 90:
            h["kl"] = 0.5
    doc = Doctor(rules=["kl_above_target"])
    steps = []
    for i in range(1, len(history) + 1):
        steps += [e.step for e in doc.check(history[:i], samples)]
    # fires when the 5-step mean crosses 0.1; the blip at 61-62 comes before a window of quiet
    # steps has cleared the rule, so it is not reported again; after 28 quiet steps it is
    assert steps == [31, 91]


def test_watch_writes_doctor_jsonl_every_n_steps_and_reads_samples(tmp_path):
    history, samples = healthy()
    for h in history:
        if h["step"] > 40:
            h["clip_frac"] = 0.5
    with open(tmp_path / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    doc = Doctor(every=10, echo=False)
    got = []
    for i in range(1, len(history) + 1):
        got += doc.watch(tmp_path, history[:i])
    assert [e.rule for e in got] == ["clip_frac_high"] and got[0].step % 10 == 0
    lines = [json.loads(x) for x in (tmp_path / "doctor.jsonl").read_text().splitlines()]
    assert [r["rule"] for r in lines] == ["clip_frac_high"]
    assert set(lines[0]) >= {"step", "rule", "severity", "symptom", "cause", "fix"}
    assert len(doc._samples) < len(samples)  # only the windows the rules read are kept


def test_finish_checks_once_more_and_writes_the_report(tmp_path):
    history, samples = healthy(n=45)
    history[-1]["loss"] = "nan"  # step 45: not a multiple of every=10, so only finish() sees it
    doc = Doctor(every=10, echo=False)
    for i in range(1, len(history) + 1):
        doc.watch(tmp_path, history[:i], samples=samples)
    assert not (tmp_path / "doctor.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    report = doc.finish(tmp_path, history)
    assert [json.loads(x)["rule"] for x in (tmp_path / "doctor.jsonl").read_text().splitlines()] == ["nonfinite"]
    assert report == tmp_path / "report.html" and "nonfinite" in report.read_text()


def test_watch_on_resume_drops_later_events_and_does_not_repeat(tmp_path):
    history, samples = healthy()
    for h in history:
        if h["step"] > 20:
            h["clip_frac"] = 0.5
    first = Doctor(every=5, echo=False)
    for i in range(1, 71):
        first.watch(tmp_path, history[:i], samples=samples)
    # resume at step 60: records after step 60 go, the still-active rule is not reported again
    (tmp_path / "doctor.jsonl").open("a").write(json.dumps({"step": 70, "rule": "stale"}) + "\n")
    second = Doctor(every=5, echo=False)
    new = [e for i in range(60, N + 1) for e in second.watch(tmp_path, history[:i], samples=samples)]
    assert new == []
    rules = [json.loads(x)["rule"] for x in (tmp_path / "doctor.jsonl").read_text().splitlines()]
    assert rules == ["clip_frac_high"]


def test_unknown_threshold_is_an_error_and_all_rules_are_registered():
    with pytest.raises(TypeError):
        Doctor(not_a_threshold=1)
    assert set(doctor.RULES) >= {"reward_plateau", "reward_crash", "kl_above_target", "kl_exploding",
                                 "length_hacking", "length_clipped", "format_hacking", "entropy_collapse",
                                 "clip_frac_high", "nonfinite", "judge_failures", "reward_none"}


def _write_run(run_dir, history, samples):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_cli_doctor_prints_diagnosis_and_exit_code(tmp_path, capsys):
    from posttrain.cli import main

    history, samples = healthy()
    _write_run(tmp_path / "ok", history, samples)
    assert main(["doctor", str(tmp_path / "ok")]) == 0
    assert "no problems found" in capsys.readouterr().out
    history[30]["loss"] = "nan"
    _write_run(tmp_path / "bad", history, samples)
    assert main(["doctor", str(tmp_path / "bad"), "--json"]) == 1
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["rule"] for e in events] == ["nonfinite"] and events[0]["step"] == 31
    assert main(["doctor", str(tmp_path / "bad"), "--set", "nope=1"]) == 2
