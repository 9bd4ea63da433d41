"""What a rule reports: an Event (symptom, likely cause, fix, evidence) at a step."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Event:
    """One diagnosis: at ``step``, ``rule`` saw ``symptom``; the likely cause, the fix, and the numbers."""
    step: int
    rule: str
    severity: str
    """'error' (stop and fix), 'warning' (likely a problem), 'info'."""
    symptom: str
    cause: str
    fix: str
    evidence: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"[step {self.step}] {self.severity} {self.rule}: {self.symptom}. Likely cause: {self.cause}. Fix: {self.fix}"
