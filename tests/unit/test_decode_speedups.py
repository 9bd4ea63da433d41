"""The decoding speed-ups change how sampling computes, not what: few-row linears as (W @ x.T).T
(`skinny_linear`) and a KV cache written in place (`kv_cache`) give the plain path's logits to
float rounding, keep their buffers across steps, and leave the model as it was."""

import torch
import torch.nn as nn

from posttrain.sampling import skinny_linear
from posttrain.sampling.generation import SamplingConfig, positions, sample_groups
from posttrain.sampling.kv_cache import decode_cache
from posttrain.sampling.skinny_linear import skinny_linears


def test_skinny_linear_matches_linear_and_is_undone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.Linear(96, 32, bias=False))
    for rows in (1, 7, 16, skinny_linear.MAX_ROWS + 1):
        x = torch.randn(rows, 3, 48)[:, 0]  # a non-contiguous input
        with torch.no_grad():
            plain = model(x)
            with skinny_linears(model):
                assert all("forward" in vars(m) for m in model)
                skinny = model(x)
        assert skinny.shape == plain.shape and skinny.is_contiguous()
        torch.testing.assert_close(skinny, plain, rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(m) for m in model)  # back to nn.Linear.forward


def test_skinny_linear_leaves_training_and_other_dtypes_alone():
    model = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with skinny_linears(model):
        y = model(x)  # grad mode: the plain path, so autograd sees F.linear
        assert y.grad_fn is not None and "Addmm" in type(y.grad_fn).__name__
    double = nn.Linear(8, 4).double()
    with skinny_linears(double):
        assert "forward" not in vars(double)


def _decode(model, prompt_PL, mask_PL, steps, cache, select_at=None):
    """Greedy decode with `cache`; drops row 0 after `select_at` steps. Returns the logits per step."""
    out = model(input_ids=prompt_PL, attention_mask=mask_PL, position_ids=positions(mask_PL), cache=cache,
                use_cache=True)
    logits, attn, pos = [out.logits[:, -1]], mask_PL, mask_PL.sum(-1)
    for t in range(steps):
        tok = logits[-1].argmax(-1)
        if t == select_at:
            keep = torch.arange(1, tok.shape[0])
            cache.batch_select_indices(keep)
            tok, attn, pos = tok[keep], attn[keep], pos[keep]
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], -1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None], cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        pos = pos + 1
    return logits


@torch.no_grad()
def test_in_place_cache_matches_dynamic_cache(tiny):
    from transformers import DynamicCache

    model, _ = tiny
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 200, (3, 6), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # a left-padded row
    for select_at in (None, 4):
        want = _decode(model, prompt, mask, 10, DynamicCache(config=model.config), select_at)
        cache = decode_cache(model.config, reserve=10)
        got = _decode(model, prompt, mask, 10, cache, select_at)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        layer = cache.layers[0]
        assert layer.keys.shape[-2] == 6 + 10
        # written in place: the keys are a view of a buffer with room to spare, not a fresh cat
        assert layer._kv_buf[0].shape[-2] >= layer.keys.shape[-2]
        assert layer.keys.data_ptr() == layer._kv_buf[0].data_ptr()


@torch.no_grad()
def test_in_place_cache_keeps_its_buffer_across_steps(tiny):
    model, _ = tiny
    model.eval()
    prompt = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    cache = decode_cache(model.config, reserve=8)
    model(input_ids=prompt, cache=cache, use_cache=True)
    ptrs = []
    attn = torch.ones_like(prompt)
    for t in range(8):
        attn = torch.cat([attn, attn.new_ones(2, 1)], -1)
        model(input_ids=prompt[:, :1], attention_mask=attn, position_ids=torch.full((2, 1), 5 + t), cache=cache,
              use_cache=True)
        ptrs.append(cache.layers[0]._kv_buf[0].data_ptr())
    assert len(set(ptrs)) == 1, "the buffer was reallocated while it had room"


def test_sampling_with_the_speedups_draws_what_the_plain_path_draws(tiny, monkeypatch):
    """Same seed, same tokens and sample log-probs with and without both speed-ups."""
    from transformers import DynamicCache

    import posttrain.sampling.generation as generation

    model, tok = tiny
    model.eval()
    prompts = [[5, 17, 42, 9], [7, 8]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12)
    fast = sample_groups(model, tok, prompts, 4, cfg, torch.Generator().manual_seed(3))
    monkeypatch.setattr(generation, "skinny_linears", lambda m: __import__("contextlib").nullcontext(m))
    monkeypatch.setattr(generation, "decode_cache", lambda config, reserve: DynamicCache(config=config))
    plain = sample_groups(model, tok, prompts, 4, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(fast.completion_ids_BC, plain.completion_ids_BC)
    torch.testing.assert_close(fast.sample_logp_BC, plain.sample_logp_BC, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_lora_layers_fold_the_adapter_in(tiny, monkeypatch):
    """A PEFT LoRA model gives the same logits through the lean path (PEFT's forward not called),
    and with the adapter disabled falls back to PEFT's forward."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from posttrain.models import add_lora

    model, _ = tiny
    model = add_lora(model, rank=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    ids = torch.randint(3, 200, (4, 1), generator=torch.Generator().manual_seed(2))
    plain = model(input_ids=ids).logits
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with skinny_linears(model):
        lean = model(input_ids=ids).logits
        assert not calls, "the lean path should not go through PEFT's forward"
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert calls  # disabled adapters: PEFT's forward decides
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    assert (base - plain).abs().max() > 1e-3  # the adapter mattered, so the comparison above means something
    with model.disable_adapter():
        torch.testing.assert_close(base, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
