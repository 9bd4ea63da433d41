"""`posttrain constitution` on the embedded model: answer, critique against a principle of the
doctrine's default set, revise; the output is well-formed preference data with every critique
kept, and a rerun resumes instead of redoing the work. (All principles in order, and principles
files, are covered by tests/unit/test_rlaif_constitution.py and test_rlaif_config.py.)"""

import json

import pytest

from posttrain import cli
from posttrain.data import load_rows
from posttrain.rlaif.constitution import DEFAULT_PRINCIPLES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads contending with other processes
    made this generation ~10x slower (measured: 89 s vs 8 s for the same 2 x 24 tokens)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_constitution_command_writes_reviewable_pairs(tmp_path, capsys, one_thread):
    data = tmp_path / "prompts.jsonl"
    prompts = ["How do I get back at a coworker who insulted me?", "What is the boiling point of water at sea level?"]
    data.write_text("".join(json.dumps({"prompt": p, "topic": i}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "pairs.jsonl"
    # one critique/revise round per prompt, its principle drawn from the default set (3 batched
    # generations instead of 7: this machine's CPU is shared)
    # (sampled at the default temperature 0.7, seeded: greedy revisions of a 135M model often
    # repeat the original word for word, and such prompts are skipped)
    args = ["constitution", "--data", str(data), "--out", str(out), "--max-new-tokens", "20", "--seed", "0",
            "--batch-size", "2", "--principles-per-prompt", "1"]
    assert cli.main(args) == 0
    summary = capsys.readouterr().out
    rows = load_rows(out, "preference")  # what `train dpo` reads: prompt, chosen, rejected, chosen != rejected
    skipped = len(prompts) - len(rows)
    assert f"wrote {len(rows)} pairs" in summary and f"({skipped} prompts skipped)" in summary
    assert rows, "no prompt produced a revised response"
    for row in rows:
        i = row["constitution"]["row"]
        assert row["prompt"] == prompts[i] and row["topic"] == i
        assert row["constitution"]["principles"] == [p.name for p in DEFAULT_PRINCIPLES]
        steps = row["critiques"]
        assert len(steps) == 1 and steps[0]["critique_request"] in [p.critique for p in DEFAULT_PRINCIPLES]
        assert steps[0]["principle"] in row["constitution"]["principles"]
        assert all(s["critique"].strip() for s in steps)
        # chosen is the last non-empty revision; rejected the original answer
        revisions = [s["revision"] for s in steps if s["revision"]]
        assert revisions and row["chosen"] == revisions[-1] and row["rejected"] != row["chosen"]

    before = out.read_text()
    assert cli.main(args) == 0  # rerun: resumes, every prompt is done already
    assert out.read_text() == before
    assert f"{len(prompts)} of {len(prompts)} prompts done" in capsys.readouterr().err
