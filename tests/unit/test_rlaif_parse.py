"""Reading ratings and pairwise verdicts out of judge replies: explicit forms, last match wins,
anything without a recognisable verdict is None (never guessed)."""

import pytest

from posttrain.rlaif.parse import Verdict, normalise_rating, parse_rating, parse_verdict


@pytest.mark.parametrize("text, expected", [
    ("7", 7.0),
    (" 5. ", 5.0),
    ("Rating: 7", 7.0),
    ("The response is fine.\nRating: 8.", 8.0),          # verdict after reasoning, trailing period
    ("**Rating:** 9", 9.0),                              # markdown
    ("Score = 6.5", 6.5),
    ("[[3]]", 3.0),                                      # MT-Bench
    ("I would give it 7/10.", 7.0),                      # a fraction over the scale's max
    ("7 out of 10", 7.0),
    ('{"score": 8, "reason": "clear"}', 8.0),            # JSON
    ('```json\n{"rating": "4"}\n```', 4.0),
    ("Rating: 2 at first... on reflection, Rating: 6", 6.0),   # the last verdict wins
    ("On a score: 1-10 scale... Rating: 3", 3.0),        # a range is not a rating
])
def test_rating_forms(text, expected):
    assert parse_rating(text, 1, 10) == expected


@pytest.mark.parametrize("text", [
    None, "", "2+2 is 4.",                 # a stray number is not a rating
    "Rating: N",                            # the template's placeholder echoed back
    "Rating: 11", "Rating: 0", "[[42]]",    # outside the scale
    "Rating: 12-15",                        # a range
    "3/5",                                  # a fraction over another scale
    '{"score": true}',                      # a boolean is not a number
    "Excellent answer!",
])
def test_unparsable_ratings_are_none(text):
    assert parse_rating(text, 1, 10) is None


def test_rating_scale_and_normalisation():
    assert parse_rating("Rating: 4", 0, 5) == 4.0
    assert parse_rating("Rating: 7", 0, 5) is None
    # 1..10 maps to [0, 1]: 1 -> 0, 10 -> 1, 7 -> 6/9
    assert normalise_rating(1, 1, 10) == 0.0
    assert normalise_rating(10, 1, 10) == 1.0
    assert normalise_rating(7, 1, 10) == pytest.approx(6 / 9)


@pytest.mark.parametrize("text, winner", [
    ("A", "a"), ("B.", "b"), ("**B**", "b"), ("Response A", "a"), ("tie", "tie"),
    ("Winner: B", "b"),
    ("Both are close, but the winner is Response A.", "a"),
    ("Verdict: tie", "tie"),
    ("The winner is a tie", "tie"),
    ("[[A]]", "a"), ("[[C]]", "tie"),                       # MT-Bench, C = tie
    ('The correct answer is "Winner: A" and not', "a"),
    ("Winner: A... actually, Winner: B", "b"),               # last verdict wins
    ('{"winner": "B"}', "b"), ('{"preferred": 1}', "a"), ('{"winner": "Response B"}', "b"),
])
def test_verdict_forms(text, winner):
    assert parse_verdict(text) == Verdict(winner)


def test_verdict_json_confidence():
    assert parse_verdict('{"winner": "A", "confidence": 0.8}') == Verdict("a", 0.8)
    assert parse_verdict('{"winner": "A", "confidence": 3}') == Verdict("a", None)   # not a probability


@pytest.mark.parametrize("text", [
    None, "", "A: 4\n\nB: 5",             # both labels, no verdict
    "I choose a.", "Both response A and B are correct.", "The winner is clear.", '{"winner": "neither one"}',
])
def test_unparsable_verdicts_are_none(text):
    assert parse_verdict(text) is None
