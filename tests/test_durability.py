"""No acknowledged listening event is lost or doubled: uvicorn with 2 worker processes, 8
client threads posting 1,000 events in all, the server killed with SIGKILL (or stopped with
SIGTERM) in the middle and restarted, and every event that got a 2xx answer is in the history
exactly once, in the order it was sent per user (API.md, "Durability")."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from tests.service_support import Service, tiny_artefacts

THREADS = 8
EVENTS = 1_000
PER_THREAD = EVENTS // THREADS
SHARED_USER = 9_000_000  # every thread also writes to this user
STOP_AFTER = 400  # acknowledged events before the server is stopped


@dataclass
class Client:
    """What one client thread sent: each event is (user, track), unique over the test."""

    index: int
    acked: list[tuple[int, int]] = field(default_factory=list)
    unknown: list[tuple[int, int]] = field(default_factory=list)  # no answer: stored or not
    sent: list[tuple[int, int]] = field(default_factory=list)  # in the order sent
    errors: list[str] = field(default_factory=list)

    @property
    def user(self) -> int:
        return 8_000_000 + self.index


class Load:
    """8 threads posting one event per request; they pause while the server is down."""

    def __init__(self, service: Service, tracks: list[int]) -> None:
        self.service = service
        self.tracks = tracks
        self.up = threading.Event()
        self.up.set()
        self.clients = [Client(i) for i in range(THREADS)]
        self.lock = threading.Lock()
        self.acked = 0

    def start(self) -> None:
        """Start the clients and wait until ``STOP_AFTER`` events are acknowledged."""
        self.threads = [
            threading.Thread(target=self.run, args=(c,), daemon=True) for c in self.clients
        ]
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 60
        while self.acked < STOP_AFTER and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.acked >= STOP_AFTER, "the load did not get going"

    def finish(self) -> None:
        """Let the paused clients go on and wait until every one has sent its events."""
        self.up.set()
        for thread in self.threads:
            thread.join(120)
        assert not any(t.is_alive() for t in self.threads)

    def events(self, client: Client) -> Iterator[tuple[int, int]]:
        for i in range(PER_THREAD):
            user = SHARED_USER if i % 4 == 3 else client.user
            yield user, self.tracks[client.index * PER_THREAD + i]

    def run(self, client: Client) -> None:
        session = requests.Session()
        for user, track in self.events(client):
            self.up.wait(120)
            client.sent.append((user, track))
            try:
                response = session.post(
                    f"{self.service.url}/history/{user}", json=[track], timeout=30
                )
            except requests.RequestException:
                client.unknown.append((user, track))  # the server went away mid-request
                session.close()
                session = requests.Session()
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                client.acked.append((user, track))
                with self.lock:
                    self.acked += 1
            elif response.status_code >= 500:  # e.g. 503 during shutdown: not stored
                client.unknown.append((user, track))
            else:
                client.errors.append(f"{response.status_code} {response.text[:200]}")
        session.close()


def _check(load: Load, history: dict[int, list[int]]) -> None:
    """Every acked event once; nothing that was never sent; the order of sending per user."""
    all_acked = sum(len(c.acked) for c in load.clients)
    assert all_acked >= EVENTS - 3 * THREADS, all_acked  # almost all got through
    stored_shared = history[SHARED_USER]
    assert len(stored_shared) == len(set(stored_shared)), "an event of the shared user doubled"
    for client in load.clients:
        assert not client.errors, client.errors
        for user in (client.user, SHARED_USER):
            sent = [t for u, t in client.sent if u == user]
            acked = {t for u, t in client.acked if u == user}
            unknown = {t for u, t in client.unknown if u == user}
            mine = set(sent)
            stored = [t for t in history[user] if t in mine]
            if user == client.user:
                assert stored == history[user], "events that this client never sent"
            assert len(stored) == len(set(stored)), f"user {user}: an event stored twice"
            assert acked <= set(stored), f"user {user}: acked events lost: {acked - set(stored)}"
            assert set(stored) <= acked | unknown
            assert stored == [t for t in sent if t in set(stored)], f"user {user}: order"
    shared_sent = {t for c in load.clients for u, t in c.sent if u == SHARED_USER}
    assert set(stored_shared) <= shared_sent


@pytest.fixture(scope="module")
def tracks() -> list[int]:
    ids = pq.read_table(tiny_artefacts() / "items.parquet", columns=["track_id"])
    values = sorted(ids.column(0).to_pylist())
    assert len(values) >= EVENTS
    return values[:EVENTS]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_acknowledged_events_survive(tmp_path: Path, tracks: list[int], how: str) -> None:
    """SIGKILL of the master and both workers ('kill'), or a graceful SIGTERM ('stop'), in
    the middle of the load; then a restart, the rest of the load, and the check."""
    service = Service(tiny_artefacts(), tmp_path / "history.db", tmp_path / "server.log", workers=2)
    with service:
        service.start()
        service.wait_healthy(workers=2)
        load = Load(service, tracks)
        load.start()
        load.up.clear()
        code = service.kill() if how == "kill" else service.stop()
        acked_at_stop = load.acked
        if how == "kill":
            assert code == -9, code
        service.start()
        service.wait_healthy(workers=2)
        load.finish()
        assert acked_at_stop < EVENTS - 100  # the stop really came in the middle
        users = [c.user for c in load.clients] + [SHARED_USER]
        history = {u: requests.get(f"{service.url}/history/{u}", timeout=30).json() for u in users}
        _check(load, history)
        # and once more after a normal restart: the same history
        service.stop()
        service.start()
        again = {u: requests.get(f"{service.url}/history/{u}", timeout=30).json() for u in users}
        assert again == history
        assert "Traceback" not in service.log(), service.log()[-3000:]
