"""Reading a judge's reply: a rating, or which of two responses won.

Judges answer in many shapes: a bare number, "Rating: 7", "7/10", MT-Bench's "[[7]]", a JSON
object, "Winner: A", "[[B]]", "Response A". The parsers try the explicit forms first and take the
*last* match (a verdict comes after the reasoning). They are deliberately strict: a reply with no
verdict in a recognised form is unparsable (None), never guessed from a stray number or letter
("2+2 is 4" is not a rating of 4), and the caller counts it.

    parse_rating("Reasoning... Rating: 7", 1, 10)       -> 7.0
    parse_rating('{"score": 8, "why": "..."}', 1, 10)   -> 8.0
    parse_rating("Rating: 11", 1, 10)                   -> None   (outside the scale)
    parse_verdict("Winner: B")                          -> Verdict("b", None)
    parse_verdict('{"winner": "A", "confidence": 0.8}') -> Verdict("a", 0.8)
    parse_verdict("Both are fine. Winner: tie")         -> Verdict("tie", None)
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

_NUM = r"[+-]?\d+(?:\.\d+)?"
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_SCORE_KEYS = ("score", "rating", "grade")
_WINNER_KEYS = ("winner", "preferred", "preference", "better", "choice", "verdict")
_RATING_LINE = re.compile(
    rf"(?i)\b(?:rating|score|grade)\b\s*(?:\*\*)?\s*(?:is|[:=])\s*(?:\*\*)?\s*\[*\s*({_NUM})(?!\.?\d)(?!\s*(?:[-–]|to)\s*\d)")
_DOUBLE_BRACKET_NUM = re.compile(rf"\[\[\s*({_NUM})\s*\]\]")
_FRACTION = re.compile(rf"({_NUM})\s*(?:/|out of)\s*({_NUM})")
_DOUBLE_BRACKET_LETTER = re.compile(r"\[\[\s*([ABC]|tie)\s*\]\]", re.I)
_WINNER_LINE = re.compile(
    r"(?i)\b(?:winner|verdict|preferred(?:\s+response)?|better\s+response|choice)\b\s*(?:is)?\s*[:=]?\s*"
    r"(?:\*\*)?\s*[\"'(\[]?\s*(?:response|assistant|output)?\s*((?-i:[AB])|(?:a\s+)?tie)\b")
_BARE = re.compile(r"(?i)^(?:response|assistant|output)?\s*([AB]|tie)$")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A parsed pairwise verdict: `winner` is "a", "b" or "tie"; `confidence` as the judge stated it (or None)."""

    winner: str
    confidence: Optional[float] = None


def _json_objects(text: str) -> list[dict[str, Any]]:
    out = []
    for m in _JSON_OBJECT.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append({str(k).lower(): v for k, v in obj.items()})
    return out


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and re.fullmatch(rf"\s*{_NUM}\s*", value):
        return float(value)
    return None


def _clean(text: str) -> str:
    """Strip markdown emphasis, quotes and trailing punctuation around a short answer."""
    return text.strip().strip("*_`\"' \t\n").rstrip(".!").strip("*_`\"' ")


def parse_rating(text: str | None, lo: float, hi: float) -> Optional[float]:
    """The rating in `text` on the scale [lo, hi], or None when there is no recognisable one
    (or it lies outside the scale)."""
    if not text:
        return None
    value: Optional[float] = None
    for obj in reversed(_json_objects(text)):
        for key in _SCORE_KEYS:
            if key in obj and _as_number(obj[key]) is not None:
                value = _as_number(obj[key])
                break
        if value is not None:
            break
    if value is None:
        for pattern in (_DOUBLE_BRACKET_NUM, _RATING_LINE):
            found = pattern.findall(text)
            if found:
                value = float(found[-1])
                break
    if value is None:
        fractions = [(float(n), float(d)) for n, d in _FRACTION.findall(text) if float(d) == float(hi)]
        if fractions:
            value = fractions[-1][0]
    if value is None:
        bare = _clean(text)
        if re.fullmatch(_NUM, bare):
            value = float(bare)
    if value is None or not lo <= value <= hi:
        return None
    return value


def normalise_rating(value: float, lo: float, hi: float) -> float:
    """Map a rating on [lo, hi] to [0, 1]."""
    return (value - lo) / (hi - lo)


def _winner_of(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {1: "a", 2: "b", 0: "tie"}.get(int(value)) if float(value).is_integer() else None
    if not isinstance(value, str):
        return None
    v = _clean(value).lower()
    v = re.sub(r"^(?:response|assistant|output|a)\s+", "", v)
    return {"a": "a", "b": "b", "1": "a", "2": "b", "tie": "tie", "c": "tie", "draw": "tie", "equal": "tie",
            "none": "tie"}.get(v)


def parse_verdict(text: str | None) -> Optional[Verdict]:
    """Which response won according to `text` ("a", "b" or "tie"), or None when unparsable."""
    if not text:
        return None
    for obj in reversed(_json_objects(text)):
        for key in _WINNER_KEYS:
            if key in obj:
                winner = _winner_of(obj[key])
                if winner is not None:
                    conf = _as_number(obj.get("confidence"))
                    conf = conf if conf is not None and 0.0 <= conf <= 1.0 else None
                    return Verdict(winner, conf)
    for pattern in (_DOUBLE_BRACKET_LETTER, _WINNER_LINE):
        found = pattern.findall(text)
        if found:
            winner = _winner_of(found[-1])
            if winner is not None:
                return Verdict(winner)
    m = _BARE.match(_clean(text))
    if m:
        return Verdict(_winner_of(m.group(1)) or "tie")
    return None
