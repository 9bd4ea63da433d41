"""SFT on the real embedded model, through the CLI as a user runs it: conversational rows
({"messages"}, TRL's most common SFT format) with worked two-digit additions from the arithmetic
task's train split; greedy accuracy on the task's test split before and after, with the task's
reward. Defaults otherwise (LoRA at the SFT rank 64, lr 2e-4, padding-free packing, loss on the
assistant turns). Measured (seed 0, 20 steps of 8, 50 test problems): about 0.15 -> 0.8; the run
must at least double its accuracy and gain 25 points."""

import json
import re

import pytest

from posttrain.cli import main
from posttrain.data.tasks import get_task

pytestmark = pytest.mark.integration


def test_sft_raises_greedy_accuracy(tmp_path):
    rows = []
    for r in get_task("arithmetic", "train", n=200, seed=1):
        a, b = re.findall(r"\d+", r["prompt"])[:2]
        rows.append({"messages": [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": f"{a} + {b} = {r['answer']}. Answer: {r['answer']}"}]})
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "sft", "--data", str(data), "--task", "arithmetic", "--eval-size", "50",
                 "--eval-max-new-tokens", "32", "--max-steps", "20", "--output-dir", str(tmp_path), "--name", "s",
                 "--checkpoint-every", "0"])
    assert code == 0
    evals = [json.loads(line) for line in (tmp_path / "s" / "evals.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 20
    assert after["loss"] < 0.5 * before["loss"]  # held-out loss on the 5% of rows kept out
    assert after["accuracy"] >= 2 * before["accuracy"] and after["accuracy"] >= before["accuracy"] + 0.25, (before, after)
    assert (tmp_path / "s" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "s" / "report.html").is_file()
