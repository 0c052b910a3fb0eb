"""The recommendation service: FastAPI app and the ``Recommendations`` class.

Start it with ``uvicorn recommendation_service:app`` or ``python recommendation_service.py``
(host, port and workers from ``MUSICREC_`` settings). The HTTP contract is docs/API.md.

At start-up the lifespan opens the artefacts of the offline pipeline in
``settings.parquet_dir`` (items, top_popular, similar, recommendations) as numpy arrays in
CSR form — sorted unique keys, row offsets, values — so a request costs one binary search
whatever the number of users, and opens the online history store (``settings.history_url``).
The arrays are memory-mapped from the served form the pipeline publishes beside the parquet
files (``musicrec.served``: ``.npy`` / Arrow files with CRC-32 checksums in the manifest), so
every worker shares one copy through the page cache and starts in about a second; a folder
without it is read from parquet into private memory, with a warning naming
``python -m musicrec publish``. A missing or unusable artefact stops the start-up with a
message naming the file.

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

import asyncio
import fcntl
import functools
import hashlib
import importlib.resources
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Body, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from musicrec import io, online, served
from musicrec.arrays import lookup_sorted
from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.history import (
    Added,
    HistoryPage,
    HistoryStore,
    HistoryStoreBusy,
    HistoryStoreError,
    HistoryStoreFull,
    IdempotencyKeyReused,
    open_history_store,
)
from musicrec.online import blend as _blend  # one blend for the service and the replay
from musicrec.settings import Settings
from musicrec.telemetry import (
    RequestTelemetry,
    ServiceMetrics,
    configure_logging,
    metrics_directory,
)

log = logging.getLogger("recommendation_service")

INT32_MAX = 2**31 - 1
MAX_HISTORY_BATCH = 10_000
MAX_IDEMPOTENCY_KEY = 255
HISTORY_READ_THREADS = 4  # per worker: history reads off the event loop (read_store)
READ_DEADLINE_MARGIN = 0.2  # seconds a read may take beyond the busy timeout
# GET /similar: ids in the query string; 500 keeps the URL (~11 kB) well inside what the HTTP
# parser accepts, so a longer list is our 422, not the server's bare 400 (found by fuzzing)
MAX_QUERY_TRACKS = 500
BLEND_MODES = ("strict", "probability")
POPULAR_HEAD = 2048  # popular tracks kept as Python ints for filling lists
NOTHING_HEARD: frozenset[int] = frozenset()
POSITION_BITS = 32  # (track id < 2**31) << 32 | position: still a positive int64
POSITION_MASK = np.int64(2**POSITION_BITS - 1)
KINDS = ("personal", "similar", "default", "fold-in")
SOURCE_HEADER = "X-Recommendation-Source"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

BlendMode = Literal["strict", "probability"]
T = TypeVar("T")


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


ERROR_STATUS: dict[type[Exception], int] = {  # the first class that matches wins
    BadParameterError: 422,
    UnknownTracksError: 422,
    NotReadyError: 503,
    HistoryStoreBusy: 503,  # with Retry-After
    HistoryStoreFull: 507,  # Insufficient Storage: nothing of the write was stored
    HistoryStoreError: 503,  # with Retry-After
    IdempotencyKeyReused: 422,
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
        keys, offsets = served.csr_offsets(key_column)
        return cls(keys, offsets, values, scores)

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
        out[valid] = lookup_sorted(self.keys, keys[valid].astype(np.int32))
        return out

    def __contains__(self, key: int) -> bool:
        return self.position(int(key)) >= 0

    def values_of(self, key: int) -> np.ndarray | None:
        """The row of ``key`` (a read-only view), or None when the key has none: one binary
        search, no temporaries (the hot path)."""
        if not 0 <= key <= INT32_MAX or self.keys.size == 0:
            return None
        # an int32 needle: a Python int makes numpy cast the whole key array (~0.2 ms)
        i = int(self.keys.searchsorted(np.int32(key)))
        if i == self.keys.size or self.keys[i] != key:
            return None
        return self.values[self.offsets[i] : self.offsets[i + 1]]

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
    """Everything the service answers from, immutable once built, so a reload can swap the
    whole set at once while requests in flight keep the old one. The arrays are read-only
    maps of the served files (``mapped``) or, for a folder without them, private copies."""

    parquet_dir: Path
    items: pa.Table  # track_id, name, artists, albums, genres; sorted by track_id
    item_ids: np.ndarray  # sorted track ids of the catalogue (int32): row i of ``items``
    popular: np.ndarray  # track ids, most popular first
    similar: RankedLists  # track -> similar tracks with scores
    offline: RankedLists  # user -> offline recommendations (ranked)
    built_at: str | None = None
    run_id: str | None = None
    mapped: bool = False
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    load_seconds: float = 0.0
    # the head of the popular list as Python ints: filling a short list is a few set
    # lookups instead of several numpy calls on tiny arrays (the hot path)
    popular_head: tuple[int, ...] = ()
    # the ALS model for fold-in (None: the folder has no ALS served files) and the first
    # artist of each catalogue row as a code (-1: none), for the per-artist cap
    foldin: online.FoldInModel | None = None
    artist_codes: np.ndarray | None = None
    # answers computed from this set, per (user, k, blend, p), with the history they were
    # computed from (``Recommendations.recommend``); dies with the set, so a reload never
    # serves an answer of the old one
    answers: dict[tuple[int, int, str, float], tuple[tuple[int, int], Answer]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # files mapped on the word of the verified record, their CRC-32 still to check (in the
    # background, ``Recommendations.load``)
    pending: served.PendingChecks | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_served(cls, arrays: dict[str, Any], **fields: Any) -> Artefacts:
        """Build from ``musicrec.served``'s arrays (mapped or read), keyed by served file."""
        items = arrays[served.ITEMS]
        ids = items.column(C.track)
        item_ids = (
            ids.chunk(0).to_numpy(zero_copy_only=True)
            if ids.num_chunks == 1
            else ids.to_numpy().astype(np.int32, copy=False)
        )
        popular = arrays[served.POPULAR]
        factors = served.factor_arrays(arrays)
        return cls(
            items=items,
            item_ids=item_ids,
            popular=popular,
            similar=RankedLists(
                arrays[served.SIMILAR_KEYS],
                arrays[served.SIMILAR_OFFSETS],
                arrays[served.SIMILAR_VALUES],
                arrays[served.SIMILAR_SCORES],
            ),
            offline=RankedLists(
                arrays[served.OFFLINE_KEYS],
                arrays[served.OFFLINE_OFFSETS],
                arrays[served.OFFLINE_VALUES],
            ),
            popular_head=tuple(popular[:POPULAR_HEAD].tolist()),
            foldin=None if factors is None else online.model_from_arrays(factors),
            artist_codes=online.first_codes(items.column(C.artists)),
            **fields,
        )

    def artists_of(self, track_ids: list[int]) -> list[int]:
        """The first artist's code of each track (-1: unknown), for the per-artist cap."""
        if self.artist_codes is None or not track_ids:
            return [-1] * len(track_ids)
        rows = self._rows(np.asarray(track_ids, dtype=np.int64))
        codes = np.where(rows >= 0, self.artist_codes[np.maximum(rows, 0)], -1)
        return codes.tolist()

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
        # int32 needles, so item_ids is not cast to int64; items are sorted by id: row = position
        rows[valid] = lookup_sorted(self.item_ids, ids[valid].astype(np.int32))
        return rows

    def details(self, track_ids: Sequence[int]) -> list[dict[str, Any]]:
        """``{track_id, name, artists, albums, genres}`` for each id, in order."""
        ids = np.asarray(track_ids, dtype=np.int64)
        if ids.size == 0:
            return []
        rows_of = self._rows(ids)
        rows = self.items.take(pa.array(rows_of[rows_of >= 0])).to_pylist()
        by_id = {row[C.track]: row for row in rows}
        empty: dict[str, Any] = {C.name: None, C.artists: [], C.albums: [], C.genres: []}
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
        log.warning(
            "%s: no %s, the files cannot be checked against their run", parquet_dir, io.MANIFEST
        )
        return
    run_id = manifest.get("run_id")
    for name, want in _expected_files(manifest).items():
        path = Path(parquet_dir) / name
        if not path.exists():
            served.read_schema(path)  # the missing-file message
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


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def load_artefacts(parquet_dir: Path) -> Artefacts:
    """Open and check the artefacts the service needs; DataError names a bad file.

    Checks, in order: every parquet file is there; sizes and row counts match manifest.json
    (one run). Then, when the manifest records the served form (``musicrec.served``) made
    from these parquet files: each served file's size, array header and CRC-32 against the
    manifest, then it is memory-mapped (shared by every worker through the page cache). A
    file some process verified before and that has not changed since (``served.VERIFIED``)
    is mapped at once: its CRC-32 is left to ``Artefacts.pending``, for the caller to check.
    Otherwise (a folder made before the served form, or hand-made): the parquet files are
    read into this worker's memory with every content check (columns and types, no empty
    values, rows sorted, every track id in items.parquet, finite scores, page checksums), and
    a warning names the command that writes the shared form; the service still starts rather
    than refusing an older folder that is otherwise fine. Last: no file changed while it was
    read. Any failure leaves nothing half-loaded."""
    started = time.perf_counter()
    parquet_dir = Path(parquet_dir)
    paths = {name: parquet_dir / name for name in SERVICE_FILES}
    for path in paths.values():  # fail fast, before the long reads
        if not path.exists():
            served.read_schema(path)
    manifest = read_manifest(parquet_dir)
    check_manifest(parquet_dir, manifest)
    state = served.served_state(parquet_dir, manifest)
    if state.usable:
        assert manifest is not None
        arrays, identities, pending = served.open_served(parquet_dir, manifest, trust_verified=True)
        watched = {parquet_dir / name: identity for name, identity in identities.items()}
    else:
        log.warning(
            "%s: %s; reading the parquet files into this worker's own memory (a slow start "
            "and one private copy per worker). `%s` writes the shared, memory-mapped form.",
            parquet_dir,
            state.reason,
            served.PUBLISH_COMMAND.format(folder=parquet_dir),
        )
        watched = {path: _identity(path) for path in paths.values()}
        arrays = served.read_parquet_set(paths)
        pending = None
    try:
        for path, identity in watched.items():
            if not path.exists() or _identity(path) != identity:
                raise DataError(
                    f"{path}: changed while it was being read (a pipeline run is "
                    "publishing a new set?); the next reload will pick the new set up"
                )
        if manifest != read_manifest(parquet_dir):
            raise DataError(f"{parquet_dir / io.MANIFEST}: changed while the artefacts were read")
    except BaseException:
        if pending is not None:
            pending.close()
        raise

    built_at = manifest.get("built_at") if manifest else None
    run_id = manifest.get("run_id") if manifest else None
    if built_at is None:
        mtime = paths[io.RECOMMENDATIONS].stat().st_mtime
        built_at = datetime.fromtimestamp(mtime, UTC).isoformat()
    if not state.usable:
        pa.default_memory_pool().release_unused()  # hand the read buffers back to the OS now
    art = Artefacts.from_served(
        arrays,
        parquet_dir=parquet_dir,
        mapped=state.usable,
        built_at=built_at,
        run_id=None if run_id is None else str(run_id),
        pending=pending if pending is not None and pending.files else None,
    )
    seconds = time.perf_counter() - started
    object.__setattr__(art, "load_seconds", round(seconds, 3))
    log.info(
        "artefacts of run %s from %s %s in %.1f s%s",
        run_id,
        parquet_dir,
        "mapped" if state.usable else "read",
        seconds,
        f" ({len(art.pending.files)} files verified before: CRC-32 in the background)"
        if art.pending
        else "",
    )
    return art


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
    return _blend(_int_list(online), _int_list(offline), mode == "probability", p, seed, limit)


def _int_list(values: Iterable[int]) -> list[int]:
    """Python ints of a list or an array (``tolist`` is one C call for an array)."""
    if isinstance(values, np.ndarray):
        return values.tolist()
    return [int(x) for x in values]


def request_seed(user_id: int, k: int, p: float) -> list[int]:
    """The seed of a 'probability' blend: the same request always gives the same answer."""
    return [int(user_id), int(k), int(round(p * 1_000_000))]


RELOAD_LOCK = ".reload.lock"  # in the parquet folder; s3 push skips dot files


@contextmanager
def reload_lock(parquet_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` that the worker processes (and threads) of one machine take
    in turn around a load, so N workers never hold two artefact sets each at the same time.

    The lock file is ``.reload.lock`` in the artefact folder (shared by every process
    serving it) or, when the folder is read-only, a file in the temporary folder named after
    it. The kernel releases the lock when its holder dies, so a killed worker blocks no one.
    Without any lockable file the load goes ahead alone (logged)."""
    candidates = [
        Path(parquet_dir) / RELOAD_LOCK,
        Path(tempfile.gettempdir())
        / (
            "musicrec-reload-"
            + hashlib.sha256(str(Path(parquet_dir).resolve()).encode()).hexdigest()[:16]
            + ".lock"
        ),
    ]
    fd = -1
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            break
        except OSError as exc:
            log.debug("reload lock %s: %s", path, exc)
    if fd < 0:
        log.warning("no reload lock file can be opened for %s; loading without one", parquet_dir)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another worker loads
        yield
    finally:
        os.close(fd)  # releases the lock


def _without_folder(message: str, parquet_dir: Path) -> str:
    """A message with the artefact folder's path taken out (clients see file names only)."""
    for prefix in {str(Path(parquet_dir).resolve()), str(parquet_dir)}:
        if prefix not in (".", ""):
            message = message.replace(prefix + os.sep, "").replace(prefix, "<artefacts>")
    return message


def _short_error(message: str) -> str:
    """The head of an error message (``file: problem``), for /health; the log has it all."""
    parts = message.split(": ")
    return ": ".join(parts[:2])[:200]


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
        self.damaged: str | None = None  # why the set stopped serving (a failed CRC-32)
        self._stats = dict.fromkeys(KINDS, 0)
        self._stats_lock = threading.Lock()
        self._answers_lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one load at a time (watcher, admin, signal)
        self.last_reload: dict[str, Any] | None = None
        self.watch: dict[str, Any] | None = None  # the manifest watch's state, for /health
        self._read_pool: ThreadPoolExecutor | None = None  # history reads, off the loop
        self.started_at = datetime.now(UTC).isoformat()
        self.metrics: ServiceMetrics | None = None  # Prometheus counters (set by the lifespan)

    # -- life cycle --------------------------------------------------------------------------

    def load(self, parquet_dir: Path | None = None) -> Artefacts:
        """Read the artefacts and switch to them at once (the old set serves until then).
        Raises DataError naming the bad file; the old set (if any) then stays in place.
        Files mapped on the word of the verified record get their CRC-32 checked in a
        background thread (``check_pending``)."""
        with self._reload_lock:
            artefacts = load_artefacts(Path(parquet_dir or self.settings.parquet_dir))
            # one reference assignment: a request holds either the old set or the new one
            self._artefacts = artefacts
            self.damaged = None
        if artefacts.pending is not None:
            threading.Thread(
                target=self.check_pending, args=(artefacts,), name="artefact-check", daemon=True
            ).start()
        return artefacts

    def check_pending(self, art: Artefacts) -> None:
        """Compute the CRC-32 of the files ``art`` mapped unchecked, at the lowest CPU
        priority. A damaged file ends the serving of ``art`` (if it still serves): requests
        and /health answer 503 naming the damage, and the file is dropped from the
        verified record, so a restart or reload checks it in full and refuses it."""
        pending = art.pending
        if pending is None:
            return
        started = time.perf_counter()
        size = pending.bytes
        with suppress(OSError):  # Linux: a thread id names this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            count = pending.run()
        except DataError as exc:
            log.error("run %s: %s; this worker stops serving it", art.run_id, exc)
            with self._reload_lock:
                if self._artefacts is art:
                    self._artefacts = None
                    self.damaged = _without_folder(str(exc), art.parquet_dir)
            return
        log.info(
            "run %s: the %d files mapped before their check (%.0f MB) match their CRC-32 "
            "(%.1f s in the background)",
            art.run_id,
            count,
            size / 1e6,
            time.perf_counter() - started,
        )

    def reload(self, reason: str = "request") -> dict[str, Any]:
        """Load the folder's current set and switch to it, or keep the old one if the new
        set is broken. Returns (and remembers) what happened, for /health and the admin.

        Never raises: a bad set (DataError) and any other failure (a file vanishing,
        MemoryError, ...) are logged and reported, and the old set keeps serving. Loads of
        all the workers of this machine take turns (``reload_lock``), so at most one of them
        holds two sets at a time; a worker whose turn comes when the folder's run is already
        the one it serves skips the load."""
        previous = self._artefacts.run_id if self._artefacts is not None else None
        folder = Path(self.settings.parquet_dir)
        started = time.perf_counter()
        result: dict[str, Any] = {
            "reloaded": False,
            "skipped": False,
            "run_id": previous,
            "previous_run_id": previous,
            "error": None,
        }
        try:
            with reload_lock(folder):
                info = read_manifest(folder)
                run_id = info.get("run_id") if info else None
                if run_id is not None and previous is not None and str(run_id) == previous:
                    result["skipped"] = True
                    log.info(
                        "reload (%s): run %s is already served, nothing to do", reason, previous
                    )
                else:
                    art = self.load()
                    result.update(reloaded=True, run_id=art.run_id)
                    log.info(
                        "reload (%s): now serving run %s (was %s)", reason, art.run_id, previous
                    )
        except DataError as exc:
            result["error"] = _without_folder(str(exc), folder)
            log.error("reload (%s) refused, still serving run %s: %s", reason, previous, exc)
        except Exception as exc:  # noqa: BLE001 - a failed reload must never kill the caller
            result["error"] = (
                f"{type(exc).__name__} while loading the new set (details in the service log)"
            )
            result["transient"] = True
            log.exception("reload (%s) failed, still serving run %s", reason, previous)
        result.update(
            reason=reason,
            seconds=round(time.perf_counter() - started, 3),
            at=datetime.now(UTC).isoformat(),
        )
        self.last_reload = result
        if self.metrics is not None:
            self.metrics.reloaded(result)
        return result

    def watch_manifest(self, stop: threading.Event, interval: float) -> None:
        """Reload when manifest.json names another run (the pipeline writes it last, after
        every file of the run is in place). A set refused as bad is not retried until the
        manifest changes again; one that failed for another reason (memory, a file gone
        mid-read) is retried at the next poll. Runs in a daemon thread until ``stop`` is
        set; no error ends it: each is logged and shown in /health (``manifest_watch``)."""
        tried: tuple[str, int] | None = None
        self.watch = {
            "running": True,
            "interval_seconds": interval,
            "last_poll": None,
            "last_error": None,
            "last_error_at": None,
        }
        try:
            while not stop.wait(interval):
                try:
                    tried = self._poll_manifest(tried)
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive any failure
                    log.exception("manifest watch: the poll failed; still watching")
                    folder = Path(self.settings.parquet_dir)
                    self.watch.update(
                        last_error=_short_error(
                            _without_folder(f"{type(exc).__name__}: {exc}", folder)
                        ),
                        last_error_at=datetime.now(UTC).isoformat(),
                    )
                finally:
                    self.watch["last_poll"] = datetime.now(UTC).isoformat()
        finally:
            self.watch["running"] = False

    def _poll_manifest(self, tried: tuple[str, int] | None) -> tuple[str, int] | None:
        """One look at manifest.json; reloads when it names a run not served nor tried.
        Returns the (run, mtime) tried last."""
        folder = Path(self.settings.parquet_dir)
        info = read_manifest(folder)  # None when there is none (hand-made artefacts)
        run_id = info.get("run_id") if info else None
        if run_id is None:
            return tried
        state = (str(run_id), (folder / io.MANIFEST).stat().st_mtime_ns)
        current = self._artefacts.run_id if self._artefacts is not None else None
        if state[0] == current or state == tried:
            return tried
        result = self.reload(reason=f"manifest.json names run {state[0]}")
        if result["error"] is not None and not result.get("transient") and self.watch is not None:
            self.watch.update(last_error=_short_error(result["error"]), last_error_at=result["at"])
        return tried if result.get("transient") else state

    def open_store(self) -> HistoryStore:
        if self.store is None:
            s = self.settings
            self.store = open_history_store(
                s.history_url,
                max_events=s.history_max_events,
                read_timeout_ms=s.history_read_timeout_ms,
                write_timeout_ms=s.history_write_timeout_ms,
                idempotency_seconds=s.idempotency_seconds,
                cache_events=s.history_cache_events,
            )
        if self._read_pool is None:
            self._read_pool = ThreadPoolExecutor(
                HISTORY_READ_THREADS, thread_name_prefix="history-read"
            )
        return self.store

    async def read_store(self, read: Callable[..., T], *args: Any) -> T:
        """Run a history read in the read threads, off the event loop, and wait for it at
        most ``history_read_timeout_ms`` (plus a margin): past that, HistoryStoreBusy (503,
        Retry-After). A busy timeout alone does not bound a read: SQLite waits for a WAL
        read lock with its own retries (seconds) whatever the timeout, and a read on the
        loop would freeze every request of the worker, /health included."""
        if self._read_pool is None:
            raise HistoryStoreError("history store is not open")
        limit = self.settings.history_read_timeout_ms / 1000 + READ_DEADLINE_MARGIN
        future = asyncio.get_running_loop().run_in_executor(self._read_pool, read, *args)
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError as exc:
            raise HistoryStoreBusy(
                f"{self.store!r}: a read got no answer within {limit:.2f} s (locked?)"
            ) from exc

    async def user_history(self, user_id: int) -> list[int]:
        """The user's online history: from this worker's cache when no write to the user was
        acknowledged since it was read (SQLite: no thread hop, no query), from the store on
        the event loop when it reads asynchronously (Redis), else in the read threads
        (``read_store``)."""
        store = self.history
        hit = store.cached(user_id)
        if hit is not None:
            return hit
        aget = getattr(store, "aget", None)
        if aget is not None:
            history: list[int] = await aget(user_id)
            return history
        return await self.read_store(self.get_user_history, user_id)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=False, cancel_futures=True)
            self._read_pool = None

    @property
    def artefacts(self) -> Artefacts:
        if self._artefacts is None:
            raise NotReadyError(self.damaged or "artefacts are not loaded")
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
        self,
        track_ids: Sequence[int],
        loc: Sequence[str | int] = ("body",),
        art: Artefacts | None = None,
    ) -> None:
        unknown = (art or self.artefacts).unknown_tracks(track_ids)
        if unknown:
            raise UnknownTracksError(unknown, loc)

    # -- the user's methods ------------------------------------------------------------------

    def get_user_history(self, user_id: int) -> list[int]:
        """The user's online history, oldest first: the latest ``history_max_events`` events
        at most (the store keeps no more), in one indexed read."""
        return self.history.get(user_id)

    def history_page(
        self, user_id: int, limit: int | None = None, before: int | None = None
    ) -> HistoryPage:
        """The latest ``limit`` events (default and maximum from the settings) with a
        position below ``before``, oldest first."""
        limit = self.settings.history_page_default if limit is None else int(limit)
        top = self.settings.history_page_max
        if not 1 <= limit <= top:
            raise BadParameterError(
                ("query", "limit"), f"limit must be between 1 and {top}, got {limit}"
            )
        return self.history.page(user_id, limit, before)

    def update_user_events(
        self, user_id: int, track_ids: Sequence[int], art: Artefacts | None = None
    ) -> int:
        """Append listening events (all or none); returns the new history length."""
        return self.add_events(user_id, track_ids, art=art).history_length

    def add_events(
        self,
        user_id: int,
        track_ids: Sequence[int],
        art: Artefacts | None = None,
        idempotency_key: str | None = None,
    ) -> Added:
        """Append listening events (all or none); a repeated ``idempotency_key`` stores
        nothing and gives the first answer again."""
        if not track_ids:
            raise BadParameterError(("body",), "at least one track id is required")
        self.check_known(track_ids, art=art)
        try:
            added = self.history.append(user_id, track_ids, idempotency_key)
        except IdempotencyKeyReused as exc:
            raise BadParameterError(("header", "Idempotency-Key"), str(exc)) from exc
        if self.metrics is not None:
            self.metrics.history_written(len(track_ids), added.replayed)
        return added

    def get_similar_items(
        self,
        track_ids: Sequence[int],
        k: int | None = None,
        exclude: Iterable[int] = (),
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
        excluded = {*given, *(int(t) for t in exclude)}
        return self._similar_ranked(art, given, [1.0] * len(given), excluded, k)

    def get(
        self, user_id: int, k: int | None = None, blend: str = "strict", p: float = 0.5
    ) -> list[int]:
        """Exactly k recommendations for the user (see ``recommend`` for the source)."""
        return self.recommend(user_id, k, blend, p).tracks

    def recommend(
        self,
        user_id: int,
        k: int | None = None,
        blend: str = "strict",
        p: float = 0.5,
        art: Artefacts | None = None,
        history: list[int] | None = None,
    ) -> Answer:
        """Recommendations and the kinds they count as (API.md, "Which recommendations");
        ``art``: the set to answer from (default: the current one); ``history``: the
        user's online history when the caller read it already (the service reads it off
        the event loop, ``read_store``), else it is read here.

        The hot path: Python lists and sets for the short lists of a request (a numpy call
        costs more than a set lookup on 2k ids); numpy only where it gathers and sums the
        similar rows of the recent history."""
        k = self.check_k(k)
        if blend not in BLEND_MODES:
            raise BadParameterError(("query", "blend"), f"blend must be one of {BLEND_MODES}")
        if not 0.0 <= p <= 1.0:
            raise BadParameterError(("query", "p"), f"p must be in [0, 1], got {p}")
        art = art or self.artefacts
        if history is None:
            history = self.get_user_history(user_id)
        if self.settings.answer_cache_users > 0:
            key = (user_id, k, blend, p)
            stamp = (len(history), hash(tuple(history)))
            cached = art.answers.get(key)
            if cached is not None and cached[0] == stamp:
                answer = cached[1]
            else:
                answer = self._answer(art, user_id, k, blend, p, history)
                self._keep_answer(art, key, stamp, answer)
        else:
            answer = self._answer(art, user_id, k, blend, p, history)
        with self._stats_lock:
            for kind in answer.kinds:
                self._stats[kind] += 1
        if self.metrics is not None:
            self.metrics.served(answer.kinds)
        return Answer(list(answer.tracks), answer.kinds)

    def _keep_answer(
        self,
        art: Artefacts,
        key: tuple[int, int, str, float],
        stamp: tuple[int, int],
        answer: Answer,
    ) -> None:
        """Remember an answer for the same request with the same history (``answer_cache_users``
        of them per worker, the oldest dropped first)."""
        limit = self.settings.answer_cache_users
        with self._answers_lock:
            answers = art.answers
            answers.pop(key, None)
            answers[key] = (stamp, answer)
            while len(answers) > limit:
                del answers[next(iter(answers))]

    def _answer(
        self, art: Artefacts, user_id: int, k: int, blend: str, p: float, history: list[int]
    ) -> Answer:
        """The list ``recommend`` serves, computed."""
        row = art.offline.values_of(user_id)  # None: no offline list for the user
        heard: set[int] | frozenset[int] = NOTHING_HEARD
        cap = self.settings.artist_cap
        n = k if cap <= 0 else 2 * k  # candidates before the per-artist cap takes k
        if history:
            heard = set(history)
            folded = self._folded(art, user_id, history, 2 * n)
            if folded is not None and self.settings.online_method == "foldin":
                kinds: tuple[str, ...] = ("fold-in",)
                tracks = folded
            else:
                near = self._online_list(art, history, heard, 2 * n)
                if folded is not None:
                    kinds, second = ("fold-in", "similar"), folded
                elif row is not None:
                    kinds, second = (
                        ("personal", "similar"),
                        [t for t in row.tolist() if t not in heard][: 2 * n],
                    )
                else:
                    kinds, second = ("similar",), None
                # the first n of a blend take at most n elements of each list (each element
                # taken or skipped as a duplicate is one of the n answers): 2n is plenty
                tracks = (
                    near[:n]
                    if second is None
                    else _blend(
                        near,
                        second,
                        blend == "probability",
                        p,
                        request_seed(user_id, k, p),
                        limit=n,
                    )
                )
        elif row is not None:  # dict.fromkeys: no duplicates even if a row repeated a track
            kinds, tracks = ("personal",), list(dict.fromkeys(row[: 2 * n].tolist()))
        else:
            kinds, tracks = ("default",), []
        tracks = self._fill(art, tracks[:n], heard, n)
        if cap > 0:
            tracks = online.cap_per_artist(tracks, art.artists_of(tracks), cap, k)
        return Answer(tracks, kinds)

    def top_popular(self, k: int | None = None, art: Artefacts | None = None) -> list[int]:
        k = self.check_k(k)
        return self._fill(art or self.artefacts, [], NOTHING_HEARD, k)

    def stats(self) -> dict[str, Any]:
        """How often each kind was served by this worker process."""
        with self._stats_lock:
            counters = dict(self._stats)
        return {**counters, "pid": os.getpid(), "since": self.started_at}

    def reasons(
        self, user_id: int, history: list[int], answer: Answer, art: Artefacts | None = None
    ) -> list[dict[str, Any]]:
        """Why each track of ``answer`` is there (API.md, "Additions"): ``source`` is the list
        it came from (fold-in, similar, personal, popular) and ``because`` up to three of the
        user's own tracks that led to it: the recent online events whose similar tracks hold
        it, or the user's tracks that add most to its ALS score (implicit's ``explain``)."""
        art = art or self.artefacts
        tracks = answer.tracks
        model = art.foldin
        heard = set(history)
        n = 4 * len(tracks)
        folded = set(self._folded(art, user_id, history, n) or ()) if history else set()
        seeds: dict[int, list[int]] = {}
        if history and "similar" in answer.kinds:
            recent = list(dict.fromkeys(reversed(history)))[: self.settings.online_history_window]
            near = set(self._online_list(art, history, heard, n))
            for seed in recent:  # most recent first, as they weigh
                row = art.similar.values_of(seed)
                for track in () if row is None else row.tolist():
                    if track in near and len(seeds.setdefault(track, [])) < 3:
                        seeds[track].append(seed)
        row = art.offline.values_of(user_id)
        offline = set() if row is None else set(row.tolist())
        sources = []
        for track in tracks:
            if "fold-in" in answer.kinds and track in folded:
                sources.append("fold-in")
            elif track in seeds:
                sources.append("similar")
            elif "personal" in answer.kinds and track in offline:
                sources.append("personal")
            else:
                sources.append("popular")
        because: list[list[int]] = [
            seeds.get(t, []) if s == "similar" else [] for t, s in zip(tracks, sources, strict=True)
        ]
        scored = [i for i, s in enumerate(sources) if s in ("fold-in", "personal")]
        if model is not None and scored:
            online_tracks = history if "fold-in" in answer.kinds else []
            found = model.explain_tracks(user_id, online_tracks, [tracks[i] for i in scored])
            for i, ids in zip(scored, found, strict=True):
                because[i] = ids
        return [{"source": s, "because": b} for s, b in zip(sources, because, strict=True)]

    # -- internals ---------------------------------------------------------------------------

    def _folded(self, art: Artefacts, user_id: int, history: list[int], n: int) -> list[int] | None:
        """The fold-in list of ``n`` tracks, or None when it is not served (no ALS files in
        the artefact folder, or ``online_method`` 'similar')."""
        if art.foldin is None or self.settings.online_method == "similar":
            return None
        return art.foldin.recommend(user_id, history, n, self.settings.foldin_nprobe)

    def _online_list(
        self, art: Artefacts, history: list[int], heard: Collection[int], limit: int
    ) -> list[int]:
        """The best ``limit`` tracks similar to the most recent distinct online events, none
        of ``heard``; the latest event weighs most (weight 1 / (1 + age), age 0 = latest)."""
        recent: list[int] = []
        seen: set[int] = set()
        window = self.settings.online_history_window
        for track in reversed(history):
            if track not in seen:
                seen.add(track)
                recent.append(track)
                if len(recent) == window:
                    break
        weights = [1.0 / (1.0 + age) for age in range(len(recent))]
        return self._similar_ranked(art, recent, weights, heard, limit)

    @staticmethod
    def _similar_ranked(
        art: Artefacts,
        track_ids: Sequence[int],
        weights: Sequence[float],
        exclude: Collection[int],
        limit: int,
    ) -> list[int]:
        """The best ``limit`` tracks similar to ``track_ids`` (scores weighted and summed,
        best first, ties by id), none of ``exclude``."""
        sim = art.similar
        if not track_ids or sim.scores is None or sim.keys.size == 0:
            return []
        if min(track_ids) < 0 or max(track_ids) > INT32_MAX:  # not a track id: no row
            pairs = [(t, w) for t, w in zip(track_ids, weights, strict=True) if 0 <= t <= INT32_MAX]
            if not pairs:
                return []
            track_ids, weights = [t for t, _ in pairs], [w for _, w in pairs]
        needles = np.array(track_ids, dtype=np.int32)
        rows = sim.keys.searchsorted(needles)
        np.minimum(rows, sim.keys.size - 1, out=rows)
        found = sim.keys[rows] == needles
        weight = np.array(weights, dtype=np.float64)
        if not found.all():
            rows, weight = rows[found], weight[found]
        starts, ends = sim.offsets[rows], sim.offsets[rows + 1]
        # the rows (at most online_history_window of them) as slices: one concatenate each
        bounds = list(zip(starts.tolist(), ends.tolist(), strict=True))
        if not bounds:
            return []
        values = np.concatenate([sim.values[lo:hi] for lo, hi in bounds])
        if values.size == 0:
            return []
        scores = np.concatenate([sim.scores[lo:hi] for lo, hi in bounds])
        scores = scores * np.repeat(weight, ends - starts)
        # group equal ids with one sort of packed (id, position) keys: np.sort is vectorised
        # where argsort is not (5x faster on these ~500 ids); the position keeps each id's
        # scores in input order, so the sums are those of adding row by row
        n = values.size
        packed = values.astype(np.int64)
        packed <<= POSITION_BITS
        packed |= np.arange(n, dtype=np.int64)
        packed.sort()
        order = packed & POSITION_MASK
        packed >>= POSITION_BITS
        first = np.empty(n, dtype=bool)
        first[0] = True
        np.not_equal(packed[1:], packed[:-1], out=first[1:])
        at = np.flatnonzero(first)
        uniq, total = packed[at], np.add.reduceat(scores[order], at)
        wanted = limit + len(exclude)  # enough even if every excluded track is among them
        if uniq.size > wanted:  # rank only the candidates at or above the wanted-th total
            keep = np.flatnonzero(total >= np.partition(total, uniq.size - wanted)[-wanted])
            uniq, total = uniq[keep], total[keep]
        ranked = uniq[(-total).argsort(kind="stable")]  # best first; uniq sorted: ties by id
        head = ranked[:wanted].tolist()
        if exclude:
            head = [t for t in head if t not in exclude]
        return head[:limit]

    @staticmethod
    def _fill(art: Artefacts, tracks: list[int], exclude: Collection[int], k: int) -> list[int]:
        """Top up to k from the top popular tracks not yet in the list nor heard, then (when
        the popular list runs dry) from the rest of the catalogue."""
        if len(tracks) >= k:
            return tracks[:k]
        result = list(tracks)
        taken = set(result)
        if exclude:
            taken.update(exclude)
        for track in art.popular_head:  # Python ints: a set lookup each, no numpy call
            if track not in taken:
                result.append(track)
                if len(result) == k:
                    return result
        # the head ran dry (k + heard tracks beyond POPULAR_HEAD): numpy over the rest
        taken.update(result)
        taken_array = np.fromiter(taken, dtype=np.int64, count=len(taken))
        for pool in (art.popular[len(art.popular_head) :], art.item_ids):
            chunk = max(4 * k, 1024)
            for start in range(0, pool.size, chunk):
                part = pool[start : start + chunk]
                part = part[~np.isin(part, taken_array)]
                extra = part[: k - len(result)]
                result.extend(extra.tolist())
                taken_array = np.concatenate([taken_array, extra.astype(np.int64)])
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
KQuery = Annotated[int | None, Query(ge=1, description="number of tracks, 1..max_k (default 25)")]
Details = Annotated[bool, Query(description="objects with names instead of bare track ids")]


class Reason(BaseModel):
    source: str = Field(
        description="the list the track came from: fold-in, similar, personal or popular"
    )
    because: list[int] = Field(
        description="up to three of the user's own track ids that "
        "led to it (empty when none did, e.g. popular)"
    )


class TrackDetails(BaseModel):
    track_id: int
    name: str | None
    artists: list[str]
    albums: list[str]
    genres: list[str]
    reason: Reason | None = Field(None, description="why it is recommended (/recommendations only)")


TrackList = list[int] | list[TrackDetails]


class RecommendationRequest(BaseModel):
    """Body of POST /recommendations; same defaults as the GET form."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": 17, "k": 10, "blend": "strict", "p": 0.5}]},
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


class ManifestWatch(BaseModel):
    running: bool
    interval_seconds: float
    last_poll: str | None = Field(None, description="when it last looked at manifest.json")
    last_error: str | None = Field(None, description="its last failure (details in the log)")
    last_error_at: str | None = None


class Health(BaseModel):
    status: str
    artefacts_loaded: bool
    history_store: bool
    run_id: str | None = None
    reload_error: str | None = Field(None, description="why the last reload was refused")
    artefacts_damaged: str | None = Field(
        None, description="why the loaded set stopped serving (a file failed its CRC-32)"
    )
    manifest_watch: ManifestWatch | None = Field(
        None, description="the reload watcher (only when it is configured)"
    )


class ProblemItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """Every 4xx/5xx answer: a readable ``message`` and FastAPI's list form in ``detail``."""

    message: str
    detail: list[ProblemItem]
    unknown_track_ids: list[int] | None = None
    code: str | None = Field(None, description="stable code of a server-side problem")


class ReloadResult(BaseModel):
    reloaded: bool
    skipped: bool = Field(False, description="the folder's run is already served")
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


def _list_response(
    art: Artefacts,
    tracks: list[int],
    details: bool,
    reasons: list[dict[str, Any]] | None = None,
    **headers: str,
) -> JSONBytes:
    body: list[Any] = art.details(tracks) if details else tracks
    if details and reasons is not None:
        for item, reason in zip(body, reasons, strict=True):
            item["reason"] = reason
    return JSONBytes(body, headers=headers or None)


class FastRecommendations:
    """``GET /recommendations/{user_id}`` without FastAPI's parameter machinery: the hot path.

    Resolving and validating five parameters through FastAPI's dependency code cost more than
    the recommendation itself (profiled: ~45 % of a request). This raw ASGI route sits first in
    the router and serves the plain requests — a canonical user id and at most ``k``,
    ``blend`` and ``p`` with values that are plainly valid — and hands every other request
    (``details``, anything malformed, out of range, repeated or unknown, another method) to
    the declared FastAPI route unchanged, so validation, 4xx messages and the OpenAPI schema
    stay the declared route's. Errors of the store or of loading propagate to the same
    exception handlers as from any route. It answers with the same bytes and headers."""

    PATH = "/recommendations/{user_id}"
    path = PATH  # the route label of the metrics (scope["route"])

    def __init__(self, declared: APIRoute) -> None:
        self.declared = declared

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["route"] = self  # FastAPI's router sets it for its own routes only
        recs = scope["app"].state.recs
        query = None
        if scope["method"] == "GET" and recs is not None and recs._artefacts is not None:
            user = scope["path_params"].get("user_id", "")
            query = _plain_query(scope["query_string"], recs.settings.max_k)
        if query is None or not _plain_id(user):
            await self._declared(scope, receive, send)
            return
        user_id = int(user)
        art = recs._artefacts  # taken once: a reload mid-request does not mix two sets
        history = await recs.user_history(user_id)
        answer = recs.recommend(user_id, query[0], query[1], query[2], art=art, history=history)
        body = orjson.dumps(answer.tracks)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                    (SOURCE_HEADER_BYTES, "+".join(answer.kinds).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _declared(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The declared FastAPI route, as the router would have picked it."""
        _, child = self.declared.matches(scope)
        scope.update(child)
        await self.declared.handle(scope, receive, send)


SOURCE_HEADER_BYTES = SOURCE_HEADER.lower().encode()
PLAIN_P = re.compile(rb"[01](?:\.[0-9]{1,9})?")


def _plain_id(text: str) -> bool:
    """A user id the declared route would accept as is: ASCII digits, no leading zero."""
    return (
        text.isascii()
        and text.isdigit()
        and len(text) <= 10
        and (text == "0" or text[0] != "0")
        and int(text) <= INT32_MAX
    )


def _plain_query(query: bytes, max_k: int) -> tuple[int | None, str, float] | None:
    """``(k, blend, p)`` of a query string made only of plainly valid ``k``, ``blend`` and
    ``p``, each at most once; None for anything else (the declared route then decides)."""
    k, blend, p = None, "strict", 0.5
    if not query:
        return k, blend, p
    seen: set[bytes] = set()
    for part in query.split(b"&"):
        name, eq, value = part.partition(b"=")
        if not eq or name in seen:
            return None
        seen.add(name)
        if name == b"k":
            if not (value.isdigit() and len(value) <= 6 and value[:1] != b"0"):
                return None
            k = int(value)
            if k > max_k:
                return None
        elif name == b"blend":
            if value not in (b"strict", b"probability"):
                return None
            blend = value.decode()
        elif name == b"p":
            if PLAIN_P.fullmatch(value) is None:
                return None
            p = float(value)
            if not 0.0 <= p <= 1.0:
                return None
        else:
            return None
    return k, blend, p


def install_fast_path(app: FastAPI, router: APIRouter) -> None:
    """Put ``FastRecommendations`` first in the app's routes, in front of the route
    ``router`` declares (routers are included lazily, so it is looked up there)."""
    declared = next(
        route
        for route in router.routes
        if isinstance(route, APIRoute)
        and route.path == FastRecommendations.PATH
        and "GET" in (route.methods or ())
    )
    app.router.routes.insert(
        0, Route(FastRecommendations.PATH, FastRecommendations(declared), include_in_schema=False)
    )


def _problem_response(
    status: int,
    problems: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONBytes:
    message = "; ".join(
        (" ".join(str(part) for part in p["loc"]) + ": " if p["loc"] else "") + p["msg"]
        for p in problems
    )
    return JSONBytes(
        {"message": message, "detail": problems, **extra}, status_code=status, headers=headers
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodySizeLimit:
    """ASGI middleware: a request body over ``state.max_body_bytes`` gets 413 before
    anything parses it. A Content-Length above the limit is refused at once, unread; any
    other body (chunked, or a Content-Length that lies low) is counted as it arrives and
    refused as soon as it passes the limit, so at most ``limit`` bytes are ever held. A body
    within the limit is handed on as it came. GET and HEAD pass straight through (no
    endpoint of theirs reads a body)."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = int(getattr(self.state, "max_body_bytes", 262_144))
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, receive, send, limit, f"{int(value)} bytes")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit, "more")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the disconnect as usual

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: dict[str, Any], receive: Any, send: Any, limit: int, got: str) -> None:
        problems = [
            {
                "loc": ["body"],
                "type": "body_too_large",
                "msg": f"the body is larger than {limit} bytes (got {got})",
            }
        ]
        response = _problem_response(
            413, problems, headers={"Connection": "close"}, code="body_too_large"
        )
        await response(scope, receive, send)


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
            problems = [
                {"loc": ["body"], "msg": f"malformed body: {exc.detail}", "type": "body_unreadable"}
            ]
            return _problem_response(422, problems)
        problems = [{"loc": [], "msg": str(exc.detail), "type": f"http_{exc.status_code}"}]
        headers = dict(exc.headers) if exc.headers else None
        return _problem_response(exc.status_code, problems, headers=headers)

    async def on_service_error(request: Request, exc: Exception) -> JSONBytes:
        status = next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 400)
        if isinstance(exc, HistoryStoreError):
            # the cause (path, SQLite's words) goes to the log; the client gets the code
            log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
            problems = [{"loc": [], "msg": exc.public, "type": exc.code}]
            extra: dict[str, Any] = {"code": exc.code}
        else:
            problems = (
                exc.problems()
                if isinstance(exc, ServiceError)
                else [{"loc": [], "msg": str(exc), "type": type(exc).__name__}]
            )
            if status >= 500:
                log.warning("%s: %s", type(exc).__name__, exc)
            extra = (
                {"unknown_track_ids": exc.track_ids} if isinstance(exc, UnknownTracksError) else {}
            )
        headers = None
        if status == 503:  # busy, unreachable or starting: worth retrying soon
            headers = {"Retry-After": str(getattr(request.app.state, "retry_after", 1))}
        return _problem_response(status, problems, headers=headers, **extra)

    async def on_unexpected(_: Request, exc: Exception) -> JSONBytes:
        log.exception("unexpected error")
        return _problem_response(
            500, [{"loc": [], "msg": f"internal error: {type(exc).__name__}", "type": "internal"}]
        )

    # starlette types a handler as taking any Exception; each of ours takes the one it is for
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(HistoryStoreError, on_service_error)
    app.add_exception_handler(IdempotencyKeyReused, on_service_error)
    app.add_exception_handler(Exception, on_unexpected)


def check_admin(recs: Recs, authorization: str | None) -> None:
    """``Authorization: Bearer <settings.admin_token>``; the endpoint is off without a token.
    The token is a SecretStr: its value is taken out only for the comparison."""
    secret = recs.settings.admin_token
    token = secret.get_secret_value() if secret is not None else ""
    if not token:
        raise HTTPException(403, "the admin endpoint is off: set MUSICREC_ADMIN_TOKEN")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode("utf-8", "replace"), token.encode("utf-8")
    ):
        raise HTTPException(
            401,
            "a valid 'Authorization: Bearer <token>' header is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


RECOMMENDATION_HEADERS: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            SOURCE_HEADER: {
                "description": "kinds served: personal, similar, default (joined by +)",
                "schema": {"type": "string"},
            }
        }
    }
}


HISTORY_HEADERS = {
    "X-History-First-Position": {
        "description": "position of the first event of the page",
        "schema": {"type": "string"},
    },
    "X-History-Total": {
        "description": "events ever added (the next event's position)",
        "schema": {"type": "string"},
    },
    "X-History-Length": {"description": "events kept", "schema": {"type": "string"}},
}


# --- routes: grouped into routers, included by create_app in this order ------------------------
#
# The endpoints of API.md, plus POST /admin/reload.
#
# Reads are ``async def``: their work (a binary search, a few small numpy calls) runs on
# the event loop with no thread-pool hop, except the history read, which goes to the
# read threads with a deadline (``Recommendations.read_store``): SQLite can make a reader
# wait seconds when someone locks the file, and the loop must never wait. Writes (POST
# /history waits for an fsync) and the admin reload (seconds of loading) are plain
# ``def`` and run in the thread pool, off the event loop.

list_routes = APIRouter(tags=["lists"])  # popular, similar, personal and blended lists
history_routes = APIRouter(tags=["history"])  # each user's online history
service_routes = APIRouter(tags=["service"])  # what is loaded, counts, health
admin_routes = APIRouter(tags=["admin"])  # switching artefact sets


@service_routes.get("/", summary="what is loaded")
async def root(recs: Recs, art: Art) -> JSONBytes:
    return JSONBytes(
        {
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
            "mapped": art.mapped,
            "max_k": recs.settings.max_k,
            "default_k": recs.settings.default_k,
        }
    )


@list_routes.get("/top_popular", response_model=TrackList, summary="most popular tracks")
async def top_popular_default(recs: Recs, art: Art, details: Details = False) -> JSONBytes:
    return _list_response(art, recs.top_popular(None, art), details)


@list_routes.get("/top_popular/{k}", response_model=TrackList, summary="k most popular tracks")
async def top_popular(k: KPath, recs: Recs, art: Art, details: Details = False) -> JSONBytes:
    return _list_response(art, recs.top_popular(recs.check_k(k, ("path", "k")), art), details)


@list_routes.get("/similar/{k}", response_model=TrackList, summary="tracks similar to given ones")
async def similar_get(
    k: KPath,
    recs: Recs,
    art: Art,
    track_id: Annotated[
        list[TrackId],
        Query(
            min_length=1,
            max_length=MAX_QUERY_TRACKS,
            description=f"a given track id (repeatable, up to {MAX_QUERY_TRACKS}; POST for more)",
            examples=[[26]],
        ),
    ],
    details: Details = False,
) -> JSONBytes:
    recs.check_k(k, ("path", "k"))
    return _list_response(art, recs.get_similar_items(track_id, k, art=art), details)


@list_routes.post("/similar/{k}", response_model=TrackList, summary="tracks similar to given ones")
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


@history_routes.get(
    "/history/{user_id}",
    response_model=TrackList,
    summary="online history",
    description="The latest `limit` events (all kept ones by default) with a "
    "position below `before`, in the order they were added. Positions number a "
    "user's events from 0 in the order they were added; the headers give the "
    "first one's (the `before` of the previous page), the next one's (events ever "
    "added) and how many are kept.",
    responses={200: {"headers": HISTORY_HEADERS}},
)
async def history_get(
    user_id: UserIdPath,
    recs: Recs,
    art: Art,
    details: Details = False,
    limit: Annotated[
        int | None,
        Query(
            ge=1, description="events per page, 1..history_page_max (default history_page_default)"
        ),
    ] = None,
    before: Annotated[
        int | None, Query(ge=0, le=2**62, description="only events at positions below this")
    ] = None,
) -> JSONBytes:
    page = await recs.read_store(recs.history_page, user_id, limit, before)
    return _list_response(
        art,
        page.tracks,
        details,
        None,
        **{
            "X-History-First-Position": str(page.first_position),
            "X-History-Total": str(page.total),
            "X-History-Length": str(page.length),
        },
    )


@history_routes.post(
    "/history/{user_id}",
    response_model=HistoryAdded,
    summary="add listening events",
    description="Stored all or none, committed to disk before the answer. With an "
    "`Idempotency-Key`, a repeat of the same request within the retention window "
    "gets the first answer again (header `Idempotent-Replayed: true`) and stores "
    "nothing; the key used for another request is a 422.",
    responses={
        507: {"model": Problem, "description": "disk full: nothing stored"},
        200: {
            "headers": {
                "Idempotent-Replayed": {
                    "description": "true when this is the first answer replayed",
                    "schema": {"type": "string"},
                }
            }
        },
    },
)
def history_post(
    user_id: UserIdPath,
    recs: Recs,
    art: Art,
    track_ids: Annotated[
        list[StrictTrackId],
        Body(
            min_length=1,
            max_length=MAX_HISTORY_BATCH,
            examples=[[26, 38]],
            description="track ids listened to, oldest first (stored all or none)",
        ),
    ],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY,
            pattern=r"^[\x21-\x7e]+$",
            description="any visible ASCII, up to 255 characters, unique per request",
        ),
    ] = None,
) -> JSONBytes:
    added = recs.add_events(user_id, track_ids, art=art, idempotency_key=idempotency_key)
    return JSONBytes(
        added.answer(), headers={"Idempotent-Replayed": "true"} if added.replayed else None
    )


@list_routes.get(
    "/recommendations/{user_id}",
    response_model=TrackList,
    summary="recommendations",
    responses=RECOMMENDATION_HEADERS,
)
async def recommendations_get(
    user_id: UserIdPath,
    http: Request,
    k: KQuery = None,
    blend: Annotated[BlendMode, Query(description="strict or probability")] = "strict",
    p: Annotated[float, Query(ge=0, le=1, allow_inf_nan=False, description="online share")] = 0.5,
    details: Details = False,
) -> JSONBytes:
    recs, art = current(http)  # the hot path: no dependency resolution
    history = await recs.user_history(user_id)
    answer = recs.recommend(user_id, k, blend, p, art=art, history=history)
    return _list_response(
        art,
        answer.tracks,
        details,
        recs.reasons(user_id, history, answer, art) if details else None,
        **{SOURCE_HEADER: "+".join(answer.kinds)},
    )


@list_routes.post(
    "/recommendations",
    response_model=TrackList,
    summary="recommendations",
    responses=RECOMMENDATION_HEADERS,
)
async def recommendations_post(
    request: RecommendationRequest, http: Request, details: Details = False
) -> JSONBytes:
    recs, art = current(http)
    recs.check_k(request.k, ("body", "k"))
    history = await recs.user_history(request.user_id)
    answer = recs.recommend(
        request.user_id, request.k, request.blend, request.p, art=art, history=history
    )
    return _list_response(
        art,
        answer.tracks,
        details,
        recs.reasons(request.user_id, history, answer, art) if details else None,
        **{SOURCE_HEADER: "+".join(answer.kinds)},
    )


@service_routes.get("/stats", summary="how often each kind was served (this worker)")
async def stats(recs: Recs) -> JSONBytes:
    return JSONBytes(recs.stats())


@service_routes.get(
    "/health",
    response_model=Health,
    summary="ready to serve",
    responses={503: {"model": Health, "description": "not ready"}},
)
async def health(request: Request) -> JSONBytes:
    """The store's ping runs in the read threads with a deadline, so /health answers
    even while the store is locked. Messages are short, without paths; the log has the
    details."""
    recs: Recommendations | None = getattr(request.app.state, "recs", None)
    art = recs._artefacts if recs is not None else None
    store_ok = False
    if recs is not None and recs.store is not None:
        try:
            store_ok = await recs.read_store(recs.store.ping)
        except HistoryStoreError as exc:
            log.warning("/health: %s", exc)
    ok = art is not None and store_ok
    last = recs.last_reload if recs is not None else None
    body: dict[str, Any] = {
        "status": "ok" if ok else "unavailable",
        "artefacts_loaded": art is not None,
        "history_store": store_ok,
        "run_id": art.run_id if art is not None else None,
        "reload_error": _short_error(last["error"]) if last and last["error"] else None,
        "artefacts_damaged": recs.damaged if recs is not None else None,
    }
    if recs is not None and recs.watch is not None:
        body["manifest_watch"] = dict(recs.watch)
    headers = None if ok else {"Retry-After": str(getattr(request.app.state, "retry_after", 1))}
    return JSONBytes(body, status_code=200 if ok else 503, headers=headers)


@admin_routes.post(
    "/admin/reload",
    response_model=ReloadResult,
    summary="switch to the folder's new set",
    description="Loads and checks the artefact set now in the folder and switches this "
    "worker to it; a broken set is refused (409) and the old one keeps serving. Other "
    "workers follow through the manifest watch; a run already served is skipped "
    "(200, `skipped`). Needs `Authorization: Bearer <token>`.",
    responses={
        401: {"model": Problem},
        403: {"model": Problem},
        409: {"model": ReloadResult, "description": "the new set was refused"},
    },
)
def admin_reload(
    recs: Recs,
    authorization: Annotated[str | None, Header(description="Bearer <admin token>")] = None,
) -> JSONBytes:
    check_admin(recs, authorization)
    result = recs.reload(reason="POST /admin/reload")
    result.pop("transient", None)
    return JSONBytes(result, status_code=200 if result["error"] is None else 409)


UI_PAGE = "ui/index.html"  # in the musicrec package (package data)
SUMMARY_TRACKS = 5


def offline_heard(art: Artefacts, user_id: int) -> list[int] | None:
    """Tracks the user heard in the training log, as the served ALS model keeps them (the rows
    fold-in starts from); None when the set has no such model."""
    model = getattr(art, "foldin", None)
    if model is None:
        return None
    users = model.user_ids
    pos = int(np.searchsorted(users, user_id))
    if user_id > INT32_MAX or pos >= users.size or users[pos] != user_id:
        return []
    rows = model.heard_rows[model.heard_offsets[pos] : model.heard_offsets[pos + 1]]
    return model.track_ids[rows].tolist()


@functools.cache
def ui_page() -> bytes:
    """The page of ``/ui`` (package data), read once."""
    return importlib.resources.files("musicrec").joinpath(UI_PAGE).read_bytes()


operator_routes = APIRouter(tags=["operator"])
# ``/metrics`` (Prometheus, all workers), ``/ui`` (the page to look at a user's lists)
# and ``/users/{user_id}`` (what the page shows about a user).


@operator_routes.get(
    "/metrics",
    summary="Prometheus metrics of every worker of this server",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    """Text exposition format; counters add up the files of all workers (prometheus_client
    multiprocess mode). Plain ``def``: reading the files runs off the event loop."""
    collected = request.app.state.metrics
    if collected is None:
        raise HTTPException(404, "metrics are off (MUSICREC_METRICS_ENABLED=false)")
    body, content_type = collected.render()
    return Response(body, media_type=content_type)


@operator_routes.get("/ui", summary="a page to look at a user's lists", response_class=HTMLResponse)
async def ui() -> HTMLResponse:
    return HTMLResponse(ui_page(), headers={"Cache-Control": "no-cache"})


@operator_routes.get("/tracks", response_model=list[TrackDetails], summary="names of given tracks")
async def tracks(
    art: Art,
    track_id: Annotated[
        list[TrackId],
        Query(
            min_length=1,
            max_length=MAX_QUERY_TRACKS,
            description="a track id (repeatable)",
            examples=[[26]],
        ),
    ],
) -> JSONBytes:
    """Catalogue details of the given tracks, in order (an unknown id has no name); the
    page names the tracks a reason's ``because`` gives with it."""
    return JSONBytes(art.details(track_id))


@operator_routes.get("/users", summary="some user ids with a nightly list (for the page's picker)")
async def users(
    art: Art,
    limit: Annotated[int, Query(ge=1, le=100, description="how many")] = 20,
) -> JSONBytes:
    return JSONBytes(
        {"users_with_list": len(art.offline), "users": art.offline.keys[:limit].tolist()}
    )


@operator_routes.get("/users/{user_id}", summary="what the service knows about a user")
async def user_summary(
    user_id: UserIdPath,
    recs: Recs,
    art: Art,
    n: Annotated[int, Query(ge=1, le=50, description="tracks shown of each list")] = SUMMARY_TRACKS,
) -> JSONBytes:
    """The offline side (tracks heard in the training log when the served ALS model has
    them, the nightly list) and the online history (latest first), with names."""
    page_ = await recs.read_store(
        recs.history_page, user_id, min(n, recs.settings.history_page_max), None
    )
    heard = offline_heard(art, user_id)
    row = art.offline.values_of(user_id)
    return JSONBytes(
        {
            "user_id": user_id,
            "offline_history": None
            if heard is None
            else {"distinct_tracks": len(heard), "tracks": art.details(heard[:n])},
            "offline_list": None
            if row is None
            else {"length": int(row.size), "tracks": art.details(row[:n].tolist())},
            "online_history": {
                "length": page_.length,
                "total": page_.total,
                "recent": art.details(page_.tracks[::-1]),
            },
        }
    )


DESCRIPTION = """
Personal track recommendations: offline (ALS + ranker) lists, tracks similar to the online
history, and the most popular tracks, blended per request. Ids are the input data's ids.
Every list endpoint takes `?details=true` for names instead of ids. Bad input gets a 4xx with
a `message` naming the problem.
"""

COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "body larger than the limit (max_body_bytes)"},
    422: {"model": Problem, "description": "bad input, named in `message`"},
    503: {
        "model": Problem,
        "description": "not ready: artefacts or history store unavailable "
        "or busy (Retry-After says when to try again)",
    },
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; ``settings`` default to ``Settings()`` built at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = settings if settings is not None else Settings()
        # under the uvicorn CLI our INFO lines show too; json: one object per line, with the
        # request id
        configure_logging(current.log_format, LOG_FORMAT)
        # the access log names user ids (paths): only when asked for (uvicorn's CLI turns
        # it on by default)
        logging.getLogger("uvicorn.access").disabled = not current.access_log
        app.state.max_body_bytes = current.max_body_bytes
        app.state.retry_after = current.retry_after_seconds
        recs = Recommendations(current)
        # raises DataError naming the file: the service refuses to start. ``art``, not
        # ``recs.artefacts``: a background check may already have found the set damaged
        art = recs.load()
        recs.open_store()
        if current.metrics_enabled:  # files shared by the workers of this server
            recs.metrics = ServiceMetrics(
                *metrics_directory(current.metrics_dir), current.metrics_flush_seconds
            )
            recs.metrics.set_run(art.run_id)
        app.state.metrics = recs.metrics
        app.state.recs = recs
        stop = threading.Event()
        if current.reload_poll_seconds > 0:
            threading.Thread(
                target=recs.watch_manifest,
                args=(stop, current.reload_poll_seconds),
                name="manifest-watch",
                daemon=True,
            ).start()
        log.info("ready: run %s, history store %s", art.run_id, current.history_url)
        try:
            yield
        finally:
            stop.set()
            app.state.recs = None
            app.state.metrics = None
            aclose = getattr(recs.store, "aclose", None)
            if aclose is not None:  # the store's asyncio connections, on this loop
                await aclose()
            recs.close()
            if recs.metrics is not None:
                recs.metrics.close()

    app = FastAPI(
        title="Music recommendations",
        version="1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=COMMON_RESPONSES,
    )
    app.state.recs = None
    app.state.metrics = None
    app.add_middleware(BodySizeLimit, state=app.state)
    app.add_middleware(RequestTelemetry, state=app.state)  # outermost: ids, metrics
    install_error_handlers(app)
    for router in (service_routes, list_routes, history_routes, admin_routes, operator_routes):
        app.include_router(router)
    ui_page()  # a missing page fails here, at start-up, not at the first visit
    install_fast_path(app, list_routes)
    return app


app = create_app()


def main() -> None:
    """``python recommendation_service.py``: uvicorn with host, port, workers from settings."""
    import uvicorn

    settings = Settings()
    configure_logging(settings.log_format, LOG_FORMAT)
    options: dict[str, Any] = {}
    if settings.log_format == "json":
        # uvicorn's loggers go through the root's JSON handler (no config of its own)
        options["log_config"] = None
    uvicorn.run(
        "recommendation_service:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        access_log=settings.access_log,
        **options,
    )


if __name__ == "__main__":
    main()
