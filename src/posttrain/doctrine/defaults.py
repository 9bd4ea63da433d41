"""The doctrine's defaults per method (`posttrain train` config fields) and the command line they make:
shared by the decision tree (posttrain.doctrine.select) and its branches for the stages around RL
(posttrain.doctrine.stages).

Defaults follow the doctrine: DPO beta 0.1, LoRA rank 32, lr 1e-6 full / 1e-5 LoRA; GRPO group size 8,
beta 0.04, the "LoRA for RL" rank (8B -> 8, 70B -> 32), lr 1e-6 full / 1e-5 LoRA ("Use lower LR for
RL"); PPO clip 0.2, kl_coef 0.1, value_coef 0.5, entropy_coef 0.01, gae_lambda 0.95; SFT the SFT rank
(8B -> 64) and lr 2e-5. RFT takes SFT's, online DPO DPO's, distillation GRPO's rank and rate.
"""

from __future__ import annotations

import shlex
from typing import Any

from posttrain.doctrine.memory import default_lora_rank, parse_size

FULL_FT_LR = {"dpo": 1e-6, "grpo": 1e-6, "ppo": 1e-6, "sft": 2e-5, "rft": 2e-5, "online-dpo": 1e-6, "distill": 1e-6}
"""Doctrine: DPO "1e-5 to 1e-6, lower than SFT"; RL "1e-6 instead of 1e-5". x10 with LoRA. RFT
trains with SFT's loss, online DPO with DPO's, distillation with GRPO's update."""
RANK_KIND = {"rft": "sft", "online-dpo": "dpo", "distill": "grpo"}
"""The LoRA table each new stage takes its rank from (default_lora_rank)."""
REWARDED = ("grpo", "ppo", "rft", "online-dpo", "distill")
"""Methods whose config takes --reward."""


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _command(train_method: str, data: Any, model: str | None, defaults: dict[str, Any],
             data_arg: str | None = None) -> str:
    parts = ["posttrain", "train", train_method]
    if data_arg:
        parts += ["--data", data_arg]
    elif data is not None and data.task:
        parts += ["--task", data.task]
    elif data is not None and data.source:
        parts += ["--data", data.source]
    if model:
        parts += ["--model", f"<a {model} model>" if parse_size(model) else model]
    for k, v in defaults.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            parts += [flag, _fmt(v)]
    return " ".join(shlex.quote(p) for p in parts)


def method_defaults(method: str, n_params: float, lora: bool = True, reward: str | None = None,
                    dtype: str | None = None) -> dict[str, Any]:
    """The doctrine's defaults for a method, as `posttrain train` config fields."""
    kind = "grpo" if method == "rlaif" else method
    out: dict[str, Any] = {}
    if reward and kind in REWARDED:
        out["reward"] = reward
    out["lora"] = lora
    if lora:
        out["lora_rank"] = default_lora_rank(RANK_KIND.get(kind, kind), n_params)
    from posttrain.models import LORA_LR_MULTIPLIER

    out["lr"] = float(f"{FULL_FT_LR[kind] * (LORA_LR_MULTIPLIER if lora else 1.0):.3g}")
    if kind in ("dpo", "online-dpo"):
        out["beta"] = 0.1
    elif kind == "grpo":
        out.update(beta=0.04, group_size=8)
    elif kind == "ppo":
        out.update(clip_ratio=0.2, kl_coef=0.1, value_coef=0.5, entropy_coef=0.01, gae_lambda=0.95)
    return out
