"""Retries, backoff and timeouts of the HTTP backends against real sockets on 127.0.0.1: a port
nobody listens on (connection refused) and a server that accepts but never answers (timeout)."""

import random
import socket
import threading
import time

import pytest

from posttrain.rlaif import Judge, JudgeFailureRate
from posttrain.rlaif.backends import backoff_delay, classify
from posttrain.rlaif.katan import free_port


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(0)
    for retry in range(6):
        d = backoff_delay(retry, base=1.0, cap=8.0, rng=rng)
        full = min(8.0, 2.0 ** retry)
        assert 0.5 * full <= d <= full
    # a server's Retry-After is honoured, within the cap
    assert backoff_delay(0, 0.1, 8.0, retry_after=3.0, rng=rng) == 3.0
    assert backoff_delay(0, 0.1, 8.0, retry_after=60.0, rng=rng) == 8.0
    delays = {round(backoff_delay(3, 1.0, 30.0, rng=rng), 6) for _ in range(20)}
    assert len(delays) > 10  # jitter: clients do not retry in lockstep


def test_classify_real_sdk_errors():
    import importlib.util

    import openai

    # the SDKs' HTTP client: httpx, renamed httpx2 in the SDK generation installed here
    httpx2 = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    for status, retry in [(429, True), (500, True), (503, True), (504, True), (408, True), (400, False),
                          (401, False), (404, False)]:
        exc = openai.APIStatusError("x", response=httpx2.Response(status, request=request), body=None)
        assert classify(exc) == (retry, status)
    assert classify(openai.APITimeoutError(request=request)) == (True, None)
    assert classify(openai.APIConnectionError(request=request)) == (True, None)
    assert classify(ValueError("bad")) == (False, None)


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_connection_refused_is_retried_then_reported(backend):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}" + ("/v1" if backend == "openai" else "")
    judge = Judge.from_config({"backend": backend, "model": "m", "base_url": url, "cache": False, "max_retries": 2,
                               "backoff_base": 0.01, "backoff_max": 0.02, "timeout": 5})
    t0 = time.monotonic()
    assert judge.score("q", "r") is None
    assert time.monotonic() - t0 < 10
    c = judge.counts()
    assert (c["failures"], c["attempts"], c["retries"]) == (1, 3, 2)
    assert "Connection" in judge.last_error


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (bounded: closed at teardown)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    conns, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for c in conns:
        c.close()
    sock.close()


def test_a_server_that_never_answers_times_out_per_request(silent_server):
    judge = Judge.from_config({"backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{silent_server}/v1",
                               "cache": False, "timeout": 0.3, "max_retries": 1, "backoff_base": 0.01,
                               "backoff_max": 0.02, "concurrency": 4})
    t0 = time.monotonic()
    with pytest.raises(JudgeFailureRate, match="has not answered once"):  # 4 failures, never an answer: down
        judge.score_batch(["q"] * 4, ["a", "b", "c", "d"])
    elapsed = time.monotonic() - t0
    c = judge.counts()
    assert (c["failures"], c["attempts"], c["retries"]) == (4, 8, 4)
    assert "Timeout" in judge.last_error
    # 4 requests x 2 attempts x 0.3 s would take 2.4 s one after another; 4 in flight take ~0.6 s
    assert elapsed < 2.2
