"""Reward registry: lookup by name, spec parsing, weighted combination with None, batch scoring."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from posttrain import rewards
from posttrain.rewards import Combined, combine, from_spec, get, parse_spec, register, score_batch, unregister


def test_builtin_names_are_listed():
    assert {"math", "code", "format", "length", "countdown"} <= set(rewards.list_rewards())


def test_get_binds_options_and_keeps_the_calling_convention():
    fn = get("length", max_len=10, buffer=4)
    assert fn.name == "length" and fn.options == {"max_len": 10, "buffer": 4}
    # 8 words: free zone ends at 10 - 4 = 6, so (6 - 8) / 4 = -0.5
    assert fn("p", "a b c d e f g h") == -0.5
    # bound options win over a same-named row column
    assert fn("p", "a b c d e f g h", max_len=1000) == -0.5
    # extra row columns are accepted and ignored
    assert get("math")("p", "Answer: 3", answer="3", tests="ignored") == 1.0


def test_unknown_reward_and_positional_on_plain_reward_are_errors():
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get("nope")
    with pytest.raises(ValueError, match="takes no positional argument"):
        get("math", arg="x")


def test_registry_import_is_lazy():
    # importing the registry and using math must not import the code sandbox (or torch)
    code = (
        "import sys; from posttrain import rewards; rewards.get('math')('', 'Answer: 1', answer='1');"
        "print('posttrain.rewards.code' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_register_function_and_factory():
    @register("test_const_fn")
    def const(prompt, completion, value=0.25, **_):
        return value

    @register("test_factory", factory=True)
    def make(arg=None, scale=1.0):
        # a stateful reward (like reward_model(PATH)) is built once from the spec argument
        n = len(arg or "")

        def score(prompt, completion, **_):
            return n * scale

        return score

    try:
        assert get("test_const_fn")("p", "c") == 0.25
        assert get("test_const_fn", value=2)("p", "c") == 2
        with pytest.raises(ValueError, match="already registered"):
            register("test_const_fn")(const)
        # spec argument reaches the factory as `arg`: len("abcd") * 0.5 = 2.0, weight 3 -> 6.0
        combined = from_spec("test_factory(abcd,scale=0.5):3")
        assert combined("p", "c") == 6.0
    finally:
        unregister("test_const_fn")
        unregister("test_factory")
    assert "test_const_fn" not in rewards.list_rewards()


def test_register_rejects_bad_names_and_unregister_restores_builtin():
    with pytest.raises(ValueError, match="identifier"):
        register("not a name")
    register("math", replace=True)(lambda prompt, completion, **_: 0.5)
    try:
        assert get("math")("p", "Answer: 1", answer="1") == 0.5
    finally:
        unregister("math")
    assert get("math")("p", "Answer: 1", answer="1") == 1.0


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("math", [("math", 1.0, {})]),
        ("math,format:0.2", [("math", 1.0, {}), ("format", 0.2, {})]),
        (" math : 2 , format : .5 ", [("math", 2.0, {}), ("format", 0.5, {})]),
        ("length(max_len=512,buffer=64):0.5", [("length", 0.5, {"max_len": 512, "buffer": 64})]),
        ("length:-1", [("length", -1.0, {})]),
        ("math:1e-3", [("math", 0.001, {})]),
        ("reward_model(runs/rm/final):0.5", [("reward_model", 0.5, {"arg": "runs/rm/final"})]),
        # colons inside parentheses are part of the argument, never a weight
        ("judge(http://localhost:8000/v1)", [("judge", 1.0, {"arg": "http://localhost:8000/v1"})]),
        ("judge(http://h:8000):2", [("judge", 2.0, {"arg": "http://h:8000"})]),
        (r"judge(C:\cfg\j.yaml,temperature=0)", [("judge", 1.0, {"arg": r"C:\cfg\j.yaml", "temperature": 0})]),
        ("code(partial=true),format", [("code", 1.0, {"partial": True}), ("format", 1.0, {})]),
        ("format(pattern=think_answer)", [("format", 1.0, {"pattern": "think_answer"})]),
        ("x(a=none,b=1.5,c=text)", [("x", 1.0, {"a": None, "b": 1.5, "c": "text"})]),
        ("math()", [("math", 1.0, {})]),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "empty"),
        ("math,", "cannot parse"),
        ("format:abc", "not a number"),
        ("math:0.5:0.3", "cannot parse"),
        ("length(max_len=5", "unbalanced"),
        ("length)max_len=5(", "unbalanced"),
        ("length(max_len=5,max_len=6)", "given twice"),
        ("judge(a,b)", "only the first argument"),
        ("math:inf", "not a number"),
        ("9math", "cannot parse"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def _const(name, value):
    def fn(prompt, completion, **_):
        return value

    fn.__name__ = name
    return fn


def test_combine_weighted_sum_and_parts():
    combined = combine([(_const("a", 1.0), 1.0), (_const("b", 0.5), 0.2)])
    total, parts = combined.score("p", "c")
    # 1.0 * 1.0 + 0.5 * 0.2 = 1.1
    assert total == pytest.approx(1.1)
    assert parts == {"a": 1.0, "b": 0.5}
    assert combined("p", "c") == pytest.approx(1.1)


def test_combine_none_rule_skips_without_renormalising():
    # a: cannot judge; b: 1.0 at weight 0.2 -> total 0.2 (NOT 1.0, which renormalising would give)
    combined = combine([(_const("a", None), 1.0), (_const("b", 1.0), 0.2)])
    assert combined.score("p", "c") == (pytest.approx(0.2), {"a": None, "b": 1.0})
    # every part None -> the sample cannot be judged at all
    assert combine([(_const("a", None), 1.0), (_const("b", None), 0.2)])("p", "c") is None
    # a row of another task in a mixed dataset has no "answer" column at all: math says None
    mixed = combine([(get("math"), 1.0), (get("countdown"), 1.0)])
    assert mixed.score("p", "Answer: 1 + 2", target=3, numbers=[1, 2]) == (1.0, {"math": None, "countdown": 1.0})
    # a zero is a judgement, not a skip: 0 * 1 + 1 * 0.2
    assert combine([(_const("a", 0.0), 1.0), (_const("b", 1.0), 0.2)])("p", "c") == pytest.approx(0.2)


def test_combine_names_duplicates_and_bad_weights():
    combined = combine([(get("format"), 1.0), (get("format", pattern="boxed"), 0.5), ("mine", _const("z", 1.0), 2.0)])
    assert combined.names == ["format", "format_2", "mine"]
    assert combined.weights == [1.0, 0.5, 2.0]
    with pytest.raises(ValueError):
        combine([])
    with pytest.raises(ValueError, match="finite"):
        combine([(_const("a", 1.0), float("nan"))])


def test_from_spec_end_to_end():
    combined = from_spec("math,format:0.2")
    assert isinstance(combined, Combined) and combined.names == ["math", "format"]
    good = "We add 17 and 58.\nAnswer: 75"
    # math 1.0 * 1 + format 1.0 * 0.2 = 1.2
    assert combined.score("What is 17 + 58?", good, answer="75") == (pytest.approx(1.2), {"math": 1.0, "format": 1.0})
    # no reference answer: math is None and is skipped, format still counts: 0.2
    assert combined.score("q", good, answer=None) == (pytest.approx(0.2), {"math": None, "format": 1.0})


def test_rows_may_carry_prompt_and_completion_columns():
    # dataset rows often hold "prompt" (and a stale "completion") themselves; score_batch must
    # not pass them twice nor let the stale one win
    combined = from_spec("math")
    row = {"prompt": "What is 1 + 1?", "completion": "Answer: 3", "answer": "2"}
    totals, parts = score_batch(combined, [row["prompt"]], ["Answer: 2"], [row])
    assert totals == [1.0] and parts == {"math": [1.0]}


def test_score_batch_inline():
    prompts = ["q1", "q2", "q3"]
    completions = ["Answer: 1", [{"role": "assistant", "content": "Answer: 5"}], "no idea"]
    rows = [{"answer": "1"}, {"answer": "2"}, {"answer": None}]
    totals, parts = score_batch(from_spec("math,length(max_len=2,buffer=1):0.5"), prompts, completions, rows)
    # math: 1.0, 0.0, None; length (words): "Answer: 1" 2 words -> (1 - 2) / 1 = -1.0 ... x0.5
    #   row 1: 1.0 - 0.5 = 0.5; row 2: 0.0 - 0.5 = -0.5; row 3: "no idea" 2 words, math None -> -0.5
    assert parts["math"] == [1.0, 0.0, None]
    assert parts["length"] == [-1.0, -1.0, -1.0]
    assert totals == [pytest.approx(0.5), pytest.approx(-0.5), pytest.approx(-0.5)]
    # a plain function works too, named after itself
    totals, parts = score_batch(_const("k", 0.3), ["a"], ["b"], [{}])
    assert totals == [0.3] and parts == {"k": [0.3]}


def test_score_batch_checks_lengths():
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        score_batch(from_spec("math"), ["a", "b"], ["c"], [{}])
    with pytest.raises(ValueError, match="2 rows for 1 completions"):
        score_batch(from_spec("math"), ["a"], ["c"], [{}, {}])


def _length_times_scale(item):
    completion, row = item
    return float(len(completion)) * row["scale"], os.getpid()


def _score_in_children(rows, completions, max_workers=None):
    # a batch scorer that scores in worker processes, bounded like the code reward's
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max_workers) as pool:
        results = list(pool.map(_length_times_scale, zip(completions, rows)))
    assert all(pid != os.getpid() for _, pid in results)
    return [value for value, _ in results]


def test_score_batch_uses_a_registered_batch_scorer():
    calls = []

    def batch(rows, completions, max_workers=None):
        calls.append((rows, list(completions), max_workers))
        return _score_in_children(rows, completions, max_workers)

    register("test_batch", batch=batch)(lambda prompt, completion, **_: -1.0)
    try:
        fn = get("test_batch", scale=2.0)
        totals, parts = score_batch(fn, ["p1", "p2", "p3"], ["ab", "abc", ""], [{"k": 1}, {}, {}], max_workers=8)
        # values come from the child processes: len * scale = 4, 6, 0 (not -1 from the inline fn)
        assert parts["test_batch"] == [4.0, 6.0, 0.0] and totals == [4.0, 6.0, 0.0]
        rows, completions, workers = calls[0]
        assert completions == ["ab", "abc", ""]
        assert rows[0] == {"k": 1, "scale": 2.0, "prompt": "p1"}  # row + bound options + prompt
        assert workers == 3  # bounded by the batch size (and the core count)
        score_batch(fn, ["p"] * 5, ["x"] * 5, [{}] * 5)
        assert calls[1][2] == min(5, rewards.default_workers())  # default: the core count
    finally:
        unregister("test_batch")


def test_code_reward_runs_through_its_batch_scorer():
    code = pytest.importorskip("posttrain.rewards.code")  # written by the sandbox issue's engineer
    fn = get("code")
    assert rewards._batch_of(fn) is code.code_rewards
    assert rewards._batch_of(code.code_reward) is code.code_rewards  # also when passed raw
    rows = [{"tests": "assert f(2) == 4", "entry_point": "f"}, {"tests": "assert f(2) == 4", "entry_point": "f"}]
    completions = ["```python\ndef f(x):\n    return x * 2\n```", "```python\ndef f(x):\n    return x + 3\n```"]
    totals, parts = score_batch(fn, ["p", "p"], completions, rows)
    assert parts["code"] == [1.0, 0.0] and totals == [1.0, 0.0]


def test_mean_and_as_text():
    assert rewards.mean([1.0, None, 0.0]) == 0.5
    assert rewards.mean([None]) is None
    assert rewards.as_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert rewards.as_text(None) == ""


def test_reward_metrics():
    totals = [1.0, 0.0, None, 0.5]
    parts = {"math": [1.0, 0.0, None, None], "format": [None, None, None, 1.0]}
    m = rewards.reward_metrics(totals, parts)
    # judged totals 1, 0, 0.5: mean 0.5, population std sqrt((0.25 + 0.25 + 0) / 3) = sqrt(1/6)
    assert m["reward/mean"] == pytest.approx(0.5)
    assert m["reward/std"] == pytest.approx((1 / 6) ** 0.5)
    assert m["reward/none"] == 1.0
    assert m["reward/math"] == pytest.approx(0.5) and m["reward/math/none"] == 2.0
    assert m["reward/format"] == 1.0 and m["reward/format/none"] == 3.0
    # nothing judged: no mean is invented
    empty = rewards.reward_metrics([None], {"math": [None]})
    assert "reward/mean" not in empty and "reward/math" not in empty and empty["reward/none"] == 1.0


def test_short_colon_form_passes_one_argument():
    from posttrain.rewards import parse_spec

    assert parse_spec("judge:judge.yaml") == [("judge", 1.0, {"arg": "judge.yaml"})]
    assert parse_spec("math,judge:configs/judge.yaml:0.5") == [
        ("math", 1.0, {}), ("judge", 0.5, {"arg": "configs/judge.yaml"})]
    assert parse_spec("format:0.2") == [("format", 0.2, {})]  # a number after the colon is a weight
