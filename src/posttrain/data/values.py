"""Values written in specs and on the command line (`key=value` in reward and task specs,
`posttrain tasks --opt`): the one reading of `3`, `0.5`, `true`, `none` and plain strings."""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_value(text: str) -> Any:
    """`3` -> 3, `0.5` -> 0.5, `true`/`false` -> bool, `none` -> None, else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    if NUMBER.fullmatch(t):
        return float(t)
    return t


__all__ = ["parse_value", "NUMBER"]
