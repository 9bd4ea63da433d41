"""The lean decode step of the bfloat16 sampling copy (`sampling/lean_decode.py`) computes what
transformers' forward computes: logits over several steps of a left-padded batch (rows of
different prompt lengths, a row dropped midway as finished rows are), with grouped-query heads;
it follows the policy after a sync (its fused weights are the modules' weights); models it does
not cover decode through transformers' forward."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models import add_lora, tiny_model
from posttrain.sampling import lean_decode
from posttrain.sampling.generation import left_pad, positions
from posttrain.sampling.kv_cache import decode_cache
from posttrain.sampling.rollout_model import RolloutModel

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _gap(a, b) -> float:
    """Largest total-variation distance between the rows' next-token distributions."""
    return (a.float().softmax(-1) - b.float().softmax(-1)).abs().sum(-1).max().item() / 2


def _steps(model, lean, prompts, tokens_SA, drop_after: int):
    """Pre-fill two caches with transformers' forward, then decode the same tokens with
    transformers' step on one and the lean step on the other; returns the per-step gaps."""
    pad = 0
    prompt_PL, mask_PL = left_pad(prompts, pad)
    caches = [decode_cache(model.config, reserve=tokens_SA.shape[0]) for _ in range(2)]
    for cache in caches:
        model(input_ids=prompt_PL, attention_mask=mask_PL, position_ids=positions(mask_PL), cache=cache, use_cache=True)
    attn, pos = mask_PL, mask_PL.sum(-1)
    rows = torch.arange(len(prompts))
    gaps = []
    for s, token_A in enumerate(tokens_SA):
        token_A = token_A[rows]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
        with torch.no_grad():
            hf = model(input_ids=token_A[:, None], attention_mask=attn, position_ids=pos[:, None], cache=caches[0],
                       use_cache=True).logits[:, -1]
        ours = lean.step(token_A, attn, pos, caches[1])
        gaps.append(_gap(hf, ours))
        pos = pos + 1
        if s == drop_after:  # row 1 finished: it leaves the batch, as in sampling
            keep = torch.tensor([0, 2])
            for cache in caches:
                cache.batch_select_indices(keep)
            rows, attn, pos = rows[keep], attn[keep], pos[keep]
    return gaps


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 2)])
def test_lean_step_matches_transformers(heads, kv_heads):
    policy, _ = tiny_model(seed=0, initializer_range=0.2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           hidden_size=96 if heads == 6 else 64)
    copy_ = RolloutModel(policy, torch.bfloat16)
    lean = copy_.model.lean_decoder
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (5, 9, 7)]
    tokens_SA = torch.randint(5, 1000, (6, 3), generator=g)
    gaps = _steps(copy_.model, lean, prompts, tokens_SA, drop_after=2)
    assert max(gaps) < 0.005, gaps  # bfloat16 rounding of differently grouped sums (measured: 0)
    # and the copy's transformers path is the policy's up to bfloat16: the lean step is too
    f32 = _steps(policy, lean, prompts, tokens_SA, drop_after=2)
    assert max(f32) < 0.06, f32


def test_lean_step_follows_the_policy_after_sync():
    policy = add_lora(tiny_model(seed=0, initializer_range=0.2)[0], rank=4)
    copy_ = RolloutModel(policy, torch.bfloat16)
    lean = copy_.model.lean_decoder
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (4, 6, 5)]
    tokens_SA = torch.randint(5, 1000, (4, 3), generator=g)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=g)  # the adapter moves the policy far
    merged = copy.deepcopy(policy).merge_and_unload()
    stale = _steps(merged, lean, prompts, tokens_SA, drop_after=1)
    copy_.sync()
    synced = _steps(merged, lean, prompts, tokens_SA, drop_after=1)
    assert max(synced) < 0.06, synced
    assert min(stale) > 4 * max(synced), (stale, synced)


def test_models_it_does_not_cover_decode_through_transformers():
    for override in (dict(attention_bias=True), dict(mlp_bias=True), dict(hidden_act="gelu")):
        policy, _ = tiny_model(seed=0, **override)
        assert not lean_decode.supports(policy.config)
        copy_ = RolloutModel(policy, torch.bfloat16).model
        assert not hasattr(copy_, "lean_decoder")
        assert copy_.config._attn_implementation == "eager"  # every step through transformers: eager is faster
    policy, _ = tiny_model(seed=0)
    assert lean_decode.supports(policy.config)
    # the lean step's attention is torch's fused kernel: the copy pre-fills with the same one
    assert RolloutModel(policy, torch.bfloat16).model.config._attn_implementation == "sdpa"
    assert not hasattr(RolloutModel(policy, torch.float32).model, "lean_decoder")  # float32: the policy itself


def _family(model_type: str, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    from test_logprobs_architectures import COMMON, FAMILIES  # the tiny configs of the log-prob family tests

    cfg = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type][0], "initializer_range": 0.2, **over})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("model_type,over", [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": None})])
def test_lean_step_matches_each_family_it_covers(model_type, over):
    policy = _family(model_type, **over)
    copy_ = RolloutModel(policy, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 8, 6)]
    tokens_SA = torch.randint(3, 96, (5, 3), generator=g)
    gaps = _steps(copy_.model, copy_.model.lean_decoder, prompts, tokens_SA, drop_after=1)
    assert max(gaps) < 0.005, gaps


@pytest.mark.parametrize("model_type,over", [("qwen2", {}), ("phi3", {}), ("olmo2", {}), ("smollm3", {}),
                                             ("gemma2", {}), ("mistral", {"sliding_window": 16})])
def test_families_it_does_not_cover_keep_transformers_forward(model_type, over):
    policy = _family(model_type, **over)
    assert not hasattr(RolloutModel(policy, torch.bfloat16).model, "lean_decoder")


def test_multi_turn_episodes_take_the_lean_step_and_equal_transformers_episodes(scripted_episodes):
    """Multi-turn sampling (`turns.py`) decodes through the same step as single-turn sampling: on
    the bfloat16 copy the lean one, with the same episodes (tokens and sampler log-probs) as
    transformers' forward gives."""
    policy, tok = tiny_model(seed=0, initializer_range=0.2)
    copy_ = RolloutModel(policy, torch.bfloat16)
    lean = copy_.model.lean_decoder
    calls = []
    step = lean.step
    lean.step = lambda *a: calls.append(1) or step(*a)
    fast = scripted_episodes(copy_.model, tok, 2)
    del copy_.model.lean_decoder
    plain = scripted_episodes(copy_.model, tok, 2)
    assert len(calls) > 20  # every turn's tokens after the first
    a, b = fast.rollouts, plain.rollouts
    assert torch.equal(a.completion_ids_BC, b.completion_ids_BC)
    assert torch.equal(a.completion_mask_BC, b.completion_mask_BC)
    assert torch.equal(a.sample_logp_BC, b.sample_logp_BC)
    assert int(a.completion_mask_BC.sum()) > 30  # turns were sampled
