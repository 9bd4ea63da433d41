"""math reward: answer extraction, equivalence (math-verify + fast paths), timeouts, threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from posttrain.rewards import math as mr
from posttrain.rewards.math import extract_answer, math_reward

# (reference answer, completion, expected reward); the comment says which rule decides.
CASES = [
    # --- equivalent forms
    ("0.5", "Answer: 1/2", 1.0),  # numeric fast path: Fraction(1,2) == Fraction("0.5")
    ("1/2", r"so \boxed{\frac{1}{2}}", 1.0),  # \frac{a}{b} read as a fraction
    (r"\frac{1}{2}", "The answer is 0.5", 1.0),  # "answer is" marker, fraction == decimal
    ("0.5", r"\boxed{\dfrac{1}{2}}", 1.0),  # \dfrac too
    ("1000", "Answer: 1,000", 1.0),  # thousands separator dropped
    ("1,000", "Answer: 1000", 1.0),  # ... on either side
    ("1000000", r"\boxed{1,000,000}", 1.0),
    ("5", "Answer: 5.", 1.0),  # trailing period
    ("5", r"so \boxed{5 \text{ apples}}", 1.0),  # \text unit: math-verify drops it
    ("12", "Answer: 12 cm", 1.0),  # plain-word unit: math-verify drops it
    ("50", r"Answer: 50\%", 1.0),  # cosmetic clean-up removes \%
    ("90", r"\boxed{90^\circ}", 1.0),  # ... and ^\circ
    ("-3", "Answer: \u22123", 1.0),  # unicode minus sign
    ("2", "Answer: 2.0", 1.0),  # 2.0 == 2 as fractions
    ("x+1", r"\boxed{1+x}", 1.0),  # symbolic: math-verify simplifies
    (r"\sqrt{2}/2", r"\boxed{\frac{\sqrt{2}}{2}}", 1.0),
    ("72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),  # GSM8K marker
    ("#### 72", "Answer: 72", 1.0),  # a GSM8K-style reference is reduced first
    (r"\boxed{3}", "Answer: 3", 1.0),  # a MATH-style reference too
    (r"$\frac{3}{4}$", "Answer: 0.75", 1.0),  # $...$ around the reference
    ("1/3", "Answer: 0.333333", 1.0),  # math-verify's 6-digit float rounding
    ("10", "the final answer: 10", 1.0),  # marker is case-insensitive
    ("7", "**Answer:** 7", 1.0),  # markdown emphasis around the marker
    ("(1,2)", r"\boxed{(1, 2)}", 1.0),  # intervals/tuples via math-verify
    ("5", "Solving, x = 5. The answer is $x = 5$", 1.0),  # x = 5 equals 5 (math-verify)
    ("4", "Answer: 4\n", 1.0),
    # --- wrong answers
    ("5", "Answer: 6", 0.0),  # two unequal integers: 0.0 on the fast path
    ("0.5", "Answer: 0.25", 0.0),  # unequal non-integers: math-verify says no
    ("3", r"\boxed{3\sqrt{2}}", 0.0),  # a number prefix is not the answer
    ("x+1", r"\boxed{x-1}", 0.0),
    ("1000", "Answer: 100", 0.0),
    ("57", "Answer: 75", 0.0),
    ("3", "Answer: 3\nActually, Answer: 5", 0.0),  # the LAST marker counts: 5
    # --- a plain-number reference takes only a number: unevaluated expressions score 0
    # (math-verify would evaluate them, and a policy learns to hand the question back)
    ("136", "Answer: 62 + 74", 0.0),
    ("136", "Answer: 2*68", 0.0),
    ("136", r"Answer: 68 \cdot 2", 0.0),
    ("136", r"Answer: \frac{272}{2}", 0.0),  # a fraction not in lowest terms
    ("136", "Answer: 136/1", 0.0),
    ("136", "Answer: 140 - 4", 0.0),
    ("136", "Answer: 136 + 0", 0.0),
    ("136", "The answer is x. 62 + 74 = x", 0.0),  # the value after the last '=' is not a number
    ("136", r"\boxed{136 = 62 + 74}", 0.0),
    ("1/2", "Answer: 2/4", 0.0),
    ("136", "Answer: 62 + 74 = 136", 1.0),  # the value after the last '=' counts
    ("57", "The answer is 57. The reason is that 39 + 18 equals 57.", 1.0),  # a number opening a sentence
    ("57", "The answer is 39 + 18. The reason is that it equals 57.", 0.0),
    ("136", r"Answer: 1.36 \times 10^{2}", 1.0),  # scientific notation is a number
    ("136", r"Answer: \$136", 1.0),
    ("-3/4", r"Answer: \frac{-3}{4}", 1.0),
    ("-3/4", r"Answer: -\frac{3}{4}", 1.0),
    ("1/2", r"Answer: \dfrac12", 1.0),
    # --- no answer at all
    ("5", "I do not know.", 0.0),
    ("5", "", 0.0),
    ("5", r"\boxed{}", 0.0),  # empty box, no marker, no number
    # --- several boxed answers: the last complete one counts
    ("5", r"First \boxed{3}, corrected: \boxed{5}", 1.0),
    ("3", r"First \boxed{3}, corrected: \boxed{5}", 0.0),
    ("5", r"\boxed{\boxed{5}}", 1.0),  # nested: the innermost starts last
    (r"\frac{1}{2}", r"\boxed{\frac{1}{2}} and Answer: 7", 1.0),  # a box beats a marker
    # --- last-number fallback
    ("42", "We get 40 and then add 2 to get 42", 1.0),
    ("40", "We get 40 and then add 2 to get 42", 0.0),
    # --- huge numbers
    ("123456789012345678901234567890", "Answer: 123456789012345678901234567890", 1.0),
    ("123456789012345678901234567890", "Answer: 123456789012345678901234567891", 0.0),  # exact, no float rounding
    ("10^{100}", "Answer: 1" + "0" * 100, 1.0),  # googol in two spellings (math-verify)
    ("2", "Answer: " + "9" * 5000, 0.0),  # over MAX_ANSWER_CHARS and the int-digit limit: no crash
    # --- malformed LaTeX: never raises
    ("1/2", r"\boxed{\frac{1}{2}", 0.0),  # an unclosed box is a cut-off answer: no answer
    ("5", "\\frac{", 0.0),
    ("5", "}}}{{{\\boxed{", 0.0),
    ("5", r"\boxed{5}}}}", 1.0),  # stray closing braces ignored
    ("5", r"\boxed{\left( 5", 0.0),  # unclosed box: cut off, never the last number 5
    ("5", "Answer: $$\\frac{}{}{$$", 0.0),
]


@pytest.mark.parametrize("answer,completion,expected", CASES)
def test_math_reward_table(answer, completion, expected):
    assert math_reward("", completion, answer) == expected


def test_table_is_big_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"x \boxed{a{b}c} y", "a{b}c"),  # nested braces kept
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are literal
        (r"\boxed {7}", "7"),  # space before the brace
        ("The answer is: 12 apples.", "12 apples."),  # the rest of the marker's line
        ("Answer:\n\n  41\nmore", "41"),  # marker ending its line: the next non-empty line
        ("#### 1,234", "1,234"),
        ("no marker, numbers 3/4 then 7.5", "7.5"),
        ("fraction last 3/4", "3/4"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_odd_inputs_never_raise():
    assert math_reward("", "Answer: 4", None) is None  # no reference: cannot judge
    assert math_reward("", "Answer: 4", "") is None
    assert math_reward("", "Answer: 4", 4) == 1.0  # an int reference
    assert math_reward("", [{"role": "assistant", "content": "Answer: 4"}], "4") == 1.0  # conversational
    assert math_reward("", None, "4") == 0.0
    assert math_reward("", 12345, "12345") == 1.0  # non-str completion is str()-ed
    assert math_reward("", "\\boxed{" * 10_000, "1") == 0.0


def test_extraction_is_linear_on_adversarial_text():
    # 200k unclosed boxes + 200k markers: a quadratic scan would take minutes
    start = time.perf_counter()
    assert extract_answer("\\boxed{" * 200_000 + "Answer: " * 200_000 + "9") is None  # ends inside a box
    assert extract_answer("\\boxed{}" * 200_000 + "{" * 200_000 + "}" * 200_000 + "Answer: " * 200_000 + "9") == "9"
    assert time.perf_counter() - start < 5.0


PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"  # sympy cannot decide 9^9^9^9 == sqrt(5) quickly
SYMBOLIC = r"\sqrt{5}"  # a reference that is not a plain number, so the check goes to math-verify


def test_pathological_latex_times_out_in_main_thread():
    before, _ = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout may have one armed
    start = time.perf_counter()
    assert math_reward("", PATHOLOGICAL, SYMBOLIC, timeout_s=0.5) == 0.0
    elapsed = time.perf_counter() - start
    assert 0.4 < elapsed < 5.0  # it really ran into the 0.5 s deadline, and stopped there
    after, _ = signal.getitimer(signal.ITIMER_REAL)
    if before == 0.0:
        assert after == 0.0  # our timer is not left armed
    else:
        assert before - elapsed - 1.0 < after <= before  # the outer timer is back, minus elapsed


def test_outer_alarm_is_preserved():
    # a caller (pytest-timeout, a trainer) has its own SIGALRM timer armed: we must give it back
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert math_reward("", r"\boxed{x^2+3x}", "x(x+3)") == 1.0  # goes through math-verify
        handler = signal.getsignal(signal.SIGALRM)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert handler is not mr._on_alarm  # the caller's handler is back
        assert 20.0 < left <= 30.0  # and its timer still runs, minus the time we spent
        assert fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("value", fn()))
    t.start()
    t.join(60)
    assert not t.is_alive()
    return box["value"]


def test_from_a_worker_thread_uses_the_helper_process_and_cleans_up():
    # math-verify's own signal timer raises ValueError outside the main thread; ours must not
    try:
        assert _in_thread(lambda: math_reward("", r"\boxed{2+y}", "y+2")) == 1.0
        assert _in_thread(lambda: math_reward("", r"\boxed{2-y}", "y+2")) == 0.0
        pid = mr._worker_pid()
        assert pid is not None and pid != os.getpid()
        start = time.perf_counter()
        assert _in_thread(lambda: math_reward("", r"\boxed{7^{7^{7^{7}}}}", SYMBOLIC, timeout_s=0.5)) == 0.0
        assert time.perf_counter() - start < 5.0
    finally:
        mr.shutdown_worker()
    assert mr._worker_pid() is None
    assert not os.path.exists(f"/proc/{pid}")  # reaped: no zombie, no stray process


def test_a_hung_helper_is_killed_and_replaced():
    try:
        assert _in_thread(lambda: math_reward("", r"\boxed{3+z}", "z+3")) == 1.0
        pid = mr._worker_pid()
        os.kill(pid, signal.SIGSTOP)  # the helper now ignores its own timer: only the parent's deadline helps
        start = time.perf_counter()
        assert _in_thread(lambda: math_reward("", r"\boxed{4+z}", "z+4", timeout_s=0.5)) == 0.0
        assert time.perf_counter() - start < 0.5 + mr._GRACE_S + 2.0
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
        assert _in_thread(lambda: math_reward("", r"\boxed{5+z}", "z+5")) == 1.0  # a fresh helper answers
        assert mr._worker_pid() not in (None, pid)
    finally:
        mr.shutdown_worker()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_helper_exits_when_its_parent_dies_abruptly():
    # the parent starts the helper from a thread, then dies without running atexit handlers
    code = (
        "import os, sys, threading\n"
        "from posttrain.rewards import math as mr\n"
        "t = threading.Thread(target=lambda: mr.math_reward('', r'\\boxed{1+q}', 'q+1')); t.start(); t.join()\n"
        "print(mr._worker_pid(), flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)  # its stdin closed with the parent: it saw EOF and left


# A completion that ends mid-answer (cut off by the token budget, or malformed) is no answer: it
# must never be graded on the fragment it ends with (a number inside the open box, a prefix of an
# expression that math-verify would still parse). Each of these scored 1.0 before.
CUT_OFF = [
    ("1", r"so \boxed{\frac{1}{"),  # the case: the last number in an open box
    ("5", r"First \boxed{5}, but wait: \boxed{\frac{1}{"),  # a newer box, left open, replaces the old one
    ("1", r"so we get \frac{1}{"),  # no box, no marker: the text ends inside an open group
    ("3", "We add 1 and 2 to get 3 +"),  # the last-number fallback on a text ending mid-expression
    ("1", "Answer: 1/"),  # math-verify reads "1/" as 1
    ("1", "Answer: 1 +"),
    ("1", "Answer: 1 -"),
    ("2", r"Answer: 2 \cdot"),
    ("1", r"Answer: 1 \times"),
    ("1", "Answer: 1^"),
    ("1", "Answer: 1 ="),
    ("1", "Answer: 1,"),  # a list cut after its first item
    ("1", r"Answer: \left( 1"),  # a \left without its \right
    ("1", r"Answer: \frac{1}{"),
    ("1", r"\boxed{1 +}"),  # a closed box holding an unfinished expression
]


@pytest.mark.parametrize("answer,completion", CUT_OFF)
def test_cut_off_or_malformed_final_answer_scores_zero(answer, completion):
    assert extract_answer(completion) is None
    assert math_reward("", completion, answer) == 0.0


def test_complete_answers_next_to_cut_off_ones_still_score():
    assert math_reward("", r"so \boxed{\frac{1}{2}}", "1/2") == 1.0  # the same answer, finished
    assert math_reward("", "Answer: x + 1", "1 + x") == 1.0  # an operator inside is fine, only a dangling one is not
    assert math_reward("", "Answer: -1", "-1") == 1.0  # a leading minus is a sign
    assert math_reward("", r"Answer: \left( 1 \right)", "1") == 1.0
    assert math_reward("", "Answer: 5\nCheck: 5 +", "5") == 1.0  # the marked answer was complete; text after it is not graded
    assert math_reward("", r"\boxed{\{1, 2\}} so {", r"\{1,2\}") == 1.0  # escaped braces and a closed box
    # a closing tag after the answer is markup, not the operator '>' (the think/answer format)
    assert math_reward("", "<think>2+3</think><answer>5</answer>", "5") == 1.0
    assert math_reward("", "Answer: 5</answer>\n", "5") == 1.0
    assert math_reward("", "so 2+3 = <answer>", "5") == 0.0  # ...an opening one at the end: nothing written yet
