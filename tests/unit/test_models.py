"""Model resolution without the big model: tiny models, tokenizer set-up, LoRA, clear errors."""

import pytest
import torch

from posttrain import models
from posttrain.models import ModelError, add_lora, load_model, tiny_model


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, tok = tiny_model(seed=3)
    b, _ = tiny_model(seed=3)
    c, _ = tiny_model(seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert a.config.vocab_size == len(tok) == 49152


def test_tiny_model_overrides():
    m, _ = tiny_model(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    assert m.config.num_hidden_layers == 3 and m.model.embed_tokens.weight.shape == (49152, 32)


def test_tokenizer_has_pad_left_padding_and_chat_template():
    tok = models.load_tokenizer()
    assert tok.pad_token is not None and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    batch = tok(["a", "a b c d"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_add_lora_trains_only_adapters():
    model, _ = tiny_model()
    total = models.count_parameters(model)
    peft_model = add_lora(model, rank=4)
    trainable = models.count_parameters(peft_model, trainable_only=True)
    # 2 layers x 7 linear layers (q k v o gate up down), each rank 4 x (in + out)
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert trainable < total / 100
    assert peft_model.peft_config["default"].lora_alpha == 8


def test_unknown_spec_is_a_clear_error_and_does_not_touch_the_network(tmp_path):
    with pytest.raises(ModelError, match="never downloads"):
        load_model("someone/not-a-cached-model")
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_save_and_reload_a_directory(tmp_path):
    model, tok = tiny_model(seed=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(str(tmp_path / "m"))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert ltok.padding_side == "left"


def test_adapter_directory_loads_base_and_adapter(tmp_path):
    base_dir = tmp_path / "base"
    model, tok = tiny_model(seed=2)
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base, _ = load_model(str(base_dir))
    peft_model = add_lora(base, rank=2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_model(str(tmp_path / "adapter"))
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, peft_model(x).logits, atol=1e-6)
        assert not torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-4)


def test_rank_tables():
    assert models.rl_lora_rank(8e9) == 8 and models.rl_lora_rank(70e9) == 32
    assert models.sft_lora_rank(8e9) == 64 and models.sft_lora_rank(70e9) == 256
