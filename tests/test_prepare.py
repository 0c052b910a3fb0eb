"""Preparation: items and events from the input files; every bad input named, nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musicrec import io
from musicrec.errors import DataError
from musicrec.prepare import build_items, prepare_files


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
    assert list(events.columns) == ["user_id", "track_id", "day"]
    assert [str(t) for t in events.dtypes] == ["int32", "int32", "int16"]
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
    "date out of range": (
        lambda f: f.assign(
            started_at=f["started_at"].where(f.index > 0, pd.Timestamp("1970-01-02"))
        ),
        "outside the plausible range",
    ),
    "future date": (
        lambda f: f.assign(
            started_at=f["started_at"].where(f.index > 0, pd.Timestamp("2200-01-01"))
        ),
        "outside the plausible range",
    ),
    "repeated pair": (_dup_first, "repeated (user_id, track_id) pairs"),
    "unknown track": (
        lambda f: f.assign(track_id=f["track_id"].where(f.index > 0, 1)),
        "name tracks missing from tracks.parquet",
    ),
    "negative id": (
        lambda f: f.assign(user_id=f["user_id"].where(f.index > 0, -5)),
        "negative ids",
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
    _break_interactions(data, _dup_first)
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
