"""Built-in tasks (determinism, disjoint splits, solvable countdown) and the countdown reward."""

from __future__ import annotations

import re

import pytest

from posttrain.rewards import get
from posttrain.rewards.countdown import check_expression, countdown_reward, extract_expression
from posttrain.data.tasks import get_task, is_test_key, list_tasks, task_info
from posttrain.data.tasks.arithmetic import arithmetic, problem_key
from posttrain.data.tasks.countdown import countdown
from posttrain.data.tasks.countdown import problem_key as countdown_key

_ARITH = re.compile(r"What is (\d+) ([-+*]) (\d+)\? Put the final answer after 'Answer:'\.")


def _arith_key(row):
    a, op, b = _ARITH.fullmatch(row["prompt"]).groups()
    return problem_key(int(a), op, int(b))


def test_list_tasks():
    names = [t.name for t in list_tasks()]
    assert names == sorted(names) and {"arithmetic", "countdown", "humaneval"} <= set(names)
    assert task_info("arithmetic").reward == "math"
    assert task_info("countdown").reward == "countdown"
    assert task_info("humaneval").reward == "code" and task_info("humaneval").splits == ("test",)
    with pytest.raises(KeyError, match="unknown task"):
        task_info("nope")


def test_arithmetic_prompt_is_the_measured_phrasing_and_answers_are_right():
    rows = arithmetic(50, seed=3)
    assert len(rows) == 50
    for row in rows:
        m = _ARITH.fullmatch(row["prompt"])  # exactly "What is a + b? Put the final answer after 'Answer:'."
        assert m is not None, row["prompt"]
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert op == "+" and 10 <= a <= 99 and 10 <= b <= 99  # digits=2
        assert row["answer"] == str(a + b)
        assert set(row) == {"prompt", "answer"}
        # and the math reward accepts the right answer in the asked format
        assert get("math")(row["prompt"], f"Answer: {a + b}", answer=row["answer"]) == 1.0


def test_arithmetic_ops_and_digits():
    rows = arithmetic(200, seed=0, digits=3, ops="+-*")
    ops = {_ARITH.fullmatch(r["prompt"]).group(2) for r in rows}
    assert ops == {"+", "-", "*"}
    for r in rows:
        a, op, b = _ARITH.fullmatch(r["prompt"]).groups()
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
        assert int(r["answer"]) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b))
    with pytest.raises(ValueError, match="ops"):
        arithmetic(1, 0, ops="/")
    with pytest.raises(ValueError, match="digits"):
        arithmetic(1, 0, digits=0)


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_deterministic_by_seed_and_prefix_stable(name):
    a = get_task(name, "train", n=40, seed=7)
    assert a == get_task(name, "train", n=40, seed=7)  # same seed: same rows
    assert a != get_task(name, "train", n=40, seed=8)  # another seed: other rows
    assert get_task(name, "train", n=10, seed=7) == a[:10]  # prefix-stable
    t = get_task(name, "test", n=40, seed=7)
    assert t == get_task(name, "test", n=40, seed=7)
    assert get_task(name, "test", n=10, seed=7) == t[:10]


def test_arithmetic_splits_are_disjoint_for_any_seeds():
    train_keys = set()
    for seed in range(3):
        train_keys |= {_arith_key(r) for r in get_task("arithmetic", "train", n=2000, seed=seed)}
    test_rows = get_task("arithmetic", "test", n=300, seed=0)
    test_keys = [_arith_key(r) for r in test_rows]
    assert len(set(test_keys)) == 300  # test problems are distinct
    assert not train_keys & set(test_keys)  # and never seen in training, whatever the seed
    # "a + b" and "b + a" are one problem: the key is symmetric
    assert problem_key(58, "+", 17) == problem_key(17, "+", 58) != problem_key(58, "-", 17)
    # the split is the stable hash bucket: about 1 in 10 of all problems are test problems
    all_keys = {problem_key(a, "+", b) for a in range(10, 100) for b in range(10, 100)}
    share = sum(is_test_key(k) for k in all_keys) / len(all_keys)
    assert 0.07 < share < 0.13


def test_test_split_refuses_more_problems_than_exist():
    # one-digit addition has 45 unordered problems; about 1 in 10 are test problems
    with pytest.raises(ValueError, match="distinct test problems"):
        arithmetic(40, seed=0, digits=1, split="test")


def test_countdown_rows_are_solvable_and_scored_right():
    rows = countdown(300, seed=1)
    for row in rows:
        assert set(row) == {"prompt", "target", "numbers", "solution"}
        assert len(row["numbers"]) == 4 and all(1 <= x <= 25 for x in row["numbers"])
        assert 1 <= row["target"] <= 100
        assert ", ".join(map(str, row["numbers"])) in row["prompt"] and str(row["target"]) in row["prompt"]
        # the generator's own solution is a valid answer ...
        columns = {k: v for k, v in row.items() if k != "prompt"}
        assert countdown_reward(row["prompt"], f"Let me try.\nAnswer: {row['solution']}", **columns) == 1.0
        # ... and leaving a number out is not
        assert countdown_reward(row["prompt"], "Answer: " + " + ".join(map(str, row["numbers"][:3])), **columns) == 0.0


def test_countdown_splits_are_disjoint():
    train = {countdown_key(r["numbers"], r["target"]) for r in countdown(2000, seed=0)}
    test = [countdown_key(r["numbers"], r["target"]) for r in countdown(200, seed=0, split="test")]
    assert len(set(test)) == 200 and not train & set(test)


# numbers [3, 5, 2, 7], target 9; each comment gives the value and the numbers used
@pytest.mark.parametrize(
    "completion,expected",
    [
        ("Answer: (3 + 5) * 2 - 7", 1.0),  # 8 * 2 - 7 = 9; 3, 5, 2, 7
        ("Answer: 2 × (3 + 5) − 7", 1.0),  # unicode operators normalised: 2 * 8 - 7 = 9
        ("<think>hmm</think><answer>(3 + 5) * 2 - 7</answer>", 1.0),  # answer tags
        ("Answer: (3 + 5) * 2 - 7 = 9", 1.0),  # a trailing "= n" is dropped ...
        ("Answer: (3 + 5) * 2 - 7 = 10", 1.0),  # ... whatever n: the expression is what is judged
        ("**Answer:** `(3 + 5) * 2 - 7`.", 1.0),  # markdown and a final period stripped
        ("Answer: 3 * 5 - 7 + 2", 0.0),  # 15 - 7 + 2 = 10: wrong target
        ("Answer: 7 + 2 * (5 - 3)", 0.0),  # 7 + 4 = 11: wrong target
        ("Answer: 7 - 5 + 3 + 2 + 2", 0.0),  # = 9, but 2 is used twice
        ("Answer: 7 + 2", 0.0),  # = 9, but 3 and 5 are unused
        ("Answer: (5 // 3) * 2 + 7", 0.0),  # = 9 with //, which is not allowed
        ("Answer: (7 % 2) + 3 + 5", 0.0),  # = 9 with %, which fails the character check
        ("Answer: -7 + 2 * (3 + 5)", 0.0),  # = 9 with unary minus: not allowed
        ("Answer: (3.0 + 5) * 2 - 7", 0.0),  # = 9.0 with a float literal: not allowed
        ("Answer: 7 / (5 - 3 - 2)", 0.0),  # division by zero: 0.0, no crash
        ("Answer: __import__('os').system('echo hi')", 0.0),  # never eval'd: fails the char check
        ("Answer: (3 + 5) * 2 - 7; import os", 0.0),
        ("Answer: " + "(" * 500 + "3" + ")" * 500, 0.0),  # too long / too deep: no crash
        ("no expression here", 0.0),
        ("", 0.0),
    ],
)
def test_countdown_reward(completion, expected):
    assert countdown_reward("p", completion, target=9, numbers=[3, 5, 2, 7]) == expected


def test_countdown_reward_exact_fractions_and_missing_columns():
    # 7 / 2 = 3.5 exactly, 3.5 * 2 = 7: true division with fractions, no float error
    assert check_expression("7 / 2 * 2", 7, [7, 2, 2])
    assert not check_expression("7 / 2", 3, [7, 2])  # not floor division
    assert not check_expression("3 ** 2", 9, [3, 2])  # = 9 with the right numbers, but ** is not allowed
    assert check_expression("3 * (2 + 1)", 9, [3, 2, 1])
    # (1 / 3) * 3 == 1 exactly (0.333... * 3 in floats is also 1.0, but 1/3+1/3+1/3 shows exactness)
    assert check_expression("1 / 3 + 1 / 3 + 1 / 3", 1, [1, 3, 1, 3, 1, 3])
    assert countdown_reward("p", "Answer: 1 + 2") is None  # no target/numbers: cannot judge
    assert countdown_reward("p", "Answer: 1 + 2", target="3", numbers=["1", "2"]) == 1.0  # strings in the row
    assert countdown_reward("p", "Answer: 1 + 2", target="x", numbers=[1, 2]) is None  # malformed row
    assert extract_expression("work\n(1 + 2) * 3\n") == "(1 + 2) * 3"  # last line when no marker


def test_humaneval_is_lazy_and_test_only():
    with pytest.raises(ValueError, match="no 'train' split"):
        get_task("humaneval", "train")
    he = pytest.importorskip("posttrain.data.tasks.humaneval")  # written by the sandbox issue's engineer
    rows = get_task("humaneval", "test")
    assert len(rows) == 164 and rows == he.humaneval()
    assert {"prompt", "tests", "entry_point", "canonical_solution"} <= set(rows[0])
    assert len(get_task("humaneval", "test", n=5)) == 5
