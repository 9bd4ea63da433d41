"""Code reward: run a completion against its tests in the sandbox; 1.0 only if they all pass.

    extract_code(completion, partial_block=True) -> str | None
    code_reward(prompt, completion, tests, entry_point=None, partial=False, **_) -> float | None
    code_rewards(rows, completions, max_workers=None, **options) -> list[float | None]
    run_tests(program, tests, entry_point=None, prompt_code="", partial=False) -> CodeReport

`tests` is Python in HumanEval style (`def check(candidate): assert ...`, called as
`check(<entry_point>)`) or plain asserts (`assert add(1, 2) == 3`). When the prompt is Python
that defines `entry_point` (HumanEval), the program is the prompt followed by the completion (a
body continuation or a whole function), as in HumanEval's own harness.

Why a judge process. A harness that runs the tests in the candidate's own interpreter can be
fooled from inside: the candidate may exit with status 0 before the tests run, return an
object whose `__eq__` is always True, replace `AssertionError` or `isinstance` in `builtins`,
redefine `check`, print the harness's success marker, or read any key the harness holds
(`gc.get_objects()`, `/proc/self/mem`) and forge its signed report. So nothing the candidate
can touch decides the verdict:

  - the *candidate* sandbox runs the program, then serves calls over a pipe: "call <name>
    with these arguments" -> the return value as plain data, or the exception's type name;
  - the *judge* sandbox (a second process with its own uid, PID namespace and mounts) runs
    the prompt's helper code and the tests with genuine builtins; `candidate`, the entry
    point and any other free name of the tests are stubs that call across the pipe (a free name
    bound to a standard-library module in the candidate is imported afresh in the judge). Values
    cross as tagged JSON and are rebuilt on the judge's side from JSON's own types: only
    None/bool/int/float/str/bytes/complex/list/tuple/dict/set/frozenset can come back, so a
    comparison in the tests compares two genuine builtin values (an always-equal object, or an
    int subclass, arrives as a plain value or not at all). Candidate exceptions re-raise in
    the judge as the builtin exception of the same name (else, and for StopIteration, which
    would silently end an iteration in the tests, as `CandidateError`);
  - the tests and a random nonce reach the judge through a pipe (never a file); when the
    tests have run to the end the judge writes `{nonce, passed, total}` to a pipe that only
    the parent reads. A missing, malformed or wrong-nonce verdict, a timeout, or a candidate
    that died mid-test scores 0.0.

Consequences: the candidate's functions must take and return plain data (objects of its own
classes, generators or open files cannot cross: such a call fails the test); arguments are
copies, so in-place mutation of an argument is invisible to the tests; the tests' own helper
functions (and those defined in the prompt) always run in the judge, never the candidate's
redefinitions of them; both sides have the standard library only. Resource and OS isolation
(time, memory, processes, network, files, output size) come from `posttrain.rewards.sandbox`;
see its docstring for what each isolation mode does and does not stop.

Not guarded against: a candidate that special-cases the inputs it is called with (it sees
each call's arguments, never the expected values) or hard-codes answers it memorised; weak
tests; and, in the weaker isolation modes, a candidate that attacks the judge process through
the operating system (same uid: ptrace or /proc/<pid>/mem).
"""

from __future__ import annotations

import ast
import builtins
import hmac
import inspect
import json
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from posttrain.rewards.code_wire import _dec, _enc, _recv, _send  # shipped with _agent and _judge
from posttrain.rewards.sandbox import Limits, SandboxProcess, SandboxResult, pump

MAX_REPLY_BYTES = 16 << 20  # one value sent by the candidate
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\r?\n", re.IGNORECASE)


# ----------------------------------------------------------------------------- extraction
def extract_code(completion, partial_block: bool = True) -> str | None:
    """The last fenced Python block (```python, ```py or a bare ```), else the text after an
    unclosed opening fence, else the whole completion. Chat messages: the last one's content.

    A fence opened after the last closed block and never closed is a completion cut off mid-block
    (by the token budget): with ``partial_block=False`` (what ``code_reward`` grades) that gives
    None, never the fragment nor an earlier block the completion went on to replace; the default
    keeps the fragment, for display."""
    if isinstance(completion, list):
        completion = completion[-1].get("content", "") if completion and isinstance(completion[-1], dict) else ""
    elif isinstance(completion, dict):
        completion = completion.get("content", "")
    text = str(completion or "")
    blocks = list(_FENCE.finditer(text))
    opened = _OPEN_FENCE.search(text, blocks[-1].end() if blocks else 0)
    if opened and not partial_block:
        return None
    if blocks:
        return blocks[-1].group(1)
    if opened:
        return text[opened.end():]
    return text


def prompt_code(prompt, entry_point: str | None) -> str:
    """`prompt` if it is Python that defines `def <entry_point>` at top level (HumanEval), else ""."""
    if not entry_point or not isinstance(prompt, str) or f"def {entry_point}" not in prompt:
        return ""
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ""
    ok = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point for n in tree.body)
    return prompt if ok else ""


def build_program(code: str, prompt: str = "") -> str:
    """The candidate's program: `code`, after `prompt` (Python) when one is given. An indented
    `code` continues the prompt's last function; a dedented one follows it (and may redefine it)."""
    if not prompt:
        return code
    first = next((line for line in code.splitlines() if line.strip()), "")
    sep = "" if prompt.endswith("\n") else "\n"
    return prompt + sep + code if first[:1] in (" ", "\t") else prompt + sep + "\n" + code


# ----------------------------------------------------------------------------- sandbox scripts
# `_agent` and `_judge` run inside the sandboxes, shipped as source after the wire format
# (posttrain.rewards.code_wire): they must stay self-contained (module-level names only from
# the standard library, imported inside, and the wire format's four functions).

def _agent(P):  # pragma: no cover - candidate sandbox: run the program, then serve calls
    import builtins
    import os
    import sys
    import traceback

    rfd, wfd = P["rfd"], P["wfd"]
    g = {"__name__": "__main__", "__builtins__": builtins}
    code = P.pop("code")
    try:
        exec(compile(code, "solution.py", "exec"), g)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    del code
    while True:
        req = _recv(rfd, 1 << 26)
        if req is None:
            return
        try:
            if req["op"] == "lookup":  # ["callable"] | ["module", name] | ["value", plain data] | ["missing"]
                out = {}
                for name in req["names"]:
                    v = g.get(name, _agent)
                    try:
                        out[name] = (["missing"] if v is _agent else ["module", v.__name__] if type(v) is type(os)
                                     else ["callable"] if callable(v) else ["value", _enc(v)])
                    except Exception:
                        out[name] = ["missing"]
                reply = {"ok": out}
            else:
                value = g[req["name"]](*_dec(req["args"]), **_dec(req["kwargs"]))
                try:
                    reply = {"ok": _enc(value)}
                except Exception as e:
                    reply = {"bad": str(e)}
        except Exception as e:
            try:
                msg = str(e)[:300]
            except Exception:
                msg = ""
            reply = {"exc": type(e).__name__, "msg": msg}
        _send(wfd, reply)


def _judge(P):  # pragma: no cover - judge sandbox: trusted tests against stubs of the candidate
    import ast
    import builtins
    import importlib
    import json
    import os
    import sys

    class CandidateError(Exception):
        """The candidate raised a non-builtin exception or returned something unusable."""

    class CandidateGone(BaseException):
        """The candidate process died or broke the protocol (not catchable by `except Exception`)."""

    state = {"gone": 0}

    def rpc(msg):
        if state["gone"]:
            state["gone"] += 1
            raise CandidateGone("the candidate process is gone")
        try:
            _send(P["wfd"], msg)
            reply = _recv(P["rfd"], P["max_reply"])
            if type(reply) is not dict or not ({"ok", "bad", "exc"} & reply.keys()):
                raise ValueError("the candidate exited" if reply is None else "bad reply")
            return reply
        except Exception as e:
            state["gone"] += 1
            raise CandidateGone("candidate died or broke the protocol: %s" % e) from None

    def stub(name):
        def call(*args, **kwargs):
            enc = {"op": "call", "name": name, "args": _enc(args), "kwargs": _enc(kwargs)}
            reply = rpc(enc)
            if "ok" in reply:
                try:
                    return _dec(reply["ok"])
                except Exception:
                    state["gone"] += 1
                    raise CandidateGone("malformed value from the candidate") from None
            if "bad" in reply:
                raise CandidateError(str(reply["bad"])[:300])
            cls = getattr(builtins, str(reply.get("exc")), None)
            # StopIteration would end an iteration silently: `all(map(f, cases))` -> True
            if not (isinstance(cls, type) and issubclass(cls, Exception)) or cls in (StopIteration, StopAsyncIteration):
                cls = CandidateError
            try:
                exc = cls(str(reply.get("msg", ""))[:300])
            except Exception:
                exc = CandidateError(str(reply.get("exc")))
            raise exc

        call.__name__ = call.__qualname__ = name
        return call

    def run_stmt(stmt, scope):
        code = compile(ast.Module(body=[stmt], type_ignores=[]), "tests.py", "exec")
        before = state["gone"]
        try:
            exec(code, scope)
        except BaseException:
            return False
        return state["gone"] == before

    passed, total, error = 0, 1, ""
    try:
        ns = {"__name__": "__main__", "__builtins__": builtins}
        if P["prompt_code"]:
            exec(compile(P["prompt_code"], "prompt.py", "exec"), ns)
        if P["remote"]:
            found = rpc({"op": "lookup", "names": P["remote"]})["ok"]
            for name in P["remote"]:
                kind = found.get(name) if type(found) is dict else None
                ns.pop(name, None)
                if kind == ["callable"]:
                    ns[name] = stub(name)
                elif type(kind) is list and len(kind) == 2 and kind[0] == "value":
                    ns[name] = _dec(kind[1])
                elif kind and kind[0] == "module" and kind[1] in getattr(sys, "stdlib_module_names", ()):
                    ns[name] = importlib.import_module(kind[1])  # the judge's own copy of the module
        tests, target = P["tests"], P["check_target"]
        if not P["partial"]:
            exec(compile(tests, "tests.py", "exec"), ns)
            if P["call_check"]:
                ns["check"](ns[target])
            passed = 0 if state["gone"] else 1
        else:
            tree = ast.parse(tests)
            body, scope = tree.body, ns
            check = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
            if check and target:
                for stmt in tree.body:
                    call = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                    if not (call and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "check"):
                        if not run_stmt(stmt, ns):
                            raise RuntimeError("test setup failed")
                fn = check[-1]
                body, scope = fn.body, dict(ns)
                if fn.args.args:
                    scope[fn.args.args[0].arg] = ns[target]

            def is_case(stmt):
                return any(isinstance(n, ast.Assert) and not isinstance(n.test, ast.Constant) for n in ast.walk(stmt))

            cases = [is_case(stmt) for stmt in body]
            if not any(cases):  # nothing countable: all or nothing
                passed = int(all(run_stmt(stmt, scope) for stmt in body))
            else:
                total = sum(cases)
                for stmt, case in zip(body, cases):
                    ok = run_stmt(stmt, scope)
                    if case:
                        passed += ok
                    elif not ok:
                        break
    except BaseException as e:  # noqa: BLE001 - anything short of the end is a failure
        error = "%s: %s" % (type(e).__name__, str(e)[:300])
        if not P["partial"]:
            passed = 0
    os.write(P["vfd"], json.dumps({"nonce": P["nonce"], "passed": passed, "total": total, "error": error}).encode())
    os.close(P["vfd"])


def _ship(*fns) -> str:
    return "\n\n".join(inspect.getsource(f) for f in (_enc, _dec, _send, _recv, *fns))


_AGENT_SOURCE = _ship(_agent) + "\n_agent(PAYLOAD)\n"
_JUDGE_SOURCE = _ship(_judge) + "\n_judge(PAYLOAD)\n"


# ----------------------------------------------------------------------------- orchestration
@dataclass(frozen=True)
class CodeReport:
    score: float  # 1.0/0.0, or passed/total with partial=True
    passed: int
    total: int
    reason: str  # "" when every test passed; else why not
    judge: SandboxResult | None = None
    candidate: SandboxResult | None = None


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names read, names bound) anywhere in `tree`."""
    loaded, bound = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (loaded if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, ast.alias):
            bound.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return loaded, bound


def _plan(tests: str, entry_point: str | None, prompt: str) -> dict:
    """What the judge needs to know about the tests: which names live in the candidate, and
    whether to call `check`. Raises ValueError on tests that cannot be run."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests are not valid Python: {e}") from None
    if not tree.body:
        raise ValueError("tests are empty")
    loaded, bound = _names(tree)
    if prompt:
        bound |= _names(ast.parse(prompt))[1]
    remote = (loaded - bound - set(dir(builtins))) | ({entry_point} if entry_point else set())
    has_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
    calls = [n.value for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and isinstance(n.value.func, ast.Name) and n.value.func.id == "check"]
    target = entry_point
    if calls and calls[0].args and isinstance(calls[0].args[0], ast.Name):
        target = target or calls[0].args[0].id
    if has_check and not calls and not entry_point:
        raise ValueError("tests define check(candidate) but no entry_point was given")
    return {"remote": sorted(remote), "call_check": has_check and not calls, "check_target": target}


def row_problem(row: dict) -> tuple[str, str] | None:
    """``("tests", problem)`` when a row's tests cannot be run (not Python, empty, ``check``
    without an entry point), else None; a row without tests is fine (the reward skips it)."""
    tests = row.get("tests")
    if not isinstance(tests, str) or not tests.strip():
        return None
    entry_point = row.get("entry_point")
    try:
        _plan(tests, entry_point, prompt_code(row.get("prompt"), entry_point))
    except ValueError as e:
        return "tests", str(e)
    return None


def run_tests(program: str, tests: str, entry_point: str | None = None, prompt_code: str = "",
              partial: bool = False, limits: Limits = Limits()) -> CodeReport:
    """Run `program` in a candidate sandbox and `tests` in a judge sandbox (see module doc).
    `prompt_code` is trusted Python (helpers the tests use) executed in the judge."""
    plan = _plan(tests, entry_point, prompt_code)
    nonce = secrets.token_hex(16)
    to_cand_r, to_cand_w = os.pipe()
    to_judge_r, to_judge_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    procs: list[SandboxProcess] = []
    start = time.monotonic()
    try:
        procs.append(SandboxProcess(_AGENT_SOURCE, {"code": program, "rfd": to_cand_r, "wfd": to_judge_w},
                                    limits, pass_fds=(to_cand_r, to_judge_w)))
        payload = {**plan, "tests": tests, "prompt_code": prompt_code, "partial": bool(partial), "nonce": nonce,
                   "rfd": to_judge_r, "wfd": to_cand_w, "vfd": verdict_w, "max_reply": MAX_REPLY_BYTES}
        procs.append(SandboxProcess(_JUDGE_SOURCE, payload, limits, pass_fds=(to_judge_r, to_cand_w, verdict_w),
                                    read_fds=(verdict_r,)))
    except BaseException:
        os.close(verdict_r)
        for p in procs:
            p.close()
        raise
    finally:
        for fd in (to_cand_r, to_cand_w, to_judge_r, to_judge_w, verdict_w):
            os.close(fd)
    cand, judge = procs
    try:
        finished = pump(procs, start + limits.timeout_s, judge.exited)
        if finished:  # let the candidate see end-of-stream and exit by itself (for its status)
            pump([cand], min(start + limits.timeout_s, time.monotonic() + 0.2), cand.exited)
    finally:
        for p in procs:
            p.close()
    return _report(judge.reads[verdict_r], nonce, finished, judge.result(), cand.result(), partial)


def _report(raw: bytes, nonce: str, finished: bool, judge: SandboxResult, cand: SandboxResult, partial: bool) -> CodeReport:
    def fail(reason: str) -> CodeReport:
        return CodeReport(0.0, 0, 0, reason, judge, cand)

    if not finished:
        return fail(f"timed out after {judge.seconds:.1f}s")
    try:
        v = json.loads(bytes(raw))
        passed, total = v["passed"], v["total"]
        good = (type(v) is dict and type(passed) is int and type(total) is int and 0 <= passed <= total
                and total > 0 and hmac.compare_digest(str(v["nonce"]), nonce))
    except (ValueError, KeyError, TypeError):
        good = False
    if not good:
        return fail(f"no valid verdict from the judge (judge {judge.status}, candidate {cand.status})")
    error = str(v.get("error") or "")
    if partial:
        return CodeReport(passed / total, passed, total, error if passed < total else "", judge, cand)
    score = 1.0 if passed == total else 0.0
    return CodeReport(score, passed, total, "" if score else (error or "a test failed"), judge, cand)


def code_reward(prompt, completion, tests=None, entry_point=None, partial=False, timeout_s: float = 5.0,
                memory_mb: int = 512, **_) -> float | None:
    """1.0 when every test passes, else 0.0; with `partial=True` the fraction of test cases
    (statements holding an assert, in `check`'s body or at top level) that pass.
    None when the row has no tests (cannot judge); 0.0 for a completion cut off inside a code
    block (``extract_code(partial_block=False)``): its fragment is not run."""
    if not isinstance(tests, str) or not tests.strip():
        return None
    code = extract_code(completion, partial_block=False)
    if code is None:
        return 0.0
    helpers = prompt_code(prompt, entry_point)
    program = build_program(code, helpers)
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
    return run_tests(program, tests, entry_point, helpers, partial, limits).score


def code_rewards(rows, completions, max_workers: int | None = None, **options) -> list[float | None]:
    """`code_reward` for each (row, completion), in parallel: at most `max_workers` (default
    and cap: the core count) evaluations at a time, each in its own sandbox processes."""
    rows, completions = list(rows), list(completions)
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows for {len(completions)} completions")
    cpus = os.cpu_count() or 1
    workers = max(1, min(max_workers or cpus, cpus, len(rows) or 1))

    def one(i: int) -> float | None:
        row = {**rows[i], **options}
        row.pop("completion", None)
        return code_reward(row.pop("prompt", ""), completions[i], **row)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(rows))))


__all__ = ["CodeReport", "build_program", "code_reward", "code_rewards", "extract_code", "prompt_code", "row_problem",
           "run_tests"]
