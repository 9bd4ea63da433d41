"""Judges that score by probability, on the real embedded model (SmolLM2-135M-Instruct).

- The local backend reads the rating from the judge's token probabilities: every request gives a
  usable verdict and fewer rows end without a pair (a tie) than when one sampled answer is parsed,
  which the 135M judge mostly fails to write in the asked form.
- llm-katan's OpenAI API sends no logprobs (``"logprobs": None`` in every response of llm_katan 0.22):
  ``scoring: auto`` falls back to parsing the sampled answer and counts it, ``scoring: probability``
  stops with a clear error.
"""

import pytest

from posttrain.models import ensure_embedded
from posttrain.rlaif import Judge, JudgeConfig, LocalBackend
from posttrain.rlaif.judges import JudgeError
from posttrain.rlaif.katan import KatanServer
from posttrain.rlaif.labeling import label_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROWS = [  # a right and a wrong answer each; the right one first in every other row
    {"prompt": "What is 7 + 5?", "responses": ["7 + 5 = 12.", "7 + 5 = 15."]},
    {"prompt": "What is 9 times 3?", "responses": ["9 times 3 is 12.", "9 times 3 is 27."]},
    {"prompt": "What is the capital of France?", "responses": ["The capital of France is Paris.",
                                                               "The capital of France is Berlin."]},
    {"prompt": "What is the capital of Japan?", "responses": ["I don't know.", "Tokyo is the capital of Japan."]},
    {"prompt": "Name a primary color.", "responses": ["Red is a primary color.", "Banana."]},
    {"prompt": "How many legs does a spider have?",
     "responses": ["A spider has six legs.", "A spider has eight legs."]},
    {"prompt": "What planet do we live on?", "responses": ["We live on Earth.", "We live on the Moon."]},
    {"prompt": "How many days are in a week?", "responses": ["A week has ten days.", "A week has seven days."]},
]


def run(embedded, scoring):
    model, tok = embedded
    cfg = JudgeConfig(backend="local", cache=None, device="cpu", scoring=scoring, max_tokens=64)
    with Judge(cfg, LocalBackend(cfg, model, tok)) as judge:
        out = label_rows(judge, ROWS, "score")
        return out, judge.metrics()


def test_probability_gives_a_usable_verdict_for_every_request_and_fewer_ties(embedded):
    parsed_out, parsed_m = run(embedded, "parse")
    prob_out, prob_m = run(embedded, "probability")
    n = 2 * len(ROWS)
    assert prob_m["judge/by_probability"] == n and prob_m["judge/unparsable"] == prob_m["judge/failures"] == 0
    assert parsed_m["judge/by_probability"] == 0 and parsed_m["judge/parsed"] + parsed_m["judge/unparsable"] == n
    prob_ties = sum(record is None for record, _ in prob_out)
    parsed_ties = sum(record is None for record, _ in parsed_out)
    assert prob_ties == 0 and parsed_ties > prob_ties, (parsed_m, [why for _, why in parsed_out])


@pytest.fixture(scope="module")
def katan():
    with KatanServer(ensure_embedded(), backend="transformers", providers=("openai",), ready_timeout=240) as s:
        yield s


def katan_judge(server, tmp_path, **fields):
    return Judge.from_config({"backend": "openai", "model": "judge", "base_url": server.openai_url, "timeout": 120,
                              "max_tokens": 12, "cache": str(tmp_path / "cache.sqlite"), **fields})


def test_llm_katan_sends_no_logprobs_auto_parses_and_probability_refuses(katan, tmp_path):
    with katan_judge(katan, tmp_path) as judge:
        scores = judge.score_batch(["What is 2+2?", "Name a color."], ["4", "Blue."])
        m = judge.metrics()
    assert m["judge/requests"] == 2 and m["judge/by_probability"] == 0 and m["judge/failures"] == 0
    assert m["judge/parsed"] + m["judge/unparsable"] == 2
    assert sum(s is not None for s in scores) == m["judge/parsed"]
    with katan_judge(katan, tmp_path, scoring="probability", cache=None) as judge:
        with pytest.raises(JudgeError, match="returned no logprobs"):
            judge.score("What is 2+2?", "4")
