"""The decision tree's branches for the stages around RL (posttrain.doctrine.select walks them):

    0b. teacher_branch   a stronger teacher sharing the student's tokenizer (--teacher) -> on-policy
                         distillation (`posttrain train distill`)
    2b. probe_branch     GRPO chosen for a verifiable reward, and the base model's pass rate on a
                         sample (posttrain.doctrine.probe) near zero -> RFT first, SFT (demonstrations)
                         and distillation (a teacher) named as the alternatives

The third new stage, online DPO, is the limited-compute fallback of ``select._limited_compute`` for a
learned reward or a judge (RFT for a verifiable reward). Each branch appends its reasons, as the
tree's other branches do.
"""

from __future__ import annotations

from typing import Any

from posttrain.doctrine.memory import model_shape
from posttrain.doctrine.probe import probe_reasons, rft_group_size, with_success
from posttrain.doctrine.defaults import _command, method_defaults
from posttrain.errors import UserError


def teacher_branch(data: Any, teacher: str | None, model_arg: str | None, n_params: float, reward_spec: str | None,
                   reasons: list[str], alternatives: list[dict[str, Any]]) -> str | None:
    """0b. a stronger teacher sharing the student's tokenizer -> on-policy distillation."""
    if not teacher:
        reasons.append("a stronger teacher? no (no --teacher)")
        return None
    if data is None or data.kind == "demonstrations":
        reasons.append(f"a stronger teacher? --teacher {teacher}, but no prompts for the student to sample from "
                       "(give --data or --task): not used")
        return None
    size = ""
    try:
        t_params = model_shape(teacher).n_params
        size = (f"; {t_params / 1e9:.3g}B parameters vs the student's {n_params / 1e9:.3g}B" +
                (": not larger, so it must be better on the task (e.g. a trained run's final/)"
                 if t_params <= n_params else ""))
    except UserError:
        pass
    reasons.append(f"a stronger teacher? yes: --teacher {teacher} shares the student's tokenizer{size} -> on-policy "
                   "distillation: the student samples, the teacher scores every sampled token (reward = -reverse "
                   "KL), a dense signal that needs no reward and no success of the student's own (Agarwal et al. "
                   "2024, GKD; Thinking Machines 2025)")
    if reward_spec:
        alternatives.append({"method": "grpo", "why": f"the reward {reward_spec} alone: needs the student to "
                             "succeed sometimes", "command": _command("grpo", data, model_arg, method_defaults(
                                 "grpo", n_params, reward=reward_spec))})
    return "distill"


def probe_branch(probe: Any, data: Any, model_arg: str | None, n_params: float, reward_spec: str,
                 teacher: str | None, reasons: list[str], alternatives: list[dict[str, Any]]) -> tuple[str, dict]:
    """2b. the base model's pass rate on a sample, measured by ``probe(reward_spec)``: near zero ->
    RFT first (SFT with demonstrations, distillation with a teacher named). Returns (method, probe)."""
    pr = probe(reward_spec)
    reasons.extend(probe_reasons(pr, 8))
    if not pr.near_zero:
        return "grpo", pr.to_dict()
    group = rft_group_size(pr.pass_rate)
    kept = (f"about {with_success(pr.pass_rate, group):.0%} of prompts keep a sample" if pr.pass_rate > 0 else
            "raise it further if the first rounds keep nothing (RFT stops after --max-empty-rounds)")
    reasons.append(f"-> RFT first (expert iteration, STaR, ReST-EM): sample {group} completions per prompt "
                   f"(--group-size {group}: {kept}), keep those that pass, fine-tune on them; then GRPO from the "
                   "result. SFT comes first instead when demonstrations exist, on-policy distillation when a "
                   "stronger teacher does (--teacher)")
    alternatives.append({"method": "sft", "why": "demonstrations of the task (TRL's SFT formats), if you have or can "
                         "write some: needs no success of the model's own", "command": _command(
                             "sft", None, model_arg, method_defaults("sft", n_params), "demonstrations.jsonl")})
    if not teacher:
        alternatives.append({"method": "distill", "why": "a stronger model with the same tokenizer scores every "
                             "token: dense signal at any pass rate", "command": _command(
                                 "distill", data, model_arg, {"teacher": "<a stronger model>", "lora": True})})
    alternatives.append({"method": "grpo", "why": "GRPO anyway, with dynamic sampling and larger groups (most "
                         "groups would still be flat)", "command": _command("grpo", data, model_arg, {
                             **method_defaults("grpo", n_params, reward=reward_spec), "group_size": 16,
                             "dynamic_sampling": True})})
    return "rft", {**pr.to_dict(), "group_size": group}
