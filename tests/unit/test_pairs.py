"""`posttrain pairs` on the tiny model with a toy reward: valid preference rows, counts, resume."""

import json

import pytest

from posttrain import rewards as rw
from posttrain.data import load_rows
from posttrain.sampling.generation import SamplingConfig
from posttrain.algorithms.pairs import choose_pair, make_pair_row, make_pairs

# reward 1 when the completion starts with a letter a-m, else 0 (about 40% at the start)
TOY_REWARD = "format(pattern=[a-m].*)"
SETTINGS = {"test": 1}


def test_choose_pair_picks_best_and_worst_first_of_ties():
    assert choose_pair([None, 1.0, 0.0, 1.0, 0.0]) == (1, 2)
    assert choose_pair([0.2, 0.9, 0.1]) == (1, 2)
    assert choose_pair([0.5, 0.5, 0.5]) == "equal"
    assert choose_pair([None, 1.0, None]) == "unjudged"
    assert choose_pair([float("nan"), 1.0, 0.0]) == (1, 2)


def test_pair_rows_keep_format_and_columns():
    row = make_pair_row({"prompt": "Q?", "answer": "4"}, "4", "5", 1.0, 0.0)
    assert row == {"prompt": "Q?", "chosen": "4", "rejected": "5", "chosen_score": 1.0, "rejected_score": 0.0, "answer": "4"}
    conv = make_pair_row({"prompt": [{"role": "user", "content": "Q?"}]}, "4", "5", 1.0, 0.0)
    assert conv["chosen"] == [{"role": "assistant", "content": "4"}]


def _run(model, tok, rows, out, batch_prompts=2, on_batch=None, settings=SETTINGS):
    return make_pairs(model, tok, rows, out, 8, rw.from_spec(TOY_REWARD), SamplingConfig(1.0, max_new_tokens=3),
                      settings, seed=0, batch_prompts=batch_prompts, on_batch=on_batch)


@pytest.fixture(scope="module")
def peaked(peaked_dir):
    from posttrain.models import load_model

    return load_model(peaked_dir)


def test_pairs_are_valid_preference_rows(tmp_path, peaked, toy_prompts):
    model, tok = peaked
    rows = load_rows(toy_prompts, "prompt")
    out = tmp_path / "pairs.jsonl"
    report = _run(model, tok, rows, out)
    pairs = load_rows(out, "preference")  # TRL format, validated
    assert report.pairs == len(pairs) == report.total_pairs >= 3
    assert report.pairs + report.skipped_equal + report.skipped_unjudged == len(rows) == report.sampled
    for p in pairs:
        assert p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0
        assert rw.from_spec(TOY_REWARD)(p["prompt"], p["chosen"]) == 1.0
    progress = (tmp_path / "pairs.jsonl.progress.jsonl").read_text().splitlines()
    assert json.loads(progress[0]) == {"settings": SETTINGS} and len(progress) == 1 + len(rows)
    assert 0 < report.mean_score < 1


class Stop(Exception):
    pass


def test_resume_skips_done_prompts_and_matches_a_full_run(tmp_path, peaked, toy_prompts):
    model, tok = peaked
    rows = load_rows(toy_prompts, "prompt")
    full = tmp_path / "full.jsonl"
    _run(model, tok, rows, full)

    def stop_after_two_batches(report):
        if report.sampled >= 4:
            raise Stop

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Stop):
        _run(model, tok, rows, out, on_batch=stop_after_two_batches)
    first = out.read_text()
    # a crash after a pair line but before its progress record: the line must not survive
    with open(out, "a") as f:
        f.write(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    report = _run(model, tok, rows, out)
    assert report.already_done == 4 and report.sampled == 4
    assert out.read_text().startswith(first)
    assert out.read_text() == full.read_text()  # batches are seeded by position: same pairs as one run
    again = _run(model, tok, rows, out)
    assert again.sampled == 0 and again.total_pairs == report.total_pairs


def test_other_settings_refuse_to_continue(tmp_path, peaked, toy_prompts):
    model, tok = peaked
    rows = load_rows(toy_prompts, "prompt")[:2]
    out = tmp_path / "p.jsonl"
    _run(model, tok, rows, out)
    with pytest.raises(ValueError, match="other settings"):
        _run(model, tok, rows, out, settings={"test": 2})
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(ValueError, match="not made by"):
        _run(model, tok, rows, foreign)


def test_cli_pairs(tmp_path, peaked_dir, toy_prompts):
    from posttrain.cli import main

    out = tmp_path / "cli.jsonl"
    args = ["pairs", "--model", peaked_dir, "--data", toy_prompts, "--reward", TOY_REWARD, "--n", "4",
            "--max-new-tokens", "3", "--out", str(out), "--limit", "4"]
    assert main(args) == 0
    lines = out.read_text().splitlines()
    assert len((tmp_path / "cli.jsonl.progress.jsonl").read_text().splitlines()) == 5
    assert main(args) == 0 and out.read_text().splitlines() == lines  # resumed: nothing redone
    assert main(["pairs", "--data", toy_prompts, "--out", str(out)]) == 2  # no reward for plain data
    with pytest.raises(SystemExit) as refused:  # --n is checked as the flags are parsed
        main(["pairs", "--data", toy_prompts, "--reward", "math", "--n", "1", "--out", str(out)])
    assert refused.value.code == 2
