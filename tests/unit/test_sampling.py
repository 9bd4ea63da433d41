"""sample_next's inverse-CDF draw: frequencies match the distribution, filtered tokens are never
drawn, per-group generators make a group's draws independent of the rest of the batch."""

import torch

from posttrain.sampling.generation import SamplingConfig, sample_next


def test_frequencies_match_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).expand(20000, -1).contiguous()
    tokens, logp = sample_next(logits, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    p = logits[0].softmax(-1)
    assert (freq - p).abs().max() < 0.01, (freq, p)
    assert torch.allclose(logp, p.log()[tokens])


def test_top_k_and_top_p_exclude_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(5000, -1).contiguous()
    g = torch.Generator().manual_seed(1)
    tokens, _ = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(tokens.tolist()) == {0, 1}
    tokens, _ = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)
    assert set(tokens.tolist()) == {0}  # p(token 0) = 0.64 already crosses 0.5


def test_group_generators_are_independent_of_the_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    full, _ = sample_next(logits, SamplingConfig(), None, (groups, gens()))
    alone, _ = sample_next(logits[2:4], SamplingConfig(), None, (torch.tensor([0, 0]), [gens()[1]]))
    assert torch.equal(full[2:4], alone)
