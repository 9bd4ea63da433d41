"""The policy losses (ppo_clip with dual-clip, gspo, gspo_token, cispo): values worked by hand,
the same formulas as verl / TRL compute them (re-derived here on identical random inputs),
gradients (analytic and gradcheck in float64), the rollout-correction weight, and the table."""

import math

import pytest
import torch

from posttrain.objectives import losses
from posttrain.objectives.losses import (POLICY_LOSSES, cispo_loss, clip_range, gspo_loss, gspo_token_loss,
                                         policy_loss)

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ---------------------------------------------------------------- references (verl's / TRL's formulas)


def agg_ref(loss_BT, mask_BT, mode):
    """verl ``core_algos.agg_loss``: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm (/ T)."""
    m = mask_BT.to(loss_BT.dtype)
    if mode == "token-mean":
        return (loss_BT * m).sum() / m.sum()
    if mode == "seq-mean-token-mean":
        seq = (loss_BT * m).sum(-1) / m.sum(-1).clamp(min=1)
        has = (m.sum(-1) > 0).to(loss_BT.dtype)
        return (seq * has).sum() / has.sum()
    return ((loss_BT * m).sum(-1) / loss_BT.shape[-1]).mean()


def verl_vanilla(old, logp, adv_BT, mask, lo, hi, c, mode):
    """verl ``compute_policy_loss_vanilla`` (dual-clip with clip_ratio_c)."""
    ratio = torch.exp(logp - old)
    l1 = -adv_BT * ratio
    l2 = -adv_BT * torch.clamp(ratio, 1 - lo, 1 + hi)
    cl1 = torch.maximum(l1, l2)
    l3 = -adv_BT * c
    cl2 = torch.min(l3, cl1)
    return agg_ref(torch.where(adv_BT < 0, cl2, cl1), mask, mode)


def verl_gspo(old, logp, adv_BT, mask, lo, hi, mode):
    """verl ``compute_policy_loss_gspo``: log s_i,t = logp - sg[logp] + sg[mean_t(logp - old)]."""
    neg_kl = logp - old
    seq = (neg_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    log_s = logp - logp.detach() + seq.detach().unsqueeze(-1)
    s = torch.exp(torch.clamp(log_s, max=10.0))
    l1 = -adv_BT * s
    l2 = -adv_BT * torch.clamp(s, 1 - lo, 1 + hi)
    return agg_ref(torch.maximum(l1, l2), mask, mode)


def verl_cispo(old, logp, adv_BT, mask, lo, hi, mode):
    """verl ``compute_policy_loss_cispo``: -sg[clip(r, 1-lo, 1+hi)] * A * logp."""
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    return agg_ref(-torch.clamp(ratio, 1 - lo, 1 + hi).detach() * adv_BT * logp, mask, mode)


def trl_cispo(old, logp, adv_BT, mask, epsilon_high):
    """TRL ``GRPOTrainer._compute_loss`` with loss_type="cispo" (token level): clamp(coef_1, max=epsilon_high),
    epsilon_high being the weight cap itself (recommended 5.0); TRL's "dapo"-style token mean."""
    coef_1 = torch.exp(logp - old)
    per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv_BT * logp
    return (per_token * mask).sum() / mask.sum()


def inputs(seed, B=4, T=6, spread=0.3, per_token=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=dtype) * 3).requires_grad_(True)
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype) if per_token else torch.randn(B, generator=g, dtype=dtype)
    mask = torch.ones(B, T, dtype=dtype)
    mask[0, 4:] = 0      # a short sequence
    mask[1, 2] = 0       # a hole
    mask[2, :] = 0       # an empty sequence
    return logp, old, adv, mask


# ---------------------------------------------------------------- hand values


def test_ppo_clip_and_dual_clip_by_hand():
    # one sequence, A = -1 on both tokens; ratios 5 and 2; clip 0.2:
    #   plain PPO: max(-A r, -A clip(r)) = max(5, 1.2) = 5 and max(2, 1.2) = 2
    #   dual-clip c = 3: min(5, 3) = 3 (the c bound taken) and min(2, 3) = 2
    logp = torch.log(torch.tensor([[5.0, 2.0]])).requires_grad_(True)
    old = torch.zeros(1, 2)
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 2)
    plain, mp = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert plain.item() == pytest.approx((5 + 2) / 2)
    assert mp["clip_frac"].item() == 0.0       # the unclipped term was taken on both
    dual, md = policy_loss(logp, old, adv, mask, 0.2, 0.2, clip_ratio_c=3.0)
    assert dual.item() == pytest.approx((3 + 2) / 2)
    assert md["clip_frac"].item() == pytest.approx(0.5)   # the c bound counts as clipped
    dual.backward()
    # token 1: bound -A c is a constant, gradient 0; token 2: d(-A r)/dlogp = -A r / 2 tokens = 2 / 2 = 1
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.0])
    # a positive advantage is never dual-clipped: A = +1, r = 5 -> -min(5, 1.2) = -1.2 either way
    pos, _ = policy_loss(logp.detach()[:, :1], old[:, :1], torch.tensor([1.0]), mask[:, :1], 0.2, 0.2, clip_ratio_c=3.0)
    assert pos.item() == pytest.approx(-1.2)


def test_gspo_by_hand():
    # two sequences: log-ratios (0.02, 0.04) and (-0.01 + a masked slot); A = (+1, -1); clip 3e-4 / 4e-4
    #   s_1 = exp(0.03) = 1.030455 > 1.0004: A > 0, clipped term -1.0004 taken (larger than -1.030455)
    #   s_2 = exp(-0.01) = 0.990050 < 0.9997: A < 0, loss = max(0.990050, 0.9997) = 0.9997 (clipped)
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.02, 0.04], [-0.01, 7.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, m = gspo_loss(logp, old, adv, mask, 3e-4, 4e-4, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((-1.0004 + 0.9997) / 2, abs=1e-6)
    assert m["clip_frac"].item() == 1.0
    # ratio/mean: token mean of s_i: (2 * 1.030455 + 0.990050) / 3
    assert m["ratio/mean"].item() == pytest.approx((2 * math.exp(0.03) + math.exp(-0.01)) / 3, rel=1e-6)
    # with a wide clip nothing is clipped: loss = (-s_1 + s_2) / 2, and d/dlogp_1t = -s_1 / (2 sequences * 2 tokens)
    loss, m = gspo_loss(logp, old, adv, mask, 0.5, 0.5, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((-math.exp(0.03) + math.exp(-0.01)) / 2, rel=1e-6)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-math.exp(0.03) / 4] * 2, rel=1e-6)
    assert logp.grad[1].tolist() == pytest.approx([math.exp(-0.01) / 2, 0.0], rel=1e-6)


def test_cispo_by_hand_keeps_the_gradient_of_clipped_tokens():
    # ratios e^1 = 2.718 and e^-2 = 0.135, A = 1, logp = (-1, -2), old = (-2, 0); clip [1 - 0.2, 1 + 0.28]:
    #   weights clip(2.718) = 1.28, clip(0.135) = 0.8: both clipped (clip_frac 1)
    #   loss = -(1.28 * 1 * -1 + 0.8 * 1 * -2) / 2 = (1.28 + 1.6) / 2 = 1.44
    #   gradient: -w A / 2 tokens = (-0.64, -0.4): not 0, unlike PPO's clipped token
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-2.0, 0.0]])
    loss, m = cispo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.28, "token-mean")
    assert loss.item() == pytest.approx(1.44)
    assert m["clip_frac"].item() == 1.0
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.64, -0.4])
    # PPO on the same tokens: token 1 (A > 0, r > 1.28) takes the clipped term, gradient exactly 0;
    # token 2 (A > 0, r < 0.8) keeps the unclipped -A r, gradient -r A / 2 = -e^-2 / 2
    logp2 = logp.detach().requires_grad_(True)
    policy_loss(logp2, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.28)[0].backward()
    assert logp2.grad[0].tolist() == pytest.approx([0.0, -math.exp(-2.0) / 2])


def test_cispo_defaults_cap_the_weight_at_five_with_no_lower_bound():
    # default clip (1, 4): weight = min(r, 5), no lower bound; r = e^3 = 20.1 -> 5, r = e^-3 = 0.0498 kept
    assert POLICY_LOSSES["cispo"].clip == (1.0, 4.0)
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-3.0, 3.0]])
    loss, m = cispo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), *POLICY_LOSSES["cispo"].clip)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-5.0 / 2, -math.exp(-3.0) / 2], rel=1e-6)
    assert m["clip_frac"].item() == 0.5


# ---------------------------------------------------------------- against verl / TRL on identical inputs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_token", [False, True], ids=["adv_B", "adv_BT"])
def test_ppo_clip_dual_equals_verl(mode, per_token):
    logp, old, adv, mask = inputs(1, spread=0.8, per_token=per_token)
    adv_BT = adv if per_token else adv.unsqueeze(-1).expand_as(logp)
    ours, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, mode, clip_ratio_c=3.0)
    ref = verl_vanilla(old, logp, adv_BT, mask, 0.2, 0.28, 3.0, mode)
    g_ours, = torch.autograd.grad(ours, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.05, 0.1)], ids=["paper", "wide"])
def test_gspo_and_gspo_token_equal_verl(mode, clip):
    logp, old, adv, mask = inputs(2, spread=0.05)
    ref = verl_gspo(old, logp, adv.unsqueeze(-1).expand_as(logp), mask, *clip, mode)
    g_ref, = torch.autograd.grad(ref, logp)
    for fn in (gspo_loss, gspo_token_loss):
        ours, _ = fn(logp, old, adv, mask, *clip, mode)
        g, = torch.autograd.grad(ours, logp)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7), fn.__name__
        torch.testing.assert_close(g, g_ref)
    # per-token advantages: gspo_token only
    logp, old, adv, mask = inputs(3, spread=0.05, per_token=True)
    ours, _ = gspo_token_loss(logp, old, adv, mask, *clip, mode)
    ref = verl_gspo(old, logp, adv, mask, *clip, mode)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(ref, logp)[0])


@pytest.mark.parametrize("mode", MODES)
def test_cispo_equals_verl_and_trl(mode):
    logp, old, adv, mask = inputs(4, spread=1.0, per_token=True)
    ours, _ = cispo_loss(logp, old, adv, mask, 0.2, 0.28, mode)
    ref = verl_cispo(old, logp, adv, mask, 0.2, 0.28, mode)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(ref, logp)[0])
    if mode == "token-mean":  # TRL's cispo with its recommended cap 5 == ours with the defaults (1, 4)
        ours, _ = cispo_loss(logp, old, adv, mask, *POLICY_LOSSES["cispo"].clip, mode)
        ref = trl_cispo(old, logp, adv, mask, 5.0)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
        torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(ref, logp)[0])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "gspo_token"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(name, mode):
    # the losses whose gradient is the derivative of their value; clip ranges wide enough that no
    # ratio sits on a kink (0.05 spread vs +-0.5). GSPO's straight-through ratio has its value's
    # derivative only with a uniform weight; cispo's stop-gradient weight never: both checked
    # analytically below.
    logp, old, adv, mask = inputs(5, spread=0.05, dtype=torch.float64)
    weight = torch.rand(logp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    weight = weight if name == "ppo_clip" else None
    fn = POLICY_LOSSES[name].compute
    lp = logp.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, old, adv, mask, 0.5, 0.5, mode, None, weight_BT=weight)[0], (lp,))


def test_stop_gradient_losses_analytic_gradient():
    # token-mean over N valid tokens, weight w_t:
    #   cispo:      d/dlogp_t = -clip(r_t) * A_t * w_t / N      (the clipped ratio is a constant)
    #   gspo_token: d/dlogp_t = -s_i * A_t * w_t / N            (unclipped: wide range)
    logp, old, adv, mask = inputs(11, spread=0.6, per_token=True, dtype=torch.float64)
    w = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    N = mask.sum()
    r = torch.exp(logp.detach() - old)
    loss, _ = cispo_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean", weight_BT=w)
    expected = -torch.clamp(r, 0.8, 1.28) * adv * w * mask / N
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], expected)
    seq_B = ((logp.detach() - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    loss, _ = gspo_token_loss(logp, old, adv, mask, 0.99, 100.0, "token-mean", weight_BT=w)
    expected = -torch.exp(seq_B)[:, None] * adv * w * mask / N
    torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], expected)


def test_on_policy_gspo_gradient_is_length_normalised_reinforce():
    # old == logp: s_i = 1, no clipping; seq-mean-token-mean: d loss / d logp_it = -A_i / (B_nonempty * |y_i|)
    logp, _, adv, mask = inputs(6)
    loss, m = gspo_loss(logp, logp.detach(), adv, mask, 3e-4, 4e-4, "seq-mean-token-mean")
    g, = torch.autograd.grad(loss, logp)
    n_B = mask.sum(-1)
    B_nonempty = float((n_B > 0).sum())
    expected = -adv[:, None] / (B_nonempty * n_B.clamp(min=1)[:, None]) * mask
    torch.testing.assert_close(g, expected)
    assert m["clip_frac"].item() == 0.0 and m["ratio/mean"].item() == 1.0


def test_on_policy_every_loss_has_ppos_gradient():
    # ratio 1 everywhere: each loss's gradient is -A * w / N per valid token (token-mean)
    logp, _, adv, mask = inputs(7)
    w = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    expected = -adv[:, None] * w * mask / mask.sum()
    for name, entry in POLICY_LOSSES.items():
        loss, _ = entry.compute(logp, logp.detach(), adv, mask, *entry.clip, "token-mean", None, weight_BT=w)
        torch.testing.assert_close(torch.autograd.grad(loss, logp)[0], expected, msg=name)


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_weight_multiplies_each_tokens_loss(name):
    # loss(weight w) == reduce(loss_t * w_t): checked against weights folded into per-token copies
    logp, old, adv, mask = inputs(8, spread=0.3)
    w = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2)) * 2
    entry = POLICY_LOSSES[name]
    ones, _ = entry.compute(logp, old, adv, mask, *entry.clip, "seq-mean-token-sum-norm", None)
    weighted, _ = entry.compute(logp, old, adv, mask, *entry.clip, "seq-mean-token-sum-norm", None, weight_BT=w)
    # sum-norm is linear in the per-token loss: with w = 2 everywhere the loss doubles exactly
    twice, _ = entry.compute(logp, old, adv, mask, *entry.clip, "seq-mean-token-sum-norm", None,
                             weight_BT=torch.full_like(logp, 2.0))
    assert twice.item() == pytest.approx(2 * ones.item(), rel=1e-6)
    assert weighted.item() != pytest.approx(ones.item(), rel=1e-3)
    # the weight is a constant: no gradient flows into it
    wg = w.clone().requires_grad_(True)
    out, _ = entry.compute(logp, old, adv, mask, *entry.clip, "token-mean", None, weight_BT=wg)
    out.backward()
    assert wg.grad is None


# ---------------------------------------------------------------- table, refusals, numerics


def test_table_defaults_and_clip_range():
    assert POLICY_LOSSES["ppo_clip"].clip == (0.2, 0.2)
    assert POLICY_LOSSES["gspo"].clip == POLICY_LOSSES["gspo_token"].clip == (3e-4, 4e-4)
    assert clip_range("gspo", None, None) == (3e-4, 4e-4)       # the loss's default
    assert clip_range("ppo_clip", 0.1, None) == (0.1, 0.1)      # a given low clips symmetrically, as before
    assert clip_range("ppo_clip", 0.2, 0.28) == (0.2, 0.28)
    assert clip_range("cispo", None, 2.0) == (1.0, 2.0)         # only the high given: the loss's low


def test_misuse_is_refused():
    logp, old, adv, mask = inputs(0, per_token=True)
    with pytest.raises(ValueError, match="gspo_token"):
        gspo_loss(logp, old, adv, mask)
    for fn in (gspo_loss, gspo_token_loss, cispo_loss):
        with pytest.raises(ValueError, match="dual-clip"):
            fn(logp, old, adv[:, 0], mask, clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logp, old, adv, mask, clip_ratio_c=1.0)


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_padding_may_hold_inf(name):
    # -inf log-probs at masked slots (padding) must leak into neither the loss nor the gradient
    logp, old, adv, mask = inputs(10)
    bad = torch.where(mask == 0, torch.tensor(-math.inf), logp.detach()).requires_grad_(True)
    entry = POLICY_LOSSES[name]
    loss, m = entry.compute(bad, old, adv, mask, *entry.clip, "seq-mean-token-mean", None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(bad.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    assert (bad.grad[mask == 0] == 0).all()


def test_package_exports_the_correction():
    assert losses.ROLLOUT_CORRECTIONS["tis"].masks is False and losses.TIS_CAP == 2.0
    assert losses.MASK_BAND == (0.5, 2.0) and callable(losses.rollout_correction)
