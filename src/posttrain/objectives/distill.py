"""On-policy distillation's per-token reward and the teacher's scores of sampled tokens.

The student samples y ~ pi_student; the teacher scores each sampled token; the per-token reward is
the negative reverse KL's single-sample estimate (Agarwal et al. 2024, GKD, with divergence
"reverse KL" and on-policy data; Thinking Machines 2025, "On-Policy Distillation"):

    adv_BT = -coef * (log pi_student(y_t) - log pi_teacher(y_t))          (0 off the mask)

used directly as the token's advantage: discount 0 (each token's reward is its own, no
return-to-go), no group baseline, no whitening, as in the Thinking Machines recipe. Its mean over
the sampled tokens is the per-token reverse KL estimate (``distill/reverse_kl``).

Departures and choices:
- GKD back-propagates through the exact token-level divergence summed over the vocabulary (its
  on-policy reverse-KL variant needs the student's full distribution at every position); this is
  the sampled estimate trained with a policy-gradient loss (the recipe of Thinking Machines and of
  TRL's ``GKDTrainer`` only in spirit: TRL computes a generalised JSD on full [B, T, V] logits of
  both models). Here neither model's [B, T, V] logits are ever held: the teacher's head runs on
  chunks of completion positions (``teacher_scores``).
- The teacher is scored at temperature 1 (its own distribution), whatever the student's sampling
  temperature; the student's log-probs are those of the distribution it sampled from.
- ``distill/agreement``: the fraction of sampled tokens that are the teacher's argmax, taken from
  the same chunked logits as the teacher's log-probs (no extra pass).
"""

from __future__ import annotations

import torch

from posttrain.models.split import split_model
from posttrain.objectives.grouped import rollout_hidden
from posttrain.objectives.logprobs import DEFAULT_CHUNK_SIZE


def reverse_kl_advantages(student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor,
                          coef: float = 1.0) -> torch.Tensor:
    """Per-token advantages ``-coef * (log pi_student - log pi_teacher)`` of the sampled tokens,
    0 where ``mask_BT`` is 0 (padding, prompt)."""
    m = mask_BT.to(student_logp_BT.dtype)
    return -coef * (student_logp_BT - teacher_logp_BT) * m


def distill_metrics(student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, agree_BT: torch.Tensor,
                    mask_BT: torch.Tensor) -> dict[str, float]:
    """Per-token means over the masked tokens: ``distill/reverse_kl`` (log pi_s - log pi_t, the
    single-sample reverse-KL estimate), ``distill/agreement`` (the sampled token is the teacher's
    argmax), ``distill/teacher_prob`` (pi_teacher of the sampled token)."""
    m = mask_BT.to(torch.float64)
    n = float(m.sum().clamp(min=1.0))
    diff = (student_logp_BT.double() - teacher_logp_BT.double()) * m
    return {"distill/reverse_kl": float(diff.sum()) / n,
            "distill/agreement": float((agree_BT.double() * m).sum()) / n,
            "distill/teacher_prob": float((teacher_logp_BT.double().exp() * m).sum()) / n}


def token_scores(logits_NV: torch.Tensor, tok_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log softmax(logits)[tok], tok == argmax)`` per row, in float32."""
    logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    return logp_NV.gather(-1, tok_N[:, None]).squeeze(-1), logits_NV.argmax(-1) == tok_N


@torch.no_grad()
def teacher_scores(teacher, rollouts, rows: torch.Tensor | None = None,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BC, agree_BC)`` of the completion tokens of ``rollouts`` (the groups of prompts
    ``rows``, default all) under ``teacher`` at temperature 1: each prompt run once per group
    (``grouped.rollout_hidden``), the head applied to ``chunk_size`` completion positions at a
    time (with the model's own logit transform, e.g. a soft-cap). 0 / False off the mask."""
    split = split_model(teacher)
    if isinstance(split, str):
        raise ValueError(f"the teacher's output head cannot be applied by chunks: {split}")
    trunk, head, transform = split
    G = rollouts.group_size
    comp_BC, cmask_BC = rollouts.completion_ids_BC, rollouts.completion_mask_BC
    if rows is not None:
        b_idx = (rows[:, None] * G + torch.arange(G, device=rows.device)[None, :]).reshape(-1)
        comp_BC, cmask_BC = comp_BC[b_idx], cmask_BC[b_idx]
    h_BCH = rollout_hidden(trunk, rollouts, rows)
    b_N, t_N = cmask_BC.bool().nonzero(as_tuple=True)
    h_NH, tok_N = h_BCH[b_N, t_N], comp_BC[b_N, t_N]
    logp_parts, agree_parts = [], []
    for i in range(0, h_NH.shape[0], chunk_size):
        z = head(h_NH[i:i + chunk_size])
        if transform is not None:
            z = transform(z)
        lp, ag = token_scores(z, tok_N[i:i + chunk_size])
        logp_parts.append(lp)
        agree_parts.append(ag)
    B, C = comp_BC.shape
    logp_N = torch.cat(logp_parts) if logp_parts else h_NH.new_zeros(0)
    agree_N = torch.cat(agree_parts) if agree_parts else torch.zeros(0, dtype=torch.bool)
    logp_BC = torch.zeros((B, C), dtype=torch.float32, device=comp_BC.device).index_put((b_N, t_N), logp_N.float())
    agree_BC = torch.zeros((B, C), dtype=torch.bool, device=comp_BC.device).index_put((b_N, t_N), agree_N)
    return logp_BC, agree_BC
