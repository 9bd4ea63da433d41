"""completion_logprobs on the real embedded model (SmolLM2-135M-Instruct): chunked == naive in
value and gradient (float32), and a float64 finite-difference check of the chunked gradient."""

import pytest
import torch

from posttrain.objectives.logprobs import completion_logprobs, naive_completion_logprobs, split_model
from posttrain.models import ModelError, add_lora, load_model

pytestmark = pytest.mark.integration

PROMPTS = ["What is 12 + 35? Put the final answer after 'Answer:'.", "Name a prime number and say why."]
COMPLETIONS = [
    " First add the tens: 10 + 30 = 40. Then the ones: 2 + 5 = 7. Together that is 47. Answer: 47",
    " Seven is prime, because its only divisors are one and itself.",
]
CHUNK = 24  # the 56 scored tokens go through the head in 3 chunks (2 in the 40-position batch)


def _load():
    try:
        return load_model("smollm2-135m-instruct")
    except ModelError as e:  # the embedded model package is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def real():
    return _load()


def make_batch(tok, T=None):
    """Prompts left-padded, completions right-padded: [pad.. prompt completion ..pad]; cut to the
    first T positions if given (shorter, for the float64 tests)."""
    p = [tok(x, add_special_tokens=False).input_ids for x in PROMPTS]
    c = [tok(x, add_special_tokens=False).input_ids for x in COMPLETIONS]
    P, C = max(map(len, p)), max(map(len, c))
    pad = tok.pad_token_id
    ids, am, cm = [], [], []
    for pi, ci in zip(p, c):
        ids.append([pad] * (P - len(pi)) + pi + ci + [pad] * (C - len(ci)))
        am.append([0] * (P - len(pi)) + [1] * (len(pi) + len(ci)) + [0] * (C - len(ci)))
        cm.append([0] * P + [1] * len(ci) + [0] * (C - len(ci)))
    return tuple(torch.tensor(x)[:, :T] for x in (ids, am, cm))


def loss_of(out, with_entropy):
    logp, ent = out if with_entropy else (out, None)
    w = torch.linspace(-1.0, 1.0, logp.shape[1], dtype=logp.dtype)
    return (logp * w).sum() + ((ent * w.flip(0)).sum() if with_entropy else 0.0), logp


def grads(model, fn, batch, with_entropy, **kw):
    model.zero_grad(set_to_none=True)
    out = fn(model, *batch, with_entropy=with_entropy, **kw)
    loss, logp = loss_of(out, with_entropy)
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return (logp.detach(), out[1].detach()) if with_entropy else logp.detach(), g


def worst_rel(a_g, b_g):
    """Largest |a - b| / max|b| over the parameters (each gradient against its own scale)."""
    assert a_g.keys() == b_g.keys() and len(a_g) > 0
    return max(((a_g[n] - b_g[n].to(a_g[n].dtype)).abs().max() / b_g[n].abs().max()).item() for n in a_g)


def compare(model, batch, with_entropy=False, rtol=1e-5):
    a_lp, a_g = grads(model, completion_logprobs, batch, with_entropy, chunk_size=CHUNK)
    b_lp, b_g = grads(model, naive_completion_logprobs, batch, with_entropy)
    assert (b_lp[batch[2] == 1] < 0).all()
    assert (a_lp - b_lp).abs().max().item() <= 1e-5
    worst = worst_rel(a_g, b_g)
    assert worst <= rtol, f"worst relative gradient difference {worst:.3g}"


def test_real_model_splits_into_trunk_and_linear_head(real):
    model, _ = real
    trunk, head, transform = split_model(model)
    assert transform is None
    assert trunk is model.model and head is model.lm_head and isinstance(head, torch.nn.Linear)
    assert model.config.vocab_size == 49152


def test_real_full_finetune_matches_naive(real):
    model, tok = real
    model.requires_grad_(True)
    compare(model, make_batch(tok))


def test_real_entropy_against_float64(real):
    """With the entropy in the loss, the float32 naive path is itself off by ~1e-3 (autograd of
    softmax * z cancels terms), so both are judged against float64: chunked float32 within 1e-4 of
    it, naive float32 no closer than chunked; in float64 chunked == naive to 1e-9."""
    model, tok = real
    model.requires_grad_(True)
    batch = make_batch(tok, T=40)
    (a_lp, a_ent), a_g = grads(model, completion_logprobs, batch, True, chunk_size=CHUNK)
    _, n_g = grads(model, naive_completion_logprobs, batch, True)
    model64 = _load()[0].double()
    (ref_lp, ref_ent), ref_g = grads(model64, naive_completion_logprobs, batch, True)
    (c64_lp, c64_ent), c64_g = grads(model64, completion_logprobs, batch, True, chunk_size=CHUNK)
    assert (a_ent.double() - ref_ent).abs().max().item() <= 1e-4
    assert (a_lp.double() - ref_lp).abs().max().item() <= 1e-4
    assert worst_rel(a_g, ref_g) <= 1e-4
    assert worst_rel(a_g, ref_g) <= worst_rel(n_g, ref_g)
    assert (c64_lp - ref_lp).abs().max().item() <= 1e-9 and (c64_ent - ref_ent).abs().max().item() <= 1e-9
    assert worst_rel(c64_g, ref_g) <= 1e-9


def test_real_lora_matches_naive(real):
    model, tok = real
    model.requires_grad_(False)
    peft_model = add_lora(model, rank=8)
    try:
        with torch.no_grad():  # a non-zero adapter, so the LoRA weights have a real effect
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
        # LoRA gradients are sums over every token and hidden unit, so float32 summation order alone
        # moves them by ~1e-5 of their scale (measured 1.09e-5 on CI); the value check stays at 1e-5
        compare(peft_model, make_batch(tok), rtol=3e-5)
    finally:
        peft_model.unload()  # give the shared fixture back without adapters
        model.requires_grad_(True)


def test_real_float64_directional_gradient():
    """Central finite differences in float64 along random directions agree with the chunked
    backward (loss with log-probs and entropy). Only for weights after the last RMSNorm: LlamaRMSNorm
    computes in float32 even in a float64 model, which makes the loss noisy at ~1e-6 in every weight
    before it. So the head is untied from the embedding (its own copy) and the final norm's weight
    is the other direction."""
    model, tok = _load()
    model = model.double()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    batch = make_batch(tok, T=40)

    def f():
        return loss_of(completion_logprobs(model, *batch, chunk_size=CHUNK, with_entropy=True), True)[0]

    model.zero_grad(set_to_none=True)
    f().backward()
    g = torch.Generator().manual_seed(0)
    for name in ("lm_head.weight", "model.norm.weight"):
        p = model.get_parameter(name)
        v = torch.randn(p.shape, generator=g, dtype=p.dtype)
        v /= v.norm()
        analytic = (p.grad * v).sum().item()
        eps = 1e-4
        with torch.no_grad():
            p0 = p.detach().clone()
            p.copy_(p0 + eps * v)
            up = f().item()
            p.copy_(p0 - eps * v)
            down = f().item()
            p.copy_(p0)
        numeric = (up - down) / (2 * eps)
        assert abs(analytic) > 1e-3, name  # a direction the loss really depends on
        assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (name, numeric, analytic)
