"""Preparation: validate the three input files and write ``items.parquet`` and ``events.parquet``.

Works on any source in the schema of DATA.md (the real download, the generator, a converted
data set). Everything is validated before anything is written, and each output is written to a
temporary name and renamed, so bad input never leaves a half-written artefact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musicrec import io
from musicrec.columns import Columns as C
from musicrec.errors import DataError

log = logging.getLogger(__name__)

# Dates outside this range are a sign of a broken export, not of listening.
MIN_DATE = date(2000, 1, 1)
INT32_MAX = np.iinfo(np.int32).max


@dataclass
class Events:
    """The listening log in compact arrays, sorted by user and then by track_seq."""

    user: np.ndarray  # int32
    track: np.ndarray  # int32
    seq: np.ndarray  # int16
    day: np.ndarray  # int32, days since 1970-01-01

    def __len__(self) -> int:
        return len(self.user)

    def table(self) -> pa.Table:
        return pa.table(
            {
                C.user: self.user,
                C.track: self.track,
                C.seq: self.seq,
                C.started_at: pa.array(self.day, pa.int32()).cast(pa.date32()),
            },
            schema=io.EVENTS_SCHEMA,
        )


def _open(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    if handle.metadata.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    return handle


def _check_columns(path: Path, schema: pa.Schema, expected: dict[str, str]) -> None:
    """Each expected column exists and has the expected kind: int, list<int>, str or time."""
    checks = {
        "int": pa.types.is_integer,
        "list<int>": lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
        "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "time": lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    }
    for name, kind in expected.items():
        if name not in schema.names:
            raise DataError(f"{path}: column {name!r} is missing (columns: {schema.names})")
        actual = schema.field(name).type
        if not checks[kind](actual):
            raise DataError(f"{path}: column {name!r} has type {actual}, expected {kind}")


def _check_no_nulls(path: Path, table: pa.Table, columns: list[str]) -> None:
    for name in columns:
        nulls = table.column(name).null_count
        if nulls:
            raise DataError(f"{path}: column {name!r} has {nulls} empty (null) values")


def build_items(tracks: pa.Table, catalog: pa.Table) -> pa.Table:
    """One row per track: its ids, its name and the names of its albums, artists and genres.

    A name missing from the catalogue (the real data lacks 30 genres) becomes "genre 123", so a
    client always has something to show; a track without artists keeps an empty list.
    """
    by_type = {
        kind: catalog.filter(pc.equal(catalog.column("type"), kind))
        for kind in ("track", "album", "artist", "genre")
    }

    def names_of(kind: str, ids: pa.Array) -> pa.Array:
        names = by_type[kind]
        found = pc.index_in(ids, value_set=names.column("id").combine_chunks())
        taken = names.column("name").combine_chunks().take(found)
        fallback = pc.binary_join_element_wise(
            pa.array([kind] * len(ids), pa.string()), pc.cast(ids, pa.string()), " "
        )
        return pc.coalesce(taken, fallback)

    track_ids = tracks.column(C.track).combine_chunks()
    columns: dict[str, pa.Array] = {
        C.track: pc.cast(track_ids, pa.int32()),
        C.name: names_of("track", track_ids),
    }
    for source, ids_col, names_col, kind in (
        ("albums", C.album_ids, C.albums, "album"),
        ("artists", C.artist_ids, C.artists, "artist"),
        ("genres", C.genre_ids, C.genres, "genre"),
    ):
        lists = pc.fill_null(
            tracks.column(source).combine_chunks(), pa.scalar([], pa.list_(pa.int64()))
        )
        lists = lists.cast(pa.list_(pa.int64()))
        offsets = lists.offsets
        values = lists.flatten()
        columns[ids_col] = pa.ListArray.from_arrays(offsets, values)
        columns[names_col] = pa.ListArray.from_arrays(offsets, names_of(kind, values))
    return pa.table(columns)


def read_items(data_dir: Path) -> pa.Table:
    """Validate tracks.parquet and catalog_names.parquet and join them into items."""
    tracks_path, names_path = Path(data_dir) / io.TRACKS, Path(data_dir) / io.CATALOG_NAMES
    tracks_file, names_file = _open(tracks_path), _open(names_path)
    _check_columns(
        tracks_path,
        tracks_file.schema_arrow,
        {C.track: "int", "albums": "list<int>", "artists": "list<int>", "genres": "list<int>"},
    )
    _check_columns(names_path, names_file.schema_arrow, {"id": "int", "type": "str", "name": "str"})
    tracks = tracks_file.read(columns=[C.track, "albums", "artists", "genres"])
    catalog = names_file.read(columns=["id", "type", "name"])
    _check_no_nulls(tracks_path, tracks, [C.track])
    _check_no_nulls(names_path, catalog, ["id", "type"])
    ids = tracks.column(C.track).to_numpy()
    if ids.min() < 0 or ids.max() > INT32_MAX:
        raise DataError(f"{tracks_path}: track_id must be in 0..{INT32_MAX}")
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{tracks_path}: track_id has {len(ids) - len(np.unique(ids))} repeats")
    return build_items(tracks, catalog)


def read_interactions(path: Path, known_tracks: np.ndarray, today: date | None = None) -> Events:
    """Validate interactions.parquet and load it as compact sorted arrays.

    Checks types, nulls, negative ids, dates in MIN_DATE..today, track ids present in the
    catalogue, and repeated (user, track) pairs; each failure names the file and the problem.
    """
    handle = _open(path)
    _check_columns(
        path,
        handle.schema_arrow,
        {C.user: "int", C.track: "int", C.seq: "int", C.started_at: "time"},
    )
    today = today or date.today()
    users, tracks, seqs, days = [], [], [], []
    for group in range(handle.num_row_groups):
        table = handle.read_row_group(group, columns=[C.user, C.track, C.seq, C.started_at])
        _check_no_nulls(path, table, table.column_names)
        user = table.column(C.user).to_numpy()
        track = table.column(C.track).to_numpy()
        if user.min() < 0 or track.min() < 0:
            raise DataError(f"{path}: negative ids in user_id or track_id")
        if user.max() > INT32_MAX or track.max() > INT32_MAX:
            raise DataError(f"{path}: ids above {INT32_MAX} do not fit int32")
        day = table.column(C.started_at).cast(pa.date32()).cast(pa.int32()).to_numpy()
        users.append(user.astype(np.int32))
        tracks.append(track.astype(np.int32))
        seqs.append(table.column(C.seq).to_numpy().astype(np.int16))
        days.append(day.astype(np.int32))
        del table
    events = Events(
        np.concatenate(users), np.concatenate(tracks), np.concatenate(seqs), np.concatenate(days)
    )
    del users, tracks, seqs, days

    first, last = int(events.day.min()), int(events.day.max())
    low, high = io.date_to_day(MIN_DATE), io.date_to_day(today)
    if first < low or last > high:
        raise DataError(
            f"{path}: started_at runs from {io.day_to_date(first)} to {io.day_to_date(last)}, "
            f"outside the plausible range {MIN_DATE} .. {today}"
        )
    unknown = ~np.isin(events.track, known_tracks.astype(np.int32))
    if unknown.any():
        examples = np.unique(events.track[unknown])[:5].tolist()
        raise DataError(
            f"{path}: {int(unknown.sum())} events name tracks missing from "
            f"{io.TRACKS}, e.g. {examples}"
        )
    _sort_in_place(events)
    _check_unique_pairs(path, events)
    return events


def _sort_in_place(events: Events) -> None:
    """Sort by (user, track_seq) unless the file already is (the real data is)."""
    same_user = events.user[1:] == events.user[:-1]
    ordered = np.all(events.user[1:] >= events.user[:-1]) and np.all(
        events.seq[1:][same_user] > events.seq[:-1][same_user]
    )
    if ordered:
        return
    log.info("interactions are not sorted by user and track_seq; sorting")
    order = np.lexsort((events.seq, events.user))
    for name in ("user", "track", "seq", "day"):
        setattr(events, name, getattr(events, name)[order])


def _check_unique_pairs(path: Path, events: Events) -> None:
    """Each (user, track) pair appears once: the data set has no play counts."""
    key = (events.user.astype(np.int64) << 32) | events.track.astype(np.int64)
    key.sort()
    repeated = key[1:] == key[:-1]
    if repeated.any():
        example = int(key[1:][repeated][0])
        raise DataError(
            f"{path}: {int(repeated.sum())} repeated (user_id, track_id) pairs, e.g. "
            f"user {example >> 32}, track {example & 0xFFFFFFFF}"
        )


def prepare_files(data_dir: Path, parquet_dir: Path) -> dict[str, int]:
    """Validate the input folder and write items.parquet and events.parquet into parquet_dir."""
    started = time.perf_counter()
    data_dir, parquet_dir = Path(data_dir), Path(parquet_dir)
    items = read_items(data_dir)
    events = read_interactions(data_dir / io.INTERACTIONS, items.column(C.track).to_numpy())
    log.info("validated %s in %.1f s", data_dir, time.perf_counter() - started)
    io.write_table(items, parquet_dir / io.ITEMS)
    io.write_table(events.table(), parquet_dir / io.EVENTS)
    n_users = int(np.count_nonzero(np.diff(events.user)) + 1)
    log.info(
        "prepared %d items and %d events in %.1f s",
        items.num_rows,
        len(events),
        time.perf_counter() - started,
    )
    return {"tracks": items.num_rows, "events": len(events), "users": n_users}
