"""Programs written to cheat the code reward: each must score 0.0, and the machine must be
healthy afterwards (no sandbox process left, no temporary directory left).

Where a cheat would fool a naive harness (program + tests in one interpreter, success read
from the exit status or a printed marker), the test first shows that it does, so the 0.0
below it is evidence about our harness, not about a cheat that never worked.

Logic cheats run in every isolation mode this machine offers; OS-level cheats run in the
best mode and are skipped (with the reason) in a mode that does not claim to stop them.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest

from posttrain.rewards import sandbox
from posttrain.rewards.code import build_program, code_reward, run_tests
from posttrain.rewards.sandbox import Limits

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TESTS = (
    "def check(candidate):\n"
    "    assert candidate(1, 2) == 3\n"
    "    assert candidate(-5, 5) == 0\n"
    "    assert candidate(10, 20) == 30\n"
)
HONEST = "    return a + b\n"
TOKEN = f"cheat-token-{os.getpid()}"  # in the argv of processes a cheat tries to leave behind
FAST = Limits(timeout_s=3.0)


def score(completion: str, tests: str = TESTS, **kw) -> float:
    return code_reward(PROMPT, completion, tests, "add", timeout_s=kw.pop("timeout_s", 3.0), **kw)


def report(completion: str, tests: str = TESTS, limits: Limits = FAST):
    return run_tests(build_program(completion, PROMPT), tests, "add", PROMPT, limits=limits)


def naive_passes(completion: str, tests: str = TESTS) -> tuple[bool, bool]:
    """(exit status 0, success marker printed) for prompt + completion + tests + check(add)
    run as one program: the harness many RL codebases use."""
    call = "\ncheck(add)" if "def check" in tests else ""
    res = sandbox.run(PROMPT + completion + "\n" + tests + call + "\nprint('ALL TESTS PASSED')\n", timeout_s=5)
    return res.returncode == 0, "ALL TESTS PASSED" in res.stdout


# ----------------------------------------------------------------------------- machine health
def _procs() -> dict[int, tuple[int, int, str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]  # zombies count too: nothing may leak
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            out[int(entry)] = (int(ppid), os.stat(f"/proc/{entry}").st_uid, cmd)
        except (OSError, ValueError, IndexError):
            pass
    return out


def stray_processes() -> list[str]:
    """Sandbox processes (marker in argv, a sandbox uid, or this module's token) that hang
    off this test process or were orphaned to pid 1; other sessions' sandboxes are ignored."""
    procs = _procs()
    uids = sandbox.sandbox_uids() if sandbox.isolation() == "full" else range(0)

    def ours(pid):
        ppid, uid, cmd = procs[pid]
        return sandbox.MARKER in cmd or TOKEN in cmd or uid in uids

    found = []
    for pid in procs:
        if not ours(pid):
            continue
        top = pid
        while procs.get(top) and ours(top) and procs[top][0] in procs:
            top = procs[top][0]
        root = top if not ours(top) else procs[top][0]
        if root in (os.getpid(), 1, 0):
            found.append(f"{pid} (parent {procs[pid][0]}, uid {procs[pid][1]}): {procs[pid][2][:120]}")
    return found


def temp_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(sandbox.TEMP_PREFIX)}


@pytest.fixture(autouse=True)
def healthy():
    before = temp_dirs()
    yield
    assert stray_processes() == []
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        assert f.read().split() == [], "this test process still has children"
    assert temp_dirs() <= before, "a sandbox temporary directory was left behind"


MODES = ["full", "namespaces", "none"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """Run the test in each isolation mode available here (skipped where unavailable)."""
    monkeypatch.setenv("POSTTRAIN_SANDBOX", request.param)
    monkeypatch.setattr(sandbox, "_mode_cache", None)
    try:
        return sandbox.isolation()
    except RuntimeError as e:
        pytest.skip(str(e))


def needs(*modes: str) -> str:
    m = sandbox.isolation()
    if m not in modes:
        pytest.skip(f"isolation mode {m!r} does not claim this property (needs {' or '.join(modes)})")
    return m


def test_honest_solution_passes_in_every_mode(mode):
    assert score(HONEST) == 1.0
    assert score("    return a - b\n") == 0.0


# ----------------------------------------------------------------------------- early exit
def test_sys_exit_before_tests(mode):
    cheat = "    return 0\nimport sys\nsys.exit(0)\n"
    assert naive_passes(cheat)[0]
    assert score(cheat) == 0.0


def test_os_exit_inside_tests(mode):
    cheat = ("    global n\n    n = globals().get('n', 0) + 1\n"  # the first call answers, the second exits
             "    if n > 1:\n        import os\n        os._exit(0)\n    return 3\n")
    assert naive_passes(cheat)[0]
    rep = report(cheat)
    assert rep.score == 0.0 and "CandidateGone" in rep.reason


def test_raise_system_exit_inside_tests(mode):
    cheat = "    raise SystemExit(0)\n"
    assert naive_passes(cheat)[0]
    assert score(cheat) == 0.0


# ----------------------------------------------------------------------------- comparisons
ALWAYS_EQUAL = {
    "object": "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n    __hash__ = None\n",
    "int-subclass": "class E(int):\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n",
    "str-subclass": "class E(str):\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n",
}


@pytest.mark.parametrize("kind", ALWAYS_EQUAL)
def test_always_equal_object(mode, kind):
    cheat = "    return E()\n" + ALWAYS_EQUAL[kind]
    assert naive_passes(cheat) == (True, True)
    assert score(cheat) == 0.0


def test_monkeypatched_builtins(mode):
    tests = ("def check(candidate):\n"
             "    assert abs(candidate(1.0, 2.0) - 3.0) < 1e-9\n"
             "    assert isinstance(candidate(1, 2), int) and len([candidate(1, 1)]) == 1\n"
             "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n")
    cheat = ("    return 0.0\n"
             "import builtins\n"
             "builtins.abs = lambda x: 0.0\n"
             "builtins.isinstance = lambda *a: True\n"
             "builtins.AssertionError = type('Nope', (Exception,), {})\n"
             "builtins.print = lambda *a, **k: None\n")
    assert naive_passes(cheat, tests) == (True, False)  # print was patched too
    assert score(cheat, tests) == 0.0
    assert score(HONEST, tests) == 1.0


def test_stop_iteration_ends_the_tests_early(mode):
    """`all(map(...))` stops at a StopIteration raised inside the mapped function and is True."""
    tests = "cases = [((1, 2), 3), ((2, 2), 4)]\nassert all(map(lambda c: add(*c[0]) == c[1], cases))\n"
    cheat = "    raise StopIteration\n"
    assert naive_passes(cheat, tests) == (True, True)
    assert code_reward(PROMPT, cheat, tests, "add") == 0.0
    assert code_reward(PROMPT, HONEST, tests, "add") == 1.0


def test_redefined_check_and_test_helpers(mode):
    tests = "def same(a, b):\n    return type(a) is type(b) and a == b\n\nassert same(add(2, 2), 4)\nassert same(add(1, 1), 2)\n"
    cheat = ("    return 0\n"
             "def check(candidate):\n    pass\n"
             "def same(a, b):\n    return True\n"
             "candidate = add\nMETADATA = {}\n")
    assert score(cheat) == 0.0
    assert code_reward("", PROMPT + cheat, tests) == 0.0
    assert code_reward("", PROMPT + HONEST, tests) == 1.0


def test_redefined_prompt_helpers(mode):
    """HumanEval/38 and /50 test `decode` through the prompt's own `encode`: a completion that
    redefines `encode` as the identity (and returns its input) fools a concatenating harness."""
    prompt = 'def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    """Inverse of encode."""\n'
    tests = 'def check(candidate):\n    for s in ["abc", "hello"]:\n        assert candidate(encode(s)) == s\n'
    cheat = "    return s\ndef encode(s):\n    return s\n"
    res = sandbox.run(prompt + cheat + "\n" + tests + "\ncheck(decode)\n")
    assert res.returncode == 0  # the naive harness is fooled
    assert code_reward(prompt, cheat, tests, "decode") == 0.0
    assert code_reward(prompt, "    return s[::-1]\n", tests, "decode") == 1.0


def test_success_marker_and_forged_verdicts(mode):
    forged = '{"nonce": "0", "passed": 1, "total": 1, "error": ""}'
    cheat = (
        "    return 0\n"
        "import os\n"
        "print('ALL TESTS PASSED')\n"
        f"for fd in range(1024):\n"
        f"    try:\n        os.write(fd, b'passed\\n{forged}\\n')\n    except OSError:\n        pass\n"
    )
    assert naive_passes(cheat + "print('ALL TESTS PASSED')\nimport sys\nsys.exit(0)\n") == (True, True)
    rep = report(cheat)
    assert rep.score == 0.0 and rep.total == 1


# ----------------------------------------------------------------------------- processes
def test_killing_the_parent(mode):
    m = sandbox.isolation()
    cheat = "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
    if m != "none":  # every pid it can name (without a PID namespace, as root, that would be the machine's)
        cheat += ("    for pid in set(range(1, 200)) - {os.getpid()}:\n"
                  "        try:\n            os.kill(pid, 9)\n        except OSError:\n            pass\n")
    cheat += "    return 0\n"
    rep = report(cheat)
    assert rep.score == 0.0
    assert rep.judge.status == "ok" and rep.total == 1  # the judge was untouched and said "failed"
    assert score(HONEST) == 1.0  # and the machinery still works


def test_fork_bomb():
    needs("full")
    cheat = ("    import os\n    while True:\n        try:\n            os.fork()\n"
             "        except OSError:\n            pass\n")
    t = time.monotonic()
    rep = report(cheat, limits=Limits(timeout_s=2.0))
    assert rep.score == 0.0 and "timed out" in rep.reason
    assert time.monotonic() - t < 6


def test_escaped_daemon_is_killed():
    needs("full", "namespaces")
    cheat = ("    import os\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
             f"            os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 60 # {TOKEN}'])\n        os._exit(0)\n"
             "    return 0\n")
    assert score(cheat) == 0.0  # the fixture checks that the sleeping grandchild is gone


def test_memory_bomb():
    rep = report("    blocks = []\n    while True:\n        blocks.append(bytearray(1 << 24))\n",
                 limits=Limits(timeout_s=5.0, memory_mb=256))
    assert rep.score == 0.0 and "MemoryError" in rep.reason


def test_infinite_loop():
    t = time.monotonic()
    rep = report("    while True:\n        pass\n", limits=Limits(timeout_s=1.5))
    assert rep.score == 0.0 and "timed out" in rep.reason
    assert 1.4 < time.monotonic() - t < 4


def test_printing_gigabytes():
    t = time.monotonic()
    rep = report("    import sys\n    while True:\n        sys.stdout.write('x' * (1 << 20))\n")
    assert rep.score == 0.0
    assert rep.candidate.truncated and rep.candidate.status == "killed"
    assert len(rep.candidate.stdout) <= sandbox.Limits().max_output_bytes
    assert time.monotonic() - t < 3


# ----------------------------------------------------------------------------- files and network
def test_reading_files_outside_the_temp_dir(tmp_path):
    needs("full")
    secret = f"SECRET-{os.getpid()}-{time.time_ns()}"
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text(secret)
    tests = f"def check(candidate):\n    assert candidate() == {secret!r}\n"
    cheat = f"def add():\n    return open({str(dataset)!r}).read()\n"
    assert code_reward("", cheat, tests, "add") == 0.0
    probe = (
        "import os\nseen = []\n"
        f"for path in [{str(dataset)!r}, '/work', '/root', '/home', '/var', '{os.getcwd()}', '/proc/1/environ']:\n"
        "    try:\n        seen.append((path, os.listdir(path) if os.path.isdir(path) else open(path).read()[:40]))\n"
        "    except OSError as e:\n        seen.append((path, type(e).__name__))\n"
        "print(seen)\nprint(os.getuid(), open('/etc/shadow').read() if os.access('/etc/shadow', os.R_OK) else 'no-shadow')\n"
    )
    res = sandbox.run(probe)
    assert res.status == "ok", res.stderr
    assert secret not in res.stdout and "FileNotFoundError" in res.stdout
    assert "pyproject" not in res.stdout and "no-shadow" in res.stdout


def test_tests_are_invisible_to_the_candidate():
    needs("full")
    secret = f"HIDDEN-{time.time_ns()}"
    tests = f"def check(candidate):\n    assert candidate() == {secret!r}\n"
    cheat = (  # look everywhere a harness might leave the tests: files, /proc of every process, own memory
        "def add():\n    import os, gc, re\n    found, n = [], 0\n"
        "    for root, dirs, files in os.walk('/', onerror=lambda e: None):\n"
        "        if root in ('/usr', '/sys', '/proc/sys') or root.startswith('/proc/') and '/task' in root:\n"
        "            dirs[:] = []\n"
        "        for f in files:\n            try:\n"
        "                fd = os.open(os.path.join(root, f), os.O_RDONLY | os.O_NONBLOCK)\n"
        "                n += 1\n"
        "                found += re.findall(r'HIDDEN-[0-9]+', os.read(fd, 1 << 20).decode('latin-1'))\n"
        "                os.close(fd)\n"
        "            except Exception:\n                pass\n"
        "    found += [o for o in gc.get_objects() if isinstance(o, str) and o.startswith('HIDDEN-')]\n"
        "    return found[0] if found else 'nothing found in %d files' % n\n"
    )
    rep = run_tests(cheat, tests, "add", limits=Limits(timeout_s=20.0))
    assert rep.score == 0.0
    assert rep.reason.startswith("AssertionError"), rep.reason  # it searched to the end and lost
    assert code_reward("", cheat.replace("HIDDEN-[0-9]+", "FOUND-[0-9]+"), "assert add().startswith('nothing')") == 1.0


def test_network_is_disabled():
    needs("full", "namespaces")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        cheat = (f"    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                 "    s.sendall(b'tests please')\n    return 0\n")
        rep = report(cheat)
        assert rep.score == 0.0
        assert "unreachable" in rep.reason or "refused" in rep.reason, rep.reason
        with pytest.raises(socket.timeout):
            server.accept()
