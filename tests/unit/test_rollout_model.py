"""The bfloat16 sampling copy of the policy: it follows the policy after optimizer steps (full
fine-tuning and LoRA), stays put until synced, and float32 means no copy at all."""

import torch

from posttrain.models import add_lora, tiny_model
from posttrain.sampling.rollout_model import RolloutModel, cpu_has_fast_bf16, resolve_dtype, rollout_model


def _train(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=x).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return x


def _gap(a, b) -> float:
    return (a.softmax(-1) - b.softmax(-1)).abs().sum(-1).max().item() / 2  # total variation


def _check_follows(model, steps=3):
    ro = RolloutModel(model, torch.bfloat16)
    assert ro.model is not model and next(ro.model.parameters()).dtype == torch.bfloat16
    x = _train(model, steps)
    with torch.no_grad():
        stale = _gap(model(input_ids=x).logits, ro.model(input_ids=x).logits.float())
        ro.sync()
        synced = _gap(model(input_ids=x).logits, ro.model(input_ids=x).logits.float())
    assert synced < 0.06, synced  # bfloat16 rounding only
    assert stale > 4 * synced, (stale, synced)  # the training moved the policy; sync carried it over


def test_follows_full_fine_tuning():
    model, _ = tiny_model(seed=0, initializer_range=0.2)
    _check_follows(model)


def test_follows_a_lora_adapter_merged():
    model, _ = tiny_model(seed=0, initializer_range=0.2)
    _check_follows(add_lora(model, rank=4), steps=8)  # the adapter starts at zero: give it time to move


def test_disabled_adapter_is_not_merged():
    model, _ = tiny_model(seed=0, initializer_range=0.2)
    peft_model = add_lora(model, rank=4)
    _train(peft_model)
    ro = RolloutModel(peft_model, torch.bfloat16)
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=x).logits
        ro.sync()
        assert _gap(base, ro.model(input_ids=x).logits.float()) < 0.06


def test_float32_samples_from_the_policy_itself():
    model, _ = tiny_model(seed=0)
    assert rollout_model(model, "float32").model is model


def test_auto_picks_bfloat16_only_where_it_is_fast():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
