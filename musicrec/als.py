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
from musicrec.features import History, IdIndex, build_history, days_decay, gather_rows
from musicrec.settings import Settings
from musicrec.topk import IvfIndex

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


def fit_als_history(
    history: History,
    settings: Settings,
    warm_start: AlsModel | None = None,
    iterations: int | None = None,
) -> AlsModel:
    """Fit ALS on an already grouped history (the ranker builds one and reuses it).

    With ``warm_start`` the factors of users and tracks that model knows start from its values
    (new ones start small and random, as implicit would start them), so a few ``iterations``
    bring a model of a slightly longer history up to date instead of a full fit from scratch.
    """
    user_items = user_items_matrix(history, settings.recency_half_life_days)
    iterations = settings.als_iterations if iterations is None else iterations
    model = AlternatingLeastSquares(
        factors=settings.als_factors,
        regularization=settings.als_regularization,
        alpha=settings.als_alpha,
        iterations=iterations,
        random_state=settings.seed,
        num_threads=settings.threads,
    )
    if warm_start is not None:
        rng = np.random.default_rng(settings.seed)
        model.user_factors = _carried_factors(warm_start.model.user_factors, warm_start.users,
                                              history.users.ids, rng)
        model.item_factors = _carried_factors(warm_start.model.item_factors, warm_start.tracks,
                                              history.tracks.ids, rng)
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(user_items, show_progress=log.isEnabledFor(logging.INFO))
    log.info("ALS fit%s: %d users x %d tracks, %d events, %d factors, %d iterations in %.1f s",
             " (warm start)" if warm_start is not None else "", history.n_users,
             history.n_tracks, history.n_events, settings.als_factors, iterations,
             time.perf_counter() - started)
    return AlsModel(model, history.users.ids.astype(np.int32),
                    history.tracks.ids.astype(np.int32), user_items)


def _carried_factors(
    factors: np.ndarray, known: IdIndex, ids: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Rows for ``ids``: the known model's row where it has one, else small random values."""
    factors = np.asarray(factors, dtype=np.float32)
    if factors.shape[0] != len(known):
        raise ValueError("warm-start factors do not match the model's ids")
    out = rng.random((ids.size, factors.shape[1]), dtype=np.float32) * np.float32(0.01)
    codes = known.codes(ids)
    have = codes >= 0
    out[have] = factors[codes[have]]
    return out


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
    model: AlsModel,
    rows: np.ndarray,
    n: int,
    batch_size: int = 4096,
    progress: bool = True,
    index: IvfIndex | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` unheard track codes for user codes ``rows``: (row, track code, score) arrays,
    grouped by row in the order of ``rows``, best first.

    Without ``index``: exact, brute force over all tracks with implicit's batched top-k. With
    an ``IvfIndex`` over the item factors: approximate, only the probed clusters are scored
    (see ``musicrec.topk``); users whose list comes out short fall back to the exact path.
    """
    rows = np.asarray(rows, dtype=np.int32)
    n = min(n, len(model.track_ids))
    if index is not None:
        return _recommend_ann(model, rows, n, index, progress)
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


# The ANN query asks for n + (tracks heard) results so that n survive the heard filter, capped
# here; heavier listeners whose list comes out short are served by the exact path.
_MAX_EXTRA = 2048


def _recommend_ann(
    model: AlsModel, rows: np.ndarray, n: int, index: IvfIndex, progress: bool,
    batch_size: int = 32768,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    user_items = model.user_items
    n_tracks = len(model.track_ids)
    heard_count = np.diff(user_items.indptr)[rows]
    wanted = np.minimum(n, n_tracks - heard_count)  # a list can't be longer than the unheard
    out_codes = np.full((rows.size, n), -1, dtype=np.int32)
    out_scores = np.full((rows.size, n), -np.inf, dtype=np.float32)
    # bucket the query size by powers of two so one search serves many users
    need = n + np.minimum(heard_count, _MAX_EXTRA)
    bucket = np.left_shift(1, np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
    for start in tqdm(range(0, rows.size, batch_size), desc="ALS top-k (ANN)", unit="batch",
                      disable=not progress, mininterval=2):
        stop = min(start + batch_size, rows.size)
        for k in np.unique(bucket[start:stop]):
            pos = start + np.flatnonzero(bucket[start:stop] == k)
            batch = rows[pos]
            codes, scores = index.search(model.model.user_factors[batch], int(k))
            heard_pos, local = gather_rows(user_items.indptr, batch)
            heard = np.sort(local.astype(np.int64) * n_tracks + user_items.indices[heard_pos])
            keys = np.arange(batch.size, dtype=np.int64)[:, None] * n_tracks + codes
            at = np.minimum(np.searchsorted(heard, keys), max(heard.size - 1, 0))
            keep = codes >= 0
            if heard.size:
                keep &= heard[at] != keys
            keep &= np.cumsum(keep, axis=1) <= n
            slot = np.cumsum(keep, axis=1) - 1
            r, c = np.nonzero(keep)
            out_codes[pos[r], slot[r, c]] = codes[r, c]
            out_scores[pos[r], slot[r, c]] = scores[r, c]
    short = np.flatnonzero((out_codes >= 0).sum(axis=1) < wanted)
    if short.size:
        log.info("ALS top-k: %d of %d users got a short ANN list, served exactly",
                 short.size, rows.size)
        e_rows, e_tracks, e_scores = recommend_codes(model, rows[short], n, progress=False)
        starts = np.r_[True, e_rows[1:] != e_rows[:-1]] if e_rows.size else np.zeros(0, bool)
        slot = np.arange(e_rows.size) - np.maximum.accumulate(
            np.where(starts, np.arange(e_rows.size), 0))
        where = short[_positions(rows[short], e_rows)]
        out_codes[short] = -1
        out_scores[short] = -np.inf
        out_codes[where, slot] = e_tracks
        out_scores[where, slot] = e_scores
    keep = out_codes >= 0
    return (np.broadcast_to(rows[:, None], keep.shape)[keep], out_codes[keep],
            out_scores[keep])


def _positions(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position in ``ordered`` (distinct values) of each of ``values``."""
    order = np.argsort(ordered, kind="stable")
    return order[np.searchsorted(ordered[order], values)]


def item_index(model: AlsModel, settings: Settings, metric: str = "ip") -> IvfIndex | None:
    """The IVF index over the model's tracks when the settings ask for approximate top-k
    (``topk_method`` "ann", or "auto" with at least ``ann_min_tracks`` tracks), else None."""
    method = settings.topk_method
    if method == "exact" or (method == "auto" and len(model.track_ids) < settings.ann_min_tracks):
        return None
    return IvfIndex(model.model.item_factors, metric=metric, nprobe=settings.ann_nprobe,
                    threads=settings.threads, seed=settings.seed)


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
