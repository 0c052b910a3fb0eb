"""Offline metrics of recommendation lists against a test period, in the RecTools style.

Each metric is a small object with a cut-off ``k`` and a ``calc`` method over DataFrames
(``reco`` with user_id, track_id, rank; interactions with user_id, track_id). ``evaluate`` is
the entry point of the pipeline: it scores several sources at several cut-offs at once.

Everything is vectorised and built around one idea: a recommendation row is packed into one
int64 ``(user index, track id, rank)`` and ``np.sort`` (SIMD, a fraction of a second for 20 M
rows) puts the rows of a user together with their tracks in order. Membership of a
``(user, track)`` pair in the test or train events is then a search of sorted keys in sorted
keys, which is cache-friendly. Random ``searchsorted``/``np.isin`` over tens of millions of keys,
or pandas merges of the 137 M-row tables, would be ten to a hundred times slower.

Conventions (shared by every metric):

- Relevance is binary: a recommended track is a hit when the user listened to it in the test
  period. Repeated test events of one pair count once.
- A user's top-k is the rows with ``rank <= k`` (rank 1 = best; ranks are positions, so a list
  with gaps is scored at the positions it claims).
- Ranking metrics are means over the *evaluated users*; a user without a list scores 0.
- ``recall@k`` divides by ``min(k, |test items|)``, not ``|test items|``: a heavy listener with
  200 test tracks cannot reach 200 hits in a list of 10, and dividing by 200 would make recall
  mostly a measure of how much a user listens. With ``min`` a perfect list scores 1 for every
  user, the same normalisation as the ideal DCG of ``ndcg@k`` and of ``map@k``.
- ``novelty`` and ``novelty_bits`` are means over the evaluated users that have a list (of the
  per-user mean over that user's top-k rows); a missing list has no items to judge.
- ``train`` holds each (user, track) pair once, as the events contract guarantees (no repeated
  pairs), so events per track are its listeners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from musicrec.columns import Columns as C
from musicrec.errors import DataError

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "precision",
    "recall",
    "ndcg",
    "map",
    "coverage",
    "novelty",
    "novelty_bits",
    "users_covered",
)
# Ids spanning at most this many values are looked up through a dense table (one gather per
# value); sparser ids fall back to sorted arrays.
_DENSE_SPAN = 1 << 27  # a table of at most 512 MB (int32) / 128 MB (bool)
_TRAIN_CHUNK = 1 << 24
# Packed keys hold (user index, track id[, rank]); track ids are non-negative int32.
TRACK_BITS = 31


# --- id helpers ------------------------------------------------------------------------------


def _as_int64(values: pd.Series | np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.int64, copy=False)


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (a dense mark table when the span allows)."""
    if len(values) == 0:
        return np.empty(0, dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < _DENSE_SPAN:
        seen = np.zeros(hi - lo + 1, dtype=bool)
        seen[values - lo] = True
        return np.flatnonzero(seen).astype(np.int64) + lo
    return _sorted_unique(values).astype(np.int64)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on int64 keys)."""
    ordered = np.sort(values)
    if len(ordered) < 2:
        return ordered
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]]


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct non-negative values and each value's position among them, with one sort.

    The row number rides in the low bits of one packed int64, so a plain ``np.sort`` does the
    work of ``np.unique(return_inverse=True)`` (an argsort, ten times slower).
    """
    n = len(values)
    row_bits = max(n.bit_length(), 1)
    if n == 0 or int(values.max()).bit_length() + row_bits > 63:
        distinct, inverse = np.unique(values, return_inverse=True)
        return distinct.astype(np.int64), inverse.astype(np.int64)
    packed = np.sort((_as_int64(values) << row_bits) | np.arange(n, dtype=np.int64))
    ordered = packed >> row_bits
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    inverse = np.empty(n, dtype=np.int64)
    inverse[packed & ((1 << row_bits) - 1)] = np.cumsum(first) - 1
    return ordered[first], inverse


class _IdSet:
    """Membership and position of integer ids in a fixed set, vectorised.

    A dense table over the id span turns each look-up into one gather (user ids span 1.4 M,
    track ids 101 M); only ids too sparse for a table fall back to binary search.
    """

    def __init__(self, ids: np.ndarray, positions: bool = True) -> None:
        self.ids = _distinct(np.asarray(ids))
        self.positions = positions
        self.lo = int(self.ids[0]) if len(self.ids) else 0
        self.hi = int(self.ids[-1]) if len(self.ids) else -1
        self.table: np.ndarray | None = None
        span = self.hi - self.lo + 1
        if len(self.ids) and span <= _DENSE_SPAN:
            if positions:
                self.table = np.full(span, -1, dtype=np.int32)
                self.table[self.ids - self.lo] = np.arange(len(self.ids), dtype=np.int32)
            else:  # membership only: a bool table is four times smaller
                self.table = np.zeros(span, dtype=bool)
                self.table[self.ids - self.lo] = True

    def index(self, values: np.ndarray) -> np.ndarray:
        """Position of each value in the sorted id array (int64), -1 when absent."""
        if not self.positions:
            raise ValueError("this id set was built for membership only")
        return self._lookup(values)

    def _lookup(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        out = np.full(len(values), -1, dtype=np.int64)
        if not len(self.ids):
            return out
        inside = (values >= self.lo) & (values <= self.hi)
        wanted = values[inside]
        if self.table is not None:
            out[inside] = self.table[wanted - self.lo]
        else:
            pos = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
            out[inside] = np.where(self.ids[pos] == wanted, pos, -1)
        return out

    def contains(self, values: np.ndarray) -> np.ndarray:
        if self.positions or self.table is None:
            return self._lookup(values) >= 0
        values = np.asarray(values)
        out = np.zeros(len(values), dtype=bool)
        inside = (values >= self.lo) & (values <= self.hi)
        out[inside] = self.table[values[inside] - self.lo]
        return out


def _in_sorted(queries: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Membership of ``queries`` in a sorted key array; fast when ``queries`` are sorted too."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), dtype=bool)
    pos = np.searchsorted(sorted_keys, queries)
    pos = np.minimum(pos, len(sorted_keys) - 1)
    return sorted_keys[pos] == queries


def _check_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}")


# --- the shared per-source table --------------------------------------------------------------


@dataclass
class _TrainIndex:
    """What the train events contribute: the users, pairs for the heard check, listener counts."""

    user: np.ndarray
    track: np.ndarray
    users: _IdSet  # distinct train users
    track_ids: np.ndarray  # sorted distinct tracks heard in train
    listeners: np.ndarray  # events (= listeners) per track in track_ids
    # sorted (user index, track) keys for the heard check, made for one user index
    pairs: np.ndarray | None = None
    pair_users: _IdSet | None = None

    @classmethod
    def build(cls, train: pd.DataFrame) -> _TrainIndex:
        _check_columns(train, [C.user, C.track], "train")
        user = train[C.user].to_numpy()
        track = train[C.track].to_numpy()
        _check_track_ids(track, "train")
        ordered = np.sort(track)  # counting by sort: bincount scatters over the id span
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else []
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.diff(np.r_[starts, len(ordered)])
        users = _IdSet(user, positions=False)
        return cls(user, track, users, ordered[starts].astype(np.int64), counts)

    @property
    def n_users(self) -> int:
        return len(self.users.ids)


@dataclass
class _TestIndex:
    """The distinct (user index, track) pairs of the test period as sorted packed keys."""

    users: _IdSet
    keys: np.ndarray
    n_relevant: np.ndarray  # distinct test tracks per user

    @classmethod
    def build(cls, test: pd.DataFrame, users: _IdSet) -> _TestIndex:
        _check_columns(test, [C.user, C.track], "test events")
        track = test[C.track].to_numpy()
        _check_track_ids(track, "test events")
        uidx = users.index(test[C.user].to_numpy())
        ok = uidx >= 0
        keys = _sorted_unique((uidx[ok] << TRACK_BITS) | track[ok])
        n_relevant = np.bincount(keys >> TRACK_BITS, minlength=len(users.ids))
        return cls(users, keys, n_relevant)


def _check_track_ids(track: np.ndarray, what: str) -> None:
    if len(track) and (int(track.min()) < 0 or int(track.max()) >= 1 << TRACK_BITS):
        raise ValueError(f"{what}: track ids must lie in [0, 2**31) (int32, non-negative)")


@dataclass
class HitTable:
    """One source's top-``k_max`` rows for the evaluated users, with hit/heard flags per row.

    Rows are sorted by (user, track). ``row_user`` indexes ``users``; ``n_relevant[i]`` is the
    number of distinct test tracks of user i. ``heard``/``self_info`` are None without train
    events; ``hit`` is None without test events. ``all_track``/``all_rank`` are the top-k_max
    rows of every user in the source (catalogue coverage is about everything the source shows).
    """

    k_max: int
    users: np.ndarray
    n_relevant: np.ndarray | None
    row_user: np.ndarray
    row_track: np.ndarray
    row_rank: np.ndarray
    hit: np.ndarray | None
    cum_hits: np.ndarray | None  # hits of the user at ranks <= this row's rank
    heard: np.ndarray | None
    self_info: np.ndarray | None
    all_track: np.ndarray
    all_rank: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.users)

    @classmethod
    def build(
        cls,
        reco: pd.DataFrame,
        k_max: int,
        test: pd.DataFrame | _TestIndex | None = None,
        train: pd.DataFrame | _TrainIndex | None = None,
        users: np.ndarray | None = None,
    ) -> HitTable:
        """Truncate ``reco`` to ``k_max`` and keep the evaluated users' rows.

        Evaluated users: ``users`` if given, else the users of ``test``, else those of ``reco``.
        ``test``/``train`` may be indexes built once for several sources (see ``evaluate``).
        """
        _check_columns(reco, [C.user, C.track, C.rank], "recommendations")
        k_max = _check_k(k_max)
        rank_all = reco[C.rank].to_numpy()
        if len(rank_all) and int(rank_all.min()) < 1:
            raise ValueError(f"recommendation ranks start at 1; found rank {int(rank_all.min())}")
        top = rank_all <= k_max
        all_user = reco[C.user].to_numpy()[top]
        all_track = reco[C.track].to_numpy()[top]
        all_rank = rank_all[top].astype(np.int64)
        _check_track_ids(all_track, "recommendations")

        if isinstance(test, _TestIndex):
            user_index = test.users
        else:
            if users is None:
                users = test[C.user].to_numpy() if test is not None else all_user
            user_index = _IdSet(users)
            if test is not None:
                test = _TestIndex.build(test, user_index)
        users = user_index.ids

        uidx = user_index.index(all_user)
        keep = uidx >= 0
        uidx, track, rank = uidx[keep], _as_int64(all_track[keep]), all_rank[keep]

        rank_bits = k_max.bit_length()
        if max(len(users).bit_length(), 1) + TRACK_BITS + rank_bits > 63:
            raise ValueError(f"{len(users)} users with k={k_max} do not fit packed int64 keys")
        packed = np.sort((uidx << (TRACK_BITS + rank_bits)) | (track << rank_bits) | rank)
        pair = packed >> rank_bits  # (user index, track id): the key shared with test/train
        if len(pair) > 1 and np.any(pair[1:] == pair[:-1]):
            dup = int(pair[1:][pair[1:] == pair[:-1]][0])
            raise ValueError(
                f"recommendations repeat track {dup & ((1 << TRACK_BITS) - 1)} for user "
                f"{users[dup >> TRACK_BITS]}; every (user, track) pair must be listed once"
            )
        row_user = pair >> TRACK_BITS
        row_track = pair & ((1 << TRACK_BITS) - 1)
        row_rank = packed & ((1 << rank_bits) - 1)

        n_relevant = hit = cum_hits = None
        if test is not None:
            n_relevant = test.n_relevant
            hit = _in_sorted(pair, test.keys)
            cum_hits = _cumulative_hits(row_user, row_rank, hit, rank_bits)

        heard = self_info = None
        if train is not None:
            if not isinstance(train, _TrainIndex):
                train = _TrainIndex.build(train)
            if train.pairs is None or train.pair_users is not user_index:
                train.pair_users = user_index
                train.pairs = _train_pairs(train, user_index, _IdSet(row_track, positions=False))
            heard = _in_sorted(pair, train.pairs)
            self_info = _self_information(row_track, train)

        return cls(
            k_max=k_max,
            users=users,
            n_relevant=n_relevant,
            row_user=row_user,
            row_track=row_track,
            row_rank=row_rank,
            hit=hit,
            cum_hits=cum_hits,
            heard=heard,
            self_info=self_info,
            all_track=np.asarray(all_track),
            all_rank=all_rank,
        )

    # per-user aggregates at cut-off k
    def _top(self, k: int) -> np.ndarray:
        if k > self.k_max:
            raise ValueError(f"k={k} exceeds the k_max={self.k_max} this table was built for")
        return self.row_rank <= k

    def per_user_sum(self, k: int, weights: np.ndarray | None) -> np.ndarray:
        top = self._top(k)
        w = None if weights is None else weights[top]
        summed = np.bincount(self.row_user[top], weights=w, minlength=self.n_users)
        return summed.astype(np.float64, copy=False)  # bincount of nothing comes back as int

    def ideal_count(self, k: int) -> np.ndarray:
        """min(k, |test items|) per user: the most hits a perfect top-k list can have."""
        return np.minimum(k, self._need(self.n_relevant, "test events"))

    def _need(self, value: np.ndarray | None, what: str) -> np.ndarray:
        if value is None:
            raise ValueError(f"this metric needs {what}; build the table with them")
        return value


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _cumulative_hits(
    row_user: np.ndarray, row_rank: np.ndarray, hit: np.ndarray, rank_bits: int
) -> np.ndarray:
    """Hits of the same user at ranks <= each row's rank (rows sorted by user, track)."""
    if not len(hit):
        return np.zeros(0, dtype=np.int64)
    # Sort the flags by (user, rank) with one packed key; the row id rides in the low bits.
    row_bits = max(len(hit).bit_length(), 1)
    by_rank = np.sort(
        (row_user << (rank_bits + row_bits)) | (row_rank << row_bits) | np.arange(len(hit))
    )
    if len(by_rank) > 1:
        same_slot = (by_rank[1:] >> row_bits) == (by_rank[:-1] >> row_bits)
        if np.any(same_slot):
            raise ValueError("recommendations give two tracks the same rank for one user")
    order = by_rank & ((1 << row_bits) - 1)
    hits_in_order = hit[order].astype(np.int64)
    running = np.cumsum(hits_in_order)
    user_in_order = row_user[order]
    first = np.r_[True, user_in_order[1:] != user_in_order[:-1]]
    before_user = (running - hits_in_order)[first]
    cum_in_order = running - np.repeat(before_user, np.diff(np.r_[np.flatnonzero(first), len(hit)]))
    cum = np.empty_like(cum_in_order)
    cum[order] = cum_in_order
    return cum


def _train_pairs(train: _TrainIndex, users: _IdSet, tracks: _IdSet) -> np.ndarray:
    """Sorted distinct packed (user index, track) keys of the train events that could matter.

    Only events of the evaluated users on tracks some list recommends can mark a row as heard,
    so the rest are dropped chunk by chunk before any int64 key is made.
    """
    parts = []
    for start in range(0, len(train.user), _TRAIN_CHUNK):
        t_track = train.track[start : start + _TRAIN_CHUNK]
        t_user = train.user[start : start + _TRAIN_CHUNK]
        uidx = users.index(t_user)
        ok = uidx >= 0
        ok[ok] = tracks.contains(t_track[ok])
        parts.append((uidx[ok] << TRACK_BITS) | t_track[ok])
    return _sorted_unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def _self_information(row_track: np.ndarray, train: _TrainIndex) -> np.ndarray:
    """-log2(share of train users who heard the track); unheard tracks count as one listener."""
    n_users = max(train.n_users, 1)
    distinct, inverse = _unique_inverse(row_track)
    listeners = np.zeros(len(distinct), dtype=np.int64)
    pos = np.searchsorted(train.track_ids, distinct)
    pos = np.minimum(pos, max(len(train.track_ids) - 1, 0))
    if len(train.track_ids):
        found = train.track_ids[pos] == distinct
        listeners[found] = train.listeners[pos[found]]
    info = np.log2(n_users) - np.log2(np.maximum(listeners, 1))
    return info[inverse]


# --- metric objects -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    """Base: a cut-off and a ``calc`` over DataFrames; ``calc_from`` reuses a built table."""

    k: int

    def __post_init__(self) -> None:
        _check_k(self.k)

    def calc_from(self, table: HitTable) -> float:
        raise NotImplementedError

    @staticmethod
    def _mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else float("nan")


@dataclass(frozen=True)
class _RankingMetric(_Metric):
    def calc(self, reco: pd.DataFrame, interactions: pd.DataFrame) -> float:
        """Mean over the users of ``interactions`` (test events); users without a list score 0."""
        return self.calc_from(HitTable.build(reco, self.k, test=interactions))


@dataclass(frozen=True)
class Precision(_RankingMetric):
    """Hits in the top-k / k."""

    def calc_from(self, table: HitTable) -> float:
        table._need(table.hit, "test events")
        return self._mean(table.per_user_sum(self.k, table.hit) / self.k)


@dataclass(frozen=True)
class Recall(_RankingMetric):
    """Hits in the top-k / min(k, |test items|) (why min: see the module docstring)."""

    def calc_from(self, table: HitTable) -> float:
        hits = table.per_user_sum(self.k, table._need(table.hit, "test events"))
        return self._mean(hits / np.maximum(table.ideal_count(self.k), 1))


@dataclass(frozen=True)
class NDCG(_RankingMetric):
    """DCG with binary relevance and 1/log2(rank + 1) discount over the ideal DCG of
    min(k, |test items|) hits at ranks 1, 2, ..."""

    def calc_from(self, table: HitTable) -> float:
        hit = table._need(table.hit, "test events")
        gain = hit / np.log2(table.row_rank + 1.0)
        dcg = table.per_user_sum(self.k, gain)
        ideal_cum = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, self.k + 2)))]
        idcg = ideal_cum[table.ideal_count(self.k)]
        return self._mean(np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0))


@dataclass(frozen=True)
class MAP(_RankingMetric):
    """Mean over users of AP@k = sum over hits at rank r of precision@r, / min(k, |test items|)."""

    def calc_from(self, table: HitTable) -> float:
        hit = table._need(table.hit, "test events")
        precision_at_hit = np.where(hit, table.cum_hits / table.row_rank, 0.0)
        ap = table.per_user_sum(self.k, precision_at_hit)
        return self._mean(ap / np.maximum(table.ideal_count(self.k), 1))


@dataclass(frozen=True)
class Coverage(_Metric):
    """Distinct tracks in the top-k lists of every user of the source / catalogue size."""

    def calc(self, reco: pd.DataFrame, n_items: int) -> float:
        return self.calc_from(HitTable.build(reco, self.k), n_items)

    def calc_from(self, table: HitTable, n_items: int) -> float:  # type: ignore[override]
        if n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        top = table.all_rank <= self.k
        return len(_distinct(_as_int64(table.all_track[top]))) / n_items


@dataclass(frozen=True)
class _BeyondAccuracy(_Metric):
    def calc(
        self, reco: pd.DataFrame, prev_interactions: pd.DataFrame, users: np.ndarray | None = None
    ) -> float:
        """Mean over the users of ``reco`` (or ``users``) that have a list."""
        table = HitTable.build(reco, self.k, train=prev_interactions, users=users)
        return self.calc_from(table)

    def _per_user_mean(self, table: HitTable, values: np.ndarray) -> float:
        n_rows = table.per_user_sum(self.k, None)
        total = table.per_user_sum(self.k, values)
        has_list = n_rows > 0
        return self._mean(total[has_list] / n_rows[has_list])


@dataclass(frozen=True)
class Novelty(_BeyondAccuracy):
    """Share of the top-k tracks the user had not heard in train (1.0 = heard tracks filtered)."""

    def calc_from(self, table: HitTable) -> float:
        heard = table._need(table.heard, "train events")
        return self._per_user_mean(table, (~heard).astype(np.float64))


@dataclass(frozen=True)
class NoveltyBits(_BeyondAccuracy):
    """Mean self-information -log2(share of train users who heard the track) of the top-k."""

    def calc_from(self, table: HitTable) -> float:
        return self._per_user_mean(table, table._need(table.self_info, "train events"))


# --- the pipeline entry point ---------------------------------------------------------------


def evaluate(
    recs: Mapping[str, pd.DataFrame],
    test: pd.DataFrame,
    train: pd.DataFrame,
    n_items: int,
    ks: Sequence[int] = (5, 10, 25),
) -> pd.DataFrame:
    """Score every source at every cut-off on the warm test users.

    Evaluated users have at least one event in ``test`` and one in ``train`` (the users an
    offline model could serve). A source without a list for one of them scores 0 for that
    user; ``users_covered`` is the share of evaluated users with a list. Returns one row per
    (source, k), sources in the given order, k ascending, with the columns ``source, k`` and
    ``METRIC_COLUMNS``.
    """
    ks = sorted({_check_k(k) for k in ks})
    if not ks:
        raise ValueError("ks is empty: give at least one cut-off")
    if n_items < 1:
        raise ValueError(f"n_items must be positive, got {n_items}")
    _check_columns(test, [C.user, C.track], "test events")
    started = time.perf_counter()
    train_index = _TrainIndex.build(train)
    test_users = _IdSet(test[C.user].to_numpy(), positions=False).ids
    users = test_users[train_index.users.contains(test_users)]
    if not len(users):
        raise DataError("no test user has train events: nothing to evaluate")
    user_index = _IdSet(users)
    test_index = _TestIndex.build(test, user_index)
    # One pass over train for every source: pairs of the evaluated users on recommended tracks.
    k_max = max(ks)
    shown = []
    for name, reco in recs.items():
        _check_columns(reco, [C.user, C.track, C.rank], f"recommendations {name!r}")
        shown.append(reco[C.track].to_numpy()[reco[C.rank].to_numpy() <= k_max])
    tracks = _IdSet(np.concatenate(shown) if shown else np.empty(0, np.int64), positions=False)
    train_index.pair_users = user_index
    train_index.pairs = _train_pairs(train_index, user_index, tracks)
    log.info("train pairs for the heard check: %d", len(train_index.pairs))
    log.info("evaluating %d sources on %d warm test users", len(recs), len(users))

    rows = []
    for source, reco in recs.items():
        t0 = time.perf_counter()
        table = HitTable.build(reco, k_max, test=test_index, train=train_index)
        covered = float(np.mean(table.per_user_sum(k_max, None) > 0))
        for k in ks:
            rows.append(
                {
                    "source": source,
                    "k": k,
                    "precision": Precision(k).calc_from(table),
                    "recall": Recall(k).calc_from(table),
                    "ndcg": NDCG(k).calc_from(table),
                    "map": MAP(k).calc_from(table),
                    "coverage": Coverage(k).calc_from(table, n_items),
                    "novelty": Novelty(k).calc_from(table),
                    "novelty_bits": NoveltyBits(k).calc_from(table),
                    "users_covered": covered,
                }
            )
        log.info("evaluated %s in %.1fs", source, time.perf_counter() - t0)
    log.info("evaluation took %.1fs", time.perf_counter() - started)
    out = pd.DataFrame(rows, columns=["source", "k", *METRIC_COLUMNS])
    return out.astype({"k": np.int64})
