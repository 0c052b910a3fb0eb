"""Online listening history: a small store interface and its SQLite implementation.

The service talks to a ``HistoryStore`` only, so another backend (e.g. Redis, for several
replicas on several machines) can be added in ``open_history_store`` without touching the rest.

SQLite is the default: one file, WAL journal (readers never block the writer), a busy timeout
so several uvicorn worker processes can write to the same file, and one transaction per
``add`` so a batch is stored entirely or not at all. Order per user is the order of the
autoincrement row id.

Durability: ``synchronous=FULL`` (the default here) fsyncs the WAL on every commit, so an
event that was acknowledged survives not only ``kill -9`` of the server but also a power loss
or an OS crash. ``NORMAL`` would already survive ``kill -9`` (a committed transaction is in
the OS page cache, which outlives the process) and is a few times faster per write on slow
disks, but a power cut could then drop the last acknowledged events, which API.md forbids.
It can be chosen per URL: ``sqlite:///history.db?synchronous=NORMAL``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")


class HistoryStoreError(RuntimeError):
    """The history store cannot answer (unreachable, locked for too long, broken file)."""


@runtime_checkable
class HistoryStore(Protocol):
    """Append-only online history per user, shared by every worker process."""

    def add(self, user_id: int, track_ids: Sequence[int]) -> int:
        """Append the events atomically, in order; return the user's new history length."""
        ...

    def get(self, user_id: int) -> list[int]:
        """The user's history in the order it was added; ``[]`` for an unknown user."""
        ...

    def ping(self) -> bool:
        """True when the store answers."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id  INTEGER NOT NULL,
    track_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_user ON history (user_id, id);
"""


class SQLiteHistoryStore:
    """History in one SQLite file; per process one writing and one reading connection, each
    guarded by its own lock.

    Threads of one process share the writer under ``self._lock`` and the reader under
    ``self._read_lock``, so a read never waits for a write's fsync (WAL: readers see the last
    committed state and never block on the writer). Each worker process opens its own
    connections and SQLite's file locks (WAL + busy timeout) order the writers of different
    processes.
    """

    def __init__(
        self, path: str | Path, *, synchronous: str = "FULL", busy_timeout_ms: int = 10_000
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}"
            )
        self.path = Path(path)
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise HistoryStoreError(f"{self.path}: cannot switch to WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise HistoryStoreError(f"cannot open history store {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            reader = sqlite3.connect(
                self.path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                check_same_thread=False,
            )
            reader.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            reader.execute("PRAGMA query_only = 1")
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise HistoryStoreError(f"cannot open history store {self.path}: {exc}") from exc
        self._reader: sqlite3.Connection | None = reader
        log.info("history store %s (WAL, synchronous=%s)", self.path, synchronous)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryStoreError(f"history store {self.path} is closed")
        return self._conn

    def _read_connection(self) -> sqlite3.Connection:
        if self._reader is None:
            raise HistoryStoreError(f"history store {self.path} is closed")
        return self._reader

    def add(self, user_id: int, track_ids: Sequence[int]) -> int:
        rows = [(int(user_id), int(t)) for t in track_ids]
        with self._lock:
            conn = self._connection()
            try:
                # IMMEDIATE takes the write lock now, so the count below sees our rows only
                # plus whatever committed before: no lock upgrade, no deadlock between workers.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        "INSERT INTO history (user_id, track_id) VALUES (?, ?)", rows
                    )
                    (length,) = conn.execute(
                        "SELECT COUNT(*) FROM history WHERE user_id = ?", (int(user_id),)
                    ).fetchone()
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise HistoryStoreError(f"history store {self.path}: {exc}") from exc
        return int(length)

    def get(self, user_id: int) -> list[int]:
        with self._read_lock:
            try:
                cursor = self._read_connection().execute(
                    "SELECT track_id FROM history WHERE user_id = ? ORDER BY id", (int(user_id),)
                )
                return [row[0] for row in cursor.fetchall()]
            except sqlite3.Error as exc:
                raise HistoryStoreError(f"history store {self.path}: {exc}") from exc

    def ping(self) -> bool:
        with self._read_lock:
            try:
                self._read_connection().execute("SELECT 1 FROM history LIMIT 1").fetchall()
                return True
            except (sqlite3.Error, HistoryStoreError):
                return False

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __repr__(self) -> str:
        return f"SQLiteHistoryStore({str(self.path)!r}, synchronous={self.synchronous!r})"


def open_history_store(url: str, *, base_dir: str | Path | None = None) -> HistoryStore:
    """Open the store a URL names.

    ``sqlite:///relative/path.db`` (relative to ``base_dir`` or the current folder) or
    ``sqlite:////absolute/path.db``; option ``?synchronous=FULL|NORMAL``.
    """
    if not isinstance(url, str) or not url.startswith(SQLITE_PREFIX):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else url
        raise ValueError(
            f"unsupported history store URL {url!r} (scheme {scheme!r}); "
            "expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    rest = url[len(SQLITE_PREFIX):]
    path_part, _, query = rest.partition("?")
    if not path_part:
        raise ValueError(f"history store URL {url!r} has no file path")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"synchronous"}
    if unknown:
        raise ValueError(f"history store URL {url!r}: unknown option(s) {sorted(unknown)}")
    path = Path(path_part)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return SQLiteHistoryStore(path, synchronous=options.get("synchronous", "FULL"))
