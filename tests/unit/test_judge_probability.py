"""Judges that score by probability (posttrain.rlaif.probability): the expected rating under the
judge's distribution over the rating tokens (G-Eval) and p(A) vs p(B), on the tiny model (local
backend: exact teacher-forced label probabilities) and over real HTTP through the `openai` SDK
against a server that answers with responses in the Chat Completions API's logprobs shape; the
fallback to parsing, the counters, the cache and the config errors."""

import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from posttrain.rlaif import FunctionBackend, Judge, JudgeConfig, load_judge_config
from posttrain.rlaif.judges import JudgeError, Preference
from posttrain.rlaif.labeling import label_rows
from posttrain.rlaif.parse import Verdict
from posttrain.rlaif.probability import (Probe, continuing_tokens, expected_rating, label_continuations,
                                         label_logprobs, labels_from_top_logprobs, rating_labels, renormalise,
                                         trie_paths)
from posttrain.runtime.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import terminal  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ pure parts


def test_renormalise_over_the_labels_and_expected_rating():
    probs = renormalise({"1": math.log(0.1), "2": math.log(0.3), "3": -math.inf})
    assert probs == pytest.approx({"1": 0.25, "2": 0.75, "3": 0.0})
    assert expected_rating(probs) == pytest.approx(1.75)
    assert renormalise({"1": -math.inf}) == {}
    assert rating_labels(1, 10) == tuple(str(i) for i in range(1, 11))
    assert rating_labels(0.5, 1.5) == ("1",)


def test_trie_paths_run_each_needed_prefix_once():
    # " 1", " 7", " 10" with a digit-splitting tokenizer: ' '=9, '1'=1, '7'=7, '0'=0
    paths, stop = trie_paths([[9, 1], [9, 7], [9, 1, 0]])
    assert paths == [(9, 1)]               # gives the distributions after (), (9,) and (9, 1)
    assert stop == [True, False, False]    # " 1" must end there (no digit after it); " 10" and " 7" need not
    paths, stop = trie_paths([[330], [389]])
    assert paths == [()] and stop == [False, False]


def test_label_logprobs_equal_teacher_forcing(tiny):
    model, tok = tiny
    model.eval()
    labels = ("1", "7", "10")
    conts = label_continuations(tok, "Rating:", labels)
    assert conts[2][:len(conts[0])] == conts[0]          # "10" = "1" then "0" (SmolLM2 splits digits)
    contexts = [tok("Rate it. Rating:")["input_ids"], tok("Another, longer context. Rating:")["input_ids"]]
    continuing = continuing_tokens(tok)
    got = label_logprobs(model, contexts, conts, continuing, batch_size=2)

    def teacher_forced(ctx, cont):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        lp = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        return lp, logp[-1]

    for i, ctx in enumerate(contexts):
        lp7, _ = teacher_forced(ctx, conts[1])
        lp10, _ = teacher_forced(ctx, conts[2])
        lp1, after1 = teacher_forced(ctx, conts[0])
        stop1 = math.log(1 - float(after1[continuing].exp().sum()))
        assert got[i] == pytest.approx([lp1 + stop1, lp7, lp10], abs=1e-4)


def test_compare_by_probability_averages_the_two_orders():
    # p(A) = 0.8 when a is shown first, 0.4 when b is shown first: p(a better) = (0.8 + 0.6) / 2
    pref = Judge._preference([("Winner: A", 0.8), ("Winner: A", 0.4)])
    assert pref.winner == "a" and pref.p_a == pytest.approx(0.7) and pref.confidence == pytest.approx(0.4)
    assert pref.reason == "probability" and pref.votes == ("a", "a")
    # a tie only when the probabilities are exactly equal
    assert Judge._preference([("", 0.5), ("", 0.5)]).winner is None
    # one order parsed (a sampled "B" shown first = a lost: p_a 0), the other by probability
    mixed = Judge._preference([("", 0.9), ("Winner: A", Verdict("a"))])
    assert mixed.p_a == pytest.approx(0.45) and mixed.winner == "b"
    # parse-only answers keep the old rules (position bias voids the verdict)
    assert Judge._preference([("", Verdict("a")), ("", Verdict("a"))]) == Preference(None, 0.0, ("a", "b"),
                                                                                     "position_bias")


# ------------------------------------------------------------------ local backend


def local_judge(tiny_dir, tmp_path, **fields):
    return Judge.from_config({"backend": "local", "model": tiny_dir, "device": "cpu",
                              "cache": str(tmp_path / "cache.sqlite"), **fields})


PROMPTS = ["What is 2+2?", "Name a color.", "What is 3*3?"]
RESPONSES = ["4", "Blue.", "I do not know."]


def test_local_judge_scores_by_probability_counts_and_caches(tiny_dir, tmp_path):
    with local_judge(tiny_dir, tmp_path) as judge:
        assert judge.score_probe.labels == rating_labels(1, 10)
        scores = judge.score_batch(PROMPTS, RESPONSES)
        assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)
        assert len(set(scores)) == len(scores)                     # continuous: no ties
        m = judge.metrics()
        counts = (m["judge/requests"], m["judge/by_probability"], m["judge/parsed"], m["judge/unparsable"])
        assert counts == (3, 3, 0, 0)
        again = judge.score_batch(PROMPTS, RESPONSES)                # from the cache, probabilities included
        assert again == scores and judge.metrics()["judge/cache_hits"] == 3
        pref = judge.compare(PROMPTS[0], RESPONSES[0], RESPONSES[2])
        assert pref.reason in ("probability", "tie") and 0.0 <= pref.p_a <= 1.0
        assert judge.metrics()["judge/by_probability"] == 3 + 3 + 2


def test_scoring_parse_keeps_sampling_and_parsing(tiny_dir, tmp_path):
    with local_judge(tiny_dir, tmp_path, scoring="parse", max_tokens=3) as judge:
        assert judge.score_probe is None and judge.compare_probe is None
        judge.score_batch(PROMPTS, RESPONSES)
        m = judge.metrics()
        assert m["judge/by_probability"] == 0 and m["judge/parsed"] + m["judge/unparsable"] == 3


def test_label_by_probability_pairs_every_row(tiny_dir, tmp_path):
    rows = [{"prompt": p, "responses": [r, "no idea", r + "!"]} for p, r in zip(PROMPTS, RESPONSES)]
    with local_judge(tiny_dir, tmp_path) as judge:
        out = label_rows(judge, rows, "score")
    assert all(record is not None for record, _ in out)
    assert all(len(set(record["label"]["scores"])) == 3 for record, _ in out)


def test_a_backend_without_probabilities_refuses_scoring_probability():
    cfg = JudgeConfig(backend="openai", model="rules", cache=None, scoring="probability")
    with pytest.raises(JudgeError, match="scoring: probability.*function backend"):
        Judge(cfg, FunctionBackend(cfg, lambda m: "Rating: 5"))
    auto = JudgeConfig(backend="openai", model="rules", cache=None)
    judge = Judge(auto, FunctionBackend(auto, lambda m: "Rating: 5"))
    assert judge.score("q", "r") == pytest.approx(4 / 9) and judge.metrics()["judge/parsed"] == 1


# ------------------------------------------------------------------ OpenAI-compatible server


def completion(tokens, top):
    """A Chat Completions response in the API's shape (choices[0].logprobs.content[i] = {token, logprob,
    bytes, top_logprobs: [{token, logprob, bytes}]}), as OpenAI and vLLM send it with logprobs=true;
    `top` maps a token index to its alternatives (the sampled token's own entry comes first)."""
    content = []
    for i, (token, logprob) in enumerate(tokens):
        alts = [(token, logprob)] + top.get(i, [])
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts]})
    return {"id": "chatcmpl-9xQ1", "object": "chat.completion", "created": 1733300000,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0aa8d3e20b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(t for t, _ in tokens),
                                                 "refusal": None},
                         "logprobs": {"content": content, "refusal": None}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 98, "completion_tokens": len(tokens), "total_tokens": 98 + len(tokens)}}


RATING = completion([("The", -0.3), (" answer", -0.5), (" is", -0.1), (" correct", -0.2), (".\n", -0.4),
                     ("Rating", -0.01), (":", 0.0), (" ", -0.02), ("8", -0.4)],
                    {8: [("9", -1.3), ("7", -2.5), ("10", -3.9), ("**", -5.0), ("6", -6.1)]})
VERDICT = completion([("A", -0.9), (" is", -0.3), (" right", -0.6), (".\n", -0.4), ("Winner", -0.02), (":", 0.0),
                      (" A", -0.2)], {6: [(" B", -1.8), (" tie", -4.0)]})


class Recorded(BaseHTTPRequestHandler):
    """Answers every chat completion with `server.answer` (or an error status), keeping the requests."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append(body)
        status, answer = self.server.answer(body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorded)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def http_judge(server, **fields):
    url = f"http://127.0.0.1:{server.server_port}/v1"
    return Judge.from_config({"backend": "openai", "model": "judge", "base_url": url, "cache": None, "max_retries": 0,
                              "concurrency": 1, **fields})


def test_openai_top_logprobs_give_the_expected_rating(server):
    server.answer = lambda body: (200, RATING)
    with http_judge(server) as judge:
        score = judge.score("What is 2+2?", "4")
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 20
    weights = {r: math.exp(lp) for r, lp in (("8", -0.4), ("9", -1.3), ("7", -2.5), ("10", -3.9), ("6", -6.1))}
    expected = sum(int(r) * w for r, w in weights.items()) / sum(weights.values())
    assert score == pytest.approx((expected - 1) / 9)
    assert judge.metrics()["judge/by_probability"] == 1


def test_openai_verdict_probability_and_digit_split_labels(server):
    server.answer = lambda body: (200, VERDICT)
    with http_judge(server, position_swap=False) as judge:
        pref = judge.compare("q", "a", "b")
    assert pref.winner == "a" and pref.p_a == pytest.approx(1 / (1 + math.exp(-1.6)))
    # a digit-splitting tokenizer (Qwen, SmolLM2): "1" sampled, then "0" or the end of the line
    tokens = [["Rating", 0.0, []], [": ", 0.0, []], ["1", -0.5, [["1", -0.5], ["9", -1.0]]],
              ["0", -0.2, [["0", -0.2], ["\n", -1.7]]]]
    got = labels_from_top_logprobs(tokens, Probe("rating", "Rating:", rating_labels(1, 10), 1, 10))
    assert got["10"] == pytest.approx(-0.7) and got["9"] == pytest.approx(-1.0)
    assert got["1"] == pytest.approx(-0.5 + math.log(1 - math.exp(-0.2)))


def test_openai_without_logprobs_falls_back_to_parsing_or_refuses(server):
    plain = {**RATING, "choices": [{**RATING["choices"][0], "logprobs": None}]}
    server.answer = lambda body: (200, plain)
    with http_judge(server) as judge:                                     # auto: parse the sampled answer
        assert judge.score("q", "r") == pytest.approx(7 / 9)
        assert (judge.metrics()["judge/by_probability"], judge.metrics()["judge/parsed"]) == (0, 1)
    with http_judge(server, scoring="probability") as judge:
        with pytest.raises(JudgeError, match="returned no logprobs"):
            judge.score("q", "r")
    with http_judge(server, scoring="parse") as judge:                    # not even asked for
        judge.score("q", "r")
    assert "logprobs" not in server.requests[-1]


def test_openai_server_refusing_logprobs_is_parsed_from_then_on(server):
    refused = {"error": {"message": "logprobs is not supported", "type": "invalid_request_error"}}
    server.answer = lambda body: (400, refused) if body.get("logprobs") else (200, RATING)
    with http_judge(server) as judge:
        assert judge.score_batch(["q", "q2"], ["r", "r2"]) == [pytest.approx(7 / 9)] * 2
        assert judge.metrics()["judge/parsed"] == 2
    assert [("logprobs" in b) for b in server.requests] == [True, False, False]


# ------------------------------------------------------------------ config


def test_scoring_config_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("backend: local\nscoring: maybe\n")
    with pytest.raises(ConfigError, match=r"judge.yaml:2.*scoring"):
        load_judge_config(path)
    path.write_text("backend: anthropic\nmodel: claude\n\nscoring: probability\n")
    with pytest.raises(ConfigError, match=r"judge.yaml:4: field 'scoring': the Anthropic API returns no token"):
        load_judge_config(path)
    path.write_text("backend: local\nscore_min: 0\nscore_max: 0.5\nscoring: probability\n")
    with pytest.raises(ConfigError, match=r"judge.yaml:4: field 'scoring'.*fewer than two"):
        load_judge_config(path)
    assert load_judge_config(tmp_path / "judge.yaml", {"scoring": "auto"}).scoring == "auto"


def test_label_refuses_a_bad_scoring_before_loading_a_model(tmp_path):
    (tmp_path / "judge.yaml").write_text("backend: local\ncache: false\nscoring: sampled\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "q", "responses": ["a", "b"]}) + "\n")
    proc = terminal.posttrain("label", "--judge", "judge.yaml", "--data", "rows.jsonl", "--out", "pairs.jsonl",
                              cwd=tmp_path, timeout=120)
    terminal.assert_user_error(proc, "judge.yaml:3", "scoring")
    assert not (tmp_path / "pairs.jsonl").exists()
