"""SimPO, ORPO and KTO as pure functions: values worked by hand, the same formulas as TRL computes
them (CPOTrainer loss_type="simpo", ORPOTrainer odds_ratio_loss + NLL, KTOTrainer kto_loss),
re-derived here on identical inputs, gradients checked in float64, and the trainer's table of
loss types (what each needs)."""

import math
import typing

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms.dpo import DPOConfig
from posttrain.algorithms.dpo_losses import LOSS_TYPES
from posttrain.objectives.losses import dpo_loss, kto_loss, log_odds, orpo_loss, simpo_loss

T = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


# ----------------------------------------------------------------------------------------- by hand


def test_simpo_by_hand():
    # beta 2, gamma 1; pair 1: a_c - a_r = -1 - (-2) = 1 -> z = 2*1 - 1 = 1 -> log(1 + e^-1) = 0.31326169
    # pair 2: -2 - (-1.5) = -0.5 -> z = 2*(-0.5) - 1 = -2 -> log(1 + e^2) = 2.12692801; mean 1.22009485
    loss, m = simpo_loss(T(-1.0, -2.0), T(-2.0, -1.5), beta=2.0, gamma=1.0)
    assert float(loss) == pytest.approx(1.22009485, abs=1e-7)
    assert float(m["rewards/chosen"]) == pytest.approx(-3.0)  # 2 * mean(-1, -2)
    assert float(m["rewards/accuracy"]) == 0.5  # -2 > -4 yes; -4 > -3 no
    # label smoothing 0.1 on pair 1 alone: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9*0.31326169 + 0.1*1.31326169
    loss, _ = simpo_loss(T(-1.0), T(-2.0), beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.9 * 0.31326169 + 0.1 * 1.31326169, abs=1e-7)


def test_orpo_by_hand():
    # a_c = log 0.5: odds 1, log odds 0; a_r = log 0.2: odds 0.25, log odds -1.38629436
    # L_OR = -logsigmoid(1.38629436) = log(1 + 1/4) = 0.22314355; NLL = -log 0.5 = 0.69314718
    # loss = 0.69314718 + 0.1 * 0.22314355 = 0.71546154
    loss, m = orpo_loss(T(math.log(0.5)), T(math.log(0.2)), lam=0.1)
    assert float(loss) == pytest.approx(0.71546154, abs=1e-7)
    assert float(m["nll"]) == pytest.approx(0.69314718, abs=1e-7)
    assert float(m["or_loss"]) == pytest.approx(0.22314355, abs=1e-7)
    assert float(m["log_odds_ratio"]) == pytest.approx(math.log(4), abs=1e-7)
    assert float(m["rewards/accuracy"]) == 1.0
    assert float(log_odds(T(math.log(0.8)))) == pytest.approx(math.log(4), abs=1e-12)  # 0.8 / 0.2


def test_kto_by_hand():
    # rewards r = policy - ref = [2, -1, 4], labels [desirable, undesirable, undesirable]
    # KL pairs: policy - ref = [0.5, 1.5] -> z0 = max(0, 1.0) = 1; beta 0.1, w_D 1, w_U 2
    # desirable r=2:    1 - sigmoid(0.1 * (2 - 1))  = 1 - sigmoid(0.1)  = 0.47502081
    # undesirable r=-1: 1 - sigmoid(0.1 * (1 + 1))  = 1 - sigmoid(0.2)  = 0.45016600
    # undesirable r=4:  1 - sigmoid(0.1 * (1 - 4))  = 1 - sigmoid(-0.3) = 0.57444252
    # loss = (0.47502081 + 2 * 0.45016600 + 2 * 0.57444252) / 3 = 0.84141262
    pol, ref = T(-3.0, -6.0, -1.0), T(-5.0, -5.0, -5.0)
    loss, m = kto_loss(pol, ref, T(-2.0, -1.0), T(-2.5, -2.5), torch.tensor([True, False, False]), beta=0.1,
                       desirable_weight=1.0, undesirable_weight=2.0)
    assert float(loss) == pytest.approx(0.84141262, abs=1e-7)
    assert float(m["kto/kl"]) == 1.0
    assert float(m["rewards/chosen"]) == pytest.approx(0.2) and float(m["rewards/rejected"]) == pytest.approx(0.15)
    assert float(m["rewards/accuracy"]) == pytest.approx(2 / 3)  # 2 > 1 yes; -1 < 1 yes; 4 < 1 no
    # a negative KL estimate is clamped to 0: z0 = max(0, -1) = 0; desirable r=2: 1 - sigmoid(0.2)
    loss, m = kto_loss(T(-3.0), T(-5.0), T(-3.0), T(-2.0), torch.tensor([True]), beta=0.1)
    assert float(m["kto/kl"]) == 0.0 and float(loss) == pytest.approx(0.45016600, abs=1e-7)


# ----------------------------------------------------------------------------------------- vs TRL


def _trl_cpo_simpo(c, r, beta, simpo_gamma, label_smoothing):
    """TRL CPOTrainer.cpo_loss, loss_type="simpo" (with cpo_alpha=0: no NLL term)."""
    logits = c - r
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses.mean()


def _trl_orpo(chosen_token_logps_BT, rejected_token_logps_BT, beta):
    """TRL ORPOTrainer: NLL = cross entropy, token mean over the chosen tokens; odds_ratio_loss on
    average log-probs returns beta * logsigmoid(log_odds); loss = nll - mean of that."""
    nll = -chosen_token_logps_BT.mean()
    c, r = chosen_token_logps_BT.mean(1), rejected_token_logps_BT.mean(1)
    log_odds_ = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    ratio = F.logsigmoid(log_odds_)
    losses = beta * ratio
    return nll - losses.mean()


def _trl_kto(pc, pr, pkl, rc, rr, rkl, beta, desirable_weight, undesirable_weight):
    """TRL KTOTrainer.kto_loss (chosen = desirable, rejected = undesirable), then losses.nanmean()."""
    kl = (pkl - rkl).mean().detach().clamp(min=0)
    chosen_losses = 1 - F.sigmoid(beta * ((pc - rc) - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - (pr - rr)))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean()


def test_simpo_equals_trl_cpo():
    g = torch.Generator().manual_seed(0)
    c, r = -torch.rand(16, generator=g, dtype=torch.float64) * 3, -torch.rand(16, generator=g, dtype=torch.float64) * 3
    for beta, gamma, e in ((2.0, 1.0, 0.0), (2.5, 1.375, 0.0), (0.1, 0.5, 0.2)):
        ours, _ = simpo_loss(c, r, beta, gamma, e)
        assert torch.allclose(ours, _trl_cpo_simpo(c, r, beta, gamma, e), atol=1e-13, rtol=0)


def test_orpo_equals_trl():
    g = torch.Generator().manual_seed(1)
    ct, rt = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 2, -torch.rand(6, 9, generator=g, dtype=torch.float64) * 2
    ours, _ = orpo_loss(ct.mean(1), rt.mean(1), lam=0.1)  # equal lengths: TRL's token-mean NLL = the mean of means
    assert torch.allclose(ours, _trl_orpo(ct, rt, 0.1), atol=1e-13, rtol=0)


def test_kto_equals_trl():
    g = torch.Generator().manual_seed(2)
    pol, ref = -torch.rand(10, generator=g, dtype=torch.float64) * 20, -torch.rand(10, generator=g, dtype=torch.float64) * 20
    pkl, rkl = pol.flip(0) + 3.0, pol.flip(0)  # KL estimate 3 > 0
    lab = torch.tensor([True, False] * 5)
    for wd, wu in ((1.0, 1.0), (1.0, 1.33)):
        ours, _ = kto_loss(pol, ref, pkl, rkl, lab, 0.1, wd, wu)
        trl = _trl_kto(pol[lab], pol[~lab], pkl, ref[lab], ref[~lab], rkl, 0.1, wd, wu)
        assert abs(float(ours - trl)) < 1e-13, float(ours - trl)


# ----------------------------------------------------------------------------------------- gradients


def test_gradients():
    g = torch.Generator().manual_seed(3)
    c = (-torch.rand(5, generator=g, dtype=torch.float64) - 0.1).requires_grad_()
    r = (-torch.rand(5, generator=g, dtype=torch.float64) - 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, 2.0, 1.0, 0.1)[0], (c, r))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, 0.1)[0], (c, r))
    ref, lab = torch.randn(5, generator=g, dtype=torch.float64), torch.tensor([True, False, True, False, False])
    kl_ref = torch.randn(5, generator=g, dtype=torch.float64)
    pkl = (kl_ref + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: kto_loss(p, ref, pkl.detach(), kl_ref, lab, 0.1, 1.0, 1.5)[0], (c,))
    # z0 is a stop-gradient (paper, TRL): no gradient reaches the KL pairs' log-probs
    kto_loss(c, ref, pkl, kl_ref, lab, 0.1)[0].backward()
    assert pkl.grad is None or float(pkl.grad.abs().max()) == 0.0
    # analytic: d/dr of w(1 - sigmoid(beta * s * (r - z0))) = -w * beta * s * sig * (1 - sig) / B
    p1 = T(-1.0).requires_grad_()
    kto_loss(p1, T(-3.0), T(0.0), T(0.0), torch.tensor([False]), beta=0.1, undesirable_weight=2.0)[0].backward()
    sig = 1 / (1 + math.exp(0.2))  # sigmoid(0.1 * -1 * (2 - 0))
    assert float(p1.grad) == pytest.approx(2.0 * 0.1 * sig * (1 - sig), abs=1e-12)


# ----------------------------------------------------------------------------------------- the table


def test_table_covers_every_loss_type_and_says_what_each_needs():
    assert set(typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"])) == set(LOSS_TYPES)
    assert {n for n, e in LOSS_TYPES.items() if not e.reference} == {"simpo", "orpo"}
    assert {n for n, e in LOSS_TYPES.items() if e.normalise} == {"ipo", "simpo", "orpo"}
    assert {n for n, e in LOSS_TYPES.items() if e.unpaired} == {"kto"}
    assert [n for n, e in LOSS_TYPES.items() if e.nll] == ["orpo"] and LOSS_TYPES["orpo"].beta is None
    assert LOSS_TYPES["simpo"].beta == 2.0 and LOSS_TYPES["kto"].beta == 0.1


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust"])
def test_table_dpo_entries_equal_dpo_loss(name):
    g = torch.Generator().manual_seed(4)
    lp, ref = -torch.rand(7, 2, generator=g) * 9, -torch.rand(7, 2, generator=g) * 9
    e = 0.1 if name in ("sigmoid", "robust") else 0.0
    cfg = DPOConfig(data="p.jsonl", loss_type=name, label_smoothing=e)
    got, gm = LOSS_TYPES[name].compute(lp, ref, None, cfg)
    want, wm = dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], 0.1, name, e)
    assert torch.equal(got, want) and all(torch.equal(gm[k], wm[k]) for k in wm)
