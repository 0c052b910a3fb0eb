"""Implicit ALS over the users x tracks matrix, weighted by the recency of each listen.

The log has no play counts (one row per user and track), so the only strength signal is the
date: an event weighs ``0.5 ** (age_days / half_life)`` relative to the last training day, and
implicit turns that into a confidence with ``alpha``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from musicrec.columns import Columns as C
from musicrec.features import History, IdIndex, build_history, days_decay
from musicrec.settings import Settings

log = logging.getLogger(__name__)

# implicit marks filtered (already heard) items with -FLT_MAX; anything this low is not a rec.
_FILTERED_SCORE = -1e30


@dataclass
class AlsModel:
    """A fitted implicit model with the input ids of its rows (users) and columns (tracks)."""

    model: AlternatingLeastSquares
    user_ids: np.ndarray  # int32, sorted; row code = position
    track_ids: np.ndarray  # int32, sorted; column code = position
    user_items: sp.csr_matrix  # the confidence matrix it was fitted on (rows = user codes)

    @property
    def users(self) -> IdIndex:
        return IdIndex(self.user_ids)

    @property
    def tracks(self) -> IdIndex:
        return IdIndex(self.track_ids)


def user_items_matrix(history: History, half_life_days: float) -> sp.csr_matrix:
    """users x tracks CSR from the grouped history: no sort, values = recency weights."""
    weights = days_decay((history.cutoff - 1) - history.days.astype(np.int32), half_life_days)
    return sp.csr_matrix(
        (weights, history.track_codes, history.indptr),
        shape=(history.n_users, history.n_tracks),
    )


def fit_als_history(history: History, settings: Settings) -> AlsModel:
    """Fit ALS on an already grouped history (the ranker builds one and reuses it)."""
    user_items = user_items_matrix(history, settings.recency_half_life_days)
    model = AlternatingLeastSquares(
        factors=settings.als_factors,
        regularization=settings.als_regularization,
        alpha=settings.als_alpha,
        iterations=settings.als_iterations,
        random_state=settings.seed,
        num_threads=settings.threads,
    )
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(user_items, show_progress=log.isEnabledFor(logging.INFO))
    log.info("ALS fit: %d users x %d tracks, %d events, %d factors, %d iterations in %.1f s",
             history.n_users, history.n_tracks, history.n_events, settings.als_factors,
             settings.als_iterations, time.perf_counter() - started)
    return AlsModel(model, history.users.ids.astype(np.int32),
                    history.tracks.ids.astype(np.int32), user_items)


def fit_als(events: pd.DataFrame, settings: Settings, last_day: int) -> AlsModel:
    """Fit ALS on ``events`` (all on or before ``last_day``), recency-weighted to ``last_day``."""
    return fit_als_history(build_history(events, last_day + 1), settings)


def als_from_factors(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    user_ids: np.ndarray,
    track_ids: np.ndarray,
    user_items: sp.csr_matrix,
    threads: int = 1,
) -> AlsModel:
    """Rebuild a model from saved factors (the runner stores factors, not pickles)."""
    model = AlternatingLeastSquares(factors=user_factors.shape[1], num_threads=threads)
    model.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    model.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
    return AlsModel(model, np.asarray(user_ids, np.int32), np.asarray(track_ids, np.int32),
                    user_items)


def recommend_codes(
    model: AlsModel, rows: np.ndarray, n: int, batch_size: int = 4096, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` unheard track codes for user codes ``rows``: (row, track code, score) arrays.

    Brute force over all tracks with implicit's batched top-k; the one place to swap in an
    approximate index later.
    """
    rows = np.asarray(rows, dtype=np.int32)
    n = min(n, len(model.track_ids))
    out_rows, out_tracks, out_scores = [], [], []
    batches = range(0, rows.size, batch_size)
    with threadpool_limits(limits=1, user_api="blas"):
        for start in tqdm(batches, desc="ALS top-k", unit="batch", disable=not progress,
                          mininterval=2):
            batch = rows[start:start + batch_size]
            ids, scores = model.model.recommend(
                batch, model.user_items[batch], N=n, filter_already_liked_items=True
            )
            keep = scores > _FILTERED_SCORE
            out_rows.append(np.broadcast_to(batch[:, None], ids.shape)[keep])
            out_tracks.append(ids[keep].astype(np.int32))
            out_scores.append(scores[keep].astype(np.float32))
    if not out_rows:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(0, np.float32)
    return np.concatenate(out_rows), np.concatenate(out_tracks), np.concatenate(out_scores)


def recommend_als(
    model: AlsModel, user_ids: np.ndarray, n: int, batch_size: int = 4096
) -> pd.DataFrame:
    """Top-``n`` ALS recommendations (recs schema, input ids) for the users that have factors;
    already heard tracks are excluded and users unknown to the model are skipped."""
    codes = model.users.codes(np.unique(np.asarray(user_ids)))
    skipped = int((codes < 0).sum())
    if skipped:
        log.info("ALS: %d of %d users have no factors (no training events), skipped",
                 skipped, codes.size)
    rows, tracks, scores = recommend_codes(model, codes[codes >= 0], n, batch_size)
    return recs_frame(model.user_ids[rows], model.track_ids[tracks], scores)


def recs_frame(user_ids: np.ndarray, track_ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """A recommendation table sorted by user and score, with 1-based ranks."""
    user_ids, track_ids = np.asarray(user_ids, np.int32), np.asarray(track_ids, np.int32)
    scores = np.asarray(scores, np.float32)
    same_user = user_ids[1:] == user_ids[:-1]
    if np.all(user_ids[1:] >= user_ids[:-1]) and np.all(scores[1:][same_user]
                                                         <= scores[:-1][same_user]):
        order = slice(None)  # already grouped and best first (top-k output): skip the sort
    else:
        order = np.lexsort((track_ids, -scores.astype(np.float64), user_ids))
    users = user_ids[order]
    starts = np.r_[True, users[1:] != users[:-1]] if users.size else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(users.size), 0))
    return pd.DataFrame(
        {
            C.user: users,
            C.track: track_ids[order],
            C.score: scores[order],
            C.rank: (np.arange(users.size) - first + 1).astype(np.int16),
        }
    )
