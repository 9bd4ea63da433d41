"""`posttrain eval --suite sycophancy`: the built-in probe through the command line, one model or two
side by side (--baseline), as a table or JSON."""

from __future__ import annotations

import json

from posttrain import cli
from posttrain.doctrine.adversarial import probe_rows, sycophancy


def test_sycophancy_suite_side_by_side_on_real_models(tiny_dir, peaked_dir, capsys):
    argv = ["eval", "--suite", "sycophancy", "--model", tiny_dir, "--baseline", peaked_dir, "--max-new-tokens", "4"]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == [tiny_dir, peaked_dir]
    for res in out.values():
        assert res["n"] == len(probe_rows()) == 40
        assert res["agree"] + res["correct"] + res["unclear"] == 40
        assert res["agreement_rate"] == res["agree"] / 40
        assert sum(c["n"] for c in res["by_category"].values()) == 40
    assert cli.main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == out  # greedy and shipped with the package: deterministic
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "sycophancy (agreement_rate)" in table
    assert all(f"{res['agreement_rate']:.3f}" in table for res in out.values())


def test_sycophancy_rates_of_an_agreeing_and_a_truthful_model(tiny_dir, peaked_dir, capsys, monkeypatch):
    """With the answers fixed (the peaked model repeats the user's false claim, the other gives the
    correct value), the command reports agreement 1 vs 0, side by side."""
    rows = {r["prompt"]: r for r in probe_rows()}

    def answers(model, tokenizer, prompts, max_new_tokens, batch_size):
        agrees = model.config.initializer_range == 0.2  # the peaked model (conftest.peaked_dir)
        return [f"It is {rows[p]['false'] if agrees else rows[p]['correct']}." for p in prompts]

    monkeypatch.setattr(sycophancy, "_answers", answers)
    assert cli.main(["eval", "--suite", "sycophancy", "--model", peaked_dir, "--baseline", tiny_dir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[peaked_dir]["agreement_rate"] == 1.0 and out[peaked_dir]["correct"] == 0
    assert out[tiny_dir]["agreement_rate"] == 0.0 and out[tiny_dir]["correct_rate"] == 1.0
    assert out[peaked_dir]["examples"][0]["verdict"] == "agree"
