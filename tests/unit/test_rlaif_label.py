"""AI labeling (N responses -> chosen/rejected) and its resumable output, with rule-based judges."""

import json
import re

import pytest

from posttrain.data import DataError, load_rows
from posttrain.rlaif import FunctionBackend, Judge, JudgeConfig
from posttrain.rlaif.labeling import label_rows, load_response_rows, pair_by_scores
from posttrain.rlaif.resume import ResumableJsonl


def judge_of(fn, **fields):
    cfg = JudgeConfig(backend="openai", model="rules", cache=None, **fields)
    return Judge(cfg, FunctionBackend(cfg, fn))


def stars(messages):
    """Rates a response by the number of '*' in it (a judge with a known answer)."""
    response = re.search(r"\[Response\]\n(.*?)\n\n", messages[-1]["content"], re.S).group(1)
    return f"Rating: {min(10, 1 + response.count('*'))}"


def fewer_stars_loses(messages):
    text = messages[-1]["content"]
    a = re.search(r"\[Response A\]\n(.*?)\n\n", text, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\n", text, re.S).group(1)
    return "Winner: tie" if a.count("*") == b.count("*") else ("Winner: A" if a.count("*") > b.count("*") else "Winner: B")


ROWS = [
    {"prompt": "p0", "responses": ["*", "***", "**"], "answer": "42"},
    {"prompt": "p1", "responses": ["x", "x!"]},                      # equal scores: no pair
    {"prompt": [{"role": "user", "content": "p2"}], "responses": ["****", "-"]},
]


def test_pair_by_scores():
    assert pair_by_scores([0.2, 0.9, None, 0.5]) == ((1, 0), "")
    assert pair_by_scores([0.5, None])[0] is None
    assert pair_by_scores([0.5, 0.5])[0] is None
    assert pair_by_scores([0.5, 0.6], min_margin=0.2)[0] is None


def test_score_strategy_pairs_best_with_worst():
    out = label_rows(judge_of(stars), ROWS, "score")
    pair, why = out[0]
    assert why == "" and pair["chosen"] == "***" and pair["rejected"] == "*"
    assert pair["prompt"] == "p0" and pair["answer"] == "42"                 # extra columns kept
    assert pair["label"]["strategy"] == "score" and pair["label"]["chosen_index"] == 1
    assert pair["label"]["scores"] == pytest.approx([1 / 9, 3 / 9, 2 / 9])
    assert out[1] == (None, "no score gap between the best and worst responses")
    assert out[2][0]["chosen"] == "****" and out[2][0]["prompt"] == [{"role": "user", "content": "p2"}]


def test_compare_strategy_needs_a_consistent_direct_win():
    out = label_rows(judge_of(fewer_stars_loses), ROWS, "compare")
    assert (out[0][0]["chosen"], out[0][0]["rejected"]) == ("***", "*")
    assert out[0][0]["label"]["wins"] == [0, 2, 1] and out[0][0]["label"]["confidence"] == 1.0
    assert out[1][0] is None and "tie" in out[1][1]
    biased = label_rows(judge_of(lambda m: "Winner: A"), ROWS[:1], "compare")
    assert biased[0][0] is None and "position_bias" in biased[0][1]


def test_output_rows_are_valid_preference_data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with ResumableJsonl(path, "label") as out:
        for i, (rec, why) in enumerate(label_rows(judge_of(stars), ROWS, "score")):
            out.add(i, rec, why)
    rows = load_rows(path, "preference")  # what train dpo / train rm read
    assert len(rows) == 2 and rows[0]["label"]["row"] == 0 and rows[1]["label"]["row"] == 2


def test_input_errors_name_line_and_field(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps({"prompt": "a", "responses": ["x", "y"]}) + "\n\n"
                    + json.dumps({"prompt": "b", "responses": ["only one"]}) + "\n")
    with pytest.raises(DataError, match=r"responses.jsonl:3: field 'responses': needs at least two"):
        load_response_rows(path)
    path.write_text(json.dumps({"prompt": "a", "responses": ["x", 5]}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'responses\[1\]': wrong type"):
        load_response_rows(path)
    path.write_text(json.dumps({"prompt": "a", "completions": ["x", "y"]}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'responses': missing"):
        load_response_rows(path)
    assert load_response_rows(path, "completions")[0]["completions"] == ["x", "y"]


def test_resumable_output_skips_done_rows_and_repairs_a_torn_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with ResumableJsonl(path, "label") as out:
        out.add(0, {"prompt": "p", "chosen": "a", "rejected": "b"})
        out.add(1, None, "tie")
    # a crash: row 2's pair written, its progress line not, and a torn half line after it
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "c", "rejected": "d", "label": {"row": 2}}) + "\n")
        f.write('{"prompt": "p", "cho')
    resumed = ResumableJsonl(path, "label")
    assert resumed.done == {0, 1, 2} and resumed.resumed and resumed.written == 2 and resumed.skipped == 1
    resumed.add(3, {"prompt": "p", "chosen": "e", "rejected": "f"})
    resumed.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]  # every line parses again
    assert [r["label"]["row"] for r in lines] == [0, 2, 3]
    fresh = ResumableJsonl(path, "label", overwrite=True)
    assert fresh.done == set() and not fresh.resumed
    fresh.close()
