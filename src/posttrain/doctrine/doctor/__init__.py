"""The training doctor: the doctrine's debugging table and reward-hacking section as rules that
read a run's metrics (and samples), live during training and after it (`posttrain doctor`).

Each rule is a small function ``rule(ctx) -> Event | None`` that says whether its symptom holds at
the latest step, with the evidence; a rule whose metrics a run does not log (DPO and reward models
log no KL, lengths or samples) stays silent. The rules and where they come from (RL_DOCTRINE.md):

    rule                 doctrine                                   reads
    reward_plateau       Debugging: "Reward not improving"          reward/mean (DPO: rewards/margin), reward/std,
                         (LR too low, bad reward fn)                frac_zero_std (not under a critic), lr, samples
    reward_none          Debugging: "bad reward fn"                 samples' rewards, reward/mean, reward/none
    reward_crash         Debugging: "Reward spikes then crashes"    reward/mean (DPO: rewards/margin)
    kl_above_target      Debugging: "KL exploding" (weak penalty)   kl
    kl_exploding         Debugging: "KL exploding"                  kl
    length_hacking       Reward Hacking: "Length hacking"           reward/mean vs len/mean over a window
    length_clipped       Reward Hacking: "Length hacking"           len/clipped_frac
    format_hacking       Reward Hacking: "Format hacking"           samples: stock phrases, repeated closers
    entropy_collapse     Training Tips: "Monitor reward vs KL"      entropy
    clip_frac_high       PPO objective: clip ratio 0.2              clip_frac
    nonfinite            Training Tips: "RL can be unstable"        nonfinite_steps, loss, grad_norm
    judge_failures       RLAIF: "Strong AI labeler"                 judge/failure_rate, judge/failures
    rollout_mismatch     (none: Yao et al. 2025, off-policy RL      mismatch/kl, mismatch/ratio_max,
                         from the sampler-trainer gap)              mismatch/masked_frac
    no_signal            Debugging: "Reward not improving" when     frac_zero_std, reward/mean over the last
                         groups score alike (DAPO's dynamic         5 steps (not under a critic)
                         sampling, Yu et al. 2025)

`Doctor.check(history, samples)` returns only NEW events: a rule that keeps firing is reported once,
and again only after it has cleared (quiet for a window of steps, so a metric hovering at a threshold
is not reported over and over; a non-finite step clears at once). `Doctor.watch(run_dir, history)`
does that every ``every`` steps (and once at ``Thresholds.no_signal_steps``, so a run with no
learning signal hears it within its first steps), reads new samples from ``samples.jsonl`` itself,
appends events to ``doctor.jsonl`` and prints them. A trainer needs three lines (on the main
process only: they write files):

    doctor = Doctor()                                   # before the loop (thresholds as keywords)
    doctor.watch(run.run_dir, run.tracker.history)      # after each tracker.log(...): checks at 5, then every 10
    doctor.finish(run.run_dir, run.tracker.history)     # at the end: a last check, then report.html

`diagnose(history, samples)` replays a finished run and returns every event with its step.
Judge health is read from ``judge/failure_rate`` (and ``judge/<name>/failure_rate``), the judge's
own recent-window rate, else from the cumulative ``judge/failures`` / ``judge/requests`` counters
(posttrain.rewards.judge).

The package: ``events`` (Event), ``thresholds`` (Thresholds), ``stats`` (reading metric streams),
``context`` (Context: what a rule reads), ``rules/`` (``reward``, ``kl``, ``length``, ``format``,
``health``, ``mismatch``, ``signal``; RULES by name) and ``core`` (Doctor, diagnose, diagnose_run, run_events).
Every name is importable from ``posttrain.doctrine.doctor``. The doctor writes the report
(posttrain.doctrine.report) and passes it the events; the report never imports the doctor.
"""

from __future__ import annotations

from posttrain.doctrine.doctor.context import Context, reward_key
from posttrain.doctrine.doctor.core import Doctor, diagnose, diagnose_run, run_events
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.rules import (
    POINT_RULES, RULES, STOCK_PHRASES, clip_frac_high, entropy_collapse, format_hacking, judge_failures,
    kl_above_target, kl_exploding, length_clipped, length_hacking, nonfinite, reward_crash, reward_none,
    no_signal, reward_plateau, rollout_mismatch)
from posttrain.doctrine.doctor.stats import series
from posttrain.doctrine.doctor.thresholds import Thresholds

__all__ = [
    "Context", "Doctor", "Event", "POINT_RULES", "RULES", "STOCK_PHRASES", "Thresholds", "clip_frac_high",
    "diagnose", "diagnose_run", "entropy_collapse", "format_hacking", "judge_failures", "kl_above_target",
    "kl_exploding", "length_clipped", "length_hacking", "no_signal", "nonfinite", "reward_crash", "reward_key",
    "reward_none", "reward_plateau", "rollout_mismatch", "run_events", "series"]
