"""PPO's parts that are not the loop: the KL controller, per-token rewards, explained variance,
the value model's construction, and the optimizer over policy + value (two parameter groups,
clipped separately by ``optim.OptimizerStep``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from posttrain.algorithms import common
from posttrain.objectives import advantages as advmod
from posttrain.objectives.value_head import ValueHead, ValueModel, adapter_params, hidden_size

VALUE_ADAPTER = "value"


# ------------------------------------------------------------------------------ KL coefficient


@dataclasses.dataclass
class KLController:
    """The KL coefficient beta of the per-token reward ``-beta * KL``.

    Fixed when ``target`` is None. Adaptive otherwise (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences", sec. 2.2; TRL's ``AdaptiveKLController``): after each batch of
    ``n`` sequences whose KL to the reference (summed over tokens, averaged over sequences) was
    ``kl``,

        e     = clip(kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)

    so beta grows while the policy drifts past the target and shrinks while it stays under it, by
    at most 20% per ``horizon`` sequences (Ziegler et al.: target 6 nats, horizon 10000).
    """

    value: float
    target: Optional[float] = None
    horizon: float = 10000.0

    def update(self, kl: float, n: int) -> float:
        if self.target is not None and kl == kl:  # NaN (no valid token) leaves beta as it is
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    @property
    def adaptive(self) -> bool:
        return self.target is not None


def token_rewards(rewards_B: torch.Tensor, kl_BC: torch.Tensor, mask_BC: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """``advantages.token_rewards`` with an unjudged (NaN) sequence reward counted as 0: ``-kl_coef *
    kl`` on every valid token plus the sequence reward on the last one."""
    return advmod.token_rewards(torch.nan_to_num(rewards_B.float()), kl_BC.float(), mask_BC, kl_coef)


def explained_variance(values_BC: torch.Tensor, returns_BC: torch.Tensor, mask_BC: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over valid tokens: 1 = the critic predicts the
    returns, 0 = no better than their mean, < 0 = worse. NaN when the returns do not vary."""
    m = mask_BC != 0
    if int(m.sum()) < 2:
        return float("nan")
    ret, val = returns_BC[m].double(), values_BC[m].double()
    var = ret.var()
    if float(var) <= 1e-12:
        return float("nan")
    return float(1.0 - (ret - val).var() / var)


# ------------------------------------------------------------------------------ models


def make_value_model(config, policy, seed: int) -> ValueModel:
    """The critic named by ``config.value_model`` (see PPOConfig): a LoRA adapter on the policy's
    own model, or a separate model (LoRA or full)."""
    kind = config.value_model
    if kind == "auto":
        kind = "adapter" if config.lora else "separate"
    device = next(policy.parameters()).device
    if kind == "adapter":
        if not config.lora:
            raise ValueError("value_model=adapter puts the critic's LoRA adapter on the policy's frozen base: it "
                             "needs lora=True (or use value_model=separate)")
        from peft import LoraConfig

        default = policy.peft_config["default"]
        policy.add_adapter(VALUE_ADAPTER, LoraConfig(
            r=default.r, lora_alpha=default.lora_alpha, lora_dropout=default.lora_dropout,
            target_modules=default.target_modules, task_type="CAUSAL_LM"))
        for p in adapter_params(policy, VALUE_ADAPTER).parameters():
            p.requires_grad_(True)
        head = ValueHead(hidden_size(policy), seed=seed).to(device)
        return ValueModel(policy, head, VALUE_ADAPTER)
    if kind != "separate":
        raise ValueError(f"value_model must be auto, adapter or separate, got {kind!r}")
    model, _ = common.load_policy(config)
    model.to(device)
    return ValueModel(model, ValueHead(hidden_size(model), seed=seed).to(device), None)


def policy_params(policy) -> list[torch.Tensor]:
    """The policy's own trainable tensors (not the value adapter's)."""
    tag = f".{VALUE_ADAPTER}."
    return [p for n, p in policy.named_parameters() if p.requires_grad and not ("lora_" in n and tag in n)]


def build_optimizer(policy_ps, value_ps, config, lr: float, value_lr: float) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: the policy at ``lr``, the critic at ``value_lr``."""
    if not policy_ps or not value_ps:
        raise ValueError("PPO needs trainable policy and value parameters")
    return common.adamw([{"params": policy_ps, "lr": lr}, {"params": value_ps, "lr": value_lr}], lr, config.weight_decay)
