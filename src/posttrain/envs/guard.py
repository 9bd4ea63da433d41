"""The fault guard: an environment that fails ends its episode, never the run.

``run_step(env, fn, *args, timeout_s=..., max_output_chars=...)`` calls ``fn(*args)`` (``env.reset`` or
``env.step``) and always returns a :class:`~posttrain.envs.base.Step`. A call that

  * raises                               -> ``info["env_error"] = "exception: <type>: <message>"``
  * runs past ``timeout_s``               -> ``"timeout"``
  * returns messages over ``max_output_chars`` characters in total (their contents) -> ``"oversized"``
  * returns something malformed (not a Step; messages not a list of {"role", "content": str} dicts
    with a role the turn may have; a reward that is not a finite number; ``done`` not a bool;
    ``info`` not a dict)               -> ``"malformed: <what>"``

ends the episode: ``Step([], reward=0.0, done=True, info={"env_error": ...})``, and the fault is
counted in a :class:`GuardCounts` (``metrics()`` -> ``env/errors/<kind>``). A reset's list of messages
comes back as ``Step(messages)``, not done.

Hangs. The call runs in a daemon worker thread and the caller stops waiting at the deadline. Python
cannot kill a thread: a hung call is abandoned, still running, and its environment object must not be
reused (:class:`Guarded` refuses further calls and the runner makes a new environment for the next
episode); being a daemon thread, it does not keep the process alive at exit. ``timeout_s=None`` calls
inline, in the caller's thread, with no hang protection (for environments that need the main thread,
e.g. a reward that arms SIGALRM: ``posttrain.rewards.math`` also works off the main thread, through
its helper process). What the guard does not do: it does not bound memory or CPU of the call, nor
sandbox it: an environment is the user's own Python code, run in the trainer's process.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Callable

from posttrain.envs.base import Step

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_OUTPUT_CHARS = 20_000
KINDS = ("exception", "timeout", "oversized", "malformed")

RESET_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
STEP_ROLES = frozenset({"user", "tool"})


@dataclasses.dataclass
class GuardCounts:
    """Calls guarded and faults per kind (one counter object per run, shared by its episodes)."""

    calls: int = 0
    exception: int = 0
    timeout: int = 0
    oversized: int = 0
    malformed: int = 0

    def add(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)

    @property
    def errors(self) -> int:
        return sum(getattr(self, k) for k in KINDS)

    def metrics(self, prefix: str = "env/errors/") -> dict[str, float]:
        """``{"env/errors/exception": n, ..., "env/errors/total": n, "env/calls": n}``."""
        out = {f"{prefix}{k}": float(getattr(self, k)) for k in KINDS}
        out[f"{prefix}total"] = float(self.errors)
        out["env/calls"] = float(self.calls)
        return out


def error_step(error: str) -> Step:
    """The step that ends an episode on an environment fault."""
    return Step(messages=[], reward=0.0, done=True, info={"env_error": error})


def _kind(error: str) -> str:
    return error.partition(":")[0]


def _check_messages(messages: Any, roles: frozenset[str]) -> str | None:
    """Why ``messages`` is not a list of {role, content: str} dicts with allowed roles, else None."""
    if not isinstance(messages, list):
        return f"messages must be a list, got {type(messages).__name__}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} must be a dict, got {type(m).__name__}"
        if m.get("role") not in roles:
            return f"message {i} has role {m.get('role')!r}; allowed: {', '.join(sorted(roles))}"
        if not isinstance(m.get("content"), str):
            return f"message {i} content must be a string, got {type(m.get('content')).__name__}"
    return None


def _check_step(out: Any) -> str | None:
    """Why a step's return is malformed, else None."""
    if not isinstance(out, Step):
        return f"step must return a Step, got {type(out).__name__}"
    problem = _check_messages(out.messages, STEP_ROLES)
    if problem:
        return problem
    if isinstance(out.reward, bool) or not isinstance(out.reward, (int, float)) or not math.isfinite(out.reward):
        return f"reward must be a finite number, got {out.reward!r}"
    if not isinstance(out.done, bool):
        return f"done must be a bool, got {type(out.done).__name__}"
    if not isinstance(out.info, dict):
        return f"info must be a dict, got {type(out.info).__name__}"
    return None


def _call(fn: Callable[..., Any], args: tuple, timeout_s: float | None) -> tuple[str, Any]:
    """("ok", value) | ("exception", exc) | ("timeout", None)."""
    if timeout_s is None:
        try:
            return "ok", fn(*args)
        except Exception as e:  # noqa: BLE001 - any fault of the environment ends its episode
            return "exception", e
    box: list[tuple[str, Any]] = []

    def work() -> None:
        try:
            box.append(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - reported to the caller, not raised in the thread
            box.append(("exception", e))

    worker = threading.Thread(target=work, name=f"env-{getattr(fn, '__name__', 'call')}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return box[0] if box else ("timeout", None)


def run_step(env: Any, fn: Callable[..., Any], *args: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S,
             max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS, counts: GuardCounts | None = None) -> Step:
    """``fn(*args)`` (``env.reset`` or ``env.step``: a function named ``reset`` is checked as a reset,
    any other as a step) guarded as the module docstring says; never raises for a fault of the
    environment. ``env`` is the object not to reuse after a timeout (the guard only names it)."""
    counts = counts if counts is not None else GuardCounts()
    counts.calls += 1
    is_reset = getattr(fn, "__name__", "") == "reset"
    status, out = _call(fn, args, timeout_s)
    if status == "timeout":
        error = f"timeout: no answer in {timeout_s:g} s"
    elif status == "exception":
        error = f"exception: {type(out).__name__}: {out}"
    elif is_reset:
        problem = _check_messages(out, RESET_ROLES) or (None if out else "reset returned no messages")
        error = f"malformed: {problem}" if problem else None
        out = Step(messages=out) if not problem else out
    else:
        problem = _check_step(out)
        error = f"malformed: {problem}" if problem else None
    if error is None and sum(len(m["content"]) for m in out.messages) > max_output_chars:
        error = f"oversized: {sum(len(m['content']) for m in out.messages)} characters > {max_output_chars}"
    if error is None:
        return out
    counts.add(_kind(error))
    return error_step(error[:500])


class Guarded:
    """One episode's environment behind the guard: ``reset``/``step`` return Steps and never raise for
    the environment's faults; after a fault (``failed``) it refuses further calls, since a hung call
    may still be running in its thread."""

    def __init__(self, env: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS, counts: GuardCounts | None = None):
        self.env, self.timeout_s, self.max_output_chars = env, timeout_s, max_output_chars
        self.counts = counts if counts is not None else GuardCounts()
        self.failed: str | None = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> Step:
        if self.failed:
            raise RuntimeError(f"this environment failed ({self.failed}); make a new one for the next episode")
        step = run_step(self.env, fn, *args, timeout_s=self.timeout_s, max_output_chars=self.max_output_chars,
                        counts=self.counts)
        self.failed = step.info.get("env_error") if step.done else None
        return step

    def reset(self, row: dict, seed: int) -> Step:
        return self._run(self.env.reset, row, seed)

    def step(self, assistant_text: str) -> Step:
        return self._run(self.env.step, assistant_text)

    def close(self) -> None:
        """Close the environment (a fault while closing is ignored; a hung one is not waited for)."""
        if self.failed and self.failed.startswith("timeout"):
            return
        _call(self.env.close, (), self.timeout_s)


__all__ = ["DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_TIMEOUT_S", "GuardCounts", "Guarded", "error_step", "run_step"]
