"""The doctor on a real healthy run: the metrics and samples of the `make demo` run measured for
the README (GRPO on the embedded model, two-digit addition, 14% -> 74% held-out, 80 steps), kept in
tests/data/demo_run/. Through step 30 (what a 30-step run with the same seed logs: the learning
rate is constant) nothing fires although reward rises and completions shorten; over the whole run
the one rule that fires is entropy collapse, which is what happened (0.69 -> 0.06 nats/token)."""

from pathlib import Path

from posttrain.doctrine.doctor import diagnose
from posttrain.runtime.tracking import read_jsonl

RUN = Path(__file__).parent.parent / "data" / "demo_run"


def _run(upto: int):
    history = [m for m in read_jsonl(RUN / "metrics.jsonl") if m["step"] <= upto]
    samples = [s for s in read_jsonl(RUN / "samples.jsonl") if s["step"] <= upto]
    return history, samples


def test_a_healthy_real_arithmetic_run_triggers_nothing():
    history, samples = _run(30)
    assert len(history) == 30 and history[-1]["reward/mean"] > history[0]["reward/mean"]
    assert diagnose(history, samples) == []


def test_the_whole_demo_run_shows_only_its_entropy_collapse():
    history, samples = _run(10_000)
    events = diagnose(history, samples)
    assert {e.rule for e in events} == {"entropy_collapse"}
    assert history[-1]["entropy"] < 0.1 < history[0]["entropy"]
