"""The on-disk judge cache: a repeated or resumed run does not pay twice, the key covers judge,
template, prompt and response, failures are not cached, and threads/instances share it."""

import sqlite3
import threading

import pytest

from posttrain.rlaif import FunctionBackend, Judge, JudgeCache, JudgeConfig, cache_key


def counting_judge(cache_path, **fields):
    cfg = JudgeConfig(backend="openai", model="m", cache=str(cache_path), **fields)

    def reply(messages):
        if "fail" in messages[-1]["content"]:
            raise TimeoutError("slow")
        return "Rating: 6"

    return Judge(cfg, FunctionBackend(cfg, reply))


def test_second_run_is_served_from_disk(tmp_path):
    path = tmp_path / "cache.sqlite"
    first = counting_judge(path)
    assert first.score_batch(["q1", "q2"], ["r1", "r2"]) == [5 / 9, 5 / 9]
    first.close()
    again = counting_judge(path)  # a new process would open the same file
    assert again.score_batch(["q1", "q2"], ["r1", "r2"]) == [5 / 9, 5 / 9]
    assert again.backend.calls == 0
    assert again.counts()["cache_hits"] == 2 and again.counts()["attempts"] == 0


def test_key_covers_judge_template_prompt_and_response(tmp_path):
    path = tmp_path / "cache.sqlite"
    counting_judge(path).score("q", "r")
    for change, fields in [
        ("same", {}),
        ("prompt", {}),
        ("response", {}),
        ("template", {"score_template": "Grade: {response}"}),
        ("rubric", {"rubric": "Only correctness matters."}),
        ("judge", {"name": "another-judge"}),
        ("temperature", {"temperature": 0.7}),
        ("server", {"base_url": "http://127.0.0.1:9/v1"}),  # another server with the same model name
    ]:
        j = counting_judge(path, **fields)
        j.score("q2" if change == "prompt" else "q", "r2" if change == "response" else "r")
        assert j.backend.calls == (0 if change == "same" else 1), change


@pytest.mark.parametrize("given", ["model directory", "run directory"])
def test_local_judge_retrained_in_place_is_asked_again(tmp_path, given):
    # a run directory as the judge's model loads its final/: that is where retraining writes
    spec = tmp_path / "judge-run"
    model_dir = spec / "final" if given == "run directory" else spec
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"first weights")
    path = tmp_path / "cache.sqlite"

    def judge():
        cfg = JudgeConfig(backend="local", model=str(spec), cache=str(path))
        return Judge(cfg, FunctionBackend(cfg, lambda m: "Rating: 6"))

    judge().score("q", "r")
    again = judge()
    again.score("q", "r")
    assert again.backend.calls == 0  # same weights: served from the cache
    (model_dir / "model.safetensors").write_bytes(b"retrained weights, longer")
    retrained = judge()
    retrained.score("q", "r")
    assert retrained.backend.calls == 1


def test_compare_orders_are_separate_entries(tmp_path):
    path = tmp_path / "cache.sqlite"
    j = counting_judge(path)
    j.compare("q", "x", "y")
    assert j.backend.calls == 2 and len(j.cache) == 2
    j2 = counting_judge(path)
    j2.compare("q", "y", "x")  # the same two orders, asked the other way round: both cached
    assert j2.backend.calls == 0


def test_failures_are_not_cached(tmp_path):
    path = tmp_path / "cache.sqlite"
    j = counting_judge(path)
    assert j.score("q", "fail") is None
    assert len(j.cache) == 0
    j2 = counting_judge(path)
    j2.score("q", "fail")
    assert j2.backend.calls == 1  # asked again


def test_unparsable_replies_are_cached_raw_and_reparsed(tmp_path):
    path = tmp_path / "cache.sqlite"
    cfg = JudgeConfig(backend="openai", model="m", cache=str(path))
    j = Judge(cfg, FunctionBackend(cfg, lambda m: "I'd say 4/5"))
    assert j.score("q", "r") is None            # 4/5 is not on the 1..10 scale
    assert j.counts()["unparsable"] == 1
    cfg5 = JudgeConfig(backend="openai", model="m", cache=str(path), score_min=0, score_max=5)
    # another scale is another prompt ({min}..{max} in the template), so it is asked anew
    j5 = Judge(cfg5, FunctionBackend(cfg5, lambda m: "I'd say 4/5"))
    assert j5.score("q", "r") == 0.8 and j5.backend.calls == 1


def test_cache_file_holds_no_secret_and_is_plain_sqlite(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-cachesecret-123")
    path = tmp_path / "cache.sqlite"
    cfg = JudgeConfig(backend="openai", model="m", cache=str(path), api_key_env="JUDGE_TEST_KEY")
    Judge(cfg, FunctionBackend(cfg, lambda m: "Rating: 2")).score("q", "r")
    rows = sqlite3.connect(path).execute("SELECT key, judge, reply FROM replies").fetchall()
    assert rows and rows[0][2] == "Rating: 2"
    assert b"sk-test-cachesecret-123" not in path.read_bytes()


def test_threads_share_one_cache(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    keys = [cache_key("j", {}, [{"role": "user", "content": str(i)}]) for i in range(200)]

    def writer(part):
        cache.put_many([(k, f"reply {k[:6]}") for k in part], "j")

    threads = [threading.Thread(target=writer, args=(keys[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    got = cache.get_many(keys)
    assert len(got) == 200 and got[keys[7]] == f"reply {keys[7][:6]}"


def test_cache_off(tmp_path):
    cfg = JudgeConfig(backend="openai", model="m", cache=None)
    j = Judge(cfg, FunctionBackend(cfg, lambda m: "Rating: 2"))
    j.score("q", "r")
    j.score("q", "r")
    assert j.cache is None and j.backend.calls == 2
