"""posttrain.data: every format loads, and every malformed file names file, line and field."""

import json

import pytest

from posttrain.data import DataError, load_rows


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def test_preference_jsonl_loads(tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "chosen": "four"}]), "preference")
    assert [r["chosen"] for r in rows] == ["4", "four"]


def test_prompt_rows_keep_extra_columns(tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2", "tests": ["a"]}]), "prompt")
    assert rows == [{"prompt": "1+1?", "answer": "2", "tests": ["a"]}]


def test_conversational_rows(tmp_path):
    conv = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    assert load_rows(write_jsonl(tmp_path / "c.jsonl", [conv]), "preference")[0] == conv


def test_implicit_prompt_taken_from_shared_messages(tmp_path):
    user = {"role": "user", "content": "hi"}
    row = {"chosen": [user, {"role": "assistant", "content": "hello"}],
           "rejected": [user, {"role": "assistant", "content": "no"}]}
    (out,) = load_rows(write_jsonl(tmp_path / "c.jsonl", [row]), "preference")
    assert out["prompt"] == [user]
    assert out["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_json_parquet_csv_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([GOOD]))
    pq.write_table(pa.Table.from_pylist([GOOD]), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\n")
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.json", "a.parquet", "a.csv", "ds"):
        assert load_rows(tmp_path / name, "preference") == [GOOD], name


def error_of(tmp_path, lines, kind="preference"):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_rows(path, kind)
    return info.value


def test_invalid_json_names_line(tmp_path):
    e = error_of(tmp_path, [GOOD, GOOD, '{"prompt": "x", "chosen": '])
    assert (e.line, e.field) == (3, None)
    assert str(e).startswith(f"{tmp_path / 'bad.jsonl'}:3: invalid JSON")


def test_missing_field(tmp_path):
    e = error_of(tmp_path, [GOOD, {"prompt": "p", "chosen": "c"}])
    assert (e.line, e.field) == (2, "rejected")
    assert "bad.jsonl:2: field 'rejected': missing" in str(e)


def test_wrong_type(tmp_path):
    e = error_of(tmp_path, [{**GOOD, "chosen": 42}])
    assert (e.line, e.field) == (1, "chosen")
    assert "wrong type" in str(e) and "int" in str(e)


def test_empty_text(tmp_path):
    e = error_of(tmp_path, [GOOD, GOOD, {**GOOD, "prompt": "   "}])
    assert (e.line, e.field) == (3, "prompt")
    assert "empty text" in str(e)


def test_chosen_identical_to_rejected(tmp_path):
    e = error_of(tmp_path, [{**GOOD, "rejected": "4"}])
    assert (e.line, e.field) == (1, "rejected")
    assert "identical" in str(e)


def test_unknown_role(tmp_path):
    row = {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"}
    e = error_of(tmp_path, [GOOD, row])
    assert (e.line, e.field) == (2, "prompt[0].role")
    assert "unknown role 'wizard'" in str(e)


def test_blank_lines_keep_true_line_numbers(tmp_path):
    e = error_of(tmp_path, [GOOD, "", "", {"prompt": "p", "chosen": "c"}])
    assert e.line == 4


def test_row_not_an_object(tmp_path):
    e = error_of(tmp_path, [GOOD, [1, 2]], kind="prompt")
    assert e.line == 2 and "expected an object" in str(e)


def test_json_file_reports_row(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD, {**GOOD, "chosen": ""}]))
    with pytest.raises(DataError, match=r"a\.json, row 2: field 'chosen': empty text"):
        load_rows(tmp_path / "a.json", "preference")


def test_json_syntax_error_reports_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON"):
        load_rows(tmp_path / "a.json", "prompt")


def test_csv_reports_line(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,answer\nok,1\n,2\n")
    with pytest.raises(DataError, match=r"a\.csv:3: field 'prompt': empty text"):
        load_rows(tmp_path / "a.csv", "prompt")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_rows(tmp_path / "a.txt")


def test_uncached_hub_name_is_a_clear_error():
    with pytest.raises(DataError, match="never downloads"):
        load_rows("nobody/no-such-dataset-xyz", "prompt")


def test_csv_decodes_message_lists_only(tmp_path):
    import csv
    import json

    conv = json.dumps([{"role": "user", "content": "Sort [3, 1, 2]"}])
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "answer"])
        w.writerow(["[1, 2, 3] reversed?", "[3, 2, 1]"])  # text that happens to start with "["
        w.writerow([conv, "[1, 2, 3]"])
    rows = load_rows(tmp_path / "a.csv", "prompt")
    assert rows[0]["prompt"] == "[1, 2, 3] reversed?" and rows[0]["answer"] == "[3, 2, 1]"
    assert rows[1]["prompt"] == [{"role": "user", "content": "Sort [3, 1, 2]"}] and rows[1]["answer"] == "[1, 2, 3]"


def test_bare_hub_name_is_looked_up_in_the_local_cache():
    # a name without "/" (a canonical hub dataset) is not "file not found": the cache is tried
    with pytest.raises(DataError, match="never downloads"):
        load_rows("no_such_dataset_xyz", "prompt")


def test_jsonl_array_and_large_csv_cells(tmp_path):
    import csv

    e = error_of(tmp_path, ['[{"prompt": "a"}, {"prompt": "b"}]'], kind="prompt")
    assert e.line == 1 and "looks like a JSON array: rename the file to .json" in str(e)
    limit = csv.field_size_limit()
    (tmp_path / "big.csv").write_text('prompt\n"' + "y" * (limit + 10) + '"\n')
    assert load_rows(tmp_path / "big.csv", "prompt")[0]["prompt"] == "y" * (limit + 10)
    assert csv.field_size_limit() == limit  # restored after reading
