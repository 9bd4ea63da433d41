"""Bad data files, bad reward specs and cut-off answers, as a person at the terminal meets them.

Each class of bad input goes through the CLI as a subprocess (``posttrain score`` loads a dataset
and a reward spec without importing torch, so it is the cheapest verb that reads both; one run of
``posttrain train grpo`` shows the training path refuses the same file before loading a model):
exit status 2, one ``error:`` line naming the file and line (or the flag), no traceback. Then the
rewards: a completion that ends mid-answer is never graded on the fragment it ends with.
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

from posttrain.data import DataError, load_rows, read_utf8  # noqa: E402
from posttrain.errors import UserError  # noqa: E402

ROW = {"prompt": "What is 1 + 1?", "answer": "2", "completion": "1 + 1 = 2\nAnswer: 2"}
LINE = json.dumps(ROW) + "\n"


def score(tmp_path, name: str, data: bytes | str, reward: str = "math", *extra: str):
    path = tmp_path / name
    if isinstance(data, str):
        data = data.encode()
    if not path.exists():
        path.write_bytes(data)
    return terminal.posttrain("score", "--reward", reward, "--data", name, *extra, cwd=tmp_path)


# (file name, its bytes, fragments the message must hold)
BAD_FILES = [
    ("bom16.jsonl", LINE.encode("utf-16"), ["bom16.jsonl", "UTF-16", "iconv -f UTF-16 -t UTF-8"]),
    ("le16.jsonl", (LINE * 2).encode("utf-16-le"), ["le16.jsonl", "UTF-16", "iconv -f UTF-16 -t UTF-8"]),  # no BOM
    ("wide32.csv", "prompt\nhi\n".encode("utf-32"), ["wide32.csv", "UTF-32", "iconv -f UTF-32 -t UTF-8"]),
    ("latin1.jsonl", (LINE * 2).encode() + '{"prompt": "café"}\n'.encode("latin-1"),
     ["latin1.jsonl:3:", "not valid UTF-8", "byte 0xe9", "must be UTF-8"]),
    ("latin1.csv", "prompt,answer\nok,1\ncafé,2\n".encode("latin-1"), ["latin1.csv:3:", "not valid UTF-8"]),
    ("array.jsonl", json.dumps([ROW, ROW]), ["array.jsonl:1:", "looks like a JSON array", "rename the file to .json"]),
    ("pretty.jsonl", json.dumps([ROW, ROW], indent=2), ["pretty.jsonl:1:", "looks like a JSON array"]),
    ("object.jsonl", json.dumps(ROW, indent=2), ["object.jsonl:1:", "one JSON document over several lines"]),
    ("scalar.jsonl", LINE + "42\n", ["scalar.jsonl:2:", "expected an object", "got a number"]),
    ("empty.jsonl", "", ["empty.jsonl", "no rows", "empty"]),
    ("blank.jsonl", "\n  \n\n", ["blank.jsonl", "only blank lines"]),
    ("missing.jsonl", LINE + json.dumps({"answer": "2"}) + "\n", ["missing.jsonl:2:", "field 'prompt': missing"]),
    ("wrongtype.jsonl", json.dumps({**ROW, "prompt": 7}) + "\n", ["wrongtype.jsonl:1:", "field 'prompt'", "wrong type"]),
    ("quote.csv", 'prompt,completion\nok,fine\n"unclosed,x\nmore,y\n', ["quote.csv:3:", "malformed CSV"]),
    ("cells.csv", "prompt,completion\na,b\nc,d,e\n", ["cells.csv:3:", "3 cells", "header has 2 columns"]),
    ("fake.parquet", "prompt,answer\n", ["fake.parquet", "not a readable parquet file"]),
]


def test_bad_data_files_are_one_clear_error_each(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "rows.jsonl").write_text(LINE)
    cases = BAD_FILES + [("folder", b"", ["folder", "save_to_disk", "pass the file's path"])]
    for name, data, fragments in cases:
        terminal.assert_user_error(score(tmp_path, name, data), *fragments)


def test_good_files_the_old_reader_refused_are_read(tmp_path):
    # a UTF-8 byte-order mark is dropped; a 200 KB CSV cell (over csv's 128 KB default limit) is read
    big = "x" * 200_000
    text = f"prompt,answer,completion\n\"{big}\",2,\"Answer: 2\"\n"
    assert csv.field_size_limit() < len(big)
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + LINE.encode())
    for name, data in (("bom.jsonl", None), ("big.csv", text)):
        if data is not None:
            (tmp_path / name).write_text(data)
        proc = score(tmp_path, name, b"", "math", "--out", f"{name}.out.jsonl")
        assert proc.returncode == 0, proc.stderr
        [row] = [json.loads(line) for line in (tmp_path / f"{name}.out.jsonl").read_text().splitlines()]
        assert row["reward"] == 1.0
    assert row["prompt"] == big
    assert csv.field_size_limit() < len(big)  # the process-wide limit is not left raised


def test_training_refuses_a_bad_file_before_loading_a_model(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes((LINE * 2).encode() + '{"prompt": "café"}\n'.encode("latin-1"))
    proc = terminal.posttrain("train", "grpo", "--data", "latin1.jsonl", "--reward", "math", "--max-steps", "1",
                              "--output-dir", "runs", cwd=tmp_path)
    terminal.assert_user_error(proc, "latin1.jsonl:3:", "not valid UTF-8")
    assert not (tmp_path / "runs").exists()


BAD_KTO = [  # KTO's unpaired rows (posttrain train dpo --loss-type kto): (rows, what the message names)
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d"}],
     ["bad.jsonl:2:", "field 'label': missing"]),
    ([{"prompt": "a", "completion": "b", "label": "yes"}], ["bad.jsonl:1:", "field 'label'", "true (desirable)"]),
    ([{"prompt": "a", "completion": "b", "label": 1}], ["bad.jsonl:1:", "field 'label'", "got 1"]),
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": " ", "label": False}],
     ["bad.jsonl:2:", "field 'completion': empty text"]),
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "chosen": "d", "rejected": "e"}],
     ["bad.jsonl:2:", "mixed formats", "first row is unpaired"]),
    ([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "label": True}],
     ["bad.jsonl:1:", "field 'completion'", "must both be strings or both message lists"]),
]


@pytest.mark.parametrize("rows,fragments", BAD_KTO, ids=["no-label", "label-text", "label-int", "empty", "mixed-rows",
                                                          "mixed-fields"])
def test_training_refuses_a_malformed_kto_row_before_loading_a_model(tmp_path, rows, fragments):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = terminal.posttrain("train", "dpo", "--loss-type", "kto", "--data", "bad.jsonl", "--max-steps", "1",
                              "--output-dir", "runs", cwd=tmp_path)
    terminal.assert_user_error(proc, *fragments)
    assert not (tmp_path / "runs").exists()


BAD_SPECS = [
    ("mth", ["--reward 'mth'", "unknown reward 'mth'", "did you mean 'math'", "known: code, countdown, format"]),
    ("math,frmat:0.2", ["--reward 'math,frmat:0.2'", "unknown reward 'frmat'"]),
    ("length(max_len=5", ["--reward 'length(max_len=5'", "unbalanced '('"]),
    ("math:abc", ["--reward 'math:abc'", "weight 'abc'", "not a number"]),
    ("math:nan", ["--reward 'math:nan'", "not a number"]),
    ("length(maxlen=5)", ["--reward 'length(maxlen=5)'", "no option 'maxlen'", "max_len"]),
    ("math(x)", ["--reward 'math(x)'", "takes no positional argument"]),
    ("math,", ["--reward 'math,'", "cannot parse"]),
]


def test_bad_reward_specs_name_the_flag_and_the_spec(tmp_path):
    (tmp_path / "rows.jsonl").write_text(LINE)
    for spec, fragments in BAD_SPECS:
        terminal.assert_user_error(score(tmp_path, "rows.jsonl", b"", spec), *fragments)


def test_reward_spec_errors_keep_their_old_bases():
    from posttrain import rewards

    with pytest.raises(rewards.UnknownRewardError) as info:
        rewards.from_spec("math,mth", flag="--eval-reward")
    e = info.value
    assert isinstance(e, UserError) and isinstance(e, ValueError) and isinstance(e, KeyError)
    assert str(e).startswith("--eval-reward 'math,mth': unknown reward 'mth'")  # no KeyError quotes
    assert (e.spec, e.flag) == ("math,mth", "--eval-reward")
    with pytest.raises(rewards.RewardSpecError, match=r"^--reward 'math:1:2'"):
        rewards.parse_spec("math:1:2")


def test_read_utf8_names_line_and_byte_offset(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(codecs.BOM_UTF8 + b'[\n{"prompt": "ok"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(DataError) as info:
        read_utf8(path, "a.json")
    # offset 35 = the BOM (3) + '[\n' (2) + the second line (18) + '{"prompt": "' (12)
    assert info.value.line == 3 and "byte 0xff at byte offset 35" in str(info.value)
    path.write_bytes(codecs.BOM_UTF8 + b'[{"prompt": "ok"}]')
    assert read_utf8(path) == '[{"prompt": "ok"}]'
    assert load_rows(path) == [{"prompt": "ok"}]


# ----------------------------------------------------------------------------- cut-off answers
# The math reward's own cases are in test_math_reward.py (CUT_OFF).


@pytest.mark.parametrize("completion,pattern", [
    ("work\nAnswer: \\frac{1}{", "answer_line"),
    ("work\nAnswer: 3 +", "answer_line"),
    ("<think>add</think><answer>3 \\cdot</answer>", "think_answer"),
    ("so \\boxed{3 +}", "boxed"),
])
def test_format_reward_refuses_an_unfinished_answer(completion, pattern):
    from posttrain.rewards.format import format_reward

    assert format_reward("p", completion, pattern=pattern) == 0.0
    finished = completion.replace("\\frac{1}{", "\\frac{1}{2}").replace(" +", " + 4").replace(" \\cdot", " \\cdot 4")
    assert format_reward("p", finished, pattern=pattern) == 1.0


def test_countdown_reward_refuses_an_unclosed_answer_tag():
    from posttrain.rewards.countdown import countdown_reward, extract_expression

    columns = {"target": 9, "numbers": [3, 5, 2, 7]}
    assert countdown_reward("p", "<answer>\n(3 + 5) * 2 - 7", **columns) == 0.0  # cut before </answer>
    assert extract_expression("<answer>1</answer>, no: <answer>\n(3 + 5) * 2 - 7") is None  # not the old answer
    assert countdown_reward("p", "<answer>\n(3 + 5) * 2 - 7\n</answer>", **columns) == 1.0
    assert countdown_reward("p", "Answer: (3 + 5) * 2 -", **columns) == 0.0  # a cut expression is a syntax error


def test_code_reward_does_not_run_a_block_cut_off_mid_way():
    from posttrain.rewards.code import code_reward, extract_code

    cut = "Here:\n```python\ndef add(a, b):\n    return a + b\n"
    assert extract_code(cut, partial_block=False) is None
    assert extract_code(cut) == "def add(a, b):\n    return a + b\n"  # kept for display
    replaced = "```python\ndef add(a, b):\n    return a + b\n```\nBetter:\n```python\ndef add(a, b):\n    return ("
    assert extract_code(replaced, partial_block=False) is None  # not the earlier block it went on to replace
    assert code_reward("", cut, tests="assert add(1, 2) == 3") == 0.0  # before any sandbox starts
    assert extract_code("```python\nx = 1\n```\nDone.", partial_block=False) == "x = 1\n"
