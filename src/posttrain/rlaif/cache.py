"""On-disk cache of judge replies, so a resumed or repeated run does not pay twice.

One SQLite file (default ``$POSTTRAIN_HOME/judge-cache/judge.sqlite``), safe to share between
threads and processes (WAL journal, busy timeout). The key is a SHA-256 of the judge's identity and
generation settings and the exact messages sent: the messages hold the template, the rubric, the
prompt and the response(s), so changing any of them misses the cache, and the two orders of a
pairwise comparison are two entries. What is stored is the judge's raw reply text, parsed again
on every read, so a better parser applies to old entries; unparsable replies are cached too (the
judge did answer). Failures are never cached. API keys are not part of the key nor stored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key     TEXT PRIMARY KEY,
    judge   TEXT NOT NULL,
    reply   TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(judge: str, settings: dict, messages: list[dict[str, str]]) -> str:
    """Stable key of one judge request."""
    blob = json.dumps({"judge": judge, "settings": settings, "messages": messages}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """`get_many(keys) -> {key: reply}` and `put_many([(key, reply)])` over one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # a filesystem without shared memory: keep the default journal
            pass
        self._conn.execute(_SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                rows = self._conn.execute(
                    f"SELECT key, reply FROM replies WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                out.update(rows)
        return out

    def get(self, key: str) -> Optional[str]:
        return self.get_many([key]).get(key)

    def put_many(self, items: Iterable[tuple[str, str]], judge: str = "") -> None:
        now = time.time()
        rows = [(k, judge, reply, now) for k, reply in items]
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO replies (key, judge, reply, created) VALUES (?, ?, ?, ?)",
                                       rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def put(self, key: str, reply: str, judge: str = "") -> None:
        self.put_many([(key, reply)], judge)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"
