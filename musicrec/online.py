"""Live personalisation: ALS fold-in of online events, the per-artist variety cap, and the
replay evaluation that decides which online method the service serves.

Fold-in (:func:`fold_in`): implicit's ALS solves a user's vector in closed form,
``x = (YtY + reg I + Yt (Cu - I) Y)^-1 Yt Cu p`` over the tracks the user heard (confidence
``c`` per heard track), which is what ``AlternatingLeastSquares.recalculate_user`` computes. A
user with online events gets the same solve over them (``c = 1 + alpha * plays``, the model's
confidence: an online event is the newest, so its recency weight is 1). A user who also has
offline factors ``x0`` keeps them as a prior: the offline part of the system is taken as
``(YtY + reg I) x = (YtY + reg I) x0`` (the user's offline confidences are not served), so
with no online events the answer is ``x0`` and with no offline factors it is exactly
``recalculate_user`` on the online events. The vector is scored against the tracks of the IVF
clusters nearest to it (:class:`FoldInModel`; rows grouped by cluster at publish time, so a
request reads a few contiguous slices of the mapped factors instead of a million rows).

The variety cap (:func:`cap_per_artist`): at most ``cap`` tracks of one artist in the first k,
the deferred ones kept after them in order (so a list is never shorter for it).

The replay (:func:`replay`): models fitted only on the events before the test period; for each
sampled test user the first half of their test-period events are the online history and the
tracks of the second half they had not heard are the truth; every online method builds its
list as the service does and is scored by NDCG@10 with a bootstrap interval over users, with
intra-list artist diversity beside it, for each cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musicrec.arrays import in_sorted, lookup_sorted
from musicrec.columns import Columns as C
from musicrec.metrics import (
    bootstrap_difference,
    bootstrap_interval,
    list_concentration,
    list_diversity,
)

log = logging.getLogger(__name__)

ONLINE_METHODS = ("similar", "foldin", "blend")
MAX_EXPLAINED_HISTORY = 2000  # offline tracks weighed for a reason (bounded work per request)


# --- fold-in ------------------------------------------------------------------------------------


def fold_in(
    item_factors: np.ndarray,
    gram: np.ndarray,
    regularization: float,
    rows: np.ndarray,
    confidence: np.ndarray,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The user's vector solved against ``item_factors`` from the heard ``rows`` with their
    ``confidence`` (implicit's closed form; ``gram`` = YtY over every item), with ``prior`` (the
    offline factors) held by ``YtY + reg I``. Returns (vector float64, the system matrix A)."""
    f = gram.shape[0]
    base = gram + regularization * np.eye(f)
    y = np.asarray(item_factors[np.asarray(rows, dtype=np.int64)], dtype=np.float64)
    c = np.asarray(confidence, dtype=np.float64)
    a = base + (y.T * (c - 1.0)) @ y
    b = y.T @ c
    if prior is not None:
        b = b + base @ np.asarray(prior, dtype=np.float64)
    return np.linalg.solve(a, b), a


def online_confidence(track_rows: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of the online events and their confidence ``1 + alpha * plays``."""
    rows, plays = np.unique(np.asarray(track_rows, dtype=np.int64), return_counts=True)
    return rows, 1.0 + alpha * plays.astype(np.float64)


def top_rows(scores: np.ndarray, exclude: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` best ``scores``, best first (ties by row), none of ``exclude``.
    ``scores`` is overwritten at the excluded rows (the caller's fresh product: no copy)."""
    exclude = exclude[(exclude >= 0) & (exclude < scores.size)]
    if exclude.size:
        scores[exclude] = -np.inf
    n = min(n, scores.size - np.unique(exclude).size)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    head = (
        np.argpartition(scores, scores.size - n)[scores.size - n :]
        if n < scores.size
        else np.arange(scores.size)
    )
    return head[np.lexsort((head, -scores[head]))]


def explain(
    item_factors: np.ndarray,
    system: np.ndarray,
    history_rows: np.ndarray,
    confidence: np.ndarray,
    rec_rows: np.ndarray,
    n: int = 3,
) -> list[list[int]]:
    """For each recommended row, up to ``n`` history rows that add most to its score (as
    implicit's ``explain``: score = sum over heard j of c_j * y_i' A^-1 y_j); positive ones only."""
    if history_rows.size == 0 or rec_rows.size == 0:
        return [[] for _ in range(rec_rows.size)]
    y_hist = np.asarray(item_factors[history_rows], dtype=np.float64)
    y_rec = np.asarray(item_factors[rec_rows], dtype=np.float64)
    part = (y_rec @ np.linalg.solve(system, y_hist.T)) * confidence[None, :]  # recs x history
    order = np.argsort(-part, axis=1, kind="stable")[:, :n]
    out = []
    for i in range(rec_rows.size):
        out.append([int(history_rows[j]) for j in order[i] if part[i, j] > 0])
    return out


@dataclass(frozen=True)
class FoldInModel:
    """The served ALS factors: item rows grouped by cluster (an inverted file: list ``c`` is
    rows ``list_offsets[c]:list_offsets[c + 1]``, most listened first within it), a sorted
    index from track id to row, the users' offline factors and the rows each user heard
    offline. A request scores only the rows of the ``nprobe`` clusters whose centroids have the
    best inner product bound with the user's vector (as ``musicrec.topk``'s IVF index does for
    the pipeline), contiguous slices of the mapped file."""

    item_factors: np.ndarray  # float32 (n_tracks, f), grouped by cluster
    track_ids: np.ndarray  # int32 track id of each row
    sorted_tracks: np.ndarray  # int32 sorted track ids
    sorted_rows: np.ndarray  # int32 row of each sorted id
    gram: np.ndarray  # float64 (f, f): YtY over every row
    regularization: float
    alpha: float
    user_ids: np.ndarray  # int32 sorted
    user_factors: np.ndarray  # float32 (n_users, f)
    heard_offsets: np.ndarray  # int64 n_users + 1
    heard_rows: np.ndarray  # int32 rows heard offline by each user
    list_offsets: np.ndarray  # int64 n_lists + 1
    centroids: np.ndarray  # float32 (n_lists, f)
    centroid_norms2: np.ndarray  # float32 squared norms of the centroids in the augmented space

    def rows_of(self, track_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each track id (int64), -1 for a track without factors."""
        ids = np.asarray(track_ids, dtype=np.int64)
        out = np.full(ids.size, -1, dtype=np.int64)
        if self.sorted_tracks.size == 0 or ids.size == 0:
            return out
        ok = (ids >= 0) & (ids <= np.iinfo(np.int32).max)
        pos = lookup_sorted(self.sorted_tracks, ids[ok].astype(np.int32))
        out[np.flatnonzero(ok)[pos >= 0]] = self.sorted_rows[pos[pos >= 0]]
        return out

    def user_position(self, user_id: int) -> int:
        """Row of the user's offline factors, or -1."""
        if self.user_ids.size == 0 or not 0 <= user_id <= np.iinfo(np.int32).max:
            return -1
        i = int(self.user_ids.searchsorted(np.int32(user_id)))
        return i if i < self.user_ids.size and self.user_ids[i] == user_id else -1

    def heard_of(self, position: int) -> np.ndarray:
        if position < 0:
            return self.heard_rows[:0]
        return self.heard_rows[self.heard_offsets[position] : self.heard_offsets[position + 1]]

    def solve(
        self, user_id: int, online_tracks: Sequence[int]
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fold the online events in: (user row or -1, online rows, their confidence, the
        vector, the system matrix)."""
        position = self.user_position(user_id)
        online = self.rows_of(online_tracks)
        rows, conf = online_confidence(online[online >= 0], self.alpha)
        prior = None if position < 0 else self.user_factors[position]
        vector, system = fold_in(
            self.item_factors, self.gram, self.regularization, rows, conf, prior
        )
        return position, rows, conf, vector, system

    def candidate_rows(self, vector: np.ndarray, nprobe: int) -> np.ndarray | None:
        """Rows of the ``nprobe`` clusters nearest the vector (by the IVF inner-product rule:
        2 q.c - |c'|^2), or None for every row (``nprobe`` 0 or at least the clusters)."""
        n_lists = self.list_offsets.size - 1
        if nprobe <= 0 or nprobe >= n_lists:
            return None
        bound = 2.0 * (self.centroids @ vector.astype(np.float32)) - self.centroid_norms2
        lists = np.argpartition(bound, n_lists - nprobe)[n_lists - nprobe :]
        starts, stops = self.list_offsets[lists], self.list_offsets[lists + 1]
        lengths = stops - starts
        # the probed ranges as one array of rows: start of each range plus 0..length-1
        first = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        return first + np.arange(int(lengths.sum()), dtype=np.int64)

    def recommend(
        self, user_id: int, online_tracks: Sequence[int], n: int, nprobe: int
    ) -> list[int]:
        """The ``n`` best tracks (ids) for the user after folding in the online events,
        among the rows of ``nprobe`` clusters (0 = every row, exact); none heard offline or
        online."""
        position, rows, _, vector, _ = self.solve(user_id, online_tracks)
        heard = np.concatenate([self.heard_of(position).astype(np.int64), rows])
        v32 = vector.astype(np.float32)
        candidates = self.candidate_rows(vector, nprobe)
        while candidates is not None and candidates.size < n + heard.size:
            # too few rows in the nearest clusters (small clusters, or a heavy listener's
            # heard tracks): widen the probe before scoring every track (30-55 ms at 1 M)
            nprobe *= 4
            candidates = self.candidate_rows(vector, nprobe)  # None: every cluster, exact
        if candidates is not None:
            scores = self.item_factors[candidates] @ v32
            if heard.size:  # a binary search per candidate (np.isin sorts both: 3x slower)
                scores[in_sorted(np.sort(heard), candidates)] = -np.inf
            best = top_rows(scores, np.zeros(0, dtype=np.int64), n)
            best = best[np.isfinite(scores[best])]
            return self.track_ids[candidates[best]].tolist()
        scores = self.item_factors @ v32  # exact: small catalogues, or too few candidates
        return self.track_ids[top_rows(scores, heard, n)].tolist()

    def explain_tracks(
        self,
        user_id: int,
        online_tracks: Sequence[int],
        track_ids: Sequence[int],
        n: int = 3,
        max_history: int = MAX_EXPLAINED_HISTORY,
    ) -> list[list[int]]:
        """For each of ``track_ids``, up to ``n`` of the user's own tracks (online events, then
        offline ones) that add most to its fold-in score; [] for a track without factors."""
        position, rows, conf, _, system = self.solve(user_id, online_tracks)
        offline = self.heard_of(position)[:max_history].astype(np.int64)
        history = np.concatenate([rows, offline])
        weights = np.concatenate([conf, np.full(offline.size, 1.0 + self.alpha)])
        history, first = np.unique(history, return_index=True)
        wanted = self.rows_of(track_ids)
        known = np.flatnonzero(wanted >= 0)
        out: list[list[int]] = [[] for _ in range(wanted.size)]
        found = explain(self.item_factors, system, history, weights[first], wanted[known], n)
        for i, because in zip(known.tolist(), found, strict=True):
            out[i] = [int(self.track_ids[r]) for r in because]
        return out


def cluster_rows(
    item_factors: np.ndarray, order: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group the rows ``order`` (item codes, most listened first) into IVF clusters for inner
    product (k-means over ``[y, sqrt(M^2 - |y|^2)]``, as ``musicrec.topk``): (codes grouped by
    cluster, keeping ``order`` within one; list offsets; centroids; their squared norms in
    the augmented space)."""
    import faiss

    from musicrec.topk import default_nlist

    items = np.ascontiguousarray(item_factors, dtype=np.float32)
    n, f = items.shape
    n_lists = max(1, default_nlist(n))
    norms2 = np.einsum("ij,ij->i", items, items)
    vectors = np.ascontiguousarray(
        np.hstack([items, np.sqrt(np.maximum(norms2.max() - norms2, 0))[:, None]]), dtype=np.float32
    )
    rng = np.random.default_rng(seed)
    sample = vectors if n <= 131_072 else vectors[np.sort(rng.choice(n, 131_072, replace=False))]
    kmeans = faiss.Kmeans(
        f + 1, n_lists, niter=10, seed=seed, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(sample)
    _, assigned = kmeans.index.search(vectors, 1)
    cluster = assigned.ravel()[order]
    grouped = order[np.argsort(cluster, kind="stable")]
    offsets = np.searchsorted(np.sort(cluster), np.arange(n_lists + 1)).astype(np.int64)
    centroids = np.asarray(kmeans.centroids, dtype=np.float32)
    return (
        grouped,
        offsets,
        np.ascontiguousarray(centroids[:, :f]),
        np.einsum("ij,ij->i", centroids, centroids).astype(np.float32),
    )


def first_codes(lists: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An int32 code of the first element of each list (-1: empty or null), equal firsts
    getting equal codes: a track's first artist for the per-artist cap and the variety
    metrics."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    out = np.full(len(lists), -1, dtype=np.int32)
    has = lengths > 0
    if has.any():
        firsts = pc.list_element(lists.filter(pa.array(has)), 0)
        out[has] = pc.dictionary_encode(firsts).indices.to_numpy(zero_copy_only=False)
    return out


def fold_in_arrays(
    model: Any, listeners: np.ndarray, regularization: float, alpha: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """The served arrays of a fitted ``AlsModel`` (``listeners``: per track code, to order
    the rows most listened first within a cluster; the heard rows are those of the matrix it
    was fitted on)."""
    item_factors = np.asarray(model.model.item_factors, dtype=np.float32)
    popular = np.argsort(-np.asarray(listeners), kind="stable").astype(np.int64)
    order, offsets, centroids, centroid_norms2 = cluster_rows(item_factors, popular, seed)
    row_of_code = np.empty(order.size, dtype=np.int32)  # int32: the gather below is nnz long
    row_of_code[order] = np.arange(order.size, dtype=np.int32)
    track_ids = np.asarray(model.track_ids, dtype=np.int32)[order]
    sorted_idx = np.argsort(track_ids, kind="stable")
    matrix = model.user_items.tocsr()
    heard_rows = row_of_code[matrix.indices]
    y = item_factors.astype(np.float64)
    return {
        "item_factors": np.ascontiguousarray(item_factors[order]),
        "track_ids": track_ids,
        "sorted_tracks": np.ascontiguousarray(track_ids[sorted_idx]),
        "sorted_rows": sorted_idx.astype(np.int32),
        "gram": y.T @ y,
        "params": np.array([regularization, alpha], dtype=np.float64),
        "user_ids": np.asarray(model.user_ids, dtype=np.int32),
        "user_factors": np.ascontiguousarray(model.model.user_factors, dtype=np.float32),
        "heard_offsets": matrix.indptr.astype(np.int64),
        "heard_rows": heard_rows,
        "list_offsets": offsets,
        "centroids": centroids,
        "centroid_norms2": centroid_norms2,
    }


def model_from_arrays(arrays: dict[str, np.ndarray]) -> FoldInModel:
    """A FoldInModel over the arrays of :func:`fold_in_arrays` (or their mapped files)."""
    params = arrays["params"]
    return FoldInModel(
        item_factors=arrays["item_factors"],
        track_ids=arrays["track_ids"],
        sorted_tracks=arrays["sorted_tracks"],
        sorted_rows=arrays["sorted_rows"],
        gram=np.asarray(arrays["gram"], dtype=np.float64),
        regularization=float(params[0]),
        alpha=float(params[1]),
        user_ids=arrays["user_ids"],
        user_factors=arrays["user_factors"],
        heard_offsets=arrays["heard_offsets"],
        heard_rows=arrays["heard_rows"],
        list_offsets=arrays["list_offsets"],
        centroids=arrays["centroids"],
        centroid_norms2=arrays["centroid_norms2"],
    )


# --- variety ------------------------------------------------------------------------------------


def cap_per_artist(tracks: Sequence[int], artists: Sequence[int], cap: int, k: int) -> list[int]:
    """The first ``k`` of ``tracks`` with at most ``cap`` per artist (``artists[i]`` is the
    artist of ``tracks[i]``; a negative artist is unknown and never capped); tracks pushed out
    follow in their order, so only a list without enough other artists breaks the cap."""
    if cap <= 0:
        return list(tracks[:k])
    taken: list[int] = []
    deferred: list[int] = []
    count: dict[int, int] = {}
    for track, artist in zip(tracks, artists, strict=True):
        if len(taken) == k:
            break
        if artist >= 0:
            seen = count.get(artist, 0)
            if seen >= cap:
                deferred.append(track)
                continue
            count[artist] = seen + 1
        taken.append(track)
    return (taken + deferred)[:k]


# --- the replay evaluation ----------------------------------------------------------------------


def _ndcg(recs: Sequence[int], truth: set[int], k: int) -> float:
    gains = sum(1.0 / np.log2(i + 2) for i, t in enumerate(recs[:k]) if t in truth)
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(truth), k)))
    return gains / ideal if ideal else 0.0


def blend(
    first: list[int],
    second: list[int],
    by_chance: bool,
    p: float,
    seed: int | Sequence[int] | None,
    limit: int | None,
) -> list[int]:
    """Two lists merged without duplicates, up to ``limit``: in turn (``by_chance`` False, the
    'strict' blend), or each next element from ``first`` with probability ``p`` (seeded by
    ``seed``). Lists of Python ints, arguments checked by the caller: the service's hot path
    and the replay evaluation use this one function."""
    n_first, n_second = len(first), len(second)
    draws: list[bool] | None = None
    if by_chance:
        draws = (np.random.default_rng(seed).random(n_first + n_second) < p).tolist()
    result: list[int] = []
    seen: set[int] = set()
    lists, pos, step = (first, second), [0, 0], 0
    limit = n_first + n_second if limit is None else limit
    # plain Python on purpose: the lists are at most 2k long, and a loop over two list
    # indices costs less than any numpy call on arrays this short
    while len(result) < limit and (pos[0] < n_first or pos[1] < n_second):
        if pos[0] >= n_first:
            side = 1
        elif pos[1] >= n_second:
            side = 0
        elif draws is None:
            side = step % 2
        else:
            side = 0 if draws[step] else 1
        step += 1
        source = lists[side]
        while pos[side] < len(source):  # the side's next track not yet in the list
            item = source[pos[side]]
            pos[side] += 1
            if item not in seen:
                seen.add(item)
                result.append(item)
                break
    return result


class _SimilarRows:
    """Similar tracks per track code (CSR), as the service serves them."""

    def __init__(
        self, query: np.ndarray, similar: np.ndarray, score: np.ndarray, n_tracks: int
    ) -> None:
        best = np.zeros(n_tracks, dtype=np.float32)
        np.maximum.at(best, query, score)
        score = score / np.maximum(best[query], 1e-12)
        order = np.lexsort((-score, query))
        self.values, self.scores = similar[order], score[order]
        self.offsets = np.searchsorted(query[order], np.arange(n_tracks + 1))

    def ranked(self, recent: list[int], exclude: set[int], limit: int) -> list[int]:
        """The service's online list: rows of the recent tracks, weight 1 / (1 + age)."""
        total: dict[int, float] = {}
        for age, t in enumerate(recent):
            lo, hi = self.offsets[t], self.offsets[t + 1]
            w = 1.0 / (1.0 + age)
            for v, s in zip(self.values[lo:hi].tolist(), self.scores[lo:hi].tolist(), strict=True):
                total[v] = total.get(v, 0.0) + w * s
        ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
        return [t for t, _ in ranked if t not in exclude][:limit]


def replay(
    settings: Any,
    users: int = 3000,
    k: int = 10,
    caps: Sequence[int] = (0, 1, 2, 3),
    bootstrap: int = 1000,
) -> pd.DataFrame:
    """NDCG@k, intra-list diversity and top-artist share of each online method (and the
    offline list alone, which ignores the online events) for each per-artist cap, on the test
    period replayed as online events; models fitted only on events before the test period.

    ``settings.parquet_dir`` must hold a prepared ``events.parquet`` and ``items.parquet``;
    nothing is written. Sources use the parameters of the folder's search (``work/
    search.json``) when there is one, else the configured ALS and item-kNN settings."""
    from musicrec import io
    from musicrec.listens import IdIndex, build_listens
    from musicrec.sources import AlsSource, TrainData, make_source
    from musicrec.split import events_before, split_dates

    started = time.perf_counter()
    parquet = Path(settings.parquet_dir)
    events = io.read_events(parquet / io.EVENTS)
    dates = split_dates(events, settings)
    cutoff = dates.test_start
    items = pq.read_table(parquet / io.ITEMS, columns=[C.track, C.genre_ids, C.artist_ids])
    data = TrainData.build(build_listens(events_before(events, cutoff), cutoff), items)
    h = data.listens
    search_path = parquet / "work" / "search.json"
    chosen = io.read_json(search_path) if search_path.exists() else {}
    from musicrec.sources import SOURCES

    def params(name: str, steps: int) -> dict[str, Any]:
        """The searched parameters, else the first ``steps`` entries of the search space
        (each entry changes the previous one)."""
        if name in chosen:
            return chosen[name]["params"]
        merged: dict[str, Any] = {}
        for step in SOURCES[name].space(settings)[:steps]:
            merged.update(step)
        return merged

    # configured ALS; BM25 item-kNN with a decay (what validation keeps on small)
    als = make_source("als", settings, params("als", 2)).fit(data)
    assert isinstance(als, AlsSource)
    knn = make_source("item_knn", settings, params("item_knn", 3)).fit(data)
    similar = _SimilarRows(*knn.similar_pairs(settings.n_similar), h.n_tracks)
    listeners = data.listeners(None)
    arrays = fold_in_arrays(
        als.model, listeners, als.params["regularization"], als.params["alpha"], settings.seed
    )
    model = model_from_arrays(arrays)
    popular = np.argsort(-listeners, kind="stable")[:2000].tolist()
    # the first artist of each track code (-1 when none)
    artist_of = np.full(h.n_tracks, -1, dtype=np.int64)
    ids = items.column(C.track).to_numpy()
    firsts = [a[0] if a else -1 for a in items.column(C.artist_ids).to_pylist()]
    codes = h.tracks.codes(ids)
    artist_of[codes[codes >= 0]] = np.asarray(firsts, dtype=np.int64)[codes >= 0]
    log.info("replay: models fitted before %s in %.0f s", cutoff, time.perf_counter() - started)

    test = events[events[C.day].to_numpy() >= cutoff]
    test_users = test[C.user].to_numpy()
    test_codes = h.tracks.codes(test[C.track].to_numpy())
    keep = test_codes >= 0  # tracks new in the test period have no factors: not scorable
    test_users, test_codes = test_users[keep], test_codes[keep]
    order = np.argsort(test_users, kind="stable")  # file order within a user: oldest first
    test_users, test_codes = test_users[order], test_codes[order]
    uniq, starts, counts = np.unique(test_users, return_index=True, return_counts=True)
    eligible = np.flatnonzero(counts >= 4)
    rng = np.random.default_rng(settings.seed)
    if eligible.size > users:
        eligible = np.sort(rng.choice(eligible, users, replace=False))
    user_index = IdIndex(h.users.ids)
    user_codes = user_index.codes(uniq[eligible])
    n_list = 3 * k
    per_user: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for e, u_code in zip(eligible.tolist(), user_codes.tolist(), strict=True):
        seq = test_codes[starts[e] : starts[e] + counts[e]].tolist()
        half = len(seq) // 2
        online, rest = seq[:half], seq[half:]
        heard = (
            set(h.track_codes[h.indptr[u_code] : h.indptr[u_code + 1]].tolist())
            if u_code >= 0
            else set()
        )
        heard.update(online)
        truth = set(rest) - heard
        if not truth:
            continue
        online_ids = h.tracks.ids[online]
        user_id = int(uniq[e])
        recent: list[int] = []
        for t in reversed(online):
            if t not in recent:
                recent.append(t)
                if len(recent) == settings.online_history_window:
                    break
        online_list = similar.ranked(recent, heard, n_list)
        if u_code >= 0:
            ids_off = model.recommend(user_id, [], n_list + len(online), 0)
            offline = [c for c in h.tracks.codes(np.asarray(ids_off)).tolist() if c not in heard]
        else:
            offline = []
        fold_ids = model.recommend(user_id, online_ids.tolist(), n_list, settings.foldin_nprobe)
        folded = h.tracks.codes(np.asarray(fold_ids, dtype=np.int64)).tolist()
        lists = {
            "offline": offline,
            "similar": (
                blend(online_list, offline, False, 0.0, None, n_list) if offline else online_list
            ),
            "foldin": folded,
            "blend": blend(online_list, folded, False, 0.0, None, n_list),
        }
        for method, lst in lists.items():
            filled = list(lst)
            taken = set(filled) | heard
            for t in popular:
                if len(filled) >= n_list:
                    break
                if t not in taken:
                    filled.append(t)
                    taken.add(t)
            arts = artist_of[filled].tolist()
            for cap in caps:
                capped = cap_per_artist(filled, arts, cap, k)
                capped_arts = artist_of[capped].tolist()
                per_user.setdefault((method, cap), []).append(
                    (
                        _ndcg(capped, truth, k),
                        list_diversity(capped_arts),
                        list_concentration(capped_arts),
                    )
                )
    rows = []
    for (method, cap), values in per_user.items():
        v = np.asarray(values)
        low, high = bootstrap_interval(v[:, 0], n_boot=bootstrap, seed=settings.seed)
        # paired against the same method without a cap, and against the 'similar' method
        base = np.asarray(per_user[(method, caps[0])])[:, 0]
        cap_low, cap_high = bootstrap_difference(
            v[:, 0], base, n_boot=bootstrap, seed=settings.seed
        )
        ref = np.asarray(per_user[("similar", cap)])[:, 0]
        sim_low, sim_high = bootstrap_difference(v[:, 0], ref, n_boot=bootstrap, seed=settings.seed)
        rows.append(
            {
                "method": method,
                "cap": cap,
                "users": len(v),
                "ndcg": v[:, 0].mean(),
                "ndcg_low": low,
                "ndcg_high": high,
                "vs_uncapped_low": cap_low,
                "vs_uncapped_high": cap_high,
                "vs_similar_low": sim_low,
                "vs_similar_high": sim_high,
                "diversity": v[:, 1].mean(),
                "top_artist_share": v[:, 2].mean(),
            }
        )
    log.info(
        "replay: %d users in %.0f s",
        len(next(iter(per_user.values()), [])),
        time.perf_counter() - started,
    )
    return pd.DataFrame(rows)
