"""The "no learning signal" rule: most groups score the same on every completion, so their
advantages are 0 and a group-baseline method (GRPO, RLOO, REINFORCE++) learns nothing from them.

Not a row of the doctrine's debugging table; it is the cause the table's "Reward not improving"
hides when the task is out of reach (the DAPO paper, Yu et al. 2025, drops such groups: dynamic
sampling). Seen as a new user on a task the base model solved 3% of the time: 50-100% of the groups
had zero reward variance from the first step, and the run spent 29 steps learning nothing. The
rule reads ``frac_zero_std`` (the share of groups whose rewards are all equal, logged by
``algorithms.collect``) and the mean reward over the last ``no_signal_steps`` steps, so it fires
within the first steps of a run rather than after the plateau window. Equal rewards come in two
kinds, told apart by the reward level (a verifiable reward scores 0 when wrong, 1 when right):

    too hard   reward/mean <= no_signal_reward      every completion fails (pass@k near 0): error
    too easy   reward/mean >= 1 - no_signal_reward  every completion passes: warning
    mixed      otherwise                            some groups all fail, others all pass: warning

A run with a value model (PPO: ``value_loss`` logged) is left alone: its advantages come from the
critic, and with one completion per prompt every "group" has zero variance by construction.
"""

from __future__ import annotations

from posttrain.doctrine.doctor.context import Context, has_critic
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import mean, series

_HARD_FIX = ("--dynamic-sampling (keep drawing prompts until the batch holds groups whose rewards differ{rounds}); "
             "more samples per group (--group-size 16 or more: a prompt solved p of the time has a success in "
             "1 - (1 - p)^G of its groups); --temperature 1.0 if it is lower; an easier curriculum (easier prompts "
             "first, e.g. fewer terms or smaller numbers); SFT on demonstrations first (`posttrain train sft`), or "
             "rejection-sampling fine-tuning (`posttrain train rft`, which keeps the rare successes); on-policy "
             "distillation if a stronger teacher with the same tokenizer exists (`posttrain train distill --teacher "
             "SPEC`). `posttrain recommend` measures the base model's pass rate before a run")
_EASY_FIX = ("harder prompts (a harder task, or the next stage of a curriculum); --dynamic-sampling skips solved "
             "prompts; or stop: check the held-out accuracy, the model may already solve this data")
CASES = {
    "hard": ("error", "nearly every group fails on all its completions (pass rate near 0)",
             "no learning signal: the task is too hard for the model, every completion of a group scores the same "
             "(0), so its advantages are 0 and the step changes nothing", _HARD_FIX),
    "easy": ("warning", "nearly every group passes on all its completions",
             "no learning signal: the prompts are too easy, every completion of a group scores the maximum, so its "
             "advantages are 0 and the step changes nothing", _EASY_FIX),
    "mixed": ("warning", "groups fail on all their completions or pass on all of them",
              "no learning signal: the prompts are too hard or too easy for the model (or the reward barely "
              "varies), so most groups' advantages are 0",
              "for the groups that fail: " + _HARD_FIX + ". For the groups that pass: " + _EASY_FIX),
}
"""case -> (severity, what the equal rewards are, cause, fix)."""


def signal_case(reward_mean: float, low: float) -> str:
    """'hard', 'easy' or 'mixed': where the equal rewards sit (rewards scored 0 wrong / 1 right)."""
    if reward_mean <= low:
        return "hard"
    return "easy" if reward_mean >= 1 - low else "mixed"


def no_signal(c: Context) -> Event | None:
    """Over the last no_signal_steps steps, the mean share of groups with equal rewards is at least
    no_signal_frac (no_signal_frac_hard when the reward is near 0 too)."""
    k = c.th.no_signal_steps
    flat = series(c.history, "frac_zero_std", k)
    if len(flat) < k or has_critic(c.history):
        return None
    rewards = series(c.history, "reward/mean", k)
    r = mean(rewards) if rewards else 0.5  # no reward logged: the level is unknown
    case = signal_case(r, c.th.no_signal_reward)
    frac = mean(flat)
    if frac < (c.th.no_signal_frac_hard if case == "hard" else c.th.no_signal_frac):
        return None
    severity, what, cause, fix = CASES[case]
    dynamic = bool(series(c.history, "sampling/rounds", 1))
    rounds = "; it is on and still short of such groups: raise --max-sampling-rounds" if dynamic else ""
    return c.event("no_signal", severity, f"{frac:.0%} of groups scored the same on every completion over the "
                   f"last {k} steps (mean reward {r:.3g}): {what}", cause, fix.format(rounds=rounds),
                   frac_zero_std=frac, reward_mean=r, case=case, dynamic_sampling=dynamic)
