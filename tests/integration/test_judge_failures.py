"""A judge against a failing server: llm-katan's echo backend on 127.0.0.1 injecting HTTP 500s
(--error-rate), 504s after N requests (--timeout-after), slow answers (--latency-ms), 503s over an
in-flight limit (--max-inflight) and 401s echoing the key (--validate-keys).

What must hold: every request ends as an answer or a reported failure; nothing hangs (each test is
bounded in requests and in time); the judge's counters add up and match what the server saw.

The echo backend answers with the last user message, so with `score_template: "{response}"` a
response "Rating: 7" comes back as a reply whose rating is 7: each success is checkable.
"""

import logging
import time

import pytest

from posttrain.models import ensure_embedded
from posttrain.rlaif import Judge, JudgeFailureRate
from posttrain.rlaif.katan import KatanServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAST_RETRY = {"backoff_base": 0.01, "backoff_max": 0.05, "cache": False, "score_template": "{response}",
              "max_tokens": 16}


def echo_server(*args):
    # the echo backend loads no model; the model directory only names it (nothing is downloaded)
    return KatanServer(ensure_embedded(), backend="echo", providers=("openai", "anthropic"),
                       args=["--max-concurrent", "8", *args], ready_timeout=60)


@pytest.fixture(scope="module")
def flaky():
    with echo_server("--error-rate", "0.3") as server:
        yield server


@pytest.fixture(scope="module")
def bounded():
    with echo_server("--latency-ms", "150", "--max-inflight", "2") as server:
        yield server


def judge_for(server, backend, **fields):
    url = server.openai_url if backend == "openai" else server.base_url
    return Judge.from_config({"backend": backend, "model": "judge", "base_url": url, **FAST_RETRY, **fields})


def check_counts(judge, server, total_before):
    c = judge.counts()
    assert c["requests"] == c["parsed"] + c["unparsable"] + c["failures"]
    assert c["attempts"] - c["retries"] == c["requests"] - c["cache_hits"]
    # the server saw exactly the attempts the judge made, failed ones included
    assert server.wait_total(total_before + c["attempts"]) == total_before + c["attempts"]
    return c


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_error_rate_every_request_succeeds_or_is_reported(flaky, backend):
    judge = judge_for(flaky, backend, max_retries=4, concurrency=8)
    before = flaky.stats()["total"]
    ratings = [1 + i % 10 for i in range(40)]
    t0 = time.monotonic()
    values = judge.score_batch(["q"] * 40, [f"Rating: {r} #{i}" for i, r in enumerate(ratings)])
    assert time.monotonic() - t0 < 60
    c = check_counts(judge, flaky, before)
    for value, rating in zip(values, ratings):
        assert value is None or value == pytest.approx((rating - 1) / 9)
    assert c["failures"] == sum(v is None for v in values)
    assert c["parsed"] == 40 - c["failures"] and c["unparsable"] == 0
    # 30% of 40+ attempts fail: retries happened (P(no 500 at all) ~ 1e-6), and almost all recovered
    assert c["retries"] > 0
    assert c["failures"] <= 3  # a request fails only if 5 attempts in a row do (0.3^5 = 0.24%)
    judge.close()


def test_timeout_after_n_requests_failures_are_counted_then_the_judge_stops():
    with echo_server("--timeout-after", "10") as server:
        judge = judge_for(server, "openai", max_retries=2, concurrency=1, min_requests=1000)
        values = judge.score_batch(["q"] * 20, [f"Rating: 5 #{i}" for i in range(20)])
        c = check_counts(judge, server, 0)
        # the first 10 requests succeed, every later attempt gets a 504 and is retried twice
        assert values[:10] == [pytest.approx(4 / 9)] * 10 and values[10:] == [None] * 10
        assert (c["parsed"], c["failures"], c["attempts"], c["retries"]) == (10, 10, 10 + 10 * 3, 20)
        assert "504" in judge.last_error

        stopping = judge_for(server, "anthropic", max_retries=1, min_requests=6, max_failure_rate=0.5)
        with pytest.raises(JudgeFailureRate) as err:
            stopping.score_batch(["q"] * 6, [f"r{i}" for i in range(6)])
        assert err.value.rate == 1.0 and "504" in str(err.value) and "max_failure_rate" in str(err.value)
        assert err.value.metrics["judge/failures"] == 6


def test_slow_server_times_out_per_request_and_nothing_hangs():
    with echo_server("--latency-ms", "1500") as server:
        impatient = judge_for(server, "openai", timeout=0.4, max_retries=1, concurrency=4)
        t0 = time.monotonic()
        with pytest.raises(JudgeFailureRate, match="has not answered once"):  # 4 timeouts, no answer: down
            impatient.score_batch(["q"] * 4, [f"Rating: 3 #{i}" for i in range(4)])
        elapsed = time.monotonic() - t0
        c = check_counts(impatient, server, 0)  # the server finishes the abandoned requests later
        assert (c["failures"], c["attempts"]) == (4, 8)
        assert "Timeout" in impatient.last_error
        assert elapsed < 4.0  # 2 attempts x 0.4 s, 4 in flight: not 4 x 1.5 s

        patient = judge_for(server, "anthropic", timeout=10, max_retries=0, concurrency=4)
        t0 = time.monotonic()
        assert patient.score_batch(["q"] * 4, [f"Rating: 3 #{i}" for i in range(4)]) == [pytest.approx(2 / 9)] * 4
        assert time.monotonic() - t0 < 5.5  # concurrent: ~1.5 s, not 4 x 1.5 s


def test_concurrency_limit_is_respected(bounded):
    # the server answers 503 when more than 2 requests are in flight
    within = judge_for(bounded, "openai", concurrency=2, max_retries=0)
    before = bounded.stats()["total"]
    assert within.score_batch(["q"] * 8, [f"Rating: 8 #{i}" for i in range(8)]) == [pytest.approx(7 / 9)] * 8
    c = check_counts(within, bounded, before)
    assert (c["retries"], c["failures"]) == (0, 0)

    beyond = judge_for(bounded, "openai", concurrency=8, max_retries=8, backoff_base=0.05, backoff_max=0.3)
    before = bounded.stats()["total"]
    values = beyond.score_batch(["q"] * 8, [f"Rating: 8 ##{i}" for i in range(8)])
    c = check_counts(beyond, bounded, before)
    assert c["retries"] > 0  # 8 at once overflow the limit: 503s, retried with backoff
    assert values.count(pytest.approx(7 / 9)) == 8 - c["failures"]


def test_keys_reach_the_server_and_never_leak(tmp_path, monkeypatch, caplog):
    good, wrong = "llm-katan-right-key-42", "sk-posttrain-e2e-9d8c7b6a5f"
    with echo_server("--validate-keys", "--api-keys", f"openai={good},anthropic={good}") as server:
        for backend in ("openai", "anthropic"):
            monkeypatch.setenv("POSTTRAIN_E2E_KEY", wrong)
            cache = tmp_path / f"{backend}.sqlite"
            bad = judge_for(server, backend, api_key_env="POSTTRAIN_E2E_KEY", cache=str(cache), min_requests=2)
            with caplog.at_level(logging.DEBUG), pytest.raises(JudgeFailureRate) as err:
                bad.score_batch(["q", "q"], ["Rating: 2", "Rating: 3"])
            # the server's 401 says "got '<our key>'": it must not survive anywhere
            assert "401" in str(err.value) and "got '***'" in str(err.value)
            assert bad.counts()["retries"] == 0  # an auth error is not retried
            assert wrong not in str(err.value) and wrong not in caplog.text and wrong not in bad.last_error

            monkeypatch.setenv("POSTTRAIN_E2E_KEY", good)
            ok = judge_for(server, backend, api_key_env="POSTTRAIN_E2E_KEY", cache=str(cache))
            assert ok.score("q", "Rating: 10") == 1.0
            assert good.encode() not in cache.read_bytes() and wrong.encode() not in cache.read_bytes()
