"""`posttrain eval --env`: greedy episodes of an environment's held-out rows, at the terminal."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from terminal import assert_user_error, posttrain  # noqa: E402


def test_eval_plays_greedy_episodes_of_the_test_rows(stoppable_dir):
    proc = posttrain("eval", "--model", stoppable_dir, "--env", "guess_number(hi=8, max_turns=2)", "--n", "3", "--max-turns", "2",
                     "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)[stoppable_dir]
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0 and res["success"] == res["accuracy"]
    assert "secret" in res["examples"][0]["prompt"]


def test_eval_env_errors_name_the_flag(stoppable_dir):
    assert_user_error(posttrain("eval", "--model", stoppable_dir, "--env", "guess_numbr"), "--env", "guess_number")
    assert_user_error(posttrain("eval", "--model", stoppable_dir, "--env", "guess_number", "--reward", "math"),
                      "--reward", "--env")
    assert_user_error(posttrain("eval", "--model", stoppable_dir, "--task", "arithmetic", "--max-turns", "3"),
                      "--max-turns", "--env")
    assert_user_error(posttrain("eval", "--model", stoppable_dir, "--env", "guess_number", "--task", "arithmetic"),
                      "--env", "--task")
