"""DPO on the tiny model: learning for each loss type, the precomputed reference, resume, truncation
counting, tokenization of string vs conversational pairs, and the packed forward vs the padded one."""

import json

import pytest
import torch

from posttrain.algorithms import dpo_data as dd
from posttrain.algorithms.dpo import DPOConfig, train_dpo
from posttrain.data import DataError, validate_row
from posttrain.objectives.logprobs import naive_completion_logprobs

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light", "paper", "horse", "bread", "chair"]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    """12 pairs: chosen answers with the word asked for, rejected with a long off-topic sentence."""
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = [{"prompt": f"Say the word {w}.", "chosen": f"{w}", "rejected": f"I will not say that, here is {WORDS[i - 1]} instead."}
            for i, w in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, model, data, **kw):
    base = dict(model=model, data=data, output_dir=str(tmp_path), lora=False, lr=3e-3, batch_size=4, max_steps=12,
                eval_fraction=0.0, checkpoint_every=0, eval_at_start=False, log_every=100, beta=0.1)
    base.update(kw)
    return DPOConfig(**base)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_loss_decreases_for_each_loss_type(tmp_path, tiny_dir, prefs, loss_type, smoothing):
    res = train_dpo(config(tmp_path, tiny_dir, prefs, loss_type=loss_type, label_smoothing=smoothing, name=loss_type))
    hist = res.history
    assert len(hist) == 12
    first = sum(m["loss"] for m in hist[:3]) / 3  # one epoch: the same 12 pairs
    last = sum(m["loss"] for m in hist[-3:]) / 3
    assert last < 0.7 * first, (loss_type, first, last)
    assert hist[-1]["rewards/accuracy"] == 1.0 and hist[-1]["rewards/margin"] > 0


def test_metrics_eval_and_outputs(tmp_path, tiny_dir, prefs):
    res = train_dpo(config(tmp_path, tiny_dir, prefs, lora=True, lr=1e-2, max_steps=3, eval_fraction=0.25,
                           eval_at_start=True, eval_every=2, name="m"))
    for m in res.history:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "grad_norm",
                    "lr", "time/step", "tokens_per_s", "epoch"):
            assert key in m and m[key] == m[key], key
    assert [e["step"] for e in res.evals] == [0, 2, 3]
    assert res.evals[0]["rewards/accuracy"] == 0.0 and res.evals[0]["pairs"] == 3  # policy == reference at step 0
    assert abs(res.evals[0]["loss"] - 0.6931) < 1e-3  # -log sigmoid(0)
    data = json.loads((res.run_dir / "data.json").read_text())
    assert data["train_pairs"] == 9 and data["eval_pairs"] == 3 and data["share_prompt"] is True
    assert (res.run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (res.run_dir / "reference_logps.pt").is_file()


def _padded_sums(model, examples):
    """Reference computation: each sequence on its own row, right-padded, full logits."""
    seqs, marks = [], []
    for e in examples:
        for c in (e.chosen, e.rejected):
            seqs.append(e.prompt + c)
            marks.append([0] * len(e.prompt) + [1] * len(c))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn, cmask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, marks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        cmask[i, :len(s)] = torch.tensor(m)
    return naive_completion_logprobs(model, ids, attn, cmask).sum(1).view(-1, 2)


def test_precomputed_reference_equals_on_the_fly(tmp_path, tiny_dir, prefs):
    from posttrain.models import load_model

    res = train_dpo(config(tmp_path, tiny_dir, prefs, lora=True, lr=1e-2, max_steps=2, name="ref"))
    saved = torch.load(res.run_dir / "reference_logps.pt", weights_only=True)
    base, tok = load_model(tiny_dir)
    rows = [json.loads(line) for line in open(prefs)]
    examples, _ = dd.encode_pairs(tok, rows)
    with torch.no_grad():
        on_the_fly = _padded_sums(base, examples).double()
    assert saved["index"].tolist() == list(range(12))
    assert torch.allclose(saved["logps"], on_the_fly, atol=1e-4)
    trained, _ = load_model(str(res.run_dir / "final"))  # the adapter disabled is the reference
    with torch.no_grad():
        moved = _padded_sums(trained, examples).double()
        with trained.disable_adapter():
            disabled = _padded_sums(trained, examples).double()
    assert torch.allclose(disabled, on_the_fly, atol=1e-4)
    assert not torch.allclose(moved, on_the_fly, atol=1e-2)  # the policy itself did move


def test_resume_reuses_reference_and_matches_uninterrupted(tmp_path, tiny_dir, prefs):
    whole = train_dpo(config(tmp_path, tiny_dir, prefs, max_steps=4, name="whole"))
    train_dpo(config(tmp_path, tiny_dir, prefs, max_steps=2, checkpoint_every=1, name="part"))
    table = tmp_path / "part" / "reference_logps.pt"
    stamp = table.stat().st_mtime_ns
    resumed = train_dpo(config(tmp_path, tiny_dir, prefs, max_steps=4, resume=str(tmp_path / "part"), name="part"))
    assert table.stat().st_mtime_ns == stamp  # loaded, not recomputed
    a, b = whole.history, resumed.history
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m1, m2 in zip(a[2:], b[2:]):
        assert abs(m1["loss"] - m2["loss"]) < 1e-5, (m1["loss"], m2["loss"])


def test_epochs_set_the_number_of_steps(tmp_path, tiny_dir, prefs):
    res = train_dpo(config(tmp_path, tiny_dir, prefs, epochs=2, batch_size=5, eval_fraction=0.0, name="ep"))
    assert len(res.history) == 5  # ceil(2 * 12 / 5)
    assert res.history[-1]["epoch"] == pytest.approx(25 / 12)


# ----------------------------------------------------------------------------------------- tokenization


def test_string_and_conversational_pairs_tokenize_identically(tiny):
    _, tok = tiny
    text = {"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "It is 6, I think."}
    conv = {"prompt": [{"role": "user", "content": text["prompt"]}],
            "chosen": [{"role": "assistant", "content": text["chosen"]}],
            "rejected": [{"role": "assistant", "content": text["rejected"]}]}
    implicit = validate_row({"chosen": conv["prompt"] + conv["chosen"], "rejected": conv["prompt"] + conv["rejected"]},
                            "preference")
    a, b, c = (dd.encode_pair(tok, r) for r in (text, conv, implicit))
    assert a == b == c
    p, ch, rj = a
    assert ch[-1] == tok.eos_token_id and rj[-1] == tok.eos_token_id  # ends at end-of-turn, trailing "\n" not scored
    assert tok.decode(ch) == "It is 5.<|im_end|>"
    plain = dd.encode_pair(tok, text, chat_template=False)  # no template: text + EOS, as TRL
    assert tok.decode(plain[0]) == text["prompt"] and tok.decode(plain[1]) == " It is 5.<|im_end|>".lstrip()


def test_truncation_is_counted():
    stats = dd.TruncationStats()
    p, c, r = list(range(10)), list(range(100, 108)), list(range(200, 203))
    assert dd.truncate_pair(p, c, r, 20, 8, "truncate", stats) == (p, c, r)  # 10 + 8 fits
    out = dd.truncate_pair(p, c, r, 15, 8, "truncate", stats)  # 10 + 8 > 15: prompt -> last 8, chosen -> 7
    assert out == (p[-8:], c[:7], r)
    out = dd.truncate_pair(p, c + [9], c + [7], 12, 8, "truncate", stats)  # both cut to the same 4 tokens
    assert out is None
    assert dd.truncate_pair(p, c, r, 15, 8, "drop", stats) is None
    assert stats.as_dict() == {"pairs": 0, "over_length": 3, "prompt_truncated": 2, "chosen_truncated": 2,
                               "rejected_truncated": 1, "dropped_over_length": 1, "dropped_identical": 1, "kept": -2}


def test_encode_pairs_reports_counts_and_bad_rows(tiny):
    _, tok = tiny
    rows = [{"prompt": "Hi " * 30, "chosen": "yes " * 30, "rejected": "no"}, {"prompt": "Hi", "chosen": "a", "rejected": "b"}]
    examples, stats = dd.encode_pairs(tok, rows, max_length=48, max_prompt_length=24, source="p.jsonl")
    assert stats.pairs == 2 and stats.over_length == 1 and stats.prompt_truncated == 1 and stats.chosen_truncated == 1
    assert len(examples) == 2 and len(examples[0].prompt) == 24 and len(examples[0].prompt + examples[0].chosen) == 48
    bad = [{"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}]
    with pytest.raises(DataError, match=r"p\.jsonl, row 1: field 'chosen': .*chat template"):
        dd.encode_pairs(tok, bad, chat_template=False, source="p.jsonl")


def test_dpo_needs_data_and_a_valid_loss(tmp_path, tiny_dir, prefs):
    with pytest.raises(ValueError, match="--data"):
        train_dpo(config(tmp_path, tiny_dir, None))
    with pytest.raises(ValueError, match="label_smoothing"):
        train_dpo(config(tmp_path, tiny_dir, prefs, loss_type="hinge", label_smoothing=0.1))


# ----------------------------------------------------------------------------------------- packing


def _random_pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(5, 1000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [dd.PairExample(i, ids(3, 12), ids(1, 9), ids(1, 9)) for i in range(n)]


@pytest.mark.parametrize("share,row_tokens,attn", [(True, 0, "sdpa"), (True, 24, "sdpa"), (False, 0, "sdpa"),
                                                   (False, 24, "sdpa"), (True, 24, "eager")])
def test_packed_forward_equals_padded(tiny, share, row_tokens, attn):
    model, _ = tiny
    model.config._attn_implementation = attn
    examples = _random_pairs(6)
    expected = _padded_sums(model, examples)
    batch = dd.pack(examples, pad_id=0, share_prompt=share, row_tokens=row_tokens)
    got = dd.pair_logprobs(model, batch)
    assert torch.allclose(got, expected, atol=1e-4)
    fed = sum(len(e.prompt) * (1 if share else 2) + len(e.chosen) + len(e.rejected) - 2 for e in examples)
    assert batch.n_tokens == fed  # no padding counted, the prompt fed once per pair when shared
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for out in (got, expected):
        model.zero_grad()
        (out * weights).sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_cli_train_dpo(tmp_path, tiny_dir, prefs):
    from posttrain.cli import main

    code = main(["train", "dpo", "--model", tiny_dir, "--data", prefs, "--max-steps", "1", "--output-dir",
                 str(tmp_path), "--name", "cli", "--no-lora", "--beta", "0.5", "--eval-fraction", "0"])
    assert code == 0
    cfg = (tmp_path / "cli" / "config.yaml").read_text()
    assert "beta: 0.5" in cfg and "lora_rank: 32" in cfg
