"""The on-disk answer cache of the LLM clients: one SQLite file, ``RUN_DIR/llm-cache/cache.sqlite``.

A key is the SHA-256 of the canonical JSON of the full request (:func:`request_key`): the kind of
call, the backend's identity (backend and model; never the URL or the key), the messages, the
sampling parameters and the sample index, so five samples at temperature 1 are five entries and a
rerun of the same request is answered from disk without a call.

Safe under concurrency: the database runs in WAL mode with a busy timeout, so several processes
can read and write it at once, and within a process one connection is shared by every thread
behind a lock (the async clients run these blocking calls in worker threads). The first answer
stored under a key stays (``INSERT OR IGNORE``): an answer somebody has read never changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from adag.errors import AdagError
from adag.io import shown

CACHE_FILE = "cache.sqlite"
KEY_VERSION = 1
"""Part of every key: bump it when the meaning of a stored answer changes."""
BUSY_TIMEOUT_S = 60.0


def canonical_json(obj: Any) -> str:
    """``obj`` as JSON with sorted keys and no insignificant whitespace (floats as Python writes
    them, so ``0.0`` and ``0`` differ: callers pass floats as floats)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(request: dict[str, Any]) -> str:
    """The cache key of a request: SHA-256 (hex) of its canonical JSON (with :data:`KEY_VERSION`)."""
    payload = canonical_json({"v": KEY_VERSION, **request})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Cache:
    """A key → JSON-text store in ``directory/cache.sqlite``; the directory is created on open.

    ``get`` and ``put`` block (briefly, or up to the busy timeout while another process writes):
    call them from a worker thread in async code."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CACHE_FILE
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as e:
            raise AdagError(f"cannot open the LLM cache {shown(self.path)} ({e})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                "key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL, created REAL)"
            )
        except sqlite3.Error as e:
            conn.close()
            raise AdagError(
                f"cannot use the LLM cache {shown(self.path)} ({e}); delete it to start afresh"
            ) from None
        self._conn: sqlite3.Connection | None = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AdagError(f"the LLM cache {shown(self.path)} is closed")
        return self._conn

    def get(self, key: str) -> str | None:
        """The stored answer for ``key``, or None."""
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT value FROM answers WHERE key = ?", (key,))
                .fetchone()
            )
        return None if row is None else str(row[0])

    def put(self, key: str, value: str, *, kind: str = "") -> None:
        """Store ``value`` under ``key`` unless an answer is there already."""
        with self._lock:
            try:
                self._connection().execute(
                    "INSERT OR IGNORE INTO answers (key, kind, value, created) VALUES (?, ?, ?, ?)",
                    (key, kind, value, time.time()),
                )
            except sqlite3.Error as e:
                raise AdagError(f"cannot write the LLM cache {shown(self.path)} ({e})") from None

    def __len__(self) -> int:
        with self._lock:
            row = self._connection().execute("SELECT COUNT(*) FROM answers").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CACHE_FILE", "Cache", "canonical_json", "request_key"]
