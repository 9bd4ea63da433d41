"""What a person at the terminal meets: run ``posttrain`` as a subprocess and check the error contract
(``posttrain.errors``): exit status 2, one ``error:`` message naming what is wrong, no traceback;
and, for the data-loss cases, a directory's bytes before and after.

Import it as the golden harness is imported: ``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``
then ``import terminal``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def posttrain(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
              timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """``python -m posttrain <args>`` in ``cwd``; stdout and stderr captured as text. One thread
    (tests run two workers on two cores), no hub access, ``POSTTRAIN_DEBUG`` and ``POSTTRAIN_FAULT``
    unset unless ``env`` sets them."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_DEBUG", "POSTTRAIN_FAULT")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The contract for a bad input: exit status 2, no traceback, and a message on stderr that
    contains every fragment (the file, line, field or flag it must name). Returns stderr."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, f"a traceback reached the user:\n{out[-3000:]}"
    assert proc.returncode == 2, f"exit status {proc.returncode}, expected 2:\n{out[-3000:]}"
    assert "error:" in proc.stderr, f"no 'error:' message on stderr:\n{out[-3000:]}"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in the message:\n{proc.stderr[-3000:]}"
    return proc.stderr


def snapshot(path: str | Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (and '<dir>' for each directory):
    compare two snapshots to show nothing was written, removed or changed."""
    root = Path(path)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
