"""A real browser for page tests: Debian's chromium, headless, driven through its chromedriver by
selenium (both installed by the Makefile), and ``posttrain review`` started as a subprocess.

Import it as ``terminal`` is imported: ``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``.
The flags are the ones a closed network needs: no background networking, no component updates, no
sync, a fresh profile; ``--no-sandbox`` because CI runs as root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HAVE_BROWSER = CHROMIUM.exists() and CHROMEDRIVER.exists()
SKIP_REASON = "chromium and chromedriver are not installed (the Makefile installs them: make install)"


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator["object"]:
    """A headless chromium WebDriver (selenium), closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="posttrain-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)  # nothing left behind in the temp dir


@contextmanager
def review_server(path: str | Path, *extra: str) -> Iterator[str]:
    """``posttrain review PATH --port 0`` as a subprocess; yields its URL; stops it with SIGINT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "review", str(path), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://\S+/", line)
        assert match, f"no address from posttrain review: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(check, timeout: float = 30.0, every: float = 0.2, what: str = "the condition"):
    """Poll ``check()`` until it returns a truthy value; that value, or an AssertionError after ``timeout``."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - a page still loading raises; try again
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
