"""Multi-turn sampling on the tiny model: token in / token out (the environment sees exactly the
sampled ids, the result holds exactly them and the deltas), environment tokens masked out, the
sampled log-probs equal the full-conversation forward, the KV-cache continuation equals re-filling
each turn, and the limits end episodes as truncated."""

import pytest
import torch

from posttrain.objectives.grouped import rollout_logprobs
from posttrain.sampling.generation import SamplingConfig
from posttrain.sampling.turns import TurnLimits, sample_episodes

PROMPTS = []  # filled by the fixture: two chat prompts of the embedded tokenizer


@pytest.fixture(scope="module")
def tiny(stoppable_dir):
    """The tiny model whose turns end at varied lengths (its EOS row is turned toward typical states)."""
    from posttrain.data import encode_prompt
    from posttrain.models import load_model

    model, tok = load_model(stoppable_dir)
    PROMPTS[:] = [encode_prompt(tok, "Say a word like apple."), encode_prompt(tok, "Name a fruit.")]
    return model, tok


class Scripted:
    """Answers turn n of episode b with ``n + 1 + b % 3`` fixed ids; over after ``turns`` turns."""

    def __init__(self, turns: int = 3):
        self.turns, self.seen = turns, {}

    def __call__(self, b: int, turn_ids: list[int], cut: bool):
        self.seen.setdefault(b, []).append((list(turn_ids), cut))
        n = len(self.seen[b])
        return None if n >= self.turns else [40 + i for i in range(n + 1 + b % 3)]


def sample(tiny, env, temperature=1.0, reuse=True, max_new=16, limits=TurnLimits(max_turns=8, max_total_tokens=200),
           min_new=0):
    model, tok = tiny
    model.eval()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_new, min_new_tokens=min_new)
    return sample_episodes(model, tok, PROMPTS, 3, cfg, env, limits, prompt_generators=gens, reuse_cache=reuse)


def test_token_in_token_out_and_environment_tokens_masked(tiny):
    env = Scripted(turns=3)
    ep = sample(tiny, env)
    r = ep.rollouts
    assert r.completion_ids_BC.shape[0] == 6 and ep.turns_B == [3] * 6 or any(ep.truncated_B)
    for b in range(6):
        n = ep.model_tokens_B[b] + ep.env_tokens_B[b]
        ids, mask = r.completion_ids_BC[b, :n].tolist(), r.completion_mask_BC[b, :n].tolist()
        # rebuild the sequence from what the environment was given and what it answered
        expect, expect_mask = [], []
        for k, (turn, cut) in enumerate(env.seen[b]):
            expect += turn
            expect_mask += [1] * len(turn)
            if k + 1 < len(env.seen[b]):
                delta = [tiny[1].eos_token_id] * cut + [40 + i for i in range(k + 2 + b % 3)]
                expect += delta
                expect_mask += [0] * len(delta)
        assert ids == expect and mask == expect_mask
        assert r.completion_mask_BC[b, n:].sum() == 0
        assert (r.sample_logp_BC[b] * (1 - r.completion_mask_BC[b])).abs().sum() == 0  # no log-prob off the model's tokens


def test_sampled_logprobs_equal_the_full_conversation_forward(tiny):
    ep = sample(tiny, Scripted(turns=3), temperature=0.7)
    r = ep.rollouts
    logp_BC = rollout_logprobs(tiny[0], r, 0.7)
    m = r.completion_mask_BC.bool()
    assert m.sum() > 20 and (~m & (r.completion_ids_BC != tiny[1].pad_token_id)).sum() >= 6  # holes exist
    assert torch.allclose(logp_BC[m], r.sample_logp_BC[m], atol=1e-4)


def test_cache_continuation_equals_refilling_each_turn(tiny):
    reuse, refill = sample(tiny, Scripted(), temperature=0), sample(tiny, Scripted(), temperature=0, reuse=False)
    assert torch.equal(reuse.rollouts.completion_ids_BC, refill.rollouts.completion_ids_BC)
    assert torch.allclose(reuse.rollouts.sample_logp_BC, refill.rollouts.sample_logp_BC, atol=1e-5)
    assert reuse.prefill_tokens < refill.prefill_tokens


def test_limits_end_episodes_as_truncated(tiny):
    env = Scripted(turns=100)
    ep = sample(tiny, env, limits=TurnLimits(max_turns=2, max_total_tokens=200))
    assert ep.turns_B == [2] * 6 and all(ep.truncated_B)
    ep = sample(tiny, Scripted(turns=100), limits=TurnLimits(max_turns=50, max_total_tokens=15))
    assert all(ep.truncated_B) and max(ep.model_tokens_B[b] + ep.env_tokens_B[b] for b in range(6)) <= 15
    # a turn cut at max_new_tokens (no end-of-turn token) is reported cut; the episode goes on after an
    # end-of-turn token that is context, not trained
    env = Scripted(turns=3)
    ep = sample(tiny, env, max_new=1)
    eot = tiny[1].eos_token_id
    r = ep.rollouts
    for b in range(6):
        assert ep.turns_B[b] == len(env.seen[b]) == 3 and not ep.truncated_B[b]
        cuts = [cut for _, cut in env.seen[b]]
        assert ep.cut_turns_B[b] == sum(cuts)
        ids, mask = r.completion_ids_BC[b].tolist(), r.completion_mask_BC[b].tolist()
        first_turn = env.seen[b][0][0]
        assert ids[:1] == first_turn and mask[0] == 1
        if cuts[0]:  # then the appended end-of-turn token, masked, then the delta
            assert ids[1] == eot and mask[1] == 0 and ids[2] == 40


def test_episodes_over_at_the_first_turn_are_single_turn_sampling(tiny):
    from posttrain.sampling.generation import sample_groups

    model, tok = tiny
    model.eval()
    ep = sample(tiny, lambda b, ids, cut: None)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    single = sample_groups(model, tok, PROMPTS, 3, SamplingConfig(temperature=1.0, max_new_tokens=16),
                           prompt_generators=gens)
    assert torch.equal(ep.rollouts.completion_ids_BC, single.completion_ids_BC)
    assert torch.equal(ep.rollouts.completion_mask_BC, single.completion_mask_BC)
    assert torch.allclose(ep.rollouts.sample_logp_BC, single.sample_logp_BC, atol=1e-6)


def test_min_new_tokens_holds_for_every_turn(tiny):
    """--min-new-tokens applies to each model turn, as to a single-turn completion: no end-of-turn
    token before it (this model ends about half of its turns earlier without it)."""
    free, forced = Scripted(turns=3), Scripted(turns=3)
    sample(tiny, free, max_new=12)
    sample(tiny, forced, max_new=12, min_new=8)
    lengths = lambda env: [len(turn) for turns in env.seen.values() for turn, _ in turns]  # noqa: E731
    assert min(lengths(free)) < 8  # without it some turns end sooner
    assert min(lengths(forced)) >= 8 and len(lengths(forced)) == 18
