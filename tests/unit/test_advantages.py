"""posttrain.objectives.advantages against values worked out by hand (in the comments)."""

import pytest
import torch

from posttrain.objectives.advantages import dr_grpo, gae, grpo, reinforce_pp, rloo, whiten

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


# three groups of 4: a mixed group, a constant group (0.1 is not exact in binary: its centred
# values are rounding residue, which must not be divided by eps), and 1..4
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [1.0, 2.0, 3.0, 4.0]]


# --------------------------------------------------------------------------------------- grpo


def test_grpo_group_scale():
    # group 1: mean 0.5, centred +-0.5, unbiased std sqrt(4*0.25/3) = 0.5773503 -> +-0.8660254
    # group 2: constant -> exactly 0
    # group 3: mean 2.5, centred -1.5 -0.5 0.5 1.5, std sqrt((2.25+0.25+0.25+2.25)/3) = 1.2909944
    #          -> -1.1618950 -0.3872983 0.3872983 1.1618950
    adv = grpo(t(REWARDS))
    a = 0.8660254
    assert close(adv[0], [a, -a, -a, a])
    assert torch.equal(adv[1], torch.zeros(4, dtype=D))
    assert close(adv[2], [-1.1618950, -0.3872983, 0.3872983, 1.1618950])


def test_grpo_batch_scale():
    # all 12 rewards: mean 12.4/12 = 1.0333333; sum of squares 32.04
    # unbiased var = (32.04 - 12 * 1.0333333^2)/11 = 19.2266667/11 = 1.7478788 -> std 1.3220737
    # group 1: +-0.5/1.3220737 = +-0.3781938; group 3: -1.5/1.3220737 = -1.1345813, ...
    adv = grpo(t(REWARDS), scale="batch")
    s = 1.3220737
    assert close(adv[0], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert torch.equal(adv[1], torch.zeros(4, dtype=D))
    assert close(adv[2], [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    assert close(adv[2, 0], -1.1345813) and close(adv[0, 0], 0.3781938)


def test_grpo_none_scale_and_dr_grpo():
    # centred only: +-0.5 | 0 | -1.5 -0.5 0.5 1.5
    expected = t([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-1.5, -0.5, 0.5, 1.5]])
    assert close(grpo(t(REWARDS), scale="none"), expected)
    assert torch.equal(dr_grpo(t(REWARDS)), grpo(t(REWARDS), scale="none"))
    assert torch.equal(grpo(t(REWARDS), scale="none")[1], torch.zeros(4, dtype=D))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_all_constant_groups_give_zero_not_nan(scale):
    adv = grpo(t([[0.3, 0.3, 0.3], [1.0, 1.0, 1.0]]), scale=scale)
    assert torch.equal(adv, torch.zeros(2, 3, dtype=D))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_single_sample_groups(scale):
    # G = 1: torch.std of one element is NaN; the advantage must be 0 instead
    adv = grpo(t([[1.0], [0.0]]), scale=scale)
    assert torch.equal(adv, torch.zeros(2, 1, dtype=D))


def test_grpo_integer_rewards_and_errors():
    # int rewards [[1, 0]]: mean 0.5, std sqrt(0.5) -> +-0.5/0.7071068 = +-0.7071068
    adv = grpo(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.float32 and close(adv, [[0.7071068, -0.7071068]])
    with pytest.raises(ValueError, match="scale"):
        grpo(t(REWARDS), scale="global")
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        grpo(t([1.0, 2.0]))


# --------------------------------------------------------------------------------------- rloo


def test_rloo():
    # [1, 0, 0, 1]: others' mean for a 1 is (2-1)/3 = 1/3 -> 2/3; for a 0: 2/3 -> -2/3
    # [1, 2, 3, 4]: others' means 3, 8/3, 7/3, 2 -> -2, -2/3, 2/3, 2
    # constant group -> exactly 0
    adv = rloo(t(REWARDS))
    assert close(adv[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert torch.equal(adv[1], torch.zeros(4, dtype=D))
    assert close(adv[2], [-2.0, -2 / 3, 2 / 3, 2.0])
    # RLOO = G/(G-1) * (r - mean): a check independent of the formula above
    assert close(adv, 4 / 3 * grpo(t(REWARDS), scale="none"))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="G >= 2"):
        rloo(t([[1.0], [2.0]]))


# --------------------------------------------------------------------------------------- whiten


def test_whiten_masked():
    # valid 2, 4, 6: mean 4, unbiased var (4+0+4)/2 = 4, std 2 -> -1, 0, 1; the masked 100 -> 0
    x, m = t([[2.0, 4.0, 6.0, 100.0]]), t([[1, 1, 1, 0]])
    assert close(whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: 3, 4, 5
    assert close(whiten(x, m, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])


def test_whiten_no_mask_and_degenerate():
    assert close(whiten(t([2.0, 4.0, 6.0])), [-1.0, 0.0, 1.0])
    # one valid entry: centred to 0, no NaN; none valid: all 0
    assert torch.equal(whiten(t([5.0, 7.0]), t([1, 0])), t([0.0, 0.0]))
    assert torch.equal(whiten(t([5.0, 7.0]), t([0, 0])), t([0.0, 0.0]))
    assert torch.equal(whiten(t([5.0, 7.0]), t([0, 0]), shift_mean=False), t([0.0, 0.0]))


# --------------------------------------------------------------------------------------- reinforce++

# row 0: one prompt token then 3 completion tokens; row 1: a prompt token, 2 completion tokens, pad.
# KL values at masked slots are garbage (9) and must not count.
RPP_MASK = [[0, 1, 1, 1], [0, 1, 1, 0]]
RPP_KL = [[9.0, 0.1, 0.2, 0.3], [9.0, 0.5, 0.5, 9.0]]


def test_reinforce_pp_gamma_1():
    # token rewards -0.1*kl: row 0 [-, -0.01, -0.02, -0.03 + 1 = 0.97]; row 1 [-, -0.05, -0.05 + 0, -]
    # returns-to-go: row 0 [-, 0.94, 0.95, 0.97]; row 1 [-, -0.10, -0.05, -]
    # whiten the 5 valid values: mean 2.71/5 = 0.542; deviations 0.398 0.408 0.428 -0.642 -0.592
    # unbiased var 1.27068/4 = 0.31767, std 0.5636222
    # -> 0.7061468 0.7238891 0.7593739 -1.1390609 -1.0503489
    adv = reinforce_pp(t([1.0, 0.0]), t(RPP_KL), t(RPP_MASK), kl_coef=0.1)
    assert close(adv, [[0.0, 0.7061468, 0.7238891, 0.7593739], [0.0, -1.1390609, -1.0503489, 0.0]])


def test_reinforce_pp_gamma_half():
    # row 0: G3 = 0.97, G2 = -0.02 + 0.5*0.97 = 0.465, G1 = -0.01 + 0.5*0.465 = 0.2225
    # row 1: G2 = -0.05, G1 = -0.05 + 0.5*(-0.05) = -0.075
    # whitened (mean 0.30250, std 0.4264164): -0.1946337 0.3672552 1.5373745 | -0.8839614 -0.8260347
    adv = reinforce_pp(t([1.0, 0.0]), t(RPP_KL), t(RPP_MASK), kl_coef=0.1, gamma=0.5)
    assert close(adv, [[0.0, -0.1946337, 0.3672552, 1.5373745], [0.0, -0.8839614, -0.8260347, 0.0]])


def test_reinforce_pp_group_baseline():
    # 4 one-token sequences in 2 groups of 2, no KL; rewards [1, 0, 3, 3]
    # baseline: [1-0.5, 0-0.5, 3-3, 3-3] = [0.5, -0.5, 0, 0]; mean 0, var 0.5/3, std 0.4082483
    #   -> [1.2247449, -1.2247449, 0, 0]
    # without it: [1, 0, 3, 3], mean 1.75, var (0.5625+3.0625+1.5625+1.5625)/3 = 2.25, std 1.5
    #   -> [-0.5, -1.1666667, 0.8333333, 0.8333333]
    r, kl, m = t([1.0, 0.0, 3.0, 3.0]), torch.zeros(4, 1, dtype=D), torch.ones(4, 1)
    assert close(reinforce_pp(r, kl, m, kl_coef=0.1, group_size=2)[:, 0], [1.2247449, -1.2247449, 0.0, 0.0])
    assert close(reinforce_pp(r, kl, m, kl_coef=0.1)[:, 0], [-0.5, -1.1666667, 0.8333333, 0.8333333])
    with pytest.raises(ValueError, match="groups"):
        reinforce_pp(r, kl, m, kl_coef=0.1, group_size=3)


def test_reinforce_pp_skips_masked_holes_and_empty_rows():
    # row 0 mask [1, 1, 0, 1] (a hole: e.g. tool output), reward 1, no KL, gamma 0.5:
    #   G3 = 1, the hole is skipped, G1 = 0.5*1 = 0.5, G0 = 0.25
    # row 1 has no valid token: contributes nothing, stays 0, no NaN
    # whiten [0.25, 0.5, 1]: mean 0.5833333, std 0.3818813 -> -0.8728716 -0.2182179 1.0910895
    adv = reinforce_pp(t([1.0, 5.0]), torch.zeros(2, 4, dtype=D), t([[1, 1, 0, 1], [0, 0, 0, 0]]),
                       kl_coef=0.1, gamma=0.5)
    assert close(adv, [[-0.8728716, -0.2182179, 0.0, 1.0910895], [0.0] * 4])


# --------------------------------------------------------------------------------------- gae


def test_gae_hand_computed():
    # mask [0, 1, 1, 1] (a prompt token first), rewards [0, 0, 0, 1], values [9, 0.5, 0.6, 0.7]
    # gamma 1, lam 0.95; bootstrap 0 after the last token:
    #   t3: delta = 1 + 0 - 0.7 = 0.3                   A3 = 0.3
    #   t2: delta = 0 + 0.7 - 0.6 = 0.1                 A2 = 0.1 + 0.95*0.3 = 0.385
    #   t1: delta = 0 + 0.6 - 0.5 = 0.1                 A1 = 0.1 + 0.95*0.385 = 0.46575
    # returns = A + V = [0, 0.96575, 0.985, 1.0]
    adv, ret = gae(t([[0.0, 0.0, 0.0, 1.0]]), t([[9.0, 0.5, 0.6, 0.7]]), t([[0, 1, 1, 1]]), gamma=1.0, lam=0.95)
    assert close(adv, [[0.0, 0.46575, 0.385, 0.3]])
    assert close(ret, [[0.0, 0.96575, 0.985, 1.0]])


def test_gae_discounted():
    # gamma 0.9, lam 0.5 (gamma*lam = 0.45), same data:
    #   t3: 1 - 0.7 = 0.3; t2: 0.9*0.7 - 0.6 = 0.03 + 0.45*0.3 = 0.165; t1: 0.9*0.6 - 0.5 = 0.04 + 0.45*0.165 = 0.11425
    adv, _ = gae(t([[0.0, 0.0, 0.0, 1.0]]), t([[9.0, 0.5, 0.6, 0.7]]), t([[0, 1, 1, 1]]), gamma=0.9, lam=0.5)
    assert close(adv, [[0.0, 0.11425, 0.165, 0.3]])


def test_gae_lambda_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of future rewards) - V_t = 1 - V_t, returns = 1 on every valid token
    adv, ret = gae(t([[0.0, 0.0, 0.0, 1.0]]), t([[9.0, 0.5, 0.6, 0.7]]), t([[0, 1, 1, 1]]), gamma=1.0, lam=1.0)
    assert close(adv, [[0.0, 0.5, 0.4, 0.3]]) and close(ret, [[0.0, 1.0, 1.0, 1.0]])


def test_gae_trailing_padding_is_not_bootstrapped():
    # mask [1, 1, 0]: the padded value 5.0 and reward 7 must not count
    #   t1: delta = 1 + 0 - 0.4 = 0.6; t0: delta = 0 + 0.4 - 0.2 = 0.2, A0 = 0.2 + 0.95*0.6 = 0.77
    adv, ret = gae(t([[0.0, 1.0, 7.0]]), t([[0.2, 0.4, 5.0]]), t([[1, 1, 0]]))
    assert close(adv, [[0.77, 0.6, 0.0]]) and close(ret, [[0.97, 1.0, 0.0]])


def test_gae_skips_holes_and_handles_empty_rows():
    # row 0 mask [1, 0, 1], gamma = lam = 1: t2: 1 - 0.4 = 0.6; hole skipped; t0: 0.4 - 0.2 + 0.6 = 0.8
    # row 1: no valid token -> zeros
    adv, ret = gae(t([[0.0, 5.0, 1.0], [1.0, 1.0, 1.0]]), t([[0.2, 9.0, 0.4], [1.0, 2.0, 3.0]]),
                   t([[1, 0, 1], [0, 0, 0]]), gamma=1.0, lam=1.0)
    assert close(adv, [[0.8, 0.0, 0.6], [0.0, 0.0, 0.0]]) and close(ret, [[1.0, 0.0, 1.0], [0.0] * 3])


def test_gae_values_are_constants():
    values = t([[0.5, 0.6]]).requires_grad_(True)
    adv, ret = gae(t([[0.0, 1.0]]), values, t([[1, 1]]))
    assert not adv.requires_grad and not ret.requires_grad
