"""posttrain.objectives.losses: every function and mode against values worked out by hand (in the comments)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from posttrain.objectives.losses import (
    dpo_loss,
    entropy_bonus,
    kl_estimate,
    kl_penalty,
    masked_mean,
    policy_loss,
    reduce,
    value_loss,
)

D = torch.float64


def t(x, dtype=D, **kw):
    return torch.tensor(x, dtype=dtype, **kw)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


# --------------------------------------------------------------------------------------- reduce

X = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]]
M = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # the last row has no valid token


@pytest.mark.parametrize(
    "mode, max_len, expected",
    [
        # valid tokens 1, 2 | 5, 6, 7, 8 | none: (1+2+5+6+7+8)/6 = 29/6
        ("token-mean", None, 29 / 6),
        # per sequence 1.5 and 6.5; the empty row is left out: (1.5 + 6.5)/2 = 4
        ("seq-mean-token-mean", None, 4.0),
        # 29 / (B*T) = 29 / (3*4)
        ("seq-mean-token-sum-norm", None, 29 / 12),
        # 29 / (3*8)
        ("seq-mean-token-sum-norm", 8, 29 / 24),
    ],
)
def test_reduce_modes(mode, max_len, expected):
    assert close(reduce(t(X), t(M), mode, max_len), expected)


def test_reduce_bool_mask_and_masked_mean():
    assert close(reduce(t(X), t(M).bool(), "token-mean"), 29 / 6)
    assert close(masked_mean(t(X), t(M)), 29 / 6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_reduce_all_masked_is_zero_with_zero_grad(mode):
    x = t(X, requires_grad=True)
    out = reduce(x, torch.zeros(3, 4), mode)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x.grad, torch.zeros(3, 4, dtype=D))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_reduce_nan_in_masked_slot_does_not_leak(mode):
    x = t(X)
    x[2, 0] = float("nan")
    x[0, 3] = float("inf")
    x.requires_grad_(True)
    out = reduce(x, t(M), mode)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert close(out, reduce(t(X), t(M), mode))


def test_reduce_token_mean_gradient():
    # d/dx sum(x*m)/sum(m) = m/6
    x = t(X, requires_grad=True)
    reduce(x, t(M), "token-mean").backward()
    assert close(x.grad, t(M) / 6)


def test_reduce_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown mode"):
        reduce(t(X), t(M), "mean")
    with pytest.raises(ValueError, match="shape"):
        reduce(t(X), t(M)[:, :2])


# --------------------------------------------------------------------------------------- kl

LOGP = [[-1.0, -2.0, -0.5]]
REF = [[-2.0, -1.0, -0.5]]  # d = ref - logp = [-1, 1, 0]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [1.0, -1.0, 0.0]),  # -d
        ("k2", [0.5, 0.5, 0.0]),  # d^2/2
        # exp(d) - d - 1: e^-1 + 1 - 1 = 0.36787944, e - 1 - 1 = 0.71828183, 0
        ("k3", [math.exp(-1), math.e - 2, 0.0]),
    ],
)
def test_kl_estimate(kind, expected):
    assert close(kl_estimate(t(LOGP), t(REF), kind), t([expected]))


def test_kl_k3_is_nonnegative_and_zero_on_equal():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert (kl_estimate(a, b, "k3") >= 0).all() and (kl_estimate(a, b, "k2") >= 0).all()
    assert torch.equal(kl_estimate(a, a, "k3"), torch.zeros(4, 9))


def test_kl_estimate_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        kl_estimate(t(LOGP), t(REF), "k4")


def test_kl_penalty():
    # k3 over the first two tokens (third masked): (0.36787944 + 0.71828183)/2 = 0.54308064
    loss, metrics = kl_penalty(t(LOGP), t(REF), t([[1, 1, 0]]), beta=0.1)
    assert close(loss, 0.1 * (math.exp(-1) + math.e - 2) / 2)
    assert close(metrics["kl"], (math.exp(-1) + math.e - 2) / 2)
    # seq-mean-token-sum-norm with max_len 4: (0.36787944 + 0.71828183) / (1*4)
    loss, _ = kl_penalty(t(LOGP), t(REF), t([[1, 1, 0]]), beta=1.0, reduce="seq-mean-token-sum-norm", max_len=4)
    assert close(loss, (math.exp(-1) + math.e - 2) / 4)


def test_kl_penalty_gradient_k3():
    # d k3 / d logp = d/dlogp [exp(ref-logp) - (ref-logp) - 1] = 1 - exp(ref - logp)
    logp = t(LOGP, requires_grad=True)
    loss, _ = kl_penalty(logp, t(REF), t([[1, 1, 1]]), beta=1.0)
    loss.backward()
    assert close(logp.grad, (1 - torch.exp(t(REF) - t(LOGP))) / 3)


# --------------------------------------------------------------------------------------- policy

# ratios r = exp(logp - old) with old = 0. Row 0 has advantage +1, row 1 advantage -1; row 1's last
# token is masked (its ratio 3.0 would count as clipped if it leaked in).
R = [[1.5, 1.1, 0.5], [0.5, 1.5, 3.0]]
PM = [[1, 1, 1], [1, 1, 0]]
ADV_B = [1.0, -1.0]


def _policy(adv=ADV_B, **kw):
    logp = torch.log(t(R)).requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.zeros(2, 3, dtype=D), t(adv), t(PM), **kw)
    return logp, loss, metrics


def test_policy_loss_token_mean_symmetric_clip():
    # clip 0.2 -> [0.8, 1.2]; per token -min(r*A, clip(r)*A):
    #   A=+1: r=1.5 -> -min(1.5, 1.2) = -1.2 (clipped) | 1.1 -> -1.1 | 0.5 -> -min(0.5, 0.8) = -0.5
    #   A=-1: r=0.5 -> -min(-0.5, -0.8) = 0.8 (clipped) | 1.5 -> -min(-1.5, -1.2) = 1.5 | masked
    # token-mean = (-1.2 - 1.1 - 0.5 + 0.8 + 1.5)/5 = -0.1; clip_frac = 2/5
    # ratio/mean = (1.5 + 1.1 + 0.5 + 0.5 + 1.5)/5 = 1.02
    # approx_kl = mean of (r-1) - log r = (0.0945349 + 0.0046898 + 0.1931472 + 0.1931472 + 0.0945349)/5
    #           = 0.5800540/5 = 0.1160108
    logp, loss, m = _policy()
    assert close(loss, -0.1)
    assert close(m["clip_frac"], 0.4)
    assert close(m["ratio/mean"], 1.02)
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 1.1, 0.5, 0.5, 1.5)) / 5
    assert close(m["approx_kl"], k3) and close(k3, 0.1160108)
    # gradient: clipped tokens get 0; others -A*r/5; masked 0
    loss.backward()
    assert close(logp.grad, t([[0.0, -1.1 / 5, -0.5 / 5], [0.0, 1.5 / 5, 0.0]]))


def test_policy_loss_clip_higher():
    # clip_high 0.28: r=1.5 with A=+1 -> -1.28; the rest as in the symmetric case:
    # (-1.28 - 1.1 - 0.5 + 0.8 + 1.5)/5 = -0.116; still 2 clipped tokens
    _, loss, m = _policy(clip_high=0.28)
    assert close(loss, -0.116) and close(m["clip_frac"], 0.4)
    # clip_high 0.6: 1.5 < 1.6 is no longer clipped: (-1.5 - 1.1 - 0.5 + 0.8 + 1.5)/5 = -0.16, 1/5 clipped
    _, loss, m = _policy(clip_high=0.6)
    assert close(loss, -0.16) and close(m["clip_frac"], 0.2)


def test_policy_loss_clip_low_only_binds_negative_advantages():
    # clip_low 0.6 -> lower bound 0.4: A=-1, r=0.5 is no longer clipped: loss 0.5 instead of 0.8.
    # clip_high stays 0.2: (-1.2 - 1.1 - 0.5 + 0.5 + 1.5)/5 = -0.16
    _, loss, m = _policy(clip_low=0.6, clip_high=0.2)
    assert close(loss, -0.16) and close(m["clip_frac"], 0.2)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # rows: (-1.2 - 1.1 - 0.5)/3 = -0.933333 and (0.8 + 1.5)/2 = 1.15 -> mean 0.108333
        ("seq-mean-token-mean", (-2.8 / 3 + 1.15) / 2),
        # sum -0.5 / (B*T = 6)
        ("seq-mean-token-sum-norm", -0.5 / 6),
    ],
)
def test_policy_loss_reductions(mode, expected):
    _, loss, _ = _policy(reduce=mode)
    assert close(loss, expected)


def test_policy_loss_per_token_advantage_equals_broadcast():
    _, loss_b, _ = _policy()
    _, loss_bt, _ = _policy(adv=[[1.0] * 3, [-1.0] * 3])
    assert close(loss_b, loss_bt)
    # a per-token advantage that differs by token: only row 0 token 1 changes, A=2 and r=1.1:
    # -min(2.2, 2.4) = -2.2 instead of -1.1 -> (-0.5 - 1.1)/5 = -0.32
    _, loss, _ = _policy(adv=[[1.0, 2.0, 1.0], [-1.0] * 3])
    assert close(loss, -0.32)


def test_policy_loss_masked_garbage_stays_finite():
    logp = torch.tensor([[0.0, 0.0], [0.0, 1000.0]], requires_grad=True)  # exp(1000) = inf in float32
    loss, m = policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), torch.tensor([[1, 1], [1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(m["ratio/mean"])
    assert close(loss, -1.0)  # r = 1 everywhere valid, A = 1


def test_policy_loss_all_masked():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and m["clip_frac"].item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))


def test_policy_loss_shape_errors():
    with pytest.raises(ValueError, match="adv"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="same"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3))


def test_entropy_bonus():
    # valid entropies 1, 3, 4 -> token-mean 8/3; loss = -0.01 * 8/3
    ent = t([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    loss, m = entropy_bonus(ent, t([[1, 0], [1, 1]]), coef=0.01)
    assert close(loss, -0.01 * 8 / 3) and close(m["entropy"], 8 / 3)
    loss.backward()
    assert close(ent.grad, t([[-0.01 / 3, 0.0], [-0.01 / 3, -0.01 / 3]]))


# --------------------------------------------------------------------------------------- value

V_NEW = [[0.5, 0.1, 1.0, 7.0]]
V_OLD = [[0.0, 0.0, 0.0, 0.0]]
RET = [[1.0, 1.0, 0.5, 0.0]]
VM = [[1, 1, 1, 0]]


def test_value_loss_clipped():
    # clip 0.2, old 0 -> clipped value = clamp(v, -0.2, 0.2):
    #   v=0.5, R=1:   (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped, larger)
    #   v=0.1, R=1:   0.81 vs 0.81 (inside the clip range) -> 0.81
    #   v=1.0, R=0.5: 0.25 vs (0.2-0.5)^2 = 0.09 -> 0.25
    # loss = 0.5 * (0.64 + 0.81 + 0.25)/3 = 0.283333; value_clip_frac = 1/3
    v = t(V_NEW, requires_grad=True)
    loss, m = value_loss(v, t(V_OLD), t(RET), t(VM), clip=0.2)
    assert close(loss, 0.5 * 1.7 / 3)
    assert close(m["value_clip_frac"], 1 / 3)
    assert close(m["value/mean"], 1.6 / 3)
    # gradient 0.5 * 2 * (v - R)/3 where the unclipped term counts; 0 where the clamp saturates
    loss.backward()
    assert close(v.grad, t([[0.0, (0.1 - 1.0) / 3, (1.0 - 0.5) / 3, 0.0]]))


def test_value_loss_unclipped():
    # 0.5 * (0.25 + 0.81 + 0.25)/3
    loss, m = value_loss(t(V_NEW), t(V_OLD), t(RET), t(VM), clip=None)
    assert close(loss, 0.5 * 1.31 / 3) and m["value_clip_frac"].item() == 0.0


def test_value_loss_all_masked():
    loss, m = value_loss(t(V_NEW), t(V_OLD), t(RET), torch.zeros(1, 4))
    assert loss.item() == 0.0 and not torch.isnan(m["value/mean"])


# --------------------------------------------------------------------------------------- dpo

# two pairs; beta 0.5
#   pair 1: pc=-1, rc=-2 (chosen logratio +1), pr=-3, rr=-2 (rejected -1): h = 2, beta*h = 1
#   pair 2: pc=-2, rc=-1 (-1), pr=-2, rr=-2 (0): h = -1, beta*h = -0.5
PC, PR, RC, RR = [-1.0, -2.0], [-3.0, -2.0], [-2.0, -1.0], [-2.0, -2.0]


def sp(x):  # softplus: -logsigmoid(-x)
    return math.log1p(math.exp(x))


def _dpo(**kw):
    return dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, **kw)


@pytest.mark.parametrize(
    "kw, expected",
    [
        # -logsigmoid(beta*h) = softplus(-beta*h): (sp(-1) + sp(0.5))/2 = (0.31326169 + 0.97407698)/2
        ({}, (sp(-1) + sp(0.5)) / 2),
        # e=0.1: 0.9*sp(-1) + 0.1*sp(1) = 0.41326169; 0.9*sp(0.5) + 0.1*sp(-0.5) = 0.92407698
        ({"label_smoothing": 0.1}, (0.41326169 + 0.92407698) / 2),
        # (h - 1/(2*beta))^2 = (2 - 1)^2 = 1 and (-1 - 1)^2 = 4 -> 2.5
        ({"loss_type": "ipo"}, 2.5),
        # relu(1 - beta*h) = relu(0) = 0 and relu(1.5) = 1.5 -> 0.75
        ({"loss_type": "hinge"}, 0.75),
        # e=0.1: (0.9*sp(-1) - 0.1*sp(1))/0.8 = (0.28193552 - 0.13132617)/0.8 = 0.18826169
        #        (0.9*sp(0.5) - 0.1*sp(-0.5))/0.8 = (0.87666928 - 0.04740770)/0.8 = 1.03657698
        ({"loss_type": "robust", "label_smoothing": 0.1}, (0.18826169 + 1.03657698) / 2),
        # robust with e=0 is plain sigmoid DPO
        ({"loss_type": "robust"}, (sp(-1) + sp(0.5)) / 2),
    ],
)
def test_dpo_loss_types(kw, expected):
    loss, _ = _dpo(**kw)
    assert close(loss, expected)


def test_dpo_metrics():
    # chosen rewards 0.5*[1, -1] -> mean 0; rejected 0.5*[-1, 0] -> mean -0.25
    # margin mean([1, -0.5]) = 0.25; accuracy: 0.5 > -0.5 yes, -0.5 > 0 no -> 0.5
    _, m = _dpo()
    assert close(m["rewards/chosen"], 0.0) and close(m["rewards/rejected"], -0.25)
    assert close(m["rewards/margin"], 0.25) and close(m["rewards/accuracy"], 0.5)
    assert close(m["logps/chosen"], -1.5) and close(m["logps/rejected"], -2.5)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_dpo_gradient_sigmoid():
    # d/dpc mean(-logsigmoid(beta*h)) = -beta * sigmoid(-beta*h) / B
    # pair 1: -0.5 * sigmoid(-1) / 2 = -0.06723536; pair 2: -0.5 * sigmoid(0.5) / 2 = -0.15584678
    pc = t(PC, requires_grad=True)
    pr = t(PR, requires_grad=True)
    rc = t(RC, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, t(RR), beta=0.5)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert close(pc.grad, t([-0.5 * sig(-1) / 2, -0.5 * sig(0.5) / 2]))
    assert close(pr.grad, -pc.grad)
    assert rc.grad is None  # the reference is a constant


def test_dpo_errors():
    with pytest.raises(ValueError, match="loss_type"):
        _dpo(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        _dpo(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        _dpo(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.0)


# --------------------------------------------------------------------------------------- imports


def test_losses_and_advantages_import_with_torch_alone():
    """posttrain.objectives.losses and posttrain.objectives.advantages must import with transformers/peft/accelerate absent."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("transformers", "peft", "accelerate", "datasets", "trl"):
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        import posttrain.objectives.losses, posttrain.objectives.advantages
        from posttrain.objectives.losses import dpo_loss, policy_loss, value_loss, kl_estimate, reduce
        from posttrain.objectives.advantages import grpo, rloo, reinforce_pp, gae, whiten, dr_grpo
        heavy = [m for m in sys.modules if m.split(".")[0] in ("transformers", "peft", "accelerate")]
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
