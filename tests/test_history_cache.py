"""The read caches of the service's hot path: the SQLite store's history cache (change counters
shared by the processes of one machine) and the per-set answer cache of ``Recommendations``."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import requests
from fastapi.testclient import TestClient

from musicrec.history import CHANGE_BUCKETS, ChangeCounters, HistoryCache, SQLiteHistoryStore
from recommendation_service import Recommendations, create_app
from tests.service_support import Service
from tests.test_service_app import make_settings, write_artefacts


def _append(path: str, user: int, tracks: list[int]) -> None:
    store = SQLiteHistoryStore(path)
    store.add(user, tracks)
    store.close()


def test_a_read_is_cached_until_any_process_writes_to_the_user(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    store = SQLiteHistoryStore(db, cache_events=1_000)
    store.add(1, [10, 20])
    store.add(2, [99])
    assert store.cached(1) is None  # nothing read yet
    assert store.get(1) == [10, 20]
    assert store.cached(1) == [10, 20]
    store.cached(1).append(5)  # type: ignore[union-attr]  # a copy: the cache is unchanged
    assert store.cached(1) == [10, 20]
    assert store.get(3) == [] and store.cached(3) == []  # an empty history is cached too
    store.add(1, [30])  # this process's own write
    assert store.cached(1) is None
    assert store.get(1) == [10, 20, 30]
    # another process writes to user 1: this process's entry is stale at once
    ctx = mp.get_context("spawn")
    writer = ctx.Process(target=_append, args=(str(db), 1, [40]))
    writer.start()
    writer.join(60)
    assert writer.exitcode == 0
    assert store.cached(1) is None
    assert store.get(1) == [10, 20, 30, 40]
    assert store.cached(1) == [10, 20, 30, 40]
    store.close()
    assert (tmp_path / "h.db-changes").stat().st_size == CHANGE_BUCKETS * 8


def test_a_write_to_another_bucket_keeps_the_entry(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.db", cache_events=1_000)
    store.add(1, [10])
    assert store.get(1) == [10]
    store.add(2, [20])
    assert store.cached(1) == [10]
    store.add(1 + CHANGE_BUCKETS, [30])  # same bucket: the entry can no longer be trusted
    assert store.cached(1) is None
    store.close()


def test_without_a_budget_nothing_is_cached(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.db")  # cache_events=0
    store.add(1, [10])
    assert store.get(1) == [10]
    assert store.cached(1) is None
    store.close()


def test_the_cache_keeps_its_event_budget_dropping_the_oldest(tmp_path: Path) -> None:
    counters = ChangeCounters(tmp_path / "c", tuple)
    cache = HistoryCache(counters, max_events=10)
    cache.put(1, counters.value(1), [1, 2, 3, 4])  # 5 with its entry
    cache.put(2, counters.value(2), [5, 6, 7])  # 9
    assert cache.get(1) == [1, 2, 3, 4] and cache.get(2) == [5, 6, 7]
    cache.put(3, counters.value(3), [8])  # 11 > 10: user 1 goes
    assert cache.get(1) is None and cache.get(2) == [5, 6, 7] and cache.get(3) == [8]
    cache.put(2, counters.value(2), [5])  # replaced, not counted twice: 2 + 2
    cache.put(4, counters.value(4), [1, 2, 3, 4, 5])  # 4 + 6 = 10: everything stays
    assert cache.get(2) == [5] and cache.get(3) == [8] and cache.get(4) == [1, 2, 3, 4, 5]
    counters.bump(4)
    assert cache.get(4) is None
    counters.close()


def test_counters_are_shared_through_the_file(tmp_path: Path) -> None:
    first, second = ChangeCounters(tmp_path / "c", tuple), ChangeCounters(tmp_path / "c", tuple)
    assert first.value(7) == 0
    second.bump(7)
    second.bump(7)
    assert first.value(7) == 2 and first.value(8) == 0
    first.close()
    second.close()
    assert ChangeCounters(tmp_path / "c", tuple).value(7) == 2  # kept in the file


def test_a_user_of_a_bucket_never_written_has_no_history_without_a_read(tmp_path: Path) -> None:
    """A zero counter: no write to the bucket was ever acknowledged, so ``cached`` answers
    ``[]`` with the caches off; a write to the user, or to another of its bucket, ends that."""
    store = SQLiteHistoryStore(tmp_path / "h.db")  # cache_events=0: no history cache
    assert store.cached(5) == [] and store.cached(5 + CHANGE_BUCKETS) == []
    store.add(5 + CHANGE_BUCKETS, [10])
    assert store.cached(5) is None and store.get(5) == []  # its bucket was written to
    assert store.cached(6) == []
    store.add(6, [20])
    assert store.cached(6) is None and store.get(6) == [20]
    store.close()


def test_a_new_counters_file_counts_the_users_the_database_holds(tmp_path: Path) -> None:
    """Counters lost, or of an older size: every user with a history gets a count again, so
    none of them is taken for a user without one."""
    db, changes = tmp_path / "h.db", tmp_path / "h.db-changes"
    store = SQLiteHistoryStore(db)
    store.add(1, [10])
    store.add(2, [20, 30])
    store.close()
    for damage in ("deleted", "an older size"):
        if damage == "deleted":
            changes.unlink()
        else:
            changes.write_bytes(bytes(8 << 18))
        store = SQLiteHistoryStore(db)
        assert changes.stat().st_size == CHANGE_BUCKETS * 8, damage
        assert store.cached(1) is None and store.cached(2) is None, damage
        assert store.get(2) == [20, 30]
        assert store.cached(3) == []
        store.close()


def test_answers_are_kept_per_history_and_per_set(tmp_path: Path) -> None:
    folder = write_artefacts(tmp_path)
    with TestClient(create_app(make_settings(folder))) as client:
        recs: Recommendations = client.app.state.recs  # type: ignore[attr-defined]
        art = recs.artefacts
        first = client.get("/recommendations/1", params={"k": 3})
        assert first.json() == [100, 90, 80]
        assert len(art.answers) == 1
        # the kept answer is served again and counted again
        assert client.get("/recommendations/1", params={"k": 3}).json() == [100, 90, 80]
        assert client.get("/stats").json()["personal"] == 2
        # a new online event: the history differs, so the answer is computed again
        client.post("/history/1", json=[10])
        both = client.get("/recommendations/1", params={"k": 3})
        assert both.json() == [20, 100, 30] and both.headers["X-Recommendation-Source"]
        assert client.get("/stats").json()["similar"] == 1
        # a reload brings a new set with no answers
        recs.load()
        assert recs.artefacts is not art and len(recs.artefacts.answers) == 0
        assert client.get("/recommendations/1", params={"k": 3}).json() == [20, 100, 30]


def test_answer_cache_off_keeps_nothing(tmp_path: Path) -> None:
    folder = write_artefacts(tmp_path)
    settings = make_settings(folder).model_copy(update={"answer_cache_users": 0})
    with TestClient(create_app(settings)) as client:
        assert client.get("/recommendations/1").status_code == 200
        assert len(client.app.state.recs.artefacts.answers) == 0  # type: ignore[attr-defined]


def test_the_answer_cache_drops_the_oldest_beyond_its_size(tmp_path: Path) -> None:
    folder = write_artefacts(tmp_path)
    settings = make_settings(folder).model_copy(update={"answer_cache_users": 2})
    with TestClient(create_app(settings)) as client:
        for user in (1, 2, 999):
            assert client.get(f"/recommendations/{user}").status_code == 200
        answers = client.app.state.recs.artefacts.answers  # type: ignore[attr-defined]
        assert [key[0] for key in answers] == [2, 999]


def test_two_services_on_one_sqlite_file_see_each_others_writes(tmp_path: Path) -> None:
    """Two uvicorn processes over one SQLite file, both caches warm: an event posted to one is
    in the other's next answer (history and recommendations)."""
    artefacts = write_artefacts(tmp_path / "set")
    db = tmp_path / "history.db"
    user = 7  # no offline list: popular first, then the tracks similar to its events
    with (
        Service(artefacts, db, tmp_path / "a.log") as a,
        Service(artefacts, db, tmp_path / "b.log") as b,
    ):
        a.start()
        b.start()
        before = requests.get(f"{b.url}/recommendations/{user}", params={"k": 5}, timeout=10)
        again = requests.get(f"{b.url}/recommendations/{user}", params={"k": 5}, timeout=10)
        assert before.json() == again.json()
        track = before.json()[0]
        posted = requests.post(f"{a.url}/history/{user}", json=[track], timeout=10)
        assert posted.status_code == 200, posted.text
        after = requests.get(f"{b.url}/recommendations/{user}", params={"k": 5}, timeout=10)
        assert track not in after.json() and after.json() != before.json()
        assert after.headers["X-Recommendation-Source"] != before.headers["X-Recommendation-Source"]
        posted = requests.post(f"{b.url}/history/{user}", json=[after.json()[0]], timeout=10)
        assert posted.json()["history_length"] == 2
        last = requests.get(f"{a.url}/recommendations/{user}", params={"k": 5}, timeout=10)
        assert after.json()[0] not in last.json() and track not in last.json()
