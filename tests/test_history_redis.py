"""The Redis history store with a real redis-server: the service's answers over it (paging,
idempotent retries, 503 when Redis is gone, 507 when it is out of memory), a write whose answer
is lost stored exactly once, no acknowledged event lost when redis-server is killed with
SIGKILL under load, and two service processes sharing one Redis.

The contract tests common to both stores are in test_history.py (``backend`` fixture)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from fastapi.testclient import TestClient

from musicrec.history import HistoryStoreError, open_history_store
from musicrec.history_redis import RedisHistoryStore
from recommendation_service import create_app
from tests.redis_support import RedisServer
from tests.service_support import Service, tiny_artefacts
from tests.test_durability import EVENTS, Load, _check
from tests.test_hardening import settings_for
from tests.test_service_app import write_artefacts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), enable_debug_command="yes") as s:
        yield s


def fresh_url(server: RedisServer) -> str:
    return f"{server.url}?prefix=t{uuid.uuid4().hex}"


def test_durability_is_read_from_the_server(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_history_store(fresh_url(server))
    assert isinstance(store, RedisHistoryStore)
    assert store.durability.startswith("durable: appendonly yes, appendfsync always")
    store.close()
    with RedisServer(tmp_path / "r", fsync="everysec") as lax, caplog.at_level(logging.WARNING):
        weak = open_history_store(lax.url)
        assert weak.durability.startswith("NOT fully durable")
        weak.close()
    assert "appendfsync everysec" in caplog.text
    with pytest.raises(HistoryStoreError, match="cannot open history store"):
        open_history_store("redis://:secret@127.0.0.1:1/0")  # nothing listens on port 1


def test_reads_on_the_event_loop_match_the_threaded_ones(tmp_path: Path) -> None:
    """``aget`` (asyncio, the service's list path) gives ``get``'s answer, on every loop
    that asks, and the typed error when Redis is gone."""
    with RedisServer(tmp_path / "r") as own:
        store = RedisHistoryStore(own.url, max_events=3)
        store.add(1, [10, 20, 30, 40])

        async def read(user: int) -> list[int]:
            try:
                return await store.aget(user)
            finally:
                await store.aclose()

        assert asyncio.run(read(1)) == store.get(1) == [20, 30, 40]
        assert asyncio.run(read(2)) == []  # a second loop gets a pool of its own
        own.kill()
        with pytest.raises(HistoryStoreError, match="reading the history of user 1"):
            asyncio.run(read(1))
        store.close()


def test_the_password_stays_out_of_repr_and_errors(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", requirepass="hunter2") as locked:
        url = f"redis://:hunter2@127.0.0.1:{locked.port}/0"
        store = open_history_store(url)
        assert store.add(1, [5]) == 1 and store.get(1) == [5]
        assert "hunter2" not in repr(store) and "hunter2" not in store.url
        store.close()
        with pytest.raises(HistoryStoreError) as failed:
            open_history_store(url.replace("hunter2", "wrong-pass"))
        assert "wrong-pass" not in str(failed.value)
        assert "cannot open history store" in str(failed.value)


def test_service_over_redis(server: RedisServer, tmp_path: Path) -> None:
    """Paging headers, idempotent retries and retention through the HTTP API; the keys hold
    exactly the kept events (older ones are deleted, not hidden)."""
    url = fresh_url(server)
    folder = write_artefacts(tmp_path / "parquet")
    settings = settings_for(
        folder, history_url=url, history_max_events=6, history_page_default=4, history_page_max=5
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["history_store"] is True
        client.post("/history/3", json=[10, 20, 30, 40, 50, 60, 70, 80])
        first = client.get("/history/3")
        assert first.json() == [50, 60, 70, 80]
        assert (
            first.headers["X-History-First-Position"],
            first.headers["X-History-Total"],
            first.headers["X-History-Length"],
        ) == ("4", "8", "6")
        assert client.get("/history/3", params={"before": 4, "limit": 5}).json() == [30, 40]
        key = {"Idempotency-Key": "retry-1"}
        one = client.post("/history/4", json=[10, 20], headers=key)
        two = client.post("/history/4", json=[10, 20], headers=key)
        assert two.json() == one.json() and two.headers["Idempotent-Replayed"] == "true"
        assert client.post("/history/4", json=[30], headers=key).status_code == 422
        assert client.get("/history/4").json() == [10, 20]
        recs = client.get("/recommendations/4", params={"k": 5}).json()
        assert not {10, 20} & set(recs)  # heard online: left out
    prefix = url.split("prefix=")[1]
    raw = server.client()
    assert raw.lrange(f"{prefix}:u:3:e", 0, -1) == [b"30", b"40", b"50", b"60", b"70", b"80"]
    assert raw.get(f"{prefix}:u:3:n") == b"8"
    assert 0 < raw.pttl(f"{prefix}:k:retry-1") <= 86_400_000
    raw.close()


def test_redis_down_is_503_and_out_of_memory_507(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone: 503 with Retry-After and the store's code, no host in the answer; back:
    200 again without a restart. Out of memory: 507, nothing stored."""
    folder = write_artefacts(tmp_path / "parquet")
    with RedisServer(tmp_path / "r") as own:
        settings = settings_for(folder, history_url=own.url)
        with TestClient(create_app(settings)) as client, caplog.at_level(logging.WARNING):
            assert client.post("/history/9", json=[10]).status_code == 200
            own.client().config_set("maxmemory", "1")
            full = client.post("/history/9", json=[20, 30])
            assert full.status_code == 507, full.text
            assert full.json()["code"] == "history_store_full"
            own.client().config_set("maxmemory", "0")
            assert client.get("/history/9").json() == [10]
            own.kill()
            down = client.post("/history/9", json=[40])
            assert down.status_code == 503 and down.headers["Retry-After"] == "1"
            assert down.json()["code"] == "history_store_unavailable"
            assert "127.0.0.1" not in down.text and "redis" not in down.text.lower()
            read = client.get("/recommendations/9")
            assert read.status_code == 503
            assert client.get("/health").status_code == 503
            own.start()
            assert client.post("/history/9", json=[50]).json()["history_length"] == 2
            assert client.get("/history/9").json() == [10, 50]
            assert client.get("/recommendations/9").status_code == 200  # reads reconnect
            assert client.get("/health").status_code == 200
        assert "OutOfMemoryError" in caplog.text  # the cause is in the log


def test_a_write_whose_answer_is_lost_is_stored_once(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stalls (DEBUG SLEEP) past the write timeout: the store retries with the same key,
    the first attempt's write is found, and the event is stored once, not as a replay."""
    store = RedisHistoryStore(fresh_url(server), write_timeout_ms=100)
    store.add(1, [5])
    blocker = threading.Thread(
        target=lambda: server.client().execute_command("DEBUG", "SLEEP", "0.25")
    )
    blocker.start()
    time.sleep(0.03)
    with caplog.at_level(logging.WARNING):
        added = store.append(1, [6])
    blocker.join()
    assert "retrying the write" in caplog.text
    assert added.replayed is False and added.history_length == 2
    assert store.get(1) == [5, 6]
    store.close()


def test_acknowledged_events_survive_sigkill_of_redis(tmp_path: Path) -> None:
    """8 clients post 1,000 events (one per request) to the service (2 workers) over Redis;
    redis-server is killed with SIGKILL after 400 acknowledgements and restarted on its AOF:
    every acknowledged event is there exactly once, in the order sent per user."""
    ids = pq.read_table(tiny_artefacts() / "items.parquet", columns=["track_id"])
    tracks = sorted(ids.column(0).to_pylist())[:EVENTS]
    with (
        RedisServer(tmp_path / "redis") as store_server,
        Service(
            tiny_artefacts(),
            tmp_path / "unused.db",
            tmp_path / "server.log",
            workers=2,
            MUSICREC_HISTORY_URL=store_server.url,
        ) as service,
    ):
        service.start()
        service.wait_healthy(workers=2)
        load = Load(service, tracks)
        load.start()
        assert store_server.kill() == -9  # under load: requests are in flight
        load.up.clear()
        acked_at_kill = load.acked
        time.sleep(0.3)  # in-flight writes fail (503: not acknowledged)
        store_server.start()  # same folder, same port: replays the AOF
        load.finish()
        assert acked_at_kill < EVENTS - 100
        users = [c.user for c in load.clients] + [9_000_000]
        history = {u: requests.get(f"{service.url}/history/{u}", timeout=30).json() for u in users}
        _check(load, history)
        assert "Traceback" not in service.log(), service.log()[-3000:]


def test_two_services_share_one_redis(server: RedisServer, tmp_path: Path) -> None:
    """Two uvicorn processes on two ports over one Redis: an event posted to one is in the
    other's next answer (history and recommendations)."""
    url = fresh_url(server)
    artefacts = tiny_artefacts()
    user = 7
    with (
        Service(artefacts, tmp_path / "a.db", tmp_path / "a.log", MUSICREC_HISTORY_URL=url) as a,
        Service(artefacts, tmp_path / "b.db", tmp_path / "b.log", MUSICREC_HISTORY_URL=url) as b,
    ):
        a.start()
        b.start()
        assert a.port != b.port
        before = requests.get(f"{b.url}/recommendations/{user}", params={"k": 10}).json()
        track = before[0]
        posted = requests.post(f"{a.url}/history/{user}", json=[track], timeout=10)
        assert posted.status_code == 200, posted.text
        assert requests.get(f"{b.url}/history/{user}", timeout=10).json() == [track]
        after = requests.get(f"{b.url}/recommendations/{user}", params={"k": 10}).json()
        assert track not in after and after != before
        assert (
            requests.post(f"{b.url}/history/{user}", json=[before[1]], timeout=10).json()[
                "history_length"
            ]
            == 2
        )
        assert requests.get(f"{a.url}/history/{user}", timeout=10).json() == [track, before[1]]
        assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()
