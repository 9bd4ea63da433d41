"""GRPO on the real embedded model: a few steps run and log every metric; the KL starts at exactly
0 and rises; the LoRA reference (adapter disabled) is the base model."""

import copy

import pytest
import torch

from posttrain.algorithms.grpo import GRPOConfig, train_grpo

pytestmark = pytest.mark.integration


def test_three_steps_on_arithmetic(tmp_path):
    cfg = GRPOConfig(task="arithmetic", task_size=64, eval_size=8, max_steps=3, group_size=4, prompts_per_step=2,
                     max_new_tokens=24, lr=2e-4, beta=0.04, output_dir=str(tmp_path), name="real",
                     checkpoint_every=0, eval_max_new_tokens=24,
                     # an update needs a group whose rewards differ: at temperature 0.7 about 1 sample in
                     # 8 is right, and dynamic sampling draws up to 4 rounds of prompts to find one
                     temperature=0.7, dynamic_sampling=True, max_sampling_rounds=4)
    res = train_grpo(cfg)
    hist = res.history
    assert [m["step"] for m in hist] == [1, 2, 3]
    for m in hist:
        for key in ("reward/mean", "reward/math", "kl", "entropy", "loss", "clip_frac", "len/mean", "frac_zero_std",
                    "grad_norm", "lr", "time/step", "time/gen", "tokens_per_s"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert 0.0 <= m["reward/mean"] <= 1.0
    # the KL of the first step is measured before any update: the adapter starts at zero
    assert hist[0]["kl"] == 0.0
    assert hist[-1]["kl"] > 0.0
    assert [e["step"] for e in res.evals] == [0, 3] and 0.0 <= res.evals[-1]["accuracy"] <= 1.0
    assert (res.run_dir / "final" / "adapter_config.json").is_file()


def test_reference_with_adapter_disabled_is_the_base_model(embedded):
    from posttrain.sampling.generation import SamplingConfig, sample_groups
    from posttrain.objectives.grouped import rollout_logprobs
    from posttrain.models import add_lora

    base, tok = embedded
    policy = add_lora(copy.deepcopy(base), rank=8)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained adapter changes the policy...
    prompts = [tok("What is 2 + 2?")["input_ids"], tok("Name a color.")["input_ids"]]
    r = sample_groups(policy, tok, prompts, 2, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(0))
    with torch.no_grad():
        with policy.disable_adapter():
            ref = rollout_logprobs(policy, r)
        plain = rollout_logprobs(base, r)
        pol = rollout_logprobs(policy, r)
    assert torch.allclose(ref, plain, atol=1e-5)  # ...but with it disabled we get the base model
    assert not torch.allclose(pol, plain, atol=1e-3)


def test_greedy_sampling_matches_hf_generate_on_real_model(embedded):
    from posttrain.data import encode_prompt
    from posttrain.sampling.generation import SamplingConfig, left_pad, sample_groups

    model, tok = embedded
    prompts = [encode_prompt(tok, f"What is {a} + {b}? Put the final answer after 'Answer:'.") for a, b in [(12, 30), (7, 85)]]
    r = sample_groups(model, tok, prompts, 1, SamplingConfig(temperature=0, max_new_tokens=16))
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                            pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    for ours, theirs, n in zip(r.completion_ids_BC, hf, r.completion_mask_BC.sum(1)):
        assert ours[:n].tolist() == theirs[:n].tolist()
