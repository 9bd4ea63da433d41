"""Judge semantics above the backend: score mapping, position-bias handling in compare, counters
that add up, the failure-rate stop, and the `judge` reward in the registry."""

import re

import pytest

from posttrain import rewards
from posttrain.rlaif import FunctionBackend, Judge, JudgeConfig, JudgeFailureRate, Preference
from posttrain.rewards.judge import JudgeReward, judge_metrics


def make_judge(fn, **fields):
    cfg = JudgeConfig(backend="openai", model="scripted", cache=None, **fields)
    return Judge(cfg, FunctionBackend(cfg, fn))


def user_text(messages):
    return messages[-1]["content"]


def responses_ab(messages):
    """The two responses of a compare request, in the order shown (default template)."""
    text = user_text(messages)
    a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", text, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\n", text, re.S).group(1)
    return a, b


def fair(messages):
    """An unbiased judge: prefers the response containing 'good', wherever it is shown."""
    a, b = responses_ab(messages)
    return "Winner: A" if "good" in a else "Winner: B" if "good" in b else "Winner: tie"


def always_a(messages):
    """A position-biased judge: always picks the first response shown."""
    return "Reasoning... Winner: A"


def test_score_maps_the_rubric_scale_to_unit_interval_and_counts():
    judge = make_judge(lambda m: "Rating: 7" if "good" in user_text(m) else "no idea")
    assert judge.score("q", "a good answer") == pytest.approx(6 / 9)  # 7 on 1..10
    assert judge.score("q", "meh") is None                            # unparsable -> None
    c = judge.counts()
    assert (c["requests"], c["parsed"], c["unparsable"], c["failures"]) == (2, 1, 1, 0)


def test_score_template_carries_prompt_response_and_scale():
    seen = []
    judge = make_judge(lambda m: seen.append(m) or "Rating: 3", score_min=0, score_max=5,
                       score_template="Q={prompt} R={response} on {min}..{max}", system_prompt="SYS")
    assert judge.score("What?", "This.") == pytest.approx(3 / 5)
    assert seen[0] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q=What? R=This. on 0..5"}]


def test_compare_asks_both_orders_and_agrees_with_a_fair_judge():
    judge = make_judge(fair)
    assert judge.compare("q", "a good answer", "a bad answer") == Preference("a", 1.0, ("a", "a"), "agree")
    assert judge.compare("q", "a bad answer", "a good answer") == Preference("b", 1.0, ("b", "b"), "agree")
    assert judge.counts()["requests"] == 4  # two orders each
    assert judge.backend.calls == 4


def test_position_biased_judge_gives_no_winner():
    judge = make_judge(always_a)
    pref = judge.compare("q", "x", "y")
    # (x, y) -> "A" = x; (y, x) -> "A" = y: the two orders disagree
    assert pref.winner is None and pref.reason == "position_bias" and pref.votes == ("a", "b")
    assert pref.confidence == 0.0


def test_without_position_swap_one_order_is_asked_and_bias_goes_undetected():
    judge = make_judge(always_a, position_swap=False)
    assert judge.compare("q", "x", "y") == Preference("a", 1.0, ("a",), "single")
    assert judge.backend.calls == 1


def test_compare_reasons_tie_unparsable_failed_and_confidence():
    assert make_judge(lambda m: "Winner: tie").compare("q", "x", "y").reason == "tie"
    assert make_judge(lambda m: "hmm").compare("q", "x", "y") == Preference(None, 0.0, (None, None), "unparsable")

    def boom(m):
        raise RuntimeError("down")

    pref = make_judge(boom).compare("q", "x", "y")
    assert pref == Preference(None, 0.0, (None, None), "failed")
    conf = make_judge(lambda m: '{"winner": "%s", "confidence": 0.6}' % ("A" if "good" in responses_ab(m)[0] else "B"))
    assert conf.compare("q", "good", "bad") == Preference("a", pytest.approx(0.6), ("a", "a"), "agree")


def test_compare_batch_keeps_order():
    judge = make_judge(fair)
    prefs = judge.compare_batch(["q1", "q2", "q3"], ["good", "bad", "x"], ["bad", "good", "y"])
    assert [p.winner for p in prefs] == ["a", "b", None]


def test_counters_add_up_with_failures_and_duplicates():
    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if "fail" in user_text(m):
            raise ConnectionError("no route")
        return "Rating: 5" if "ok" in user_text(m) else "???"

    judge = make_judge(flaky)
    values = judge.score_batch(["q"] * 6, ["ok", "ok", "fail", "???", "ok 2", "fail"])
    assert values[0] == values[1] == values[4] == pytest.approx(4 / 9)
    assert values[2] is values[3] is values[5] is None
    c = judge.counts()
    assert c["requests"] == 6
    assert c["parsed"] + c["unparsable"] + c["failures"] == c["requests"]
    assert (c["parsed"], c["unparsable"], c["failures"]) == (3, 1, 2)
    assert c["cache_hits"] == 2                        # the repeated "ok" and "fail" went out once
    assert c["attempts"] - c["retries"] == c["requests"] - c["cache_hits"] == calls["n"] == 4
    assert judge.last_error == "ConnectionError: no route"


def test_failure_rate_threshold_raises_with_a_clear_message():
    state = {"up": True}

    def flaky(m):
        if state["up"]:
            return "Rating: 5"
        raise TimeoutError("judge unreachable")

    judge = make_judge(flaky, min_requests=5, max_failure_rate=0.5, failure_window=10)
    assert judge.score("q", "r0") is not None  # it answered once: the rate rule alone decides
    state["up"] = False
    assert judge.score_batch(["q"] * 3, [f"r{i}" for i in range(1, 4)]) == [None] * 3  # below min_requests
    with pytest.raises(JudgeFailureRate) as err:
        judge.score("q", "r4")
    e = err.value
    assert e.rate == 0.8 and e.threshold == 0.5 and e.window == 5
    assert "failed 80% of its last 5 requests" in str(e) and "judge unreachable" in str(e)
    assert e.metrics["judge/failures"] == 4.0


def test_a_judge_that_never_answered_is_down_after_dead_after_failures():
    from posttrain.rlaif.judges import DEAD_AFTER

    def down(m):
        raise ConnectionError("connection refused")

    judge = make_judge(down, min_requests=20, max_failure_rate=0.5, failure_window=50)
    assert judge.score_batch(["q"] * (DEAD_AFTER - 1), ["r"] * (DEAD_AFTER - 1)) == [None] * (DEAD_AFTER - 1)
    with pytest.raises(JudgeFailureRate) as err:  # long before min_requests
        judge.score("q", "r")
    assert f"has not answered once: {DEAD_AFTER} of {DEAD_AFTER} requests failed" in str(err.value)
    assert "connection refused" in str(err.value)


def test_failure_rate_is_measured_over_the_recent_window():
    state = {"down": True}

    def sometimes(m):
        if state["down"]:
            raise TimeoutError("x")
        return "Rating: 5"

    judge = make_judge(sometimes, min_requests=4, max_failure_rate=0.5, failure_window=4)
    judge.score_batch(["q"] * 2, ["a", "b"])          # 2 failures: window [F, F]
    state["down"] = False
    judge.score_batch(["q"] * 3, ["c", "d", "e"])     # window [F, S, S, S]: 25% -> fine
    assert judge.metrics()["judge/failure_rate"] == 0.25
    assert judge.counts()["failures"] == 2


def test_conversational_prompts_are_rendered_as_text():
    seen = []
    judge = make_judge(lambda m: seen.append(user_text(m)) or "Rating: 5", score_template="{prompt}|{response}")
    judge.score([{"role": "user", "content": "Hi there"}], [{"role": "assistant", "content": "Hello"}])
    judge.score([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "R")
    assert seen == ["Hi there|Hello", "system: S\nuser: U|R"]


def test_judge_reward_in_the_registry(tmp_path, tiny_dir):
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(f"backend: local\nmodel: {tiny_dir}\nmax_tokens: 3\ncache: false\ndevice: cpu\n")
    spec = rewards.parse_spec(f"judge({cfg}):0.5")
    assert spec == [("judge", 0.5, {"arg": str(cfg)})]
    combined = rewards.from_spec(f"format,judge({cfg}):0.5")
    part = combined.parts[1][1]
    assert isinstance(part.fn, JudgeReward) and part.batch is not None
    totals, parts = rewards.score_batch(combined, ["q1", "q2", "q3"], ["a", "b", "c"])
    m = judge_metrics(combined)
    # a local judge reads the rating from its token probabilities (scoring: auto): the random tiny
    # model, which rarely writes a rating, still rates every sample
    assert m["judge/requests"] == 3 and m["judge/attempts"] == 3
    assert m["judge/by_probability"] == 3 and m["judge/parsed"] + m["judge/unparsable"] + m["judge/failures"] == 0
    assert all(v is not None and 0.0 <= v <= 1.0 for v in parts["judge"])
    assert judge_metrics(rewards.from_spec("format")) == {}


def test_judge_reward_options_override_the_file(tmp_path):
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("backend: openai\nmodel: m\nbase_url: http://127.0.0.1:9/v1\ncache: false\n")
    reward = rewards.get("judge", arg=str(cfg), concurrency=3, score_max=5)
    assert reward.fn.judge.config.concurrency == 3 and reward.fn.judge.config.score_max == 5.0
    with pytest.raises(ValueError, match="needs a config"):
        rewards.get("judge")


def test_judge_metrics_of_several_judges_are_prefixed_by_part(tmp_path):
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("backend: openai\nmodel: m\nbase_url: http://127.0.0.1:9/v1\ncache: false\n")
    m = judge_metrics(rewards.from_spec(f"judge({cfg}),judge({cfg}):0.5"))
    assert m["judge/judge/requests"] == 0.0 and m["judge/judge_2/failures"] == 0.0
    assert "judge/requests" not in m
