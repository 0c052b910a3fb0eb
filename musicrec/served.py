"""The served form of the artefacts: the arrays the service answers from, decoded once at
publish time and memory-mapped by every service worker.

Why: parquet is compressed, so every worker used to decode it into private memory (8 s and
1.2 GiB per worker at full size). The served form is those arrays as plain ``.npy`` files
(CSR form: sorted keys, row offsets, values) and the catalogue as an uncompressed Arrow IPC
file, beside the parquet files (which stay the published, interchange format). A worker maps
them read-only, so N workers share one copy through the page cache.

Writing (:func:`write_served`, :func:`publish`): the pipeline's ``run_all`` just before the
manifest, ``bench/make_full_artefacts.py`` and ``python -m musicrec publish`` (for a folder
made before the served form existed). The writer reads the parquet files with every content
check (types, no empty values, rows sorted by key and rank, every track id in items.parquet,
finite scores, parquet page checksums), so a bad table is refused once, when it is published,
and records each file's size, array shape and CRC-32 in the manifest.

Reading (:func:`open_served`): each file is opened once; its size and CRC-32 are checked
against the manifest by reading it through that descriptor, then the same descriptor is
mapped, so what is verified is what is mapped even if a new run renames its files in
meanwhile. Files are replaced by rename only (``io.atomic_path``), never rewritten in place,
so a live mapping never changes under a worker. CRC-32 guards against truncation, half copies
and flipped bits, which is the threat here; it is not a defence against a deliberate forgery
(neither would a hash in the same manifest be).

The checksum pass reads every byte: ~0.9 s for the 2.2 GB full-size set from the page cache,
2–2.7 s from disk (a reboot, files pushed out by other work). So a process that verified a
file records its identity (device, inode, size, mtime and ctime, in ns) with the CRC in
``.served_verified.json`` beside it. A later start whose file has the very same identity (no
write, rename or copy since: the kernel sets ctime, no tool can) maps it at once and leaves
its CRC to :class:`PendingChecks`, which the service runs in a background thread; a file
found damaged there is dropped from the record and the service stops serving the set (see
``recommendation_service``). Like git's stat cache, a file changed within a second of being
recorded is not recorded (timestamps are coarse).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from musicrec import io
from musicrec.columns import Columns as C
from musicrec.errors import DataError

log = logging.getLogger(__name__)

# --- the served files --------------------------------------------------------------------------
ITEMS = "served_items.arrow"  # track_id, name, artists, albums, genres; sorted by track_id
POPULAR = "served_popular.npy"  # track ids, most popular first
SIMILAR_KEYS = "served_similar_keys.npy"  # sorted unique track ids with similar tracks
SIMILAR_OFFSETS = "served_similar_offsets.npy"  # int64, len(keys) + 1
SIMILAR_VALUES = "served_similar_values.npy"  # similar track ids, best first per key
SIMILAR_SCORES = "served_similar_scores.npy"  # float32 beside the values
OFFLINE_KEYS = "served_offline_keys.npy"  # sorted unique user ids
OFFLINE_OFFSETS = "served_offline_offsets.npy"
OFFLINE_VALUES = "served_offline_values.npy"  # recommended track ids, rank 1 first
SERVED_FILES = (
    ITEMS,
    POPULAR,
    SIMILAR_KEYS,
    SIMILAR_OFFSETS,
    SIMILAR_VALUES,
    SIMILAR_SCORES,
    OFFLINE_KEYS,
    OFFLINE_OFFSETS,
    OFFLINE_VALUES,
)
# the ALS model for fold-in (musicrec.online): optional, checked like the others when the
# manifest records them; item rows are in popularity order, keys of fold_in_arrays -> file
ALS_FILES = {
    "item_factors": "served_als_item_factors.npy",  # float32 (tracks, factors)
    "track_ids": "served_als_track_ids.npy",  # int32 track id of each row
    "sorted_tracks": "served_als_sorted_tracks.npy",  # int32, sorted
    "sorted_rows": "served_als_sorted_rows.npy",  # int32 row of each sorted id
    "gram": "served_als_gram.npy",  # float64 YtY (factors, factors)
    "params": "served_als_params.npy",  # float64 [regularization, alpha]
    "user_ids": "served_als_user_ids.npy",  # int32, sorted
    "user_factors": "served_als_user_factors.npy",  # float32 (users, factors)
    "heard_offsets": "served_als_heard_offsets.npy",  # int64, users + 1
    "heard_rows": "served_als_heard_rows.npy",  # int32 rows each user heard offline
    "list_offsets": "served_als_list_offsets.npy",  # int64: rows of each IVF cluster
    "centroids": "served_als_centroids.npy",  # float32 (clusters, factors)
    "centroid_norms2": "served_als_centroid_norms2.npy",  # float32 (clusters,)
}
ALS_NAMES = tuple(ALS_FILES.values())
# the parquet files the served form is made from (the service's inputs)
SOURCE_FILES = (io.ITEMS, io.TOP_POPULAR, io.SIMILAR, io.RECOMMENDATIONS)
SERVED_FROM = "served_from"  # manifest key: bytes of each source parquet file
ITEM_COLUMNS = (C.track, C.name, C.artists, C.albums, C.genres)
PUBLISH_COMMAND = "python -m musicrec publish --parquet-dir {folder}"
READ_CHUNK = 2**20  # bytes per read of the checksum pass (one small reused buffer)
CHECK_THREADS = 2  # files checksummed at once when a set is opened
# identity and CRC-32 of each file some process of this machine verified (a dot file: not an
# artefact, so neither kept with a run nor pushed to S3)
VERIFIED = ".served_verified.json"
PREFETCH_BYTES = 128 * 2**20  # smaller files are read ahead when mapped (the big ones: rows)
SETTLED_NS = 1_000_000_000  # only a file unchanged this long is recorded (coarse timestamps)


# --- reading the parquet tables, with every content check ----------------------------------------

READ_THREADS = 2  # row groups of a column are decoded by this many threads at once
CHECK_CHUNK = 8_000_000  # rows per step of the whole-column checks: bounded temporaries


def read_schema(path: Path) -> pa.Schema:
    """The parquet schema of ``path``; DataError naming the file when missing or unreadable."""
    if not path.exists():
        raise DataError(
            f"missing artefact {path}: run the pipeline (python -m musicrec run) "
            "or point MUSICREC_PARQUET_DIR at a folder of artefacts"
        )
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc


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
                raise DataError(
                    f"{path}: row group {group} has {values.size} rows, "
                    f"its metadata says {sizes[group]}"
                )
            out[starts[group] : starts[group + 1]] = values

    shares = [list(range(i, len(sizes), READ_THREADS)) for i in range(READ_THREADS)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for future in [pool.submit(read, share) for share in shares if share]:
            future.result()  # re-raises a reader's error here
    return out


def read_columns(path: Path, columns: dict[str, pa.DataType]) -> dict[str, np.ndarray]:
    """Numeric columns of an artefact as numpy arrays of the given types, one column at a
    time; any problem is a DataError naming the file.

    An id or rank column must hold integers (a float or string id is a file from something
    else, not one to guess at); a score may be any number. Page checksums are verified when
    the writer stored them."""
    schema = read_schema(path)
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


def check_sorted(path: Path, keys: np.ndarray, ranks: np.ndarray, key_name: str) -> None:
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
            part = ids[start : start + CHECK_CHUNK]
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


def csr_offsets(key_column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and row offsets (int64, len(keys) + 1) of a sorted key column."""
    if key_column.size == 0:
        return np.empty(0, np.int32), np.zeros(1, np.int64)
    starts = np.flatnonzero(key_column[1:] != key_column[:-1]) + 1
    keys = np.ascontiguousarray(key_column[np.concatenate(([0], starts))])
    return keys, np.concatenate(([0], starts, [key_column.size])).astype(np.int64)


def read_ranked(
    path: Path, key: str, value: str, with_scores: bool, catalogue: Catalogue
) -> dict[str, np.ndarray]:
    """A ranked table as CSR arrays ``keys``, ``offsets``, ``values`` (and ``scores``)."""
    wanted = {key: pa.int32(), value: pa.int32(), C.rank: pa.int16()}
    if with_scores:
        wanted[C.score] = pa.float32()
    cols = read_columns(path, wanted)
    check_sorted(path, cols[key], cols.pop(C.rank), key)
    if value == C.similar:
        if np.any(cols[key] == cols[value]):
            raise DataError(f"{path}: a track is listed as similar to itself")
        catalogue.check(path, key, cols[key])
    catalogue.check(path, value, cols[value])
    if with_scores and not np.all(np.isfinite(cols[C.score])):
        raise DataError(f"{path}: column {C.score!r} has values that are not finite")
    keys, offsets = csr_offsets(cols.pop(key))
    out = {"keys": keys, "offsets": offsets, "values": cols.pop(value)}
    if with_scores:
        out["scores"] = cols.pop(C.score)
    return out


ITEM_TYPES: dict[str, Callable[[pa.DataType], bool]] = {  # column -> check of its arrow type
    C.track: pa.types.is_integer,
    C.name: lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    C.artists: lambda t: pa.types.is_list(t) and pa.types.is_string(t.value_type),
    C.albums: lambda t: pa.types.is_list(t) and pa.types.is_string(t.value_type),
    C.genres: lambda t: pa.types.is_list(t) and pa.types.is_string(t.value_type),
}


def read_items(path: Path) -> pa.Table:
    """The catalogue columns the service needs, sorted by track id (int32, unique)."""
    schema = read_schema(path)
    missing = [n for n in ITEM_COLUMNS if n not in schema.names]
    if missing:
        raise DataError(f"{path}: columns missing: {missing} (columns: {schema.names})")
    for name, is_ok in ITEM_TYPES.items():
        source_type = schema.field(name).type
        if not is_ok(source_type):
            expected = {C.track: "an integer", C.name: "string"}.get(name, "list<string>")
            raise DataError(f"{path}: column {name!r} has type {source_type}, expected {expected}")
    try:
        table = pq.read_table(path, columns=list(ITEM_COLUMNS), page_checksum_verification=True)
        ids_column = table.column(C.track)
        if ids_column.null_count:
            raise DataError(f"{path}: column {C.track!r} has {ids_column.null_count} empty values")
        ids = ids_column.cast(pa.int32()).to_numpy()
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        if sorted_ids.size and sorted_ids[0] < 0:
            raise DataError(f"{path}: negative track ids")
        if sorted_ids.size > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
            raise DataError(f"{path}: track ids are not unique")
        # one chunk per column: take() on a table of many row groups is far slower
        table = table.set_column(0, C.track, pa.array(ids)).take(pa.array(order))
        return table.combine_chunks()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def read_popular(path: Path, catalogue: Catalogue) -> np.ndarray:
    """Track ids of top_popular.parquet, most popular first."""
    cols = read_columns(path, {C.track: pa.int32(), C.rank: pa.int32()})
    catalogue.check(path, C.track, cols[C.track])
    if np.unique(cols[C.track]).size != cols[C.track].size:
        raise DataError(f"{path}: a track is listed twice")
    return np.ascontiguousarray(cols[C.track][np.argsort(cols[C.rank], kind="stable")])


def read_parquet_set(paths: dict[str, Path]) -> dict[str, Any]:
    """The four service tables (``paths``: name in SOURCE_FILES -> file) as the served arrays,
    every content check run; keyed like SERVED_FILES (items as an Arrow table)."""
    import time

    t = time.perf_counter()
    items = read_items(paths[io.ITEMS])
    item_ids = items.column(C.track).to_numpy()
    catalogue = Catalogue(item_ids)
    log.info("items: %d tracks in %.1f s", item_ids.size, time.perf_counter() - t)
    t = time.perf_counter()
    popular = read_popular(paths[io.TOP_POPULAR], catalogue)
    log.info("top popular: %d tracks in %.1f s", popular.size, time.perf_counter() - t)
    t = time.perf_counter()
    similar = read_ranked(paths[io.SIMILAR], C.track, C.similar, True, catalogue)
    log.info(
        "similar: %d tracks, %d pairs in %.1f s",
        similar["keys"].size,
        similar["values"].size,
        time.perf_counter() - t,
    )
    t = time.perf_counter()
    offline = read_ranked(paths[io.RECOMMENDATIONS], C.user, C.track, False, catalogue)
    log.info(
        "recommendations: %d users, %d rows in %.1f s",
        offline["keys"].size,
        offline["values"].size,
        time.perf_counter() - t,
    )
    return {
        ITEMS: items,
        POPULAR: popular,
        SIMILAR_KEYS: similar["keys"],
        SIMILAR_OFFSETS: similar["offsets"],
        SIMILAR_VALUES: similar["values"],
        SIMILAR_SCORES: similar["scores"],
        OFFLINE_KEYS: offline["keys"],
        OFFLINE_OFFSETS: offline["offsets"],
        OFFLINE_VALUES: offline["values"],
    }


# --- writing the served form ---------------------------------------------------------------------


def file_crc32(path: Path) -> str:
    """CRC-32 of a file as 8 hex digits, read in bounded chunks."""
    with open(path, "rb") as file:
        return _crc32_of(file.fileno())


def _crc32_of(fd: int) -> str:
    """CRC-32 of everything behind ``fd`` from offset 0 (pread: the position is untouched).
    Reading through the descriptor fills the page cache without growing this process's
    resident memory, unlike hashing the mapping."""
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    crc, offset = 0, 0
    while True:
        got = os.preadv(fd, [buffer], offset)
        if got == 0:
            return f"{crc:08x}"
        crc = zlib.crc32(view[:got], crc)
        offset += got


def _write_npy(array: np.ndarray, path: Path) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.save(file, np.ascontiguousarray(array), allow_pickle=False)


def _write_arrow(table: pa.Table, path: Path) -> None:
    """An uncompressed Arrow IPC file (one record batch): mapped, it is read without a copy."""
    table = table.combine_chunks()
    with (
        io.atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))


def write_served(sources: dict[str, Path], out: Path) -> dict[str, dict[str, Any]]:
    """Read the four service tables (``sources``: name in SOURCE_FILES -> parquet file) with
    every check and write the served form into ``out`` (each file atomically). Returns the
    manifest entries: for each served file its ``bytes``, ``crc32``, and ``dtype`` / ``shape``
    (``rows`` for the items file), plus the byte size of each source under SERVED_FROM."""
    out = Path(out)
    arrays = read_parquet_set(sources)
    entries: dict[str, dict[str, Any]] = {}
    for name in SERVED_FILES:
        path = out / name
        value = arrays.pop(name)  # drop each array once written: bounded peak memory
        if isinstance(value, pa.Table):
            _write_arrow(value, path)
            entry: dict[str, Any] = {"rows": value.num_rows}
        else:
            _write_npy(value, path)
            entry = {
                "rows": int(value.shape[0]),
                "dtype": value.dtype.str,
                "shape": list(value.shape),
            }
        del value
        entry.update(bytes=path.stat().st_size, crc32=file_crc32(path))
        entries[name] = entry
    entries.update(_factor_entries(out))
    entries[SERVED_FROM] = {name: Path(sources[name]).stat().st_size for name in SOURCE_FILES}
    log.info(
        "served form written to %s (%.0f MB)",
        out,
        sum(e["bytes"] for n, e in entries.items() if n != SERVED_FROM) / 1e6,
    )
    return entries


def write_factors(arrays: dict[str, np.ndarray], out: Path) -> None:
    """Write the fold-in arrays (``musicrec.online.fold_in_arrays``) as the ALS served files
    into ``out``, each atomically; ``write_served`` then records their checksums."""
    missing = set(ALS_FILES) - set(arrays)
    if missing:
        raise ValueError(f"fold-in arrays missing: {sorted(missing)}")
    factors = arrays["item_factors"]
    if not (np.all(np.isfinite(factors)) and np.all(np.isfinite(arrays["user_factors"]))):
        raise DataError("ALS factors hold values that are not finite")
    for key, name in ALS_FILES.items():
        _write_npy(arrays[key], Path(out) / name)


def _factor_entries(out: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the ALS files in ``out`` (all or none: a partial set is an error)."""
    present = [name for name in ALS_NAMES if (Path(out) / name).exists()]
    if not present:
        return {}
    if len(present) < len(ALS_NAMES):
        missing = sorted(set(ALS_NAMES) - set(present))
        raise DataError(f"{out}: ALS served files missing: {', '.join(missing)}")
    entries = {}
    for name in ALS_NAMES:
        path = Path(out) / name
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        entries[name] = {
            "rows": int(array.shape[0]),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "bytes": path.stat().st_size,
            "crc32": file_crc32(path),
        }
        del array
    return entries


def add_to_manifest(manifest: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    """Record ``write_served``'s entries: the files under ``artefacts``, the sources apart."""
    entries = dict(entries)
    manifest[SERVED_FROM] = entries.pop(SERVED_FROM)
    manifest.setdefault("artefacts", {}).update(entries)


def publish(folder: Path) -> dict[str, Any]:
    """Write the served form of the artefacts in ``folder`` and record it in its manifest
    (``python -m musicrec publish``: for a folder made before the served form existed, or
    after single stages were rerun). Returns the new manifest."""
    folder = Path(folder)
    path = folder / io.MANIFEST
    manifest = io.read_json(path) if path.exists() else {}
    entries = write_served({name: folder / name for name in SOURCE_FILES}, folder)
    add_to_manifest(manifest, entries)
    io.write_json(manifest, path)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Check the size and CRC-32 of every served file the manifest records (e.g. after a
    download); DataError naming the first bad one. Returns the names checked."""
    artefacts = manifest.get("artefacts") or {}
    checked = []
    for name in (*SERVED_FILES, *ALS_NAMES):
        entry = artefacts.get(name)
        if not isinstance(entry, dict) or "crc32" not in entry:
            continue
        path = Path(folder) / name
        if not path.exists():
            raise DataError(f"missing artefact {path}: {io.MANIFEST} records it")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise DataError(f"{path}: {size} bytes, but {io.MANIFEST} records {entry.get('bytes')}")
        crc = file_crc32(path)
        if crc != entry["crc32"]:
            raise DataError(f"{path}: CRC-32 {crc}, but {io.MANIFEST} records {entry['crc32']}")
        checked.append(name)
    return checked


# --- opening the served form ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServedState:
    """Whether a folder's served form can be used, and why not."""

    usable: bool
    reason: str


def served_state(folder: Path, manifest: dict[str, Any] | None) -> ServedState:
    """Usable when the manifest records every served file and the parquet files they were
    made from are the ones in the folder now (same sizes); else the reason, for the log."""
    if manifest is None:
        return ServedState(False, f"no {io.MANIFEST} to check the served files against")
    artefacts = manifest.get("artefacts") or {}
    recorded = [n for n in SERVED_FILES if isinstance(artefacts.get(n), dict)]
    if len(recorded) < len(SERVED_FILES):
        return ServedState(False, f"{io.MANIFEST} records no served (memory-mapped) form")
    missing = [n for n in SERVED_FILES if not (Path(folder) / n).exists()]
    if missing:
        return ServedState(False, f"served files missing: {', '.join(missing)}")
    made_from = manifest.get(SERVED_FROM) or {}
    for name in SOURCE_FILES:
        path = Path(folder) / name
        if path.exists() and made_from.get(name) != path.stat().st_size:
            return ServedState(False, f"the served form was made from another {name}")
    return ServedState(True, "")


def _identity_of(stat: os.stat_result) -> list[int]:
    """What must stay equal for a file to be the bytes once verified (see the module doc)."""
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def read_verified(folder: Path) -> dict[str, Any]:
    """``.served_verified.json`` of ``folder``; {} when missing or unreadable (nothing
    trusted: every file is checked in full)."""
    try:
        record = json.loads((Path(folder) / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def update_verified(folder: Path, changes: Mapping[str, dict[str, Any] | None]) -> None:
    """Record (or, for None, forget) verified files in ``folder``'s record, atomically. Best
    effort: a folder this process may not write (read-only artefacts) only means every start
    checks every file in full."""
    record = read_verified(folder)
    for name, entry in changes.items():
        if entry is None:
            record.pop(name, None)
        else:
            record[name] = entry
    try:
        io.write_json(record, Path(folder) / VERIFIED)
    except OSError as exc:
        log.info("%s: cannot record the verified files (%s); each start checks all", folder, exc)


@dataclass
class PendingChecks:
    """Files mapped on the word of the verified record, their CRC-32 still to compute, each
    through a descriptor of the very file that was mapped. :meth:`run` (in a background
    thread) checks them all and closes the descriptors."""

    folder: Path
    files: list[tuple[str, int, str]]  # name, duplicated descriptor, CRC-32 of the manifest

    @property
    def bytes(self) -> int:
        return sum(os.fstat(fd).st_size for _, fd, _ in self.files)

    def run(self) -> int:
        """Check every file; DataError naming the first damaged one (then dropped from the
        record, so the next start checks it in full and refuses it). Returns the count."""
        try:
            for name, fd, want in self.files:
                path = self.folder / name
                try:
                    crc = _crc32_of(fd)
                except OSError as exc:
                    crc = f"unreadable ({exc})"
                if crc != want:
                    update_verified(self.folder, {name: None})
                    raise DataError(
                        f"{path}: CRC-32 {crc}, but {io.MANIFEST} records {want}: the served "
                        "file was damaged after it was verified"
                    )
            return len(self.files)
        finally:
            self.close()

    def close(self) -> None:
        for _, fd, _ in self.files:
            os.close(fd)
        self.files = []


@dataclass
class _Opened:
    value: Any  # the array (or Arrow table)
    identity: tuple[int, int, int]  # inode, size, mtime: to tell later whether it was replaced
    verified: dict[str, Any] | None  # the verified record's new entry (None: nothing new)
    pending: int | None  # a descriptor whose CRC-32 is still to check (trusted identity)


def _open_one(path: Path, entry: dict[str, Any], trusted: Any) -> _Opened:
    """Verify ``path`` against its manifest entry (size, header and CRC-32, or its identity
    when ``trusted``, its verified record's entry, still matches) and map it."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below; the mapping outlives it
    except OSError as exc:
        raise DataError(f"missing artefact {path}: {exc}") from exc
    with file:
        stat = os.fstat(file.fileno())
        if stat.st_size != entry.get("bytes"):
            raise DataError(
                f"{path}: {stat.st_size} bytes, but {io.MANIFEST} records {entry.get('bytes')}: "
                "the served file is truncated or from another run"
            )
        if stat.st_size == 0:
            raise DataError(f"{path}: empty file")
        identity = _identity_of(stat)
        verified = pending = None
        if (
            isinstance(trusted, dict)
            and trusted.get("identity") == identity
            and trusted.get("crc32") == entry.get("crc32")
        ):
            pending = os.dup(file.fileno())
        else:
            crc = _crc32_of(file.fileno())
            if crc != entry.get("crc32"):
                raise DataError(
                    f"{path}: CRC-32 {crc}, but {io.MANIFEST} records "
                    f"{entry.get('crc32')}: the served file is damaged"
                )
            if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS:
                verified = {"identity": identity, "crc32": crc}
        try:
            value = _map(path, file, entry)
        except BaseException:
            if pending is not None:
                os.close(pending)
            raise
    return _Opened(value, (stat.st_ino, stat.st_size, stat.st_mtime_ns), verified, pending)


def _map(path: Path, file: Any, entry: dict[str, Any]) -> Any:
    """The array (or Arrow table) of an open served file, over a read-only mapping."""
    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    # requests touch a row here and there: no disk read-ahead around each fault (matters
    # when the file is not in the page cache: mapped unchecked, or evicted since)
    mapped.madvise(mmap.MADV_RANDOM)
    if len(mapped) <= PREFETCH_BYTES:  # read whole at start-up (checks, the artists column):
        mapped.madvise(mmap.MADV_WILLNEED)  # from disk in large reads, not page by page
    if path.suffix == ".arrow":
        try:
            return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped))).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable Arrow file: {exc}") from exc
    try:
        file.seek(0)
        version = np.lib.format.read_magic(file)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(file)
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npy file: {exc}") from exc
    if (
        fortran
        or dtype.hasobject
        or dtype.str != entry.get("dtype")
        or list(shape) != entry.get("shape")
    ):
        raise DataError(
            f"{path}: array {dtype.str} {list(shape)}, but {io.MANIFEST} "
            f"records {entry.get('dtype')} {entry.get('shape')}"
        )
    count = int(np.prod(shape))
    array = np.frombuffer(mapped, dtype=dtype, count=count, offset=file.tell())
    return array.reshape(shape)


def open_served(
    folder: Path, manifest: dict[str, Any], *, trust_verified: bool = False
) -> tuple[dict[str, Any], dict[str, Any], PendingChecks]:
    """The served arrays of ``folder``, mapped read-only after verifying each file against
    ``manifest``; also each file's identity, to tell later whether it was replaced.

    With ``trust_verified`` (the service), a file whose identity the verified record holds
    is mapped at once and its CRC-32 left to the returned :class:`PendingChecks` (which the
    caller must ``run`` or ``close``); each file checked in full now is recorded. Else the
    checks pass is empty.

    The arrays are plain ndarrays over an ``mmap`` (not ``np.memmap``, whose Python-level
    subclass hooks would cost on every slice of the hot path); the mapping is released when
    the last array over it is."""
    folder = Path(folder)
    artefacts = manifest["artefacts"]
    recorded = [name for name in ALS_NAMES if isinstance(artefacts.get(name), dict)]
    if recorded and len(recorded) < len(ALS_NAMES):
        raise DataError(
            f"{folder / io.MANIFEST}: records only some ALS served files "
            f"({', '.join(recorded)}); republish the folder"
        )
    names = [*SERVED_FILES, *recorded]
    trusted = read_verified(folder) if trust_verified else {}
    # two threads: pread and zlib's crc32 release the GIL, so the checksum pass over ~2.5 GB
    # at full scale takes half the time; the largest files first, so the threads end together
    names.sort(key=lambda name: -int(artefacts[name].get("bytes") or 0))
    pending = PendingChecks(folder, [])
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        futures = {
            name: pool.submit(_open_one, folder / name, artefacts[name], trusted.get(name))
            for name in names
        }
    opened: dict[str, _Opened] = {}
    try:
        for name, future in futures.items():  # every descriptor kept, even after a failure
            if future.exception() is None:
                opened[name] = one = future.result()
                if one.pending is not None:
                    pending.files.append((name, one.pending, artefacts[name]["crc32"]))
        for future in futures.values():
            future.result()  # the first failure, in size order
        arrays = {name: opened[name].value for name in names}
        _check_structure(folder, arrays)
        if recorded:
            _check_factors(folder, arrays)
    except BaseException:
        pending.close()
        raise
    if trust_verified:
        fresh = {name: o.verified for name, o in opened.items() if o.verified is not None}
        if fresh:
            update_verified(folder, fresh)
    return arrays, {name: opened[name].identity for name in names}, pending


def factor_arrays(arrays: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The fold-in arrays (keys of ALS_FILES) among opened served arrays; None without them."""
    if not all(name in arrays for name in ALS_NAMES):
        return None
    return {key: arrays[name] for key, name in ALS_FILES.items()}


def _check_factors(folder: Path, arrays: dict[str, Any]) -> None:
    """Cheap invariants of the ALS files: shapes agree, offsets describe the heard rows."""
    a = factor_arrays(arrays)
    assert a is not None
    tracks, factors = a["item_factors"].shape if a["item_factors"].ndim == 2 else (-1, -1)
    users = a["user_ids"].size
    off = a["heard_offsets"]
    ok = (
        tracks == a["track_ids"].size == a["sorted_tracks"].size == a["sorted_rows"].size
        and a["user_factors"].shape == (users, factors)
        and a["gram"].shape == (factors, factors)
        and a["params"].shape == (2,)
        and off.size == users + 1
        and off[0] == 0
        and off[-1] == a["heard_rows"].size
        and bool(np.all(a["user_ids"][1:] > a["user_ids"][:-1]))
        and bool(np.all(a["sorted_tracks"][1:] > a["sorted_tracks"][:-1]))
        and a["list_offsets"].size == a["centroids"].shape[0] + 1
        and a["centroid_norms2"].size == a["centroids"].shape[0]
        and a["centroids"].shape[1:] == (factors,)
        and a["list_offsets"][0] == 0
        and a["list_offsets"][-1] == tracks
        and bool(np.all(a["list_offsets"][1:] >= a["list_offsets"][:-1]))
    )
    if not ok:
        raise DataError(
            f"{Path(folder) / ALS_FILES['item_factors']}: the ALS served files do not "
            "agree with each other; republish the folder"
        )


def _check_structure(folder: Path, arrays: dict[str, Any]) -> None:
    """Cheap invariants of the CSR form (the content was checked by the writer)."""
    for what, keys, offsets, values in (
        ("similar", SIMILAR_KEYS, SIMILAR_OFFSETS, SIMILAR_VALUES),
        ("offline", OFFLINE_KEYS, OFFLINE_OFFSETS, OFFLINE_VALUES),
    ):
        k, o, v = arrays[keys], arrays[offsets], arrays[values]
        ok = (
            o.size == k.size + 1
            and o[0] == 0
            and o[-1] == v.size
            and bool(np.all(o[1:] >= o[:-1]))
            and bool(np.all(k[1:] > k[:-1]))
        )
        if not ok:
            raise DataError(
                f"{Path(folder) / keys}: the {what} keys and offsets do not "
                "describe their values; republish the folder"
            )
    if arrays[SIMILAR_SCORES].size != arrays[SIMILAR_VALUES].size:
        raise DataError(f"{Path(folder) / SIMILAR_SCORES}: not one score per similar track")
    ids = arrays[ITEMS].column(C.track)
    if ids.type != pa.int32() or ids.null_count:
        raise DataError(f"{Path(folder) / ITEMS}: track ids are not int32 without gaps")
