"""`posttrain score` and `posttrain tasks` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from posttrain.cli import main


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _table_rows(text):
    """The body rows of a rich table, as lists of stripped cells."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


ROWS = [
    {"prompt": "What is 2 + 2?", "answer": "4", "completion": "2 plus 2.\nAnswer: 4"},  # math 1, format 1
    {"prompt": "What is 3 + 3?", "answer": "6", "completion": "Answer: 7"},  # math 0, format 0 (no reasoning)
    {"prompt": "What is 5 + 5?", "answer": "10", "completion": "5 and 5.\nAnswer: 10"},  # math 1, format 1
    {"prompt": "What is 1 + 1?", "answer": None, "completion": "Answer: 2"},  # math None, format 0
]


def test_score_prints_mean_none_count_and_parts(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "scored.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--reward", "math,format:0.5", "--data", str(data), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # totals: 1 + 0.5 = 1.5; 0 + 0 = 0; 1.5; None-math row -> 0.5 * 0 = 0.0 (format judged it)
    # mean total = (1.5 + 0 + 1.5 + 0) / 4 = 0.75; math mean over 3 judged = 2/3; format mean = 2/4
    cells = {c[0]: c[1:] for c in _table_rows(text)}
    assert cells["total"] == ["", "0.7500", "0"]  # weight, mean, None count
    assert cells["math"] == ["1", "0.6667", "1"]
    assert cells["format"] == ["0.5", "0.5000", "0"]
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.5, 0.0, 1.5, 0.0]
    assert [r["reward/math"] for r in scored] == [1.0, 0.0, 1.0, None]
    assert scored[0]["prompt"] == ROWS[0]["prompt"] and scored[0]["answer"] == "4"


def test_score_custom_completions_field_and_messages(tmp_path, capsys):
    rows = [
        {"prompt": "q", "answer": "4", "response": [{"role": "assistant", "content": "Answer: 4"}]},
        {"prompt": "q", "answer": "5", "response": [{"role": "assistant", "content": "Answer: 4"}]},
    ]
    data = _write_jsonl(tmp_path / "conv.jsonl", rows)
    assert main(["score", "--reward", "math", "--data", str(data), "--completions-field", "response"]) == 0
    cells = {c[0]: c[1:] for c in _table_rows(capsys.readouterr().out)}
    assert cells["total"] == ["", "0.5000", "0"]  # (1 + 0) / 2


def test_score_reports_errors_clearly(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "1"}])
    assert main(["score", "--reward", "math", "--data", str(data)]) == 2
    assert "lack the field 'completion'" in capsys.readouterr().err
    assert main(["score", "--reward", "nope", "--data", str(data)]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err
    assert main(["score", "--reward", "math:x", "--data", str(data)]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main(["score", "--reward", "math", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_tasks_list_show_export(tmp_path, capsys):
    assert main(["tasks"]) == 0
    listed = capsys.readouterr().out
    assert "arithmetic" in listed and "countdown" in listed and "humaneval" in listed
    # the environments (train grpo --env), with their tools, and the tools
    assert "guess_number" in listed and "ta:TowerOfHanoi-v0" in listed and "[A C]" in listed
    assert "tools: calculator, python" in listed
    assert main(["tasks", "show", "arithmetic", "--n", "2", "--split", "test"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("Put the final answer after 'Answer:'.") == 2
    out = tmp_path / "test.jsonl"
    assert main(["tasks", "export", "arithmetic", "--split", "test", "--n", "20", "--out", str(out), "--opt", "digits=3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from posttrain.data.tasks import get_task

    assert rows == get_task("arithmetic", "test", n=20, seed=0, digits=3)  # same rows as the library
    assert main(["tasks", "show", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["tasks", "show", "arithmetic", "--opt", "digits"]) == 2


def test_export_then_score_round_trip(tmp_path):
    # the exported task file is valid input for `score` once completions are added
    data = tmp_path / "arith.jsonl"
    assert main(["tasks", "export", "arithmetic", "--n", "5", "--out", str(data)]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):  # right answers for even rows, wrong for odd: mean 3/5
        row["completion"] = f"Answer: {int(row['answer']) + (i % 2)}"
    _write_jsonl(data, rows)
    cmd = [sys.executable, "-m", "posttrain.cli", "score", "--reward", "math", "--data", str(data)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"COLUMNS": "120", "PATH": ""})
    assert result.returncode == 0, result.stderr
    cells = {c[0]: c[1:] for c in _table_rows(result.stdout)}
    assert cells["total"] == ["", "0.6000", "0"]  # rows 0, 2, 4 right: 3 / 5
