"""Online listening history: a small store interface and its SQLite implementation.

The service talks to a ``HistoryStore`` only; ``open_history_store`` picks the backend from
the URL: this SQLite store (one machine) or ``musicrec.history_redis`` (several replicas on
several machines sharing one Redis).

SQLite is the default: one file, WAL journal (readers never block the writer), a busy timeout
so several uvicorn worker processes can write to the same file, and one transaction per
``append`` so a batch is stored entirely or not at all. Order per user is the order of the
autoincrement row id.

Bounded work per request: each user keeps at most ``max_events`` events (older ones are
deleted in the transaction that adds the new ones: retention by count, nothing archived);
every read is an indexed ``ORDER BY id DESC LIMIT`` of at most that many rows; the length of
each user's history and the number of events ever added (which numbers the events: positions
for paging) live in ``history_users``, updated in the same transaction as the events, so no
request counts rows.

Retries: ``append(..., idempotency_key=K)`` stores K with the answer in the same transaction
as the events; the same K again (within ``idempotency_seconds``) returns that first answer and
stores nothing.

Durability: ``synchronous=FULL`` (the default here) fsyncs the WAL on every commit, so an
event that was acknowledged survives not only ``kill -9`` of the server but also a power loss
or an OS crash. ``NORMAL`` would already survive ``kill -9`` (a committed transaction is in
the OS page cache, which outlives the process) and is a few times faster per write on slow
disks, but a power cut could then drop the last acknowledged events, which API.md forbids.
It can be chosen per URL: ``sqlite:///history.db?synchronous=NORMAL``.

Reads without SQLite: each process keeps the histories it read lately (``HistoryCache``),
each valid while the change counter of its user's bucket is unchanged. The counters live in a
small file beside the database (``<db>-changes``), mapped by every process that opens the
store, and ``append`` adds one to the user's counter after its commit and before it answers.
So a history read from the cache is never older than the last write any process acknowledged:
the service answers a user whose history did not change without a thread hop and a query.
A counter still at zero says more: no write to its bucket was ever acknowledged, so its users
have no history, and ``cached`` answers ``[]`` without a read, for any process, cache or not
(most users, those who did not play anything since the offline run, until their buckets fill:
one in ``CHANGE_BUCKETS`` users with a history touches a bucket). A new counters file (or one
of an older, smaller size) starts with one count in the bucket of every user the database
already holds; processes of a version with another bucket count must not run beside it (stop
them all before an upgrade: one uvicorn server restarts all its workers together). A write
made outside this class (the sqlite3 shell) is not counted: stop the service, delete the
counters file, start it again. WAL already needs every process on one machine, and so does
the mapped file.

Failures are typed so the service can answer each one properly: ``HistoryStoreBusy`` (the
file is locked longer than the busy timeout: 503 with Retry-After), ``HistoryStoreFull`` (disk
or ``max_page_count`` full: 507), ``HistoryStoreError`` (anything else: 503). Their messages
carry the path and SQLite's words for the log, not for clients.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl

import numpy as np

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
DEFAULT_MAX_EVENTS = 1_000
DEFAULT_IDEMPOTENCY_SECONDS = 86_400.0
MAX_KEY_LENGTH = 255

CHANGE_BUCKETS = 1 << 21  # 16 MiB of counters, shared: users share a bucket ~1 in 2 M
CHANGES_SUFFIX = "-changes"

# primary result codes (https://sqlite.org/rescode.html); the extended code's low byte
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL = 5, 6, 13


class HistoryStoreError(RuntimeError):
    """The history store cannot answer (unreachable, broken file). The message is for the
    log; ``public`` and ``code`` are what a client may see."""

    code = "history_store_unavailable"
    public = "the history store is unavailable; try again later"


class HistoryStoreBusy(HistoryStoreError):
    """The store is locked by someone else for longer than the busy timeout."""

    code = "history_store_busy"
    public = "the history store is busy; try again shortly"


class HistoryStoreFull(HistoryStoreError):
    """The disk (or the database's page limit) is full: nothing of the write was stored."""

    code = "history_store_full"
    public = "the history store is out of space (disk full); nothing was stored"


class IdempotencyKeyReused(ValueError):
    """An idempotency key already used for another request (another user or other events)."""


@dataclass(frozen=True)
class Added:
    """The answer of an append; ``replayed``: the first answer of a repeated key."""

    user_id: int
    added: int
    history_length: int
    replayed: bool = False

    def answer(self) -> dict[str, int]:
        return {"user_id": self.user_id, "added": self.added, "history_length": self.history_length}


@dataclass(frozen=True)
class HistoryPage:
    """Part of a user's history, oldest first. Events are numbered from 0 in the order they
    were added (numbers stay with an event when older ones are dropped): ``first_position``
    is the number of ``tracks[0]``; ``total`` the number of events ever added (the next
    event's position); ``length`` how many are kept."""

    tracks: list[int]
    first_position: int
    total: int
    length: int


@runtime_checkable
class HistoryStore(Protocol):
    """Append-only online history per user, shared by every worker process."""

    max_events: int

    def add(self, user_id: int, track_ids: Sequence[int]) -> int:
        """Append the events atomically, in order; return the user's new history length."""
        ...

    def append(
        self, user_id: int, track_ids: Sequence[int], idempotency_key: str | None = None
    ) -> Added:
        """``add`` with the whole answer; a repeated ``idempotency_key`` stores nothing and
        returns the first answer (IdempotencyKeyReused if it was for another request)."""
        ...

    def get(self, user_id: int) -> list[int]:
        """The user's kept history (at most ``max_events``, the latest) in the order it was
        added; ``[]`` for an unknown user."""
        ...

    def cached(self, user_id: int) -> list[int] | None:
        """``get``'s answer when this process can give it without the store (it never waits
        for anything: safe on the event loop), else None."""
        ...

    def page(self, user_id: int, limit: int, before: int | None = None) -> HistoryPage:
        """The latest ``limit`` kept events with a position below ``before`` (all when None)."""
        ...

    def ping(self) -> bool:
        """True when the store answers."""
        ...

    def close(self) -> None:
        """Release the connections."""
        ...


class ChangeCounters:
    """One 64-bit change counter per bucket of users, in a file every process of the store
    maps (``CHANGE_BUCKETS`` of them; a user's bucket is ``user_id % CHANGE_BUCKETS``). A
    bump is a read-add-write under ``flock``, so two processes never lose one; a read is one
    load from shared memory (8-byte aligned: never torn)."""

    def __init__(self, path: Path, known_users: Callable[[], Iterable[int]]) -> None:
        """``known_users``: the users the store holds a history for; each gets a count in
        its bucket when the file is new or of another size (zero says: no history)."""
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = CHANGE_BUCKETS * 8
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self._fd).st_size != size:  # new or of an older size
                    os.ftruncate(self._fd, 0)
                    os.ftruncate(self._fd, size)
                    self._map = mmap.mmap(self._fd, size)
                    counts = np.frombuffer(self._map, dtype=np.uint64)
                    users = np.fromiter(known_users(), dtype=np.int64)
                    counts[np.unique(users % CHANGE_BUCKETS)] = 1
                    del counts
                else:
                    self._map = mmap.mmap(self._fd, size)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except BaseException:  # OSError, or the database failing to list its users
            if hasattr(self, "_map"):
                self._map.close()
            os.close(self._fd)
            raise
        self._counts = memoryview(self._map).cast("Q")

    def value(self, user_id: int) -> int:
        return self._counts[user_id % CHANGE_BUCKETS]

    def bump(self, user_id: int) -> None:
        bucket = user_id % CHANGE_BUCKETS
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._counts[bucket] = (self._counts[bucket] + 1) & 0xFFFF_FFFF_FFFF_FFFF
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._counts.release()
        self._map.close()
        os.close(self._fd)


class HistoryCache:
    """The histories this process read lately, each with the change counter its user's
    bucket had before the read: an entry is served only while that counter is unchanged,
    i.e. no write to the bucket was acknowledged since (a write committed between the
    counter and the read only makes the entry look stale sooner). At most ``max_events``
    events are kept in all (an entry counts one more); the oldest entries go first."""

    def __init__(self, counters: ChangeCounters, max_events: int) -> None:
        self.counters = counters
        self.max_events = int(max_events)
        self._entries: dict[int, tuple[int, list[int]]] = {}
        self._size = 0
        self._lock = threading.Lock()

    def get(self, user_id: int, version: int | None = None) -> list[int] | None:
        """The user's history (a copy) when the cached one is current, else None.
        ``version``: the user's counter, when the caller has just read it."""
        entry = self._entries.get(user_id)
        if version is None:
            version = self.counters.value(user_id)
        if entry is None or entry[0] != version:
            return None
        return list(entry[1])

    def put(self, user_id: int, version: int, history: list[int]) -> None:
        """Keep ``history``, read after the counter was ``version``."""
        if self.max_events <= 0:
            return
        with self._lock:
            old = self._entries.pop(user_id, None)
            if old is not None:
                self._size -= len(old[1]) + 1
            self._entries[user_id] = (version, history)
            self._size += len(history) + 1
            while self._size > self.max_events and self._entries:
                oldest = next(iter(self._entries))
                self._size -= len(self._entries.pop(oldest)[1]) + 1


_TABLES = (
    """CREATE TABLE IF NOT EXISTS history (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id  INTEGER NOT NULL,
        track_id INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS history_user ON history (user_id, id)",
    # per user: events kept and events ever added; updated with the events, never counted
    """CREATE TABLE IF NOT EXISTS history_users (
        user_id INTEGER PRIMARY KEY,
        length  INTEGER NOT NULL,
        total   INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS idempotency (
        key         TEXT PRIMARY KEY,
        user_id     INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        answer      TEXT NOT NULL,
        created     REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created)",
)


def _fingerprint(user_id: int, track_ids: Sequence[int]) -> str:
    text = f"{user_id}:{','.join(map(str, track_ids))}"
    return hashlib.sha256(text.encode()).hexdigest()


class SQLiteHistoryStore:
    """History in one SQLite file; per process one writing connection (under a lock) and one
    reading connection per thread.

    Threads of one process share the writer under ``self._lock``; each thread reads on its
    own connection, so a read never waits for a write's fsync nor for another thread's read
    (WAL: readers see the last committed state and never block on the writer). Each worker
    process opens its own connections and SQLite's file locks (WAL + busy timeout) order the
    writers of different processes.

    ``read_timeout_ms`` is short on purpose: reads run on the service's event loop, and in
    WAL mode a reader only waits when something holds the whole file (a backup tool in
    exclusive mode, a crash recovery), in which case failing fast (503, Retry-After) is
    better than freezing the worker. Writes run in threads and wait up to
    ``write_timeout_ms`` for the other workers' commits.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
        read_timeout_ms: int = 20,
        max_events: int = DEFAULT_MAX_EVENTS,
        idempotency_seconds: float = DEFAULT_IDEMPOTENCY_SECONDS,
        cache_events: int = 0,
    ) -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}"
            )
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.max_events = int(max_events)
        self.idempotency_seconds = float(idempotency_seconds)
        self.read_timeout_ms = int(read_timeout_ms)
        self._lock = threading.Lock()
        self._readers_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise HistoryStoreError(f"{self.path}: cannot switch to WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._create_schema(conn)
            counters = ChangeCounters(
                self.path.with_name(self.path.name + CHANGES_SUFFIX),
                lambda: (row[0] for row in conn.execute("SELECT user_id FROM history_users")),
            )
        except (sqlite3.Error, OSError) as exc:
            raise HistoryStoreError(f"cannot open history store {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        self._counters = counters
        self._cache = HistoryCache(counters, cache_events)
        try:
            self._read_connection()  # fail at start-up, not at the first request
        except HistoryStoreError:
            conn.close()
            counters.close()
            raise
        log.info(
            "history store %s (WAL, synchronous=%s, at most %d events per user)",
            self.path,
            synchronous,
            self.max_events,
        )

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        """Tables and indexes, in one transaction; a file of the first version (no
        ``history_users``) gets its per-user counts once, from the rows it holds."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            had_users = (
                conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'history_users'"
                ).fetchone()
                is not None
            )
            for statement in _TABLES:
                conn.execute(statement)
            if not had_users:
                conn.execute(
                    "INSERT INTO history_users (user_id, length, total) "
                    "SELECT user_id, COUNT(*), COUNT(*) FROM history GROUP BY user_id"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryStoreError(f"history store {self.path} is closed")
        return self._conn

    def _read_connection(self) -> sqlite3.Connection:
        """This thread's reading connection (opened on first use)."""
        if self._closed:
            raise HistoryStoreError(f"history store {self.path} is closed")
        reader: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if reader is None:
            try:
                reader = sqlite3.connect(
                    self.path,
                    timeout=self.read_timeout_ms / 1000,
                    isolation_level=None,
                    check_same_thread=False,
                )
                reader.execute(f"PRAGMA busy_timeout = {self.read_timeout_ms}")
                reader.execute("PRAGMA query_only = 1")
            except sqlite3.Error as exc:
                raise HistoryStoreError(f"cannot open history store {self.path}: {exc}") from exc
            with self._readers_lock:
                self._readers.append(reader)
            self._local.conn = reader
        return reader

    def _error(self, exc: sqlite3.Error, doing: str) -> HistoryStoreError:
        """The typed error of a SQLite failure, with the path and SQLite's words."""
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code in (SQLITE_BUSY, SQLITE_LOCKED):
            cls: type[HistoryStoreError] = HistoryStoreBusy
        elif code == SQLITE_FULL:
            cls = HistoryStoreFull
        else:
            cls = HistoryStoreError
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        return cls(f"history store {self.path}: {doing}: {exc} ({name})")

    # -- writes ------------------------------------------------------------------------------

    def add(self, user_id: int, track_ids: Sequence[int]) -> int:
        return self.append(user_id, track_ids).history_length

    def append(
        self, user_id: int, track_ids: Sequence[int], idempotency_key: str | None = None
    ) -> Added:
        user_id = int(user_id)
        ids = [int(t) for t in track_ids]  # conversion errors before the transaction
        fingerprint = _fingerprint(user_id, ids) if idempotency_key is not None else ""
        kept = ids[-self.max_events :]  # events that would be dropped at once are not written
        with self._lock:
            conn = self._connection()
            try:
                # IMMEDIATE takes the write lock now: the counts read below cannot change
                # before our commit, and there is no lock upgrade to deadlock on.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    added = self._append_in_transaction(
                        conn, user_id, ids, kept, idempotency_key, fingerprint
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (e.g. SQLITE_FULL): a second
                    # ROLLBACK would raise "no transaction is active" and hide the cause
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error as rollback_error:
                            log.error(
                                "history store %s: rollback failed: %s", self.path, rollback_error
                            )
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, f"adding {len(ids)} events of user {user_id}") from exc
            finally:  # before the answer: no cache serves this user's older history after it
                self._counters.bump(user_id)
        return added

    def _append_in_transaction(
        self,
        conn: sqlite3.Connection,
        user_id: int,
        ids: list[int],
        kept: list[int],
        key: str | None,
        fingerprint: str,
    ) -> Added:
        if key is not None:
            conn.execute(
                "DELETE FROM idempotency WHERE created < ?",
                (time.time() - self.idempotency_seconds,),
            )
            first = conn.execute(
                "SELECT user_id, fingerprint, answer FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
            if first is not None:
                if first[0] != user_id or first[1] != fingerprint:
                    raise IdempotencyKeyReused(
                        "this Idempotency-Key was already used for another request "
                        "(another user or other track ids)"
                    )
                return Added(**json.loads(first[2]), replayed=True)
        conn.executemany(
            "INSERT INTO history (user_id, track_id) VALUES (?, ?)", [(user_id, t) for t in kept]
        )
        row = conn.execute(
            "SELECT length, total FROM history_users WHERE user_id = ?", (user_id,)
        ).fetchone()
        length, total = row if row is not None else (0, 0)
        length, total = length + len(kept), total + len(ids)
        if length > self.max_events:  # retention: the oldest events go
            conn.execute(
                "DELETE FROM history WHERE id IN (SELECT id FROM history WHERE user_id = ? "
                "ORDER BY id LIMIT ?)",
                (user_id, length - self.max_events),
            )
            length = self.max_events
        conn.execute(
            "INSERT INTO history_users (user_id, length, total) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id) DO UPDATE SET length = excluded.length, "
            "total = excluded.total",
            (user_id, length, total),
        )
        added = Added(user_id, len(ids), length)
        if key is not None:
            conn.execute(
                "INSERT INTO idempotency (key, user_id, fingerprint, answer, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, user_id, fingerprint, json.dumps(added.answer()), time.time()),
            )
        return added

    # -- reads -------------------------------------------------------------------------------

    def get(self, user_id: int) -> list[int]:
        user_id = int(user_id)
        conn = self._read_connection()  # raises once the store is closed
        version = self._counters.value(user_id)  # before the read (see HistoryCache)
        try:
            rows = conn.execute(
                "SELECT track_id FROM history WHERE user_id = ? ORDER BY id DESC LIMIT ?",
                (user_id, self.max_events),
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc, f"reading the history of user {user_id}") from exc
        history = [row[0] for row in reversed(rows)]
        self._cache.put(user_id, version, history)
        return list(history)

    def cached(self, user_id: int) -> list[int] | None:
        if self._closed:
            return None
        user_id = int(user_id)
        version = self._counters.value(user_id)
        if version == 0:  # no write ever: no history
            return []
        return self._cache.get(user_id, version)

    def page(self, user_id: int, limit: int, before: int | None = None) -> HistoryPage:
        conn = self._read_connection()
        try:
            conn.execute("BEGIN")  # one snapshot for the counts and the rows
            try:
                row = conn.execute(
                    "SELECT length, total FROM history_users WHERE user_id = ?", (int(user_id),)
                ).fetchone()
                length, total = row if row is not None else (0, 0)
                oldest = total - length  # position of the oldest kept event
                end = total if before is None else max(min(int(before), total), oldest)
                count = max(min(int(limit), end - oldest), 0)
                rows = (
                    conn.execute(
                        "SELECT track_id FROM history WHERE user_id = ? ORDER BY id DESC "
                        "LIMIT ? OFFSET ?",
                        (int(user_id), count, total - end),
                    ).fetchall()
                    if count
                    else []
                )
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error(exc, f"reading the history of user {user_id}") from exc
        tracks = [r[0] for r in reversed(rows)]
        return HistoryPage(tracks, end - len(tracks), int(total), int(length))

    def ping(self) -> bool:
        try:
            self._read_connection().execute("SELECT 1 FROM history LIMIT 1").fetchall()
            return True
        except (sqlite3.Error, HistoryStoreError) as exc:
            log.warning("history store %s does not answer: %s", self.path, exc)
            return False

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._readers_lock:
            if not self._closed:
                self._counters.close()
            self._closed = True
            for reader in self._readers:
                reader.close()
            self._readers.clear()

    def __repr__(self) -> str:
        return f"SQLiteHistoryStore({str(self.path)!r}, synchronous={self.synchronous!r})"


def open_history_store(
    url: str,
    *,
    base_dir: str | Path | None = None,
    max_events: int = DEFAULT_MAX_EVENTS,
    read_timeout_ms: int = 20,
    write_timeout_ms: int = 10_000,
    idempotency_seconds: float = DEFAULT_IDEMPOTENCY_SECONDS,
    cache_events: int = 0,
) -> HistoryStore:
    """Open the store a URL names.

    ``sqlite:///relative/path.db`` (relative to ``base_dir`` or the current folder) or
    ``sqlite:////absolute/path.db``; option ``?synchronous=FULL|NORMAL``. Or
    ``redis://[:password@]host:port/db`` (``rediss://`` for TLS), option ``?prefix=NAME``:
    the Redis store of ``musicrec.history_redis``, shared by several replicas.
    """
    if isinstance(url, str) and url.split(":", 1)[0] in ("redis", "rediss"):
        from musicrec.history_redis import RedisHistoryStore  # redis only when used

        return RedisHistoryStore(
            url,
            max_events=max_events,
            read_timeout_ms=read_timeout_ms,
            write_timeout_ms=write_timeout_ms,
            idempotency_seconds=idempotency_seconds,
        )
    if not isinstance(url, str) or not url.startswith(SQLITE_PREFIX):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else url
        raise ValueError(
            f"unsupported history store URL {url!r} (scheme {scheme!r}); "
            "expected sqlite:///relative/path.db, sqlite:////absolute/path.db or "
            "redis://host:port/db"
        )
    rest = url[len(SQLITE_PREFIX) :]
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
    return SQLiteHistoryStore(
        path,
        synchronous=options.get("synchronous", "FULL"),
        busy_timeout_ms=write_timeout_ms,
        read_timeout_ms=read_timeout_ms,
        max_events=max_events,
        idempotency_seconds=idempotency_seconds,
        cache_events=cache_events,
    )
