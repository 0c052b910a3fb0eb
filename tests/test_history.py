"""The online history store: order, atomic batches, persistence, several processes, URLs.

The contract tests (``backend`` fixture) run against both stores: SQLite (a file) and Redis (a
real ``redis-server`` started for this module, appendonly + appendfsync always)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from musicrec.history import (
    HistoryStore,
    HistoryStoreError,
    IdempotencyKeyReused,
    SQLiteHistoryStore,
    open_history_store,
)
from tests.redis_support import RedisServer

Opener = Callable[..., HistoryStore]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(name, URL) of an empty store of each backend; Redis: a key prefix of its own."""
    if request.param == "sqlite":
        yield "sqlite", f"sqlite:///{tmp_path}/h.db"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield "redis", f"{server.url}?prefix=t{uuid.uuid4().hex}"


@pytest.fixture()
def opener(backend: tuple[str, str]) -> Opener:
    """Opens (and reopens) the backend's store with the given options."""
    return lambda **options: open_history_store(backend[1], **options)


def test_order_and_lengths(opener: Opener) -> None:
    store = opener()
    assert isinstance(store, HistoryStore)
    assert store.get(1) == []
    assert store.add(1, [30, 10]) == 2
    assert store.add(2, [99]) == 1
    assert store.add(1, [20, 10]) == 4  # a repeated listen is a new event
    assert store.get(1) == [30, 10, 20, 10]
    assert store.get(2) == [99]
    assert store.get(3) == []
    assert store.ping()
    store.close()


def test_persists_across_reopen(tmp_path: Path, backend: tuple[str, str]) -> None:
    url = backend[1] if backend[0] == "redis" else f"sqlite:///{tmp_path}/sub/h.db"
    store = open_history_store(url)  # the SQLite folder is created
    store.add(7, [1, 2, 3])
    store.close()
    assert not store.ping()
    with pytest.raises(HistoryStoreError, match="closed"):
        store.get(7)
    again = open_history_store(url)
    assert again.get(7) == [1, 2, 3]
    assert again.add(7, [4]) == 4
    again.close()


def test_wal_and_synchronous_modes(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.db")
    conn = store._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    normal = SQLiteHistoryStore(tmp_path / "h.db", synchronous="normal")
    assert normal._connection().execute("PRAGMA synchronous").fetchone()[0] == 1
    normal.close()
    with pytest.raises(ValueError, match="synchronous must be one of"):
        SQLiteHistoryStore(tmp_path / "h.db", synchronous="OFF")


def test_failed_batch_stores_nothing(opener: Opener) -> None:
    store = opener()
    store.add(1, [5])
    with pytest.raises((TypeError, ValueError)):
        store.add(1, [6, "not a number"])  # conversion fails before the transaction
    # an id too big for SQLite's INTEGER (in the transaction) or 64 bits (Redis, before it)
    with pytest.raises((HistoryStoreError, OverflowError)):
        store.add(1, [7, 2**70])
    assert store.get(1) == [5]
    assert store.add(1, [8]) == 2  # the connection is usable after a rollback
    store.close()


def _writer(url: str, user_id: int, n: int, batch: int) -> None:
    store = open_history_store(url)
    for start in range(0, n, batch):
        store.add(user_id, list(range(start, min(start + batch, n))))
        store.add(0, [user_id])  # every process also writes to the same user
    store.close()


def test_two_processes_write_concurrently(tmp_path: Path, backend: tuple[str, str]) -> None:
    name, url = backend
    path = str(tmp_path / "h.db")
    if name == "sqlite":
        url = f"sqlite:///{path}?synchronous=NORMAL"
    open_history_store(url).close()  # create the file first
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, uid, 200, 3)) for uid in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = open_history_store(url)
    assert store.get(1) == list(range(200))  # each user's own order is kept, nothing lost
    assert store.get(2) == list(range(200))
    shared = store.get(0)
    assert sorted(shared) == [1] * 67 + [2] * 67  # ceil(200 / 3) batches per process
    store.close()
    if name != "sqlite":
        return
    # the file is one ordinary SQLite database
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 400 + 134


def test_open_history_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_history_store(f"sqlite:///{tmp_path}/abs.db")  # sqlite:////tmp/...
    assert isinstance(absolute, SQLiteHistoryStore)
    assert absolute.path == tmp_path / "abs.db"
    absolute.close()

    monkeypatch.chdir(tmp_path)
    relative = open_history_store("sqlite:///rel/h.db?synchronous=NORMAL")
    assert relative.path == Path("rel/h.db")
    assert relative.synchronous == "NORMAL"
    relative.add(1, [1])
    relative.close()
    assert (tmp_path / "rel" / "h.db").exists()

    based = open_history_store("sqlite:///b.db", base_dir=tmp_path / "base")
    assert based.path == tmp_path / "base" / "b.db"
    based.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://localhost/h", "scheme 'mysql'"),
        ("redis://localhost:6379/zero", "the database must be a number"),
        ("redis://localhost:6379/0?timeout=1", "unknown option"),
        ("redis://localhost:6379/0?prefix=", "empty prefix"),
        ("history.db", "unsupported history store URL"),
        ("sqlite://relative.db", "unsupported history store URL"),
        ("sqlite:///", "has no file path"),
        ("sqlite:///h.db?journal=off", "unknown option"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_history_store(url)


def test_unopenable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HistoryStoreError, match="cannot open history store"):
        SQLiteHistoryStore(blocker / "h.db")  # a file where a folder should be


def test_retention_and_paging(opener: Opener) -> None:
    """The cap keeps the latest events; positions number every event ever added."""
    store = opener(max_events=5)
    assert store.add(1, [1, 2, 3]) == 3
    assert store.add(1, [4, 5, 6, 7]) == 5
    assert store.get(1) == [3, 4, 5, 6, 7]
    assert store.add(1, list(range(100, 120))) == 5  # a batch larger than the cap
    assert store.get(1) == [115, 116, 117, 118, 119]
    page = store.page(1, 2)
    assert (page.tracks, page.first_position, page.total, page.length) == ([118, 119], 25, 27, 5)
    page = store.page(1, 2, before=25)
    assert (page.tracks, page.first_position) == ([116, 117], 23)
    page = store.page(1, 10, before=23)
    assert (page.tracks, page.first_position) == ([115], 22)
    assert store.page(1, 10, before=22).tracks == []  # dropped
    assert store.page(1, 10, before=10**12).tracks == [115, 116, 117, 118, 119]
    assert store.page(2, 10).tracks == [] and store.page(2, 10).total == 0
    store.close()


def test_idempotency_keys(opener: Opener) -> None:
    """A repeated key stores nothing and replays the first answer; the same key for another
    request is refused; keys expire."""
    store = opener(idempotency_seconds=0.3)
    first = store.append(1, [5, 6], "k")
    assert (first.replayed, first.history_length, first.added) == (False, 2, 2)
    again = store.append(1, [5, 6], "k")
    assert again.replayed is True and again.answer() == first.answer()
    with pytest.raises(IdempotencyKeyReused):
        store.append(1, [6], "k")
    with pytest.raises(IdempotencyKeyReused):
        store.append(2, [5, 6], "k")
    assert store.get(1) == [5, 6] and store.get(2) == []
    time.sleep(0.4)
    assert store.append(1, [5, 6], "k").history_length == 4  # expired: a new request
    store.close()
