"""The code reward and its sandbox: behaviour of honest programs (cheats: tests/adversarial)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import pytest

from posttrain.rewards import sandbox
from posttrain.rewards.code import build_program, code_reward, code_rewards, extract_code, prompt_code, run_tests
from posttrain.data.tasks.humaneval import data_path, humaneval

ADD_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
ADD_TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


# ----------------------------------------------------------------------------- sandbox.run
def test_run_ok_captures_stdout_and_stderr():
    res = sandbox.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (res.status, res.returncode, res.stdout, res.stderr) == ("ok", 0, "out\n", "err\n")
    assert 0 < res.seconds < 5 and not res.truncated


def test_run_error_status_and_exit_code():
    res = sandbox.run("raise ValueError('boom')")
    assert res.status == "error" and res.returncode == 1 and "ValueError: boom" in res.stderr
    assert sandbox.run("import sys\nsys.exit(7)").returncode == 7


def test_run_timeout_wall_clock_and_cpu():
    t = time.monotonic()
    res = sandbox.run("import time\ntime.sleep(30)", timeout_s=1.0)
    assert res.status == "timeout" and time.monotonic() - t < 3
    assert sandbox.run("while True: pass", timeout_s=1.0).status == "timeout"


def test_run_memory_limit():
    res = sandbox.run("x = bytearray(600 * 2**20)\nprint('allocated')", memory_mb=256)
    assert res.status == "memory" and "allocated" not in res.stdout
    assert sandbox.run("x = bytearray(64 * 2**20)\nprint('allocated')", memory_mb=256).stdout == "allocated\n"


def test_run_killed_by_signal():
    res = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert res.status == "killed" and res.returncode in (-11, 128 + 11)


def test_run_output_cap_kills_early():
    t = time.monotonic()
    res = sandbox.run("while True:\n    print('y' * 10000)", max_output_bytes=50_000)
    assert res.status == "killed" and res.truncated and time.monotonic() - t < 3
    assert 0 < len(res.stdout) <= 50_000 and "output exceeded" in res.stderr


def test_run_stdin_closed_and_env_minimal(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    res = sandbox.run("import os\nprint(sorted(os.environ))\ninput()")
    assert res.status == "error" and "EOFError" in res.stderr
    assert "hunter2" not in res.stdout and "POSTTRAIN_TEST_SECRET" not in res.stdout
    assert set(eval(res.stdout)) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}


def test_run_file_size_and_open_file_limits():
    res = sandbox.run("open('big', 'wb').write(b'x' * (20 << 20))", max_file_mb=4)
    assert res.status == "error" and "File too large" in res.stderr
    res = sandbox.run("fs = [open('f%d' % i, 'w') for i in range(200)]", max_open_files=32)
    assert res.status == "error" and "Too many open files" in res.stderr


def test_run_fresh_temp_dir_each_time_and_removed():
    def temp_dirs():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(sandbox.TEMP_PREFIX)}

    before = temp_dirs()
    first = sandbox.run("import os\nos.mkdir('d')\nopen('d/left.txt', 'w').write('x')\nos.chmod('d', 0)\nprint(os.getcwd())")
    second = sandbox.run("import os\nprint(os.listdir('.'))")
    assert first.status == second.status == "ok"
    assert second.stdout.strip() == "[]"
    if sandbox.isolation() != "full":  # a host directory, removed afterwards (even with a mode-000 subdir)
        assert not os.path.exists(first.stdout.strip())
    assert temp_dirs() <= before


def test_isolation_mode_is_known():
    assert sandbox.isolation() in ("full", "namespaces", "none")
    best = os.geteuid() == 0 and os.path.exists("/usr/bin/python3") and os.path.exists("/usr/bin/unshare")
    if best and not os.environ.get("POSTTRAIN_SANDBOX"):
        assert sandbox.isolation() == "full"
        res = sandbox.run("import os\nprint(os.getuid(), os.getpid())")
        uid, pid = map(int, res.stdout.split())
        assert uid in sandbox.sandbox_uids() and pid == 2


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("completion, code", [
    ("Sure:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```python\nA\n```\ntext\n```python\nB\n```", "B\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\ny = 2\n```", "y = 2\n"),
    ("```Python3\nz = 3\n```", "z = 3\n"),
    ("```bash\nls\n```", "```bash\nls\n```"),
    ("Here:\n```python\ndef f():\n    return 1", "def f():\n    return 1"),
    ("    return a + b\n", "    return a + b\n"),
    ([{"role": "assistant", "content": "```python\nq = 4\n```"}], "q = 4\n"),
    (None, ""),
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def test_prompt_code_and_build_program():
    assert prompt_code(ADD_PROMPT, "add") == ADD_PROMPT
    assert prompt_code("Write add(a, b).", "add") == ""
    assert prompt_code(ADD_PROMPT, "sub") == ""
    assert build_program("    return a + b\n", ADD_PROMPT) == ADD_PROMPT + "    return a + b\n"
    full = "def add(a, b):\n    return a + b\n"
    assert build_program(full, ADD_PROMPT) == ADD_PROMPT + "\n" + full
    assert build_program(full, "") == full


# ----------------------------------------------------------------------------- code_reward
def test_humaneval_style_body_and_whole_function():
    assert code_reward(ADD_PROMPT, "    return a + b\n", ADD_TESTS, "add") == 1.0
    chat = "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nIt adds."
    assert code_reward(ADD_PROMPT, chat, ADD_TESTS, "add") == 1.0
    assert code_reward(ADD_PROMPT, "    return a * b\n", ADD_TESTS, "add") == 0.0


def test_plain_asserts_and_failures():
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
    assert code_reward("Write add.", "def add(a, b):\n    return a + b", tests) == 1.0
    assert code_reward("Write add.", "def add(a, b):\n    return 4", tests) == 0.0
    assert code_reward("Write add.", "def add(a, b) return", tests) == 0.0  # syntax error
    assert code_reward("Write add.", "def plus(a, b):\n    return a + b", tests) == 0.0  # wrong name
    assert code_reward("Write add.", "def add(a, b):\n    return a + b", None) is None
    with pytest.raises(ValueError, match="entry_point"):
        code_reward("", "def add(a, b): return a + b", ADD_TESTS)


def test_partial_credit():
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 5) == 6\nassert True\n"
    program = "def add(a, b):\n    return a + b"
    assert code_reward("", program, tests, partial=True) == pytest.approx(2 / 3)
    assert code_reward("", program, tests) == 0.0
    check = ADD_TESTS + "    assert candidate(2, 2) == 5\n    assert True, 'not a case'\n"
    rep = run_tests(ADD_PROMPT + "    return a + b\n", check, "add", ADD_PROMPT, partial=True)
    assert (rep.passed, rep.total) == (2, 3)
    assert code_reward(ADD_PROMPT, "    return 0\n", check, "add", partial=True) == pytest.approx(1 / 3)


def test_values_keep_their_exact_types():
    program = ("def f():\n    return (1, [2.5, None], {'k': {3, 4}}, b'\\x00', 1j, frozenset([5]), True, 2**20000)\n"
               "def g():\n    return float('nan')\n")
    tests = ("v = f()\n"
             "assert type(v) is tuple and v[:2] == (1, [2.5, None]) and type(v[2]['k']) is set\n"
             "assert v[3] == b'\\x00' and v[4] == 1j and v[5] == frozenset([5]) and v[6] is True\n"
             "assert v[7] == 2**20000\n"
             "import math\nassert math.isnan(g())\n")
    assert code_reward("", program, tests) == 1.0


def test_candidate_exceptions_map_to_builtins():
    program = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = "try:\n    f(-1)\n    raise SystemExit('no error')\nexcept ValueError as e:\n    assert 'negative' in str(e)\n"
    assert code_reward("", program, tests) == 1.0
    custom = "class Oops(Exception):\n    pass\ndef f(x):\n    raise Oops()\n"
    assert code_reward("", custom, tests) == 0.0


def test_arguments_are_copies():
    program = "def f(xs):\n    xs.append(1)\n    return len(xs)\n"
    assert code_reward("", program, "xs = []\nassert f(xs) == 1\nassert xs == []\n") == 1.0


def test_tests_may_use_candidate_constants_functions_and_modules():
    program = "import math\nLIMIT = 10\ndef double(x):\n    return 2 * x\ndef quad(x):\n    return double(double(x))\n"
    assert code_reward("", program, "assert quad(LIMIT) == 40 and double(1) == 2\n") == 1.0
    # `math` is not imported by the tests: the judge imports its own copy, never the candidate's
    tests = "assert math.isclose(quad(0.25), 1.0)\nassert math.pi > 3.14\n"
    assert code_reward("", program + "math.pi = 0\nmath.isclose = lambda *a: True\n", tests) == 1.0
    assert code_reward("", program.replace("2 * x", "3 * x"), tests) == 0.0


def test_code_rewards_parallel_order_and_bound():
    rows = [{"prompt": ADD_PROMPT, "tests": ADD_TESTS, "entry_point": "add"}] * 4 + [{"prompt": "x"}]
    completions = ["    return a + b\n", "    return a - b\n", "    return b + a\n", "    return 0\n", "anything"]
    assert code_rewards(rows, completions) == [1.0, 0.0, 1.0, 0.0, None]
    slow = [{"prompt": "", "tests": "assert f() == 1"}] * 6
    t = time.monotonic()
    assert code_rewards(slow, ["import time\ntime.sleep(0.6)\ndef f():\n    return 1"] * 6, max_workers=64) == [1.0] * 6
    took, cpus = time.monotonic() - t, os.cpu_count() or 1
    assert took >= 0.6 * math.ceil(6 / cpus) - 0.05  # never more than cpu_count at once
    assert took < 6 * 0.6  # but in parallel


def test_registry_uses_the_batch_scorer():
    from posttrain.rewards import get, score_batch

    reward = get("code")
    totals, parts = score_batch(reward, [ADD_PROMPT] * 2, ["    return a + b\n", "    return 1\n"],
                                rows=[{"tests": ADD_TESTS, "entry_point": "add"}] * 2)
    assert totals == [1.0, 0.0]


# ----------------------------------------------------------------------------- HumanEval
def test_humaneval_rows():
    rows = humaneval()
    assert os.path.isfile(data_path()) and len(rows) == 164
    assert rows[0]["task_id"] == "HumanEval/0" and len({r["task_id"] for r in rows}) == 164
    for r in rows:
        assert set(r) == {"task_id", "prompt", "tests", "entry_point", "canonical_solution"}
        assert prompt_code(r["prompt"], r["entry_point"]) == r["prompt"] and "def check" in r["tests"]
    rows[0]["prompt"] = "mutated"
    assert humaneval()[0]["prompt"] != "mutated"


def test_humaneval_all_canonical_pass_and_all_stubs_fail():
    """All 164 canonical solutions score 1.0; the same bodies replaced by `pass` score 0.0."""
    rows = humaneval()
    t = time.monotonic()
    good = code_rewards(rows, [r["canonical_solution"] for r in rows])
    assert [r["task_id"] for r, s in zip(rows, good) if s != 1.0] == []
    bad = code_rewards(rows, ["    pass\n"] * len(rows))
    assert [r["task_id"] for r, s in zip(rows, bad) if s != 0.0] == []
    assert time.monotonic() - t < 120


def test_unrunnable_tests_column_stops_at_load_naming_line_and_field(tmp_path):
    # found when the data is read, before any model is loaded, not as an exception mid-run
    from posttrain.algorithms.inputs import load_rows_for
    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.data import DataError, load_rows
    from posttrain.rewards import row_checks

    good = {"prompt": "Write f.", "tests": "assert f() == 1"}
    path = tmp_path / "code.jsonl"
    for bad, problem in [({"prompt": "Write f.", "tests": "assert f( == 1"}, "not valid Python"),
                         ({"prompt": "Write f.", "tests": "def check(candidate):\n    assert candidate() == 1"},
                          "no entry_point")]:
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        assert len(load_rows(path, "prompt", checks=row_checks("math"))) == 2  # other rewards: no check
        for load in (lambda: load_rows(path, "prompt", checks=row_checks("format:0.1,code")),
                     lambda: load_rows_for(GRPOConfig(data=str(path), reward="code"), "prompt")):
            with pytest.raises(DataError) as e:
                load()
            assert (e.value.source, e.value.line, e.value.field) == (str(path), 3, "tests")
            assert problem in str(e.value) and f"{path}:3" in str(e.value)
    fixed = {**good, "tests": "def check(candidate):\n    assert candidate() == 1", "entry_point": "f"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(fixed) + "\n" + json.dumps({"prompt": "no tests"}) + "\n")
    assert len(load_rows(path, "prompt", checks=row_checks("code"))) == 3
