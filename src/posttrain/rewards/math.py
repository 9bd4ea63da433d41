r"""Math reward: extract the final answer from a completion, check it against the reference.

`extract_answer(text) -> str | None`, the first rule that finds something:
  0. a `\boxed{` still open at the end of the text: the final answer was cut off (or never
     closed): None, whatever came before it;
  1. the last complete `\boxed{...}` (nested braces balanced; `\{` `\}` are literal braces);
  2. else the text after the last "Answer:" / "answer is" / "####" (case-insensitive), up to
     the end of that line (the next non-empty line when the marker ends its line), with
     markdown emphasis and a leading colon stripped;
  3. else the last number in the text (`-12`, `3.5`, `1,000`, `3/4`), unless the text itself
     ends mid-expression (an open `{`, a trailing operator: `rewards.answers.cut_off`).
  An answer found by rule 1 or 2 that is unfinished as written (`\frac{1}{`, `1 +`, `\left( 5`:
  `rewards.answers.cut_off`) gives None too, never a fallback to a shorter fragment of it.

`math_reward(prompt, completion, answer, **_) -> float | None`:
  None  when the reference `answer` is missing or empty: the sample cannot be judged;
  1.0   when the extracted answer equals the reference, tried in this order:
          a. the same string after cosmetic clean-up (`$...$`, spaces, a trailing period,
             thousands separators, `\%`, `^\circ`, `\$`): the fast path, no parsing;
          b. a reference that is a plain number (integer, decimal, `a/b`, `\frac{a}{b}`) takes
             only a number in return: a decimal, a fraction in lowest terms, `m \times 10^{k}`,
             optionally after `lhs =` (the value after the last `=`: `x = 136`,
             `62 + 74 = 136`), before unit words (`136 apples`, `136 \text{ cm}`) or opening
             a sentence (`57. Because 39 + 18 = 57`); the two
             are compared exactly as fractions (two unequal non-integers then go to
             math-verify for its 6-digit rounding: `1/3` vs `0.333333`). An unevaluated
             expression (`62 + 74`, `2*68`, `\frac{272}{2}`, `x` after `62 + 74 = x`) scores
             0.0 whatever it equals: math-verify would evaluate it and let the policy hand
             the question back as its answer;
          c. otherwise math-verify (HF; the checker open-r1 and TRL's `accuracy_reward` use):
             both sides parsed as LaTeX (`$...$`), then `verify(gold, pred)`: `0.5`, `1/2`
             and `\frac{1}{2}` agree, `\text{}` units drop, `x+1` equals `1+x`, `1/3` equals
             `0.333333` (its 6-digit float rounding);
  0.0   otherwise: no answer found (a truncated or malformed final answer included), not
        equal, unparsable, or the check timed out.
  A reference in GSM8K (`... #### 72`) or MATH (`\boxed{72}`) form is reduced with
  `extract_answer` first. It never raises on odd input.

Timeouts. math-verify guards itself with `signal.alarm`, which works only in the main thread
(elsewhere it raises ValueError) and only in whole seconds. We switch its timer off and use ours:
  * main thread: a SIGALRM interval timer (fractional seconds) around parse + verify; a timer
    someone else had armed (pytest-timeout, the trainer) is re-armed afterwards with its
    remaining time. The interrupt lands between Python bytecodes: sympy keeps power towers
    like `9^{9^{9^{9}}}` unevaluated, and those time out on schedule.
  * any other thread (the trainer may score from one): a helper subprocess runs the same check
    in its own main thread, with a 4 GB address-space limit; the caller waits at most
    `timeout_s + 2 s` and kills and restarts the helper if it overruns. The helper is started
    on first use and exits when its stdin closes (its parent exited) or after 10 idle minutes;
    `shutdown_worker()` stops it at once.
  Answers over `MAX_ANSWER_CHARS` characters are compared as strings only. Results are cached
  (LRU) per (reference, answer, timeout): GRPO groups repeat completions.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache

from posttrain.rewards import as_text
from posttrain.rewards.answers import cut_off

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 3.0
_GRACE_S = 2.0
_STARTUP_S = 60.0
_IDLE_EXIT_S = 600.0

# ------------------------------------------------------------------ extraction


def _last_boxed(text: str) -> tuple[str | None, bool]:
    """(content of the last complete \\boxed{...}, whether a \\boxed{ is still open at the end),
    in one linear pass (no regex backtracking)."""
    best_start, best = -1, None
    stack: list[int] = []  # for each open brace: content start if it opens a \boxed, else -1
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if text.startswith("\\boxed", i):
                j = i + 6
                while j < n and text[j] in " \t":
                    j += 1
                if j < n and text[j] == "{":
                    stack.append(j + 1)
                    i = j + 1
                    continue
                i = j
                continue
            i += 2  # an escaped character (\{, \}, \\) or the first letter of a macro
            continue
        if ch == "{":
            stack.append(-1)
        elif ch == "}" and stack:
            start = stack.pop()
            if start > best_start:
                best_start, best = start, text[start:i]
        i += 1
    return best, any(start >= 0 for start in stack)


_MARKER = re.compile(r"answer\s*:|answer\s+is|####", re.IGNORECASE)
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)")
_EDGE = " \t\r\n*_`:"


def _after_last_marker(text: str) -> str | None:
    last = None
    for last in _MARKER.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :].lstrip(_EDGE)
    for line in rest.split("\n"):
        line = line.strip(_EDGE)
        if line:
            return line
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in `text` (rules in the module docstring), or None."""
    text = as_text(text)
    boxed, box_open = _last_boxed(text)
    if box_open:
        return None
    if boxed is not None and boxed.strip():
        return None if cut_off(boxed) else boxed.strip()
    marked = _after_last_marker(text)
    if marked:
        return None if cut_off(marked) else marked
    if cut_off(text):
        return None
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group(0) if last else None


# ------------------------------------------------------------------ fast paths

_SPACES = re.compile(r"\\[!,;: ]|~|\\left|\\right|\s+")
_COSMETIC = re.compile(r"\\%|%|\^\{?\\circ\}?|°|\\\$|\\text\{\s*\}")
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean(s: str) -> str:
    s = s.strip().replace("\u2212", "-").rstrip(".").strip()
    for a, b in _DELIMS:
        if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
            s = s[len(a) : -len(b)].strip()
            break
    s = _SPACES.sub("", s).rstrip(".")
    return _COSMETIC.sub("", s)


_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SLASH = re.compile(r"([+-]?\d+)/(\d+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))")
_SCIENTIFIC = re.compile(r"([+-]?\d(?:\.\d+)?)(?:\\times|\\cdot|\*|x)10\^\{?([+-]?\d{1,3})\}?")
# a number that opens a sentence: "57. The reason is that 39 + 18 equals 57." (never "62 + 74")
_LEADING = re.compile(r"([-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)[.,;:!]?(?:\s+[A-Za-z].*)?", re.DOTALL)
_TAG = re.compile(r"</?[A-Za-z]\w*>")  # markup around an answer: <answer>5</answer>
_UNITS = re.compile(r"(?:\\(?:text|mathrm|mbox)\{[A-Za-z .]*\}|[A-Za-z]+)+")


def _as_number(s: str) -> Fraction | None:
    """A cleaned answer as an exact fraction when it is a plain number, else None."""
    if len(s) > 4000:  # beyond Python's default int-from-str digit limit
        return None
    try:
        if _THOUSANDS.fullmatch(s):
            s = s.replace(",", "")
        if _PLAIN.fullmatch(s):
            return Fraction(s)
        m = _SLASH.fullmatch(s)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _FRAC.fullmatch(s)
        if m:
            num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
            if int(den) != 0:
                value = Fraction(int(num), int(den))
                return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _evaluated_number(pred: str) -> Fraction | None:
    """A predicted answer as an exact fraction when it is a number written out, not an
    expression that evaluates to one (rule b in the module docstring), else None."""
    lead = _LEADING.fullmatch(pred.strip())
    s = _clean(lead.group(1) if lead else pred)
    s = _TAG.sub("", s).rpartition("=")[2]
    while len(s) > 2 and s[0] + s[-1] in ("()", "{}"):
        s = s[1:-1]
    m = _SCIENTIFIC.fullmatch(s)
    if m:
        mantissa = Fraction(m.group(1))
        return mantissa * Fraction(10) ** int(m.group(2)) if 1 <= abs(mantissa) < 10 else None
    head = _NUMBER.match(s)
    if head and head.end() < len(s) and _UNITS.fullmatch(s, head.end()):
        s = head.group(0)
    value = _as_number(s)
    fraction = _SLASH.fullmatch(s) or _FRAC.fullmatch(s)
    if value is None or fraction is None:
        return value
    written = fraction.group(2) if fraction.re is _SLASH else (fraction.group(3) or fraction.group(5))
    return value if int(written) == value.denominator != 1 else None  # in lowest terms, not n/1


# ------------------------------------------------------------------ math-verify under a deadline


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so library `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _Deadline()


@contextmanager
def _sigalrm_deadline(seconds: float):
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, min(seconds, old_delay) if old_delay > 0 else seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay > 0:  # give back the caller's timer, minus the time we spent
                left = max(old_delay - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, old_interval)


_mv = None


def _math_verify():
    global _mv
    if _mv is None:
        import math_verify
        import math_verify.grader
        import math_verify.parser

        # we pass timeout=None on purpose (our own timer): silence its one-time "timeout disabled" warning
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        _mv = math_verify
    return _mv


def _verify_now(gold: str, pred: str) -> bool:
    mv = _math_verify()
    g = mv.parse(f"${gold}$", parsing_timeout=None)
    p = mv.parse(f"${pred}$", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(mv.verify(g, p, timeout_seconds=None))


def _verify_main_thread(gold: str, pred: str, timeout_s: float) -> bool:
    try:
        with _sigalrm_deadline(timeout_s):
            return _verify_now(gold, pred)
    except _Deadline:
        log.debug("math-verify timed out after %.1fs on %.80r", timeout_s, pred)
        return False
    except (Exception, RecursionError, MemoryError):
        return False


def _can_use_sigalrm() -> bool:
    return (
        threading.current_thread() is threading.main_thread()
        and hasattr(signal, "setitimer")
        and signal.getsignal(signal.SIGALRM) is not None  # None: a handler installed from C, not restorable
    )


class _Worker:
    """A helper subprocess answering {"gold","pred","timeout"} lines with {"ok": bool}."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _start(self) -> None:
        # the directory holding the `posttrain` package, so the helper imports this very copy
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from posttrain.rewards.math import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            env=env,
        )
        self.buf = b""
        if self._readline(_STARTUP_S) != {"ready": True}:
            self.stop()
            raise RuntimeError("math-verify helper did not start")

    def _readline(self, timeout_s: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool:
        with self.lock:
            for attempt in range(2):  # a helper that idled out is restarted once
                try:
                    if self.proc is None or self.proc.poll() is not None:
                        self.stop()
                        self._start()
                    request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout_s}) + "\n"
                    self.proc.stdin.write(request.encode())
                    self.proc.stdin.flush()
                except (OSError, RuntimeError, ValueError):
                    self.stop()
                    continue
                reply = self._readline(timeout_s + _GRACE_S)
                if reply is None:  # overran its own timer, or died (e.g. its idle exit raced us)
                    died = self.proc.poll() is not None
                    self.stop()
                    if died and attempt == 0:
                        continue
                    return False
                return bool(reply.get("ok"))
            return False


_worker = _Worker()
atexit.register(_worker.stop)


def shutdown_worker() -> None:
    """Stop the helper subprocess used from non-main threads (it restarts on demand)."""
    with _worker.lock:
        _worker.stop()


def _worker_pid() -> int | None:
    proc = _worker.proc
    return proc.pid if proc is not None and proc.poll() is None else None


def _worker_main() -> None:
    """Entry point of the helper subprocess."""
    # No PR_SET_PDEATHSIG: it fires when the *thread* that started us exits, and threads come
    # and go. The parent's death closes our stdin (EOF below), and each check has its own timer.
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except Exception:
        pass
    _math_verify()
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    stdin = sys.stdin.buffer
    # select() on a buffered reader is safe here: the parent sends one line, then waits for
    # the reply, so nothing is ever left in the buffer while we wait.
    while select.select([stdin], [], [], _IDLE_EXIT_S)[0]:
        line = stdin.readline()
        if not line:
            return
        try:
            req = json.loads(line)
            ok = _verify_main_thread(str(req["gold"]), str(req["pred"]), float(req["timeout"]))
        except Exception:
            ok = False
        out.write(json.dumps({"ok": ok}).encode() + b"\n")
        out.flush()


@lru_cache(maxsize=8192)
def _equivalent(gold: str, pred: str, timeout_s: float) -> bool:
    if _can_use_sigalrm():
        return _verify_main_thread(gold, pred, timeout_s)
    return _worker.ask(gold, pred, timeout_s)


# ------------------------------------------------------------------ the reward


def _reference(answer) -> str | None:
    if answer is None or isinstance(answer, bool):
        return None
    gold = as_text(answer).strip()
    if "\\boxed" in gold or "####" in gold:
        gold = extract_answer(gold) or ""
    return gold or None


def math_reward(prompt, completion, answer=None, *, timeout_s: float = DEFAULT_TIMEOUT_S, **_) -> float | None:
    """1.0 when the completion's final answer equals `answer` mathematically, else 0.0;
    None when `answer` is missing, e.g. a row of another task in a mixed dataset (rules in
    the module docstring). Never raises."""
    try:
        gold = _reference(answer)
        if gold is None:
            return None
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        g, p = _clean(gold), _clean(pred)
        if g and g == p:
            return 1.0
        gn = _as_number(g)
        if gn is not None:
            pn = _evaluated_number(pred)
            if pn is None or (pn != gn and gn.denominator == 1 and pn.denominator == 1):
                return 0.0
            if pn == gn:
                return 1.0
        if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
            return 0.0
        return 1.0 if _equivalent(gold, pred, float(timeout_s)) else 0.0
    except (Exception, RecursionError, MemoryError):
        log.debug("math_reward failed", exc_info=True)
        return 0.0


__all__ = ["extract_answer", "math_reward", "shutdown_worker", "MAX_ANSWER_CHARS"]
