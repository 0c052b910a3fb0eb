"""The online history store: order, atomic batches, persistence, several processes, URLs."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from musicrec.history import (
    HistoryStore,
    HistoryStoreError,
    SQLiteHistoryStore,
    open_history_store,
)


def test_order_and_lengths(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.db")
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


def test_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "h.db"  # the folder is created
    store = SQLiteHistoryStore(path)
    store.add(7, [1, 2, 3])
    store.close()
    assert not store.ping()
    with pytest.raises(HistoryStoreError, match="closed"):
        store.get(7)
    again = SQLiteHistoryStore(path)
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


def test_failed_batch_stores_nothing(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.db")
    store.add(1, [5])
    with pytest.raises((TypeError, ValueError)):
        store.add(1, [6, "not a number"])  # conversion fails before the transaction
    # an error inside the transaction: an id too big for SQLite's INTEGER
    with pytest.raises((HistoryStoreError, OverflowError)):
        store.add(1, [7, 2**70])
    assert store.get(1) == [5]
    assert store.add(1, [8]) == 2  # the connection is usable after a rollback
    store.close()


def _writer(path: str, user_id: int, n: int, batch: int) -> None:
    store = SQLiteHistoryStore(path)
    for start in range(0, n, batch):
        store.add(user_id, list(range(start, min(start + batch, n))))
        store.add(0, [user_id])  # every process also writes to the same user
    store.close()


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    SQLiteHistoryStore(path, synchronous="NORMAL").close()  # create the file first
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, uid, 200, 3)) for uid in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = SQLiteHistoryStore(path)
    assert store.get(1) == list(range(200))  # each user's own order is kept, nothing lost
    assert store.get(2) == list(range(200))
    shared = store.get(0)
    assert sorted(shared) == [1] * 67 + [2] * 67  # ceil(200 / 3) batches per process
    store.close()
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
        ("redis://localhost:6379/0", "scheme 'redis'"),
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
