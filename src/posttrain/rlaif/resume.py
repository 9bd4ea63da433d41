"""Resumable JSONL output for the labeling commands (`posttrain label`, `posttrain constitution`).

Output rows go to ``out`` (one JSON object per line, flushed as written); every processed input
row, whether it gave an output row or was skipped, gets a line in the side file
``<out>.progress.jsonl``: ``{"row": i, "status": "pair" | "skipped", "reason": ...}``. Restarting
the same command skips the rows done already. An output row also names its input row (in its
metadata field, e.g. ``{"label": {"row": 12, ...}}``), so a crash between the two writes does not
duplicate a pair, and a half-written last line (a crash mid-write) is cut off on resume; a bad line
before the last is damage no crash makes, an error naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from posttrain.data import DataError


class ResumableJsonl:
    """Append output rows and progress; `done` holds the input rows already processed."""

    def __init__(self, out: str | Path, meta_field: str, overwrite: bool = False):
        self.out = Path(out)
        self.progress = self.out.with_name(self.out.name + ".progress.jsonl")
        self.meta_field = meta_field
        self.done: set[int] = set()
        self.written = 0
        self.skipped = 0
        if overwrite:
            for p in (self.out, self.progress):
                if p.exists():
                    p.unlink()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for record in self._read(self.out):
            row = (record.get(meta_field) or {}).get("row") if isinstance(record.get(meta_field), dict) else None
            if isinstance(row, int):
                self.done.add(row)
                self.written += 1
        for record in self._read(self.progress):
            row = record.get("row")
            if isinstance(row, int) and row not in self.done:
                self.done.add(row)
                self.skipped += record.get("status") == "skipped"
        self.resumed = bool(self.done)
        self._out = self.out.open("a", encoding="utf-8")
        self._progress = self.progress.open("a", encoding="utf-8")

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        """Complete JSON lines of `path`; a broken last line (crash mid-write) is cut off the file."""
        if not path.exists():
            return []
        records, good_bytes = [], 0
        with path.open("rb") as f:
            data = f.read()
        lines = data.splitlines(keepends=True)
        for number, line in enumerate(lines, start=1):
            try:
                if line.strip():
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        records.append(obj)
                if not line.endswith(b"\n"):
                    raise ValueError("unterminated line")
            except (ValueError, UnicodeDecodeError):
                if any(rest.strip() for rest in lines[number:]):  # not the last line: damage, not a torn write
                    raise DataError(str(path), number, None, "not a JSON line, and not the last one (a crash "
                                    "only tears the last line): repair or remove the file, or pass --overwrite") from None
                break
            good_bytes += len(line)
        if good_bytes < len(data):
            with path.open("r+b") as f:
                f.truncate(good_bytes)
        return records

    def add(self, row: int, record: Optional[dict[str, Any]], reason: str = "") -> None:
        """Record input row `row`: `record` is its output row (its metadata gets the row number),
        or None when it was skipped for `reason`."""
        if record is not None:
            meta = dict(record.get(self.meta_field) or {})
            meta["row"] = row
            record = {**record, self.meta_field: meta}
            self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._out.flush()
            self.written += 1
        else:
            self.skipped += 1
        self._progress.write(json.dumps({"row": row, "status": "pair" if record is not None else "skipped",
                                         "reason": reason}) + "\n")
        self._progress.flush()
        self.done.add(row)

    def close(self) -> None:
        self._out.close()
        self._progress.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
