"""The recommendation service: FastAPI app and the ``Recommendations`` class.

Start it with ``uvicorn recommendation_service:app`` or ``python recommendation_service.py``
(host, port and workers from ``MUSICREC_`` settings). The HTTP contract is docs/API.md.

At start-up the lifespan loads the artefacts of the offline pipeline from
``settings.parquet_dir`` (items, top_popular, similar, recommendations) into numpy arrays in
CSR form — sorted unique keys, row offsets, values — so a request costs one binary search
whatever the number of users, and opens the online history store (``settings.history_url``).
A missing or unusable artefact stops the start-up with a message naming the file.

Checks before a set is used (start-up and reload): every file present; byte size and row count
as manifest.json records them (files of one run); column names and types; no empty values;
rows sorted by key and rank; every track id in items.parquet; finite scores; parquet page
checksums; no file changed while it was read.

Reloading without downtime: each worker watches manifest.json (every
``reload_poll_seconds``, default 5 s; the pipeline writes it last) and, when it names a new
run, loads and checks the new set in a background thread, then swaps one reference. ``POST
/admin/reload`` with ``Authorization: Bearer <admin_token>`` does the same at once in the
worker that answers. A request takes the set once, so it finishes on the set it started with;
a broken new set is refused (logged, ``/health`` shows ``reload_error``) and the old one keeps
serving.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from musicrec import io
from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.history import HistoryStore, HistoryStoreError, open_history_store
from musicrec.settings import Settings

log = logging.getLogger("recommendation_service")

INT32_MAX = 2**31 - 1
MAX_HISTORY_BATCH = 10_000
# GET /similar: ids in the query string; 500 keeps the URL (~11 kB) well inside what the HTTP
# parser accepts, so a longer list is our 422, not the server's bare 400 (found by fuzzing)
MAX_QUERY_TRACKS = 500
BLEND_MODES = ("strict", "probability")
KINDS = ("personal", "similar", "default")
SOURCE_HEADER = "X-Recommendation-Source"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

BlendMode = Literal["strict", "probability"]


# --- domain errors (mapped to HTTP codes in one place: ERROR_STATUS) ------------------------


class ServiceError(Exception):
    """An error whose message is meant for the client."""

    def problems(self) -> list[dict[str, Any]]:
        return [{"loc": [], "msg": str(self), "type": "service_error"}]


class BadParameterError(ServiceError):
    """A parameter outside what the service accepts (e.g. k above max_k)."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)

    def problems(self) -> list[dict[str, Any]]:
        return [{"loc": self.loc, "msg": str(self), "type": "value_error"}]


class UnknownTracksError(ServiceError):
    """Track ids that are not in the catalogue; nothing of the request was done."""

    def __init__(self, track_ids: Sequence[int], loc: Sequence[str | int] = ("body",)) -> None:
        self.track_ids = [int(t) for t in track_ids]
        shown = ", ".join(map(str, self.track_ids[:20]))
        more = f" and {len(self.track_ids) - 20} more" if len(self.track_ids) > 20 else ""
        super().__init__(f"track ids not in the catalogue: {shown}{more}")
        self.loc = list(loc)

    def problems(self) -> list[dict[str, Any]]:
        return [{"loc": self.loc, "msg": str(self), "type": "unknown_track_ids"}]


class NotReadyError(ServiceError):
    """The artefacts are not loaded (yet)."""


ERROR_STATUS: dict[type[Exception], int] = {
    BadParameterError: 422,
    UnknownTracksError: 422,
    NotReadyError: 503,
    HistoryStoreError: 503,
}


# --- artefacts in memory ------------------------------------------------------------------


@dataclass(frozen=True)
class RankedLists:
    """A ranked list per key in CSR form: row ``i`` of ``keys[i]`` is
    ``values[offsets[i]:offsets[i + 1]]`` (best first), with ``scores`` beside it."""

    keys: np.ndarray  # sorted unique int32
    offsets: np.ndarray  # int64, len(keys) + 1
    values: np.ndarray  # int32
    scores: np.ndarray | None = None  # float32, same length as values

    @classmethod
    def from_sorted(
        cls, key_column: np.ndarray, values: np.ndarray, scores: np.ndarray | None = None
    ) -> RankedLists:
        """Build from rows already sorted by key (and rank within a key)."""
        if key_column.size == 0:
            return cls(np.empty(0, np.int32), np.zeros(1, np.int64), values[:0], scores)
        starts = np.flatnonzero(key_column[1:] != key_column[:-1]) + 1
        keys = key_column[np.concatenate(([0], starts))]
        offsets = np.concatenate(([0], starts, [key_column.size])).astype(np.int64)
        return cls(np.ascontiguousarray(keys), offsets, values, scores)

    def __len__(self) -> int:
        return int(self.keys.size)

    @property
    def n_pairs(self) -> int:
        return int(self.values.size)

    def position(self, key: int) -> int:
        """Row index of ``key``, or -1."""
        if not 0 <= key <= INT32_MAX:
            return -1
        # an int32 needle: a Python int would make numpy cast the whole key array to int64
        i = int(np.searchsorted(self.keys, np.int32(key)))
        return i if i < self.keys.size and self.keys[i] == key else -1

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Row index of each key (int64 array), -1 where absent: one vectorised search."""
        out = np.full(keys.size, -1, dtype=np.int64)
        valid = (keys >= 0) & (keys <= INT32_MAX)
        if self.keys.size == 0 or not valid.any():
            return out
        needles = keys[valid].astype(np.int32)
        pos = np.minimum(np.searchsorted(self.keys, needles), self.keys.size - 1)
        out[np.flatnonzero(valid)[self.keys[pos] == needles]] = pos[self.keys[pos] == needles]
        return out

    def __contains__(self, key: int) -> bool:
        return self.position(int(key)) >= 0

    def row(self, key: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Values (and scores) of ``key``; empty when the key is absent."""
        i = self.position(int(key))
        if i < 0:
            empty = self.values[:0]
            return empty, None if self.scores is None else self.scores[:0]
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.values[lo:hi], None if self.scores is None else self.scores[lo:hi]


@dataclass(frozen=True)
class Artefacts:
    """Everything the service reads from the parquet folder, immutable once built, so a
    reload can swap the whole set at once while requests in flight keep the old one."""

    parquet_dir: Path
    items: pa.Table  # track_id, name, artists, albums, genres
    item_ids: np.ndarray  # sorted track ids of the catalogue (int32)
    item_rows: np.ndarray  # row in ``items`` of each id of ``item_ids``
    popular: np.ndarray  # track ids, most popular first
    similar: RankedLists  # track -> similar tracks with scores
    offline: RankedLists  # user -> offline recommendations (ranked)
    built_at: str | None = None
    run_id: str | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    load_seconds: float = 0.0

    def unknown_tracks(self, track_ids: Sequence[int]) -> list[int]:
        """Ids of ``track_ids`` not in the catalogue, each once, in order of appearance."""
        ids = np.asarray(track_ids, dtype=np.int64)
        if ids.size == 0:
            return []
        unknown = ids[self._rows(ids) < 0]
        _, first = np.unique(unknown, return_index=True)
        return [int(x) for x in unknown[np.sort(first)]]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row in ``items`` of each id, -1 for an id not in the catalogue."""
        rows = np.full(ids.size, -1, dtype=np.int64)
        valid = (ids >= 0) & (ids <= INT32_MAX)
        if self.item_ids.size == 0 or not valid.any():
            return rows
        needles = ids[valid].astype(np.int32)  # int32, so item_ids is not cast to int64
        pos = np.minimum(np.searchsorted(self.item_ids, needles), self.item_ids.size - 1)
        hit = self.item_ids[pos] == needles
        rows[np.flatnonzero(valid)[hit]] = self.item_rows[pos[hit]]
        return rows

    def details(self, track_ids: Sequence[int]) -> list[dict[str, Any]]:
        """``{track_id, name, artists, albums, genres}`` for each id, in order."""
        ids = np.asarray(track_ids, dtype=np.int64)
        if ids.size == 0:
            return []
        rows_of = self._rows(ids)
        rows = self.items.take(pa.array(rows_of[rows_of >= 0])).to_pylist()
        by_id = {row[C.track]: row for row in rows}
        empty = {C.name: None, C.artists: [], C.albums: [], C.genres: []}
        return [
            {
                C.track: int(t),
                C.name: by_id.get(int(t), empty)[C.name],
                C.artists: by_id.get(int(t), empty)[C.artists] or [],
                C.albums: by_id.get(int(t), empty)[C.albums] or [],
                C.genres: by_id.get(int(t), empty)[C.genres] or [],
            }
            for t in ids
        ]


READ_THREADS = 2  # row groups of a column are decoded by this many threads at once


def _read_column(path: Path, name: str, dtype: pa.DataType) -> np.ndarray:
    """One numeric column as a numpy array: row groups decoded by READ_THREADS threads
    straight into their slice of one preallocated array (peak memory: the array plus a row
    group per thread), with page checksums verified."""
    meta = pq.read_metadata(path)
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    out = np.empty(int(starts[-1]), dtype=dtype.to_pandas_dtype())

    def read(groups: list[int]) -> None:
        reader = pq.ParquetFile(path, page_checksum_verification=True)
        for group in groups:
            column = reader.read_row_group(group, columns=[name]).column(0)
            if column.null_count:
                raise DataError(f"{path}: column {name!r} has {column.null_count} empty values")
            if column.type != dtype:
                column = column.cast(dtype)  # safe cast: overflow raises
            values = column.to_numpy()
            if values.size != sizes[group]:
                raise DataError(f"{path}: row group {group} has {values.size} rows, "
                                f"its metadata says {sizes[group]}")
            out[starts[group]:starts[group + 1]] = values

    shares = [list(range(i, len(sizes), READ_THREADS)) for i in range(READ_THREADS)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for future in [pool.submit(read, share) for share in shares if share]:
            future.result()  # re-raises a reader's error here
    return out


def _read_columns(path: Path, columns: dict[str, pa.DataType]) -> dict[str, np.ndarray]:
    """Read numeric columns of an artefact as numpy arrays of the given types, one column at
    a time; any problem is a DataError naming the file.

    An id or rank column must hold integers (a float or string id is a file from something
    else, not one to guess at); a score may be any number. Page checksums are verified when
    the writer stored them."""
    schema = _read_schema(path)
    out: dict[str, np.ndarray] = {}
    for name, dtype in columns.items():
        index = schema.get_field_index(name)
        if index < 0:
            raise DataError(f"{path}: column {name!r} is missing (columns: {schema.names})")
        source_type = schema.field(index).type
        allowed = pa.types.is_integer(source_type) or (
            pa.types.is_floating(dtype) and pa.types.is_floating(source_type)
        )
        if not allowed:
            raise DataError(f"{path}: column {name!r} has type {source_type}, expected {dtype}")
        try:
            out[name] = _read_column(path, name, dtype)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read column {name!r}: {exc}") from exc
    return out


def _read_schema(path: Path) -> pa.Schema:
    if not path.exists():
        raise DataError(
            f"missing artefact {path}: run the pipeline (python -m musicrec run) "
            "or point MUSICREC_PARQUET_DIR at a folder of artefacts"
        )
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc


CHECK_CHUNK = 8_000_000  # rows per step of the whole-column checks: bounded temporaries


def _check_sorted(path: Path, keys: np.ndarray, ranks: np.ndarray, key_name: str) -> None:
    """The CSR form needs rows sorted by key, then rank; refuse a file that is not."""
    for start in range(0, max(keys.size - 1, 0), CHECK_CHUNK):
        stop = min(start + CHECK_CHUNK + 1, keys.size)
        k, r = keys[start:stop], ranks[start:stop]
        same = k[1:] == k[:-1]
        if np.any(k[1:] < k[:-1]) or np.any(r[1:][same] <= r[:-1][same]):
            raise DataError(f"{path}: rows are not sorted by {key_name}, rank")
    if keys.size and (keys[0] < 0 or ranks.min() < 1):
        raise DataError(f"{path}: negative {key_name} or a rank below 1")


class Catalogue:
    """Membership of track ids in items.parquet, by a boolean table over the id range: one
    gather per id, so every track of a 137 M-row file is checked in about a second."""

    def __init__(self, sorted_ids: np.ndarray) -> None:
        top = int(sorted_ids[-1]) + 1 if sorted_ids.size else 0
        self.member = np.zeros(top, dtype=bool)
        self.member[sorted_ids] = True

    def check(self, path: Path, column: str, ids: np.ndarray) -> None:
        """DataError naming ``path`` when a track id of ``ids`` is not in the catalogue."""
        for start in range(0, ids.size, CHECK_CHUNK):
            part = ids[start:start + CHECK_CHUNK]
            if part.size == 0:
                continue
            if part.min() >= 0 and part.max() < self.member.size and self.member.take(part).all():
                continue  # the usual case: one gather, no masks
            inside = (part >= 0) & (part < self.member.size)
            inside[inside] = self.member[part[inside]]
            if not inside.all():
                bad = np.unique(part[~inside])
                raise DataError(
                    f"{path}: column {column!r} has {bad.size} track id(s) not in "
                    f"{io.ITEMS} (e.g. {bad[:5].tolist()}): the files are not from one run"
                )


def _load_ranked(
    path: Path, key: str, value: str, with_scores: bool, catalogue: Catalogue
) -> RankedLists:
    wanted = {key: pa.int32(), value: pa.int32(), C.rank: pa.int16()}
    if with_scores:
        wanted[C.score] = pa.float32()
    cols = _read_columns(path, wanted)
    _check_sorted(path, cols[key], cols.pop(C.rank), key)
    if value == C.similar:
        if np.any(cols[key] == cols[value]):
            raise DataError(f"{path}: a track is listed as similar to itself")
        catalogue.check(path, key, cols[key])
    catalogue.check(path, value, cols[value])
    scores = cols.get(C.score)
    if scores is not None and not np.all(np.isfinite(scores)):
        raise DataError(f"{path}: column {C.score!r} has values that are not finite")
    return RankedLists.from_sorted(cols.pop(key), cols.pop(value), scores)


ITEM_TYPES: dict[str, Any] = {  # column -> check of its arrow type
    C.track: pa.types.is_integer,
    C.name: lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    C.artists: lambda t: pa.types.is_list(t) and pa.types.is_string(t.value_type),
    C.albums: lambda t: pa.types.is_list(t) and pa.types.is_string(t.value_type),
    C.genres: lambda t: pa.types.is_list(t) and pa.types.is_string(t.value_type),
}


def _load_items(path: Path) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    schema = _read_schema(path)
    names = list(ITEM_TYPES)
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise DataError(f"{path}: columns missing: {missing} (columns: {schema.names})")
    for name, is_ok in ITEM_TYPES.items():
        source_type = schema.field(name).type
        if not is_ok(source_type):
            expected = {C.track: "an integer", C.name: "string"}.get(name, "list<string>")
            raise DataError(f"{path}: column {name!r} has type {source_type}, expected {expected}")
    try:
        # one chunk per column: take() on a table of many row groups is far slower
        table = pq.read_table(
            path, columns=names, page_checksum_verification=True
        ).combine_chunks()
        ids_column = table.column(C.track)
        if ids_column.null_count:
            raise DataError(f"{path}: column {C.track!r} has {ids_column.null_count} empty values")
        ids = ids_column.cast(pa.int32()).to_numpy()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if sorted_ids.size and sorted_ids[0] < 0:
        raise DataError(f"{path}: negative track ids")
    if sorted_ids.size > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        raise DataError(f"{path}: track ids are not unique")
    return table, sorted_ids, order


def _load_popular(path: Path, catalogue: Catalogue) -> np.ndarray:
    cols = _read_columns(path, {C.track: pa.int32(), C.rank: pa.int32()})
    catalogue.check(path, C.track, cols[C.track])
    if np.unique(cols[C.track]).size != cols[C.track].size:
        raise DataError(f"{path}: a track is listed twice")
    return np.ascontiguousarray(cols[C.track][np.argsort(cols[C.rank], kind="stable")])


SERVICE_FILES = (io.ITEMS, io.TOP_POPULAR, io.SIMILAR, io.RECOMMENDATIONS)


def read_manifest(parquet_dir: Path) -> dict[str, Any] | None:
    """manifest.json of the folder, or None when there is none (hand-made artefacts)."""
    path = Path(parquet_dir) / io.MANIFEST
    if not path.exists():
        return None
    try:
        info = io.read_json(path)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable manifest: {exc}") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path}: not a readable manifest: a JSON object expected")
    return info


def _expected_files(manifest: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """Rows and bytes the manifest records for each file the service reads."""
    expected: dict[str, dict[str, int | None]] = {}
    artefacts = manifest.get("artefacts") or {}
    prepared = manifest.get("prepared_files") or {}
    for name in SERVICE_FILES:
        entry = artefacts.get(name) if isinstance(artefacts, dict) else None
        if isinstance(entry, dict):
            expected[name] = {"rows": entry.get("rows"), "bytes": entry.get("bytes")}
        elif isinstance(prepared, dict) and isinstance(prepared.get(name), int):
            expected[name] = {"rows": None, "bytes": prepared[name]}
    return expected


def check_manifest(parquet_dir: Path, manifest: dict[str, Any] | None) -> None:
    """Every service file must have the byte size and row count its manifest records: a
    mismatch means files of different runs (a run still moving its files in, a half copy)."""
    if manifest is None:
        log.warning("%s: no %s, the files cannot be checked against their run",
                    parquet_dir, io.MANIFEST)
        return
    run_id = manifest.get("run_id")
    for name, want in _expected_files(manifest).items():
        path = Path(parquet_dir) / name
        if not path.exists():
            _read_schema(path)  # the missing-file message
        size = path.stat().st_size
        if want["bytes"] is not None and size != want["bytes"]:
            raise DataError(
                f"{path}: {size} bytes, but {io.MANIFEST} of run {run_id} records "
                f"{want['bytes']}: the artefacts are not from one run (or the file is damaged)"
            )
        if want["rows"] is not None:
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{path}: not a readable parquet file: {exc}") from exc
            if rows != want["rows"]:
                raise DataError(
                    f"{path}: {rows} rows, but {io.MANIFEST} of run {run_id} records "
                    f"{want['rows']}: the artefacts are not from one run"
                )


def _file_state(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def load_artefacts(parquet_dir: Path) -> Artefacts:
    """Read and check the four artefacts the service needs; DataError names a bad file.

    Checks, in order: every file is there; sizes and row counts match manifest.json (one run);
    columns and types; no empty values; rows sorted; every track id in items.parquet; scores
    finite; no file changed while it was read. Any failure leaves nothing half-loaded."""
    started = time.perf_counter()
    parquet_dir = Path(parquet_dir)
    paths = {name: parquet_dir / name for name in SERVICE_FILES}
    for path in paths.values():  # fail fast, before the long reads
        if not path.exists():
            _read_schema(path)
    manifest = read_manifest(parquet_dir)
    check_manifest(parquet_dir, manifest)
    states = {name: _file_state(path) for name, path in paths.items()}

    t = time.perf_counter()
    items, item_ids, item_rows = _load_items(paths[io.ITEMS])
    catalogue = Catalogue(item_ids)
    log.info("items: %d tracks in %.1f s", item_ids.size, time.perf_counter() - t)
    t = time.perf_counter()
    popular = _load_popular(paths[io.TOP_POPULAR], catalogue)
    log.info("top popular: %d tracks in %.1f s", popular.size, time.perf_counter() - t)
    t = time.perf_counter()
    similar = _load_ranked(paths[io.SIMILAR], C.track, C.similar, True, catalogue)
    log.info("similar: %d tracks, %d pairs in %.1f s", len(similar), similar.n_pairs,
             time.perf_counter() - t)
    t = time.perf_counter()
    offline = _load_ranked(paths[io.RECOMMENDATIONS], C.user, C.track, False, catalogue)
    log.info("recommendations: %d users, %d rows in %.1f s", len(offline), offline.n_pairs,
             time.perf_counter() - t)
    del catalogue

    for name, path in paths.items():
        if not path.exists() or _file_state(path) != states[name]:
            raise DataError(f"{path}: changed while it was being read (a pipeline run is "
                            "publishing a new set?); the next reload will pick the new set up")
    if manifest != read_manifest(parquet_dir):
        raise DataError(f"{parquet_dir / io.MANIFEST}: changed while the artefacts were read")

    built_at = manifest.get("built_at") if manifest else None
    run_id = manifest.get("run_id") if manifest else None
    if built_at is None:
        mtime = paths[io.RECOMMENDATIONS].stat().st_mtime
        built_at = datetime.fromtimestamp(mtime, UTC).isoformat()
    pa.default_memory_pool().release_unused()  # hand the read buffers back to the OS now
    seconds = time.perf_counter() - started
    log.info("artefacts of run %s from %s loaded in %.1f s", run_id, parquet_dir, seconds)
    return Artefacts(
        parquet_dir=parquet_dir, items=items, item_ids=item_ids, item_rows=item_rows,
        popular=popular, similar=similar, offline=offline, built_at=built_at,
        run_id=None if run_id is None else str(run_id), load_seconds=round(seconds, 3),
    )


# --- the recommender ----------------------------------------------------------------------


def blended_list(
    online: Iterable[int],
    offline: Iterable[int],
    mode: str = "strict",
    p: float = 0.5,
    seed: int | Sequence[int] | None = None,
    limit: int | None = None,
) -> list[int]:
    """Mix two ranked lists into one without duplicates (API.md, "Blend"); stop after
    ``limit`` elements when given.

    'strict': the online head, then the offline head, in turn; 'probability': each next
    element comes from the online list with probability ``p``, else from the offline list,
    drawn from ``numpy.random.default_rng(seed)``. A duplicate is skipped and the same list
    gives its next element instead; when one list runs out the rest of the other follows.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend {mode!r}; expected one of {', '.join(BLEND_MODES)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    lists = ([int(x) for x in online], [int(x) for x in offline])
    heads = [0, 0]
    draws = None
    if mode == "probability":
        draws = np.random.default_rng(seed).random(len(lists[0]) + len(lists[1])) < p
    result: list[int] = []
    seen: set[int] = set()
    step = 0
    limit = len(lists[0]) + len(lists[1]) if limit is None else limit
    while (heads[0] < len(lists[0]) or heads[1] < len(lists[1])) and len(result) < limit:
        if heads[0] >= len(lists[0]):
            side = 1
        elif heads[1] >= len(lists[1]):
            side = 0
        elif draws is None:
            side = step % 2
        else:
            side = 0 if draws[step] else 1
        step += 1
        source = lists[side]
        while heads[side] < len(source):
            item = source[heads[side]]
            heads[side] += 1
            if item not in seen:
                seen.add(item)
                result.append(item)
                break
    return result


def request_seed(user_id: int, k: int, p: float) -> list[int]:
    """The seed of a 'probability' blend: the same request always gives the same answer."""
    return [int(user_id), int(k), int(round(p * 1_000_000))]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for a sorted unique ``sorted_set``: one binary search
    per value, several times faster than isin on the short arrays of a request."""
    if sorted_set.size == 0:
        return np.zeros(values.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values


@dataclass
class Answer:
    tracks: list[int]
    kinds: tuple[str, ...]


class Recommendations:
    """Offline recommendations, similar tracks and online history, blended per request."""

    def __init__(self, settings: Settings, store: HistoryStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self._artefacts: Artefacts | None = None
        self._stats = dict.fromkeys(KINDS, 0)
        self._stats_lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one load at a time (watcher, admin, signal)
        self.last_reload: dict[str, Any] | None = None
        self.started_at = datetime.now(UTC).isoformat()

    # -- life cycle --------------------------------------------------------------------------

    def load(self, parquet_dir: Path | None = None) -> Artefacts:
        """Read the artefacts and switch to them at once (the old set serves until then).
        Raises DataError naming the bad file; the old set (if any) then stays in place."""
        with self._reload_lock:
            artefacts = load_artefacts(Path(parquet_dir or self.settings.parquet_dir))
            # one reference assignment: a request holds either the old set or the new one
            self._artefacts = artefacts
        return artefacts

    def reload(self, reason: str = "request") -> dict[str, Any]:
        """Load the folder's current set and switch to it, or keep the old one if the new
        set is broken. Returns (and remembers) what happened, for /health and the admin."""
        previous = self._artefacts.run_id if self._artefacts is not None else None
        started = time.perf_counter()
        try:
            art = self.load()
            result: dict[str, Any] = {"reloaded": True, "run_id": art.run_id,
                                      "previous_run_id": previous, "error": None}
            log.info("reload (%s): now serving run %s (was %s)", reason, art.run_id, previous)
        except DataError as exc:
            result = {"reloaded": False, "run_id": previous, "previous_run_id": previous,
                      "error": str(exc)}
            log.error("reload (%s) refused, still serving run %s: %s", reason, previous, exc)
        result.update(reason=reason, seconds=round(time.perf_counter() - started, 3),
                      at=datetime.now(UTC).isoformat())
        self.last_reload = result
        return result

    def watch_manifest(self, stop: threading.Event, interval: float) -> None:
        """Reload when manifest.json names another run (the pipeline writes it last, after
        every file of the run is in place). A refused set is not retried until the manifest
        changes again. Runs in a daemon thread until ``stop`` is set."""
        path = Path(self.settings.parquet_dir) / io.MANIFEST
        tried: tuple[Any, ...] | None = None
        while not stop.wait(interval):
            try:
                info = read_manifest(Path(self.settings.parquet_dir))
                state = (info.get("run_id") if info else None, path.stat().st_mtime_ns)
            except (DataError, OSError) as exc:
                log.debug("manifest watch: %s", exc)
                continue
            current = self._artefacts.run_id if self._artefacts is not None else None
            if state[0] is None or state[0] == current or state == tried:
                continue
            tried = state
            self.reload(reason=f"manifest.json names run {state[0]}")

    def open_store(self) -> HistoryStore:
        if self.store is None:
            self.store = open_history_store(self.settings.history_url)
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    @property
    def artefacts(self) -> Artefacts:
        if self._artefacts is None:
            raise NotReadyError("artefacts are not loaded")
        return self._artefacts

    @property
    def history(self) -> HistoryStore:
        if self.store is None:
            raise HistoryStoreError("history store is not open")
        return self.store

    def ready(self) -> bool:
        return self._artefacts is not None and self.store is not None and self.store.ping()

    # -- checks ------------------------------------------------------------------------------

    def check_k(self, k: int | None, loc: Sequence[str | int] = ("query", "k")) -> int:
        k = self.settings.default_k if k is None else int(k)
        if not 1 <= k <= self.settings.max_k:
            raise BadParameterError(loc, f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    def check_known(
        self, track_ids: Sequence[int], loc: Sequence[str | int] = ("body",),
        art: Artefacts | None = None,
    ) -> None:
        unknown = (art or self.artefacts).unknown_tracks(track_ids)
        if unknown:
            raise UnknownTracksError(unknown, loc)

    # -- the user's methods ------------------------------------------------------------------

    def get_user_history(self, user_id: int) -> list[int]:
        """The user's online history, oldest first."""
        return self.history.get(user_id)

    def update_user_events(
        self, user_id: int, track_ids: Sequence[int], art: Artefacts | None = None
    ) -> int:
        """Append listening events (all or none); returns the new history length."""
        if not track_ids:
            raise BadParameterError(("body",), "at least one track id is required")
        self.check_known(track_ids, art=art)
        return self.history.add(user_id, track_ids)

    def get_similar_items(
        self, track_ids: Sequence[int], k: int | None = None, exclude: Iterable[int] = (),
        art: Artefacts | None = None,
    ) -> list[int]:
        """Up to k tracks most similar to the given ones (scores summed), none of them in it.
        ``art``: the set to answer from (default: the current one)."""
        k = self.check_k(k)
        art = art or self.artefacts  # one set for the whole request, even during a reload
        unknown = art.unknown_tracks(track_ids)
        if unknown:
            raise UnknownTracksError(unknown, ("query", C.track))
        given = list(dict.fromkeys(int(t) for t in track_ids))
        excluded = np.unique(np.asarray([*given, *exclude], dtype=np.int64))
        ranked = self._similar_ranked(art, given, np.ones(len(given)), excluded)
        return [int(t) for t in ranked[:k]]

    def get(
        self, user_id: int, k: int | None = None, blend: str = "strict", p: float = 0.5
    ) -> list[int]:
        """Exactly k recommendations for the user (see ``recommend`` for the source)."""
        return self.recommend(user_id, k, blend, p).tracks

    def recommend(
        self, user_id: int, k: int | None = None, blend: str = "strict", p: float = 0.5,
        art: Artefacts | None = None,
    ) -> Answer:
        """Recommendations and the kinds they count as (API.md, "Which recommendations");
        ``art``: the set to answer from (default: the current one)."""
        k = self.check_k(k)
        if blend not in BLEND_MODES:
            raise BadParameterError(("query", "blend"), f"blend must be one of {BLEND_MODES}")
        if not 0.0 <= p <= 1.0:
            raise BadParameterError(("query", "p"), f"p must be in [0, 1], got {p}")
        art = art or self.artefacts
        history = self.history.get(user_id)
        heard = np.unique(np.asarray(history, dtype=np.int64))
        offline, _ = art.offline.row(user_id)
        has_offline = user_id in art.offline
        if heard.size and offline.size:
            offline = offline[~_member(offline, heard)]
        online = self._online_list(art, history, heard) if history else np.empty(0, np.int32)

        if has_offline and history:
            kinds: tuple[str, ...] = ("personal", "similar")
            # the first k of a blend take at most k elements of each list (each element taken
            # or skipped as a duplicate is one of the k answers): 2k of each is plenty
            tracks = blended_list(online[:2 * k], offline[:2 * k], blend, p,
                                  request_seed(user_id, k, p), limit=k)
        elif history:
            kinds, tracks = ("similar",), [int(t) for t in online[:k]]
        elif has_offline:  # dict.fromkeys: no duplicates even if a row repeated a track
            kinds, tracks = ("personal",), list(dict.fromkeys(int(t) for t in offline[:2 * k]))
        else:
            kinds, tracks = ("default",), []
        tracks = self._fill(art, tracks[:k], heard, k)
        with self._stats_lock:
            for kind in kinds:
                self._stats[kind] += 1
        return Answer(tracks, kinds)

    def top_popular(self, k: int | None = None, art: Artefacts | None = None) -> list[int]:
        k = self.check_k(k)
        return self._fill(art or self.artefacts, [], np.empty(0, np.int64), k)

    def stats(self) -> dict[str, Any]:
        """How often each kind was served by this worker process."""
        with self._stats_lock:
            counters = dict(self._stats)
        return {**counters, "pid": os.getpid(), "since": self.started_at}

    # -- internals ---------------------------------------------------------------------------

    def _online_list(self, art: Artefacts, history: list[int], heard: np.ndarray) -> np.ndarray:
        """Tracks similar to the most recent distinct online events; the latest weighs most
        (weight 1 / (1 + age), age 0 = latest)."""
        recent: list[int] = []
        seen: set[int] = set()
        for track in reversed(history):
            if track not in seen:
                seen.add(track)
                recent.append(track)
                if len(recent) == self.settings.online_history_window:
                    break
        weights = 1.0 / (1.0 + np.arange(len(recent)))
        return self._similar_ranked(art, recent, weights, heard)

    @staticmethod
    def _similar_ranked(
        art: Artefacts, track_ids: Sequence[int], weights: np.ndarray, exclude: np.ndarray
    ) -> np.ndarray:
        """Tracks similar to ``track_ids``, scores weighted and summed, best first (ties by
        id), without the tracks of ``exclude`` (sorted and unique)."""
        sim = art.similar
        rows = sim.positions(np.asarray(track_ids, dtype=np.int64))
        found = rows >= 0
        rows, weights = rows[found], np.asarray(weights, dtype=np.float64)[found]
        starts, lengths = sim.offsets[rows], sim.offsets[rows + 1] - sim.offsets[rows]
        n = int(lengths.sum())
        if n == 0 or sim.scores is None:
            return np.empty(0, np.int32)
        # the concatenated rows, gathered with one index array instead of a loop over rows
        index = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(n)
        values = sim.values[index]
        scores = sim.scores[index] * np.repeat(weights, lengths)
        # group equal ids: a stable sort keeps each id's scores in input order, so the sums
        # are the same as summing row by row
        order = np.argsort(values, kind="stable")
        values = values[order]
        first = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        uniq, total = values[first], np.add.reduceat(scores[order], first)
        keep = ~_member(uniq, exclude)
        uniq, total = uniq[keep], total[keep]
        return uniq[np.argsort(-total, kind="stable")]  # best first; uniq is sorted: ties by id

    @staticmethod
    def _fill(art: Artefacts, tracks: list[int], exclude: np.ndarray, k: int) -> list[int]:
        """Top up to k from the top popular tracks not yet in the list nor heard, then (when
        the popular list runs dry) from the rest of the catalogue."""
        if len(tracks) >= k:
            return tracks[:k]
        taken = np.concatenate([np.asarray(exclude, np.int64), np.asarray(tracks, np.int64)])
        result = list(tracks)
        for pool in (art.popular, art.item_ids):
            chunk = max(4 * k, 1024)
            for start in range(0, pool.size, chunk):
                part = pool[start:start + chunk]
                part = part[~np.isin(part, taken)]
                need = k - len(result)
                extra = part[:need]
                result.extend(int(t) for t in extra)
                taken = np.concatenate([taken, extra.astype(np.int64)])
                if len(result) >= k:
                    return result
        return result


# --- HTTP ---------------------------------------------------------------------------------


class JSONBytes(Response):
    """JSON serialised by orjson (numpy-free plain lists and dicts)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


TrackId = Annotated[int, Field(ge=0, le=INT32_MAX)]
StrictTrackId = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
UserIdPath = Annotated[
    int, PathParam(ge=0, le=INT32_MAX, description="user id of the input data", examples=[17])
]
KPath = Annotated[int, PathParam(ge=1, description="number of tracks, 1..max_k", examples=[10])]
KQuery = Annotated[
    int | None, Query(ge=1, description="number of tracks, 1..max_k (default 25)")
]
Details = Annotated[
    bool, Query(description="objects with names instead of bare track ids")
]


class TrackDetails(BaseModel):
    track_id: int
    name: str | None
    artists: list[str]
    albums: list[str]
    genres: list[str]


TrackList = list[int] | list[TrackDetails]


class RecommendationRequest(BaseModel):
    """Body of POST /recommendations; same defaults as the GET form."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"user_id": 17, "k": 10, "blend": "strict", "p": 0.5}]
        },
    )
    user_id: StrictTrackId = Field(description="user id of the input data")
    k: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="number of tracks, 1..max_k (default 25)"
    )
    blend: BlendMode = Field("strict", description="how online and offline lists are mixed")
    p: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False, description="probability of the online list"
    )


class HistoryAdded(BaseModel):
    user_id: int
    added: int
    history_length: int


class Health(BaseModel):
    status: str
    artefacts_loaded: bool
    history_store: bool
    run_id: str | None = None
    reload_error: str | None = Field(None, description="why the last reload was refused")


class ProblemItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """Every 4xx/5xx answer: a readable ``message`` and FastAPI's list form in ``detail``."""

    message: str
    detail: list[ProblemItem]
    unknown_track_ids: list[int] | None = None


class ReloadResult(BaseModel):
    reloaded: bool
    run_id: str | None
    previous_run_id: str | None
    error: str | None
    reason: str
    seconds: float
    at: str


async def get_recs(request: Request) -> Recommendations:
    recs = getattr(request.app.state, "recs", None)
    if recs is None:
        raise NotReadyError("the service is starting: artefacts are not loaded yet")
    return recs


async def get_artefacts(recs: Annotated[Recommendations, Depends(get_recs)]) -> Artefacts:
    """The artefact set of this request, taken once: a reload in the middle of the request
    does not mix two sets in one answer."""
    return recs.artefacts


def current(request: Request) -> tuple[Recommendations, Artefacts]:
    """What ``Recs`` and ``Art`` give, without FastAPI's dependency machinery (hot path)."""
    recs = request.app.state.recs
    if recs is None:
        raise NotReadyError("the service is starting: artefacts are not loaded yet")
    return recs, recs.artefacts


Recs = Annotated[Recommendations, Depends(get_recs)]
Art = Annotated[Artefacts, Depends(get_artefacts)]


def _list_response(art: Artefacts, tracks: list[int], details: bool, **headers: str
                   ) -> JSONBytes:
    body = art.details(tracks) if details else tracks
    return JSONBytes(body, headers=headers or None)


def _problem_response(
    status: int, problems: list[dict[str, Any]], headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONBytes:
    message = "; ".join(
        (" ".join(str(part) for part in p["loc"]) + ": " if p["loc"] else "") + p["msg"]
        for p in problems
    )
    return JSONBytes({"message": message, "detail": problems, **extra}, status_code=status,
                     headers=headers)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def install_error_handlers(app: FastAPI) -> None:
    """Every domain error and every validation error becomes a JSON answer with a readable
    ``message``; ``detail`` keeps FastAPI's list form (loc, msg, type)."""

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONBytes:
        problems = []
        for err in exc.errors():
            msg = err.get("msg", "invalid value")
            if "input" in err and err.get("type") not in ("missing", "json_invalid"):
                msg = f"{msg} (got {_short(err['input'])})"
            loc = [part if isinstance(part, int) else str(part) for part in err.get("loc", [])]
            problems.append({"loc": loc, "msg": msg, "type": str(err.get("type", "invalid"))})
        return _problem_response(422, problems)

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONBytes:
        # 404 of an unknown path, 405 of a wrong method, 401/403 of the admin endpoint; a
        # body FastAPI cannot even decode (400) is bad input like malformed JSON: 422
        if exc.status_code == 400:
            problems = [{"loc": ["body"], "msg": f"malformed body: {exc.detail}",
                         "type": "body_unreadable"}]
            return _problem_response(422, problems)
        problems = [{"loc": [], "msg": str(exc.detail), "type": f"http_{exc.status_code}"}]
        return _problem_response(exc.status_code, problems, headers=exc.headers)

    async def on_service_error(_: Request, exc: Exception) -> JSONBytes:
        status = next(
            (code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 400
        )
        problems = (
            exc.problems() if isinstance(exc, ServiceError)
            else [{"loc": [], "msg": str(exc), "type": type(exc).__name__}]
        )
        if status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc)
        extra = {"unknown_track_ids": exc.track_ids} if isinstance(exc, UnknownTracksError) else {}
        return _problem_response(status, problems, **extra)

    async def on_unexpected(_: Request, exc: Exception) -> JSONBytes:
        log.exception("unexpected error")
        return _problem_response(
            500, [{"loc": [], "msg": f"internal error: {type(exc).__name__}", "type": "internal"}]
        )

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(HistoryStoreError, on_service_error)
    app.add_exception_handler(Exception, on_unexpected)


def check_admin(recs: Recs, authorization: str | None) -> None:
    """``Authorization: Bearer <settings.admin_token>``; the endpoint is off without a token."""
    token = recs.settings.admin_token
    if not token:
        raise HTTPException(403, "the admin endpoint is off: set MUSICREC_ADMIN_TOKEN")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode("utf-8", "replace"), token.encode("utf-8")
    ):
        raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required",
                            headers={"WWW-Authenticate": "Bearer"})


RECOMMENDATION_HEADERS = {200: {"headers": {SOURCE_HEADER: {
    "description": "kinds served: personal, similar, default (joined by +)",
    "schema": {"type": "string"}}}}}


def add_routes(app: FastAPI) -> None:
    """The endpoints of API.md, plus POST /admin/reload.

    Reads are ``async def``: they run on the event loop with no thread-pool hop (their work
    is a binary search, a few small numpy calls and one indexed SQLite read on a connection
    no writer holds). Writes (POST /history waits for an fsync) and the admin reload (seconds
    of loading) are plain ``def`` and run in the thread pool, off the event loop."""

    @app.get("/", summary="what is loaded")
    async def root(recs: Recs, art: Art) -> JSONBytes:
        return JSONBytes({
            "status": "ok",
            "users_with_recommendations": len(art.offline),
            "recommendation_rows": art.offline.n_pairs,
            "tracks": int(art.item_ids.size),
            "tracks_with_similar": len(art.similar),
            "similar_pairs": art.similar.n_pairs,
            "top_popular": int(art.popular.size),
            "built_at": art.built_at,
            "run_id": art.run_id,
            "loaded_at": art.loaded_at,
            "load_seconds": art.load_seconds,
            "max_k": recs.settings.max_k,
            "default_k": recs.settings.default_k,
        })

    @app.get("/top_popular", response_model=TrackList, summary="most popular tracks")
    async def top_popular_default(recs: Recs, art: Art, details: Details = False) -> JSONBytes:
        return _list_response(art, recs.top_popular(None, art), details)

    @app.get("/top_popular/{k}", response_model=TrackList, summary="k most popular tracks")
    async def top_popular(k: KPath, recs: Recs, art: Art, details: Details = False) -> JSONBytes:
        return _list_response(art, recs.top_popular(recs.check_k(k, ("path", "k")), art),
                              details)

    @app.get("/similar/{k}", response_model=TrackList, summary="tracks similar to given ones")
    async def similar_get(
        k: KPath,
        recs: Recs,
        art: Art,
        track_id: Annotated[
            list[TrackId],
            Query(min_length=1, max_length=MAX_QUERY_TRACKS,
                  description=f"a given track id (repeatable, up to {MAX_QUERY_TRACKS}; "
                  "POST for more)", examples=[[26]]),
        ],
        details: Details = False,
    ) -> JSONBytes:
        recs.check_k(k, ("path", "k"))
        return _list_response(art, recs.get_similar_items(track_id, k, art=art), details)

    @app.post("/similar/{k}", response_model=TrackList, summary="tracks similar to given ones")
    async def similar_post(
        k: KPath,
        recs: Recs,
        art: Art,
        track_ids: Annotated[
            list[StrictTrackId],
            Body(min_length=1, max_length=MAX_HISTORY_BATCH, examples=[[26, 38]]),
        ],
        details: Details = False,
    ) -> JSONBytes:
        recs.check_k(k, ("path", "k"))
        return _list_response(art, recs.get_similar_items(track_ids, k, art=art), details)

    @app.get("/history/{user_id}", response_model=TrackList, summary="online history")
    async def history_get(
        user_id: UserIdPath, recs: Recs, art: Art, details: Details = False
    ) -> JSONBytes:
        return _list_response(art, recs.get_user_history(user_id), details)

    @app.post("/history/{user_id}", response_model=HistoryAdded, summary="add listening events")
    def history_post(
        user_id: UserIdPath,
        recs: Recs,
        art: Art,
        track_ids: Annotated[
            list[StrictTrackId],
            Body(
                min_length=1, max_length=MAX_HISTORY_BATCH, examples=[[26, 38]],
                description="track ids listened to, oldest first (stored all or none)",
            ),
        ],
    ) -> JSONBytes:
        length = recs.update_user_events(user_id, track_ids, art=art)
        return JSONBytes(
            {"user_id": user_id, "added": len(track_ids), "history_length": length}
        )

    @app.get("/recommendations/{user_id}", response_model=TrackList, summary="recommendations",
             responses=RECOMMENDATION_HEADERS)
    async def recommendations_get(
        user_id: UserIdPath,
        http: Request,
        k: KQuery = None,
        blend: Annotated[BlendMode, Query(description="strict or probability")] = "strict",
        p: Annotated[
            float, Query(ge=0, le=1, allow_inf_nan=False, description="online share")
        ] = 0.5,
        details: Details = False,
    ) -> JSONBytes:
        recs, art = current(http)  # the hot path: no dependency resolution
        answer = recs.recommend(user_id, k, blend, p, art=art)
        return _list_response(
            art, answer.tracks, details, **{SOURCE_HEADER: "+".join(answer.kinds)}
        )

    @app.post("/recommendations", response_model=TrackList, summary="recommendations",
              responses=RECOMMENDATION_HEADERS)
    async def recommendations_post(
        request: RecommendationRequest, http: Request, details: Details = False
    ) -> JSONBytes:
        recs, art = current(http)
        recs.check_k(request.k, ("body", "k"))
        answer = recs.recommend(request.user_id, request.k, request.blend, request.p, art=art)
        return _list_response(
            art, answer.tracks, details, **{SOURCE_HEADER: "+".join(answer.kinds)}
        )

    @app.get("/stats", summary="how often each kind was served (this worker)")
    async def stats(recs: Recs) -> JSONBytes:
        return JSONBytes(recs.stats())

    @app.get(
        "/health", response_model=Health, summary="ready to serve",
        responses={503: {"model": Health, "description": "not ready"}},
    )
    async def health(request: Request) -> JSONBytes:
        recs: Recommendations | None = getattr(request.app.state, "recs", None)
        art = recs._artefacts if recs is not None else None
        store_ok = recs is not None and recs.store is not None and recs.store.ping()
        ok = art is not None and store_ok
        last = recs.last_reload if recs is not None else None
        return JSONBytes(
            {"status": "ok" if ok else "unavailable", "artefacts_loaded": art is not None,
             "history_store": store_ok, "run_id": art.run_id if art is not None else None,
             "reload_error": last["error"] if last else None},
            status_code=200 if ok else 503,
        )

    @app.post(
        "/admin/reload", response_model=ReloadResult, summary="switch to the folder's new set",
        description="Loads and checks the artefact set now in the folder and switches this "
        "worker to it; a broken set is refused (409) and the old one keeps serving. Other "
        "workers follow through the manifest watch. Needs `Authorization: Bearer <token>`.",
        responses={401: {"model": Problem}, 403: {"model": Problem},
                   409: {"model": ReloadResult, "description": "the new set was refused"}},
    )
    def admin_reload(
        recs: Recs,
        authorization: Annotated[str | None, Header(description="Bearer <admin token>")] = None,
    ) -> JSONBytes:
        check_admin(recs, authorization)
        result = recs.reload(reason="POST /admin/reload")
        return JSONBytes(result, status_code=200 if result["reloaded"] else 409)


DESCRIPTION = """
Personal track recommendations: offline (ALS + ranker) lists, tracks similar to the online
history, and the most popular tracks, blended per request. Ids are the input data's ids.
Every list endpoint takes `?details=true` for names instead of ids. Bad input gets a 4xx with
a `message` naming the problem.
"""

COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "bad input, named in `message`"},
    503: {"model": Problem, "description": "not ready: artefacts or history store unavailable"},
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; ``settings`` default to ``Settings()`` built at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not logging.getLogger().handlers:  # under the uvicorn CLI our INFO lines show too
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        current = settings if settings is not None else Settings()
        recs = Recommendations(current)
        recs.load()  # raises DataError naming the file: the service refuses to start
        recs.open_store()
        app.state.recs = recs
        stop = threading.Event()
        if current.reload_poll_seconds > 0:
            threading.Thread(
                target=recs.watch_manifest, args=(stop, current.reload_poll_seconds),
                name="manifest-watch", daemon=True,
            ).start()
        log.info("ready: run %s, history store %s", recs.artefacts.run_id, current.history_url)
        try:
            yield
        finally:
            stop.set()
            app.state.recs = None
            recs.close()

    app = FastAPI(
        title="Music recommendations", version="1.0", description=DESCRIPTION,
        lifespan=lifespan, responses=COMMON_RESPONSES,
    )
    app.state.recs = None
    install_error_handlers(app)
    add_routes(app)
    return app


app = create_app()


def main() -> None:
    """``python recommendation_service.py``: uvicorn with host, port, workers from settings."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = Settings()
    uvicorn.run(
        "recommendation_service:app", host=settings.host, port=settings.port,
        workers=settings.workers,
    )


if __name__ == "__main__":
    main()
