"""Task specs (`NAME(ARGS)`) and the reasoning-gym tasks: parsing, option checks from the
dataset's own config, disjoint splits, the reward on real reasoning-gym items, and the errors a
person meets at the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

from posttrain.data.tasks import TaskError, check_options, get_task, parse_task, task_info  # noqa: E402
from posttrain.rewards import from_spec, score_batch  # noqa: E402
from posttrain.rewards.reasoning_gym import reasoning_gym_reward  # noqa: E402

CHAIN = "reasoning_gym(chain_sum, min_terms=3, max_terms=3, max_digits=2)"


def test_specs_parse_like_reward_specs():
    assert parse_task("arithmetic") == ("arithmetic", {})
    assert parse_task("arithmetic(digits=3, ops=+-)") == ("arithmetic", {"digits": 3, "ops": "+-"})
    assert parse_task(CHAIN) == ("reasoning_gym", {"dataset": "chain_sum", "min_terms": 3, "max_terms": 3,
                                                   "max_digits": 2})
    assert task_info(CHAIN).name == "reasoning_gym"
    assert parse_task("rg:chain_sum(min_terms=3, max_terms=3, max_digits=2)") == parse_task(CHAIN)  # the short form
    assert parse_task("rg:leg_counting") == ("reasoning_gym", {"dataset": "leg_counting"})
    three = get_task("arithmetic(digits=3)", "test", n=20)
    assert all(len(str(int(row["answer"]))) >= 3 for row in three)  # the option reached the generator
    assert get_task("arithmetic(digits=3)", "test", n=5) == get_task("arithmetic", "test", n=5, digits=3)


@pytest.mark.parametrize("spec,fragment", [
    ("arithmetic(3)", "cannot read '3'"),  # arithmetic takes no positional argument
    ("arithmetic(digits=3", "write NAME or NAME(key=value"),
    ("arithmetic(digits=3, digits=4)", "given twice"),
    ("arithmetic(digits=99)", "must be an integer in 1..18"),
    ("reasoning_gym", "needs a dataset"),
    ("reasoning_gym(chain_su)", "did you mean chain_sum"),
    ("reasoning_gym(chain_sum, min_terms=x)", "must be int"),
    ("reasoning_gym(chain_sum, terms=3)", "has no option 'terms' (it takes: min_terms, max_terms"),
    ("reasoning_gym(chain_sum, min_terms=4, max_terms=3)", "max_terms must be >= min_terms"),  # its own validate()
    ("nonesuch(x=1)", "unknown task 'nonesuch'"),
])
def test_bad_specs_say_what_is_wrong(spec, fragment):
    with pytest.raises(TaskError, match=None) as caught:
        check_options(spec)
    assert fragment in str(caught.value)


def test_reasoning_gym_rows_are_seeded_and_splits_disjoint():
    train = get_task(CHAIN, "train", n=300, seed=0)
    test = get_task(CHAIN, "test", n=30, seed=0)
    assert get_task(CHAIN, "test", n=30, seed=0) == test  # deterministic
    assert get_task(CHAIN, "test", n=10, seed=0) == test[:10]  # prefix-stable
    assert len({r["prompt"] for r in test}) == 30  # distinct
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    row = test[0]
    assert row["prompt"].endswith("Put the final answer after 'Answer:'.")
    assert row["metadata"]["source_dataset"] == "chain_sum" and row["metadata"]["num_terms"] == 3
    assert eval(row["metadata"]["expression"]) == int(row["answer"])  # the reference is right
    with pytest.raises(TaskError, match="only"):  # a space too small for the rows asked
        get_task("reasoning_gym(chain_sum, min_terms=2, max_terms=2, max_digits=1)", "test", n=1000)


def test_reward_uses_the_datasets_scorer_on_the_final_answer():
    row = get_task(CHAIN, "test", n=1, seed=0)[0]
    right, wrong = row["answer"], str(int(row["answer"]) + 1)
    extra = {"answer": row["answer"], "metadata": row["metadata"]}
    assert reasoning_gym_reward(row["prompt"], f"Adding up.\nAnswer: {right}", **extra) == 1.0
    assert reasoning_gym_reward(row["prompt"], f"Answer: {wrong}", **extra) == 0.0
    assert reasoning_gym_reward(row["prompt"], "I am not sure.", **extra) == 0.0
    # the question restated with the answer inside it earns no partial credit: only the final answer is graded
    assert reasoning_gym_reward(row["prompt"], f"{right} {right} so Answer: {wrong}", **extra) == 0.0
    assert reasoning_gym_reward(row["prompt"], f"Answer: {right}", answer=row["answer"]) is None  # no metadata
    assert score_batch(from_spec("reasoning_gym"), [row["prompt"]] * 2,
                       [f"Answer: {right}", f"Answer: {wrong}"], [row, row])[0] == [1.0, 0.0]


def test_a_bad_task_spec_fails_at_the_terminal_before_anything_loads(tmp_path):
    out = tmp_path / "run"
    proc = terminal.posttrain("train", "grpo", "--task", "reasoning_gym(chain_sum, terms=3)", "--output", out,
                              cwd=tmp_path, timeout=120)
    terminal.assert_user_error(proc, "--task", "has no option 'terms'")
    assert not out.exists()
    proc = terminal.posttrain("eval", "--task", "reasoning_gym(chain_su)", cwd=tmp_path, timeout=120)
    terminal.assert_user_error(proc, "--task", "did you mean chain_sum")
