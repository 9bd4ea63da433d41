"""posttrain.objectives.logprobs: chunked log-probs equal the naive path (value and gradient), on tiny models."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import posttrain.objectives.logprobs as lp_mod
from posttrain.objectives.logprobs import (
    _ChunkedLinearLogprob,
    completion_logprobs,
    entropy_from_logits,
    head_logprobs,
    naive_completion_logprobs,
    selective_log_softmax,
    split_model,
)
from posttrain.models import tiny_model

peft = pytest.importorskip("peft")


# --------------------------------------------------------------------------------------- helpers


def make_batch(vocab, B=3, T=12, seed=0):
    """Row 0 left-padded (3 pads), the last row right-padded (2 pads); completions from T/2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, :3] = 0
    am[-1, T - 2:] = 0
    cm = torch.zeros(B, T, dtype=torch.long)
    cm[:, T // 2:] = 1
    cm[-1, T - 2:] = 0
    return ids, am, cm


def run(fn, model, ids, am, cm, with_entropy, **kw):
    """Forward + backward of a loss using every output; returns (logp, entropy, grads by name)."""
    model.zero_grad(set_to_none=True)
    out = fn(model, ids, am, cm, with_entropy=with_entropy, **kw)
    logp, ent = out if with_entropy else (out, None)
    T = ids.shape[1]
    w = torch.linspace(-1.0, 2.0, T, dtype=logp.dtype)
    loss = (logp * w).sum() + ((ent * w.flip(0)).sum() if with_entropy else 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), (ent.detach() if with_entropy else None), grads


def assert_same(model, ids, am, cm, with_entropy=False, value_tol=1e-5, grad_rtol=1e-5, **kw):
    """Chunked == naive: values to `value_tol`, each gradient to `grad_rtol` x its largest entry."""
    a_lp, a_ent, a_g = run(completion_logprobs, model, ids, am, cm, with_entropy, **kw)
    b_lp, b_ent, b_g = run(naive_completion_logprobs, model, ids, am, cm, with_entropy)
    assert (a_lp - b_lp).abs().max().item() <= value_tol
    assert torch.equal(a_lp == 0, b_lp == 0)
    if with_entropy:
        assert (a_ent - b_ent).abs().max().item() <= value_tol
    assert a_g.keys() == b_g.keys() and a_g
    for n in a_g:
        scale = b_g[n].abs().max().item()
        assert scale > 0, f"{n} has no gradient: the test would prove nothing"
        err = (a_g[n] - b_g[n]).abs().max().item()
        assert err <= grad_rtol * scale, f"{n}: |diff| {err:.3g} > {grad_rtol} x {scale:.3g}"
    return a_lp, a_g


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_model(seed=0)
    return model


def fresh_tiny(**over):
    model, _ = tiny_model(seed=0, **over)
    return model


def lora(model, targets, modules_to_save=None, dropout=0.0):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                          modules_to_save=modules_to_save, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, cfg)


# --------------------------------------------------------------------------------------- small pieces


def test_selective_log_softmax_hand_values():
    # logits [0, ln 3] -> softmax [1/4, 3/4]: log(3/4) = -0.2876821, log(1/4) = -1.3862944
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = selective_log_softmax(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(out, torch.tensor([[-0.2876821, -1.3862944]]), atol=1e-6)
    # 1-D (a single position) works too
    assert torch.allclose(selective_log_softmax(logits[0, 0], torch.tensor(1)), torch.tensor(-0.2876821), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selective_log_softmax_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    out = selective_log_softmax(logits, tokens)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="match"):
        selective_log_softmax(logits, tokens[:, :2])


def test_entropy_from_logits_hand_values():
    # uniform over 4: ln 4 = 1.3862944; [0, ln 3]: -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351
    out = entropy_from_logits(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]))
    assert torch.allclose(out, torch.tensor([1.3862944, 0.5623351]), atol=1e-6)


class Wrapped(nn.Module):
    """Any head that is not exactly nn.Linear takes the module path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("path", ["linear", "module", "naive"])
def test_entropy_is_accurate_in_float32_for_large_logits(path):
    """A trained model's logits are ~30 over a 49,152-token vocabulary. logsumexp(z) - sum p z then
    subtracts two numbers ~30 whose float32 errors (a BLAS dot over 49,152 terms) are ~1e-4; shifted
    by the max, both terms are small and non-negative. Reference: float64 from the same float32 logits."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 8, 16, 49152
    h = torch.randn(N, H, generator=g)
    head = nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 1.5)
        head.bias.fill_(30.0)
    tok = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        z64 = head(h).double()
    z64.requires_grad_(True)
    ref_ent = -(torch.softmax(z64, -1) * torch.log_softmax(z64, -1)).sum(-1)
    ref_ent.sum().backward()
    ref_dh = z64.grad @ head.weight.detach().double()
    assert 0.5 < ref_ent.min() and ref_ent.max() < 8  # neither one-hot nor uniform
    h = h.requires_grad_(True)
    if path == "naive":
        ent = entropy_from_logits(head(h))
    else:
        _, ent = head_logprobs(head if path == "linear" else Wrapped(head), h, tok, chunk_size=4, with_entropy=True)
    assert (ent.double() - ref_ent.detach()).abs().max() < 2e-5
    if path != "naive":  # the naive path's autograd gradient is float32's own weakness (see the real-model test)
        ent.sum().backward()
        # the Linear path's own backward keeps 1e-5; a module head's goes through autograd's Linear
        # backward, a float32 BLAS reduction over 49,152 logits whose rounding depends on how the
        # BLAS splits it over threads (measured: 1.8e-5 relative)
        bound = 1e-5 if path == "linear" else 5e-5
        assert ((h.grad.double() - ref_dh).abs().max() / ref_dh.abs().max()) < bound


# --------------------------------------------------------------------------------------- gradcheck


def _linear_case(seed=0, N=7, H=5, V=11):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    tok = torch.randint(0, V, (N,), generator=g)
    return h, W, b, tok


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_linear_gradcheck_trainable_head(with_entropy, chunk):
    h, W, b, tok = _linear_case()

    def f(h, W, b):
        logp, ent = _ChunkedLinearLogprob.apply(h, W, b, tok, chunk, with_entropy, False)
        return (logp, ent) if with_entropy else logp

    assert torch.autograd.gradcheck(f, (h.requires_grad_(), W.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_linear_gradcheck_trainable_head_kept_probs(with_entropy, chunk):
    """Forward keeps softmax(z) for backward: logp's gradient from it; with the entropy's gradient
    too, backward recomputes (both must be right)."""
    h, W, b, tok = _linear_case(seed=3)

    def f(h, W, b):
        logp, ent = _ChunkedLinearLogprob.apply(h, W, b, tok, chunk, with_entropy, False, True)
        return (logp, ent) if with_entropy else logp

    args = (h.requires_grad_(), W.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(f, args)
    if with_entropy:
        assert torch.autograd.gradcheck(lambda *a: f(*a)[0], args)


def test_kept_probs_used_once_then_recomputed():
    """A second backward through the same graph (retain_graph) must not reuse the consumed chunks."""
    h, W, b, tok = _linear_case(seed=4)
    h, W, b = h.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    logp, _ = _ChunkedLinearLogprob.apply(h, W, b, tok, 3, False, False, True)
    g = torch.linspace(-1, 2, logp.shape[0], dtype=logp.dtype)
    first = torch.autograd.grad(logp, (h, W, b), g, retain_graph=True)
    second = torch.autograd.grad(logp, (h, W, b), g)
    ref_lp, _ = _ChunkedLinearLogprob.apply(h, W, b, tok, 3, False, False, False)
    ref = torch.autograd.grad(ref_lp, (h, W, b), g)
    for a, c, r in zip(first, second, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, r, rtol=1e-12, atol=1e-12)


def test_head_keeps_probs_only_for_a_trainable_head_within_budget(monkeypatch):
    """head_logprobs keeps the chunks when they fit KEEP_PROBS_MAX_BYTES, else recomputes: same
    gradients either way."""
    h, W, b, tok = _linear_case(seed=5, N=12, V=17)
    head = nn.Linear(5, 17, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)
    kept = []
    real = _ChunkedLinearLogprob.forward

    def spy(ctx, *args):
        out = real(ctx, *args)
        kept.append(ctx.probs is not None)
        return out

    monkeypatch.setattr(_ChunkedLinearLogprob, "forward", staticmethod(spy))
    grads = []
    for budget in (12 * 17 * 8, 12 * 17 * 8 - 1):
        monkeypatch.setattr(lp_mod, "KEEP_PROBS_MAX_BYTES", budget)
        x = h.clone().requires_grad_()
        head.zero_grad()
        logp, _ = head_logprobs(head, x, tok, chunk_size=5)
        (logp * torch.arange(12.0, dtype=logp.dtype)).sum().backward()
        grads.append((x.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    assert kept == [True, False]
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    head.requires_grad_(False)  # frozen head: d logp/dh precomputed instead, nothing kept
    head_logprobs(head, h.clone().requires_grad_(), tok, chunk_size=5)[0].sum().backward()
    assert kept[-1] is False


@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_linear_gradcheck_frozen_head_precomputed(with_entropy):
    """Frozen head: d logp/dh is formed in forward; the entropy's gradient by recomputation."""
    h, W, b, tok = _linear_case(seed=1)

    def f(h):
        logp, ent = _ChunkedLinearLogprob.apply(h, W, b, tok, 3, with_entropy, True)
        return (logp, ent) if with_entropy else logp

    assert torch.autograd.gradcheck(f, (h.requires_grad_(),))
    if with_entropy:  # only the entropy used: logp's precomputed gradient must not leak in
        assert torch.autograd.gradcheck(lambda h: f(h)[1], (h,))
        assert torch.autograd.gradcheck(lambda h: f(h)[0], (h,))


def test_chunked_linear_equals_plain_autograd():
    h, W, b, tok = _linear_case(seed=2, N=9, V=13)
    z = h @ W.T + b
    ref_lp = torch.log_softmax(z, -1).gather(1, tok[:, None])[:, 0]
    ref_ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    head = nn.Linear(5, 13, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)
    lp, ent = head_logprobs(head, h, tok, chunk_size=4, with_entropy=True)
    assert torch.allclose(lp, ref_lp, atol=1e-12) and torch.allclose(ent, ref_ent, atol=1e-12)


class LowRankHead(nn.Module):
    """A head that is not an nn.Linear (like a LoRA-wrapped lm_head): W h + B A h."""

    def __init__(self, W, A, B):
        super().__init__()
        self.W, self.A, self.B = W, A, B

    def forward(self, h):
        return h @ self.W.T + (h @ self.A.T) @ self.B.T


@pytest.mark.parametrize("with_entropy", [False, True])
def test_module_head_gradcheck(with_entropy):
    h, W, _, tok = _linear_case(seed=3)
    g = torch.Generator().manual_seed(4)
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    B = torch.randn(11, 2, generator=g, dtype=torch.float64)

    def f(h, W, A, B):
        logp, ent = head_logprobs(LowRankHead(W, A, B), h, tok, chunk_size=3, with_entropy=with_entropy)
        return (logp, ent) if with_entropy else logp

    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in (h, W, A, B)), fast_mode=True)


@pytest.mark.parametrize("head_kind", ["linear", "module"])
@pytest.mark.parametrize("grad", [False, True])
def test_shifted_logprobs_are_the_entropy_passes_to_the_bit(head_kind, grad):
    """`shifted` (GRPO's reference pass) gives the log-probs of the entropy pass (the policy's) to
    the bit, without computing an entropy; the plain pass rounds differently, which is why it exists."""
    g = torch.Generator().manual_seed(5)
    N, H, V = 64, 32, 3001
    h = torch.randn(N, H, generator=g) * 3
    W = torch.randn(V, H, generator=g)
    tok = torch.randint(0, V, (N,), generator=g)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(W)
    if head_kind == "module":
        head = nn.Sequential(head)
    with torch.set_grad_enabled(grad):
        x = h.clone().requires_grad_(grad)
        with_ent, ent = head_logprobs(head, x, tok, chunk_size=24, with_entropy=True)
        shifted, none = head_logprobs(head, x, tok, chunk_size=24, shifted=True)
        plain, _ = head_logprobs(head, x, tok, chunk_size=24)
    assert none is None and ent is not None
    assert torch.equal(shifted, with_ent)
    assert not torch.equal(plain, with_ent)  # measured: they differ in the last bits
    if grad:  # and it is differentiable like the others
        (gs,) = torch.autograd.grad(shifted.sum(), x)
        (gp,) = torch.autograd.grad(plain.sum(), x)
        torch.testing.assert_close(gs, gp)


class _Call(nn.Module):
    def __init__(self, model, ids, am, cm, **kw):
        super().__init__()
        self.model, self.args, self.kw = model, (ids, am, cm), kw

    def forward(self):
        return completion_logprobs(self.model, *self.args, **self.kw)


def test_gradcheck_tiny_model_float64_real_vocab():
    """gradcheck of the whole call (trunk + chunked head, 49,152-token vocabulary) with respect to
    the final norm's weight, in float64 (other weights frozen; gradcheck's fast mode)."""
    model = fresh_tiny().double().requires_grad_(False)
    ids, am, cm = make_batch(model.config.vocab_size, B=2, T=6)
    call = _Call(model, ids, am, cm, chunk_size=2, with_entropy=True)
    w0 = model.model.norm.weight.detach().clone().requires_grad_()
    f = lambda w: torch.func.functional_call(call, {"model.model.norm.weight": w}, ())  # noqa: E731
    assert torch.autograd.gradcheck(f, (w0,), fast_mode=True)


def test_gradcheck_small_vocab_head_weight_float64():
    """gradcheck with respect to every entry of an untied output head (small vocab, float64)."""
    model = fresh_tiny(vocab_size=24, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=False).double().requires_grad_(False)
    ids, am, cm = make_batch(24, B=2, T=6)
    call = _Call(model, ids, am, cm, chunk_size=2, with_entropy=True)
    w0 = model.lm_head.weight.detach().clone().requires_grad_()
    f = lambda w: torch.func.functional_call(call, {"model.lm_head.weight": w}, ())  # noqa: E731
    assert torch.autograd.gradcheck(f, (w0,), fast_mode=True)


# --------------------------------------------------------------------------------------- chunked == naive


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("keep_probs", [True, False])
def test_full_finetune_matches_naive_float32(tiny, with_entropy, chunk, keep_probs, monkeypatch):
    if not keep_probs:  # the head's backward recomputes its logits
        monkeypatch.setattr(lp_mod, "KEEP_PROBS_MAX_BYTES", 0)
    ids, am, cm = make_batch(tiny.config.vocab_size)
    assert_same(tiny, ids, am, cm, with_entropy, chunk_size=chunk)


def test_full_finetune_matches_naive_float64_tightly():
    model = fresh_tiny().double()
    ids, am, cm = make_batch(model.config.vocab_size)
    assert_same(model, ids, am, cm, True, value_tol=1e-12, grad_rtol=1e-12, chunk_size=5)


@pytest.mark.parametrize(
    "targets, modules_to_save, head_kind",
    [
        (["q_proj", "v_proj"], None, "linear"),  # frozen nn.Linear head: d/dh formed in forward
        (["q_proj", "lm_head"], None, "module"),  # LoRA on lm_head: called as a module per chunk
        (["v_proj"], ["lm_head"], "module"),  # a trainable copy of lm_head (ModulesToSaveWrapper)
    ],
)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_peft_models_match_naive(targets, modules_to_save, head_kind, with_entropy):
    model = lora(fresh_tiny(), targets, modules_to_save)
    model.train()
    trunk, head, transform = split_model(model)
    assert transform is None
    assert (type(head) is nn.Linear) == (head_kind == "linear")
    assert trunk is model.get_base_model().model
    ids, am, cm = make_batch(model.config.vocab_size)
    assert_same(model, ids, am, cm, with_entropy, chunk_size=5)


def test_lora_dropout_on_head_is_replayed_in_backward(monkeypatch):
    """Activation checkpointing must replay the same dropout mask when it recomputes a chunk."""
    model = lora(fresh_tiny(), ["lm_head"], dropout=0.5)
    model.train()
    ids, am, cm = make_batch(model.config.vocab_size)

    def once(seed):
        torch.manual_seed(seed)
        return run(completion_logprobs, model, ids, am, cm, False, chunk_size=4)

    lp_a, _, g_a = once(0)
    lp_other, _, _ = once(1)
    assert not torch.allclose(lp_a, lp_other)  # dropout is really active
    monkeypatch.setattr(lp_mod, "checkpoint", lambda fn, *a, **k: fn(*a))  # no recomputation
    lp_b, _, g_b = once(0)
    assert torch.equal(lp_a, lp_b)
    for n in g_a:
        assert torch.allclose(g_a[n], g_b[n], atol=1e-6, rtol=1e-5), n


def test_bfloat16_model(tiny):
    model = fresh_tiny().to(torch.bfloat16)
    ids, am, cm = make_batch(model.config.vocab_size)
    a_lp, a_ent, a_g = run(completion_logprobs, model, ids, am, cm, True, chunk_size=5)
    b_lp, b_ent, b_g = run(naive_completion_logprobs, model, ids, am, cm, True)
    assert a_lp.dtype == torch.float32
    assert (a_lp - b_lp).abs().max() < 0.1 and (a_ent - b_ent).abs().max() < 0.1
    for n in a_g:
        cos = torch.nn.functional.cosine_similarity(a_g[n].float().flatten(), b_g[n].float().flatten(), dim=0)
        assert cos > 0.99, n


# --------------------------------------------------------------------------------------- contract


def test_mask_semantics_and_position_zero(tiny):
    ids, am, cm = make_batch(tiny.config.vocab_size)
    cm[:, 0] = 1  # position 0 has no predecessor: always 0
    logp = completion_logprobs(tiny, ids, am, cm)
    assert logp.shape == ids.shape and logp.dtype == torch.float32
    assert torch.equal(logp[:, 0], torch.zeros(3))
    assert (logp[:, 1:][cm[:, 1:] == 0] == 0).all() and (logp[:, 1:][cm[:, 1:] == 1] < 0).all()
    # logp[b, t] is log p(ids[b, t] | ids[b, :t]): check one entry from the full logits
    with torch.no_grad():
        logits = tiny(input_ids=ids, attention_mask=am).logits
    assert torch.allclose(logp[1, 7], torch.log_softmax(logits[1, 6], -1)[ids[1, 7]], atol=1e-5)


def test_no_grad_and_empty_completion(tiny):
    ids, am, cm = make_batch(tiny.config.vocab_size)
    with torch.no_grad():
        a, ent = completion_logprobs(tiny, ids, am, cm, with_entropy=True)
    assert not a.requires_grad and not ent.requires_grad
    b = completion_logprobs(tiny, ids, am, cm)
    assert torch.allclose(a, b.detach(), atol=1e-6)
    empty = completion_logprobs(tiny, ids, am, torch.zeros_like(cm))
    assert torch.equal(empty, torch.zeros(3, 12))
    empty.sum().backward()  # no error, no NaN
    with pytest.raises(ValueError, match="shape"):
        completion_logprobs(tiny, ids, am, cm[:, :5])


def test_position_ids_are_passed_to_the_trunk(tiny):
    """Two sequences packed in one row with position ids (and no attention mask) give the same
    log-probs as separately; without the position ids they do not (so the test can fail)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (1, 7), generator=g), torch.randint(0, 1000, (1, 5), generator=g)
    ca, cb = torch.tensor([[0, 0, 0, 1, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1, 1]])
    separate = torch.cat([completion_logprobs(tiny, a, None, ca), completion_logprobs(tiny, b, None, cb)], 1)
    packed, cp = torch.cat([a, b], 1), torch.cat([ca, cb], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with_pos = completion_logprobs(tiny, packed, None, cp, position_ids_BT=pos)
    assert torch.allclose(with_pos, separate, atol=1e-5)
    assert not torch.allclose(completion_logprobs(tiny, packed, None, cp), separate, atol=1e-3)
    naive = naive_completion_logprobs(tiny, packed, None, cp, position_ids_BT=pos)
    assert torch.allclose(with_pos, naive, atol=1e-5)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.max = max(self.max, o.numel())
        return out


@pytest.mark.parametrize("setup", ["full", "lora-attn", "lora-head"])
def test_never_materialises_full_logits(setup):
    """No op output in forward or backward is as large as [B, T, V] (nor [N, V] for the N scored
    tokens); the naive path's is (so the probe works)."""
    model = fresh_tiny()
    if setup == "lora-attn":
        model = lora(model, ["q_proj", "v_proj"])
    elif setup == "lora-head":
        model = lora(model, ["lm_head"])
    B, T, chunk = 4, 48, 16
    V, H = model.config.vocab_size, model.config.hidden_size
    ids, am, cm = make_batch(V, B=B, T=T)
    n_scored = int(cm[:, 1:].sum())
    assert n_scored * V > V * H  # else the weight itself would hide a full [N, V] tensor
    limit = max(V * H, chunk * V)
    with MaxNumel() as probe:
        logp, ent = completion_logprobs(model, ids, am, cm, chunk_size=chunk, with_entropy=True)
        (logp.sum() + ent.sum()).backward()
    assert probe.max <= limit
    with MaxNumel() as probe:
        naive_completion_logprobs(model, ids, am, cm).sum().backward()
    assert probe.max >= B * (T - 1) * V


def test_ddp_wrapped_model_goes_through_its_forward(tmp_path):
    """Under DistributedDataParallel (gloo, one CPU process) the trunk is run by the wrapper's own
    forward so gradients are synchronised; still chunked, no warning, equal to the naive path."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(fresh_tiny())
        V = ddp.module.config.vocab_size
        B, T, chunk = 4, 48, 16
        ids, am, cm = make_batch(V, B=B, T=T)
        lp_mod._warn_once.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            with MaxNumel() as probe:
                logp, ent = completion_logprobs(ddp, ids, am, cm, chunk_size=chunk, with_entropy=True)
                (logp.sum() + ent.sum()).backward()
        # DDP's gradient bucket holds every parameter in one flat tensor: the limit is that, which is
        # still below N x V for the N scored tokens ([B, 1, V] of logits_to_keep=1 is far below)
        n_params = sum(p.numel() for p in ddp.parameters())
        assert n_params < int(cm[:, 1:].sum()) * V
        assert probe.max <= max(n_params, chunk * V)
        ddp.zero_grad(set_to_none=True)
        assert_same(ddp, ids, am, cm, True, chunk_size=chunk)
    finally:
        dist.destroy_process_group()


def test_sharded_wrappers_are_refused():
    FullyShardedDataParallel = type("FullyShardedDataParallel", (nn.Module,), {})
    assert "shards" in split_model(FullyShardedDataParallel())


# --------------------------------------------------------------------------------------- fallbacks


def test_unknown_logit_transform_falls_back_with_one_warning():
    """A transform field on a family `split_model`'s table does not list is refused, never guessed
    (the same field means different steps in different families); the naive path is used."""
    model = fresh_tiny().eval()
    model.config.output_multiplier = 3.0  # a Llama does not apply it, but posttrain cannot know that
    ids, am, cm = make_batch(model.config.vocab_size)
    assert "output_multiplier=3.0" in split_model(model)
    lp_mod._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="output_multiplier"):
        out = completion_logprobs(model, ids, am, cm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = completion_logprobs(model, ids, am, cm)  # warned once only
    naive = naive_completion_logprobs(model, ids, am, cm)
    assert torch.equal(out, naive) and torch.equal(again, naive)


class NoHeadLM(nn.Module):
    """A causal LM that cannot be split: it has no get_output_embeddings()."""

    def __init__(self, vocab=20):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_unsplittable_model_falls_back():
    model = NoHeadLM()
    ids, am, cm = make_batch(20)
    lp_mod._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="no output head"):
        out, ent = completion_logprobs(model, ids, am, cm, with_entropy=True)
    logits = model.emb(ids)
    expected = torch.log_softmax(logits[0, 6], -1)[ids[0, 7]]
    assert torch.allclose(out[0, 7], expected) and out.requires_grad and ent.shape == ids.shape


def test_prompt_tuning_falls_back_to_the_peft_forward():
    model = fresh_tiny()
    pm = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert "prompt learning" in split_model(pm)
    ids, am, cm = make_batch(model.config.vocab_size)
    lp_mod._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="prompt learning"):
        out = completion_logprobs(pm, ids, am, cm)
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=am).logits[:, -12:]
    assert torch.allclose(out[1, 7], torch.log_softmax(logits[1, 6], -1)[ids[1, 7]], atol=1e-5)
    # the virtual tokens matter: the plain model gives something else
    assert not torch.allclose(out, completion_logprobs(model, ids, am, cm), atol=1e-4)
