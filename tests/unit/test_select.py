"""The doctrine's decision tree (posttrain.doctrine.select): each branch, its reasons, defaults and command."""

from __future__ import annotations

import dataclasses
import json

import pytest

from posttrain.data import DataError
from posttrain.doctrine.select import choose_method, inspect_data, recommend


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {
        "prefs": _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Explain DNS", "chosen": "DNS maps...", "rejected": "idk"}] * 3),
        "math": _jsonl(tmp_path / "math.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}] * 3),
        "code": _jsonl(tmp_path / "code.jsonl", [{"prompt": "def f():", "tests": "assert f() == 1"}]),
        "plain": _jsonl(tmp_path / "plain.jsonl", [{"prompt": "Write a haiku about rain."}] * 2),
        "chat_prefs": _jsonl(tmp_path / "chat.jsonl", [{
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}]),
    }


def _index(reasons, text):
    return next(i for i, r in enumerate(reasons) if text in r)


def test_preference_pairs_give_dpo_with_doctrine_defaults(files):
    rec = recommend(files["prefs"])
    assert rec.method == "dpo" and rec.train_method == "dpo" and rec.fits
    assert _index(rec.reasons, "a stronger teacher? no") < _index(rec.reasons, "preference pairs? yes")
    assert rec.defaults["beta"] == 0.1 and rec.defaults["lora_rank"] == 32 and rec.defaults["lora"] is True
    assert rec.command.startswith(f"posttrain train dpo --data {files['prefs']}")
    assert "--beta 0.1" in rec.command and "--lora-rank 32" in rec.command
    assert any(a["method"] == "rm+ppo" for a in rec.alternatives)
    assert recommend(files["chat_prefs"]).method == "dpo"  # implicit-prompt conversational pairs


def test_math_prompts_give_grpo_with_the_math_reward(files):
    rec = recommend(files["math"])
    assert rec.method == "grpo" and rec.defaults["reward"] == "math"
    assert _index(rec.reasons, "preference pairs? no") < _index(rec.reasons, "verifiable rewards? yes")
    assert rec.defaults["group_size"] == 8 and rec.defaults["beta"] == 0.04
    assert rec.defaults["lora_rank"] == 8 and rec.defaults["lr"] == 1e-5  # LoRA for RL; 1e-6 x 10 with LoRA
    assert "--reward math" in rec.command and "--group-size 8" in rec.command
    assert recommend(files["code"]).defaults["reward"] == "code"
    assert recommend("arithmetic").command.startswith("posttrain train grpo --task arithmetic")


def test_lora_rank_follows_model_size(files):
    assert recommend(files["math"], model="8B").defaults["lora_rank"] == 8
    assert recommend(files["math"], model="70B").defaults["lora_rank"] == 32
    assert "--model '<a 70B model>'" in recommend(files["math"], model="70B").command


def test_prompt_only_with_judge_gives_rlaif(files):
    rec = recommend(files["plain"], judge="judge.yaml")
    assert rec.method == "rlaif" and rec.train_method == "grpo"
    assert rec.defaults["reward"] == "judge(judge.yaml)" and "'judge(judge.yaml)'" in rec.command
    assert _index(rec.reasons, "verifiable rewards? no") < _index(rec.reasons, "AI feedback? yes")
    assert any("posttrain label" in (a["command"] or "") for a in rec.alternatives)


def test_reward_model_gives_ppo(files):
    rec = recommend(files["plain"], reward="reward_model(runs/rm/final)")
    assert rec.method == "ppo"
    assert {"clip_ratio": 0.2, "kl_coef": 0.1, "value_coef": 0.5, "entropy_coef": 0.01,
            "gae_lambda": 0.95}.items() <= rec.defaults.items()
    assert any(a["method"] == "grpo" for a in rec.alternatives)


def test_limited_memory_with_a_reward_and_no_pairs_falls_back_to_rft_or_online_dpo(files):
    ok = recommend(files["math"], model="8B", gpu_memory_gb="24GB")
    assert ok.method == "grpo" and any("limited compute? no" in r for r in ok.reasons)
    small = recommend(files["math"], model="8B", gpu_memory_gb="8GB")  # a verifiable reward: RFT
    assert small.method == small.train_method == "rft" and not small.fits
    assert any("limited compute? yes" in r and "a reward but no pairs -> RFT" in r and "verifiable" in r
               for r in small.reasons)
    assert any("use a smaller model" in r for r in small.reasons)  # 8B does not fit 8 GB at all
    assert small.command.startswith(f"posttrain train rft --data {files['math']} --model '<a 8B model>' --reward math")
    assert small.alternatives[0]["method"] == "grpo"
    others = {a["method"]: a["command"] for a in small.alternatives}
    assert others["online-dpo"].startswith("posttrain train online-dpo")
    assert others["pairs+dpo"].startswith(f"posttrain pairs --model '<a 8B model>' --data {files['math']} --reward math")
    assert "posttrain train dpo --data pairs.jsonl" in others["pairs+dpo"]
    # PPO does not fit 24 GB with an 8B model: a learned reward, no pass threshold -> online DPO, which fits
    ppo = recommend(files["plain"], reward="reward_model(rm)", model="8B", gpu_memory_gb=24)
    assert ppo.method == "online-dpo" and ppo.fits and any("one pair per micro-batch" in r for r in ppo.reasons)
    assert any("a reward but no pairs -> online DPO" in r for r in ppo.reasons)
    assert ppo.defaults["reward"] == "reward_model(rm)" and ppo.defaults["beta"] == 0.1
    assert ppo.defaults["lora_rank"] == 32  # the DPO table
    # the embedded model fits anywhere
    assert recommend(files["math"], gpu_memory_gb="8GB").method == "grpo"


def test_no_signal_and_unusable_reward(files):
    rec = recommend(files["plain"])
    assert rec.method is None and rec.command == "" and "no training signal" in rec.reasons[-1]
    bad = recommend(files["math"], reward="code")
    assert any("needs column(s) tests" in r for r in bad.reasons) and bad.method is None
    assert recommend(files["plain"], reward="length").method == "grpo"  # a programmatic reward


def test_columns_without_a_file_and_data_errors(tmp_path):
    assert inspect_data(columns=["prompt", "chosen", "rejected"]).kind == "preference"
    assert recommend(columns=["prompt", "tests", "entry_point"]).defaults["reward"] == "code"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "b", "chosen": "", "rejected": "z"}\n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        recommend(str(broken))


def test_choose_method_for_train_auto(files):
    from posttrain.algorithms.grpo import GRPOConfig

    method, reasons, fields = choose_method(data=files["math"])
    assert method == "grpo" and reasons and fields["reward"] == "math"
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(fields) <= known, set(fields) - known  # every field is a real GRPO config field
    assert choose_method(task="arithmetic")[0] == "grpo"
    assert choose_method(data=files["prefs"])[0] == "dpo"
    with pytest.raises(ValueError, match="no training signal"):
        choose_method(data=files["plain"])
    with pytest.raises(ValueError, match="use a smaller model"):  # nothing fits: no run is launched
        choose_method(data=files["math"], model="8B", gpu_memory_gb="8GB")


def test_cli_recommend(files, capsys):
    from posttrain.cli import main

    assert main(["recommend", "--data", files["prefs"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "dpo" and out["command"].startswith("posttrain train dpo")
    assert main(["recommend", "--data", files["math"], "--model", "8B", "--gpu-memory", "8GB"]) == 0
    text = capsys.readouterr().out
    assert "recommended: RFT" in text and "limited compute? yes" in text
    assert main(["recommend", "--data", files["plain"]]) == 1
    assert main(["recommend", "--data", "missing.jsonl"]) == 2


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"prompt": "What is 2 + 3?", "completion": "5", "answer": "5"},
    {"text": "Some text to imitate."},
], ids=["messages", "prompt-completion", "text"])
def test_demonstrations_go_to_sft_first(tmp_path, row):
    path = _jsonl(tmp_path / "sft.jsonl", [row] * 3)
    rec = recommend(path)
    assert rec.method == rec.train_method == "sft"
    assert rec.command == f"posttrain train sft --data {path} --lora --lora-rank 64 --lr 0.0002"
    assert any("demonstrations? yes" in r for r in rec.reasons)
    assert choose_method(path)[0] == "sft"


def test_unpaired_kto_rows_are_not_demonstrations(tmp_path):
    path = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    assert inspect_data(path, None) is None or inspect_data(path).kind != "demonstrations"


def test_a_malformed_demonstration_names_its_line(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'messages': no assistant message"):
        recommend(path)
