"""The rules by name. Each is a pure function ``rule(ctx: Context) -> Event | None``."""

from __future__ import annotations

from typing import Callable

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.rules.format import STOCK_PHRASES, format_hacking, prompt_echo
from posttrain.doctrine.doctor.rules.health import clip_frac_high, entropy_collapse, judge_failures, nonfinite
from posttrain.doctrine.doctor.rules.kl import kl_above_target, kl_exploding
from posttrain.doctrine.doctor.rules.length import length_clipped, length_hacking
from posttrain.doctrine.doctor.rules.mismatch import rollout_mismatch
from posttrain.doctrine.doctor.rules.reward import reward_crash, reward_none, reward_plateau
from posttrain.doctrine.doctor.rules.signal import no_signal

POINT_RULES = {"nonfinite"}
"""Rules about single steps: they clear at the first quiet check (each new occurrence is reported)."""

RULES: dict[str, Callable[[Context], Event | None]] = {f.__name__: f for f in (
    reward_plateau, reward_none, reward_crash, kl_above_target, kl_exploding, length_hacking, length_clipped,
    format_hacking, prompt_echo, entropy_collapse, clip_frac_high, nonfinite, judge_failures, rollout_mismatch, no_signal)}

__all__ = ["POINT_RULES", "RULES", "STOCK_PHRASES", *RULES]
