"""Fault injection for the kill-and-resume tests: named points where a run can be made to die.

``faults.point("checkpoint.write")`` does nothing unless the environment variable
``POSTTRAIN_FAULT`` names that point, as ``NAME:N`` (several separated by commas): then the N-th
arrival at the point kills the process with SIGKILL, as an out-of-memory killer or a pulled plug
would, with no exception handler, ``finally`` block or buffer flush running. ``NAME:N:raise``
raises :class:`InjectedFault` there instead (to test what a failing run leaves behind).

The points (``tests/unit/test_faults.py`` kills a run at each, then resumes it):

================== ==========================================================================
``collect``        a step's data has been sampled and scored (``algorithms/loop.py``)
``update``         a step's optimizer updates are done, nothing logged yet (``algorithms/loop.py``)
``checkpoint.write`` half a checkpoint is in its temporary directory (``runtime/checkpoint.py``)
``metrics.write``  half a metrics line is written and flushed (``runtime/tracking.py``)
================== ==========================================================================

When the variable is unset a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

ENV = "POSTTRAIN_FAULT"


class InjectedFault(RuntimeError):
    """Raised at a point armed with ``NAME:N:raise``."""


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    plan: dict[str, tuple[int, str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        plan[name] = (int(count or 1), action or "kill")
    return plan


_PLAN = _parse(os.environ.get(ENV, ""))
_ARRIVALS: dict[str, int] = {}


def _kill(name: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise(name: str) -> None:
    raise InjectedFault(f"fault injected at {name!r} ({ENV})")


ACTIONS: dict[str, Callable[[str], None]] = {"kill": _kill, "raise": _raise}


def point(name: str, before: Callable[[], object] | None = None) -> None:
    """A named place where a fault can be injected; ``before`` runs just before it fires (e.g. a
    flush, so that a half-written line really reaches the file)."""
    if name not in _PLAN:
        return
    _ARRIVALS[name] = _ARRIVALS.get(name, 0) + 1
    count, action = _PLAN[name]
    if _ARRIVALS[name] == count:
        if before is not None:
            before()
        ACTIONS[action](name)


def armed(name: str) -> bool:
    """True when ``POSTTRAIN_FAULT`` names this point."""
    return name in _PLAN
