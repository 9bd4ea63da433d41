"""Judges over real HTTP on 127.0.0.1: llm-katan serves the embedded model (SmolLM2-135M-Instruct,
the cached float32 directory, nothing downloaded) behind the OpenAI and the Anthropic APIs, and
`score` / `compare` go through the `openai` and `anthropic` SDKs. A 135M model is a poor judge: the
tests check the plumbing (requests reach the server in the right numbers, replies come back and
are parsed or counted, both orders are asked, the cache spares repeats), not the judgments.

`posttrain label` is checked end to end against llm-katan's echo backend, whose replies are known.
"""

import json

import pytest

from posttrain import cli
from posttrain.models import ensure_embedded
from posttrain.rlaif import Judge
from posttrain.rlaif.katan import KatanServer
from posttrain.rlaif.labeling import read_pairs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# short, explicit formats a 135M model follows often enough ("Rating: 4", "... Winner: A ...")
TEMPLATES = {
    "system_prompt": "You are a careful judge of AI assistant responses.",
    "score_template": 'Rate the response from {min} to {max}.\n\nQuestion: {prompt}\nResponse: {response}\n\n'
                      'Reply in the format "Rating: N".',
    "compare_template": 'Question: {prompt}\nResponse A: {a}\nResponse B: {b}\n\n'
                        'Which response is better? Reply in the format "Winner: A" or "Winner: B".',
    "max_tokens": 12,
    "timeout": 120,
    "concurrency": 4,
}
CASES = [("What is 2+2?", "4", "5"), ("Name a primary color.", "Red.", "Banana."),
         ("What is the capital of France?", "Paris.", "I don't know.")]
RESULTS: dict[tuple[str, str], list] = {}  # (what, backend) -> results, compared across the two SDKs


@pytest.fixture(scope="module")
def server():
    with KatanServer(ensure_embedded(), backend="transformers", providers=("openai", "anthropic"),
                     ready_timeout=240) as s:
        yield s


def judge(server, backend, tmp_path, **fields):
    url = server.openai_url if backend == "openai" else server.base_url
    # the anthropic SDK has no temperature parameter: extra_body asks the server for greedy decoding
    extra = {"extra_body": {"temperature": 0}} if backend == "anthropic" else {}
    return Judge.from_config({"backend": backend, "model": "judge", "base_url": url,
                              "cache": str(tmp_path / "cache.sqlite"), **TEMPLATES, **extra, **fields})


def provider_count(server, backend):
    return server.stats()["providers"].get(backend, 0)


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_score_through_the_sdk(server, backend, tmp_path):
    j = judge(server, backend, tmp_path)
    before = provider_count(server, backend)
    prompts = [c[0] for c in CASES for _ in (1, 2)]
    responses = [r for c in CASES for r in c[1:]]
    values = j.score_batch(prompts, responses)
    c = j.counts()
    assert provider_count(server, backend) - before == c["attempts"] == 6 and c["failures"] == 0
    assert c["parsed"] + c["unparsable"] == 6
    assert all(v is None or 0.0 <= v <= 1.0 for v in values)
    assert c["parsed"] >= 1, f"no rating parsed from the {backend} replies"
    assert [v is not None for v in values].count(True) == c["parsed"]
    RESULTS[("score", backend)] = values

    # a repeated run is served from the on-disk cache: no new request reaches the server
    again = judge(server, backend, tmp_path)
    assert again.score_batch(prompts, responses) == values
    assert provider_count(server, backend) - before == 6 and again.counts()["cache_hits"] == 6
    j.close(), again.close()


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_compare_through_the_sdk_asks_both_orders(server, backend, tmp_path):
    j = judge(server, backend, tmp_path, cache=False)
    before = provider_count(server, backend)
    prefs = j.compare_batch([c[0] for c in CASES[:2]], [c[1] for c in CASES[:2]], [c[2] for c in CASES[:2]])
    assert provider_count(server, backend) - before == 4  # 2 comparisons x 2 orders
    c = j.counts()
    assert c["requests"] == 4 and c["failures"] == 0
    votes = [v for p in prefs for v in p.votes]
    assert len(votes) == 4 and sum(v is not None for v in votes) == c["parsed"]
    assert c["parsed"] >= 1, f"no verdict parsed from the {backend} replies"
    for p in prefs:
        if None not in p.votes and len(set(p.votes)) == 1 and p.votes[0] != "tie":
            assert p.winner == p.votes[0] and p.confidence == 1.0
        else:
            assert p.winner is None and p.reason in ("position_bias", "unparsable", "tie")
    RESULTS[("compare", backend)] = prefs
    j.close()


@pytest.mark.parametrize("what", ["score", "compare"])
def test_both_sdks_get_the_same_greedy_judgments(what):
    """The same model, greedy, behind two APIs: the two SDK paths must agree exactly."""
    if (what, "openai") not in RESULTS or (what, "anthropic") not in RESULTS:
        pytest.skip("needs both SDK tests of this module to have run")
    assert RESULTS[(what, "openai")] == RESULTS[(what, "anthropic")]


def test_label_command_end_to_end_and_resume(tmp_path):
    data = tmp_path / "responses.jsonl"
    rows = [{"prompt": "p1", "responses": ["Rating: 3", "Rating: 9", "Rating: 5"], "answer": "x"},
            {"prompt": "p2", "responses": ["Rating: 4", "Rating: 4"]},
            {"prompt": [{"role": "user", "content": "p3"}], "responses": ["Rating: 2", "Rating: 7"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    with KatanServer(ensure_embedded(), backend="echo", providers=("openai",)) as echo:
        cfg = tmp_path / "judge.yaml"
        cfg.write_text(f"backend: openai\nmodel: judge\nbase_url: {echo.openai_url}\nscore_template: '{{response}}'\n"
                       f"cache: {tmp_path / 'cache.sqlite'}\nmax_tokens: 16\n")
        args = ["label", "--judge", str(cfg), "--data", str(data), "--out", str(out), "--batch-size", "2"]
        assert cli.main(args) == 0
        pairs = read_pairs(out)
        assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Rating: 9", "Rating: 3"), ("Rating: 7", "Rating: 2")]
        assert pairs[0]["answer"] == "x" and pairs[0]["label"]["scores"] == [2 / 9, 8 / 9, 4 / 9]
        assert pairs[1]["prompt"] == [{"role": "user", "content": "p3"}]
        served = echo.stats()["total"]
        assert served == 6  # 7 responses, the two identical ones asked once

        # rerun: everything is done, nothing is asked again, nothing is duplicated
        assert cli.main(args) == 0
        assert echo.stats()["total"] == served and len(read_pairs(out)) == 2


def test_pairs_command_with_a_judge_reward_end_to_end_and_resume(tmp_path):
    """`posttrain pairs --reward judge(...)`: the embedded model's samples are scored by a judge over
    HTTP (the echo backend answers with the filled template, so each sample's rating is known: the
    number it wrote), the best and worst of each prompt become a pair with the judge's scores, and
    a rerun asks the judge nothing new."""
    from posttrain.rlaif.parse import normalise_rating, parse_rating

    asks = ["Pick a number from 1 to 9. Reply with the number only.",
            "Rate the movie 'Cats' from 1 to 9. Reply with the number only.",
            "How many legs does a spider have? Reply with the number only.",
            "Give a score from 1 to 9 to the color blue. Reply with the number only."]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in asks))
    out = tmp_path / "pairs.jsonl"
    with KatanServer(ensure_embedded(), backend="echo", providers=("openai",)) as echo:
        cfg = tmp_path / "judge.yaml"
        cfg.write_text(f"backend: openai\nmodel: judge\nbase_url: {echo.openai_url}\n"
                       f"score_template: 'Rating: {{response}}'\ncache: {tmp_path / 'cache.sqlite'}\nmax_tokens: 32\n")
        args = ["pairs", "--data", str(data), "--reward", f"judge({cfg})", "--n", "6", "--max-new-tokens", "3",
                "--temperature", "1.0", "--out", str(out), "--dtype", "float32"]
        assert cli.main(args) == 0
        served = echo.stats()["total"]
        pairs = read_pairs(out)
        assert 1 <= len(pairs) <= len(asks) and 1 <= served <= 6 * len(asks)

        def judged(text):  # what the judge made of "Rating: <sample>", on its default 1-10 scale
            rating = parse_rating(f"Rating: {text}", 1, 10)
            return None if rating is None else normalise_rating(rating, 1, 10)

        for p in pairs:
            chosen, rejected = (p[k] if isinstance(p[k], str) else p[k][-1]["content"] for k in ("chosen", "rejected"))
            assert judged(chosen) == pytest.approx(p["chosen_score"])
            assert judged(rejected) == pytest.approx(p["rejected_score"])
            assert p["chosen_score"] > p["rejected_score"]

        assert cli.main(args) == 0  # resumed: every prompt is done, the judge is not asked again
        assert echo.stats()["total"] == served and read_pairs(out) == pairs
