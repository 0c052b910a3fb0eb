"""Candidate sources: named models that give each user a ranked list of unheard tracks.

A source is fitted on a ``TrainData`` (the listening events before a cut-off, with the
catalogue's artists) and answers, for a batch of that log's user codes, grouped arrays
(``Lists``: indptr, track codes, scores; best first, unheard, no duplicates). The pipeline,
the search and the ranker loop over ``SOURCES``: a new source is one class here and one entry
in that dict, and its ranker features are named after it.

Every source has a search space (``space``): its first configuration is the plain default,
the others are what validation may prefer. Values that depend on time (recency half-lives,
popularity windows) are fractions of the log's span and never finer than its date
granularity, so a six-year log with month-granular dates gets sensible candidates too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.nearest_neighbours import ItemItemRecommender, bm25_weight, normalize
from threadpoolctl import threadpool_limits

from musicrec.als import AlsModel, item_index, recommend_codes
from musicrec.arrays import (
    distinct,
    gather_rows,
    in_sorted,
    rank_in_groups,
    rank_in_rows,
    top_k_per_group,
)
from musicrec.columns import Columns as C
from musicrec.listens import IdIndex, Listens
from musicrec.settings import Settings

log = logging.getLogger(__name__)


# --- lists ------------------------------------------------------------------------------------


@dataclass
class Lists:
    """Ranked lists of a batch of users: ``tracks[indptr[i]:indptr[i + 1]]`` is the list of
    the batch's i-th user, best first."""

    indptr: np.ndarray  # int64, n_users + 1
    tracks: np.ndarray  # int32 track codes
    scores: np.ndarray  # float32

    @property
    def n_users(self) -> int:
        return self.indptr.size - 1

    def local(self) -> np.ndarray:
        """The batch row of each entry."""
        return np.repeat(np.arange(self.n_users, dtype=np.int32), np.diff(self.indptr))

    def ranks(self) -> np.ndarray:
        """1-based position of each entry in its list."""
        return (rank_in_rows(self.indptr) + 1).astype(np.int32)

    def rows(self, start: int, stop: int) -> Lists:
        """The lists of users ``start`` to ``stop`` (exclusive), sharing this one's arrays."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return Lists(self.indptr[start : stop + 1] - lo, self.tracks[lo:hi], self.scores[lo:hi])

    def head(self, n: int) -> Lists:
        """The first ``n`` entries of each list."""
        keep = self.ranks() <= n
        lengths = np.minimum(np.diff(self.indptr), n)
        indptr = np.zeros_like(self.indptr)
        np.cumsum(lengths, out=indptr[1:])
        return Lists(indptr, self.tracks[keep], self.scores[keep])

    @classmethod
    def from_flat(
        cls, n_users: int, local: np.ndarray, tracks: np.ndarray, scores: np.ndarray
    ) -> Lists:
        """From entries already grouped by ``local`` (ascending) and best first."""
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(local, minlength=n_users), out=indptr[1:])
        return cls(indptr, np.asarray(tracks, np.int32), np.asarray(scores, np.float32))

    @classmethod
    def best(
        cls, n_users: int, local: np.ndarray, tracks: np.ndarray, scores: np.ndarray, n: int
    ) -> Lists:
        """The ``n`` best (local, track, score) entries of each user, ties by track code."""
        top, _ = top_k_per_group(
            np.asarray(local), np.asarray(scores, np.float32), n, tiebreak=np.asarray(tracks)
        )
        return cls.from_flat(
            n_users, np.asarray(local)[top], np.asarray(tracks)[top], np.asarray(scores)[top]
        )


def join_lists(parts: list[Lists]) -> Lists:
    """Lists of consecutive batches of users as one ``Lists``."""
    if not parts:
        return Lists(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    lengths = np.concatenate([np.diff(p.indptr) for p in parts])
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return Lists(
        indptr, np.concatenate([p.tracks for p in parts]), np.concatenate([p.scores for p in parts])
    )


class HeardFilter:
    """Which (batch row, track code) pairs a batch of users has already heard."""

    def __init__(self, listens: Listens, users: np.ndarray) -> None:
        positions, local = gather_rows(listens.indptr, users)
        self.n_tracks = listens.n_tracks
        self.keys = distinct(
            local.astype(np.int64) * self.n_tracks + listens.track_codes[positions]
        )
        self.counts = np.bincount(self.keys // self.n_tracks, minlength=users.size)  # per row

    def unheard(self, local: np.ndarray, tracks: np.ndarray) -> np.ndarray:
        return ~in_sorted(self.keys, np.asarray(local, np.int64) * self.n_tracks + tracks)


def _sparse_top(
    scores: sp.csr_matrix | sp.csc_matrix | sp.coo_matrix,
    heard: HeardFilter,
    n: int,
    columns: np.ndarray | None = None,
) -> Lists:
    """Top-``n`` unheard positive entries of each row of a batch x tracks score matrix.

    Rows hold thousands of entries. A partial selection per row keeps the ``n`` + (tracks the
    user heard) best, which hold the ``n`` best unheard; only those are checked against the
    heard tracks and sorted (checking and sorting every entry cost 10x more). ``columns``
    maps the matrix's columns to track codes when they are not the codes themselves."""
    csr = scores.tocsr()
    indptr, data = csr.indptr, np.asarray(csr.data, dtype=np.float32)
    lengths = np.diff(indptr)
    wanted = n + heard.counts
    chosen = [
        np.arange(indptr[row], indptr[row + 1])
        for row in np.flatnonzero((lengths > 0) & (lengths <= wanted))
    ]
    for row in np.flatnonzero(lengths > wanted):
        start, m = indptr[row], int(wanted[row])
        part = data[start : indptr[row + 1]]
        chosen.append(np.argpartition(part, part.size - m)[part.size - m :] + start)
    picked = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    local = (np.searchsorted(indptr, picked, side="right") - 1).astype(np.int32)
    tracks = (csr.indices[picked] if columns is None else columns[csr.indices[picked]]).astype(
        np.int32
    )
    keep = (data[picked] > 0) & heard.unheard(local, tracks)
    return Lists.best(csr.shape[0], local[keep], tracks[keep], data[picked][keep], n)


# --- what sources are fitted on ------------------------------------------------------------


def _granularity_days(days: np.ndarray) -> int:
    """The typical gap between consecutive distinct event days: 1 for daily dates, ~30 for
    month-granular ones."""
    dates = distinct(days)
    if dates.size < 2:
        return 1
    return max(int(np.median(np.diff(dates))), 1)


def _attribute_matrix(items: pa.Table | None, column: str, tracks: IdIndex) -> sp.csr_matrix:
    """tracks x attribute 0/1 matrix from a list column of the catalogue (no per-row Python)."""
    if items is None or column not in items.column_names:
        return sp.csr_matrix(np.zeros((len(tracks), 1), dtype=np.float32))
    lists = items.column(column).combine_chunks()
    codes = tracks.codes(items.column(C.track).to_numpy())
    offsets = lists.offsets.to_numpy()
    lengths = np.diff(offsets)
    if lists.null_count:
        lengths = np.where(lists.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    starts = np.repeat(offsets[:-1], lengths)
    within = rank_in_rows(np.concatenate([[0], np.cumsum(lengths)]))
    values = lists.values.to_numpy()[starts + within] if lengths.sum() else np.zeros(0, np.int64)
    rows = np.repeat(codes, lengths)
    keep = rows >= 0
    rows, values = rows[keep], values[keep]
    attr = IdIndex.from_values(values) if values.size else IdIndex(np.zeros(0, np.int64))
    matrix = sp.csr_matrix(
        (np.ones(values.size, np.float32), (rows, attr.codes(values))),
        shape=(len(tracks), max(len(attr), 1)),
    )
    matrix.data[:] = 1.0  # an attribute repeated in one list counts once
    return matrix


@dataclass
class TrainData:
    """The listening log and what every source may derive from it (built once per cut-off)."""

    listens: Listens
    artists: sp.csr_matrix  # tracks x artists, 0/1
    genres: sp.csr_matrix  # tracks x genres, 0/1
    granularity: int  # days between consecutive distinct dates (1 daily, ~30 monthly)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, listens: Listens, items: pa.Table | None) -> TrainData:
        return cls(
            listens,
            _attribute_matrix(items, C.artist_ids, listens.tracks),
            _attribute_matrix(items, C.genre_ids, listens.tracks),
            _granularity_days(listens.days),
        )

    def with_listens(self, listens: Listens) -> TrainData:
        """The same catalogue and date granularity over other events of the same tracks."""
        return TrainData(listens, self.artists, self.genres, self.granularity)

    def keep_knn_window_of(self, other: TrainData, max_pairs: float) -> TrainData:
        """Use the item-kNN window of ``other`` (a search on a user sample must try what the
        fit on everyone can afford, not what the sample can)."""
        self._cache["knn_window"] = other.knn_window(max_pairs)
        return self

    def window(self, fraction: float | None) -> int | None:
        """A window of ``fraction`` of the span in days, at least two date steps; None = all."""
        if fraction is None:
            return None
        return max(int(round(self.listens.span_days * fraction)), 2 * self.granularity)

    def binary(self) -> sp.csr_matrix:
        """users x tracks, 1 where heard (cached)."""
        if "binary" not in self._cache:
            matrix = self.listens.matrix()
            matrix.data[:] = 1.0
            self._cache["binary"] = matrix
        return self._cache["binary"]

    def _per_batch(self, kind: str, users: np.ndarray, make: Callable[[], Any]) -> Any:
        """``make()`` for a batch of users, of which the last few are kept: every source of
        a candidate batch, and its features, ask for the same (one batch per ranking
        thread)."""
        key = np.asarray(users).tobytes()
        recent: dict[bytes, Any] = self._cache.setdefault(kind, {})
        found = recent.get(key)
        if found is None:
            found = make()
            if len(recent) >= 4:
                recent.pop(next(iter(recent)), None)
            recent[key] = found
        return found

    def heard(self, users: np.ndarray) -> HeardFilter:
        """The heard filter of a batch of users."""
        return self._per_batch("heard", users, lambda: HeardFilter(self.listens, users))

    def shares(self, users: np.ndarray, attribute: str) -> sp.csr_matrix:
        """batch x ``attribute`` ("artists", "genres"): each user's share of heard tracks
        that have it."""

        def make() -> sp.csr_matrix:
            rows = self.binary()[users]
            scale = sp.diags(1.0 / np.maximum(np.diff(rows.indptr), 1).astype(np.float32))
            return (scale @ (rows @ getattr(self, attribute))).tocsr()

        return self._per_batch(f"shares:{attribute}", users, make)

    def knn_window(self, max_pairs: float) -> int:
        """The most recent events per user whose all-pairs pass stays within ``max_pairs``
        pair visits (sum over users of min(events, window) ** 2); a user's whole history when
        the log is small enough."""
        if "knn_window" not in self._cache:
            counts = self.listens.counts().astype(np.float64)
            lo, hi = 1, max(int(counts.max(initial=1)), 1)
            if float((counts**2).sum()) <= max_pairs:
                lo = hi
            while lo < hi:  # the largest window within the budget
                mid = (lo + hi + 1) // 2
                if float((np.minimum(counts, mid) ** 2).sum()) <= max_pairs:
                    lo = mid
                else:
                    hi = mid - 1
            self._cache["knn_window"] = lo
        return self._cache["knn_window"]

    def head_tracks(self, n: int) -> np.ndarray:
        """The ``n`` most listened track codes (all-time distinct listeners), ascending."""
        listeners = self.listeners(None)
        if n >= listeners.size:
            return np.arange(listeners.size, dtype=np.int32)
        return np.sort(np.argsort(-listeners, kind="stable")[:n]).astype(np.int32)

    def recent_binary(self, max_events: int) -> sp.csr_matrix:
        """users x tracks, 1 where heard among each user's last ``max_events`` events (cached):
        what co-listening is counted on, so a heavy listener's year costs no more than a
        typical one's (the all-pairs cost grows with the square of a user's row)."""
        key = ("recent_binary", max_events)
        if key not in self._cache:
            h = self.listens
            starts = np.maximum(h.indptr[:-1], h.indptr[1:] - max_events)
            lengths = h.indptr[1:] - starts
            indptr = np.zeros(h.n_users + 1, dtype=np.int64)
            np.cumsum(lengths, out=indptr[1:])
            positions = np.arange(int(indptr[-1]), dtype=np.int64) + np.repeat(
                starts - indptr[:-1], lengths
            )
            matrix = sp.csr_matrix(
                (np.ones(positions.size, np.float32), h.track_codes[positions], indptr),
                shape=(h.n_users, h.n_tracks),
            )
            matrix.sum_duplicates()
            matrix.data[:] = 1.0
            self._cache[key] = matrix
        return self._cache[key]

    def listeners(self, window_days: int | None = None) -> np.ndarray:
        """Distinct listeners per track code, in the last ``window_days`` (None = all)."""
        key = ("listeners", window_days)
        if key not in self._cache:
            h = self.listens
            if window_days is None:
                counts = np.bincount(self.binary().indices, minlength=h.n_tracks)
            else:
                recent = np.flatnonzero(h.days >= h.cutoff - window_days)
                users = np.searchsorted(h.indptr, recent, side="right") - 1
                indptr = np.zeros(h.n_users + 1, dtype=np.int64)
                np.cumsum(np.bincount(users, minlength=h.n_users), out=indptr[1:])
                # a user's repeats merged row by row (short sorts), not one sort of every pair
                pairs = sp.csr_matrix(
                    (np.ones(recent.size, np.float32), h.track_codes[recent], indptr),
                    shape=(h.n_users, h.n_tracks),
                )
                pairs.sum_duplicates()
                counts = np.bincount(pairs.indices, minlength=h.n_tracks)
            self._cache[key] = counts.astype(np.float32)
        return self._cache[key]


# --- the sources ------------------------------------------------------------------------------


class Source:
    """A candidate source. Subclasses set ``name``, implement ``space``, ``fit`` and
    ``recommend``; ``pair_scores`` and ``similar`` are optional."""

    name: ClassVar[str]

    def __init__(self, settings: Settings, **params: Any) -> None:
        self.settings = settings
        self.params = params
        self._data: TrainData | None = None

    @property
    def data(self) -> TrainData:
        """The data the source was fitted on."""
        if self._data is None:
            raise RuntimeError(f"{self!r} is not fitted")
        return self._data

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        """What the search tries, in order: the plain default first (a whole configuration),
        then steps — a whole configuration, or a change of some parameters applied to the best
        configuration so far (a greedy coordinate search)."""
        raise NotImplementedError

    def fit(self, data: TrainData) -> Source:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray] | None:
        """What a refit of the same configuration on a later cut-off may start from (arrays
        keyed by name); None when refits start cold."""
        return None

    def warm(self, state: dict[str, np.ndarray] | None, iterations: int | None = None) -> Source:
        """Start the next ``fit`` from a ``state()`` of the same configuration, with
        ``iterations`` (None = ``als_refit_iterations``, for a refit on a later cut-off)."""
        self._warm = state
        self._warm_iterations = iterations
        return self

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        """Top-``n`` unheard tracks of each user code in ``users`` (sorted, unique)."""
        raise NotImplementedError

    def pair_scores(
        self, users: np.ndarray, local: np.ndarray, tracks: np.ndarray
    ) -> np.ndarray | None:
        """This source's score of any (user, track) pair, where it has one."""
        return None

    def similar(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(track code, similar track code, score), the ``n`` nearest of every track, best
        first, never the track itself; None when the source has no item-to-item notion."""
        return None

    def similar_pairs(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``similar``, for a source that must have it (ALS, item-kNN)."""
        pairs = self.similar(n)
        if pairs is None:
            raise ValueError(f"{self!r} has no item-to-item similarity")
        return pairs


class PopularSource(Source):
    """Tracks with the most distinct listeners in a recent window (all time breaks ties)."""

    name = "popular"

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        return [{"window": 1 / 12}, {"window": 1 / 52}, {"window": 1 / 4}, {"window": None}]

    def fit(self, data: TrainData) -> PopularSource:
        self._data = data
        window = data.window(self.params["window"])
        all_time = data.listeners(None)
        recent = data.listeners(window) if window is not None else all_time
        # recent listeners first, all-time listeners as a fraction to break ties
        self.scores = recent + all_time / (all_time.max() + 1)
        self.order = np.argsort(-self.scores, kind="stable").astype(np.int32)
        return self

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        heard = self.data.heard(users)
        pool = self.order[: n * 3 + 100]
        local = np.repeat(np.arange(users.size, dtype=np.int32), pool.size)
        tracks = np.tile(pool, users.size)
        ok = heard.unheard(local, tracks)
        local, tracks = local[ok], tracks[ok]
        keep = rank_in_groups(local) < n
        return Lists.from_flat(users.size, local[keep], tracks[keep], self.scores[tracks[keep]])


class _Stop(Exception):
    """Raised by ``_Judged`` to end implicit's fit loop early."""


class _Judged:
    """implicit fit callback: after each iteration, installs the factors as they stand in the
    source and asks ``judge`` whether the fit may stop."""

    def __init__(
        self, source: AlsSource, model: AlternatingLeastSquares, judge: Callable[[Source], bool]
    ) -> None:
        self.source, self.model, self.judge = source, model, judge
        self.iterations = 0

    def __call__(self, iteration: int, elapsed: float, loss: float | None) -> None:
        self.iterations += 1
        self.source._set_model(self.model)
        if self.judge(self.source):
            raise _Stop


class AlsSource(Source):
    """implicit ALS with confidence 1 + alpha * strength (strength = plays, recency-decayed
    when a half-life is set); alpha 0 is plain ALS on the 0/1 matrix."""

    name = "als"

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        plain = {"factors": 100, "regularization": 0.01, "alpha": 0.0, "half_life": None}
        configured = {
            "factors": settings.als_factors,
            "regularization": settings.als_regularization,
            "alpha": settings.als_alpha,
            "half_life": settings.recency_half_life,
        }
        return [
            plain,
            configured,
            {"half_life": 1 / 32},
            {"half_life": None},
            {"alpha": 16.0},
            {"alpha": 1.0},
            {"factors": 128},
            {"regularization": 1.0},
            {"factors": 32},
            {"regularization": 0.01},
            {"half_life": 1 / 2},
        ]

    def fit(self, data: TrainData) -> AlsSource:
        self._data = data
        p, s = self.params, self.settings
        half_life = data.window(p["half_life"])
        matrix = data.listens.matrix(half_life)
        matrix.data = (1.0 + p["alpha"] * matrix.data).astype(np.float32)
        model = AlternatingLeastSquares(
            factors=p["factors"],
            regularization=p["regularization"],
            alpha=1.0,
            iterations=s.als_iterations,
            random_state=s.seed,
            num_threads=s.threads,
        )
        warm = getattr(self, "_warm", None)
        if warm is not None and warm["user_factors"].shape[1] != p["factors"]:
            warm = None  # factors of another size: nothing to carry over
        h = data.listens
        stop: _Judged | None = None
        if warm is not None:
            # the factors of an earlier cut-off for the users and tracks it knew, small random
            # ones (implicit's own start) for the new; a few iterations reach the cold fit
            rng = np.random.default_rng(s.seed)
            model.user_factors = _carry(warm["user_ids"], warm["user_factors"], h.users, rng)
            model.item_factors = _carry(warm["track_ids"], warm["item_factors"], h.tracks, rng)
            model.iterations = getattr(self, "_warm_iterations", None) or s.als_refit_iterations
            judge = getattr(self, "_judge", None)
            if judge is not None:
                # the judge sees the start too: a refit whose first iteration barely moves
                # the carried factors' lists may stop after it
                self._set_model(model)
                judge(self)
                stop = _Judged(self, model, judge)
        started = time.perf_counter()
        # a stop leaves the factors of the last iteration, updated in place
        with threadpool_limits(limits=1, user_api="blas"), contextlib.suppress(_Stop):
            model.fit(matrix, show_progress=False, callback=stop)
        log.debug("ALS %s fitted in %.1f s", self.params, time.perf_counter() - started)
        del matrix  # the heard filter needs only the pattern: the shared 0/1 matrix has it
        self._set_model(model)
        self.iterations_run = stop.iterations if stop else model.iterations
        self.index = item_index(self.model, s)
        return self

    def _set_model(self, model: AlternatingLeastSquares) -> None:
        """Answer from ``model``'s factors as they stand (exact top-k until ``fit`` builds
        the index)."""
        h = self.data.listens
        self.model = AlsModel(
            model, h.users.ids.astype(np.int32), h.tracks.ids.astype(np.int32), self.data.binary()
        )
        self.index = None

    def stop_when(self, judge: Callable[[Source], bool]) -> AlsSource:
        """Let the next warm fit stop early: ``judge`` looks at the source as it stands (its
        lists come from the factors so far) once at the start, with the carried factors, and
        after each iteration, when it says whether to stop (``selection.NdcgPlateau``,
        ``selection.ListsSettled``; what it says of the start is ignored). The warm
        iterations are then a maximum, and how many a log needs is learnt on it. A cold fit
        is never judged: its first iterations start from random factors."""
        self._judge = judge
        return self

    def state(self) -> dict[str, np.ndarray]:
        m = self.model
        return {
            "user_ids": m.user_ids,
            "track_ids": m.track_ids,
            "user_factors": m.model.user_factors,
            "item_factors": m.model.item_factors,
        }

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        rows, tracks, scores = recommend_codes(
            self.model, users, n, progress=False, index=self.index
        )
        return Lists.from_flat(users.size, np.searchsorted(users, rows), tracks, scores)

    def pair_scores(self, users: np.ndarray, local: np.ndarray, tracks: np.ndarray) -> np.ndarray:
        out = np.empty(local.size, dtype=np.float32)
        uf, itf = self.model.model.user_factors, self.model.model.item_factors
        for start in range(0, local.size, 200_000):
            sl = slice(start, start + 200_000)
            out[sl] = np.einsum("ij,ij->i", uf[users[local[sl]]], itf[tracks[sl]])
        return out

    def similar(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from musicrec.similar import similar_codes

        codes = np.arange(self.data.listens.n_tracks, dtype=np.int32)
        return similar_codes(
            self.model,
            codes,
            n,
            progress=False,
            index=item_index(self.model, self.settings, "cosine"),
        )


def _carry(
    ids: np.ndarray, factors: np.ndarray, index: IdIndex, rng: np.random.Generator
) -> np.ndarray:
    """Factors for the ids of ``index``: the row of ``factors`` where the id is in ``ids``,
    else uniform [0, 0.01) as implicit starts a cold fit."""
    out = rng.random((len(index), factors.shape[1]), dtype=np.float32) * 0.01
    known = IdIndex(np.asarray(ids)).codes(index.ids)
    out[known >= 0] = factors[known[known >= 0]]
    return out


class ItemKnnSource(Source):
    """Item-to-item co-occurrence neighbours (implicit's cosine or BM25 kNN), scored from each
    user's recent tracks with time decay: score(u, j) = sum over heard i of w_ui * sim(i, j).

    Co-listening is counted, and users are scored, within each user's last ``recent`` events
    (None = as many as ``knn_max_pairs`` affords, the whole history on small logs): the
    all-pairs cost grows with the square of a user's row (2.5e11 pair visits over a year at
    full scale, 4.4e10 within the last 500), and whether older listening still says what goes
    together is for validation to decide."""

    name = "item_knn"

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        return [
            {"weighting": "cosine", "neighbours": 100, "half_life": None, "recent": None},
            {"weighting": "bm25"},
            {"half_life": 1 / 8},
            {"recent": 100},
            {"neighbours": 200},
            {"recent": 30},
            {"neighbours": 30},
            {"half_life": 1 / 32},
        ]

    def fit(self, data: TrainData) -> ItemKnnSource:
        self._data = data
        p = self.params
        affordable = data.knn_window(self.settings.knn_max_pairs)
        self.recent = recent = min(p.get("recent") or affordable, affordable)
        # trials of other half-lives share one similarity
        key = ("item_knn", p["weighting"], p["neighbours"], recent)
        if key not in data._cache:
            # the weighting implicit's BM25/Cosine recommenders apply, handed over as CSR
            # (their own fit passes a COO matrix on and warns)
            head = data.head_tracks(self.settings.knn_max_items)
            items_users = data.recent_binary(recent)[:, head].T.tocsr()
            weighted = (
                bm25_weight(items_users, K1=1.2, B=0.75)
                if p["weighting"] == "bm25"
                else normalize(items_users)
            ).T.tocsr()
            model = ItemItemRecommender(K=p["neighbours"], num_threads=self.settings.threads)
            model.fit(weighted, show_progress=False)
            similarity = model.similarity.tocsr()
            similarity.setdiag(0)
            similarity.eliminate_zeros()
            # kept on the head's own codes: the users' products then touch an accumulator of
            # the head's size, not of the whole catalogue
            data._cache[key] = head, similarity.astype(np.float32)
        self.head, self.similarity = data._cache[key]
        self.half_life = data.window(p["half_life"])
        self.in_head = np.full(data.listens.n_tracks, -1, dtype=np.int32)
        self.in_head[self.head] = np.arange(self.head.size, dtype=np.int32)
        return self

    def _user_rows(self, users: np.ndarray) -> sp.csr_matrix:
        """batch x head tracks: the last ``recent`` events of each user, decayed by age."""
        h = self.data.listens
        positions, local = gather_rows(h.indptr, users)
        ends = h.indptr[users + 1]
        keep = positions >= ends[local] - self.recent
        positions, local = positions[keep], local[keep]
        column = self.in_head[h.track_codes[positions]]
        inside = column >= 0
        return sp.csr_matrix(
            (h.strength(self.half_life, positions[inside]), (local[inside], column[inside])),
            shape=(users.size, self.head.size),
        )

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        scores = self._user_rows(users) @ self.similarity
        return _sparse_top(scores, self.data.heard(users), n, columns=self.head)

    def similar(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coo = self.similarity.tocoo()
        top, _ = top_k_per_group(coo.row, coo.data, n, tiebreak=coo.col)
        return (self.head[coo.row[top]], self.head[coo.col[top]], coo.data[top].astype(np.float32))


def _gram(x: sp.csr_matrix, threads: int) -> np.ndarray:
    """X'X as a dense float64 array, from ``threads`` blocks of rows at once (scipy's sparse
    product runs on one core and releases the GIL; ~38 s on one core at full scale)."""
    bounds = np.linspace(0, x.shape[0], max(threads, 1) + 1).astype(np.int64)

    def block(i: int) -> sp.csr_matrix:
        rows = x[bounds[i] : bounds[i + 1]]
        return rows.T @ rows

    out = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for part in pool.map(block, range(bounds.size - 1)):
            out += part.toarray()
    return out


class EaseSource(Source):
    """EASE (Steck 2019) on the most listened ``ease_max_items`` tracks: a closed-form
    item-to-item model, B = I - P / diag(P) with P = (X'X + l2 I)^-1, zero diagonal."""

    name = "ease"

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        return [{"l2": 500.0}, {"l2": 100.0}, {"l2": 2000.0}, {"l2": 20.0}, {"l2": 8000.0}]

    def fit(self, data: TrainData) -> EaseSource:
        self._data = data
        m = min(self.settings.ease_max_items, data.listens.n_tracks)
        if ("ease", m) not in data._cache:  # trials of other l2 share the Gram matrix
            head = data.head_tracks(m)
            x = data.binary()[:, head].tocsr()
            data._cache[("ease", m)] = head, x, _gram(x, self.settings.threads)
        self.head, self.x, gram = data._cache[("ease", m)]
        gram = gram.copy()
        gram[np.diag_indices(m)] += self.params["l2"]
        started = time.perf_counter()
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)
        np.fill_diagonal(weights, 0.0)
        self.weights = weights.astype(np.float32)
        log.debug("EASE on %d tracks in %.1f s", m, time.perf_counter() - started)
        return self

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        x = self.x[users]
        scores = np.asarray(x @ self.weights)
        scores[x.nonzero()] = -np.inf  # heard head tracks
        n = min(n, self.head.size)
        if n == 0:
            return Lists.from_flat(
                users.size, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
            )
        part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        part_scores = np.take_along_axis(scores, part, axis=1)
        local = np.repeat(np.arange(users.size, dtype=np.int32), n)
        cols, vals = part.ravel(), part_scores.ravel()
        ok = np.isfinite(vals)
        return Lists.best(users.size, local[ok], self.head[cols[ok]], vals[ok], n)


class ArtistSource(Source):
    """Tracks of the artists a user already plays that the user has not heard, ranked by the
    user's share of listens on the artist times the track's recent listeners (log)."""

    name = "artist"

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        return [
            {"window": 1 / 12, "per_artist": 30},
            {"window": 1 / 4},
            {"window": 1 / 52},
            {"per_artist": 100},
        ]

    def fit(self, data: TrainData) -> ArtistSource:
        self._data = data
        popularity = np.log1p(data.listeners(data.window(self.params["window"])))
        popularity += np.log1p(data.listeners(None)) * 1e-3  # breaks ties between quiet tracks
        by_artist = data.artists.T.tocoo()  # artists x tracks
        top, _ = top_k_per_group(
            by_artist.row,
            popularity[by_artist.col],
            self.params["per_artist"],
            tiebreak=by_artist.col,
        )
        self.artist_tracks = sp.csr_matrix(
            (popularity[by_artist.col[top]], (by_artist.row[top], by_artist.col[top])),
            shape=by_artist.shape,
        )
        return self

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        shares = self.data.shares(users, "artists")
        return _sparse_top(shares @ self.artist_tracks, self.data.heard(users), n)


SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (PopularSource, AlsSource, ItemKnnSource, EaseSource, ArtistSource)
}


def make_source(name: str, settings: Settings, params: dict[str, Any]) -> Source:
    """A source by name with its parameters."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; sources: {', '.join(SOURCES)}")
    return SOURCES[name](settings, **params)
