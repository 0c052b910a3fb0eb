"""Contract tests of the service (API.md) on small hand-made artefacts, through TestClient so
the lifespan (loading, history store) runs as in production."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from musicrec import io
from musicrec.errors import DataError
from musicrec.settings import Settings
from recommendation_service import SOURCE_HEADER, create_app

TRACKS = list(range(10, 130, 10))  # 10, 20, ..., 120
POPULAR = [50, 40, 30, 20, 10, 60, 70]  # rank 1 first
SIMILAR = {10: [(20, 0.9), (30, 0.8), (40, 0.5)], 20: [(10, 0.9), (50, 0.6)], 30: [(90, 0.7)]}
OFFLINE = {1: [100, 90, 80, 70], 2: [30, 20]}


def write_artefacts(folder: Path) -> Path:
    """The four artefacts the service reads, following the contracts of io.py."""
    items = pa.table(
        {
            "track_id": pa.array(TRACKS[::-1], pa.int32()),  # any order on disk
            "name": [f"track {t}" for t in TRACKS[::-1]],
            "album_ids": pa.array([[t + 1] for t in TRACKS[::-1]], pa.list_(pa.int64())),
            "artist_ids": pa.array([[t % 3] for t in TRACKS[::-1]], pa.list_(pa.int64())),
            "genre_ids": pa.array([[] for _ in TRACKS], pa.list_(pa.int64())),
            "albums": [[f"album {t + 1}"] for t in TRACKS[::-1]],
            "artists": [[f"artist {t % 3}"] for t in TRACKS[::-1]],
            "genres": pa.array([[] for _ in TRACKS], pa.list_(pa.string())),
        }
    )
    io.write_table(items, folder / io.ITEMS)
    io.write_table(
        pd.DataFrame(
            {
                "track_id": POPULAR,
                "listeners": [100 - i for i in range(len(POPULAR))],
                "score": [1.0 - i / 10 for i in range(len(POPULAR))],
                "rank": range(1, len(POPULAR) + 1),
            }
        ).iloc[::-1],  # any order on disk
        folder / io.TOP_POPULAR,
        io.POPULAR_SCHEMA,
    )
    rows = [(t, s, score, r) for t, lst in SIMILAR.items() for r, (s, score) in enumerate(lst, 1)]
    io.write_table(
        pd.DataFrame(rows, columns=["track_id", "similar_track_id", "score", "rank"]),
        folder / io.SIMILAR,
        io.SIMILAR_SCHEMA,
    )
    rows = [(u, t, 1.0 / r, r) for u, lst in OFFLINE.items() for r, t in enumerate(lst, 1)]
    io.write_table(
        pd.DataFrame(rows, columns=["user_id", "track_id", "score", "rank"]),
        folder / io.RECOMMENDATIONS,
        io.RECS_SCHEMA,
    )
    io.write_json(
        {"run_id": "test-run", "built_at": "2024-01-02T03:04:05+00:00"}, folder / io.MANIFEST
    )
    return folder


def make_settings(folder: Path) -> Settings:
    # hand-computed lists: uncapped (the artist cap is tested in tests/test_online.py)
    return Settings(
        parquet_dir=folder,
        history_url=f"sqlite:///{folder}/history.db",
        default_k=5,
        max_k=10,
        online_history_window=10,
        reload_poll_seconds=0,
        artist_cap=0,
    )


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_artefacts(tmp_path)


@pytest.fixture()
def client(folder: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(folder))) as c:
        yield c


def test_root_and_health(client: TestClient) -> None:
    root = client.get("/").json()
    assert root["status"] == "ok"
    assert root["users_with_recommendations"] == 2
    assert root["tracks"] == 12
    assert root["similar_pairs"] == 6
    assert root["built_at"] == "2024-01-02T03:04:05+00:00"
    assert root["run_id"] == "test-run"
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "artefacts_loaded": True,
        "history_store": True,
        "run_id": "test-run",
        "reload_error": None,
        "artefacts_damaged": None,
    }


def test_top_popular(client: TestClient) -> None:
    assert client.get("/top_popular").json() == POPULAR[:5]  # default_k = 5
    assert client.get("/top_popular/3").json() == [50, 40, 30]
    # more than the popular list: the rest of the catalogue in id order
    assert client.get("/top_popular/9").json() == POPULAR + [80, 90]
    detailed = client.get("/top_popular/2?details=true").json()
    assert detailed == [
        {
            "track_id": 50,
            "name": "track 50",
            "artists": ["artist 2"],
            "albums": ["album 51"],
            "genres": [],
        },
        {
            "track_id": 40,
            "name": "track 40",
            "artists": ["artist 1"],
            "albums": ["album 41"],
            "genres": [],
        },
    ]


def test_similar_get_and_post(client: TestClient) -> None:
    assert client.get("/similar/5", params={"track_id": 10}).json() == [20, 30, 40]
    assert client.get("/similar/2", params={"track_id": 10}).json() == [20, 30]
    # 10 and 20 given: summed scores 30: .8, 50: .6, 40: .5; the given ones are left out
    assert client.get("/similar/5", params={"track_id": [10, 20]}).json() == [30, 50, 40]
    assert client.post("/similar/5", json=[20, 10]).json() == [30, 50, 40]
    assert client.post("/similar/5", json=[120]).json() == []  # known, but nothing similar


def test_history(client: TestClient) -> None:
    assert client.get("/history/7").json() == []
    added = client.post("/history/7", json=[30, 10])
    assert added.status_code == 200
    assert added.json() == {"user_id": 7, "added": 2, "history_length": 2}
    assert client.post("/history/7", json=[30]).json()["history_length"] == 3
    assert client.get("/history/7").json() == [30, 10, 30]
    assert client.get("/history/7?details=true").json()[1]["name"] == "track 10"


def source(response) -> str:  # noqa: ANN001
    return response.headers[SOURCE_HEADER]


def test_four_kinds_of_user_and_stats(client: TestClient) -> None:
    new = client.get("/recommendations/999")
    assert new.json() == POPULAR[:5]
    assert source(new) == "default"

    offline = client.get("/recommendations/1", params={"k": 3})
    assert offline.json() == [100, 90, 80]
    assert source(offline) == "personal"
    # a short offline list is filled from the popular tracks not in it
    assert client.get("/recommendations/2").json() == [30, 20, 50, 40, 10]

    client.post("/history/5", json=[10])
    online = client.get("/recommendations/5")
    # similar to 10 (20, 30, 40), then popular without the heard 10 and the ones taken
    assert online.json() == [20, 30, 40, 50, 60]
    assert source(online) == "similar"

    client.post("/history/6", json=[10, 20])
    # 20 is the latest (weight 1), 10 before it (weight 1/2): 50: .6, 30: .4, 40: .25;
    # 10 and 20 were heard
    assert client.get("/recommendations/6", params={"k": 3}).json() == [50, 30, 40]

    client.post("/history/1", json=[10])
    both = client.get("/recommendations/1")
    # strict: online 20, offline 100, online 30, offline 90, online 40
    assert both.json() == [20, 100, 30, 90, 40]
    assert source(both) == "personal+similar"
    assert client.get("/recommendations/1?blend=probability&p=1").json() == [20, 30, 40, 100, 90]
    assert client.get("/recommendations/1?blend=probability&p=0").json() == [100, 90, 80, 70, 20]
    first = client.get("/recommendations/1?blend=probability&p=0.5&k=7").json()
    assert sorted(first) == [20, 30, 40, 70, 80, 90, 100]
    assert client.get("/recommendations/1?blend=probability&p=0.5&k=7").json() == first
    post = client.post(
        "/recommendations", json={"user_id": 1, "blend": "probability", "p": 0.5, "k": 7}
    )
    assert post.json() == first

    stats = client.get("/stats").json()
    # personal: user 1 (k=3), 2, six blends of 1; similar: 5, 6, six blends; default: 999
    assert (stats["personal"], stats["similar"], stats["default"]) == (8, 8, 1)
    client.get("/recommendations/12345")
    assert client.get("/stats").json()["default"] == 2


def test_heard_tracks_are_left_out_and_no_duplicates(client: TestClient) -> None:
    client.post("/history/1", json=[100, 50, 90])
    answer = client.get("/recommendations/1?k=9").json()
    # online: similar to 90, 50, 100: none; offline without the heard: 80, 70; then popular
    # without the heard and taken; then the rest of the catalogue: 9 unheard tracks in all
    assert answer == [80, 70, 40, 30, 20, 10, 60, 110, 120]


def test_fewer_only_when_the_catalogue_runs_out(client: TestClient) -> None:
    client.post("/history/3", json=TRACKS[:4])
    answer = client.get("/recommendations/3?k=10").json()
    assert len(answer) == 8 and set(answer) == set(TRACKS[4:])


def test_details_on_recommendations(client: TestClient) -> None:
    detailed = client.post("/recommendations?details=true", json={"user_id": 1, "k": 2}).json()
    assert [d["track_id"] for d in detailed] == [100, 90]
    assert detailed[0]["name"] == "track 100"
    assert set(detailed[0]) == {"track_id", "name", "artists", "albums", "genres", "reason"}
    # the offline list, no ALS files in this folder: no tracks to name as the cause
    assert detailed[0]["reason"] == {"source": "personal", "because": []}


@pytest.mark.parametrize(
    ("method", "url", "body", "words"),
    [
        ("get", "/recommendations/abc", None, "user_id"),
        ("get", "/recommendations/-1", None, "user_id"),
        ("get", "/recommendations/1.5", None, "user_id"),
        ("get", "/recommendations/99999999999", None, "user_id"),
        ("get", "/recommendations/1?k=0", None, "k"),
        ("get", "/recommendations/1?k=11", None, "k must be between 1 and 10"),
        ("get", "/recommendations/1?p=1.5", None, "p"),
        ("get", "/recommendations/1?p=nan", None, "p"),
        ("get", "/recommendations/1?blend=mixed", None, "blend"),
        ("post", "/recommendations", {"user_id": 1, "k": 11}, "k must be between 1 and 10"),
        ("post", "/recommendations", {"user_id": "x"}, "user_id"),
        ("post", "/recommendations", {"k": 3}, "user_id"),
        ("post", "/recommendations", {"user_id": 1, "colour": 3}, "colour"),
        ("post", "/recommendations", [1, 2], "body"),
        ("get", "/top_popular/0", None, "k"),
        ("get", "/top_popular/11", None, "k must be between 1 and 10"),
        ("get", "/top_popular/x", None, "k"),
        ("get", "/similar/5", None, "track_id"),
        ("get", "/similar/5?track_id=x", None, "track_id"),
        ("get", "/similar/5?track_id=11", None, "not in the catalogue: 11"),
        ("post", "/similar/5", [], "body"),
        ("post", "/similar/5", [10, 11, 13, 11], "not in the catalogue: 11, 13"),
        ("post", "/history/8", [], "body"),
        ("post", "/history/8", [10, 11, 12], "not in the catalogue: 11, 12"),
        ("post", "/history/8", [10, -5], "body"),
        ("post", "/history/8", [10, 2.5], "body"),
        ("post", "/history/8", ["10"], "body"),
        ("post", "/history/8", {"track_ids": [10]}, "body"),
        ("post", "/history/-8", [10], "user_id"),
    ],
)
def test_bad_input(client: TestClient, method: str, url: str, body: object, words: str) -> None:
    before = (client.get("/history/8").json(), client.get("/stats").json())
    response = client.request(method.upper(), url, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.status_code == 422
    payload = response.json()
    assert words in payload["message"], payload
    assert isinstance(payload["detail"], list)
    assert (client.get("/history/8").json(), client.get("/stats").json()) == before


def test_malformed_json_body(client: TestClient) -> None:
    response = client.post(
        "/history/8", content=b"[10, 20", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["message"]
    assert client.get("/history/8").json() == []


def test_undecodable_body_is_a_422(client: TestClient) -> None:
    """Bytes that are not even text (found by the fuzzer): 422 like malformed JSON, not 400."""
    response = client.post(
        "/similar/5", content=b"\xff\x11\x1a\xfe", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["message"].startswith("body: malformed body")


def test_too_many_query_track_ids_is_a_422(client: TestClient) -> None:
    """A query list longer than the GET limit is our 422 naming it (POST takes more)."""
    response = client.get("/similar/5", params={"track_id": [10] * 501})
    assert response.status_code == 422
    assert "track_id" in response.json()["message"]
    assert client.post("/similar/5", json=[10] * 501).json() == [20, 30, 40]


def test_unknown_path_and_method_are_json_problems(client: TestClient) -> None:
    missing = client.get("/nothing/here")
    assert missing.status_code == 404 and missing.json()["message"] == "Not Found"
    wrong = client.delete("/history/1")
    assert wrong.status_code == 405 and wrong.json()["detail"][0]["type"] == "http_405"


def test_unknown_tracks_are_listed(client: TestClient) -> None:
    response = client.post("/history/8", json=[10, 11, 12, 11])
    assert response.json()["unknown_track_ids"] == [11, 12]


def test_history_survives_a_restart(folder: Path) -> None:
    settings = make_settings(folder)
    with TestClient(create_app(settings)) as c:
        c.post("/history/4", json=[20, 30])
    with TestClient(create_app(settings)) as c:
        assert c.get("/history/4").json() == [20, 30]


@pytest.mark.parametrize("name", [io.ITEMS, io.TOP_POPULAR, io.SIMILAR, io.RECOMMENDATIONS])
def test_missing_artefact_refuses_to_start(folder: Path, name: str) -> None:
    (folder / name).unlink()
    with pytest.raises(DataError, match=name), TestClient(create_app(make_settings(folder))):
        pass


def test_bad_artefacts_refuse_to_start(folder: Path) -> None:
    (folder / io.SIMILAR).write_bytes(b"not parquet")
    with (
        pytest.raises(DataError, match="similar.parquet: not a readable parquet"),
        TestClient(create_app(make_settings(folder))),
    ):
        pass
    write_artefacts(folder)
    recs = pd.read_parquet(folder / io.RECOMMENDATIONS).iloc[::-1]
    io.write_table(recs, folder / io.RECOMMENDATIONS, io.RECS_SCHEMA)
    with (
        pytest.raises(DataError, match="not sorted by user_id, rank"),
        TestClient(create_app(make_settings(folder))),
    ):
        pass
    io.write_table(recs.drop(columns="track_id"), folder / io.RECOMMENDATIONS)
    with (
        pytest.raises(DataError, match="column 'track_id' is missing"),
        TestClient(create_app(make_settings(folder))),
    ):
        pass


def test_unknown_history_url_refuses_to_start(folder: Path) -> None:
    settings = make_settings(folder).model_copy(update={"history_url": "memcached://x"})
    with (
        pytest.raises(ValueError, match="unsupported history store URL"),
        TestClient(create_app(settings)),
    ):
        pass


def test_openapi_has_every_endpoint_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/",
        "/top_popular",
        "/top_popular/{k}",
        "/similar/{k}",
        "/history/{user_id}",
        "/recommendations/{user_id}",
        "/recommendations",
        "/stats",
        "/health",
    ):
        assert path in paths
    assert {"get", "post"} <= set(paths["/similar/{k}"]) and {"get", "post"} <= set(
        paths["/history/{user_id}"]
    )
    assert "examples" in schema["components"]["schemas"]["RecommendationRequest"]
