"""Run untrusted Python in a fresh, limited, isolated subprocess.

    run(code, timeout_s=5.0, memory_mb=512) -> SandboxResult(status, returncode, stdout, stderr, seconds)

`status`: `ok` (exit 0), `error` (non-zero exit), `timeout` (wall clock or CPU limit), `memory`
(MemoryError under the address-space limit) or `killed` (a signal, or output over the cap).
`returncode` is 128+N when the program died of signal N. The code reaches the child through a
pipe, never a file, and the trainer's process never executes it.

Isolation modes, detected once per process (`isolation()`; force one with the environment
variable POSTTRAIN_SANDBOX=full|namespaces|none; a fallback warns once):

`full` (root, util-linux `unshare`, a system Python such as /usr/bin/python3):
  - fresh PID, network, mount, IPC and UTS namespaces: no network at all (not even loopback),
    only its own processes visible, and all of them die with the sandbox, including ones that
    called setsid() or double-forked (a tiny init, pid 1, waits for the program; when it
    exits, or is killed, the kernel kills the rest of the namespace);
  - every top-level directory but /usr, /bin, /sbin, /lib*, /etc, /dev and /proc is covered
    by an empty read-only tmpfs (/root, /home, /work, /var, /run, /mnt, /sys, ...: the project,
    its datasets and caches are invisible), top-level files by /dev/null, /dev/shm is private,
    and the working directory is a fresh size-capped tmpfs at /tmp that dies with the sandbox;
  - the program runs as a fresh random uid/gid, without groups or capabilities and with
    no_new_privs: it cannot write root's files, read mode-600 ones, undo the mounts, or signal
    or ptrace another sandbox; RLIMIT_NPROC (ignored for root) caps its processes per sandbox.
`namespaces` (unshare works, `full` does not, e.g. not root: a user namespace is added): the
  same network and PID isolation, a fresh host temporary directory as working directory, but
  the program runs as the invoking user and can read and write whatever that user can.
`none` (no usable unshare): the limits below, a new session (the process group is killed at
  the end) and a fresh temporary directory. The program shares the network, can see and signal
  the invoking user's processes (as root: all), and a child that calls setsid() can outlive it.

In every mode: a fresh `python -I -S` (standard library only, PYTHON* variables ignored), a
minimal environment (PATH, LANG, LC_ALL, HOME, TMPDIR: no inherited secrets), stdin from
/dev/null, no inherited file descriptors, rlimits on CPU seconds, address space, processes,
file size, open files and core dumps, stdout+stderr read incrementally and the program killed
once they pass `max_output_bytes`, the wall-clock timeout enforced by the parent, and the
temporary directory removed afterwards.

Not guarded against: kernel exploits and side channels (this is not a VM or gVisor); total
memory of a fork bomb (each process has its own address-space limit, so the bound is
`max_procs * memory_mb`: a shared cap needs cgroups); CPU and disk pressure within the limits;
reading world-readable files under /usr and /etc; and, outside `full`, what is listed missing.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

from posttrain.rewards.sandbox_boot import _bootstrap

MARKER = "posttrain-sandbox"  # appears in the argv of every sandboxed interpreter
TEMP_PREFIX = "posttrain-sbx-"
UID_RANGE = (1_000_000_000, 2_000_000_000)  # random per sandbox in `full` mode (if mapped)
STATUSES = ("ok", "error", "timeout", "memory", "killed")
READ_CAP = 1 << 16  # per extra pipe read by the parent (the code reward's verdict)
_KEEP_TOP = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp"}


@dataclass(frozen=True)
class SandboxResult:
    status: str  # ok | error | timeout | memory | killed
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    truncated: bool = False  # output went over max_output_bytes (and the process was killed)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, enforced by the parent; CPU rlimit is derived from it
    memory_mb: int = 512  # RLIMIT_AS per process
    max_procs: int = 16  # RLIMIT_NPROC (per sandbox in `full` mode)
    max_file_mb: int = 16  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout + stderr; killed when exceeded
    scratch_mb: int = 64  # size of the private /tmp in `full` mode


# ----------------------------------------------------------------------------- child side
# `_bootstrap` (posttrain.rewards.sandbox_boot) runs first in every sandbox, shipped as source via `-c`

_BOOT_SOURCE = f"# {MARKER}\n{inspect.getsource(_bootstrap)}\n_bootstrap()\n"


# ----------------------------------------------------------------------------- mode detection
@dataclass(frozen=True)
class _Mode:
    name: str
    prefix: tuple[str, ...]
    python: str
    hide_dirs: tuple[str, ...] = ()
    hide_files: tuple[str, ...] = ()
    uids: tuple[int, int] = UID_RANGE  # [lo, hi): ids for the sandboxes of `full` mode


_mode_cache: _Mode | None = None
_mode_lock = threading.Lock()


def isolation() -> str:
    """The isolation mode this process uses: `full`, `namespaces` or `none` (see module doc)."""
    return _mode().name


def sandbox_uids() -> range:
    """The uids (= gids) that `full` mode draws a fresh one from for each sandbox."""
    return range(*_mode().uids)


def _free_ids() -> tuple[int, int] | None:
    """UID_RANGE, or in a user namespace (rootless container) the upper part of the largest
    range mapped for both uids and gids; None if fewer than 4096 ids are available."""
    spans = []
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as f:
                rows = [tuple(map(int, line.split())) for line in f if line.strip()]
        except (OSError, ValueError):
            return UID_RANGE
        spans.append(max(((a, a + n) for a, _, n in rows), key=lambda r: r[1] - r[0]))
    lo, hi = max(spans[0][0], spans[1][0]), min(spans[0][1], spans[1][1])
    if lo <= UID_RANGE[0] and hi >= UID_RANGE[1]:
        return UID_RANGE
    lo = max(lo, (lo + hi) // 2, 1000)  # keep clear of system and ordinary users' ids
    hi = 65534 if lo < 65534 < hi else hi  # and of nobody's
    return (lo, hi) if hi - lo >= 4096 else None


def _mode() -> _Mode:
    global _mode_cache
    with _mode_lock:
        if _mode_cache is None:
            _mode_cache = _detect()
        return _mode_cache


def _unshare(user_ns: bool) -> tuple[str, ...] | None:
    exe = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    user = ("--user", "--map-root-user") if user_ns else ()
    return exe and (exe, *user, "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts")


def _works(mode: _Mode, code: str, accept) -> bool:
    try:
        res = _run_with(mode, code, Limits(timeout_s=10.0))
    except OSError:
        return False
    return res.status == "ok" and accept(res.stdout.strip())


def _full_mode() -> _Mode | None:
    """Root + unshare + a Python outside the hidden directories, checked by a probe run."""
    prefix, uids = _unshare(user_ns=False), _free_ids()
    if os.geteuid() != 0 or prefix is None or uids is None:
        return None
    env = os.environ.get("POSTTRAIN_SANDBOX_PYTHON")
    for python in [env] if env else ["/usr/bin/python3", "/usr/local/bin/python3"]:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            continue
        keep = _KEEP_TOP | {os.path.realpath(python).split("/")[1]}
        top = [f"/{n}" for n in sorted(os.listdir("/")) if not os.path.islink(f"/{n}")]
        dirs = tuple(d for d in top if d[1:] not in keep and os.path.isdir(d))
        dirs += tuple(d for d in ("/dev/shm", "/dev/mqueue") if os.path.isdir(d) and not os.path.islink(d))
        mode = _Mode("full", prefix, python, dirs, tuple(f for f in top if os.path.isfile(f)), uids)
        probe = "import os\nprint(os.getuid(), os.listdir(%r))" % (dirs[0] if dirs else "/tmp")
        if _works(mode, probe, lambda out: out.split(" ", 1)[0] != "0" and out.endswith("[]")):
            return mode
    return None


def _detect() -> _Mode:
    import sys

    forced = os.environ.get("POSTTRAIN_SANDBOX", "").strip().lower()
    if forced not in ("", "full", "namespaces", "none"):
        raise ValueError(f"POSTTRAIN_SANDBOX={forced!r}: expected full, namespaces or none")
    if forced in ("", "full") and (mode := _full_mode()) is not None:
        return mode
    if forced == "full":
        raise RuntimeError("POSTTRAIN_SANDBOX=full, but it needs root, util-linux unshare and /usr/bin/python3")
    prefix = _unshare(user_ns=os.geteuid() != 0)
    if forced in ("", "namespaces") and prefix is not None:
        mode = _Mode("namespaces", prefix, sys.executable)
        if _works(mode, "import os\nprint(os.getpid())", lambda out: out in ("1", "2")):
            if not forced:
                warnings.warn("posttrain sandbox: `full` isolation unavailable (needs root, unshare, a system "
                              "python3); using `namespaces`: no network, private PIDs, but the user's files are "
                              "reachable", stacklevel=3)
            return mode
    if forced == "namespaces":
        raise RuntimeError("POSTTRAIN_SANDBOX=namespaces, but `unshare` does not work here")
    if not forced:
        warnings.warn("posttrain sandbox: no working `unshare`; using rlimits only (no network, process "
                      "or filesystem isolation)", stacklevel=3)
    return _Mode("none", (), sys.executable)


# ----------------------------------------------------------------------------- parent side
def _rlimits(limits: Limits, mode: _Mode) -> list[tuple[str, int, int]]:
    cpu = int(limits.timeout_s) + 1
    nproc = limits.max_procs
    if mode.name != "full" and os.geteuid() != 0:  # NPROC counts all of this user's processes
        nproc += _count_user_processes(os.getuid())
    mb = 1 << 20
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
            ("RLIMIT_NPROC", nproc, nproc), ("RLIMIT_FSIZE", limits.max_file_mb * mb, limits.max_file_mb * mb),
            ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files), ("RLIMIT_CORE", 0, 0)]


def _count_user_processes(uid: int) -> int:
    def owner(pid: str) -> int:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return -1

    return sum(1 for pid in os.listdir("/proc") if pid.isdigit() and owner(pid) == uid)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:  # no CONFIG_PROC_CHILDREN: killpg and the parent-death signal still apply
        return []


class SandboxProcess:
    """One sandboxed interpreter: `runner` (Python source) runs with `PAYLOAD` in its globals.

    Low-level building block for `run` and for the code reward's judge/candidate pair; drive
    it with `pump([...], deadline, done)`, then `kill()` and `close()` (both idempotent).
    `pass_fds` are inherited at the same numbers; `read_fds` are parent-side pipe ends read
    (up to `READ_CAP` bytes each) into `self.reads[fd]`.
    """

    def __init__(self, runner: str, payload=None, limits: Limits = Limits(), *, pass_fds=(), read_fds=(),
                 mode: _Mode | None = None):
        self.mode = mode or _mode()
        self.limits = limits
        self.workdir = None if self.mode.name == "full" else tempfile.mkdtemp(prefix=TEMP_PREFIX)
        cfg = {"runner": runner, "payload": payload, "rlimits": _rlimits(limits, self.mode),
               "cwd": self.workdir, "full": None}
        if self.mode.name == "full":
            lo, hi = self.mode.uids
            uid = lo + secrets.randbelow(hi - lo)
            cfg["full"] = {"uid": uid, "hide_dirs": list(self.mode.hide_dirs),
                           "hide_files": list(self.mode.hide_files), "scratch_mb": limits.scratch_mb}
        home = self.workdir or "/tmp"
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home}
        (setup_r, setup_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
        self._setup = json.dumps(cfg).encode()
        self.stdout, self.stderr = bytearray(), bytearray()
        self.reads = {fd: bytearray() for fd in read_fds}
        self.truncated = self.timed_out = False
        self.started = time.monotonic()
        self.seconds = 0.0
        argv = [*self.mode.prefix, self.mode.python, "-I", "-S", "-c", _BOOT_SOURCE, str(setup_r)]
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                          pass_fds=(setup_r, *pass_fds), env=env, start_new_session=True,
                                          cwd="/" if self.workdir is None else self.workdir)
        except BaseException:
            for fd in (setup_w, out_r, err_r):
                os.close(fd)
            if self.workdir:
                _rmtree(self.workdir)
            raise
        finally:
            for fd in (setup_r, out_w, err_w):
                os.close(fd)
        self._setup_fd = setup_w
        os.set_blocking(setup_w, False)
        self._open = {out_r: self.stdout, err_r: self.stderr, **self.reads}
        for fd in self._open:
            os.set_blocking(fd, False)
        self._pidfd = None
        with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3; else `exited` polls
            self._pidfd = os.pidfd_open(self.popen.pid)
        self._closed = False

    # -- event handling
    def register(self, sel: selectors.BaseSelector) -> None:
        for fd in self._open:
            sel.register(fd, selectors.EVENT_READ, self._on_read)
        if self._setup_fd is not None:
            sel.register(self._setup_fd, selectors.EVENT_WRITE, self._on_write)
        if self._pidfd is not None:
            sel.register(self._pidfd, selectors.EVENT_READ, self._on_exit)

    def _on_write(self, sel, fd):
        try:
            n = os.write(fd, self._setup[:1 << 16])
            self._setup = self._setup[n:]
        except BlockingIOError:
            return
        except OSError:  # the child is gone
            self._setup = b""
        if not self._setup:
            sel.unregister(fd)
            os.close(fd)
            self._setup_fd = None

    def _read(self, fd) -> bool | None:
        """Read once from `fd` into its buffer (within the caps): True if data came, None if
        none is ready, False at end of stream."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return False
        buf = self._open[fd]
        if fd in self.reads:
            buf += data[: max(0, READ_CAP - len(buf))]
            return True
        room = self.limits.max_output_bytes - len(self.stdout) - len(self.stderr)
        buf += data[: max(0, room)]
        if len(data) > room:
            self.truncated = True
            self.kill()
        return True

    def _on_read(self, sel, fd):
        if self._read(fd) is False:
            sel.unregister(fd)
            self._close_fd(fd)

    def _on_exit(self, sel, fd):
        sel.unregister(fd)
        os.close(fd)
        self._pidfd = None  # from now on `exited` asks waitid
        self.exited()

    def exited(self) -> bool:
        """True once the main process has exited; then the rest of the sandbox is killed too."""
        if self.popen.returncode is not None:
            return True
        if self._pidfd is not None:
            return False
        if not _exited_unreaped(self.popen.pid):
            return False
        self.seconds = self.seconds or time.monotonic() - self.started
        self.kill()
        return True

    def _close_fd(self, fd):
        if self._open.pop(fd, None) is not None:
            os.close(fd)

    # -- teardown
    def kill(self) -> None:
        """Kill everything the sandbox started, then reap. Order matters: SIGKILL the child of
        the top process first (the namespace init, which takes the namespace with it; or the
        program in mode `none`) so that the top process reaps it and no zombie is orphaned;
        then kill the process group while its leader is still unreaped (its id cannot be reused)."""
        if self.popen.returncode is None:
            kids = _children(self.popen.pid)
            for pid in kids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + (0.5 if kids else 0)
            while time.monotonic() < end and not _exited_unreaped(self.popen.pid):
                time.sleep(0.002)
            with contextlib.suppress(OSError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self.seconds = self.seconds or time.monotonic() - self.started

    def close(self) -> None:
        """Kill, read what is left in the pipes (non-blocking), close fds, remove the temp dir."""
        if self._closed:
            return
        self.kill()
        for fd in list(self._open):  # every writer is dead: read to the end (unless it blocks)
            while self._read(fd):
                pass
            self._close_fd(fd)
        for fd in (self._setup_fd, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._setup_fd = self._pidfd = None
        if self.workdir:
            _rmtree(self.workdir)
        self._closed = True

    def result(self) -> SandboxResult:
        rc = self.popen.returncode
        err = self.stderr.decode("utf-8", "replace")
        if self.truncated:
            err += f"\n[sandbox: output exceeded {self.limits.max_output_bytes} bytes; killed]"
        return SandboxResult(_classify(rc, self.timed_out, self.truncated, err, self.mode.name), rc,
                             self.stdout.decode("utf-8", "replace"), err, round(self.seconds, 4), self.truncated)


def _exited_unreaped(pid: int) -> bool:
    """Has child `pid` exited? (WNOWAIT: not reaped, so its process group id stays ours.)"""
    try:
        return bool(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))
    except ChildProcessError:
        return True


def _rmtree(path: str) -> None:
    for root, dirs, _ in os.walk(path):  # a program may have left directories without permissions
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _classify(rc, timed_out: bool, truncated: bool, stderr: str, mode: str) -> str:
    if timed_out:
        return "timeout"
    if truncated:
        return "killed"
    if rc == 0:
        return "ok"
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and rc > 128 else 0)
    if sig == signal.SIGXCPU:
        return "timeout"
    lines = stderr.rstrip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "memory"
    return "killed" if sig else "error"


def pump(procs: list[SandboxProcess], deadline: float, done) -> bool:
    """Serve the processes' pipes until `done()` is true or `deadline` (time.monotonic) passes.

    Returns False on timeout (after marking every process `timed_out`), True otherwise.
    """
    sel = selectors.DefaultSelector()
    try:
        for p in procs:
            p.register(sel)
        while not done():
            poll = any(p._pidfd is None and p.popen.returncode is None for p in procs)
            left = deadline - time.monotonic()
            if left <= 0:
                for p in procs:
                    if p.popen.returncode is None:
                        p.timed_out = True
                return False
            for key, _ in sel.select(min(left, 0.02) if poll else left):
                key.data(sel, key.fd)
        return True
    finally:
        sel.close()


def _run_with(mode: _Mode, code: str, limits: Limits) -> SandboxResult:
    proc = SandboxProcess(code, None, limits, mode=mode)
    try:
        pump([proc], proc.started + limits.timeout_s, proc.exited)
    finally:
        proc.close()
    return proc.result()


def run(code: str, timeout_s: float = 5.0, memory_mb: int = 512, *, max_output_bytes: int = 1 << 20,
        max_procs: int = 16, max_file_mb: int = 16, max_open_files: int = 64) -> SandboxResult:
    """Run `code` (Python source, as `__main__`) in a fresh sandbox; see the module docstring."""
    limits = Limits(timeout_s, memory_mb, max_procs, max_file_mb, max_open_files, max_output_bytes)
    return _run_with(_mode(), code, limits)


__all__ = ["Limits", "MARKER", "SandboxProcess", "SandboxResult", "isolation", "pump", "run", "sandbox_uids"]
