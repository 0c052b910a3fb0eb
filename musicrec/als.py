"""Helpers around a fitted implicit ALS model: top-k of unheard tracks for many users
(exact, or through an IVF index), recommendation tables, rebuilding a model from factors.

The model itself is fitted by ``musicrec.sources.AlsSource`` (confidence 1 + alpha * strength).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.topk import topk
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from musicrec.arrays import distinct, gather_rows, in_sorted, rank_in_groups
from musicrec.columns import Columns as C
from musicrec.listens import IdIndex
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
    user_items: sp.csr_matrix  # what each user heard (rows = user codes; values unused)

    @property
    def users(self) -> IdIndex:
        return IdIndex(self.user_ids)

    @property
    def tracks(self) -> IdIndex:
        return IdIndex(self.track_ids)

    @cached_property
    def by_norm(self) -> NormOrder:
        """The item factors sorted by norm for the exact top-k (built on first use)."""
        return NormOrder.of(self.model.item_factors)


@dataclass
class NormOrder:
    """Item factors sorted by norm, largest first: a user's score of any track past position
    ``m`` is at most |u| * norms[m] (Cauchy-Schwarz), so an exact top-k can stop scanning
    there once its n-th best score is above that bound."""

    order: np.ndarray  # int32 item code at each position
    position: np.ndarray  # int32 position of each item code
    items: np.ndarray  # float32 factors in that order (C-contiguous: prefixes are views)
    norms: np.ndarray  # float32 norms in that order, one trailing 0

    @classmethod
    def of(cls, item_factors: np.ndarray) -> NormOrder:
        factors = np.asarray(item_factors, dtype=np.float32)
        norms = np.linalg.norm(factors, axis=1)
        order = np.argsort(-norms, kind="stable").astype(np.int32)
        position = np.empty(order.size, dtype=np.int32)
        position[order] = np.arange(order.size, dtype=np.int32)
        return cls(
            order,
            position,
            np.ascontiguousarray(factors[order]),
            np.append(norms[order], np.float32(0)),
        )


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
    return AlsModel(
        model, np.asarray(user_ids, np.int32), np.asarray(track_ids, np.int32), user_items
    )


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

    Without ``index``: exact. Tracks are scanned by decreasing factor norm, a growing prefix
    at a time, until the n-th best unheard score is above what any track left could score
    (``NormOrder``): ALS norms spread widely (popular tracks have the long vectors), so most
    users stop within a few percent of the catalogue, and a user it does not suit is scanned
    whole, as brute force would. With an ``IvfIndex`` over the item factors: approximate,
    only the probed clusters are scored (see ``musicrec.topk``); users whose list comes out
    short fall back to the exact path.
    """
    rows = np.asarray(rows, dtype=np.int32)
    n = min(n, len(model.track_ids))
    if index is not None:
        return _recommend_ann(model, rows, n, index, progress)
    out_rows, out_tracks, out_scores = [], [], []
    batches = range(0, rows.size, batch_size)
    with threadpool_limits(limits=1, user_api="blas"):
        for start in tqdm(
            batches, desc="ALS top-k", unit="batch", disable=not progress, mininterval=2
        ):
            batch = rows[start : start + batch_size]
            ids, scores = _exact_batch(model, batch, n)
            keep = scores > _FILTERED_SCORE
            out_rows.append(np.broadcast_to(batch[:, None], ids.shape)[keep])
            out_tracks.append(ids[keep].astype(np.int32))
            out_scores.append(scores[keep].astype(np.float32))
    if not out_rows:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(0, np.float32)
    return np.concatenate(out_rows), np.concatenate(out_tracks), np.concatenate(out_scores)


# the first prefix of the exact scan (in tracks by norm); each further pass scans 4x as many
_FIRST_SCAN = 16384


def _exact_batch(model: AlsModel, batch: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(track codes, scores) of the exact top-``n`` unheard tracks of each user code in
    ``batch``, rows of ``n`` best first, padded with scores of -FLT_MAX."""
    by = model.by_norm
    n_items = by.order.size
    user_factors = model.model.user_factors
    user_items = model.user_items
    user_norms = np.linalg.norm(user_factors[batch], axis=1)
    codes = np.zeros((batch.size, n), dtype=np.int32)
    scores = np.full((batch.size, n), -np.finfo(np.float32).max, dtype=np.float32)
    todo = np.arange(batch.size)
    m = min(n_items, max(_FIRST_SCAN, 4 * n))
    while todo.size:
        users = batch[todo]
        heard_pos, local = gather_rows(user_items.indptr, users)
        heard = by.position[user_items.indices[heard_pos]]
        inside = heard < m
        heard_matrix = sp.csr_matrix(
            (np.ones(int(inside.sum()), np.float32), (local[inside], heard[inside])),
            shape=(users.size, m),
        )
        k = min(n, m)
        ids, top = topk(
            by.items[:m],
            user_factors[users],
            k,
            filter_query_items=heard_matrix,
            num_threads=model.model.num_threads,
        )
        # past position m no track scores above |u| * norms[m]; the slack covers rounding
        bound = user_norms[todo] * by.norms[m]
        done = np.full(users.size, m >= n_items)
        if k == n:
            done |= bound + 1e-5 * (np.abs(bound) + 1.0) < top[:, n - 1]
        rows = todo[done]
        codes[rows, :k] = by.order[ids[done]]
        scores[rows, :k] = top[done]
        todo = todo[~done]
        m = min(n_items, m * 4)
    return codes, scores


# The ANN query asks for n + (tracks heard) results so that n survive the heard filter, capped
# here; heavier listeners whose list comes out short are served by the exact path.
_MAX_EXTRA = 2048


def _recommend_ann(
    model: AlsModel,
    rows: np.ndarray,
    n: int,
    index: IvfIndex,
    progress: bool,
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
    todo = np.arange(rows.size)
    nprobe = index.nprobe
    while True:
        for start in tqdm(
            range(0, todo.size, batch_size),
            desc="ALS top-k (ANN)",
            unit="batch",
            disable=not progress or nprobe != index.nprobe,
            mininterval=2,
        ):
            part = todo[start : start + batch_size]
            for k in np.unique(bucket[part]):
                pos = part[bucket[part] == k]
                _ann_batch(model, rows[pos], pos, int(k), n, index, nprobe, out_codes, out_scores)
        todo = todo[(out_codes[todo] >= 0).sum(axis=1) < wanted[todo]]
        if (
            not todo.size
            or nprobe != index.nprobe
            or nprobe >= index.nlist
            or todo.size > rows.size // 2
        ):
            break
        # a few users' probed clusters held too few unheard tracks: scan 8x as many for them
        # (once: wider scans cost more than the exact path). When most lists come out short
        # the clustering does not suit these factors (norms spread over orders of magnitude,
        # as weakly regularised ALS gives: the MIPS transform then packs most tracks into a
        # few clusters no query probes) and the exact path serves them all.
        log.info(
            "ALS top-k: %d of %d users got a short ANN list at nprobe %d, scanning %d",
            todo.size,
            rows.size,
            nprobe,
            min(nprobe * 8, index.nlist),
        )
        nprobe = min(nprobe * 8, index.nlist)
    if todo.size:
        log.info(
            "ALS top-k: %d of %d users got a short ANN list, served exactly", todo.size, rows.size
        )
        e_rows, e_tracks, e_scores = recommend_codes(model, rows[todo], n, progress=False)
        slot = rank_in_groups(e_rows)
        where = todo[_positions(rows[todo], e_rows)]
        out_codes[todo] = -1
        out_scores[todo] = -np.inf
        out_codes[where, slot] = e_tracks
        out_scores[where, slot] = e_scores
    keep = out_codes >= 0
    return (np.broadcast_to(rows[:, None], keep.shape)[keep], out_codes[keep], out_scores[keep])


def _ann_batch(
    model: AlsModel,
    batch: np.ndarray,
    pos: np.ndarray,
    k: int,
    n: int,
    index: IvfIndex,
    nprobe: int,
    out_codes: np.ndarray,
    out_scores: np.ndarray,
) -> None:
    """The ``k`` nearest tracks of each user in ``batch`` less the heard ones, first ``n``
    written to rows ``pos`` of the outputs (a row is rewritten whole)."""
    user_items = model.user_items
    n_tracks = len(model.track_ids)
    codes, scores = index.search(model.model.user_factors[batch], k, nprobe)
    heard_pos, local = gather_rows(user_items.indptr, batch)
    heard = np.sort(local.astype(np.int64) * n_tracks + user_items.indices[heard_pos])
    keys = np.arange(batch.size, dtype=np.int64)[:, None] * n_tracks + codes
    keep = (codes >= 0) & ~in_sorted(heard, keys)
    keep &= np.cumsum(keep, axis=1) <= n
    slot = np.cumsum(keep, axis=1) - 1
    r, c = np.nonzero(keep)
    out_codes[pos] = -1
    out_scores[pos] = -np.inf
    out_codes[pos[r], slot[r, c]] = codes[r, c]
    out_scores[pos[r], slot[r, c]] = scores[r, c]


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
    return IvfIndex(
        model.model.item_factors,
        metric=metric,
        nprobe=settings.ann_nprobe,
        threads=settings.threads,
        seed=settings.seed,
    )


def recommend_als(
    model: AlsModel, user_ids: np.ndarray, n: int, batch_size: int = 4096
) -> pd.DataFrame:
    """Top-``n`` ALS recommendations (recs schema, input ids) for the users that have factors;
    already heard tracks are excluded and users unknown to the model are skipped."""
    codes = model.users.codes(distinct(user_ids))
    skipped = int((codes < 0).sum())
    if skipped:
        log.info(
            "ALS: %d of %d users have no factors (no training events), skipped", skipped, codes.size
        )
    rows, tracks, scores = recommend_codes(model, codes[codes >= 0], n, batch_size)
    return recs_frame(model.user_ids[rows], model.track_ids[tracks], scores)


def recs_frame(user_ids: np.ndarray, track_ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """A recommendation table sorted by user and score, with 1-based ranks."""
    user_ids, track_ids = np.asarray(user_ids, np.int32), np.asarray(track_ids, np.int32)
    scores = np.asarray(scores, np.float32)
    same_user = user_ids[1:] == user_ids[:-1]
    if np.all(user_ids[1:] >= user_ids[:-1]) and np.all(
        scores[1:][same_user] <= scores[:-1][same_user]
    ):
        # already grouped and best first (top-k output): skip the sort
        order: slice | np.ndarray = slice(None)
    else:
        order = np.lexsort((track_ids, -scores.astype(np.float64), user_ids))
    users = user_ids[order]
    return pd.DataFrame(
        {
            C.user: users,
            C.track: track_ids[order],
            C.score: scores[order],
            C.rank: (rank_in_groups(users) + 1).astype(np.int16),
        }
    )
