"""The Spark engine in local mode on the tiny preset: the same prepared files as the in-process
``prepare``, the same split and top popular as the in-process code, ALS lists scored over user
partitions that leave heard tracks out, and a folder the service starts on.

One Spark session (local[2], 2 partitions) and one prepared + run folder serve every test of
the module; ALS runs 2 iterations (the engine, not the model's quality, is tested here).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from musicrec import io
from musicrec.columns import Columns as C
from musicrec.listens import build_listens
from musicrec.pipeline import _popular_table
from musicrec.prepare import prepare_files
from musicrec.settings import Settings
from musicrec.sources import PopularSource, TrainData
from musicrec.split import split_dates

JAVA = "openjdk-17-jre-headless"


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if shutil.which("java") is None:
        pytest.fail(
            f"java not found: install the Debian package {JAVA} "
            "(./run_tests.sh does it when run as root)"
        )
    from musicrec.spark_engine import spark_session

    session = spark_session(
        Settings(spark_master="local[2]", spark_partitions=2, spark_driver_memory="1g")
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def folders(
    spark: object, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny data prepared by both engines, and the Spark run on the Spark folder."""
    from musicrec.spark_engine import prepare_spark, run_spark

    base = tmp_path_factory.mktemp("spark_engine")
    local, on_spark = base / "local", base / "spark"
    prepare_files(tiny_data, local)
    settings = _settings(tiny_data, on_spark)
    prepare_spark(spark, tiny_data, on_spark, settings)
    run_spark(settings, spark)
    return {"local": local, "spark": on_spark, "data": tiny_data}


def _settings(data: Path, parquet: Path) -> Settings:
    return Settings(
        data_dir=data,
        parquet_dir=parquet,
        spark_master="local[2]",
        spark_partitions=2,
        als_iterations=2,
        als_factors=8,
        n_recommendations=20,
        n_similar=10,
        history_url=f"sqlite:///{parquet}/history.db",
        reload_poll_seconds=0,
    )


def test_prepare_writes_the_same_files(folders: dict[str, Path]) -> None:
    for name in (io.EVENTS, io.ITEMS):
        spark_table = pq.read_table(folders["spark"] / name)
        local_table = pq.read_table(folders["local"] / name)
        assert spark_table.schema == local_table.schema, name
        assert spark_table.equals(local_table), name  # rows, order, merged plays


def test_split_and_popular_match_the_local_engine(folders: dict[str, Path]) -> None:
    settings = _settings(folders["data"], folders["spark"])
    events = io.read_events(folders["local"] / io.EVENTS)
    expected = split_dates(events, settings)
    assert io.read_json(folders["spark"] / "work" / "split.json") == expected.as_dict()
    cutoff = int(events[C.day].max()) + 1
    data = TrainData.build(build_listens(events, cutoff), None)
    local = _popular_table(PopularSource(settings, **PopularSource.space(settings)[0]).fit(data))
    spark_table = pq.read_table(folders["spark"] / io.TOP_POPULAR).to_pandas()
    assert pq.read_schema(folders["spark"] / io.TOP_POPULAR).equals(io.POPULAR_SCHEMA)
    pd.testing.assert_frame_equal(spark_table, local.reset_index(drop=True))


def test_als_lists_leave_heard_tracks_out(folders: dict[str, Path]) -> None:
    recs = pq.read_table(folders["spark"] / io.PERSONAL_ALS)
    assert recs.schema.equals(io.RECS_SCHEMA)
    frame = recs.to_pandas()
    events = io.read_events(folders["local"] / io.EVENTS)
    assert set(frame[C.user]) == set(events[C.user])  # every user gets a list
    assert (frame.groupby(C.user).size() == 20).all()
    assert (frame.groupby(C.user)[C.rank].apply(lambda r: list(r) == list(range(1, 21)))).all()
    assert (frame.groupby(C.user)[C.score].apply(lambda s: s.is_monotonic_decreasing)).all()
    heard = set(zip(events[C.user], events[C.track], strict=True))
    assert not any(pair in heard for pair in zip(frame[C.user], frame[C.track], strict=True))
    firsts = frame[frame[C.rank] == 1][C.track]
    assert firsts.nunique() > 10  # personal, not one chart for everyone
    assert (folders["spark"] / io.RECOMMENDATIONS).read_bytes() == (
        folders["spark"] / io.PERSONAL_ALS
    ).read_bytes()  # ALS is what is served


def test_the_service_starts_on_the_spark_folder(folders: dict[str, Path]) -> None:
    from recommendation_service import create_app

    manifest = io.read_json(folders["spark"] / io.MANIFEST)
    assert manifest["engine"]["name"] == "spark"
    assert manifest["selection"]["winner"] == "als"
    assert set(manifest["stage_seconds"]) == {"split", "popular", "als"}
    assert manifest["split"] == io.read_json(folders["spark"] / "work" / "split.json")
    settings = _settings(folders["data"], folders["spark"])
    recs = pq.read_table(folders["spark"] / io.RECOMMENDATIONS).to_pandas()
    user = int(recs[C.user].iloc[0])
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        answer = client.get(f"/recommendations/{user}", params={"k": 10}).json()
        assert answer == recs[recs[C.user] == user][C.track].tolist()[:10]
        similar = client.get("/similar/5", params={"track_id": int(recs[C.track].iloc[0])})
        assert similar.status_code == 200 and len(similar.json()) == 5
    sim = pq.read_table(folders["spark"] / io.SIMILAR).to_pandas()
    assert not (sim[C.track] == sim[C.similar]).any()
    assert np.allclose(sim[sim[C.rank] == 1][C.score], 1.0)


def test_the_command_line_selects_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`run --engine spark` and `prepare --engine spark` reach the Spark engine (which is
    replaced here: the module's fixtures run the real one)."""
    import musicrec.spark_engine as engine
    from musicrec.cli import main

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(engine, "run_spark", lambda s: calls.append(("run", s.engine)))
    monkeypatch.setattr(engine, "spark_session", lambda s: None)
    monkeypatch.setattr(
        engine,
        "prepare_spark",
        lambda spark, data, out, s: (
            calls.append(("prepare", s.engine)) or {"tracks": 0, "events": 0, "users": 0}
        ),
    )
    assert main(["run", "--engine", "spark", "--parquet-dir", str(tmp_path)]) == 0
    assert main(["prepare", "--engine", "spark", "--parquet-dir", str(tmp_path)]) == 0
    monkeypatch.setenv("MUSICREC_ENGINE", "spark")
    assert main(["run", "--parquet-dir", str(tmp_path)]) == 0
    assert calls == [("run", "spark"), ("prepare", "spark"), ("run", "spark")]
