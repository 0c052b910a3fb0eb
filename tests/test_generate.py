"""The generator: exact schema, determinism, quirks, shape and learnable tastes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from musicrec import io
from musicrec.checkdata import check_data
from musicrec.generate import generate

EXPECTED_SCHEMAS = {
    io.TRACKS: pa.schema(
        [
            ("track_id", pa.int64()),
            ("albums", pa.list_(pa.int64())),
            ("artists", pa.list_(pa.int64())),
            ("genres", pa.list_(pa.int64())),
        ]
    ),
    io.CATALOG_NAMES: pa.schema([("id", pa.int64()), ("type", pa.string()), ("name", pa.string())]),
    io.INTERACTIONS: pa.schema(
        [
            ("user_id", pa.int32()),
            ("track_id", pa.int32()),
            ("track_seq", pa.int16()),
            ("started_at", pa.timestamp("ns")),
        ]
    ),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate("small", out, seed=42)
    return out


def test_exact_schema(tiny_data: Path) -> None:
    for name, schema in EXPECTED_SCHEMAS.items():
        assert pq.read_schema(tiny_data / name).remove_metadata() == schema, name


def test_same_seed_same_files_other_seed_other_files(tiny_data: Path, tmp_path: Path) -> None:
    generate("tiny", tmp_path / "again", seed=7)
    generate("tiny", tmp_path / "other", seed=8)
    for name in io.INPUT_FILES:
        first = pq.read_table(tiny_data / name)
        assert first.equals(pq.read_table(tmp_path / "again" / name)), name
    assert not pq.read_table(tiny_data / io.INTERACTIONS).equals(
        pq.read_table(tmp_path / "other" / io.INTERACTIONS)
    )


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        generate("huge", tmp_path)


def test_quirks_of_the_real_data(tiny_data: Path) -> None:
    tracks = pq.read_table(tiny_data / io.TRACKS)
    catalog = pq.read_table(tiny_data / io.CATALOG_NAMES).to_pandas()
    for column in ("albums", "artists", "genres"):
        lengths = pc.list_value_length(tracks.column(column)).to_numpy()
        assert (lengths == 0).sum() >= 1, f"no track with an empty {column} list"
    ids = tracks.column("track_id").to_numpy()
    assert ids.min() == 26 and len(np.unique(ids)) == len(ids)
    assert (np.diff(np.sort(ids)) > 1).mean() > 0.9, "track ids should be sparse"
    genre_names = set(catalog.loc[catalog["type"] == "genre", "id"])
    used = set(pc.list_flatten(tracks.column("genres")).to_pylist())
    assert len(used - genre_names) >= 1, "some genre ids must be missing from the catalogue"
    assert set(catalog["type"]) == {"track", "album", "artist", "genre"}
    assert catalog["name"].notna().all() and (catalog["name"].str.len() > 0).all()


def test_events_are_unique_ordered_and_date_only(tiny_data: Path) -> None:
    events = pq.read_table(tiny_data / io.INTERACTIONS).to_pandas()
    assert not events.duplicated(["user_id", "track_id"]).any()
    # track_seq is the rank of the event within the user, in date order
    expected_seq = events.groupby("user_id").cumcount() + 1
    assert (events["track_seq"].to_numpy() == expected_seq.to_numpy()).all()
    assert events.groupby("user_id")["started_at"].is_monotonic_increasing.all()
    assert (events["started_at"] == events["started_at"].dt.normalize()).all()
    assert events["started_at"].min() >= pd.Timestamp("2022-01-01")
    assert events["started_at"].max() <= pd.Timestamp("2022-12-31")
    tracks = pq.read_table(tiny_data / io.TRACKS).column("track_id").to_numpy()
    assert set(events["track_id"]) == set(tracks), "every track is listened to at least once"


def test_small_shape_close_to_the_real_data(small_data: Path) -> None:
    figures = check_data(small_data)
    assert figures["users"] == 20_000 and figures["tracks"] == 30_000
    assert 1.5e6 < figures["events"] < 3.5e6
    # heavy tail: the real mean is about three times the median
    assert 2.3 < figures["events per user, mean / median"] < 3.8
    # monthly growth: real November is 14.4x January, December 0.92x November
    assert 9 < figures["busiest month / first month"] < 22
    assert 0.8 < figures["last month / busiest month"] <= 1.0
    assert 0.04 < figures["share of events in the last 16 days"] < 0.10
    assert 0.45 < figures["users of the last 16 days"] / figures["users"] < 0.70
    assert figures["repeated (user, track) pairs"] == 0
    assert figures["tracks nobody listened to"] == 0
    # long tail: a few tracks reach many users, many tracks very few
    assert figures["top track's share of users"] > 0.05
    assert figures["share of tracks with < 10 listeners"] > 0.2


def test_users_have_tastes_beyond_popularity(small_data: Path) -> None:
    """A user's listening is concentrated on a few genres far more than chance would give."""
    events = pq.read_table(small_data / io.INTERACTIONS, columns=["user_id", "track_id"])
    tracks = pq.read_table(small_data / io.TRACKS)
    first_genre = pc.list_element(
        pc.if_else(
            pc.equal(pc.list_value_length(tracks.column("genres")), 0),
            pa.scalar([-1], pa.list_(pa.int64())),
            tracks.column("genres"),
        ),
        0,
    )
    genre_of = pd.Series(first_genre.to_numpy(), index=tracks.column("track_id").to_numpy())
    frame = events.to_pandas()
    frame = frame[frame.groupby("user_id")["track_id"].transform("size") >= 50]

    def top_genre_share(track_ids: np.ndarray) -> float:
        genre = genre_of.reindex(track_ids).to_numpy()
        counts = pd.DataFrame({"u": frame["user_id"].to_numpy(), "g": genre}).value_counts()
        return float((counts.groupby(level="u").max() / counts.groupby(level="u").sum()).mean())

    real = top_genre_share(frame["track_id"].to_numpy())
    shuffled = top_genre_share(np.random.default_rng(0).permutation(frame["track_id"].to_numpy()))
    assert real > shuffled + 0.05, (real, shuffled)
