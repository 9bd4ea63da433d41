"""posttrain.objectives.losses.correction: each rollout-mismatch correction against values worked by
hand (in the comments), against verl's and TRL's formulas re-derived here on identical random
inputs, its padding safety, its argument checks, and the gradient of a TIS-weighted policy loss."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.objectives.losses.correction import (
    CORRECTION_LEVELS,
    MASK_BAND,
    ROLLOUT_CORRECTIONS,
    TIS_CAP,
    rollout_correction,
)
from posttrain.objectives.losses.kl import kl_estimate

D = torch.float64
KINDS = ("none", "tis", "seq_tis", "token_mask", "seq_mask")
KEYS = {"mismatch/kl", "mismatch/ratio_max", "mismatch/masked_frac", "mismatch/weight_mean"}
INF, NAN = math.inf, math.nan


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


# Hand-worked batch. Token ratios r = pi_train / mu_sampler:
#   row 0: 3, 0.25, 1.5       row 1: 0.3, 0.55, (padding)       row 2: all padding
# Padding holds garbage in both inputs (nan, +-inf): it must never reach an output.
R = [[3.0, 0.25, 1.5], [0.3, 0.55, 1.0], [1.0, 1.0, 1.0]]
SAMPLE = [[-1.0, -2.0, -0.5], [-0.3, -1.2, INF], [-INF, NAN, INF]]
MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def hand_batch():
    sample = t(SAMPLE)
    train = sample + torch.log(t(R))
    train[1, 2], train[2, 0], train[2, 1], train[2, 2] = NAN, INF, -INF, NAN
    return train, sample, t(MASK)


# k3 = r - 1 - ln r per valid token:
#   r=3:    3 - 1 - 1.0986123 = 0.9013877      r=0.3:  0.3 - 1 + 1.2039728 = 0.5039728
#   r=0.25: 0.25 - 1 + 1.3862944 = 0.6362944  r=0.55: 0.55 - 1 + 0.5978370 = 0.1478370
#   r=1.5:  1.5 - 1 - 0.4054651 = 0.0945349
# sum 2.2840268 over 5 valid tokens: 0.45680536
HAND_KL = 2.2840268 / 5

HAND = {
    # kind: (weight on rows 0-1 (padding: 1), keep, masked_frac, weight_mean)
    "none": ([[1, 1, 1], [1, 1, 1]], [[1, 1, 1], [1, 1, 0]], 0.0, 1.0),
    # min(r, 2): 3 -> 2; mean over the 5 kept: (2 + 0.25 + 1.5 + 0.3 + 0.55) / 5 = 4.6 / 5 = 0.92
    "tis": ([[2.0, 0.25, 1.5], [0.3, 0.55, 1.0]], [[1, 1, 1], [1, 1, 0]], 0.0, 0.92),
    # products: 3 * 0.25 * 1.5 = 1.125 (< 2, kept as is), 0.3 * 0.55 = 0.165;
    # weight mean (3 * 1.125 + 2 * 0.165) / 5 = (3.375 + 0.33) / 5 = 0.741
    "seq_tis": ([[1.125] * 3, [0.165, 0.165, 1.0]], [[1, 1, 1], [1, 1, 0]], 0.0, 0.741),
    # band [0.5, 2]: 3 out, 0.25 out, 1.5 in | 0.3 out, 0.55 in: 3 of 5 removed
    "token_mask": ([[1, 1, 1], [1, 1, 1]], [[0, 0, 1], [0, 1, 0]], 0.6, 1.0),
    # geometric means: 1.125 ** (1/3) = 1.0400 (in the band), sqrt(0.165) = 0.4062 (out): row 1's
    # 2 tokens go, 2 of 5 removed
    "seq_mask": ([[1, 1, 1], [1, 1, 1]], [[1, 1, 1], [0, 0, 0]], 0.4, 1.0),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_against_values_worked_by_hand(kind):
    weight, keep, metrics = rollout_correction(*hand_batch(), kind=kind)
    w_rows, keep_rows, masked_frac, weight_mean = HAND[kind]
    assert weight.dtype == D and keep.dtype == D
    assert close(weight[:2], w_rows) and close(weight[2], [1, 1, 1])  # padding weight 1
    assert close(keep[:2], keep_rows) and close(keep[2], [0, 0, 0])
    assert set(metrics) == KEYS
    assert close(metrics["mismatch/kl"], HAND_KL)
    assert close(metrics["mismatch/ratio_max"], 3.0)
    assert close(metrics["mismatch/masked_frac"], masked_frac)
    assert close(metrics["mismatch/weight_mean"], weight_mean)
    for v in (weight, keep, *metrics.values()):
        assert torch.isfinite(v).all() and not v.requires_grad
    for v in metrics.values():
        assert v.dim() == 0


def test_table_entries():
    assert tuple(ROLLOUT_CORRECTIONS) == KINDS and set(CORRECTION_LEVELS) == set(KINDS)
    assert {k for k, c in ROLLOUT_CORRECTIONS.items() if c.masks} == {"token_mask", "seq_mask"}
    assert all(c.help and "\n" not in c.help for c in ROLLOUT_CORRECTIONS.values())
    assert TIS_CAP == 2.0 and MASK_BAND == (0.5, 2.0)
    # the API's keywords, and "tis" is the default kind
    w, _, _ = rollout_correction(train_logp_BT=t([[0.0]]), sample_logp_BT=t([[-math.log(5)]]), mask_BT=t([[1]]))
    assert close(w, [[2.0]])  # r = 5, capped at 2


def test_cap_and_band_arguments_move_the_result():
    train, sample, mask = hand_batch()
    w, _, _ = rollout_correction(train, sample, mask, "tis", cap=1.2)  # min(r, 1.2)
    assert close(w[:2], [[1.2, 0.25, 1.2], [0.3, 0.55, 1.0]])
    _, keep, m = rollout_correction(train, sample, mask, "token_mask", band=(0.2, 4.0))  # all 5 in
    assert close(keep[:2], [[1, 1, 1], [1, 1, 0]]) and close(m["mismatch/masked_frac"], 0.0)
    _, keep, _ = rollout_correction(train, sample, mask, "seq_mask", band=(0.3, 1.03))  # 1.0400 > 1.03
    assert close(keep[:2], [[0, 0, 0], [1, 1, 0]])


# ------------------------------------------------------------------ verl and TRL, re-derived

def random_batch(seed, B=8, T=12, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    sample = -torch.rand(B, T, generator=g, dtype=D) * 3
    # token noise plus a per-row drift, so whole sequences leave the band too
    train = sample + torch.randn(B, T, generator=g, dtype=D) * spread + torch.randn(B, 1, generator=g, dtype=D) * 0.7
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    sample = torch.where(mask.bool(), sample, t(NAN))  # padding garbage: here nan
    return train, sample, mask


def verl_reference(train, sample, mask, kind, cap=2.0, upper=2.0):
    """verl rollout_corr_helper: compute_rollout_correction_weights (rollout_is token / sequence,
    threshold cap), compute_rollout_rejection_mask (rollout_rs token / geometric, threshold upper,
    lower 1 / upper), compute_offpolicy_metrics k3_kl. Written here from their formulas."""
    m = mask
    log_ratio = torch.nan_to_num(train - sample) * m  # verl receives zeros in padding
    SAFETY = 20.0
    lower = 1.0 / upper
    if kind == "tis":
        w = torch.exp(log_ratio.clamp(-SAFETY, SAFETY)) * m
        return w.clamp(max=cap), m
    if kind == "seq_tis":
        s = (log_ratio * m).sum(-1, keepdim=True)
        w = torch.exp(s.clamp(-SAFETY, SAFETY)).expand_as(log_ratio) * m
        return w.clamp(max=cap), m
    if kind == "token_mask":
        w = torch.exp(log_ratio.clamp(-SAFETY, SAFETY))
        return torch.ones_like(m), m * ((w >= lower) & (w <= upper)).to(D)
    if kind == "seq_mask":
        mean = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        w = torch.exp(mean.clamp(-SAFETY, SAFETY)).expand_as(log_ratio)
        return torch.ones_like(m), m * ((w >= lower) & (w <= upper)).to(D)
    raise AssertionError(kind)


def verl_k3(train, sample, mask):
    lr = torch.nan_to_num(train - sample) * mask
    return ((torch.exp(lr) - lr - 1) * mask).sum() / mask.sum()


def trl_reference(train, sample, mask, mode, cap):
    """TRL GRPOTrainer (vllm_importance_sampling_correction): per_token_logps_diff = (old - sampling)
    * mask; sequence modes sum it; ratio = exp(diff); *_truncate clamps it at the cap, *_mask zeroes
    it outside [clip_min, clip_max]. The result multiplies the per-token loss."""
    diff = torch.nan_to_num(train - sample) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap).expand_as(mask)
    lo, hi = cap
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0).expand_as(mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["tis", "seq_tis", "token_mask", "seq_mask"])
def test_against_verl_on_identical_random_inputs(seed, kind):
    train, sample, mask = random_batch(seed)
    weight, keep, metrics = rollout_correction(train, sample, mask, kind)
    ref_w, ref_keep = verl_reference(train, sample, mask, kind)
    valid = mask.bool()
    assert torch.allclose(weight[valid], ref_w[valid], atol=1e-12, rtol=1e-12)
    assert torch.equal(keep, ref_keep)
    assert close(metrics["mismatch/kl"], verl_k3(train, sample, mask), 1e-12)
    if ROLLOUT_CORRECTIONS[kind].masks:  # the random inputs do exercise the band, both ways
        assert 0 < metrics["mismatch/masked_frac"] < 1


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind, mode", [("tis", "token_truncate"), ("seq_tis", "sequence_truncate")])
def test_against_trl_on_identical_random_inputs(seed, kind, mode):
    """TRL folds the correction into one factor on the loss: weight * keep here."""
    train, sample, mask = random_batch(seed)
    weight, keep, _ = rollout_correction(train, sample, mask, kind, cap=3.0)
    ref = trl_reference(train, sample, mask, mode, 3.0)
    valid = mask.bool()
    assert torch.allclose((weight * keep)[valid], ref[valid], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_token_mask_drops_what_trls_token_mask_drops(seed):
    """TRL's token_mask (like IcePop) keeps r as the weight of the tokens it keeps; posttrain's keeps
    1 (verl's rollout_rs="token" without rollout_is): the same tokens go, the kept ones weigh 1."""
    train, sample, mask = random_batch(seed)
    weight, keep, _ = rollout_correction(train, sample, mask, "token_mask", band=(0.5, 3.0))
    ref = trl_reference(train, sample, mask, "token_mask", (0.5, 3.0))
    valid = mask.bool()
    assert torch.equal(keep[valid] == 1, ref[valid] != 0) and (keep[valid] == 0).any()
    assert torch.equal(weight, torch.ones_like(weight))


def test_seq_mask_is_length_normalised_unlike_the_sequence_product():
    """400 tokens each at r = 0.95: the product 0.95**400 = 1.2e-9 leaves any band (TRL's
    sequence_mask would drop the row for its length), the geometric mean 0.95 does not."""
    T = 400
    sample = torch.full((1, T), -1.0, dtype=D)
    train = sample + math.log(0.95)
    mask = torch.ones(1, T, dtype=D)
    _, keep, m = rollout_correction(train, sample, mask, "seq_mask")
    assert keep.sum() == T and m["mismatch/masked_frac"] == 0
    assert trl_reference(train, sample, mask, "sequence_mask", (0.5, 2.0)).sum() == 0
    # seq_tis: log-product 400 * ln 0.95 = -20.52, clamped at -20 before exp: exp(-20) = 2.06e-9
    w, _, _ = rollout_correction(train, sample, mask, "seq_tis")
    assert close(w[0, 0], math.exp(-20.0), 1e-15) and (w > 0).all()


def test_huge_log_ratios_are_clamped_before_exp():
    # r = e^100 on one token, e^-100 on another; a sequence of 30 tokens at +5 (sum 150)
    sample = torch.zeros(2, 30, dtype=torch.float32)
    train = torch.zeros(2, 30, dtype=torch.float32)
    train[0, 0], train[0, 1], train[1] = 100.0, -100.0, 5.0
    mask = torch.ones(2, 30)
    for kind in KINDS:
        weight, keep, metrics = rollout_correction(train, sample, mask, kind)
        assert torch.isfinite(weight).all() and all(torch.isfinite(v) for v in metrics.values()), kind
        assert metrics["mismatch/ratio_max"] == torch.exp(torch.tensor(20.0))  # e^100 reported as e^20
    w, _, _ = rollout_correction(train, sample, mask, "seq_tis")
    assert close(w[1], [2.0] * 30)  # e^150 -> e^20 -> capped at 2


# ------------------------------------------------------------------------- none, identity, padding

def test_none_returns_ones_and_the_mask_and_still_measures():
    train, sample, mask = hand_batch()
    weight, keep, metrics = rollout_correction(train, sample, mask, "none")
    assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(keep, mask)
    assert close(metrics["mismatch/kl"], HAND_KL) and close(metrics["mismatch/ratio_max"], 3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_log_probs_measure_no_mismatch_and_change_nothing(kind):
    _, sample, mask = random_batch(5)
    weight, keep, m = rollout_correction(sample.clone(), sample, mask, kind)
    valid = mask.bool()
    assert torch.equal(weight[valid], torch.ones_like(weight[valid])) and torch.equal(keep, mask)
    assert m["mismatch/kl"] == 0 and m["mismatch/ratio_max"] == 1
    assert m["mismatch/masked_frac"] == 0 and m["mismatch/weight_mean"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_padding_garbage_never_leaks_and_empty_batches_are_fine(kind):
    # every padding slot holds nan or +-inf in both inputs
    garbage = t([[NAN, INF, -INF, NAN], [-INF, NAN, INF, INF]])
    train = torch.where(t([[1, 1, 0, 0], [0, 0, 0, 0]]).bool(), t([[-1.0, -2.0, 0, 0], [0, 0, 0, 0]]), garbage)
    sample = torch.where(t([[1, 1, 0, 0], [0, 0, 0, 0]]).bool(), t([[-1.2, -2.0, 0, 0], [0, 0, 0, 0]]), garbage.flip(1))
    mask = t([[1, 1, 0, 0], [0, 0, 0, 0]])
    weight, keep, m = rollout_correction(train, sample, mask, kind)
    assert torch.isfinite(weight).all() and torch.isfinite(keep).all()
    assert all(torch.isfinite(v) for v in m.values())
    assert close(keep[1], [0, 0, 0, 0])
    # r = e^0.2 and 1: k3 = (e^0.2 - 1 - 0.2 + 0) / 2 = (1.2214028 - 1.2) / 2 = 0.0107014
    assert close(m["mismatch/kl"], (math.exp(0.2) - 1.2) / 2)
    # nothing valid at all, and nothing at all: neutral metrics, no error
    for shape in ((2, 4), (0, 4)):
        w, k, m = rollout_correction(torch.full(shape, NAN), torch.full(shape, INF), torch.zeros(shape), kind)
        assert torch.equal(k, torch.zeros(shape)) and torch.equal(w, torch.ones(shape))
        assert [float(m[key]) for key in sorted(KEYS)] == [0.0, 0.0, 1.0, 1.0]  # kl, masked, ratio_max, w_mean


def test_kl_is_k3_from_the_samplers_tokens_as_kl_estimate_computes_it():
    train, sample, mask = random_batch(7)
    _, _, m = rollout_correction(train, sample, mask, "none")
    valid = mask.bool()
    ref = kl_estimate(sample[valid], train[valid], "k3").mean()  # pi = sampler, ref = trainer
    assert close(m["mismatch/kl"], ref, 1e-12)
    # and not the other direction (k3 with the roles swapped differs on these inputs)
    assert not close(m["mismatch/kl"], kl_estimate(train[valid], sample[valid], "k3").mean(), 1e-3)


def test_dtypes_follow_the_inputs():
    sample = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    train = torch.tensor([[-1.1, -1.9]])
    w, k, m = rollout_correction(train, sample, torch.ones(1, 2), "tis")
    assert w.dtype == k.dtype == m["mismatch/kl"].dtype == torch.float32
    w, _, _ = rollout_correction(train.bfloat16(), sample, torch.ones(1, 2), "tis")
    assert w.dtype == torch.float32  # at least float32


# ------------------------------------------------------------------------- gradient

def test_tis_weighted_policy_gradient_is_minus_advantage_times_truncated_ratio():
    """d/d logp of sum(w * (-A * logp)) = -A * w, with w = min(r, C) and no gradient through w."""
    train, sample, mask = random_batch(11, B=4, T=6, spread=0.8)
    logp = torch.nan_to_num(train).clone().requires_grad_(True)
    adv_B = t([1.0, -0.5, 2.0, -1.5])
    weight, keep, _ = rollout_correction(logp, sample, mask, "tis")
    assert not weight.requires_grad and not keep.requires_grad
    loss = (weight * keep * (-adv_B[:, None] * logp)).sum()
    (grad,) = torch.autograd.grad(loss, logp)
    r = torch.exp(torch.nan_to_num(train - sample))
    expected = torch.where(mask.bool(), -adv_B[:, None] * torch.minimum(r, t(2.0)), t(0.0))
    assert torch.allclose(grad, expected, atol=1e-12)
    assert (r[mask.bool()] > 2).any() and (r[mask.bool()] < 2).any()  # both sides of the cap exercised
    # had the weight not been detached, tokens below the cap would get -A * (r + r * logp) instead
    w_live = torch.minimum(torch.exp(logp - torch.nan_to_num(sample)), t(2.0))
    (grad_live,) = torch.autograd.grad((w_live * mask * (-adv_B[:, None] * logp)).sum(), logp)
    assert not torch.allclose(grad_live, grad)


def test_weighted_loss_passes_gradcheck_and_masked_tokens_get_no_gradient():
    train, sample, mask = random_batch(13, B=3, T=5, spread=1.0)
    adv_B = t([0.7, -1.2, 0.4])
    weight, keep, _ = rollout_correction(train, sample, mask, "token_mask")
    assert (keep < mask).any()  # some valid tokens are dropped

    def loss_fn(logp):
        return (weight * keep * (-adv_B[:, None] * logp)).sum() / keep.sum()

    logp = torch.nan_to_num(train).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_fn, (logp,))
    (grad,) = torch.autograd.grad(loss_fn(logp), logp)
    assert (grad[keep == 0] == 0).all() and (grad[keep == 1] != 0).all()


# ------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs, word", [
    ({"cap": 0.0}, "cap"), ({"cap": -1.0}, "cap"), ({"cap": NAN}, "cap"), ({"cap": INF}, "cap"),
    ({"band": (0.5, 0.9)}, "band"), ({"band": (1.1, 2.0)}, "band"), ({"band": (0.0, 2.0)}, "band"),
    ({"band": (0.5, INF)}, "band"), ({"band": (0.5,)}, "band"), ({"band": 2.0}, "band"),
    ({"kind": "is"}, "kind"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_arguments_are_checked_for_every_kind(kwargs, word, kind):
    kwargs = {"kind": kind, **kwargs}
    with pytest.raises(ValueError, match=word):
        rollout_correction(t([[-1.0]]), t([[-1.0]]), t([[1]]), **kwargs)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same"):
        rollout_correction(t([[-1.0, -1.0]]), t([[-1.0]]), t([[1]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        rollout_correction(t([-1.0]), t([-1.0]), t([1]))
