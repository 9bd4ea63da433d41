"""Log-probs of every causal LM family at any temperature: tiny random models (built locally from
transformers' config classes, no downloads) of the families whose logits are plain ``lm_head(h)``
and of those that transform them (Gemma-2/3 soft-capping c * tanh(z / c), Granite's z / s,
Cohere's z * s). The chunked paths (``completion_logprobs``, the shared-prompt ``rollout_logprobs``,
their entropies) must equal the full-logits computation, model(x).logits (the model applying its own
transform) / T then log_softmax, in value and in gradient.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models.split import LogitTransform, split_model
from posttrain.objectives.grouped import rollout_logprobs
from posttrain.objectives.logprobs import completion_logprobs, head_logprobs
from posttrain.sampling.generation import Rollouts, positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)

# model_type -> (config overrides, the transform split_model must report)
FAMILIES = {
    "llama": ({}, None),
    "qwen2": ({}, None),
    "qwen3": ({}, None),
    "mistral": ({}, None),
    "phi3": ({}, None),
    "olmo2": ({}, None),
    "smollm3": ({}, None),
    # a small cap (the real ones are 30) so that tanh bends these tiny models' logits
    "gemma2": ({"final_logit_softcapping": 0.5, "initializer_range": 0.2}, (("softcap", 0.5),)),
    "gemma3_text": ({"final_logit_softcapping": 0.5, "initializer_range": 0.2}, (("softcap", 0.5),)),
    "granite": ({"logits_scaling": 4.0}, (("scale", 0.25),)),
    "cohere": ({"logit_scale": 3.0}, (("scale", 3.0),)),
    "cohere2": ({"logit_scale": 3.0}, (("scale", 3.0),)),
}


def build(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    over, _ = FAMILIES[model_type]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **over})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float().eval()


def rollouts(seed: int = 0, P: int = 2, G: int = 3, L: int = 5, C: int = 6) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, V, (P, L), generator=g)
    pmask = torch.ones(P, L, dtype=torch.long)
    pmask[1, :2] = 0  # a left-padded prompt
    prompt[1, :2] = 0
    comp = torch.randint(3, V, (P * G, C), generator=g)
    cmask = torch.ones(P * G, C, dtype=torch.long)
    cmask[1, 4:] = 0  # a shorter completion, right-padded
    comp[1, 4:] = 0
    return Rollouts(prompt, pmask, comp, cmask, torch.zeros(P * G, C), torch.zeros(P * G, dtype=torch.bool), G)


def full_logits(model, r: Rollouts, temperature: float):
    """The reference: every completion with its own copy of the prompt, the model's own logits
    (its transform applied in its forward), / T. Returns (logp_BC, entropy_BC)."""
    G = r.group_size
    ids = torch.cat([r.prompt_ids_PL.repeat_interleave(G, 0), r.completion_ids_BC], 1)
    attn = torch.cat([r.prompt_mask_PL.repeat_interleave(G, 0), torch.ones_like(r.completion_ids_BC)], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False).logits
    L = r.prompt_ids_PL.shape[1]
    logq = torch.log_softmax(logits[:, L - 1:-1].double() / temperature, -1)
    logp = logq.gather(-1, r.completion_ids_BC[..., None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    m = r.completion_mask_BC
    return (logp * m).float(), (ent * m).float()


def probe_params(model):
    """A few parameters to compare gradients on: the output head, the last layer's first weight,
    the final norm."""
    head = model.get_output_embeddings().weight
    last = next(p for n, p in model.named_parameters() if ".layers.1." in n and n.endswith("weight"))
    norm = next(p for n, p in model.named_parameters() if "norm" in n and ".layers." not in n)
    return [head, last, norm]


def grads_of(model, loss):
    params = [p for p in probe_params(model) if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_split_reports_the_models_transform(model_type):
    """split_model gives (trunk, head, transform) with transform(head(trunk(x))) == model(x).logits,
    and for the transforming families the transform matters (head(trunk(x)) alone differs)."""
    model = build(model_type)
    split = split_model(model)
    assert not isinstance(split, str), split
    trunk, head, tf = split
    expected = FAMILIES[model_type][1]
    assert (tf.steps if tf else None) == expected
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = head(trunk(input_ids=ids).last_hidden_state)
        logits = model(input_ids=ids).logits
    mine = raw if tf is None else tf(raw)
    assert torch.allclose(mine, logits, atol=1e-6, rtol=1e-5)
    if tf is not None:
        assert (raw - logits).abs().max() > 0.05  # the transform is not a no-op on this model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_rollout_logprobs_match_full_logits(model_type, temperature):
    """The shared-prompt path with entropy, head trainable, equals log_softmax(model(x).logits / T):
    values, and gradients of a weighted sum of log-probs and entropies."""
    model = build(model_type)
    r = rollouts()
    w = torch.randn(r.completion_ids_BC.shape, generator=torch.Generator().manual_seed(2))
    logp, ent = rollout_logprobs(model, r, temperature, with_entropy=True, chunk_size=4)
    ref_logp, ref_ent = full_logits(model, r, temperature)
    assert torch.allclose(logp, ref_logp, atol=2e-5), (logp - ref_logp).abs().max()
    assert torch.allclose(ent, ref_ent, atol=2e-5), (ent - ref_ent).abs().max()
    ours = grads_of(model, (w * logp).sum() + (w.flip(0) * ent).sum())
    ref = grads_of(model, (w * ref_logp).sum() + (w.flip(0) * ref_ent).sum())
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=5e-5, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("model_type", ["gemma2", "granite", "cohere", "llama"])
def test_frozen_head_gradient_matches_full_logits(model_type):
    """With the head frozen (LoRA elsewhere, the usual RL setup) d logp / dh is formed in forward,
    the transform's slope included: the trunk's gradients still equal the full-logits ones."""
    model = build(model_type)
    model.get_output_embeddings().weight.requires_grad_(False)
    r = rollouts(seed=3)
    w = torch.randn(r.completion_ids_BC.shape, generator=torch.Generator().manual_seed(4))
    logp = rollout_logprobs(model, r, 0.7, chunk_size=4)
    ref_logp, _ = full_logits(model, r, 0.7)
    assert torch.allclose(logp, ref_logp, atol=2e-5)
    ours, ref = grads_of(model, (w * logp).sum()), grads_of(model, (w * ref_logp).sum())
    assert len(ours) == 2  # the last layer and the norm: the head is frozen
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=5e-5, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "granite", "cohere", "qwen2"])
def test_completion_logprobs_match_full_logits(model_type):
    """The full-sequence chunked path (DPO, PPO's reference, the doctor) applies the transform too."""
    model = build(model_type)
    r = rollouts(seed=5)
    G = r.group_size
    ids = torch.cat([r.prompt_ids_PL.repeat_interleave(G, 0), r.completion_ids_BC], 1)
    attn = torch.cat([r.prompt_mask_PL.repeat_interleave(G, 0), torch.ones_like(r.completion_ids_BC)], 1)
    cmask = torch.cat([torch.zeros_like(attn[:, :r.prompt_ids_PL.shape[1]]), r.completion_mask_BC], 1)
    logp, ent = completion_logprobs(model, ids, attn, cmask, chunk_size=4, with_entropy=True,
                                    position_ids_BT=positions(attn))
    L = r.prompt_ids_PL.shape[1]
    ref_logp, ref_ent = full_logits(model, r, 1.0)
    assert torch.allclose(logp[:, L:], ref_logp, atol=2e-5) and torch.allclose(ent[:, L:], ref_ent, atol=2e-5)
    assert (logp[:, :L] == 0).all()
    w = torch.randn(ref_logp.shape, generator=torch.Generator().manual_seed(6))
    ours = grads_of(model, (w * logp[:, L:]).sum() + (w * ent[:, L:]).sum())
    ref = grads_of(model, (w * ref_logp).sum() + (w * ref_ent).sum())
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=5e-5, rtol=1e-3), (a - b).abs().max()


# ------------------------------------------------------------------- the transform and its slope


def test_softcap_value_and_slope_by_hand():
    # c = 2: z = 0 -> 2 tanh(0) = 0, slope 1 - 0^2 = 1;
    #        z = 2 atanh(0.5) = 1.0986 -> 2 * 0.5 = 1, slope 1 - 0.5^2 = 0.75;
    #        z = -2 atanh(0.8) = -2.1972 -> 2 * -0.8 = -1.6, slope 1 - 0.64 = 0.36
    tf = LogitTransform((("softcap", 2.0),))
    z = torch.tensor([0.0, 2 * math.atanh(0.5), -2 * math.atanh(0.8)], dtype=torch.float64)
    u, slope = tf.value_and_slope(z.clone())
    assert torch.allclose(u, torch.tensor([0.0, 1.0, -1.6], dtype=torch.float64))
    assert torch.allclose(slope, torch.tensor([1.0, 0.75, 0.36], dtype=torch.float64))
    # then / T (T = 0.5): values double, and so do the slopes (chain rule: 2 * (1 - tanh^2))
    u2, slope2 = tf.then_scale(2.0).value_and_slope(z.clone())
    assert torch.allclose(u2, 2 * u) and torch.allclose(slope2, 2 * slope)
    assert tf.factor is None and LogitTransform((("scale", 0.25), ("scale", 3.0))).factor == 0.75


TRANSFORMS = {
    "softcap, then 1/T": LogitTransform((("softcap", 1.5), ("scale", 1 / 0.7))),
    "scale only": LogitTransform((("scale", 2.5),)),  # on a biased head: not folded into h
}


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("tf_name", list(TRANSFORMS))
def test_chunked_transformed_head_gradcheck(tf_name, with_entropy, frozen_head):
    """The custom forward/backward of the linear head (biased, so nothing is folded into h) under a
    transform, against finite differences in float64: the trainable head's recomputing backward,
    and the frozen head's d logp / dh formed in forward."""
    from posttrain.objectives.logprobs import _ChunkedLinearLogprob

    g = torch.Generator().manual_seed(7)
    N, H, Vs = 5, 4, 7
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(Vs, H, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    b = torch.randn(Vs, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    tok = torch.randint(0, Vs, (N,), generator=g)
    tf = TRANSFORMS[tf_name]

    def fn(h_, W_, b_):
        lp, ent = _ChunkedLinearLogprob.apply(h_, W_, b_, tok, 2, with_entropy, frozen_head, False, tf)
        return (lp, ent) if with_entropy else lp

    assert torch.autograd.gradcheck(fn, (h, W, b), eps=1e-6, atol=1e-6)
    # the value is the plain formula: log_softmax(tf(W h + b))[tok]
    head = torch.nn.Linear(H, Vs).double()
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)
    lp, ent = head_logprobs(head, h, tok, chunk_size=2, with_entropy=True, transform=tf)
    logq = torch.log_softmax(tf(W @ h.T + b[:, None]).T, -1)
    assert torch.allclose(lp, logq.gather(1, tok[:, None]).squeeze(1))
    assert torch.allclose(ent, -(logq.exp() * logq).sum(-1))


@pytest.mark.parametrize("model_type", ["llama", "granite"])
def test_pure_scales_take_the_plain_path(model_type, monkeypatch):
    """No transform, or only scales on a bias-free head: the head sees h * factor and no transform
    (nothing added to the common path)."""
    import posttrain.objectives.logprobs as lp_mod

    seen = []
    real = lp_mod._ChunkedLinearLogprob.apply
    # apply(h, W, b, tok, chunk_size, with_entropy, precompute, keep_probs, tf, shifted): a[8] is the transform
    monkeypatch.setattr(lp_mod._ChunkedLinearLogprob, "apply", lambda *a: seen.append(a[8]) or real(*a))
    model = build(model_type)
    rollout_logprobs(model, rollouts(), 0.7)
    assert seen == [None]


# ------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("model_type", ["gemma2", "granite"])
def test_grpo_runs_at_temperature_07_on_a_transforming_model(model_type, tmp_path, toy_prompts):
    """`posttrain train grpo --temperature 0.7` on a tiny Gemma-2 / Granite: once refused with
    "temperature != 1 needs a model whose output head can be split off", now one step runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import EMBEDDED, load_tokenizer

    tok = load_tokenizer(EMBEDDED)
    over = {**COMMON, **FAMILIES[model_type][0], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "num_hidden_layers": 1}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **over))
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc = terminal.posttrain("train", "grpo", "--model", str(path), "--data", toy_prompts, "--reward", "length",
                              "--temperature", "0.7", "--max-steps", "1", "--group-size", "2",
                              "--prompts-per-step", "2", "--max-new-tokens", "4", "--device", "cpu",
                              "--no-eval-at-start", "--output-dir", str(tmp_path / "runs"), "--name", "t",
                              cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "split off" not in out and "naive path" not in out
    assert (tmp_path / "runs" / "t" / "final").is_dir()


@pytest.mark.parametrize("model_type", ["gemma2", "granite"])
def test_dpo_pair_logprobs_apply_the_transform(model_type):
    """DPO's packed, prefix-shared pair log-probs go through the same chunked head: with the
    transform, each pair's sums equal those from the model's own logits on the plain sequences."""
    from posttrain.algorithms import dpo_data as dd

    model = build(model_type)
    g = torch.Generator().manual_seed(8)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    pairs = [dd.PairExample(0, ids(4), ids(3), ids(5)), dd.PairExample(1, ids(6), ids(2), ids(4))]
    got = dd.pair_logprobs(model, dd.pack(pairs, 0))
    ref = torch.zeros(2, 2)
    for i, e in enumerate(pairs):
        for j, comp in enumerate((e.chosen, e.rejected)):
            seq = torch.tensor([e.prompt + comp])
            logq = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            L = len(e.prompt)
            ref[i, j] = sum(logq[L - 1 + k, t] for k, t in enumerate(comp)).item()
    assert torch.allclose(got, ref, atol=1e-4), (got, ref)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere"])
def test_lora_on_the_head_applies_the_transform_per_chunk(model_type):
    """A LoRA layer on lm_head is called as a module per chunk (checkpointed): the transform and the
    temperature are applied to its output, and autograd differentiates them."""
    import peft

    model = build(model_type)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    assert not isinstance(split_model(pm)[1], torch.nn.Linear)  # the module path
    r = rollouts(seed=9)
    w = torch.randn(r.completion_ids_BC.shape, generator=torch.Generator().manual_seed(10))
    logp, ent = rollout_logprobs(pm, r, 0.7, with_entropy=True, chunk_size=4)
    ref_logp, ref_ent = full_logits(pm, r, 0.7)
    assert torch.allclose(logp, ref_logp, atol=2e-5) and torch.allclose(ent, ref_ent, atol=2e-5)
    lora = [p for n, p in pm.named_parameters() if "lora_" in n and "lm_head" in n]
    ours = torch.autograd.grad((w * logp).sum() + (w * ent).sum(), lora)
    ref = torch.autograd.grad((w * ref_logp).sum() + (w * ref_ent).sum(), lora)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=5e-5, rtol=1e-3), (a - b).abs().max()
