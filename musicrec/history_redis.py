"""Online listening history in Redis: the ``HistoryStore`` of several service replicas.

Selected by ``MUSICREC_HISTORY_URL=redis://[:password@]host:port/db[?prefix=NAME]`` (also
``rediss://`` for TLS); every replica (and every worker of each) pointing at the same Redis
database sees the same histories.

Layout, per user (``P`` = the prefix, default ``musicrec:history``):

- ``P:u:{user}:e`` — a list of track ids, oldest first, at most ``max_events`` long
  (``RPUSH`` then ``LTRIM``: retention by count, as in SQLite, nothing archived);
- ``P:u:{user}:n`` — events ever added (the next event's position, for paging);
- ``P:k:{key}`` — an ``Idempotency-Key``'s fingerprint and first answer, expiring after
  ``idempotency_seconds`` (Redis deletes it: no clean-up pass).

A batch is all-or-nothing and exactly-once: an append is one Lua script (``EVALSHA``), which
Redis runs atomically (no other command in between) and writes to its append-only file as one
``MULTI``/``EXEC`` unit. The script checks everything before its first write and carries the
shebang ``#!lua`` (a write script), so an out-of-memory Redis refuses it before it starts
(507, nothing written). Every append carries a key (the client's ``Idempotency-Key`` or one
made here), so a write retried after a lost connection (Redis restarted while the answer was
on its way) is recognised and stored once; a nonce in the stored answer tells our own retry
from a client's repeat. Reads are one command or one read-only script: bounded (at most
``max_events`` ids), never a scan, one snapshot.

Durability is Redis's, not ours: an acknowledged event survives a Redis crash or ``kill -9``
only when the server runs with ``appendonly yes`` and ``appendfsync always`` (the AOF is
fsynced before the answer); with ``appendfsync everysec`` (Redis's default) up to about a
second of acknowledged events can be lost on a power cut or an OS crash (not on a Redis
crash: the data is then in the page cache), and with AOF off everything since the last RDB
snapshot. The store reads the server's settings at start-up and logs which case applies
(``durability``). Replication to a replica is asynchronous: a failover can lose the last
acknowledged writes unless the operator adds ``WAIT``-based policies (not done here).
Redis Cluster is not supported (the idempotency keys are global, the scripts touch keys of
several slots); one primary (with replicas / Sentinel) is.

Failures are the same typed errors as SQLite's: unreachable or broken → ``HistoryStoreError``
(503), a timeout or a script still running → ``HistoryStoreBusy`` (503), out of memory or an
AOF that cannot be written for lack of disk → ``HistoryStoreFull`` (507).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, OutOfMemoryError
from redis.retry import Retry

from musicrec.history import (
    DEFAULT_IDEMPOTENCY_SECONDS,
    DEFAULT_MAX_EVENTS,
    Added,
    HistoryPage,
    HistoryStoreBusy,
    HistoryStoreError,
    HistoryStoreFull,
    IdempotencyKeyReused,
    _fingerprint,
)

log = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis", "rediss")
DEFAULT_PREFIX = "musicrec:history"
AUTO_KEY_SECONDS = 600.0  # how long the key of a write without Idempotency-Key is kept
WRITE_ATTEMPTS = 3  # an append is retried (same key) after a lost connection
RETRY_PAUSE = 0.05  # seconds between those attempts
CHUNK = 1_000  # ids per RPUSH inside the script (Lua's unpack has a stack limit)
T = TypeVar("T")

# KEYS: events list, total counter, idempotency key
# ARGV: max_events, number of ids sent, fingerprint, key ttl (ms), nonce, kept ids...
_APPEND = """#!lua
local stored = redis.call('GET', KEYS[3])
if stored then
  return {'replay', stored}
end
local max_events = tonumber(ARGV[1])
local n = #ARGV - 5
for start = 6, #ARGV, CHUNK do
  local stop = math.min(start + CHUNK - 1, #ARGV)
  redis.call('RPUSH', KEYS[1], unpack(ARGV, start, stop))
end
if n > 0 then
  redis.call('LTRIM', KEYS[1], -max_events, -1)
end
local total = redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]))
local length = redis.call('LLEN', KEYS[1])
local answer = ARGV[3] .. ' ' .. ARGV[2] .. ' ' .. length .. ' ' .. ARGV[5]
redis.call('SET', KEYS[3], answer, 'PX', tonumber(ARGV[4]))
return {'added', tostring(length), tostring(total)}
""".replace("CHUNK", str(CHUNK))

# KEYS: events list, total counter; ARGV: limit, before ('' = none), max_events
# returns {total, length, first position, ids...}
_PAGE = """#!lua flags=no-writes
local llen = redis.call('LLEN', KEYS[1])
local max_events = tonumber(ARGV[3])
local length = math.min(llen, max_events)
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if total < llen then total = llen end
local oldest = total - length
local stop = total
if ARGV[2] ~= '' then
  stop = math.max(math.min(tonumber(ARGV[2]), total), oldest)
end
local count = math.max(math.min(tonumber(ARGV[1]), stop - oldest), 0)
local result = {total, length, stop - count}
if count > 0 then
  local shift = total - llen
  local ids = redis.call('LRANGE', KEYS[1], stop - count - shift, stop - 1 - shift)
  for i = 1, #ids do result[#result + 1] = ids[i] end
end
return result
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _public_url(url: str) -> str:
    """The URL without its password (for logs and repr)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_redis_url(url: str) -> tuple[str, str]:
    """Split ``redis://...?prefix=P`` into the URL for redis-py and the key prefix."""
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(f"not a Redis URL: {_public_url(url)!r}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(options) - {"prefix"}
    if unknown:
        raise ValueError(
            f"history store URL {_public_url(url)!r}: unknown option(s) {sorted(unknown)}"
        )
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if not prefix:
        raise ValueError(f"history store URL {_public_url(url)!r}: empty prefix")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(
            f"history store URL {_public_url(url)!r}: the database must be a number, got {db!r}"
        )
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), prefix


class RedisHistoryStore:
    """History in one Redis database, shared by every worker of every replica.

    Two connection pools per process: reads time out after ``read_timeout_ms`` (the service
    answers 503 rather than waiting), writes after ``write_timeout_ms`` (an fsync of the AOF
    per write under ``appendfsync always``). redis-py's pools are thread-safe. ``aget`` reads
    on the caller's event loop through a third, asyncio pool (made per loop, on first use),
    with the reads' timeout: the service's list requests wait for Redis without a thread hop.
    """

    def __init__(
        self,
        url: str,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        read_timeout_ms: int = 20,
        write_timeout_ms: int = 5_000,
        idempotency_seconds: float = DEFAULT_IDEMPOTENCY_SECONDS,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        client_url, self.prefix = parse_redis_url(url)
        self.url = _public_url(url)
        self.max_events = int(max_events)
        self.idempotency_seconds = float(idempotency_seconds)
        # a read on a busy machine may take a few ms more than the SQLite busy wait it
        # replaces; the service's own deadline (read timeout + margin) bounds the request
        read_timeout = max(read_timeout_ms, 100) / 1000
        write_timeout = max(write_timeout_ms, 100) / 1000
        self._client_url, self._read_timeout = client_url, read_timeout
        self._async: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None
        self._reader = redis.Redis.from_url(
            client_url,
            socket_timeout=read_timeout,
            socket_connect_timeout=read_timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        # no retry inside redis-py for writes: append() retries itself with the same key
        self._writer = redis.Redis.from_url(
            client_url,
            socket_timeout=write_timeout,
            socket_connect_timeout=write_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._append = self._writer.register_script(_APPEND)
        self._page = self._reader.register_script(_PAGE)
        self._closed = False
        try:
            self._writer.ping()
            self.durability = self._durability()
        except redis.RedisError as exc:
            self.close()
            raise HistoryStoreError(f"cannot open history store {self.url}: {exc}") from exc
        log.info(
            "history store %s (prefix %s, at most %d events per user; %s)",
            self.url,
            self.prefix,
            self.max_events,
            self.durability,
        )

    def _durability(self) -> str:
        """What survives a crash, from the server's AOF settings (CONFIG may be disabled on
        managed services: then 'unknown')."""
        try:
            config: dict[Any, Any] = self._writer.config_get("append*")
        except redis.ResponseError as exc:
            log.warning(
                "history store %s: cannot read the persistence settings (%s)", self.url, exc
            )
            return "durability unknown (CONFIG GET refused)"
        values = {_text(k): _text(v) for k, v in config.items() if v is not None}
        aof, fsync = values.get("appendonly", ""), values.get("appendfsync", "")
        if aof == "yes" and fsync == "always":
            return "durable: appendonly yes, appendfsync always (fsync before each answer)"
        text = (
            f"NOT fully durable: appendonly {aof or '?'}, appendfsync {fsync or '?'}; "
            "acknowledged events can be lost (set appendonly yes, appendfsync always)"
        )
        log.warning("history store %s: %s", self.url, text)
        return text

    # -- keys and errors ---------------------------------------------------------------------

    def _events_key(self, user_id: int) -> str:
        return f"{self.prefix}:u:{user_id}:e"

    def _total_key(self, user_id: int) -> str:
        return f"{self.prefix}:u:{user_id}:n"

    def _error(self, exc: redis.RedisError, doing: str) -> HistoryStoreError:
        """The typed error of a Redis failure, with the server's words for the log."""
        text = str(exc)
        if isinstance(exc, redis.TimeoutError | BusyLoadingError) or text.startswith("BUSY"):
            cls: type[HistoryStoreError] = HistoryStoreBusy  # slow, loading, script running
        elif isinstance(exc, OutOfMemoryError) or ("MISCONF" in text and "space" in text.lower()):
            cls = HistoryStoreFull
        else:
            cls = HistoryStoreError
        return cls(f"history store {self.url}: {doing}: {type(exc).__name__}: {text}")

    def _check_open(self) -> None:
        if self._closed:
            raise HistoryStoreError(f"history store {self.url} is closed")

    def _read(self, doing: str, call: Callable[[], T]) -> T:
        self._check_open()
        try:
            return call()
        except redis.RedisError as exc:
            raise self._error(exc, doing) from exc

    # -- writes ------------------------------------------------------------------------------

    def add(self, user_id: int, track_ids: Sequence[int]) -> int:
        return self.append(user_id, track_ids).history_length

    def append(
        self, user_id: int, track_ids: Sequence[int], idempotency_key: str | None = None
    ) -> Added:
        self._check_open()
        user_id = int(user_id)
        ids = [int(t) for t in track_ids]  # conversion errors before anything is sent
        if any(not -(2**63) <= t < 2**63 for t in ids):
            raise OverflowError("track ids must fit in 64 bits")
        kept = ids[-self.max_events :]  # events that would be dropped at once are not sent
        fingerprint = _fingerprint(user_id, ids)
        if idempotency_key is None:
            key, ttl = f"{self.prefix}:a:{uuid.uuid4().hex}", AUTO_KEY_SECONDS
        else:
            key, ttl = f"{self.prefix}:k:{idempotency_key}", self.idempotency_seconds
        nonce = uuid.uuid4().hex
        args: list[Any] = [
            self.max_events,
            len(ids),
            fingerprint,
            max(int(ttl * 1000), 1),
            nonce,
            *kept,
        ]
        keys = [self._events_key(user_id), self._total_key(user_id), key]
        for attempt in range(WRITE_ATTEMPTS):
            try:
                result = self._append(keys=keys, args=args)
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # the script may or may not have run: the same key again stores it once
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise self._error(exc, f"adding {len(ids)} events of user {user_id}") from exc
                log.warning("history store %s: %s; retrying the write", self.url, exc)
                time.sleep(RETRY_PAUSE * (attempt + 1))
            except redis.RedisError as exc:
                raise self._error(exc, f"adding {len(ids)} events of user {user_id}") from exc
        kind = result[0].decode()
        if kind == "added":
            return Added(user_id, len(ids), int(result[1]))
        stored_fingerprint, added, length, stored_nonce = result[1].decode().split(" ")
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for another request "
                "(another user or other track ids)"
            )
        # our own earlier attempt (answer lost with the connection) is not a replay
        return Added(user_id, int(added), int(length), replayed=stored_nonce != nonce)

    # -- reads -------------------------------------------------------------------------------

    def get(self, user_id: int) -> list[int]:
        user_id = int(user_id)
        rows = self._read(
            f"reading the history of user {user_id}",
            lambda: self._reader.lrange(self._events_key(user_id), -self.max_events, -1),
        )
        return [int(r) for r in rows]

    async def aget(self, user_id: int) -> list[int]:
        """``get`` on the running event loop: one LRANGE, bounded by the reads' timeout."""
        self._check_open()
        user_id = int(user_id)
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = redis.asyncio.Redis.from_url(
                self._client_url,
                socket_timeout=self._read_timeout,
                socket_connect_timeout=self._read_timeout,
                retry=redis.asyncio.retry.Retry(NoBackoff(), 1),
                decode_responses=False,
            )
            self._async = (loop, client)
        try:
            rows = await self._async[1].lrange(self._events_key(user_id), -self.max_events, -1)
        except redis.RedisError as exc:
            raise self._error(exc, f"reading the history of user {user_id}") from exc
        return [int(r) for r in rows]

    async def aclose(self) -> None:
        """Close the asyncio pool (on the loop that made it)."""
        if self._async is not None:
            loop, client = self._async
            self._async = None
            if loop is asyncio.get_running_loop():
                await client.aclose()

    def cached(self, user_id: int) -> list[int] | None:
        """Never: replicas on other machines write to the same Redis, and this process
        cannot see their writes without asking Redis."""
        return None

    def page(self, user_id: int, limit: int, before: int | None = None) -> HistoryPage:
        user_id = int(user_id)
        args = [int(limit), "" if before is None else int(before), self.max_events]
        result = self._read(
            f"reading the history of user {user_id}",
            lambda: self._page(
                keys=[self._events_key(user_id), self._total_key(user_id)], args=args
            ),
        )
        total, length, first = (int(v) for v in result[:3])
        return HistoryPage([int(r) for r in result[3:]], first, total, length)

    def ping(self) -> bool:
        try:
            self._check_open()
            return bool(self._reader.ping())
        except (redis.RedisError, HistoryStoreError) as exc:
            log.warning("history store %s does not answer: %s", self.url, exc)
            return False

    def close(self) -> None:
        self._closed = True
        for client in (self._reader, self._writer):
            try:
                client.close()
            except redis.RedisError as exc:  # closing a dead pool is not an error worth more
                log.debug("history store %s: close: %s", self.url, exc)

    def __repr__(self) -> str:
        return f"RedisHistoryStore({self.url!r}, prefix={self.prefix!r})"
