"""The only module (with the pipeline runner) that touches files: names, atomic writes, reads.

Artefacts are written to a temporary name in the same folder and renamed, so a reader never
sees a half-written file and a failed run leaves the previous file in place.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from musicrec.columns import Columns as C

log = logging.getLogger(__name__)

# --- input files (the real data set's names) ---------------------------------------------------
TRACKS = "tracks.parquet"
CATALOG_NAMES = "catalog_names.parquet"
INTERACTIONS = "interactions.parquet"
INPUT_FILES = (TRACKS, CATALOG_NAMES, INTERACTIONS)

# --- artefacts -----------------------------------------------------------------------------
ITEMS = "items.parquet"
EVENTS = "events.parquet"
TOP_POPULAR = "top_popular.parquet"
PERSONAL_ALS = "personal_als.parquet"
SIMILAR = "similar.parquet"
RECOMMENDATIONS = "recommendations.parquet"
METRICS = "metrics.parquet"
METRICS_PNG = "metrics.png"
CANDIDATE_RECALL = "candidate_recall.parquet"
RANKER_MODEL = "ranker.cbm"
MANIFEST = "manifest.json"

# Schemas of the artefacts the service reads; ids are the input's ids.
RECS_SCHEMA = pa.schema(
    [(C.user, pa.int32()), (C.track, pa.int32()), (C.score, pa.float32()), (C.rank, pa.int16())]
)
SIMILAR_SCHEMA = pa.schema(
    [
        (C.track, pa.int32()),
        (C.similar, pa.int32()),
        (C.score, pa.float32()),
        (C.rank, pa.int16()),
    ]
)
POPULAR_SCHEMA = pa.schema(
    [
        (C.track, pa.int32()),
        (C.listeners, pa.int64()),
        (C.score, pa.float32()),
        (C.rank, pa.int32()),
    ]
)
# events.parquet: one row per (user, track, day); ``plays`` counts the input rows merged into it
# (1 on the real data, which has no repeats). Files written before ``plays`` existed lack it.
EVENTS_SCHEMA = pa.schema(
    [
        (C.user, pa.int32()),
        (C.track, pa.int32()),
        (C.seq, pa.int16()),
        (C.started_at, pa.date32()),
        (C.plays, pa.int32()),
    ]
)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes it private; artefacts are for every reader
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_table(
    table: pa.Table | pd.DataFrame, path: Path, schema: pa.Schema | None = None
) -> Path:
    """Write a table as parquet atomically, cast to ``schema`` when one is given."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    return write_batches([table], path, schema or table.schema)


def write_batches(
    batches: Iterable[pa.Table | pd.DataFrame], path: Path, schema: pa.Schema
) -> Path:
    """Write tables one after another into one parquet file, atomically, each cast to
    ``schema``: only one batch is in memory at a time (the served lists of every user are
    ~140 M rows at full scale; as one table they cost several GB at the write)."""
    rows = 0
    # page checksums: a reader that verifies them (the service) refuses a damaged page; the
    # writer closes before the file is renamed into place
    with (
        atomic_path(path) as tmp,
        pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as out,
    ):
        for batch in batches:
            if isinstance(batch, pd.DataFrame):
                batch = pa.Table.from_pandas(batch, preserve_index=False)
            out.write_table(batch.select(schema.names).cast(schema))
            rows += batch.num_rows
    log.debug("wrote %s (%d rows)", path, rows)
    return Path(path)


def write_json(obj: Any, path: Path) -> Path:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    return Path(path)


def write_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib Figure as PNG atomically (the format is explicit: the temp name has no
    .png suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_events(path: Path) -> pd.DataFrame:
    """Read ``events.parquet`` in its compact in-memory form.

    Columns: ``user_id`` int32, ``track_id`` int32, ``day`` int16 (days since 1970-01-01),
    and ``plays`` int32 (input rows merged into the event) only when some event merges several:
    a log without repeats (the real one) would spend 0.9 GB at full scale on a column of ones.
    ``track_seq`` is not loaded: the date orders a user's events well enough for every stage
    and leaving it out saves 0.4 GB at full scale.
    """
    source = pq.ParquetFile(path)
    has_plays = C.plays in source.schema_arrow.names
    columns = [C.user, C.track, C.started_at] + ([C.plays] if has_plays else [])
    n = source.metadata.num_rows
    # filled one row group at a time: the peak is the result plus one group, not the Arrow
    # table and its conversions beside it (9 GB instead of 3 GB at full scale)
    frame = {
        C.user: np.empty(n, np.int32),
        C.track: np.empty(n, np.int32),
        C.day: np.empty(n, np.int16),
    }
    plays = np.empty(n, np.int32) if has_plays else None
    at = 0
    for group in range(source.num_row_groups):
        table = source.read_row_group(group, columns=columns)
        end = at + table.num_rows
        frame[C.user][at:end] = table.column(C.user).to_numpy()
        frame[C.track][at:end] = table.column(C.track).to_numpy()
        frame[C.day][at:end] = table.column(C.started_at).cast(pa.int32()).to_numpy()
        if plays is not None:
            plays[at:end] = table.column(C.plays).cast(pa.int32()).to_numpy()
        at = end
    if plays is not None and bool(np.any(plays != 1)):
        frame[C.plays] = plays
    return pd.DataFrame(frame, copy=False)


def day_to_date(day: int) -> np.datetime64:
    """Day number (days since 1970-01-01) to a numpy date."""
    return np.datetime64(int(day), "D")


def date_to_day(value: Any) -> int:
    """A date-like value to its day number."""
    return int(np.datetime64(value, "D").astype(np.int64))
