"""A local OpenAI- and Anthropic-compatible judge server: llm-katan, started and stopped cleanly.

`llm-katan` (a dev dependency) serves a small model behind real provider APIs, which makes it the
judge endpoint of the integration tests and a way to try a judge config without any API key::

    with KatanServer(ensure_embedded(), providers=("openai", "anthropic")) as server:
        judge = Judge.from_config({"backend": "openai", "model": "judge", "base_url": server.openai_url})

`KatanServer` picks a free port on 127.0.0.1, never lets the server reach a hub (HF_HUB_OFFLINE,
TRANSFORMERS_OFFLINE; serve a local model directory), waits a bounded time for /health, keeps the
request counters in a private stats file, and always stops the process it started (SIGTERM to its
own process group, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


class KatanError(RuntimeError):
    """llm-katan could not be started (the message carries the end of its log)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable() -> list[str]:
    script = Path(sys.executable).parent / "llm-katan"
    if script.is_file():
        return [str(script)]
    found = shutil.which("llm-katan")
    if found:
        return [found]
    return [sys.executable, "-c", "from llm_katan.cli import main; main()"]


class KatanServer:
    """One llm-katan process; `start()`/`stop()` or use it as a context manager."""

    def __init__(self, model: str | Path, backend: str = "transformers", providers: Sequence[str] = ("openai",),
                 args: Sequence[str] = (), served_name: str = "judge", ready_timeout: float = 180.0,
                 threads: int = 1):
        self.model, self.backend, self.providers = str(model), backend, tuple(providers)
        self.args, self.served_name, self.ready_timeout, self.threads = list(args), served_name, ready_timeout, threads
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._dir: str | None = None

    @property
    def base_url(self) -> str:
        """The server root (the Anthropic SDK's base_url)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """The OpenAI SDK's base_url."""
        return self.base_url + "/v1"

    @property
    def log_path(self) -> Path:
        return Path(self._dir or ".") / "server.log"

    def start(self) -> "KatanServer":
        self._dir = tempfile.mkdtemp(prefix="posttrain-katan-")
        self.port = free_port()
        cmd = _executable() + [
            "--model", self.model, "--served-model-name", self.served_name, "--backend", self.backend,
            "--providers", ",".join(self.providers), "--host", "127.0.0.1", "--port", str(self.port),
            "--device", "cpu", "--no-quantize", "--stats-file", str(Path(self._dir) / "stats.json"),
            "--log-level", "warning", *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        for var in ("LLM_KATAN_MODEL", "LLM_KATAN_PORT", "LLM_KATAN_BACKEND", "LLM_KATAN_HOST"):
            env.pop(var, None)  # these would override the flags
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KatanError(f"llm-katan exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise KatanError(f"llm-katan not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stats(self) -> dict:
        """The server's request counters: {"total": N, "providers": {"openai": n, ...}, ...}."""
        with urllib.request.urlopen(self.base_url + "/stats", timeout=5) as r:
            return json.loads(r.read())

    def wait_total(self, expected: int, timeout: float = 10.0) -> int:
        """The server's request total, polled until it reaches `expected` or `timeout` passes (a
        request a client gave up on is counted when the server finishes it)."""
        deadline = time.monotonic() + timeout
        total = self.stats()["total"]
        while total < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            total = self.stats()["total"]
        return total

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=grace)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "KatanServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
