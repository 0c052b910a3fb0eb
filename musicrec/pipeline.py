"""The pipeline runner: reads the prepared data, calls each stage, writes every artefact.

``run_all`` writes the artefacts of a run into a staging folder beside the artefacts and moves
them in only when every stage has succeeded (the manifest last), so a failed run leaves the
previous set untouched. A single stage (``run_stage``) writes its artefacts in place, each file
atomically. Intermediate data (split dates, model factors, candidate tables) lives in
``<parquet_dir>/work/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from musicrec import io
from musicrec.als import (
    als_from_factors,
    fit_als_history,
    item_index,
    recommend_codes,
    recs_frame,
)
from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.features import IdIndex, build_history
from musicrec.popular import popular_for_users, top_popular
from musicrec.settings import Settings
from musicrec.similar import similar_tracks
from musicrec.split import SplitDates, events_before, split_dates

log = logging.getLogger(__name__)

WORK_DIR = "work"
SPLIT_JSON = "split.json"
POPULAR_P1 = "popular_p1.parquet"
ALS_P1 = "als_p1.npz"
ALS_FULL = "als_full.npz"
ALS_CANDIDATES_P1 = "als_candidates_p1.parquet"
SIMILAR_QUERIES_P1 = "similar_queries_p1.npy"
SIMILAR_P1 = "similar_p1.parquet"
SIMILAR_RECENT = "similar_recent.parquet"

# Files of one run, in the order they are published (the manifest is written after them).
ARTEFACTS = (io.TOP_POPULAR, io.PERSONAL_ALS, io.SIMILAR, io.RANKER_MODEL, io.RECOMMENDATIONS,
             io.METRICS, io.METRICS_PNG)
STAGES = ("split", "popular", "als", "similar", "rank", "evaluate")


@dataclass
class RunContext:
    """Where a run reads and writes: ``out`` is the staging folder or the artefacts folder."""

    settings: Settings
    out: Path
    keep_events: bool = False  # run_all reads events.parquet once for every stage
    _events: pd.DataFrame | None = None

    @property
    def parquet(self) -> Path:
        return Path(self.settings.parquet_dir)

    @property
    def work(self) -> Path:
        path = self.parquet / WORK_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def events(self) -> pd.DataFrame:
        if self._events is not None:
            return self._events
        path = self.parquet / io.EVENTS
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `python -m musicrec prepare` first")
        started = time.perf_counter()
        events = io.read_events(path)
        log.info("read %d events in %.1f s", len(events), time.perf_counter() - started)
        if self.keep_events:
            self._events = events
        return events

    def items(self) -> pa.Table:
        return pq.read_table(self.parquet / io.ITEMS, columns=[C.track, C.genre_ids, C.artist_ids])

    def dates(self) -> SplitDates:
        path = self.work / SPLIT_JSON
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the split stage first")
        return SplitDates.from_dict(io.read_json(path))

    def read(self, name: str, max_rank: int | None = None) -> pd.DataFrame:
        """An artefact of this run (staging first), else the published one; with
        ``max_rank`` only its rows of rank <= max_rank."""
        filters = None if max_rank is None else [(C.rank, "<=", max_rank)]
        for folder in (self.out, self.parquet):
            if (folder / name).exists():
                return pd.read_parquet(folder / name, filters=filters)
        raise FileNotFoundError(f"{name} not found in {self.out}: run the stage that writes it")


def _save_factors(model, path: Path) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, user_factors=model.model.user_factors, item_factors=model.model.item_factors,
                 user_ids=model.user_ids, track_ids=model.track_ids)


def _load_factors(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the als stage first")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# --- stages ---------------------------------------------------------------------------------


def stage_split(run: RunContext) -> None:
    dates = split_dates(run.events(), run.settings)
    io.write_json(dates.as_dict(), run.work / SPLIT_JSON)


def stage_popular(run: RunContext) -> None:
    s, dates, events = run.settings, run.dates(), run.events()
    # only the track and day columns count listeners: no copy of the user column
    tracks, days = events[C.track].to_numpy(), events[C.day].to_numpy()
    for cutoff, path in ((dates.test_start, run.out / io.TOP_POPULAR),
                         (dates.label_start, run.work / POPULAR_P1)):
        before = days < cutoff
        history = pd.DataFrame({C.track: tracks[before], C.day: days[before]})
        io.write_table(top_popular(history, s.popular_window_days, cutoff - 1), path,
                       io.POPULAR_SCHEMA)
        del history, before


def stage_als(run: RunContext) -> None:
    """ALS on P1 (candidates of the ranker's training users), then brought up to P1+P2
    (personal_als) by a few iterations warm-started from the P1 factors."""
    from musicrec.ranker import recent_tracks, training_users

    s, dates, events = run.settings, run.dates(), run.events()
    days = events[C.day].to_numpy()
    label = events[(days >= dates.label_start) & (days < dates.test_start)]

    history = build_history(events_before(events, dates.label_start), dates.label_start)
    p1_model = fit_als_history(history, s)
    users = training_users(history, label, s)
    rows, tracks, scores = recommend_codes(p1_model, users, s.n_als_candidates,
                                           index=item_index(p1_model, s))
    io.write_table(recs_frame(p1_model.user_ids[rows], p1_model.track_ids[tracks], scores),
                   run.work / ALS_CANDIDATES_P1, io.RECS_SCHEMA)
    _, recent = recent_tracks(history, users, s.ranker_recent_tracks)
    with io.atomic_path(run.work / SIMILAR_QUERIES_P1) as tmp, open(tmp, "wb") as fh:
        np.save(fh, history.tracks.ids[np.unique(recent)])
    _save_factors(p1_model, run.work / ALS_P1)
    del history, label, rows, tracks, scores
    p1_model.user_items = None  # the P1 matrix is not needed any more

    history = build_history(events_before(events, dates.test_start), dates.test_start)
    del events
    if s.als_warm_iterations > 0:
        model = fit_als_history(history, s, warm_start=p1_model,
                                iterations=s.als_warm_iterations)
    else:
        model = fit_als_history(history, s)
    del p1_model, history
    n = max(s.n_als_candidates, s.n_recommendations)
    rows, tracks, scores = recommend_codes(model, np.arange(len(model.user_ids)), n,
                                           index=item_index(model, s))
    io.write_table(recs_frame(model.user_ids[rows], model.track_ids[tracks], scores),
                   run.out / io.PERSONAL_ALS, io.RECS_SCHEMA)
    _save_factors(model, run.work / ALS_FULL)


def _model_from(path: Path, threads: int):
    f = _load_factors(path)
    return als_from_factors(f["user_factors"], f["item_factors"], f["user_ids"],
                            f["track_ids"], None, threads=threads)


def stage_similar(run: RunContext) -> None:
    """Similar tracks of every track (P1+P2 model) and of the ranker's query tracks (P1)."""
    s = run.settings
    model = _model_from(run.work / ALS_FULL, s.threads)
    io.write_table(similar_tracks(model, s.n_similar, index=item_index(model, s, "cosine")),
                   run.out / io.SIMILAR, io.SIMILAR_SCHEMA)
    model = _model_from(run.work / ALS_P1, s.threads)
    queries = np.load(run.work / SIMILAR_QUERIES_P1)
    io.write_table(similar_tracks(model, s.n_similar, queries,
                                  index=item_index(model, s, "cosine")),
                   run.work / SIMILAR_P1, io.SIMILAR_SCHEMA)


def stage_rank(run: RunContext) -> None:
    """Train the ranker on P1 candidates labelled by P2, then rank P1+P2 candidates."""
    from musicrec.ranker import build_context, rank_users, train_ranker, training_frame

    s, dates, events, items = run.settings, run.dates(), run.events(), run.items()
    days = events[C.day].to_numpy()
    label = events[(days >= dates.label_start) & (days < dates.test_start)]

    history = build_history(events_before(events, dates.label_start), dates.label_start)
    f = _load_factors(run.work / ALS_P1)
    ctx = build_context(history, f["user_factors"], f["item_factors"], f["user_ids"],
                        f["track_ids"], pd.read_parquet(run.work / ALS_CANDIDATES_P1),
                        pd.read_parquet(run.work / SIMILAR_P1),
                        pd.read_parquet(run.work / POPULAR_P1), items, s)
    features, target, _ = training_frame(ctx, label, s)
    model = train_ranker(features, target, s)
    with io.atomic_path(run.out / io.RANKER_MODEL) as tmp:
        model.save_model(str(tmp))
    del ctx, history, features, target, label

    history = build_history(events_before(events, dates.test_start), dates.test_start)
    del events
    f = _load_factors(run.work / ALS_FULL)
    ctx = build_context(history, f["user_factors"], f["item_factors"], f["user_ids"],
                        f["track_ids"], run.read(io.PERSONAL_ALS), run.read(io.SIMILAR),
                        run.read(io.TOP_POPULAR), items, s)
    recs, similar_recent = rank_users(ctx, model, s)
    io.write_table(recs, run.out / io.RECOMMENDATIONS, io.RECS_SCHEMA)
    io.write_table(similar_recent, run.work / SIMILAR_RECENT, io.RECS_SCHEMA)


def stage_evaluate(run: RunContext) -> None:
    """Metrics of every source on the test period, for users with history before it."""
    from musicrec.metrics import evaluate
    from musicrec.plots import plot_metrics

    s, dates, events = run.settings, run.dates(), run.events()
    days = events[C.day].to_numpy()
    history = events[days < dates.test_start]
    test = events[days >= dates.test_start]
    del events
    # warm test users (with history): the ones every offline source can serve
    history_users = IdIndex.from_values(history[C.user].to_numpy())
    warm = history_users.codes(test[C.user].to_numpy()) >= 0
    test = test[warm].reset_index(drop=True)
    test_index = IdIndex.from_values(test[C.user].to_numpy())
    test_users = test_index.ids
    log.info("test period: %d users with history before it are evaluated, %d events of new "
             "users left out", len(test_index), int((~warm).sum()))
    heard = history[test_index.codes(history[C.user].to_numpy()) >= 0]
    n = max(s.eval_k)
    top_popular = popular_for_users(run.read(io.TOP_POPULAR), test_users, heard, n)
    del heard

    def evaluated(table: pd.DataFrame) -> pd.DataFrame:
        return table[test_index.codes(table[C.user].to_numpy()) >= 0].reset_index(drop=True)

    # Metrics look at ranks <= max(k) only: reading just those rows of the 100-long lists
    # keeps this stage's memory a fraction of the full tables' (137 M rows each at full size).
    recs = {
        "top_popular": evaluated(top_popular),
        "als": evaluated(run.read(io.PERSONAL_ALS, max_rank=n)),
        "similar_recent": evaluated(pd.read_parquet(run.work / SIMILAR_RECENT,
                                                    filters=[(C.rank, "<=", n)])),
        "ranker": evaluated(run.read(io.RECOMMENDATIONS, max_rank=n)),
    }
    del top_popular
    n_items = pq.ParquetFile(run.parquet / io.ITEMS).metadata.num_rows
    metrics = evaluate(recs, test, history, n_items, ks=tuple(s.eval_k))
    io.write_table(metrics, run.out / io.METRICS)
    io.write_figure(plot_metrics(metrics), run.out / io.METRICS_PNG)
    k = 10 if 10 in s.eval_k else max(s.eval_k)
    table = metrics[metrics["k"] == k].set_index("source")
    log.info("metrics@%d on the test period (NDCG is the headline):\n%s", k,
             table[["ndcg", "precision", "recall", "map", "coverage", "novelty"]].to_string())


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "split": stage_split,
    "popular": stage_popular,
    "als": stage_als,
    "similar": stage_similar,
    "rank": stage_rank,
    "evaluate": stage_evaluate,
}


# --- runner -----------------------------------------------------------------------------------


def _timed(stage: str, run: RunContext) -> float:
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    started = time.perf_counter()
    log.info("stage %s: started", stage)
    STAGE_FUNCTIONS[stage](run)
    elapsed = time.perf_counter() - started
    log.info("stage %s: done in %.1f s", stage, elapsed)
    return elapsed


def _file_stats(folder: Path) -> dict[str, dict[str, int]]:
    stats = {}
    for name in ARTEFACTS:
        path = folder / name
        if not path.exists():
            continue
        rows = pq.ParquetFile(path).metadata.num_rows if name.endswith(".parquet") else None
        stats[name] = {"rows": rows, "bytes": path.stat().st_size}
    return stats


def build_manifest(settings: Settings, run_id: str, timings: dict[str, float]) -> dict:
    """The manifest of the artefacts now in the parquet folder."""
    parquet = Path(settings.parquet_dir)
    data = Path(settings.data_dir)
    split_path = parquet / WORK_DIR / SPLIT_JSON
    metrics_path = parquet / io.METRICS
    return {
        "run_id": run_id,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_dir": str(data.resolve()),
        "input_files": {name: (data / name).stat().st_size
                        for name in io.INPUT_FILES if (data / name).exists()},
        "prepared_files": {name: (parquet / name).stat().st_size
                           for name in (io.ITEMS, io.EVENTS) if (parquet / name).exists()},
        "parameters": settings.model_dump(mode="json"),
        "split": io.read_json(split_path) if split_path.exists() else None,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "metrics": (pd.read_parquet(metrics_path).to_dict(orient="records")
                    if metrics_path.exists() else None),
        "artefacts": _file_stats(parquet),
    }


def run_stage(stage: str, settings: Settings) -> None:
    """Run one stage, writing its artefacts in place (each file atomically), then refresh the
    manifest."""
    run = RunContext(settings, Path(settings.parquet_dir))
    elapsed = _timed(stage, run)
    io.write_json(build_manifest(settings, f"stage-{stage}-{uuid.uuid4().hex[:8]}",
                                 {stage: elapsed}), run.parquet / io.MANIFEST)


def run_all(settings: Settings) -> dict:
    """Every stage from prepared data to metrics; the new artefact set replaces the old one
    only when all stages succeeded. Returns the manifest."""
    parquet = Path(settings.parquet_dir)
    if not (parquet / io.EVENTS).exists():
        raise DataError(f"{parquet / io.EVENTS} not found: run `python -m musicrec prepare`")
    for stale in parquet.glob(".staging-*"):  # left by a run that was killed
        log.warning("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    staging = parquet / f".staging-{run_id}"
    staging.mkdir(parents=True)
    run = RunContext(settings, staging, keep_events=True)
    timings: dict[str, float] = {}
    try:
        for stage in STAGES:
            timings[stage] = _timed(stage, run)
        for name in ARTEFACTS:
            if (staging / name).exists():
                os.replace(staging / name, parquet / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = build_manifest(settings, run_id, timings)
    io.write_json(manifest, parquet / io.MANIFEST)
    log.info("run %s: %s", run_id,
             ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items()))
    return manifest
