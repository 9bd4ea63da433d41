"""Group sampling and shared-prompt log-probs agree with the plain full-sequence computation."""

import pytest
import torch

from posttrain.sampling.generation import SamplingConfig, left_pad, positions, sample_groups
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.models import add_lora


def prompts_of(tok):
    return [tok("hello there")["input_ids"], tok("a much longer prompt about many things")["input_ids"],
            tok("x")["input_ids"]]


def boost_eos(model, eos, amount):
    """Add ``amount`` to the EOS logit (a forward hook on the output head, like a bias)."""
    model.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(-1, torch.tensor([eos]),
                                                                             torch.full_like(out[..., :1], amount)))


def naive_logprobs(model, r, temperature=1.0):
    """Every completion with its own copy of the prompt, full logits, log_softmax(logits / T)."""
    G = r.group_size
    ids = torch.cat([r.prompt_ids_PL.repeat_interleave(G, 0), r.completion_ids_BC], 1)
    attn = torch.cat([r.prompt_mask_PL.repeat_interleave(G, 0), torch.ones_like(r.completion_ids_BC)], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits / temperature
    L = r.prompt_ids_PL.shape[1]
    logp = torch.log_softmax(logits[:, L - 1:-1], -1).gather(-1, r.completion_ids_BC[..., None]).squeeze(-1)
    return logp * r.completion_mask_BC


def test_greedy_matches_hf_generate(tiny):
    model, tok = tiny
    prompts = prompts_of(tok)
    r = sample_groups(model, tok, prompts, 2, SamplingConfig(temperature=0, max_new_tokens=10))
    ids, mask = left_pad(prompts, tok.pad_token_id)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                        pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(r.completion_ids_BC, hf.repeat_interleave(2, 0))


def test_sampled_logprobs_are_the_models(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    r = sample_groups(model, tok, prompts_of(tok), 4, SamplingConfig(temperature=0.7, max_new_tokens=8), generator=g)
    with torch.no_grad():
        ref = naive_logprobs(model, r, temperature=0.7)
    assert torch.allclose(r.sample_logp_BC, ref, atol=1e-5)
    assert r.completion_ids_BC.shape == (12, 8)


def test_sampling_is_reproducible_and_seed_dependent(tiny):
    model, tok = tiny
    cfg = SamplingConfig(max_new_tokens=6)
    a = sample_groups(model, tok, prompts_of(tok), 3, cfg, generator=torch.Generator().manual_seed(1))
    b = sample_groups(model, tok, prompts_of(tok), 3, cfg, generator=torch.Generator().manual_seed(1))
    c = sample_groups(model, tok, prompts_of(tok), 3, cfg, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.completion_ids_BC, b.completion_ids_BC)
    assert not torch.equal(a.completion_ids_BC, c.completion_ids_BC)


def test_eos_ends_completion_and_mask_includes_it(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    boost_eos(model, eos, 11.0)  # ~ log(vocab): EOS about as likely as all other tokens together
    # after the 2 forced tokens a row runs to the limit with p ~ 1/4: some rows of 24 clip, most stop
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=4, min_new_tokens=2)
    r = sample_groups(model, tok, prompts_of(tok), 8, cfg, generator=torch.Generator().manual_seed(0))
    lengths = r.completion_mask_BC.sum(1).tolist()
    assert min(lengths) >= 2 and r.clipped_B.any() and not r.clipped_B.all()
    for ids, n, clipped in zip(r.completion_ids_BC.tolist(), lengths, r.clipped_B.tolist()):
        assert (eos in ids[:n]) == (not clipped)
        if not clipped:  # the mask covers the completion up to and including its first EOS
            assert ids[n - 1] == eos and eos not in ids[: n - 1]
        assert all(t == tok.pad_token_id for t in ids[n:])


def test_min_new_tokens_forbids_early_eos(tiny):
    model, tok = tiny
    boost_eos(model, tok.eos_token_id, 100.0)  # EOS certain unless forbidden
    r = sample_groups(model, tok, prompts_of(tok), 2, SamplingConfig(max_new_tokens=5, min_new_tokens=5),
                      generator=torch.Generator().manual_seed(0))
    assert r.completion_mask_BC.sum(1).tolist() == [5] * 6


@pytest.mark.parametrize("lora,temperature", [(False, 1.0), (True, 0.8)])
def test_shared_prompt_logprobs_equal_naive_in_value_and_gradient(tiny, lora, temperature):
    model, tok = tiny
    if lora:
        model = add_lora(model, rank=4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    r = sample_groups(model, tok, prompts_of(tok), 3, SamplingConfig(max_new_tokens=7),
                      generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    logp, ent = rollout_logprobs(model, r, temperature=temperature, with_entropy=True)
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((logp * weights).sum(), params)
    ref = naive_logprobs(model, r, temperature)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    assert torch.allclose(logp, ref, atol=1e-5)
    assert (ent[r.completion_mask_BC.bool()] > 0).all()
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-5, rtol=1e-4)


def test_micro_batch_rows_select_whole_groups(tiny):
    model, tok = tiny
    r = sample_groups(model, tok, prompts_of(tok), 2, SamplingConfig(max_new_tokens=5),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = rollout_logprobs(model, r)
        part = rollout_logprobs(model, r, rows=torch.tensor([2, 0]))
    assert torch.allclose(part, full[[4, 5, 0, 1]], atol=1e-5)
