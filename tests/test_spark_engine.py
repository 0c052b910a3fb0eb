"""The Spark engine in local mode on the tiny preset: the same prepared files as the in-process
``prepare``, the same split and top popular as the in-process code, ALS lists scored over user
partitions that leave heard tracks out, a folder the service starts on and serves fold-in
from, and a run published all or nothing.

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

from musicrec import io, online, runs, served
from musicrec.columns import Columns as C
from musicrec.listens import build_listens
from musicrec.pipeline import _popular_table
from musicrec.prepare import prepare_files
from musicrec.settings import Settings
from musicrec.sources import AlsSource, PopularSource, TrainData
from musicrec.split import SplitDates, split_dates

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
    assert set(manifest["stage_seconds"]) == {"split", "popular", "als", "fold_in"}
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


def _fold_in_model(folder: Path) -> online.FoldInModel:
    manifest = io.read_json(folder / io.MANIFEST)
    assert served.verify_files(folder, manifest)  # sizes and CRC-32 of every served file
    arrays, _, _ = served.open_served(folder, manifest)
    factors = served.factor_arrays(arrays)
    assert factors is not None, "no fold-in files"
    return online.model_from_arrays(factors)


def test_the_fold_in_files_are_published_with_checksums(folders: dict[str, Path]) -> None:
    folder = folders["spark"]
    artefacts = io.read_json(folder / io.MANIFEST)["artefacts"]
    for name in served.ALS_NAMES:
        assert (folder / name).exists(), name
        assert artefacts[name]["crc32"] == served.file_crc32(folder / name), name
    model = _fold_in_model(folder)
    events = io.read_events(folders["local"] / io.EVENTS)
    assert model.user_ids.tolist() == sorted(set(events[C.user]))
    assert sorted(model.track_ids.tolist()) == sorted(set(events[C.track]))
    heard = events.groupby(C.user)[C.track].apply(set)
    for position, user in enumerate(model.user_ids.tolist()):  # the rows each user heard
        assert set(model.track_ids[model.heard_of(position)].tolist()) == heard[user], user
    y = np.asarray(model.item_factors, dtype=np.float64)
    np.testing.assert_allclose(model.gram, y.T @ y, rtol=1e-6)


def test_fold_in_solves_the_spark_users_as_spark_did(
    spark: object, folders: dict[str, Path]
) -> None:
    """The served item factors, gram, heard rows and alpha reproduce Spark's own user vectors
    with the regularization Spark applied (regParam x the user's tracks, ALS-WR); the served
    scalar is that of the median user (``served_regularization``)."""
    from musicrec.spark_engine import (
        _granularity,
        day_counts,
        read_log,
        strength_matrix,
        window_days,
    )

    folder = folders["spark"]
    settings = _settings(folders["data"], folder)
    model = _fold_in_model(folder)
    fold = io.read_json(folder / io.MANIFEST)["engine"]["fold_in"]
    params = AlsSource.space(settings)[1]
    assert fold["reg_param"] == params["regularization"] and model.alpha == params["alpha"]
    lengths = np.diff(np.asarray(model.heard_offsets))
    assert model.regularization == pytest.approx(params["regularization"] * np.median(lengths))
    dates = SplitDates.from_dict(io.read_json(folder / "work" / "split.json"))
    events = read_log(spark, folder)  # type: ignore[arg-type]
    days = day_counts(events).index.to_numpy()
    cutoff = dates.last_day + 1
    half_life = window_days(params["half_life"], dates.first_day, cutoff, _granularity(days))
    strengths = strength_matrix(events, cutoff, half_life).toPandas()
    for position in (0, 7, len(model.user_ids) // 2, len(model.user_ids) - 1):
        mine = strengths[strengths[C.user] == int(model.user_ids[position])]
        rows = model.rows_of(mine[C.track].to_numpy())
        confidence = 1.0 + model.alpha * mine["strength"].to_numpy()
        spark_reg = params["regularization"] * len(mine)
        vector, _ = online.fold_in(model.item_factors, model.gram, spark_reg, rows, confidence)
        np.testing.assert_allclose(vector, model.user_factors[position], rtol=1e-4, atol=1e-6)


def test_an_online_user_of_the_spark_folder_gets_fold_in(folders: dict[str, Path]) -> None:
    from recommendation_service import Recommendations

    folder = folders["spark"]
    service = Recommendations(_settings(folders["data"], folder))
    service.load(folder)
    events = io.read_events(folders["local"] / io.EVENTS)
    recs = pq.read_table(folder / io.RECOMMENDATIONS).to_pandas()
    user = int(recs[C.user].iloc[0])
    offline = recs[recs[C.user] == user][C.track].tolist()
    history = offline[:3]  # online events: tracks the offline list proposed
    answer = service.recommend(user, 10, history=history)
    assert answer.kinds == ("fold-in",)
    assert len(answer.tracks) == 10
    heard = set(events[events[C.user] == user][C.track]) | set(history)
    assert not heard & set(answer.tracks)  # nothing heard offline or online
    new_user = int(events[C.user].max()) + 1  # not in the log: fold-in from the events alone
    answer = service.recommend(new_user, 10, history=history)
    assert answer.kinds == ("fold-in",) and not set(history) & set(answer.tracks)
    assert len(answer.tracks) == 10


def test_the_spark_run_is_archived(folders: dict[str, Path]) -> None:
    folder = folders["spark"]
    manifest = io.read_json(folder / io.MANIFEST)
    assert runs.current_run(folder) == manifest["run_id"]
    kept = folder / runs.RUNS_DIR / manifest["run_id"]
    assert (kept / io.MANIFEST).read_bytes() == (folder / io.MANIFEST).read_bytes()
    for name in (io.RECOMMENDATIONS, *served.ALS_NAMES):
        assert (kept / name).samefile(folder / name), name  # hard links of the published files
    assert not list(folder.glob(".staging-*"))
    assert manifest["code"]["package_version"] and manifest["input"][io.EVENTS]["sha256"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith("history.db")
    }


def test_a_failed_spark_run_leaves_the_previous_set(
    spark: object, folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run failing in its ALS step (split and top popular already made, from a log that
    changed since the last run) changes no file of the folder, manifest and work files
    included, and leaves no staging folder."""
    import pyarrow.compute as pc

    import musicrec.spark_engine as engine

    folder = tmp_path / "parquet"
    shutil.copytree(folders["spark"], folder, symlinks=True)
    events = pq.read_table(folder / io.EVENTS)
    io.write_table(
        events.filter(pc.not_equal(pc.bit_wise_and(events[C.user], 3), 0)), folder / io.EVENTS
    )
    before = _snapshot(folder)
    assert io.MANIFEST in before and served.ALS_NAMES[0] in before

    def fail(*args: object, **kwargs: object) -> None:
        (staged,) = folder.glob(f".staging-*/{io.TOP_POPULAR}")  # made from the new log
        assert staged.read_bytes() != before[io.TOP_POPULAR]
        assert list(folder.glob(".staging-*/work/split.json"))
        raise RuntimeError("ALS failed")

    monkeypatch.setattr(engine, "fit_als", fail)
    with pytest.raises(RuntimeError, match="ALS failed"):
        engine.run_spark(_settings(folders["data"], folder), spark)  # type: ignore[arg-type]
    assert _snapshot(folder) == before
    assert not list(folder.glob(".staging-*"))
    assert runs.current_run(folder) == io.read_json(folder / io.MANIFEST)["run_id"]
