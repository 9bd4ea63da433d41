"""The memory formula (posttrain.doctrine.memory): the doctrine's 8B table, the parts, and the activation
count checked against the tensors autograd really saves."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.doctrine import memory
from posttrain.doctrine.memory import DOCTRINE_TABLE_8B, GB, doctrine_table, estimate


def test_doctrine_8b_table_within_20_percent():
    ours = doctrine_table()
    for row, doctrine in DOCTRINE_TABLE_8B.items():
        assert abs(ours[row] / doctrine - 1) <= 0.20, (row, ours[row], doctrine)
    assert ours["PPO (policy + value)"] > ours["GRPO (policy only)"] > ours["GRPO + LoRA"]


def test_sizes_and_memory_strings():
    assert memory.parse_size("8B") == 8e9 and memory.parse_size("135M") == 135e6
    assert memory.parse_size("1.5b") == 1.5e9 and memory.parse_size(7e9) == 7e9
    assert memory.parse_size("smollm2-135m-instruct") is None and memory.parse_size("runs/x/final") is None
    assert memory.parse_memory("24GB") == 24 and memory.parse_memory("80") == 80
    assert memory.parse_memory("24GiB") == pytest.approx(25.77, abs=0.01)
    assert memory.parse_memory("512MB") == pytest.approx(0.512)
    with pytest.raises(ValueError):
        memory.parse_memory("lots")


def test_shape_from_size_is_llama3_like():
    s8 = memory.shape_from_size(8e9)
    assert (s8.hidden, s8.layers, s8.kv_heads, s8.ffn, s8.tied) == (4096, 32, 8, 14336, False)
    s70 = memory.shape_from_size(70e9)
    assert 8000 <= s70.hidden <= 9000 and s70.layers >= 60
    s1 = memory.shape_from_size(1e9)
    assert s1.tied and s1.hidden < s8.hidden


def test_shape_of_a_real_model_matches_its_parameter_count(tiny):
    model, _ = tiny
    from_config = memory.shape_from_config(model.config.to_dict())
    assert from_config.n_params == sum(p.numel() for p in model.parameters())
    assert memory.model_shape(model).n_params == from_config.n_params


def test_shape_of_the_embedded_spec_reads_its_config():
    shape = memory.model_shape("smollm2-135m-instruct")
    assert shape.n_params == 134_515_008 and (shape.hidden, shape.layers, shape.vocab) == (576, 30, 49152)


def test_lora_params_match_peft(tiny):
    from posttrain.models import add_lora, count_parameters

    model, _ = tiny
    shape = memory.model_shape(model)
    peft_model = add_lora(model, rank=4)
    assert memory.lora_params(shape, 4) == count_parameters(peft_model, trainable_only=True)


def test_parts_respond_to_each_assumption():
    base = estimate("8B", "grpo", 0)
    assert "reference model" in base.elsewhere and "reference model" not in base.parts
    on_device = estimate("8B", "grpo", 0, frozen_on_device=True)
    assert on_device.total - base.total == pytest.approx(16e9)
    assert "reference model" not in estimate("8B", "grpo", 0, beta=0.0).elsewhere
    assert "reference model" not in estimate("8B", "grpo", 8).elsewhere  # LoRA: the adapter disabled
    assert estimate("8B", "grpo", 0, grad_checkpointing=False).total > base.total + 5 * GB
    standard = estimate("8B", "grpo", 0, optimizer="adamw", master_weights=True, fused_step=False)
    assert standard.total_gb > 120  # 16 bytes/param: what plain mixed-precision AdamW costs
    assert estimate("8B", "grpo", 64).total > estimate("8B", "grpo", 8).total
    ppo = estimate("8B", "ppo", 0, frozen_on_device=True)
    assert {"value model weights", "reward model (frozen)", "reference model"} <= set(ppo.parts)
    dpo = estimate("8B", "dpo", "auto")
    assert dpo.lora_rank == 32 and "KV cache (generation)" not in dpo.parts
    big_gen = estimate("8B", "grpo", 8, gen_batch=256)
    assert big_gen.phase == "generate" and "KV cache (generation)" in big_gen.parts
    cpu = estimate("smollm2-135m-instruct", "grpo", 0, device="cpu")
    assert cpu.parts["policy weights"] == pytest.approx(134_515_008 * 4)
    assert cpu.parts["policy optimizer (adamw)"] == pytest.approx(134_515_008 * 8)
    with pytest.raises(ValueError):
        estimate("8B", "nope")
    with pytest.raises(ValueError):
        estimate("8B", "grpo", 0, dtype="nf4")  # a 4-bit base is only for LoRA


def test_activation_count_matches_tensors_saved_by_autograd(tiny):
    """The per-token-layer term a = (7h + q + 3kv + 4f) * b, checked on a real (tiny) Llama: the
    growth of saved-tensor bytes per extra token, trunk only, no checkpointing."""
    model, _ = tiny
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(T: int) -> int:
        seen: dict[int, int] = {}

        def pack(x):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = x.untyped_storage().nbytes()
            return x

        ids = torch.randint(0, 1000, (2, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model.model(input_ids=ids)
        return sum(seen.values())

    per_token = (saved_bytes(96) - saved_bytes(32)) / (2 * 64)
    shape = memory.model_shape(model)
    predicted = memory.activation_bytes(shape, 1, memory.CPU) - shape.hidden * 4  # trunk layers only
    assert abs(per_token / predicted - 1) < 0.15, (per_token, predicted)


def test_cli_memory(capsys):
    from posttrain.cli import main

    assert main(["memory", "--doctrine-table", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["estimate_gb"]) == set(DOCTRINE_TABLE_8B)
    assert main(["memory", "--model", "8B", "--method", "grpo", "--lora"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=8" in out and "assumptions:" in out and "total (peak)" in out
    assert main(["memory", "--model", "8B", "--method", "ppo", "--gpu-memory", "24GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["memory", "--model", "135M", "--method", "dpo", "--lora", "16", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["lora_rank"] == 16
