"""Preparation: validate the three input files and write ``items.parquet`` and ``events.parquet``.

Works on any source in the schema of docs/DATA.md (the real download, the generator, a converted
data set) and accepts the lossless variants real logs come in: any integer width for ids (as
long as the values fit), ``large_string`` or dictionary names, ``large_list``/``list<null>`` id
lists, timestamps of any unit or time zone and dates. Only data that is really wrong (a missing
column, non-integer or negative ids, ids too large for int32, null ids or dates, events of
unknown tracks) is refused, with a DataError naming the file, the column and the problem.

Everything is validated before anything is written, and each output is written to a temporary
name and renamed, so bad input never leaves a half-written artefact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musicrec import io
from musicrec.arrays import distinct, in_sorted
from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.progress import Steps

if TYPE_CHECKING:
    from musicrec.settings import Settings

log = logging.getLogger(__name__)

# Dates before this day (or after today) are a sign of a broken export, not of listening; they
# are reported, and kept unless the settings say to drop them (settings.min_plausible_date).
DEFAULT_MIN_PLAUSIBLE_DATE = date(1990, 1, 1)
# read_events keeps a date as an int16 day number: the dates the pipeline can represent
DAY_RANGE = (int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max))
# rows per block of the repeated-event check (blocks never split a user)
BLOCK_ROWS = 1 << 22
# rows of the shared all-ones chunk that makes a ``plays`` column of 1 without 4 bytes a row
_ONES_CHUNK = 1 << 20

LIST_COLUMNS = ("albums", "artists", "genres")


@dataclass
class Events:
    """The listening log in compact arrays, sorted by user and then by track_seq.

    ``plays`` counts the input rows merged into each event (same user, track and day); None
    means every event is a single row, which is written without holding a column of ones.
    """

    user: np.ndarray  # int32
    track: np.ndarray  # int32
    seq: np.ndarray  # int16
    day: np.ndarray  # int32, days since 1970-01-01
    plays: np.ndarray | None = None  # int32

    def __len__(self) -> int:
        return len(self.user)

    def table(self) -> pa.Table:
        """The events in ``io.EVENTS_SCHEMA``."""
        plays = _ones(len(self)) if self.plays is None else pa.array(self.plays, pa.int32())
        return pa.table(
            {
                C.user: self.user,
                C.track: self.track,
                C.seq: self.seq,
                C.started_at: pa.array(self.day, pa.int32()).cast(pa.date32()),
                C.plays: plays,
            },
            schema=io.EVENTS_SCHEMA,
        )

    def filter(self, keep: np.ndarray) -> None:
        """Keep only the rows where ``keep`` is True (one array copied at a time)."""
        for name in ("user", "track", "seq", "day", "plays"):
            values = getattr(self, name)
            if values is not None:
                setattr(self, name, values[keep])


def _ones(n: int) -> pa.ChunkedArray:
    """An int32 column of n ones whose chunks share one small buffer."""
    chunk = pa.array(np.ones(min(n, _ONES_CHUNK), np.int32))
    full, rest = divmod(n, len(chunk)) if n else (0, 0)
    return pa.chunked_array([chunk] * full + ([chunk.slice(0, rest)] if rest else []), pa.int32())


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


def _is_int_list(t: pa.DataType) -> bool:
    """list / large_list / fixed_size_list of integers, a list of nulls, or an all-null column."""
    if pa.types.is_null(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)
    return False


def _is_str(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


_KINDS = {
    "int": (pa.types.is_integer, "an integer type"),
    "list<int>": (_is_int_list, "a list of integers"),
    "str": (_is_str, "a string type"),
    "time": (lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t), "a timestamp or date"),
}


def _check_columns(path: Path, schema: pa.Schema, expected: dict[str, str]) -> None:
    """Each expected column exists and has the expected kind: int, list<int>, str or time."""
    for name, kind in expected.items():
        if name not in schema.names:
            raise DataError(f"{path}: column {name!r} is missing (columns: {schema.names})")
        actual = schema.field(name).type
        accepts, wanted = _KINDS[kind]
        if not accepts(actual):
            raise DataError(f"{path}: column {name!r} has type {actual}, expected {wanted}")


def _check_no_nulls(path: Path, table: pa.Table, columns: list[str]) -> None:
    for name in columns:
        nulls = table.column(name).null_count
        if nulls:
            raise DataError(f"{path}: column {name!r} has {nulls} empty (null) values")


def _fit_int(
    path: Path,
    name: str,
    values: pa.Array | pa.ChunkedArray,
    target: pa.DataType,
    low: int | None = None,
) -> pa.Array | pa.ChunkedArray:
    """Cast integers of any width to ``target`` losslessly; a value that does not fit (or is
    below ``low``, e.g. 0 for ids) is a DataError naming the file, the column and the value."""
    info = np.iinfo(target.to_pandas_dtype())
    low = int(info.min) if low is None else low
    stats = pc.min_max(values)
    lo, hi = stats["min"].as_py(), stats["max"].as_py()
    if lo is not None and lo < low:
        if low == 0 and lo < 0:
            raise DataError(
                f"{path}: column {name!r} has negative ids, e.g. {lo} (ids must be 0..{info.max})"
            )
        raise DataError(
            f"{path}: column {name!r} has values that do not fit {target}, e.g. {lo} "
            f"(allowed {low}..{info.max})"
        )
    if hi is not None and hi > info.max:
        raise DataError(
            f"{path}: column {name!r} has values that do not fit {target}, e.g. {hi} "
            f"(allowed {low}..{info.max})"
        )
    return values if values.type == target else values.cast(target)


def _int_lists(path: Path, name: str, lists: pa.ChunkedArray) -> pa.ChunkedArray:
    """Any integer-list column (list, large_list, fixed_size_list, list<null>, all null) as
    list<int64>, a null list becoming an empty one; values must fit int64."""
    if pa.types.is_integer(getattr(lists.type, "value_type", pa.null())):
        _fit_int(path, name, pc.list_flatten(lists), pa.int64())
    lists = lists.cast(pa.list_(pa.int64()))
    return pc.fill_null(lists, pa.scalar([], pa.list_(pa.int64())))


def build_items(tracks: pa.Table, catalog: pa.Table) -> pa.Table:
    """One row per track: its ids, its name and the names of its albums, artists and genres.

    A name missing from the catalogue (the real data lacks 30 genres) becomes "genre 123", so a
    client always has something to show; a track without artists keeps an empty list. Lists of
    any integer list type and names of any string type are accepted (cast losslessly).
    """
    kinds = pc.cast(catalog.column("type"), pa.string())
    by_type = {
        kind: catalog.filter(pc.equal(kinds, kind))
        for kind in ("track", "album", "artist", "genre")
    }

    def names_of(kind: str, ids: pa.Array) -> pa.Array:
        names = by_type[kind]
        value_set = pc.cast(names.column("id"), pa.int64()).combine_chunks()
        found = pc.index_in(pc.cast(ids, pa.int64()), value_set=value_set)
        taken = pc.cast(names.column("name"), pa.string()).combine_chunks().take(found)
        fallback = pc.binary_join_element_wise(
            pa.array([kind] * len(ids), pa.string()), pc.cast(ids, pa.string()), " "
        )
        return pc.coalesce(taken, fallback)

    track_ids = tracks.column(C.track).combine_chunks()
    columns: dict[str, pa.Array] = {
        C.track: pc.cast(track_ids, pa.int32()),
        C.name: names_of("track", track_ids),
    }
    empty = pa.scalar([], pa.list_(pa.int64()))
    for source, ids_col, names_col, kind in (
        ("albums", C.album_ids, C.albums, "album"),
        ("artists", C.artist_ids, C.artists, "artist"),
        ("genres", C.genre_ids, C.genres, "genre"),
    ):
        lists = tracks.column(source).combine_chunks().cast(pa.list_(pa.int64()))
        lists = pc.fill_null(lists, empty)
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
        {C.track: "int", **{name: "list<int>" for name in LIST_COLUMNS}},
    )
    _check_columns(names_path, names_file.schema_arrow, {"id": "int", "type": "str", "name": "str"})
    tracks = tracks_file.read(columns=[C.track, *LIST_COLUMNS])
    catalog = names_file.read(columns=["id", "type", "name"])
    _check_no_nulls(tracks_path, tracks, [C.track])
    _check_no_nulls(names_path, catalog, ["id", "type"])
    track_ids = _fit_int(tracks_path, C.track, tracks.column(C.track), pa.int32(), low=0)
    tracks = pa.table(
        {
            C.track: track_ids.cast(pa.int64()),
            **{name: _int_lists(tracks_path, name, tracks.column(name)) for name in LIST_COLUMNS},
        }
    )
    catalog = pa.table(
        {
            "id": _fit_int(names_path, "id", catalog.column("id"), pa.int64()),
            "type": pc.cast(catalog.column("type"), pa.string()),
            "name": pc.cast(catalog.column("name"), pa.string()),
        }
    )
    ids = track_ids.to_numpy()
    n_unique = len(distinct(ids))
    if n_unique != len(ids):
        raise DataError(f"{tracks_path}: column 'track_id' has {len(ids) - n_unique} repeats")
    return build_items(tracks, catalog)


def _days(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Day numbers (int32, days since 1970-01-01) of a timestamp (any unit; the local date when
    it has a time zone) or date32/date64 column."""
    if pa.types.is_date64(column.type):
        column = column.cast(pa.timestamp("ms"))
    if not pa.types.is_date32(column.type):
        column = column.cast(pa.date32())
    return column.cast(pa.int32()).to_numpy(zero_copy_only=False)


def _null_count(handle: pq.ParquetFile, name: str) -> int:
    return sum(batch.column(0).null_count for batch in handle.iter_batches(columns=[name]))


def _load_interactions(path: Path, handle: pq.ParquetFile) -> Events:
    """Read the four columns a batch at a time into preallocated arrays (the scratch memory
    does not grow with the file or its row groups), checking nulls, id ranges (0..int32) and
    track_seq (int16) on the way."""
    n = handle.metadata.num_rows
    events = Events(
        np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int16), np.empty(n, np.int32)
    )
    at = 0
    columns = [C.user, C.track, C.seq, C.started_at]
    # one row group at a time: iter_batches over the whole file buffers all of it
    batches = (
        batch
        for group in range(handle.num_row_groups)
        for batch in handle.iter_batches(1 << 20, row_groups=[group], columns=columns)
    )
    for batch in batches:
        for name in columns:
            if batch.column(name).null_count:
                raise DataError(
                    f"{path}: column {name!r} has {_null_count(handle, name)} empty (null) "
                    "values; remove those rows or fill them"
                )
        end = at + batch.num_rows
        user = _fit_int(path, C.user, batch.column(C.user), pa.int32(), low=0)
        track = _fit_int(path, C.track, batch.column(C.track), pa.int32(), low=0)
        # track_seq is int16 (the real data's type): a longer history is refused, not wrapped
        seq = _fit_int(path, C.seq, batch.column(C.seq), pa.int16())
        events.user[at:end] = user.to_numpy(zero_copy_only=False)
        events.track[at:end] = track.to_numpy(zero_copy_only=False)
        events.seq[at:end] = seq.to_numpy(zero_copy_only=False)
        events.day[at:end] = _days(batch.column(C.started_at))
        at = end
        del batch, user, track, seq
    if at != n:
        raise DataError(f"{path}: the metadata promises {n} rows, the file holds {at}")
    return events


def _handle_implausible_dates(
    path: Path, events: Events, today: date, min_date: date | None, drop: bool
) -> None:
    """Warn about events dated before ``min_date`` (default 1990-01-01) or after ``today``;
    keep them, or drop them when ``drop``. Dates the pipeline cannot represent (int16 day
    numbers: before 1880-04-14 or after 2059-09-18) that are kept are a DataError."""
    low_date = min_date or DEFAULT_MIN_PLAUSIBLE_DATE
    low, high = io.date_to_day(low_date), io.date_to_day(today)
    if int(events.day.min()) < low or int(events.day.max()) > high:
        bad = events.day < low
        bad |= events.day > high
        count = int(np.count_nonzero(bad))
        first, last = int(events.day[bad].min()), int(events.day[bad].max())
        what = (
            f"{path}: {count} events have started_at outside the plausible range "
            f"{low_date} .. {today} (from {io.day_to_date(first)} to {io.day_to_date(last)})"
        )
        if drop:
            events.filter(~bad)
            log.warning("%s; dropped them (drop_implausible_dates)", what)
            if not len(events):
                raise DataError(f"{path}: no events left after dropping implausible dates")
        else:
            log.warning("%s; kept them (set drop_implausible_dates to drop them)", what)
        del bad
    first, last = int(events.day.min()), int(events.day.max())
    if first < DAY_RANGE[0] or last > DAY_RANGE[1]:
        raise DataError(
            f"{path}: column 'started_at' runs from {io.day_to_date(first)} to "
            f"{io.day_to_date(last)}; the pipeline handles dates from "
            f"{io.day_to_date(DAY_RANGE[0])} to {io.day_to_date(DAY_RANGE[1])} only "
            "(set drop_implausible_dates, with a min_plausible_date in that range, to drop "
            "the others)"
        )


def read_interactions(
    path: Path,
    known_tracks: np.ndarray,
    today: date | None = None,
    *,
    min_plausible_date: date | None = None,
    drop_implausible_dates: bool = False,
) -> Events:
    """Validate interactions.parquet and load it as compact sorted arrays.

    Refused (DataError naming file, column and problem): a missing or non-integer column,
    null values in any column (a broken export: dropping them silently would hide data loss,
    so the user decides), negative ids, ids above int32, track_seq beyond int16, and tracks
    missing from the catalogue. Implausible dates are warned about and kept (or dropped, see
    ``_handle_implausible_dates``). Rows repeating a (user, track, day) are merged into one
    event with a ``plays`` count (``_merge_repeats``).
    """
    handle = _open(path)
    _check_columns(
        path,
        handle.schema_arrow,
        {C.user: "int", C.track: "int", C.seq: "int", C.started_at: "time"},
    )
    events = _load_interactions(path, handle)
    _handle_implausible_dates(
        path, events, today or date.today(), min_plausible_date, drop_implausible_dates
    )
    _check_known_tracks(path, events.track, known_tracks)
    _sort_in_place(events)
    _merge_repeats(path, events)
    return events


def _check_known_tracks(path: Path, track: np.ndarray, known_tracks: np.ndarray) -> None:
    """Every event names a track of tracks.parquet. Checked a block at a time against a bitmap
    of the known ids (sorted ids and a binary search when the ids are too sparse for one), so
    the scratch memory does not grow with the log."""
    known = distinct(known_tracks.astype(np.int64))
    top = int(known[-1])
    lookup = None
    if top < 1 << 28:  # at most 256 MB of bitmap (the real ids reach about 10**8)
        lookup = np.zeros(top + 1, bool)
        lookup[known] = True
    count, examples = 0, np.empty(0, np.int32)
    for start in range(0, len(track), BLOCK_ROWS):
        block = track[start : start + BLOCK_ROWS]
        if lookup is not None:
            unknown = ~lookup[np.minimum(block, top)]
            unknown |= block > top
        else:
            unknown = ~in_sorted(known, block)
        if unknown.any():
            count += int(np.count_nonzero(unknown))
            examples = np.union1d(examples, block[unknown])[:5]
    if count:
        raise DataError(
            f"{path}: {count} events name tracks missing from {io.TRACKS}, e.g. {examples.tolist()}"
        )


def _is_sorted(events: Events) -> bool:
    """Sorted by user, track_seq strictly rising within a user (checked a block at a time)."""
    for start in range(0, len(events) - 1, BLOCK_ROWS):
        user = events.user[start : start + BLOCK_ROWS + 1]
        seq = events.seq[start : start + BLOCK_ROWS + 1]
        same_user = user[1:] == user[:-1]
        if not np.all(user[1:] >= user[:-1]) or not np.all(
            seq[1:][same_user] > seq[:-1][same_user]
        ):
            return False
    return True


def _sort_in_place(events: Events) -> None:
    """Sort by (user, track_seq) unless the file already is (the real data is)."""
    if _is_sorted(events):
        return
    log.info("interactions are not sorted by user and track_seq; sorting")
    order = np.lexsort((events.seq, events.user))
    for name in ("user", "track", "seq", "day"):
        setattr(events, name, getattr(events, name)[order])


def _user_blocks(user: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Start offsets (and the end) of blocks of about ``rows`` (default BLOCK_ROWS) rows of a
    user-sorted array; a block never splits a user."""
    n, rows = len(user), rows or BLOCK_ROWS
    cuts = np.searchsorted(user, user[np.arange(rows, n, rows)], side="left")
    return np.unique(np.concatenate(([0], cuts, [n])))


def _block_order(
    user: np.ndarray, track: np.ndarray, day: np.ndarray, day0: int, sort_only: bool
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Sort one block by (user, track, day): the stable order (None when ``sort_only`` and a
    packed key allows a cheaper plain sort) and, between neighbours in that order, whether the
    (user, track, day) and the (user, track) are the same."""
    user_off = (user - user[0]).astype(np.int64)
    day_off = (day - day0).astype(np.int64)
    user_bits = int(user_off[-1]).bit_length()
    track_bits = int(track.max()).bit_length()
    day_bits = int(day_off.max()).bit_length()
    if user_bits + track_bits + day_bits <= 63:
        key = (user_off << (track_bits + day_bits)) | (track.astype(np.int64) << day_bits)
        key |= day_off
        order = None if sort_only else np.argsort(key, kind="stable")
        key = np.sort(key) if order is None else key[order]
        same = key[1:] == key[:-1]
        key >>= day_bits
        return order, same, key[1:] == key[:-1]
    order = np.lexsort((day, track, user))  # stable, like argsort(kind="stable")
    u, t, d = user[order], track[order], day[order]
    same_pair = (u[1:] == u[:-1]) & (t[1:] == t[:-1])
    return order, same_pair & (d[1:] == d[:-1]), same_pair


def _merge_repeats(path: Path, events: Events) -> None:
    """Merge rows with the same (user_id, track_id, day) into one event whose ``plays`` counts
    them; it keeps the smallest track_seq, and the events stay sorted by (user, track_seq).

    Repeats on different days stay separate events: merging them would move a later listen
    into an earlier period of a time split. The check sorts a packed key one block of users at
    a time (a few MB of scratch); only blocks with repeats pay for an argsort, and the arrays
    are compacted in place, so a log without repeats costs one sort and no extra memory.
    """
    n = len(events)
    day0 = int(events.day.min())
    bounds = _user_blocks(events.user)
    write = 0  # rows [0, write) are final; equals the block start until the first merge
    merged = other_days = 0
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        user, track = events.user[start:end], events.track[start:end]
        day = events.day[start:end]
        order, same, same_pair = _block_order(user, track, day, day0, sort_only=True)
        repeats = int(np.count_nonzero(same))
        other_days += int(np.count_nonzero(same_pair)) - repeats
        if repeats and order is None:
            order, same, _ = _block_order(user, track, day, day0, sort_only=False)
        if not repeats:
            if write != start:  # shift the block down over the rows merged before it
                for name in ("user", "track", "seq", "day", "plays"):
                    values = getattr(events, name)
                    values[write : write + end - start] = values[start:end]
            write += end - start
            continue
        assert order is not None
        if events.plays is None:
            events.plays = np.ones(n, np.int32)
        first = np.flatnonzero(np.concatenate(([True], ~same)))
        plays = np.zeros(end - start, np.int32)
        # the stable order puts a group's first row (smallest track_seq) first
        plays[order[first]] = np.diff(np.append(first, end - start))
        keep = plays > 0
        kept = int(np.count_nonzero(keep))
        for name in ("user", "track", "seq", "day"):
            values = getattr(events, name)
            values[write : write + kept] = values[start:end][keep]
        events.plays[write : write + kept] = plays[keep]
        merged += repeats
        write += kept
    if merged:
        for name in ("user", "track", "seq", "day", "plays"):
            setattr(events, name, getattr(events, name)[:write])
        log.info(
            "%s: merged %d rows repeating a (user_id, track_id, day) into the events they "
            "repeat (%d events keep a plays count > 1)",
            path,
            merged,
            int(np.count_nonzero(events.plays > 1)) if events.plays is not None else 0,
        )
    if other_days:
        log.info(
            "%s: %d events repeat a (user_id, track_id) pair on a later day; kept as separate "
            "events",
            path,
            other_days,
        )


def prepare_files(
    data_dir: Path, parquet_dir: Path, settings: Settings | None = None
) -> dict[str, int]:
    """Validate the input folder and write items.parquet and events.parquet into parquet_dir.

    ``settings`` supplies min_plausible_date and drop_implausible_dates (their defaults when
    None: keep every date, warn about those before 1990 or after today).
    """
    started = time.perf_counter()
    data_dir, parquet_dir = Path(data_dir), Path(parquet_dir)
    with Steps("prepare", 3, True if settings is None else settings.progress) as steps:
        steps.step("read and check the catalogue")
        items = read_items(data_dir)
        steps.step(f"read and check {io.INTERACTIONS}")
        events = read_interactions(
            data_dir / io.INTERACTIONS,
            items.column(C.track).to_numpy(),
            min_plausible_date=None if settings is None else settings.min_plausible_date,
            drop_implausible_dates=(False if settings is None else settings.drop_implausible_dates),
        )
        log.info("validated %s in %.1f s", data_dir, time.perf_counter() - started)
        steps.step(f"write {io.ITEMS} and {io.EVENTS}")
        io.write_table(items, parquet_dir / io.ITEMS)
        io.write_table(events.table(), parquet_dir / io.EVENTS)
    n_users = int(np.count_nonzero(events.user[1:] != events.user[:-1]) + 1)
    log.info(
        "prepared %d items and %d events in %.1f s",
        items.num_rows,
        len(events),
        time.perf_counter() - started,
    )
    return {"tracks": items.num_rows, "events": len(events), "users": n_users}
