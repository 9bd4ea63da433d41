"""Online (iterative) DPO (``posttrain train online-dpo``): Xiong et al. 2024 ("Iterative Preference
Learning from Human Feedback"), Guo et al. 2024 ("Direct Language Model Alignment from Online AI
Feedback"); TRL's ``OnlineDPOTrainer``.

Each round (``rounds.py``: sampling, the round files, resume) pairs the current policy's samples
by the doctrine's recipe and runs DPO steps on the new pairs:

    groups = sample(policy, prompts_per_round prompts, group_size each)   # any reward spec scores them
    pair_p = pairs.choose_pair(rewards_G)         # best vs worst; all-equal / < 2 judged: skipped, counted
    ref_P2 = reference's sequence log-probs of the round's pairs            # once per round, no grad
    steps  = dpo.accumulate(...) + optimizer step, steps_per_round times    # train dpo's loss types

Choices, and where they depart from the papers and from TRL:
- The loss types of ``train dpo`` (``dpo_losses.LOSS_TYPES``) but KTO; the reference-free ones
  (simpo, orpo) compute no reference at all.
- Reference (``ref_update``): ``initial``, the model before training (the papers' and TRL's
  default): with LoRA the adapter disabled, no copy; with full fine-tuning a frozen copy made at
  the start (one more model in memory). ``round``: the policy as it is when the round starts
  (Xiong et al.'s iterative variant), no copy in either case. Either way the reference log-probs
  of a round's pairs are computed once, when the round is made, and written in the round file
  (``ref_logps`` of each row), so a resumed run reads them back instead of recomputing them from
  weights that have moved.
- Pairs: one per prompt, best against worst (``pairs.choose_pair``: ties go to the first sampled);
  TRL's OnlineDPOTrainer samples two completions per prompt and asks a judge or reward model
  which is better. More samples per prompt give wider reward gaps (the doctrine's recipe).
- Defaults as ``train dpo``: beta 0.1, LoRA rank 32, learning rate 1e-6 for full fine-tuning and
  10x with LoRA.
- Metrics per round: ``round/pairs``, ``round/skipped_equal``, ``round/skipped_unjudged``,
  ``round/chosen_reward`` and ``round/rejected_reward`` (mean scores of the pairs), ``reward/mean``
  of all samples; per step the DPO metrics (``rewards/margin``, ``rewards/accuracy``...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, ClassVar, Literal, Optional

from posttrain.algorithms import dpo, rounds
from posttrain.algorithms import dpo_data as dd
from posttrain.algorithms import dpo_losses
from posttrain.algorithms.dpo_losses import LOSS_TYPES
from posttrain.algorithms.pairs import choose_pair, make_pair_row
from posttrain.algorithms.reference import Reference
from posttrain.algorithms.run import Run, RunResult, closes_runs_on_failure
from posttrain.models import rl_lora_rank
from posttrain.runtime.config import NonNegative, Positive, Range, refuse

PAIRED = tuple(name for name, entry in LOSS_TYPES.items() if not entry.unpaired)


@dataclasses.dataclass
class OnlineDPOConfig(rounds.RoundsConfig):
    """Online / iterative DPO: each round pairs the policy's best and worst samples per prompt under a
    reward, then runs DPO steps on those pairs."""

    lora_rank: Optional[Annotated[int, Positive]] = 32
    """LoRA rank (train dpo's default: 32)."""
    loss_type: Literal[PAIRED] = "sigmoid"
    """A loss of train dpo: sigmoid (DPO), ipo, hinge, robust; without a reference: simpo, orpo."""
    beta: Optional[Annotated[float, Positive]] = None
    """Strength of the pull towards the reference; default by loss type (0.1; simpo 2.0; orpo has none)."""
    ref_update: Literal["initial", "round"] = "initial"
    """The reference: initial = the model before training (papers, TRL); round = the policy at each round's start."""
    simpo_gamma: Annotated[float, NonNegative] = 1.0
    """SimPO's target reward margin gamma."""
    orpo_lambda: Annotated[float, NonNegative] = 0.1
    """ORPO's weight of the odds-ratio term against the chosen NLL."""
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0
    """Assumed fraction of flipped preference labels (sigmoid: conservative DPO; robust: rDPO; simpo)."""
    max_length: Annotated[int, Range(2)] = 1024
    """Longest prompt + completion in tokens; longer pairs are truncated by train dpo's policy."""
    max_prompt_length: Annotated[int, Positive] = 512
    """An over-long pair's prompt keeps its last max_prompt_length tokens."""
    row_tokens: Annotated[int, NonNegative] = 256
    """Longest packed row of pairs (train dpo's); 0 = one row per batch."""
    share_prompt: bool = True
    """Chosen and rejected attend to one copy of their prompt (sdpa or eager attention)."""
    ref_batch_tokens: Annotated[int, Positive] = 4096
    """Tokens per no-grad forward of the reference pass."""
    APPLIES_WHEN: ClassVar[dict] = dpo_losses.applies_when("ref_update")

    @property
    def method(self) -> str:
        return "online-dpo"

    @property
    def beta_value(self) -> float:
        return dpo_losses.beta_of(self)

    def check(self) -> None:
        super().check()
        dpo_losses.check(self)
        if self.group_size < 2:
            raise refuse("group_size", f"must be >= 2 for online DPO, got {self.group_size}: a pair needs two samples "
                         "of a prompt")


def pair_groups(groups: list[rounds.Group]) -> tuple[list[dict], dict, list]:
    """The round's pair rows (``pairs.make_pair_row``: TRL preference rows with scores) and counts."""
    rows, picks = [], []
    counts = {"equal": 0, "unjudged": 0}
    for g in groups:
        pick = choose_pair(g.rewards)
        picks.append(pick)
        if isinstance(pick, str):
            counts[pick] += 1
            continue
        c, r = pick
        rows.append(make_pair_row(g.row, g.texts[c], g.texts[r], g.rewards[c], g.rewards[r]))
    mean = lambda k: sum(r[k] for r in rows) / len(rows) if rows else float("nan")  # noqa: E731
    metrics = {"round/pairs": len(rows), "round/skipped_equal": counts["equal"],
               "round/skipped_unjudged": counts["unjudged"], "round/chosen_reward": mean("chosen_score"),
               "round/rejected_reward": mean("rejected_score")}
    return rows, metrics, picks


@closes_runs_on_failure
def train_online_dpo(config: OnlineDPOConfig) -> RunResult:
    """Online DPO; returns the run directory and metrics."""
    s = rounds.setup(config, rl_lora_rank)  # lora_rank defaults to 32 (the field), so the table is unused
    policy, tok = s.policy, s.tok
    run = Run(config, "online-dpo", total_steps=config.max_steps)
    uses_ref = LOSS_TYPES[config.loss_type].reference
    # before the checkpoint loads: a full fine-tuning run's initial reference is a frozen copy of the start
    initial = Reference(policy, config.lora, copy=True) if uses_ref and config.ref_update == "initial" else None
    share = config.share_prompt and dd.supports_shared_prompt(policy)
    pad = tok.pad_token_id

    def encode(rows: list[dict], source: str):
        examples, _ = dd.encode_pairs(tok, rows, config.chat_template, config.max_length, config.max_prompt_length,
                                      "truncate", source=source)
        ref = dpo.ReferenceLogps({e.index: tuple(rows[e.index]["ref_logps"]) for e in examples}) if uses_ref else None
        return examples, ref

    def build(k: int, groups: list[rounds.Group]):
        rows, metrics, picks = pair_groups(groups)
        if uses_ref and rows:
            examples, _ = dd.encode_pairs(tok, rows, config.chat_template, config.max_length,
                                          config.max_prompt_length, "truncate", source=f"round {k}")
            # round: the policy as it is now (with its adapter), no copy
            with (initial.model() if initial else contextlib.nullcontext(policy)) as ref:
                table = dd.sequence_logps(ref, examples, pad, share, config.ref_batch_tokens, config.row_tokens)
            for i, row in enumerate(rows):
                row["ref_logps"] = list(table[i]) if i in table else None
        return rows, metrics, lambda p: {"pair": list(picks[p]) if isinstance(picks[p], tuple) else picks[p]}

    def accumulate(rule, batch, ref):
        return dpo.accumulate(policy, rule, batch, ref, config, pad, share)

    return rounds.train(config, s, run, rounds.Method(build, encode, accumulate, dpo.FULL_FT_LR))
