"""Preparation: items and events from the input files; every bad input named, nothing written."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from musicrec import io, prepare
from musicrec.errors import DataError
from musicrec.prepare import build_items, prepare_files
from musicrec.settings import Settings


def test_items_join_names_and_handle_missing_ones() -> None:
    tracks = pa.table(
        {
            "track_id": pa.array([10, 20], pa.int64()),
            "albums": pa.array([[1], []], pa.list_(pa.int64())),
            "artists": pa.array([[5, 6], []], pa.list_(pa.int64())),
            "genres": pa.array([[7], [7, 99]], pa.list_(pa.int64())),
        }
    )
    catalog = pa.table(
        {
            "id": pa.array([10, 20, 1, 5, 6, 7, 5], pa.int64()),
            "type": ["track", "track", "album", "artist", "artist", "genre", "genre"],
            "name": ["Song A", "Song B", "Album One", "Ann", "Bob", "rock", "not artist 5"],
        }
    )
    items = build_items(tracks, catalog).to_pylist()
    assert items[0] == {
        "track_id": 10,
        "name": "Song A",
        "album_ids": [1],
        "albums": ["Album One"],
        "artist_ids": [5, 6],
        "artists": ["Ann", "Bob"],
        "genre_ids": [7],
        "genres": ["rock"],
    }
    # an id is unique only within its type: genre 5 does not name artist 5;
    # genre 99 is missing from the catalogue and gets a readable stand-in
    assert items[1]["artists"] == [] and items[1]["albums"] == []
    assert items[1]["genres"] == ["rock", "genre 99"]


def test_prepare_tiny(tiny_data: Path, tiny_prepared: Path) -> None:
    items = pq.read_table(tiny_prepared / io.ITEMS)
    events = pq.read_table(tiny_prepared / io.EVENTS)
    raw = pq.read_table(tiny_data / io.INTERACTIONS)
    assert items.num_rows == pq.read_metadata(tiny_data / io.TRACKS).num_rows
    assert events.schema.remove_metadata() == io.EVENTS_SCHEMA
    assert events.num_rows == raw.num_rows
    frame = events.to_pandas()
    assert frame["user_id"].is_monotonic_increasing
    assert (frame.groupby("user_id")["track_seq"].diff().dropna() > 0).all()
    # same events, same dates
    raw_frame = raw.to_pandas()
    assert (
        frame["started_at"].astype("datetime64[ns]").to_numpy()
        == raw_frame["started_at"].to_numpy()
    ).all()
    assert pa.types.is_list(items.schema.field("genres").type)


def test_read_events_compact(tiny_prepared: Path) -> None:
    events = io.read_events(tiny_prepared / io.EVENTS)
    # the generated log has no repeats: no column of ones is loaded
    assert list(events.columns) == ["user_id", "track_id", "day"]
    assert [str(t) for t in events.dtypes] == ["int32", "int32", "int16"]
    assert (
        pq.read_table(tiny_prepared / io.EVENTS, columns=["plays"]).column(0).to_numpy() == 1
    ).all()
    assert io.day_to_date(int(events["day"].min())) >= np.datetime64("2022-01-01")


def test_unsorted_input_is_sorted(tiny_data: Path, tmp_path: Path) -> None:
    data = _copy(tiny_data, tmp_path / "data")
    table = pq.read_table(data / io.INTERACTIONS)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    pq.write_table(shuffled, data / io.INTERACTIONS)
    prepare_files(data, tmp_path / "out")
    frame = pq.read_table(tmp_path / "out" / io.EVENTS).to_pandas()
    assert frame["user_id"].is_monotonic_increasing
    assert len(frame) == table.num_rows


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _break_interactions(data: Path, change) -> None:
    frame = pq.read_table(data / io.INTERACTIONS).to_pandas()
    frame = change(frame)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), data / io.INTERACTIONS)


def _dup_first(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([frame, frame.iloc[[0]]], ignore_index=True)


BAD_INTERACTIONS = {
    "missing column": (lambda f: f.drop(columns=["track_seq"]), "column 'track_seq' is missing"),
    "mistyped column": (
        lambda f: f.assign(started_at=f["started_at"].astype(str)),
        "column 'started_at' has type",
    ),
    "empty file": (lambda f: f.iloc[:0], "has no rows"),
    "date the pipeline cannot hold": (
        lambda f: f.assign(
            started_at=f["started_at"].where(f.index > 0, pd.Timestamp("2200-01-01"))
        ),
        "the pipeline handles dates from",
    ),
    "id too large for int32": (
        lambda f: f.assign(user_id=f["user_id"].astype("int64").where(f.index > 0, 2**31)),
        "column 'user_id' has values that do not fit int32, e.g. 2147483648",
    ),
    "float ids": (
        lambda f: f.assign(track_id=f["track_id"].astype("float64")),
        "column 'track_id' has type double, expected an integer type",
    ),
    "null id": (
        lambda f: f.assign(user_id=f["user_id"].astype("float").where(f.index > 1).astype("Int32")),
        "column 'user_id' has 2 empty (null) values",
    ),
    "track_seq beyond int16": (
        lambda f: f.assign(track_seq=f["track_seq"].astype("int32").where(f.index > 0, 40_000)),
        "column 'track_seq' has values that do not fit int16, e.g. 40000",
    ),
    "unknown track": (
        lambda f: f.assign(track_id=f["track_id"].where(f.index > 0, 1)),
        "name tracks missing from tracks.parquet",
    ),
    "negative id": (
        lambda f: f.assign(user_id=f["user_id"].where(f.index > 0, -5)),
        "column 'user_id' has negative ids, e.g. -5",
    ),
    "null value": (
        lambda f: f.assign(
            track_seq=f["track_seq"].astype("float").where(f.index > 0).astype("Int16")
        ),
        "empty (null) values",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INTERACTIONS))
def test_bad_interactions_are_named_and_nothing_is_written(
    case: str, tiny_data: Path, tmp_path: Path
) -> None:
    change, message = BAD_INTERACTIONS[case]
    data = _copy(tiny_data, tmp_path / "data")
    _break_interactions(data, change)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="interactions.parquet") as error:
        prepare_files(data, out)
    assert message in str(error.value)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"


def test_missing_file_is_named(tiny_data: Path, tmp_path: Path) -> None:
    data = _copy(tiny_data, tmp_path / "data")
    (data / io.CATALOG_NAMES).unlink()
    with pytest.raises(DataError, match=r"catalog_names.parquet: file not found"):
        prepare_files(data, tmp_path / "out")


def test_corrupt_file_is_named(tiny_data: Path, tmp_path: Path) -> None:
    data = _copy(tiny_data, tmp_path / "data")
    (data / io.TRACKS).write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"tracks.parquet: not a readable parquet file"):
        prepare_files(data, tmp_path / "out")


def test_failed_run_keeps_previous_artefacts(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_files(tiny_data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data = _copy(tiny_data, tmp_path / "data")
    _break_interactions(data, lambda f: f.assign(user_id=f["user_id"].where(f.index > 0, -1)))
    with pytest.raises(DataError):
        prepare_files(data, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "musicrec",
            "prepare",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--parquet-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "tracks.parquet: file not found" in result.stderr
    assert "Traceback" not in result.stderr


# --- accepted variants of the input (small hand-built files) -----------------------------------


def _tracks(**columns: pa.Array) -> pa.Table:
    base = {
        "track_id": pa.array([10, 20, 30], pa.int64()),
        "albums": pa.array([[1], [1], [2]], pa.list_(pa.int64())),
        "artists": pa.array([[5], [6], []], pa.list_(pa.int64())),
        "genres": pa.array([[7], [7, 8], [8]], pa.list_(pa.int64())),
    }
    return pa.table({**base, **columns})


def _catalog(**columns: pa.Array) -> pa.Table:
    base = {
        "id": pa.array([10, 20, 30, 1, 2, 5, 6, 7, 8], pa.int64()),
        "type": ["track"] * 3 + ["album"] * 2 + ["artist"] * 2 + ["genre"] * 2,
        "name": ["A", "B", "C", "Album 1", "Album 2", "Ann", "Bob", "rock", "jazz"],
    }
    return pa.table({**base, **columns})


def _interactions(**columns: pa.Array) -> pa.Table:
    days = ["2022-03-01", "2022-03-02", "2022-03-05", "2022-04-01", "2022-04-02"]
    base = {
        "user_id": pa.array([1, 1, 1, 2, 2], pa.int32()),
        "track_id": pa.array([10, 20, 30, 10, 30], pa.int32()),
        "track_seq": pa.array([1, 2, 3, 1, 2], pa.int16()),
        "started_at": pa.array(pd.to_datetime(days).to_numpy(), pa.timestamp("ns")),
    }
    return pa.table({**base, **columns})


def _write_inputs(
    folder: Path,
    tracks: pa.Table | None = None,
    catalog: pa.Table | None = None,
    interactions: pa.Table | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(tracks if tracks is not None else _tracks(), folder / io.TRACKS)
    pq.write_table(catalog if catalog is not None else _catalog(), folder / io.CATALOG_NAMES)
    pq.write_table(
        interactions if interactions is not None else _interactions(), folder / io.INTERACTIONS
    )
    return folder


def _prepare(tmp_path: Path, settings: Settings | None = None, **inputs: pa.Table) -> Path:
    data = _write_inputs(tmp_path / "data", **inputs)
    out = tmp_path / "out"
    prepare_files(data, out, settings)
    events = pq.read_table(out / io.EVENTS)
    assert events.schema.remove_metadata() == io.EVENTS_SCHEMA
    return out


def _items(out: Path) -> list[dict]:
    return pq.read_table(out / io.ITEMS).to_pylist()


def _events(out: Path) -> pd.DataFrame:
    return pq.read_table(out / io.EVENTS).to_pandas()


def test_list_null_column_is_empty_lists(tmp_path: Path) -> None:
    # an all-empty list column is written as list<null> by most writers
    albums = pa.array([[], [], []], pa.list_(pa.null()))
    out = _prepare(tmp_path, tracks=_tracks(albums=albums))
    items = pq.read_table(out / io.ITEMS)
    assert items.schema.field("album_ids").type == pa.list_(pa.int64())
    assert items.column("album_ids").to_pylist() == [[], [], []]
    assert items.column("albums").to_pylist() == [[], [], []]


def test_large_list_and_fixed_size_list_columns(tmp_path: Path) -> None:
    tracks = _tracks(
        artists=pa.array([[5], [6, 5], []], pa.large_list(pa.uint32())),
        albums=pa.array([[1], [1], [2]], pa.list_(pa.int16(), 1)),
    )
    out = _prepare(tmp_path, tracks=tracks)
    items = pq.read_table(out / io.ITEMS)
    assert items.schema.field("artist_ids").type == pa.list_(pa.int64())
    assert items.column("artists").to_pylist() == [["Ann"], ["Bob", "Ann"], []]
    assert items.column("albums").to_pylist() == [["Album 1"], ["Album 1"], ["Album 2"]]


@pytest.mark.parametrize("string_type", [pa.large_string(), pa.dictionary(pa.int8(), pa.string())])
def test_large_string_and_dictionary_names(tmp_path: Path, string_type: pa.DataType) -> None:
    catalog = _catalog()
    catalog = catalog.set_column(1, "type", catalog.column("type").cast(string_type))
    catalog = catalog.set_column(2, "name", catalog.column("name").cast(string_type))
    out = _prepare(tmp_path, catalog=catalog)
    items = _items(out)
    assert [row["name"] for row in items] == ["A", "B", "C"]
    assert items[1]["genres"] == ["rock", "jazz"]


def test_narrow_wide_and_unsigned_integer_ids(tmp_path: Path) -> None:
    out = _prepare(
        tmp_path,
        tracks=_tracks(track_id=pa.array([10, 20, 30], pa.uint64())),
        catalog=_catalog(id=pa.array([10, 20, 30, 1, 2, 5, 6, 7, 8], pa.uint16())),
        interactions=_interactions(
            user_id=pa.array([1, 1, 1, 2, 2], pa.uint8()),
            track_id=pa.array([10, 20, 30, 10, 30], pa.int64()),
            track_seq=pa.array([1, 2, 3, 1, 2], pa.int64()),
        ),
    )
    events = _events(out)
    assert events["user_id"].tolist() == [1, 1, 1, 2, 2]
    assert events["track_id"].tolist() == [10, 20, 30, 10, 30]
    assert events["track_seq"].tolist() == [1, 2, 3, 1, 2]
    assert [row["name"] for row in _items(out)] == ["A", "B", "C"]


@pytest.mark.parametrize(
    "started_at",
    [
        # 21:30 UTC is already the next day in Moscow: the local date counts
        pa.array(
            pd.to_datetime(
                [
                    "2022-02-28 21:30",
                    "2022-03-02 00:00",
                    "2022-03-05 08:00",
                    "2022-04-01 00:00",
                    "2022-04-02 20:00",
                ]
            ).to_numpy(),
            pa.timestamp("ms"),
        ).cast(pa.timestamp("ms", tz="Europe/Moscow")),
        pa.array(
            pd.to_datetime(
                [
                    "2022-03-01 23:59",
                    "2022-03-02 00:00",
                    "2022-03-05 00:00",
                    "2022-04-01 00:00",
                    "2022-04-02 12:00",
                ]
            ).to_numpy(),
            pa.timestamp("s"),
        ),
        pa.array(
            [
                date(2022, 3, 1),
                date(2022, 3, 2),
                date(2022, 3, 5),
                date(2022, 4, 1),
                date(2022, 4, 2),
            ],
            pa.date32(),
        ).cast(pa.date64()),
    ],
    ids=["timestamp-ms-tz", "timestamp-s", "date64"],
)
def test_timestamps_of_any_unit_and_zone_and_dates(tmp_path: Path, started_at: pa.Array) -> None:
    out = _prepare(tmp_path, interactions=_interactions(started_at=started_at))
    days = pq.read_table(out / io.EVENTS).column("started_at").to_pylist()
    assert days == [
        date(2022, 3, 1),
        date(2022, 3, 2),
        date(2022, 3, 5),
        date(2022, 4, 1),
        date(2022, 4, 2),
    ]


def _dated(*days: str) -> pa.Table:
    return _interactions(
        started_at=pa.array(pd.to_datetime(list(days)).to_numpy(), pa.timestamp("ns"))
    )


def test_old_and_future_dates_are_kept_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    interactions = _dated("1995-06-01", "1985-01-01", "1987-05-05", "2022-04-01", "2050-01-01")
    with caplog.at_level(logging.WARNING, logger="musicrec.prepare"):
        out = _prepare(tmp_path, interactions=interactions)
    assert len(_events(out)) == 5
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "3 events have started_at outside the plausible range 1990-01-01" in warning
    assert "from 1985-01-01 to 2050-01-01" in warning and "kept them" in warning


def test_dates_after_1990_and_before_today_raise_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="musicrec.prepare"):
        out = _prepare(tmp_path, interactions=_dated(*["1995-06-01"] * 3, *["2022-04-01"] * 2))
    assert len(_events(out)) == 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_drop_implausible_dates_drops_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    interactions = _dated("2019-12-31", "2022-03-02", "2022-03-05", "1999-01-01", "2100-01-01")
    settings = Settings(min_plausible_date=date(2020, 1, 1), drop_implausible_dates=True)
    with caplog.at_level(logging.WARNING, logger="musicrec.prepare"):
        out = _prepare(tmp_path, settings, interactions=interactions)
    events = _events(out)
    assert events["track_seq"].tolist() == [2, 3]
    assert "3 events have started_at outside the plausible range 2020-01-01" in caplog.text
    assert "dropped them" in caplog.text


def test_same_day_repeats_are_merged_with_plays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    day = pd.Timestamp("2022-03-01")
    interactions = pa.table(
        {
            "user_id": pa.array([2, 1, 1, 1, 1, 2], pa.int32()),
            "track_id": pa.array([30, 10, 20, 10, 10, 30], pa.int32()),
            "track_seq": pa.array([2, 1, 2, 3, 4, 1], pa.int16()),
            "started_at": pa.array([day] * 6, pa.timestamp("ns")),
        }
    )
    with caplog.at_level(logging.INFO, logger="musicrec.prepare"):
        out = _prepare(tmp_path, interactions=interactions)
    events = _events(out)
    assert events[["user_id", "track_id", "track_seq", "plays"]].values.tolist() == [
        [1, 10, 1, 3],
        [1, 20, 2, 1],
        [2, 30, 1, 2],
    ]
    assert "merged 3 rows" in caplog.text
    frame = io.read_events(out / io.EVENTS)
    assert frame["plays"].tolist() == [3, 1, 2] and str(frame["plays"].dtype) == "int32"


def test_repeats_on_different_days_stay_separate(tmp_path: Path) -> None:
    interactions = _interactions(
        track_id=pa.array([10, 10, 10, 30, 30], pa.int32()),
        started_at=pa.array(
            pd.to_datetime(
                ["2022-03-01", "2022-03-02", "2022-03-02", "2022-04-01", "2022-04-02"]
            ).to_numpy(),
            pa.timestamp("ns"),
        ),
    )
    events = _events(_prepare(tmp_path, interactions=interactions))
    assert events[["user_id", "track_id", "track_seq", "plays"]].values.tolist() == [
        [1, 10, 1, 1],
        [1, 10, 2, 2],
        [2, 30, 1, 1],
        [2, 30, 2, 1],
    ]


@pytest.mark.parametrize(
    ("block_rows", "wide"),
    [(None, False), (3, False), (None, True)],
    ids=["one block", "many blocks", "ids too wide for a packed key"],
)
def test_merge_matches_a_groupby_on_random_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_rows: int | None, wide: bool
) -> None:
    """Shuffled input with many repeats, in one block and in many small ones (the blocks
    after the first merge are shifted down in place, with or without repeats of their own),
    and with ids so far apart that the sort falls back from a packed key to lexsort."""
    if block_rows:
        monkeypatch.setattr(prepare, "BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(3)
    n = 400
    # even users repeat a lot; odd users have one event each (blocks with nothing to merge)
    user = np.concatenate([rng.integers(0, 25, n - 25) * 2, np.arange(25) * 2 + 1])
    track_ids = np.array([10, 20, 30]) + (2_000_000_000 if wide else 0)
    frame = pd.DataFrame(
        {
            "user_id": (user * (2**25 if wide else 1)).astype(np.int32),
            "track_id": rng.choice(track_ids, n).astype(np.int32),
            "track_seq": np.zeros(n, np.int16),
            "started_at": pd.Timestamp("2022-03-01")
            + pd.to_timedelta(rng.integers(0, 5, n), unit="D"),
        }
    )
    frame["track_seq"] = (frame.groupby("user_id").cumcount() + 1).astype(np.int16)
    frame = frame.sample(frac=1, random_state=1)  # unsorted input
    interactions = pa.Table.from_pandas(frame, preserve_index=False)
    tracks = _tracks(track_id=pa.array(track_ids, pa.int64()))
    catalog = _catalog(id=pa.array([*track_ids, 1, 2, 5, 6, 7, 8], pa.int64()))
    out = _prepare(tmp_path, interactions=interactions, tracks=tracks, catalog=catalog)
    events = _events(out)
    expected = (
        frame.groupby(["user_id", "track_id", "started_at"], as_index=False)
        .agg(track_seq=("track_seq", "min"), plays=("track_seq", "size"))
        .sort_values(["user_id", "track_seq"], ignore_index=True)
    )
    assert events["plays"].sum() == n and events["plays"].max() > 1
    for column in ("user_id", "track_id", "track_seq", "plays"):
        assert events[column].tolist() == expected[column].tolist(), column
    assert (events["started_at"].astype("datetime64[ns]") == expected["started_at"]).all()


def test_repeated_first_row_of_tiny_is_merged(tiny_data: Path, tmp_path: Path) -> None:
    data = _copy(tiny_data, tmp_path / "data")
    _break_interactions(data, _dup_first)
    prepare_files(data, tmp_path / "out")
    events = pq.read_table(tmp_path / "out" / io.EVENTS)
    assert events.num_rows == pq.read_metadata(tiny_data / io.INTERACTIONS).num_rows
    assert pc.sum(events.column("plays")).as_py() == events.num_rows + 1


def test_read_events_without_plays(tmp_path: Path) -> None:
    """An events.parquet written before ``plays`` existed (or built by hand) still loads;
    one with repeats merged brings its plays along."""
    old = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int32()),
            "track_id": pa.array([10, 20], pa.int32()),
            "track_seq": pa.array([1, 1], pa.int16()),
            "started_at": pa.array([date(2022, 1, 1), date(2022, 1, 2)], pa.date32()),
        }
    )
    pq.write_table(old, tmp_path / io.EVENTS)
    events = io.read_events(tmp_path / io.EVENTS)
    assert list(events.columns) == ["user_id", "track_id", "day"]
    pq.write_table(old.append_column("plays", pa.array([1, 3], pa.int32())), tmp_path / io.EVENTS)
    events = io.read_events(tmp_path / io.EVENTS)
    assert events["plays"].tolist() == [1, 3] and str(events["plays"].dtype) == "int32"


@pytest.mark.parametrize("top_id", [5_000, 2**31 - 1], ids=["bitmap", "sparse ids"])
def test_events_of_unknown_tracks_are_refused(tmp_path: Path, top_id: int) -> None:
    """Both ways of checking the track ids: a bitmap of the known ids, or a binary search
    when the ids are too sparse for a bitmap."""
    tracks = _tracks(track_id=pa.array([10, 20, top_id], pa.int64()))
    catalog = _catalog(id=pa.array([10, 20, top_id, 1, 2, 5, 6, 7, 8], pa.int64()))
    known = _interactions(track_id=pa.array([10, 20, top_id, 10, top_id], pa.int32()))
    assert (
        len(_events(_prepare(tmp_path / "ok", tracks=tracks, catalog=catalog, interactions=known)))
        == 5
    )
    unknown = _interactions(track_id=pa.array([10, 15, top_id, 999, top_id - 1], pa.int32()))
    data = _write_inputs(tmp_path / "bad", tracks=tracks, catalog=catalog, interactions=unknown)
    with pytest.raises(
        DataError,
        match=rf"3 events name tracks missing from tracks.parquet, "
        rf"e.g. \[15, 999, {top_id - 1}\]",
    ):
        prepare_files(data, tmp_path / "bad_out")


# --- really wrong data is still refused, naming file and column ---------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"tracks": _tracks(track_id=pa.array([10, 20, 2**31], pa.int64()))},
            r"tracks.parquet: column 'track_id' has values that do not fit int32, e.g. 2147483648",
        ),
        (
            {"tracks": _tracks(genres=pa.array([[7], [2**63], [8]], pa.list_(pa.uint64())))},
            r"tracks.parquet: column 'genres' has values that do not fit int64",
        ),
        (
            {"tracks": _tracks(artists=pa.array([[5.0], [6.0], []], pa.list_(pa.float64())))},
            r"tracks.parquet: column 'artists' has type list<.*double>, expected a list of int",
        ),
        (
            {"catalog": _catalog().drop_columns(["name"])},
            r"catalog_names.parquet: column 'name' is missing",
        ),
        (
            {"interactions": _interactions().drop_columns(["user_id"])},
            r"interactions.parquet: column 'user_id' is missing",
        ),
        (
            {"interactions": _interactions(track_id=pa.array([10, 20, 30, 10, None], pa.int32()))},
            r"interactions.parquet: column 'track_id' has 1 empty \(null\) values",
        ),
        (
            {"interactions": _interactions(started_at=pa.array([None] * 5, pa.timestamp("ns")))},
            r"interactions.parquet: column 'started_at' has 5 empty \(null\) values",
        ),
        (
            {
                "interactions": _interactions(
                    track_id=pa.array([10, 20, 3_000_000_000, 10, 30], pa.uint32())
                )
            },
            r"interactions.parquet: column 'track_id' has values that do not fit int32, "
            r"e.g. 3000000000",
        ),
    ],
    ids=[
        "track id too large",
        "list value too large",
        "float list",
        "missing name column",
        "missing user column",
        "null track id",
        "null dates",
        "uint32 id too large",
    ],
)
def test_really_wrong_data_is_refused(tmp_path: Path, inputs: dict, message: str) -> None:
    data = _write_inputs(tmp_path / "data", **inputs)
    with pytest.raises(DataError, match=message):
        prepare_files(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shown", [True, False])
def test_prepare_counts_its_steps_unless_silenced(
    tiny_data: Path, tmp_path: Path, shown: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="musicrec.progress")
    prepare_files(tiny_data, tmp_path / "parquet", Settings(progress=shown))
    steps = [r for r in caplog.records if r.getMessage().startswith("prepare ")]
    assert [r.getMessage().split(":")[0] for r in steps] == [
        "prepare 1/3",
        "prepare 2/3",
        "prepare 3/3",
    ]
    assert {r.levelno for r in steps} == {logging.INFO if shown else logging.DEBUG}
