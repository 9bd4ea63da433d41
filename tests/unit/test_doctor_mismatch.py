"""The doctor's rollout_mismatch rule on synthetic metric streams: it fires when the sampler-trainer
mismatch (``mismatch/kl``) grows over a run, and stays quiet on a steady bfloat16 mismatch, on
float32 rounding noise, on one odd step, and on runs that do not log the metric."""

from __future__ import annotations

import random
import statistics

import pytest

from posttrain.doctrine import doctor
from posttrain.doctrine.doctor import RULES, Context, Thresholds, diagnose, rollout_mismatch

from test_doctor import healthy  # tests/unit is on sys.path (rootdir-relative imports, no __init__)


def with_mismatch(kl_of_step, n: int = 80, seed: int = 0, noise: float = 0.3) -> list[dict]:
    """The healthy GRPO stream of test_doctor with mismatch metrics added: ``mismatch/kl`` =
    kl_of_step(step) times a log-normal noise factor (sigma ``noise``: a 5-step median is then within
    ~1.4x of its level, as in a real run's per-step values)."""
    rng = random.Random(seed)
    history, _ = healthy(n=n, seed=seed)
    for h in history:
        kl = kl_of_step(h["step"]) * rng.lognormvariate(0.0, noise)
        h["mismatch/kl"] = kl
        h["mismatch/ratio_max"] = 1.0 + 40 * kl
        h["mismatch/masked_frac"] = 0.0
        h["mismatch/weight_mean"] = 1.0
    return history


def mismatch_events(history):
    return [e for e in diagnose(history) if e.rule == "rollout_mismatch"]


def test_the_rule_is_registered_with_its_thresholds():
    assert RULES["rollout_mismatch"] is rollout_mismatch
    assert "rollout_mismatch" in doctor.__all__
    th = Thresholds()
    assert th.mismatch_growth == 4.0 and th.mismatch_floor == 1e-3


def test_growing_mismatch_fires_with_the_measured_values_cause_and_fix():
    # a stale rollout copy: the gap grows with the policy's drift, 5e-4 -> 5e-4 + 1e-4 * 80 = 8.5e-3
    history = with_mismatch(lambda s: 5e-4 + 1e-4 * s)
    events = mismatch_events(history)
    assert len(events) == 1, events  # reported once while it keeps firing
    ev = events[0]
    # it needs a window (20 steps) of history, and 4x the start (~5.5e-4 -> >= 2.2e-3: step ~17+)
    assert 20 <= ev.step <= 40, ev.step
    assert ev.severity == "warning"
    # the medians, recomputed here: the first 5 steps' and the 5 steps up to the event's
    kl = [h["mismatch/kl"] for h in history]
    start, now = statistics.median(kl[:5]), statistics.median(kl[ev.step - 5:ev.step])
    assert now >= 4 * start and now > 1e-3
    assert f"{start:.3g} -> {now:.3g}" in ev.symptom and f"grew {now / start:.1f}x" in ev.symptom
    assert ev.evidence["start"] == pytest.approx(start, abs=1e-4) and ev.evidence["now"] == pytest.approx(now, abs=1e-4)
    # the step before the event did not meet the rule (it fired at the first step that did)
    prev = statistics.median(kl[ev.step - 6:ev.step - 1])
    assert prev < 4 * start or prev <= 1e-3
    assert "mismatch/kl" in ev.symptom and "max ratio" in ev.symptom
    assert "bfloat16" in ev.cause and "--rollout-dtype" in ev.cause and "stale rollout copy" in ev.cause
    assert "--rollout-correction tis" in ev.fix and "seq_mask" in ev.fix
    assert "--rollout-dtype float32" in ev.fix and "learning rate" in ev.fix


def test_exponential_growth_fires_and_the_rule_reads_the_first_steps_as_the_start():
    history = with_mismatch(lambda s: 2e-4 * 1.06 ** s, n=80)  # 2e-4 -> ~2e-2
    ev = mismatch_events(history)
    assert ev and ev[0].evidence["start"] < 5e-4


@pytest.mark.parametrize("level", [3e-4, 2e-3, 1e-2])
@pytest.mark.parametrize("seed", range(3))
def test_a_steady_mismatch_from_bfloat16_rounding_is_quiet(level, seed):
    """Constant in expectation at any level (even 1e-2, far above the floor): noise is not growth."""
    assert mismatch_events(with_mismatch(lambda s: level, seed=seed, noise=0.5)) == []


def test_a_slow_drift_below_the_growth_factor_is_quiet():
    # 1e-3 -> 2.6e-3 over 80 steps: 2.6x, below mismatch_growth (4x)
    assert mismatch_events(with_mismatch(lambda s: 1e-3 + 2e-5 * s, seed=1)) == []


def test_float32_rounding_noise_growing_in_relative_terms_stays_under_the_floor():
    # 1e-8 -> 8e-7: an 80x "growth", but all of it rounding; the floor (1e-3) keeps it quiet
    assert mismatch_events(with_mismatch(lambda s: 1e-8 * s)) == []


def test_one_odd_step_is_not_growth():
    # a steady 3e-4 with one step at 100x: the medians ignore it
    history = with_mismatch(lambda s: 3e-2 if s == 60 else 3e-4, noise=0.1)
    assert mismatch_events(history) == []


def test_growth_later_in_the_run_is_compared_with_the_first_steps():
    # steady 4e-4 for 50 steps, then the copy stops being synced: 4e-4 -> 4e-4 + 2e-4 * 30 = 6.4e-3
    history = with_mismatch(lambda s: 4e-4 if s <= 50 else 4e-4 + 2e-4 * (s - 50), n=80)
    events = mismatch_events(history)
    assert len(events) == 1 and events[0].step > 55


def test_quiet_without_the_metric_and_with_too_short_a_history():
    history, samples = healthy()  # no mismatch/* keys at all
    for i in range(1, len(history) + 1):
        assert rollout_mismatch(Context(history[:i], samples, Thresholds())) is None
    growing = with_mismatch(lambda s: 1e-3 * s, n=19)  # less than a window of values
    assert rollout_mismatch(Context(growing, [], Thresholds())) is None
    # the metric absent on some steps (logged every other step): counted over the steps that have it
    sparse = with_mismatch(lambda s: 5e-4 + 2e-4 * s, n=80)
    for h in sparse[::2]:
        del h["mismatch/kl"]
    assert rollout_mismatch(Context(sparse, [], Thresholds())) is not None


def test_thresholds_can_be_moved():
    history = with_mismatch(lambda s: 5e-4 + 1e-4 * s)
    assert [e for e in diagnose(history, mismatch_growth=50.0) if e.rule == "rollout_mismatch"] == []
    assert [e for e in diagnose(history, mismatch_floor=1.0) if e.rule == "rollout_mismatch"] == []


def test_posttrain_doctor_on_a_run_directory_reports_it_and_takes_its_thresholds(tmp_path, capsys):
    import json

    from posttrain.cli import main

    history = with_mismatch(lambda s: 5e-4 + 1e-4 * s)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    assert main(["doctor", str(tmp_path), "--json"]) == 0  # a warning, not an error: exit 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["rule"] for e in events] == ["rollout_mismatch"]
    assert "--rollout-correction tis" in events[0]["fix"]
    assert main(["doctor", str(tmp_path), "--set", "mismatch_growth=50"]) == 0
    assert "no problems found" in capsys.readouterr().out
