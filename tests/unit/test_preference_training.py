"""SimPO, ORPO and KTO through the DPO trainer on the tiny model: each learns; the reference-free
losses never load, run or store a reference; KTO's examples (unpaired rows, or pairs split in two),
its fixed KL pairs and its precomputed reference table; the flags of another loss type, refused at
the terminal (malformed KTO rows: test_errors_data.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from posttrain.algorithms import dpo as dpo_mod
from posttrain.algorithms import dpo_data as dd
from posttrain.algorithms import kto_data
from posttrain.algorithms.dpo import DPOConfig, train_dpo
from posttrain.data import load_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light", "paper", "horse", "bread", "chair"]


def _pairs():
    return [{"prompt": f"Say the word {w}.", "chosen": f"{w}", "rejected": f"I will not say that, here is {WORDS[i - 1]} instead."}
            for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    return str(path)


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> str:
    """KTO's own format, conversational: the pairs' completions as separate labelled rows."""
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    rows = []
    for r in _pairs():
        for key, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                         "completion": [{"role": "assistant", "content": r[key]}], "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, model, data, **kw):
    base = dict(model=model, data=data, output_dir=str(tmp_path), lora=False, lr=3e-3, batch_size=4, max_steps=12,
                eval_fraction=0.0, checkpoint_every=0, eval_at_start=False, log_every=100)
    base.update(kw)
    return DPOConfig(**base)


def _mean(h, key, sl):
    return sum(m[key] for m in h[sl]) / len(h[sl])


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_learn_without_a_reference(tmp_path, tiny_dir, prefs, loss_type, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a reference was used")

    monkeypatch.setattr(dpo_mod.ReferenceLogps, "prepare", never)  # the table: never computed
    monkeypatch.setattr(dpo_mod, "Reference", never)  # the frozen policy: never made
    monkeypatch.setattr(dd, "sequence_logps", never)  # no no-grad reference forward
    res = train_dpo(config(tmp_path, tiny_dir, prefs, loss_type=loss_type, name=loss_type))
    h = res.history
    key = {"simpo": "loss", "orpo": "or_loss"}[loss_type]  # ORPO's total is mostly the chosen NLL (~10 here)
    assert _mean(h, key, slice(-3, None)) < 0.7 * _mean(h, key, slice(0, 3)), [m[key] for m in h]
    assert h[-1]["loss"] < h[0]["loss"]
    assert h[-1]["rewards/accuracy"] == 1.0 and h[-1]["rewards/margin"] > 0
    assert not (res.run_dir / "reference_logps.pt").exists()
    assert json.loads((res.run_dir / "data.json").read_text())["reference"] is False


def test_reference_free_held_out_eval(tmp_path, tiny_dir, prefs):
    res = train_dpo(config(tmp_path, tiny_dir, prefs, loss_type="simpo", max_steps=2, eval_fraction=0.25,
                           eval_at_start=True, name="ev"))
    first = res.evals[0]
    # SimPO's implicit reward is beta * mean log-prob: at step 0 the short right word is already more
    # likely per token or not; the reward is not 0 as DPO's is (no reference), so it is checked finite
    assert first["pairs"] == 3 and first["loss"] == first["loss"] and "rewards/accuracy" in first
    assert first["logps/chosen"] < 0 and first["rewards/chosen"] == pytest.approx(2.0 * first["logps/chosen"])


@pytest.mark.parametrize("which", ["paired", "unpaired"])
def test_kto_learns_with_a_precomputed_reference(tmp_path, tiny_dir, prefs, unpaired, which, monkeypatch):
    calls = []
    real = dd.sequence_logps
    monkeypatch.setattr(dd, "sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = prefs if which == "paired" else unpaired
    res = train_dpo(config(tmp_path, tiny_dir, data, loss_type="kto", lr=5e-3, max_steps=12, eval_fraction=0.25,
                           eval_at_start=True, name=which))
    assert calls == [1]  # the reference forwards happen once, before the first step; none during the steps
    saved = torch.load(res.run_dir / "reference_logps.pt", weights_only=True)
    assert len(saved["index"]) == 24  # 12 rows x (desirable + undesirable), each with its KL pair's log-prob
    h = res.history
    assert _mean(h, "loss", slice(-3, None)) < _mean(h, "loss", slice(0, 3)), [m["loss"] for m in h]
    assert h[-1]["rewards/chosen"] > h[-1]["rewards/rejected"]
    before, after = res.evals[0], res.evals[-1]
    assert before["rewards/chosen"] == pytest.approx(0.0, abs=1e-4) and before["kto/kl"] == pytest.approx(0.0, abs=1e-4)
    assert before["pairs"] == 6  # 3 held-out rows, both halves of each on the held-out side
    if which == "paired":
        assert after["rewards/pair_accuracy"] >= before["rewards/pair_accuracy"]
    data_json = json.loads((res.run_dir / "data.json").read_text())
    assert data_json["reference"] is True and data_json["train_pairs"] == 18 and data_json["eval_pairs"] == 6


# ----------------------------------------------------------------------------------------- KTO data


def test_kto_examples_and_kl_pairs(tiny, prefs, unpaired):
    _, tok = tiny
    paired, stats = kto_data.encode_kto(tok, load_rows(prefs, "kto"), seed=5)
    single, _ = kto_data.encode_kto(tok, load_rows(unpaired, "kto"), seed=5)
    assert stats.examples == 24 and stats.desirable == 12 and stats.kept == 24
    # a pair and its unpaired rows give the same tokens (the string prompt under the chat template =
    # the conversational one); labels and rows line up
    for a, b in zip(paired, single):
        assert (a.prompt, a.chosen, a.desirable) == (b.prompt, b.chosen, b.desirable)
        assert a.row == b.index // 2 and b.row == b.index
    by_completion = {tuple(e.chosen): e for e in paired}
    for e in paired:
        partner = by_completion[tuple(e.rejected)]  # the KL completion is some example's completion ...
        assert partner.row != e.row and partner.desirable == e.desirable  # ... of another row, same slot
    assert sorted(tuple(e.rejected) for e in paired) == sorted(tuple(e.chosen) for e in paired)  # each once
    again, _ = kto_data.encode_kto(tok, load_rows(prefs, "kto"), seed=5)
    assert [e.rejected for e in again] == [e.rejected for e in paired]  # fixed by the seed
    other, _ = kto_data.encode_kto(tok, load_rows(prefs, "kto"), seed=6)
    assert [e.rejected for e in other] != [e.rejected for e in paired]


def test_kto_pair_accuracy():
    ex = [kto_data.KTOExample(i, [1], [2], [3], desirable=d, row=r)
          for i, (d, r) in enumerate([(True, 0), (False, 0), (True, 1), (False, 1), (True, 2)])]
    # row 0: 0.5 > 0.1 right; row 1: 0.0 > 0.3 wrong; row 2 has no undesirable half: not a pair
    assert kto_data.pair_accuracy(torch.tensor([0.5, 0.1, 0.0, 0.3, 9.0]), ex) == 0.5
    assert kto_data.pair_accuracy(torch.tensor([1.0]), ex[:1]) is None


# ----------------------------------------------------------------------------------------- at the terminal


def _train(tmp_path, tiny_dir, data, *flags):
    return terminal.posttrain("train", "dpo", "--model", tiny_dir, "--data", data, "--output-dir", str(tmp_path),
                              "--max-steps", "1", *flags, cwd=tmp_path)


def test_flags_of_another_loss_type_are_refused(tmp_path, tiny_dir, prefs):
    terminal.assert_user_error(_train(tmp_path, tiny_dir, prefs, "--simpo-gamma", "0.5"),
                               "--simpo-gamma", "--loss-type simpo")
    terminal.assert_user_error(_train(tmp_path, tiny_dir, prefs, "--loss-type", "simpo", "--ref-model", tiny_dir),
                               "--ref-model", "not simpo or orpo")
    terminal.assert_user_error(_train(tmp_path, tiny_dir, prefs, "--loss-type", "orpo", "--beta", "0.2"),
                               "--beta", "--orpo-lambda")
    terminal.assert_user_error(_train(tmp_path, tiny_dir, prefs, "--loss-type", "kto", "--label-smoothing", "0.1"),
                               "label_smoothing", "'kto'")


def test_kto_resume_is_exact(tmp_path, tiny_dir, unpaired):
    """A KTO run stopped at its checkpoint and resumed equals the uninterrupted run, step for step
    (the KL partners, the reference table and the data position come back as they were)."""
    import dataclasses

    kw = dict(loss_type="kto", max_steps=6, checkpoint_every=3, eval_fraction=0.25, eval_at_start=True)
    full = train_dpo(config(tmp_path, tiny_dir, unpaired, name="full", **kw))
    part = config(tmp_path, tiny_dir, unpaired, name="part", **{**kw, "max_steps": 3})
    train_dpo(part)
    resumed = train_dpo(dataclasses.replace(part, max_steps=6, resume=str(tmp_path / "part")))
    assert [m["loss"] for m in resumed.history[-3:]] == [m["loss"] for m in full.history[-3:]]
    assert resumed.evals[-1]["loss"] == full.evals[-1]["loss"]
