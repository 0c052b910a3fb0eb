"""The heavy offline stages on Apache Spark: preparation of the log, the split, top popular and
ALS (Spark MLlib ``ALS``, ``implicitPrefs=True``), for logs larger than one machine.

``musicrec prepare --engine spark`` and ``musicrec run --engine spark`` (or
``MUSICREC_ENGINE=spark``) run them on a Spark session: ``local[*]`` by default,
``MUSICREC_SPARK_MASTER`` (``spark://host:7077``, ``yarn``, ``k8s://...``) for a cluster, or
whatever ``spark-submit`` set up (an existing session is reused). They read the same input
parquet and write the same files as the in-process engine — ``items.parquet``,
``events.parquet``, ``work/split.json``, ``top_popular.parquet``, ``personal_als.parquet`` —
plus, so the service can start on the folder, ``similar.parquet`` (neighbours by the ALS item
factors), ``recommendations.parquet`` (the ALS lists: the served model is ALS; the ranker
and the other sources are in-process stages), the served (memory-mapped) form with the ALS
model of the service's fold-in (``served.ALS_FILES``, :func:`fold_in_factors`) and the
manifest with the same fields. Like ``run_all``, a run writes into a staging folder and is
published only when every step succeeded (``pipeline.publish_staged``: files moved in, the
manifest last, the run archived under ``runs/``), so a failed run leaves the previous set
as it was. The in-process stages (search, rank, evaluate, serve) can run afterwards on the
same folder.

What still passes through one process (the driver), and why:

- ``items.parquet``: the catalogue (1 M tracks at full scale) is validated and joined by the
  in-process code (``prepare.read_items``); it is catalogue-sized, not log-sized.
- each single output file (``events.parquet``, ``personal_als.parquet``): Spark writes part
  files in parallel, already sorted; the driver then streams them, one row group at a time,
  into the one file the other stages and the service read (I/O, not memory: one row group).
- the ranking of top popular and the day counts of the split: one row per track / per day.
- scoring needs every item factor in each task (a broadcast: tracks x factors floats, 256 MB
  at 1 M tracks x 64 factors); users are scored over partitions with ``mapInPandas``.
- the similar-track lists and the served form (the service's arrays) are built by the driver
  from the item factors and the written files, like the in-process engine does.
- the fold-in model (:func:`fold_in_factors`): every user's factors (users x factors floats,
  350 MB at 1.37 M users x 64) and the (user, track) pairs of the ALS matrix (8 bytes a pair
  as collected, 1.8 GB for the full log's pairs, plus 4 a pair for their codes) are collected
  to the driver, which clusters the item factors and writes the service's arrays.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from musicrec import io, served
from musicrec.als import als_from_factors, recs_frame
from musicrec.arrays import lookup_sorted
from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.online import fold_in_arrays
from musicrec.settings import Settings
from musicrec.sources import AlsSource, PopularSource
from musicrec.split import SplitDates, split_from_day_counts

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

WORK_DIR = "work"  # the pipeline's work folder (musicrec.pipeline.WORK_DIR)
SPLIT_JSON = "split.json"
SEARCH_JSON = "search.json"
SELECTION_JSON = "selection.json"
CODE_CHUNK = 8_000_000  # collected pairs turned into codes at once (bounded temporaries)
SCORE_BATCH = 1_024  # users scored at once inside a task (a batch x tracks score matrix)
JAVA_PACKAGE = "openjdk-17-jre-headless"


# --- session ----------------------------------------------------------------------------------


def spark_session(settings: Settings) -> SparkSession:
    """The active session (spark-submit) or a new one on ``settings.spark_master``."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise RuntimeError(
            f"the Spark engine needs Java 17: install the Debian package "
            f"{JAVA_PACKAGE} (apt-get install {JAVA_PACKAGE})"
        )
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # local tasks run this interpreter (the venv's pandas / numpy), unless told otherwise
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName("musicrec")
        .config("spark.sql.session.timeZone", "UTC")
        # pandas writes nanosecond timestamps, which Spark reads only as numbers
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")
        .config("spark.sql.shuffle.partitions", str(settings.spark_partitions))
        .config("spark.default.parallelism", str(settings.spark_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", settings.spark_driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if settings.spark_master:
        builder = builder.master(settings.spark_master)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    ship_package(spark)
    log.info("Spark %s session on %s", spark.version, spark.sparkContext.master)
    return spark


def ship_package(spark: SparkSession) -> None:
    """Send this package to the executors (a zip through ``addPyFile``): the Python tasks
    (``mapInPandas``) import it, and an executor of a cluster has no copy of its own."""
    import zipfile

    package = Path(__file__).resolve().parent
    folder = Path(tempfile.mkdtemp(prefix="musicrec-spark-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = folder / "musicrec.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(package.rglob("*.py")):
            bundle.write(path, Path(package.name) / path.relative_to(package))
    spark.sparkContext.addPyFile(str(archive))


# --- writing one file from part files -----------------------------------------------------------


def write_single(frame: DataFrame, path: Path, schema: pa.Schema) -> int:
    """Write a (sorted) Spark DataFrame as the one parquet file ``path`` in ``schema``: the
    executors write part files, the driver streams them in order into the file (one row group
    in memory). Returns the rows written."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.parts.", dir=path.parent))
    try:
        frame.write.mode("overwrite").parquet(str(scratch / "parts"))
        parts = sorted((scratch / "parts").glob("part-*.parquet"))  # part numbers keep order
        rows = 0
        with (
            io.atomic_path(path) as tmp,
            pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer,
        ):
            for part in parts:
                source = pq.ParquetFile(part)
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group).select(schema.names).cast(schema)
                    writer.write_table(table)
                    rows += table.num_rows
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- preparation --------------------------------------------------------------------------------


def prepare_spark(
    spark: SparkSession, data_dir: Path, parquet_dir: Path, settings: Settings
) -> dict[str, int]:
    """``prepare`` on Spark: the same checks of the log (nulls, id ranges, track_seq, unknown
    tracks, implausible dates), rows repeating a (user, track, day) merged into one event with
    ``plays``, sorted by user and track_seq; ``items.parquet`` by the in-process code."""
    from pyspark.sql import functions as F

    from musicrec.prepare import DAY_RANGE, DEFAULT_MIN_PLAUSIBLE_DATE, read_items

    started = time.perf_counter()
    data_dir, parquet_dir = Path(data_dir), Path(parquet_dir)
    parquet_dir.mkdir(parents=True, exist_ok=True)
    items = read_items(data_dir)  # catalogue-sized: the in-process checks and joins
    path = data_dir / io.INTERACTIONS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    raw = spark.read.parquet(str(path))
    missing = {C.user, C.track, C.seq, C.started_at} - set(raw.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    if dict(raw.dtypes)[C.started_at] in ("bigint", "int"):  # nanoseconds (nanosAsLong)
        day = F.floor(F.col(C.started_at) / F.lit(86_400 * 10**9))
    else:  # a timestamp of another unit, or a date
        day = F.datediff(F.to_date(F.col(C.started_at)), F.lit("1970-01-01"))
    low_date = settings.min_plausible_date or DEFAULT_MIN_PLAUSIBLE_DATE
    low_day = (low_date - date(1970, 1, 1)).days
    high_day = (datetime.now(UTC).date() - date(1970, 1, 1)).days
    implausible_day = (day < low_day) | (day > high_day)
    # one pass over the log for every check: nulls, ranges, dates, users
    row = (
        raw.agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(implausible_day.cast("long")).alias("implausible"),
            F.min(F.when(~implausible_day, day)).alias("min_plausible"),
            F.max(F.when(~implausible_day, day)).alias("max_plausible"),
            F.min(day).alias("min_day"),
            F.max(day).alias("max_day"),
            F.countDistinct(C.user).alias("users"),
            *[
                F.sum(F.col(c).isNull().cast("long")).alias(f"null_{c}")
                for c in (C.user, C.track, C.seq, C.started_at)
            ],
            F.min(C.user).alias("min_user"),
            F.max(C.user).alias("max_user"),
            F.min(C.track).alias("min_track"),
            F.max(C.track).alias("max_track"),
            F.min(C.seq).alias("min_seq"),
            F.max(C.seq).alias("max_seq"),
        )
    ).first()
    assert row is not None  # an aggregate has one row, even over no rows
    checks = row.asDict()
    if not checks["rows"]:
        raise DataError(f"{path}: the file holds no rows")
    for column in (C.user, C.track, C.seq, C.started_at):
        if checks[f"null_{column}"]:
            raise DataError(
                f"{path}: column {column!r} has {checks[f'null_{column}']} empty "
                "(null) values; remove those rows or fill them"
            )
    int32_max, int16 = 2**31 - 1, 2**15
    for column, low, high in (
        (C.user, 0, int32_max),
        (C.track, 0, int32_max),
        (C.seq, -int16, int16 - 1),
    ):
        short = column.split("_")[0] if column != C.seq else "seq"
        if checks[f"min_{short}"] < low or checks[f"max_{short}"] > high:
            raise DataError(f"{path}: column {column!r} has values outside {low}..{high}")
    events = raw.select(
        F.col(C.user).cast("int").alias(C.user),
        F.col(C.track).cast("int").alias(C.track),
        F.col(C.seq).cast("short").alias(C.seq),
        day.cast("int").alias("day"),
    )
    known = spark.createDataFrame(
        pd.DataFrame({C.track: items.column(C.track).to_numpy().astype(np.int32)})
    )
    unknown = events.select(C.track).distinct().join(known, C.track, "left_anti")
    n_unknown = unknown.count()
    if n_unknown:
        example = [r[0] for r in unknown.limit(5).collect()]
        raise DataError(
            f"{path}: {n_unknown} track ids are missing from {io.TRACKS} (e.g. {example})"
        )
    implausible = checks["implausible"]
    span = (checks["min_day"], checks["max_day"])
    if implausible:
        action = "dropped" if settings.drop_implausible_dates else "kept"
        log.warning(
            "%s: %d events dated before %s or in the future (%s)",
            path,
            implausible,
            low_date,
            action,
        )
        if settings.drop_implausible_dates:
            events = events.filter((F.col("day") >= low_day) & (F.col("day") <= high_day))
            span = (checks["min_plausible"], checks["max_plausible"])
    if span[0] is None:
        raise DataError(f"{path}: no events left after dropping implausible dates")
    if span[0] < DAY_RANGE[0] or span[1] > DAY_RANGE[1]:
        raise DataError(
            f"{path}: column 'started_at' runs outside the dates the pipeline "
            "handles (int16 day numbers)"
        )
    merged = (
        events.groupBy(C.user, C.track, "day")
        .agg(F.min(C.seq).alias(C.seq), F.count(F.lit(1)).cast("int").alias(C.plays))
        .select(
            C.user,
            C.track,
            C.seq,
            F.date_add(F.lit("1970-01-01").cast("date"), F.col("day")).alias(C.started_at),
            C.plays,
        )
        .orderBy(C.user, C.seq)
    )
    io.write_table(items, parquet_dir / io.ITEMS)
    n_events = write_single(merged, parquet_dir / io.EVENTS, io.EVENTS_SCHEMA)
    n_users = checks["users"]
    log.info(
        "prepared %d items and %d events on Spark in %.1f s",
        items.num_rows,
        n_events,
        time.perf_counter() - started,
    )
    return {"tracks": items.num_rows, "events": n_events, "users": n_users}


# --- the log and the split ----------------------------------------------------------------------


def read_log(spark: SparkSession, parquet_dir: Path) -> DataFrame:
    """events.parquet as (user_id, track_id, day, plays)."""
    from pyspark.sql import functions as F

    path = Path(parquet_dir) / io.EVENTS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m musicrec prepare` first")
    frame = spark.read.parquet(str(path))
    plays = F.col(C.plays) if C.plays in frame.columns else F.lit(1)
    return frame.select(
        C.user,
        C.track,
        F.datediff(F.col(C.started_at), F.lit("1970-01-01")).alias("day"),
        plays.cast("int").alias(C.plays),
    )


def day_counts(events: DataFrame) -> pd.Series:
    """Events per day (one row per distinct day, collected: a few hundred rows)."""
    counts = events.groupBy("day").count().toPandas()
    return counts.set_index("day")["count"].sort_index()


def split_from_counts(counts: pd.Series, settings: Settings) -> SplitDates:
    """``musicrec.split.split_dates`` from the events per day instead of every event."""
    return split_from_day_counts(counts.index.to_numpy(), counts.to_numpy(), settings)


def _granularity(days: np.ndarray) -> int:
    """The typical gap between distinct event days (``sources._granularity_days``)."""
    return max(int(np.median(np.diff(days))), 1) if days.size >= 2 else 1


def window_days(
    fraction: float | None, first_day: int, cutoff: int, granularity: int
) -> int | None:
    """``TrainData.window``: a share of the span in days, at least two date steps."""
    if fraction is None:
        return None
    return max(int(round((cutoff - first_day) * fraction)), 2 * granularity)


# --- top popular --------------------------------------------------------------------------------


def popular_spark(events: DataFrame, cutoff: int, window: int | None) -> pd.DataFrame:
    """The top_popular table of ``PopularSource``: distinct listeners in the last ``window``
    days (all time breaks ties), every heard track, best first."""
    from pyspark.sql import functions as F

    recent = F.col("day") >= cutoff - window if window is not None else F.lit(True)
    counts = (
        events.filter(F.col("day") < cutoff)
        .groupBy(C.track)
        .agg(
            F.countDistinct(C.user).alias("all_time"),
            F.countDistinct(F.when(recent, F.col(C.user))).alias("recent"),
        )
        .toPandas()
    )  # one row per track: catalogue-sized
    counts = counts.sort_values(C.track, kind="stable")
    all_time = counts["all_time"].to_numpy().astype(np.float32)
    recent_counts = counts["recent"] if window is not None else counts["all_time"]
    scores = recent_counts.to_numpy().astype(np.float32) + all_time / (all_time.max() + 1)
    order = np.argsort(-scores, kind="stable")
    return pd.DataFrame(
        {
            C.track: counts[C.track].to_numpy()[order].astype(np.int32),
            C.listeners: all_time[order].astype(np.int64),
            C.score: scores[order].astype(np.float32),
            C.rank: np.arange(1, order.size + 1, dtype=np.int32),
        }
    )


# --- ALS ----------------------------------------------------------------------------------------


def strength_matrix(events: DataFrame, cutoff: int, half_life: float | None) -> DataFrame:
    """(user, track, strength): plays, decayed by age before the cut-off when a half-life is
    given, summed over a user's events of the track (``Listens.matrix``)."""
    from pyspark.sql import functions as F

    weight = F.col(C.plays).cast("double")
    if half_life is not None:
        weight = weight * F.pow(F.lit(0.5), (F.lit(cutoff - 1) - F.col("day")) / half_life)
    return (
        events.filter(F.col("day") < cutoff)
        .groupBy(C.user, C.track)
        .agg(F.sum(weight).cast("float").alias("strength"))
    )


def fit_als(
    matrix: DataFrame, params: dict[str, Any], settings: Settings, iterations: int | None = None
) -> Any:
    """Spark MLlib ALS with implicit preferences: confidence 1 + alpha * strength, as the
    in-process engine (note: Spark scales regParam by each user's / item's number of
    ratings, implicit does not, so the same number regularises differently)."""
    from pyspark.ml.recommendation import ALS

    als = ALS(
        rank=int(params["factors"]),
        maxIter=iterations or settings.als_iterations,
        regParam=float(params["regularization"]),
        alpha=float(params["alpha"]),
        implicitPrefs=True,
        userCol=C.user,
        itemCol=C.track,
        ratingCol="strength",
        seed=settings.seed,
        coldStartStrategy="drop",
        checkpointInterval=5,
        intermediateStorageLevel="MEMORY_AND_DISK",
    )
    return als.fit(matrix)


def item_factors(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(track ids sorted, their factors as float32): collected for the broadcast."""
    frame = model.itemFactors.toPandas().sort_values("id")
    return (
        frame["id"].to_numpy().astype(np.int32),
        np.stack(frame["features"].to_numpy()).astype(np.float32),
    )


def score_users(
    model: Any, events: DataFrame, cutoff: int, n: int, users: DataFrame | None = None
) -> DataFrame:
    """Top-``n`` unheard tracks per user by the ALS scores, over user partitions
    (``mapInPandas``): each task gets a partition of users with their factors and heard
    tracks, and the item factors by broadcast. ``users``: a one-column frame of the users to
    score (default every user with factors). Rows (user_id, track_id, score, rank)."""
    from pyspark.sql import functions as F

    spark = events.sparkSession
    ids, factors = item_factors(model)
    shared = spark.sparkContext.broadcast((ids, factors))
    heard = (
        events.filter(F.col("day") < cutoff)
        .groupBy(C.user)
        .agg(F.collect_set(C.track).alias("heard"))
    )
    rows = model.userFactors.withColumnRenamed("id", C.user)
    if users is not None:
        rows = rows.join(users, C.user, "left_semi")
    rows = rows.join(heard, C.user, "left")

    def top(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        track_ids, item = shared.value
        k = min(n, track_ids.size)
        for frame in batches:
            for start in range(0, len(frame), SCORE_BATCH):
                part = frame.iloc[start : start + SCORE_BATCH]
                user = np.stack(list(part["features"])).astype(np.float32)
                scores = user @ item.T
                for row, listened in enumerate(part["heard"].to_numpy()):
                    if listened is not None and len(listened):
                        codes = np.searchsorted(track_ids, np.asarray(listened, np.int32))
                        codes = codes[codes < track_ids.size]
                        scores[row, codes] = -np.inf
                best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(scores, best, 1)
                order = np.argsort(-best_scores, axis=1, kind="stable")
                best = np.take_along_axis(best, order, 1)
                best_scores = np.take_along_axis(best_scores, order, 1)
                keep = np.isfinite(best_scores)
                counts = keep.sum(axis=1)
                yield pd.DataFrame(
                    {
                        C.user: np.repeat(part[C.user].to_numpy().astype(np.int32), counts),
                        C.track: track_ids[best[keep]],
                        C.score: best_scores[keep].astype(np.float32),
                        C.rank: (np.cumsum(keep, axis=1)[keep]).astype(np.int16),
                    }
                )

    schema = f"{C.user} int, {C.track} int, {C.score} float, {C.rank} short"
    return rows.mapInPandas(top, schema)


def collect_table(frame: DataFrame, scratch: Path) -> pa.Table:
    """A Spark DataFrame read into the driver as one Arrow table, in the frame's order: the
    executors write parquet part files into ``scratch`` (shared storage, as ``write_single``),
    the driver reads them with pyarrow (no pandas objects, no copy held by the JVM)."""
    folder = Path(tempfile.mkdtemp(prefix=".collect.", dir=scratch))
    try:
        frame.write.mode("overwrite").parquet(str(folder / "parts"))
        parts = sorted((folder / "parts").glob("part-*.parquet"))  # part numbers keep order
        tables = [pq.read_table(part) for part in parts]
        schema = tables[0].schema if tables else None
        return pa.concat_tables(tables) if schema is not None else pa.table({})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def served_regularization(reg_param: float, ratings_per_user: np.ndarray) -> float:
    """The one regularization the fold-in serves for a Spark model: Spark (ALS-WR) solved each
    user's vector with ``reg_param * n_u`` (``n_u``: the user's tracks in the matrix), the
    service's fold-in takes one number for everyone: the median user's, ``reg_param`` times
    the median ``n_u`` (README, "Engines": what this changes)."""
    if ratings_per_user.size == 0:
        return float(reg_param)
    return float(reg_param) * float(np.median(ratings_per_user))


def _codes(ids: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    """Positions of ``values`` in the sorted ``ids``; DataError when one is not there."""
    codes = lookup_sorted(ids, values)
    if (codes < 0).any():
        raise DataError(f"the ALS matrix holds {what} the Spark model has no factors of")
    return codes


def fold_in_factors(
    model: Any,
    matrix: DataFrame,
    params: dict[str, Any],
    scratch: Path,
    items: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The service's fold-in arrays (keys of ``served.ALS_FILES``) of a Spark ALS model, made
    by the in-process code (``online.fold_in_arrays`` over ``als.als_from_factors``): item
    factors grouped by IVF cluster, YtY, the users' factors, the tracks each user heard in
    ``matrix`` (the (user, track, strength) frame the model was fitted on), alpha (the same
    confidence 1 + alpha * strength) and the regularization of :func:`served_regularization`.

    Collected to the driver (for the service's files, which are one process's arrays): every
    user's factors and the (user, track) pairs of the matrix, sorted by Spark. ``items``: the
    (track ids, factors) of :func:`item_factors` when the caller has them. Returns the arrays
    and what the regularization was made of (for the manifest)."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    track_ids, factors = items if items is not None else item_factors(model)
    users = collect_table(model.userFactors.orderBy("id"), scratch)
    user_ids = users.column("id").to_numpy().astype(np.int32)
    rank = factors.shape[1]
    user_factors = (
        users.column("features").combine_chunks().flatten().to_numpy().astype(np.float32)
    ).reshape(user_ids.size, rank)
    del users
    pairs = collect_table(
        matrix.select(F.col(C.user).cast("int"), F.col(C.track).cast("int")).orderBy(
            C.user, C.track
        ),
        scratch,
    )
    # codes a chunk at a time into int32: 4 bytes a pair beside the collected 8, not 24
    track_codes = np.empty(pairs.num_rows, dtype=np.int32)
    per_user = np.zeros(user_ids.size, dtype=np.int64)
    for start in range(0, pairs.num_rows, CODE_CHUNK):
        chunk = pairs.slice(start, CODE_CHUNK)
        users_of = _codes(user_ids, chunk.column(C.user).to_numpy(), "users")
        per_user += np.bincount(users_of, minlength=user_ids.size)
        tracks_of = _codes(track_ids, chunk.column(C.track).to_numpy(), "tracks")
        track_codes[start : start + chunk.num_rows] = tracks_of
    del pairs
    offsets = np.zeros(user_ids.size + 1, dtype=np.int64)
    np.cumsum(per_user, out=offsets[1:])
    heard = sp.csr_matrix(
        (np.ones(track_codes.size, dtype=np.int8), track_codes, offsets),
        shape=(user_ids.size, track_ids.size),
    )
    ratings = np.diff(offsets)
    log.info(
        "fold-in: collected %d users' factors and %d (user, track) pairs in %.1f s",
        user_ids.size,
        track_codes.size,
        time.perf_counter() - started,
    )
    regularization = served_regularization(float(params["regularization"]), ratings)
    arrays = fold_in_arrays(
        als_from_factors(user_factors, factors, user_ids, track_ids, heard),
        np.bincount(track_codes, minlength=track_ids.size),  # listeners per track
        regularization,
        float(params["alpha"]),
    )
    info = {
        "reg_param": float(params["regularization"]),
        "median_tracks_per_user": float(np.median(ratings)) if ratings.size else 0.0,
        "regularization": regularization,
        "alpha": float(params["alpha"]),
    }
    return arrays, info


def similar_from_factors(ids: np.ndarray, factors: np.ndarray, n: int) -> pd.DataFrame:
    """Each track's ``n`` nearest tracks by cosine of the ALS item factors, scaled to its best
    neighbour (as the serve stage does), in blocks of tracks (catalogue-sized, driver)."""
    norm = factors / np.maximum(np.linalg.norm(factors, axis=1, keepdims=True), 1e-12)
    k = min(n, ids.size - 1)
    parts = []
    for start in range(0, ids.size, SCORE_BATCH):
        scores = norm[start : start + SCORE_BATCH] @ norm.T
        rows = np.arange(scores.shape[0])
        scores[rows, start + rows] = -np.inf  # not its own neighbour
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, best, 1)
        best_scores = best_scores / np.maximum(best_scores.max(axis=1, keepdims=True), 1e-12)
        parts.append(
            recs_frame(
                np.repeat(ids[start : start + scores.shape[0]], k),
                ids[best.ravel()],
                best_scores.ravel(),
            )
        )
    table = pd.concat(parts, ignore_index=True)
    return table.rename(columns={C.user: C.track, C.track: C.similar})


# --- the run ------------------------------------------------------------------------------------


def run_spark(settings: Settings, spark: SparkSession | None = None) -> dict:
    """Split, top popular and ALS on Spark from ``events.parquet``; writes the same artefacts
    and manifest fields as ``musicrec run`` for them (the served model is ALS), with the ALS
    model of the service's fold-in. Every file is written into a staging folder and published
    only when all steps succeeded (``pipeline.publish_staged``, as ``run_all``: the manifest
    last, the run archived under ``runs/``); a failure leaves the previous set untouched.
    Returns the manifest."""
    from musicrec.pipeline import new_staging, publish_staged

    spark = spark or spark_session(settings)
    parquet = Path(settings.parquet_dir)
    timings: dict[str, float] = {}
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-spark-" + uuid.uuid4().hex[:6]
    events = read_log(spark, parquet)  # raises before anything is made when not prepared
    staging = new_staging(parquet, run_id)
    work = staging / WORK_DIR  # moved into work/ on publishing
    work.mkdir()
    try:
        spark.sparkContext.setCheckpointDir(str(staging / "spark-checkpoints"))
        started = time.perf_counter()
        events = events.persist()
        counts = day_counts(events)
        dates = split_from_counts(counts, settings)
        io.write_json(dates.as_dict(), work / SPLIT_JSON)
        timings["split"] = time.perf_counter() - started
        log.info("spark split: %s", dates.as_dict())

        started = time.perf_counter()
        cutoff = dates.last_day + 1  # the whole log, as the serve stage
        days = counts.index.to_numpy()
        granularity = _granularity(days)
        popular_params = PopularSource.space(settings)[0]
        window = window_days(popular_params["window"], dates.first_day, cutoff, granularity)
        io.write_table(
            popular_spark(events, cutoff, window), staging / io.TOP_POPULAR, io.POPULAR_SCHEMA
        )
        timings["popular"] = time.perf_counter() - started

        started = time.perf_counter()
        params = AlsSource.space(settings)[1]  # the configured ALS
        half_life = window_days(params["half_life"], dates.first_day, cutoff, granularity)
        matrix = strength_matrix(events, cutoff, half_life)
        model = fit_als(matrix, params, settings)
        lists = score_users(model, events, cutoff, settings.n_recommendations)
        write_single(lists.orderBy(C.user, C.rank), staging / io.PERSONAL_ALS, io.RECS_SCHEMA)
        shutil.copyfile(staging / io.PERSONAL_ALS, staging / io.RECOMMENDATIONS)
        ids, factors = item_factors(model)
        io.write_table(
            similar_from_factors(ids, factors, settings.n_similar),
            staging / io.SIMILAR,
            io.SIMILAR_SCHEMA,
        )
        timings["als"] = time.perf_counter() - started

        started = time.perf_counter()
        arrays, fold_in = fold_in_factors(model, matrix, params, staging, (ids, factors))
        served.write_factors(arrays, staging)
        del arrays
        timings["fold_in"] = time.perf_counter() - started
        events.unpersist()

        io.write_json(
            {
                "popular": {"params": popular_params, "ndcg": None},
                "als": {"params": params, "ndcg": None},
            },
            work / SEARCH_JSON,
        )
        io.write_json(
            {
                "winner": "als",
                "reason": "engine spark: ALS lists are served (the "
                "ranker and the other sources run in process)",
                "engine": "spark",
            },
            work / SELECTION_JSON,
        )
        engine = {
            "name": "spark",
            "master": spark.sparkContext.master,
            "spark_version": spark.version,
            "fold_in": fold_in,
        }
        manifest = publish_staged(settings, staging, run_id, timings, {"engine": engine})
    finally:
        events.unpersist()
        shutil.rmtree(staging, ignore_errors=True)
    log.info("spark run %s: %s", run_id, ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return json.loads(json.dumps(manifest, default=str))


if __name__ == "__main__":  # spark-submit musicrec/spark_engine.py [prepare] [options]
    from musicrec.cli import main

    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in ("prepare", "run") else "run"
    sys.exit(main([command, "--engine", "spark", *argv]))
