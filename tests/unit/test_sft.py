"""SFT on the tiny model: TRL's three formats and which tokens each trains, padding-free packing
against padded batches (same loss, same gradient), truncation counting, learning, micro-batches,
held-out loss, greedy evaluation with a reward, exact resume, and the CLI's errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

from posttrain.algorithms import sft_data as sd
from posttrain.algorithms.sft import SFTConfig, heldout_loss, train_sft
from posttrain.data import DataError, load_rows
from posttrain.models import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "light", "paper", "horse", "bread", "chair"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pc_file(tmp_path_factory) -> str:
    rows = [{"prompt": f"Say the word {w}.", "completion": f"{w} {w} {w}"} for w in WORDS]
    return write(tmp_path_factory.mktemp("sft") / "pc.jsonl", rows)


def config(tmp_path, model, data, **kw):
    base = dict(model=model, data=data, output_dir=str(tmp_path), lora=False, lr=3e-3, batch_size=4, max_steps=12,
                eval_fraction=0.0, checkpoint_every=0, eval_at_start=False, log_every=100)
    base.update(kw)
    return SFTConfig(**base)


# ----------------------------------------------------------------------------------------- formats


def test_prompt_completion_trains_the_completion_only(tok):
    ids, target = sd.encode_row(tok, {"prompt": "Say hi.", "completion": "hi"})
    from posttrain.data import encode_prompt
    from posttrain.data.chat import completion_text

    p = encode_prompt(tok, "Say hi.")
    c = tok(completion_text(tok, "Say hi.", "hi"), add_special_tokens=False)["input_ids"]
    assert ids == p + c and target == [False] * len(p) + [True] * len(c)
    assert tok.decode([t for t, k in zip(ids, target) if k]) == "hi<|im_end|>"
    _, all_target = sd.encode_row(tok, {"prompt": "Say hi.", "completion": "hi"}, loss_on="all")
    assert all_target == [False] + [True] * (len(ids) - 1)


def test_messages_train_every_assistant_turn_and_nothing_else(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, target = sd.encode_row(tok, {"messages": msgs})
    trained = tok.decode([t for t, k in zip(ids, target) if k])
    assert trained == "hello<|im_end|>4<|im_end|>"
    # the pieces add up to the template's full rendering
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    # the first assistant turn's tokens are those of generation: the prompt encoded, then the turn
    from posttrain.data import encode_prompt

    p = encode_prompt(tok, msgs[:2])
    assert ids[:len(p)] == p and not any(target[:len(p)])


def test_text_trains_every_token_and_ends_with_eos(tok):
    ids, target = sd.encode_row(tok, {"text": "The sky is blue."})
    assert ids[-1] == tok.eos_token_id and target == [False] + [True] * (len(ids) - 1)


def test_a_template_that_rewrites_earlier_turns_is_an_error_naming_the_row(tok, tmp_path):
    import copy

    t = copy.deepcopy(tok)  # drops the content of every assistant turn but the last, as <think>-stripping ones do
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}"
                       "...{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    with pytest.raises(DataError) as e:
        sd.encode_examples(t, rows, source="x.jsonl")
    assert "x.jsonl, row 1: field 'messages'" in str(e.value) and "--loss-on all" in str(e.value)
    ex, _ = sd.encode_examples(t, rows, loss_on="all", source="x.jsonl")
    assert ex[0].n_targets == len(ex[0].ids) - 1


def test_conversations_the_template_cannot_cut_are_errors_naming_the_row(tok):
    opens = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"},
                          {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"c.jsonl, row 1: field 'messages': the conversation opens with an assistant"):
        sd.encode_examples(tok, [opens], source="c.jsonl")
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match=r"row 1: field 'messages': the chat template refused the conversation: "
                                        r"Conversation roles must alternate"):
        sd.encode_examples(strict, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                           source="c.jsonl")


@pytest.mark.parametrize("row,field,problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": "hi"}, "messages", "expected a list of messages"),
    ({"prompt": "hi"}, "completion", "missing"),
    ({"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}, "completion", "mixed formats"),
    ({"text": ""}, "text", "empty text"),
    ({"text": 3}, "text", "wrong type"),
    ({"answer": 3}, None, "not one of TRL's SFT formats"),
])
def test_malformed_rows_name_line_and_field(tmp_path, row, field, problem):
    path = write(tmp_path / "d.jsonl", [{"text": "fine"}, row] if "text" not in row else [row])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft")
    assert e.value.field == field and problem in str(e.value) and e.value.line == (2 if "text" not in row else 1)


def test_one_format_per_file(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "fine"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: mixed formats: the first row is language modelling"):
        load_rows(path, "sft")


def test_truncation_keeps_the_start_and_counts(tok):
    rows = [{"text": "one two three four five six seven eight nine ten"}, {"prompt": "x " * 40, "completion": "y"}]
    ex, stats = sd.encode_examples(tok, rows, max_length=6)
    assert stats.truncated == 2 and stats.dropped_no_target == 1 and len(ex) == 1  # the completion was cut away
    assert ex[0].ids == tok(rows[0]["text"])["input_ids"][:6]


# ----------------------------------------------------------------------------------------- packing


def test_padding_free_packing_equals_padded_batches(tiny, tok):
    """Same per-token log-probs (and so loss and gradient) packed or padded: no cross-example attention."""
    model, _ = tiny
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} " * (i + 1)} for i, w in enumerate(WORDS[:6])]
    ex, _ = sd.encode_examples(tok, rows)
    grads = []
    for packing in (True, False):
        model.zero_grad()
        packed = sd.pack(ex, tok.pad_token_id, packing, row_tokens=160)
        assert (packed.input_ids_RL.shape[0] < len(ex)) == packing  # several examples share a row
        logp = sd.token_logprobs(model, packed)
        # the same tokens in the same order: the order of rows differs, so compare sorted by (token, value)
        grads.append((logp.detach().sort().values, packed.n_tokens))
        (-logp.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone())
    assert torch.allclose(grads[0][0], grads[2][0], atol=1e-5) and grads[0][1] == grads[2][1]
    assert torch.allclose(grads[1], grads[3], atol=1e-5, rtol=1e-4)


def test_default_rows_are_the_cheapest_width_never_more_tokens_than_padding(tok):
    """row_tokens 0: of the widths from the longest example to one row, the cheapest rows (rows x
    width x attention term); the longest example's width is a candidate, so never more fed than padding."""
    rows = [{"text": "word " * n} for n in (40, 3, 5, 2, 30, 4)]
    ex, _ = sd.encode_examples(tok, rows)
    packed, padded = sd.pack(ex, tok.pad_token_id, True), sd.pack(ex, tok.pad_token_id, False)
    at_longest = sd._rows(ex, max(e.fed for e in ex))
    assert packed.n_tokens == padded.n_tokens
    assert packed.input_ids_RL.numel() <= len(at_longest) * max(e.fed for e in ex) < padded.input_ids_RL.numel()
    assert sd._row_cost(sd._best_rows(ex)) <= sd._row_cost(at_longest)


def test_rows_widen_to_hold_similar_lengths_and_narrow_when_attention_dominates(tok, monkeypatch):
    rows = [{"text": "word " * n} for n in (10, 10, 10, 10, 11)]
    ex, _ = sd.encode_examples(tok, rows)
    total, longest = sum(e.fed for e in ex), max(e.fed for e in ex)
    # at the longest example's width each example needs its own row: 5 x longest fed; one row: total
    assert tuple(sd.pack(ex, tok.pad_token_id, True).input_ids_RL.shape) == (1, total)
    monkeypatch.setattr(sd, "ATTENTION_WIDTH", 4)  # attention per key 1/4 of a token's linear cost: narrow rows
    assert tuple(sd.pack(ex, tok.pad_token_id, True).input_ids_RL.shape) == (5, longest)
    assert tuple(sd.pack(ex, tok.pad_token_id, True, row_tokens=2 * longest).input_ids_RL.shape)[0] == 3  # as asked


# ----------------------------------------------------------------------------------------- training


def test_loss_decreases_and_outputs(tmp_path, tiny_dir, pc_file):
    res = train_sft(config(tmp_path, tiny_dir, pc_file, eval_fraction=0.25, eval_at_start=True, lr=1e-2, name="s"))
    hist = res.history
    assert len(hist) == 12
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert res.evals[-1]["loss"] < res.evals[0]["loss"] and res.evals[0]["n_examples"] == 3
    for key in ("loss", "grad_norm", "lr", "tokens", "target_tokens", "tokens_per_s", "epoch", "time/step"):
        assert key in hist[-1], key
    data = json.loads((res.run_dir / "data.json").read_text())
    assert data["train_examples"] == 9 and data["eval_examples"] == 3 and data["packing"] is True
    assert (res.run_dir / "final" / "model.safetensors").is_file()


def test_micro_batches_and_packing_do_not_change_the_run(tmp_path, tiny_dir, pc_file):
    runs = [train_sft(config(tmp_path, tiny_dir, pc_file, max_steps=3, name=n, **kw)).history
            for n, kw in (("a", {}), ("b", {"micro_batch_size": 1}), ("c", {"packing": False}))]
    for other in runs[1:]:
        for m0, m1 in zip(runs[0], other):
            assert m0["loss"] == pytest.approx(m1["loss"], rel=1e-4) and m0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-3)


def test_lora_at_the_sft_rank_by_default(tmp_path, tiny_dir, pc_file):
    res = train_sft(config(tmp_path, tiny_dir, pc_file, lora=True, max_steps=1, name="l"))
    cfg = json.loads((res.run_dir / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 64


def test_greedy_eval_with_a_reward_on_held_out_prompts(tmp_path, tiny_dir):
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"\\boxed{{{2 * i}}}", "answer": str(2 * i)} for i in range(20)]
    data = write(tmp_path / "math.jsonl", rows)
    res = train_sft(config(tmp_path, tiny_dir, data, max_steps=1, eval_fraction=0.2, eval_reward="math",
                           eval_max_new_tokens=8, name="g"))
    assert res.evals[-1]["n"] == 4 and "accuracy" in res.evals[-1]


def test_resume_is_exact(tmp_path, tiny_dir, pc_file):
    full = train_sft(config(tmp_path, tiny_dir, pc_file, max_steps=6, checkpoint_every=3, name="full")).history
    part = config(tmp_path, tiny_dir, pc_file, max_steps=3, checkpoint_every=3, name="part")
    train_sft(part)
    import dataclasses

    resumed = train_sft(dataclasses.replace(part, max_steps=6, resume=str(tmp_path / "part"))).history
    assert [m["loss"] for m in resumed[-3:]] == [m["loss"] for m in full[-3:]]


def test_heldout_loss_is_the_mean_nll(tiny, tok):
    model, _ = tiny
    ex, _ = sd.encode_examples(tok, [{"text": "a b c d"}, {"text": "e f"}])
    cfg = SFTConfig(data="x.jsonl", batch_size=1)
    out = heldout_loss(model, ex, cfg, tok.pad_token_id, True)
    packed = sd.pack(ex, tok.pad_token_id, False)
    with torch.no_grad():
        ref = -sd.token_logprobs(model, packed).double().mean()
    assert out["loss"] == pytest.approx(float(ref), rel=1e-6) and out["target_tokens"] == sum(e.n_targets for e in ex)


# ----------------------------------------------------------------------------------------- terminal


def test_cli_bad_row_is_a_clear_error_before_the_model_loads(tmp_path):
    data = write(tmp_path / "bad.jsonl", [{"text": "fine"}, {"messages": [{"role": "user", "content": "hi"}]}])
    r = terminal.posttrain("train", "sft", "--data", data, "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "bad.jsonl:2", "field 'messages'", "no assistant message")
    assert not (tmp_path / "runs").exists()


def test_cli_a_conversation_the_template_cannot_cut_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    data = write(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "Hi"}]}])
    r = terminal.posttrain("train", "sft", "--data", data, "--output-dir", tmp_path / "runs")
    terminal.assert_user_error(r, "c.jsonl, row 1", "field 'messages'", "opens with an assistant message")
    assert not (tmp_path / "runs").exists()
    # and no model was loaded for it: the same check in process, with loading made to fail
    from posttrain.algorithms import common

    monkeypatch.setattr(common, "load_policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    with pytest.raises(DataError, match="opens with an assistant message"):
        train_sft(SFTConfig(data=data, output_dir=str(tmp_path / "runs")))


def test_cli_needs_data(tmp_path):
    r = terminal.posttrain("train", "sft", "--task", "arithmetic", "--output-dir", tmp_path)
    terminal.assert_user_error(r, "--data")


def test_cli_sigkill_mid_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_dir, pc_file):
    """Killed (SIGKILL) halfway through writing step 4's checkpoint, then ``--resume`` and nothing else:
    the run replays from step 2 and ends with the uninterrupted run's metrics and final weights."""
    from safetensors.torch import load_file

    def cmd(name):
        return ("train", "sft", "--model", tiny_dir, "--data", pc_file, "--no-lora", "--lr", "3e-3", "--batch-size", "4",
                "--max-steps", "6", "--checkpoint-every", "2", "--eval-fraction", "0.25", "--output-dir", tmp_path,
                "--name", name)

    assert terminal.posttrain(*cmd("full")).returncode == 0
    killed = terminal.posttrain(*cmd("killed"), env={"POSTTRAIN_FAULT": "checkpoint.write:2"})
    assert killed.returncode == -9 and not (tmp_path / "killed" / "final").exists()
    resumed = terminal.posttrain("train", "sft", "--resume", tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def lines(name, file):
        rows = [json.loads(x) for x in (tmp_path / name / file).read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "seconds"))} for r in rows]

    assert lines("killed", "metrics.jsonl") == lines("full", "metrics.jsonl")
    assert lines("killed", "evals.jsonl") == lines("full", "evals.jsonl")
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("full", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_sft_run_is_the_start_of_the_next_stage(tmp_path, tiny_dir, pc_file):
    """SFT with LoRA, then GRPO with LoRA from its final/ (an adapter directory): the adapter is
    merged into its base, the new run's fresh adapter sits on that merged model (its reference),
    and a GRPO step runs (a PEFT model wrapped twice used to crash the sampler)."""
    from posttrain.algorithms.common import load_policy
    from posttrain.algorithms.grpo import GRPOConfig, train_grpo
    from posttrain.models import load_model

    final = str(train_sft(config(tmp_path, tiny_dir, pc_file, lora=True, lr=1e-2, max_steps=2, name="stage1")).run_dir
                / "final")
    sft_model, tok = load_model(final)
    ids_BT = tok("Say the word apple.", return_tensors="pt").input_ids
    with torch.no_grad():
        want_BTV = sft_model(ids_BT).logits
        base_BTV = load_model(tiny_dir)[0](ids_BT).logits
    assert not torch.allclose(want_BTV, base_BTV, atol=1e-4)  # the SFT stage changed the model
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": f"Say the word {w}."} for w in WORDS])
    cfg = dict(model=final, data=prompts, reward="format(pattern=[a-m].*)", rollout_dtype="float32", group_size=2,
               prompts_per_step=2, max_new_tokens=2, output_dir=str(tmp_path), checkpoint_every=0, lora=True,
               lora_rank=4, eval_at_start=False, log_every=100)
    policy, _ = load_policy(GRPOConfig(**cfg, max_steps=1, name="probe"))
    with torch.no_grad(), policy.disable_adapter():
        got_BTV = policy(ids_BT).logits
    torch.testing.assert_close(got_BTV, want_BTV, atol=1e-5, rtol=1e-5)
    res = train_grpo(GRPOConfig(**cfg, max_steps=1, lr=5e-2, name="stage2"))
    assert len(res.history) == 1
    # stage 2's final/ is its adapter on the SFT model: loading it gives both stages (its
    # adapter_config names stage 1's final/ as the base, merged at load); not the raw base + adapter
    assert json.loads((res.run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(final).resolve())
    chained, _ = load_model(str(res.run_dir / "final"))
    stage2 = load_policy(GRPOConfig(**cfg, max_steps=1, name="probe2"))[0]
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(stage2, load_file(res.run_dir / "final" / "adapter_model.safetensors"))
    with torch.no_grad():
        got_BTV, trained_BTV = chained(ids_BT).logits, stage2(ids_BT).logits
    assert not torch.allclose(trained_BTV, want_BTV, atol=1e-4)  # the GRPO step changed it too
    torch.testing.assert_close(got_BTV, trained_BTV, atol=1e-5, rtol=1e-5)
