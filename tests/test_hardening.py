"""Hardening of the service (issue 11), in process: body size limit, bounded history with
retention and paging, idempotent retries, typed store failures (busy, disk full), the reload
watcher that survives every failure and takes turns across workers, secrets kept out of the
manifest, logs and repr, and what clients see (no paths, no SQLite messages, no access log)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

import recommendation_service as service_module
from musicrec import io
from musicrec.history import (
    HistoryStoreBusy,
    HistoryStoreFull,
    IdempotencyKeyReused,
    SQLiteHistoryStore,
)
from musicrec.pipeline import build_manifest, public_parameters
from musicrec.settings import Settings
from recommendation_service import RELOAD_LOCK, Recommendations, create_app, reload_lock
from tests.test_service_app import TRACKS, write_artefacts

TOKEN = "very-secret-token-4711"


def settings_for(folder: Path, **changes: object) -> Settings:
    values: dict[str, object] = dict(
        parquet_dir=folder,
        history_url=f"sqlite:///{folder}/history.db",
        default_k=5,
        max_k=10,
        reload_poll_seconds=0,
        admin_token=TOKEN,
    )
    values.update(changes)
    return Settings(**values)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_artefacts(tmp_path / "parquet")


@pytest.fixture()
def client(folder: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(
            settings_for(
                folder,
                max_body_bytes=2_000,
                history_max_events=6,
                history_page_default=4,
                history_page_max=5,
            )
        )
    ) as c:
        yield c


# --- 1. body size ---------------------------------------------------------------------------


def _ids_body(n: int) -> bytes:
    return json.dumps([TRACKS[i % len(TRACKS)] for i in range(n)]).encode()


@pytest.mark.parametrize("path", ["/history/8", "/similar/5", "/recommendations", "/admin/reload"])
def test_oversized_bodies_get_413_before_parsing(
    client: TestClient, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over max_body_bytes: 413 with a readable message, by Content-Length and by counting a
    chunked body; the endpoint (and the JSON parser) never sees it; nothing is stored."""
    parsed: list[bytes] = []
    original = json.loads

    def spy(text: bytes | str, *args: object, **kwargs: object) -> object:
        if text[:1] in (b"[", "["):  # the request's body (not an answer read by the test)
            parsed.append(text)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", spy)
    body = _ids_body(600)  # ~2,550 bytes
    assert len(body) > 2_000
    by_length = client.post(path, content=body, headers={"content-type": "application/json"})
    assert by_length.status_code == 413, by_length.text
    assert by_length.json()["detail"][0]["type"] == "body_too_large"
    assert "2000 bytes" in by_length.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    chunked = client.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert not parsed
    assert client.get("/history/8").json() == []


def test_bodies_within_the_limit_pass(client: TestClient) -> None:
    body = json.dumps([10, 20, 30]).encode()

    def chunks() -> Iterator[bytes]:
        yield body[:3]
        yield body[3:]

    answer = client.post(
        "/history/8", content=chunks(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200, answer.text
    assert client.get("/history/8").json() == [10, 20, 30]
    assert client.get("/top_popular/2").status_code == 200  # GET is not touched


def test_default_limit_takes_a_full_batch(folder: Path) -> None:
    """The default (256 KiB) takes the largest batch (10,000 ids of 10 digits)."""
    assert Settings().max_body_bytes == 262_144
    assert len(json.dumps([2_000_000_000] * 10_000)) < 262_144


# --- 2. bounded history ---------------------------------------------------------------------


def test_retention_deletes_the_older_events(tmp_path: Path) -> None:
    """Retention and paging on both backends: tests/test_history.py; here, that SQLite deletes
    the older rows (not hides them) and keeps the counts in ``history_users``."""
    store = SQLiteHistoryStore(tmp_path / "h.db", max_events=5)
    store.add(1, [1, 2, 3, 4, 5, 6, 7])
    assert store.add(1, list(range(100, 120))) == 5  # a batch larger than the cap
    with sqlite3.connect(tmp_path / "h.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM history WHERE user_id = 1").fetchone() == (5,)
        assert conn.execute(
            "SELECT length, total FROM history_users WHERE user_id = 1"
        ).fetchone() == (5, 27)
    store.close()


def test_reads_and_writes_are_bounded_and_never_count(tmp_path: Path) -> None:
    """A user with 200,000 stored events (e.g. written before the cap existed): a read
    returns the cap, a write trims to it, and no statement counts rows or reads them all."""
    path = tmp_path / "h.db"
    SQLiteHistoryStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO history (user_id, track_id) VALUES (?, ?)",
            ((7, i) for i in range(200_000)),
        )
        conn.execute("INSERT INTO history_users VALUES (7, 200000, 200000)")
    store = SQLiteHistoryStore(path, max_events=1_000)
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    store._read_connection().set_trace_callback(statements.append)
    history = store.get(7)
    assert len(history) == 1_000 and history[-1] == 199_999
    assert store.add(7, [1]) == 1_000
    assert store.add(7, [2]) == 1_000  # the second write deletes one row only
    assert store.get(7)[-2:] == [1, 2]
    assert not [s for s in statements if "COUNT(" in s.upper()], statements
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT TRACK_ID")]
    assert reads and all("LIMIT" in s.upper() for s in reads)
    plan = (
        store._read_connection()
        .execute(
            "EXPLAIN QUERY PLAN SELECT track_id FROM history WHERE user_id = 7 ORDER BY id DESC "
            "LIMIT 10"
        )
        .fetchall()
    )
    assert "history_user" in str(plan)  # the (user_id, id) index, no scan nor sort
    store.close()


def test_a_file_of_the_first_version_gets_its_counts(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the schema before the counts table
        conn.executescript("""
            CREATE TABLE history (id INTEGER PRIMARY KEY AUTOINCREMENT,
                                  user_id INTEGER NOT NULL, track_id INTEGER NOT NULL);
            CREATE INDEX history_user ON history (user_id, id);
            INSERT INTO history (user_id, track_id) VALUES (1, 10), (1, 20), (2, 30);
        """)
    store = SQLiteHistoryStore(path)
    assert store.add(1, [40]) == 3
    assert store.page(2, 10).total == 1
    assert store.get(1) == [10, 20, 40]
    store.close()


def test_history_paging_over_http(client: TestClient) -> None:
    client.post("/history/3", json=[10, 20, 30, 40, 50, 60, 70, 80])  # cap 6: 30..80 kept
    first = client.get("/history/3")  # default limit 4
    assert first.json() == [50, 60, 70, 80]
    assert (
        first.headers["X-History-First-Position"],
        first.headers["X-History-Total"],
        first.headers["X-History-Length"],
    ) == ("4", "8", "6")
    second = client.get("/history/3", params={"before": 4, "limit": 5})
    assert second.json() == [30, 40]
    assert second.headers["X-History-First-Position"] == "2"
    assert client.get("/history/3", params={"limit": 1}).json() == [80]
    assert (
        client.get("/history/3", params={"limit": 2, "details": "true"}).json()[0]["name"]
        == "track 70"
    )
    too_many = client.get("/history/3", params={"limit": 6})
    assert too_many.status_code == 422 and "limit must be between 1 and 5" in too_many.text
    assert client.get("/history/3", params={"before": -1}).status_code == 422
    assert client.post("/history/3", json=[90]).json()["history_length"] == 6


# --- 4. idempotent retries ------------------------------------------------------------------


def test_idempotency_key_replays_the_first_answer(client: TestClient) -> None:
    key = {"Idempotency-Key": "d5a0c1f2-retry-1"}
    first = client.post("/history/4", json=[10, 20], headers=key)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    again = client.post("/history/4", json=[10, 20], headers=key)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert client.get("/history/4").json() == [10, 20]  # stored once
    other = client.post("/history/4", json=[30], headers=key)  # same key, other request
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["message"]
    assert client.post("/history/5", json=[10, 20], headers=key).status_code == 422
    assert client.post("/history/4", json=[10, 20]).json()["history_length"] == 4  # no key
    bad = client.post("/history/4", json=[10], headers={"Idempotency-Key": "x" * 256})
    assert bad.status_code == 422
    assert client.get("/history/4").json() == [10, 20, 10, 20]


def test_idempotency_keys_expire_and_are_stored_with_the_events(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.db", idempotency_seconds=0.2)
    assert store.append(1, [5], "k").replayed is False
    assert store.append(1, [5], "k").replayed is True
    with pytest.raises(IdempotencyKeyReused):
        store.append(1, [6], "k")
    time.sleep(0.3)
    assert store.append(1, [5], "k").history_length == 2  # expired: a new request
    # a write that fails stores neither the events nor the key: the retry goes through
    conn = store._connection()
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(HistoryStoreFull):
        store.append(2, list(range(5_000)), "big")
    conn.execute("PRAGMA max_page_count = 1073741823")
    retried = store.append(2, list(range(5_000)), "big")
    assert retried.replayed is False and retried.history_length == 1_000
    store.close()


# --- 3. and 8. store failures: busy, full -----------------------------------------------------


def test_disk_full_is_a_507_with_nothing_written(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLITE_FULL (max_page_count): 507 with a stable code, the real cause in the log (not
    "cannot rollback"), nothing half-written, and the store works again once there is room."""
    with TestClient(create_app(settings_for(folder))) as client:
        _disk_full(client, caplog)


def _disk_full(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    client.post("/history/9", json=[10])
    store = client.app.state.recs.store
    conn = store._connection()
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    batch = [TRACKS[i % len(TRACKS)] for i in range(10_000)]
    with caplog.at_level(logging.WARNING):
        full = client.post("/history/9", json=batch)
    assert full.status_code == 507, full.text
    body = full.json()
    assert body["code"] == "history_store_full" and "disk full" in body["message"]
    assert "sqlite" not in full.text.lower() and "/" not in body["message"]
    assert "database or disk is full" in caplog.text
    assert "cannot rollback" not in caplog.text
    assert client.get("/history/9").json() == [10]
    assert store.page(9, 10).total == 1  # the counts were not touched either
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert client.post("/history/9", json=[20]).json()["history_length"] == 2


def test_busy_store_is_a_503_with_retry_after(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = client.app.state.recs.store
    track = client.get("/top_popular/1").json()[0]
    assert client.post("/history/1", json=[track]).status_code == 200  # user 1 has a history

    def busy(*_: object, **__: object) -> list[int]:
        raise HistoryStoreBusy(f"history store {store.path}: database is locked (SQLITE_BUSY)")

    monkeypatch.setattr(store, "get", busy)
    with caplog.at_level(logging.WARNING):
        answer = client.get("/recommendations/1")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    assert answer.json()["code"] == "history_store_busy"
    assert str(store.path) not in answer.text and "SQLITE" not in answer.text
    assert str(store.path) in caplog.text  # the details are in the log


def test_a_read_that_hangs_does_not_hold_the_loop(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A history read stuck in SQLite (as in a WAL read-lock wait, which ignores the busy
    timeout) gets 503 after the read deadline, and other requests keep being answered."""
    release = threading.Event()
    settings = settings_for(folder, history_read_timeout_ms=100)
    with TestClient(create_app(settings)) as c:
        store = c.app.state.recs.store
        track = c.get("/top_popular/1").json()[0]
        assert c.post("/history/1", json=[track]).status_code == 200  # a read is needed
        monkeypatch.setattr(store, "get", lambda *_: release.wait(10) and [])
        monkeypatch.setattr(store, "ping", lambda: release.wait(10))
        started = time.perf_counter()
        answer = c.get("/recommendations/1")
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["history_store"] is False
        assert c.get("/top_popular/3").status_code == 200
        assert time.perf_counter() - started < 3
        release.set()


# --- 5. the reload watcher ------------------------------------------------------------------


def _new_run(folder: Path, run_id: str) -> None:
    manifest = json.loads((folder / io.MANIFEST).read_text())
    manifest["run_id"] = run_id
    (folder / io.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError(),
        FileNotFoundError("similar.parquet gone"),
        ValueError("duplicate column 'track_id'"),
    ],
)
def test_the_watcher_survives_any_failure(
    folder: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """A load that fails with something else than DataError is logged and shown in
    /health; the watcher keeps polling and takes the set once loading works again."""
    real_load = service_module.load_artefacts
    calls = {"n": 0}

    def flaky(parquet_dir: Path) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise failure
        return real_load(parquet_dir)

    settings = settings_for(folder, reload_poll_seconds=0.05)
    with TestClient(create_app(settings)) as c:
        monkeypatch.setattr(service_module, "load_artefacts", flaky)
        _new_run(folder, "run-2")
        deadline = time.monotonic() + 10
        while c.get("/health").json()["run_id"] != "run-2" and time.monotonic() < deadline:
            time.sleep(0.05)
        health = c.get("/health").json()
        assert health["run_id"] == "run-2", health
        assert calls["n"] == 2  # retried after the failure
        watch = health["manifest_watch"]
        assert watch["running"] is True and watch["last_poll"] is not None
        # the poll itself failing (a manifest that cannot be read) is shown too
        (folder / io.MANIFEST).write_text("{not json")
        deadline = time.monotonic() + 10
        while (
            c.get("/health").json()["manifest_watch"]["last_error"] is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        watch = c.get("/health").json()["manifest_watch"]
        assert "manifest.json" in watch["last_error"] and watch["running"] is True
        assert str(folder) not in json.dumps(watch)
        assert c.get("/health").status_code == 200


def test_reloads_take_turns_and_skip_a_current_run(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load waits while another process holds the folder's reload lock; a run already
    served is skipped (no second set loaded)."""
    recs = Recommendations(settings_for(folder))
    recs.load()
    loads = {"n": 0}
    real_load = service_module.load_artefacts

    def counting(parquet_dir: Path) -> object:
        loads["n"] += 1
        return real_load(parquet_dir)

    monkeypatch.setattr(service_module, "load_artefacts", counting)
    assert recs.reload()["skipped"] is True and loads["n"] == 0
    _new_run(folder, "run-3")
    fd = os.open(folder / RELOAD_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another worker is loading"
    results: list[dict] = []
    thread = threading.Thread(target=lambda: results.append(recs.reload()))
    thread.start()
    time.sleep(0.5)
    assert not results and loads["n"] == 0  # waiting for its turn
    os.close(fd)
    thread.join(10)
    assert results[0]["reloaded"] is True and results[0]["run_id"] == "run-3"
    assert loads["n"] == 1
    with reload_lock(folder):  # the lock is free again
        pass


def test_reload_errors_show_no_paths(folder: Path) -> None:
    with TestClient(create_app(settings_for(folder))) as c:
        (folder / io.SIMILAR).write_bytes(b"broken")
        _new_run(folder, "run-broken")
        refused = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 409
        assert "similar.parquet" in refused.json()["error"]
        health = c.get("/health")
        assert "similar.parquet" in health.json()["reload_error"]
        for text in (refused.text, health.text):
            assert str(folder) not in text and str(folder.resolve()) not in text


# --- 6. secrets -----------------------------------------------------------------------------


def test_admin_token_stays_secret(
    folder: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    settings = settings_for(folder)
    assert isinstance(settings.admin_token, SecretStr)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert "admin_token" not in public_parameters(settings)
    assert TOKEN not in json.dumps(settings.model_dump(mode="json"))
    data = tmp_path / "data"
    data.mkdir()
    manifest = build_manifest(settings.model_copy(update={"data_dir": data}), "r1", {})
    assert TOKEN not in json.dumps(manifest, default=str)
    assert "admin_token" not in manifest["parameters"]
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as c:
        assert (
            c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        )
        assert c.post("/admin/reload", headers={"Authorization": "Bearer no"}).status_code == 401
    assert TOKEN not in caplog.text


# --- 7. the access log ----------------------------------------------------------------------


def test_access_log_is_off_unless_asked_for(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    access = logging.getLogger("uvicorn.access")
    try:
        with TestClient(create_app(settings_for(folder))):
            assert access.disabled is True
        with TestClient(create_app(settings_for(folder, access_log=True))):
            assert access.disabled is False
    finally:
        access.disabled = False
    seen: dict = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.update(k))
    monkeypatch.delenv("MUSICREC_ACCESS_LOG", raising=False)
    service_module.main()
    assert seen["access_log"] is False
