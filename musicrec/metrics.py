"""Offline metrics of recommendation lists against a test period, in the RecTools style.

Each metric is a small object with a cut-off ``k`` and a ``calc`` method over DataFrames
(``reco`` with user_id, track_id, rank; interactions with user_id, track_id); the ranking
metrics also give their per-user values (``per_user_from``), whose mean is ``calc_from``.
``evaluate`` is the entry point of the pipeline: it scores several sources at several cut-offs
at once, optionally with bootstrap intervals over users (``bootstrap_interval``,
``bootstrap_difference``) and per user segment (``activity_segments``). ``candidate_recall``
measures what a candidate set can reach before any ranking.

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

from musicrec.arrays import distinct, group_starts, in_sorted, lookup_sorted
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
    return distinct(values).astype(np.int64)


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
    first = group_starts(ordered)
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
            out[inside] = lookup_sorted(self.ids, wanted)
        return out

    def contains(self, values: np.ndarray) -> np.ndarray:
        if self.positions or self.table is None:
            return self._lookup(values) >= 0
        values = np.asarray(values)
        out = np.zeros(len(values), dtype=bool)
        inside = (values >= self.lo) & (values <= self.hi)
        out[inside] = self.table[values[inside] - self.lo]
        return out


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
        starts = np.flatnonzero(group_starts(ordered))
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
        keys = distinct((uidx[ok] << TRACK_BITS) | track[ok])
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
            hit = in_sorted(test.keys, pair)
            cum_hits = _cumulative_hits(row_user, row_rank, hit, rank_bits)

        heard = self_info = None
        if train is not None:
            if not isinstance(train, _TrainIndex):
                train = _TrainIndex.build(train)
            if train.pairs is None or train.pair_users is not user_index:
                train.pair_users = user_index
                train.pairs = _train_pairs(
                    train.user, train.track, user_index, _IdSet(row_track, positions=False)
                )
            heard = in_sorted(train.pairs, pair)
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
    first = group_starts(user_in_order)
    before_user = (running - hits_in_order)[first]
    cum_in_order = running - np.repeat(before_user, np.diff(np.r_[np.flatnonzero(first), len(hit)]))
    cum = np.empty_like(cum_in_order)
    cum[order] = cum_in_order
    return cum


def _train_pairs(
    train_user: np.ndarray, train_track: np.ndarray, users: _IdSet, tracks: _IdSet
) -> np.ndarray:
    """Sorted distinct packed (user index, track) keys of the train events that could matter.

    Only events of the evaluated users on tracks some list recommends can mark a row as heard,
    so the rest are dropped chunk by chunk before any int64 key is made.
    """
    parts = []
    for start in range(0, len(train_user), _TRAIN_CHUNK):
        t_track = train_track[start : start + _TRAIN_CHUNK]
        t_user = train_user[start : start + _TRAIN_CHUNK]
        uidx = users.index(t_user)
        ok = uidx >= 0
        ok[ok] = tracks.contains(t_track[ok])
        parts.append((uidx[ok] << TRACK_BITS) | t_track[ok])
    return distinct(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def _self_information(row_track: np.ndarray, train: _TrainIndex) -> np.ndarray:
    """-log2(share of train users who heard the track); unheard tracks count as one listener."""
    n_users = max(train.n_users, 1)
    seen, inverse = _unique_inverse(row_track)
    listeners = np.zeros(len(seen), dtype=np.int64)
    pos = lookup_sorted(train.track_ids, seen)
    listeners[pos >= 0] = train.listeners[pos[pos >= 0]]
    info = np.log2(n_users) - np.log2(np.maximum(listeners, 1))
    return info[inverse]


# --- metric objects -----------------------------------------------------------------------


def _ideal_dcg(k: int) -> np.ndarray:
    """DCG of 0, 1, ..., k hits at ranks 1, 2, ... (index = number of hits)."""
    return np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]


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

    def calc_from(self, table: HitTable) -> float:
        """The mean of ``per_user_from`` over the evaluated users."""
        return self._mean(self.per_user_from(table))

    def per_user_from(self, table: HitTable) -> np.ndarray:
        """One value per evaluated user (``table.users`` order), 0 for a user without a list.

        Per-user values are what intervals over users (``bootstrap_interval``) and segments
        resample or average.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Precision(_RankingMetric):
    """Hits in the top-k / k."""

    def per_user_from(self, table: HitTable) -> np.ndarray:
        return table.per_user_sum(self.k, table._need(table.hit, "test events")) / self.k


@dataclass(frozen=True)
class Recall(_RankingMetric):
    """Hits in the top-k / min(k, |test items|) (why min: see the module docstring)."""

    def per_user_from(self, table: HitTable) -> np.ndarray:
        hits = table.per_user_sum(self.k, table._need(table.hit, "test events"))
        return hits / np.maximum(table.ideal_count(self.k), 1)


@dataclass(frozen=True)
class NDCG(_RankingMetric):
    """DCG with binary relevance and 1/log2(rank + 1) discount over the ideal DCG of
    min(k, |test items|) hits at ranks 1, 2, ..."""

    def per_user_from(self, table: HitTable) -> np.ndarray:
        hit = table._need(table.hit, "test events")
        gain = hit / np.log2(table.row_rank + 1.0)
        dcg = table.per_user_sum(self.k, gain)
        idcg = _ideal_dcg(self.k)[table.ideal_count(self.k)]
        return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


@dataclass(frozen=True)
class MAP(_RankingMetric):
    """Mean over users of AP@k = sum over hits at rank r of precision@r, / min(k, |test items|)."""

    def per_user_from(self, table: HitTable) -> np.ndarray:
        hit = table._need(table.hit, "test events")
        precision_at_hit = np.where(hit, table.cum_hits / table.row_rank, 0.0)
        ap = table.per_user_sum(self.k, precision_at_hit)
        return ap / np.maximum(table.ideal_count(self.k), 1)


@dataclass(frozen=True)
class Coverage(_Metric):
    """Distinct tracks in the top-k lists of every user of the source / catalogue size."""

    def calc(self, reco: pd.DataFrame, n_items: int) -> float:
        return self.calc_from(HitTable.build(reco, self.k), n_items)

    def calc_from(self, table: HitTable, n_items: int) -> float:  # type: ignore[override]
        return self._of_rows(table, n_items, None)

    def _of_rows(self, table: HitTable, n_items: int, rows: np.ndarray | None) -> float:
        """Coverage of the shown rows picked by the bool mask ``rows`` (None: every row)."""
        if n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        top = table.all_rank <= self.k
        if rows is not None:
            top &= rows
        return len(_distinct(_as_int64(table.all_track[top]))) / n_items


@dataclass(frozen=True)
class _BeyondAccuracy(_Metric):
    def calc(
        self, reco: pd.DataFrame, prev_interactions: pd.DataFrame, users: np.ndarray | None = None
    ) -> float:
        """Mean over the users of ``reco`` (or ``users``) that have a list."""
        table = HitTable.build(reco, self.k, train=prev_interactions, users=users)
        return self.calc_from(table)

    def calc_from(self, table: HitTable) -> float:
        return _listed_mean(self.per_user_from(table))

    def per_user_from(self, table: HitTable) -> np.ndarray:
        """Per-user mean over the user's top-k rows; NaN for a user without a list."""
        n_rows = table.per_user_sum(self.k, None)
        total = table.per_user_sum(self.k, self._row_values(table))
        has_list = n_rows > 0
        out = np.full(table.n_users, np.nan)
        out[has_list] = total[has_list] / n_rows[has_list]
        return out

    def _row_values(self, table: HitTable) -> np.ndarray:
        raise NotImplementedError


def _listed_mean(values: np.ndarray) -> float:
    """Mean over the users that have a list (non-NaN per-user values)."""
    return _Metric._mean(values[~np.isnan(values)])


@dataclass(frozen=True)
class Novelty(_BeyondAccuracy):
    """Share of the top-k tracks the user had not heard in train (1.0 = heard tracks filtered)."""

    def _row_values(self, table: HitTable) -> np.ndarray:
        return (~table._need(table.heard, "train events")).astype(np.float64)


@dataclass(frozen=True)
class NoveltyBits(_BeyondAccuracy):
    """Mean self-information -log2(share of train users who heard the track) of the top-k."""

    def _row_values(self, table: HitTable) -> np.ndarray:
        return table._need(table.self_info, "train events")


_RANKING_METRICS: tuple[tuple[str, type[_RankingMetric]], ...] = (
    ("precision", Precision),
    ("recall", Recall),
    ("ndcg", NDCG),
    ("map", MAP),
)


# --- intervals over users -------------------------------------------------------------------

# Values with at most this many distinct values are resampled exactly; beyond, the sorted values
# are cut into this many equal-count groups. Cost ~ n_boot * groups binomial draws (~0.5 s for
# 1000 resamples here), independent of the number of users.
_BOOT_GROUPS = 4096
_BOOT_CELLS = 1 << 20  # resample-by-group counts held at once (8 MB of int64)


def bootstrap_interval(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-user ``values`` (resampling users).

    Method, vectorised and independent of the number of users: a resample of n users with
    replacement is summarised by how many copies of each distinct value it holds, and those
    counts are Multinomial(n, share of each distinct value), so ``n_boot`` multinomial draws
    over the distinct values give the resampled means *exactly* (per-user ranking metrics take
    few distinct values: precision@k has k + 1). With more than ``_BOOT_GROUPS`` distinct
    values the sorted values are cut into that many equal-count groups: the group counts are
    still exact multinomial draws, and the sum of the N draws taken from a group is replaced by
    its normal approximation N * group mean + sqrt(N) * group sd * Z (groups of sorted values are
    narrow, and the variance is kept). The interval is the (1 - level)/2 and (1 + level)/2
    quantiles of the resampled means. Returns (nan, nan) for no values; same seed, same result.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    means = _bootstrap_means(values, n_boot, seed)
    if means is None:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_difference(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of mean(a) - mean(b) over the same users.

    ``a[i]`` and ``b[i]`` are two sources' values for user i. Resampling users keeps the pairs,
    and the resampled difference of means is the resampled mean of ``a - b``, so this is
    ``bootstrap_interval(a - b)``. An interval above 0 says A beats B on these users.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same users: shapes {a.shape} and {b.shape}")
    return bootstrap_interval(a - b, n_boot=n_boot, seed=seed, level=level)


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray | None:
    """``n_boot`` resampled means of ``values`` (see ``bootstrap_interval``); None if empty."""
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    ordered = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = len(ordered)
    if n == 0:
        return None
    if np.isnan(ordered[-1]):  # NaN sorts last
        raise ValueError("values contain NaN; pass one value per user")
    starts = np.flatnonzero(group_starts(ordered))
    spread = None
    if len(starts) <= _BOOT_GROUPS:
        value = ordered[starts]
        count = np.diff(np.r_[starts, n])
    else:
        starts = np.arange(_BOOT_GROUPS, dtype=np.int64) * n // _BOOT_GROUPS
        count = np.diff(np.r_[starts, n])
        value = np.add.reduceat(ordered, starts) / count
        squares = np.add.reduceat((ordered - np.repeat(value, count)) ** 2, starts)
        spread = np.sqrt(squares / count)
        log.debug("bootstrap: %d users in %d groups of sorted values", n, _BOOT_GROUPS)
    rng = np.random.default_rng(seed)
    share = count / n
    means = np.empty(int(n_boot))
    step = max(1, _BOOT_CELLS // len(value))
    for start in range(0, len(means), step):
        size = min(step, len(means) - start)
        copies = rng.multinomial(n, share, size=size)  # (size, groups)
        total = copies @ value
        if spread is not None:
            total += (np.sqrt(copies) * rng.standard_normal(copies.shape)) @ spread
        means[start : start + size] = total / n
    return means


# --- the pipeline entry point ---------------------------------------------------------------


def _warm_users(test: pd.DataFrame, train_users: _IdSet) -> np.ndarray:
    test_users = _distinct(test[C.user].to_numpy())
    return test_users[train_users.contains(test_users)]


def evaluated_users(test: pd.DataFrame, train: pd.DataFrame) -> np.ndarray:
    """Sorted distinct ids (int64) of the test users with train events: whom ``evaluate`` scores."""
    _check_columns(test, [C.user], "test events")
    _check_columns(train, [C.user], "train")
    return _warm_users(test, _IdSet(train[C.user].to_numpy(), positions=False))


@dataclass
class _Segment:
    """A group of users: ``members`` (None = everyone) and its mask over the evaluated users."""

    name: str
    members: _IdSet | None = None
    mask: np.ndarray | None = None


def _segments(segments: Mapping[str, np.ndarray] | None, users: np.ndarray) -> list[_Segment]:
    out = [_Segment("all")]
    for name, ids in (segments or {}).items():
        if name == "all":
            raise ValueError('segment name "all" is reserved for every evaluated user')
        members = _IdSet(_as_int64(np.asarray(ids)), positions=False)
        mask = members.contains(users)
        log.info("segment %s: %d users, %d evaluated", name, len(members.ids), int(mask.sum()))
        if not mask.any():
            log.warning("segment %s has no evaluated user: its metrics are NaN", name)
        out.append(_Segment(name, members, mask))
    return out


def _score_source(
    source: str,
    reco: pd.DataFrame,
    table: HitTable,
    ks: Sequence[int],
    n_items: int,
    groups: list[_Segment],
    bootstrap: int,
    seed: int,
) -> dict[str, list[dict]]:
    """The rows of one source: per segment, one row per k (metric means over its users)."""
    has_list = table.per_user_sum(table.k_max, None) > 0
    shown_in: dict[str, np.ndarray] = {}  # per segment: which shown rows belong to its users
    if len(groups) > 1:
        top = reco[C.rank].to_numpy() <= table.k_max  # the same rows as table.all_track
        shown_user = reco[C.user].to_numpy()[top]
        for group in groups[1:]:
            assert group.members is not None
            shown_in[group.name] = group.members.contains(shown_user)
    rows: dict[str, list[dict]] = {group.name: [] for group in groups}
    for k in ks:
        per_user = {name: metric(k).per_user_from(table) for name, metric in _RANKING_METRICS}
        novelty = Novelty(k).per_user_from(table)
        bits = NoveltyBits(k).per_user_from(table)
        for group in groups:
            pick = slice(None) if group.mask is None else group.mask
            row: dict = {"segment": group.name, "source": source, "k": k}
            row.update({name: _Metric._mean(values[pick]) for name, values in per_user.items()})
            row["coverage"] = Coverage(k)._of_rows(table, n_items, shown_in.get(group.name))
            row["novelty"] = _listed_mean(novelty[pick])
            row["novelty_bits"] = _listed_mean(bits[pick])
            row["users_covered"] = _Metric._mean(has_list[pick].astype(np.float64))
            if bootstrap:
                interval = bootstrap_interval(per_user["ndcg"][pick], n_boot=bootstrap, seed=seed)
                row["ndcg_low"], row["ndcg_high"] = interval
            rows[group.name].append(row)
    return rows


def evaluate(
    recs: Mapping[str, pd.DataFrame],
    test: pd.DataFrame,
    train: pd.DataFrame,
    n_items: int,
    ks: Sequence[int] = (5, 10, 25),
    *,
    bootstrap: int = 0,
    seed: int = 0,
    segments: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Score every source at every cut-off on the warm test users.

    Evaluated users have at least one event in ``test`` and one in ``train`` (the users an
    offline model could serve, see ``evaluated_users``). A source without a list for one of
    them scores 0 for that user; ``users_covered`` is the share of evaluated users with a list.
    Returns one row per (source, k), sources in the given order, k ascending, with the columns
    ``source, k`` and ``METRIC_COLUMNS``.

    ``bootstrap > 0`` adds the columns ``ndcg_low, ndcg_high``: the 95 % percentile bootstrap
    interval of NDCG@k over the row's users (``bootstrap`` resamples, every row with the same
    ``seed``; see ``bootstrap_interval``). With ``bootstrap=0`` the columns are absent, so the
    default table is unchanged.

    ``segments`` (name -> user ids, e.g. from ``activity_segments``) adds a first column
    ``segment``: the rows of segment "all" (today's rows) come first, then per segment the same
    metrics over its evaluated users, which is what ``evaluate`` gives when ``recs`` and
    ``test`` are cut to the segment's users (``train`` unchanged): coverage counts the lists of
    the segment's users, novelty_bits keeps the listener shares of the whole train. A segment
    without evaluated users gets NaN metrics instead of an error.
    """
    ks = sorted({_check_k(k) for k in ks})
    if not ks:
        raise ValueError("ks is empty: give at least one cut-off")
    if n_items < 1:
        raise ValueError(f"n_items must be positive, got {n_items}")
    if isinstance(bootstrap, bool) or int(bootstrap) != bootstrap or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    _check_columns(test, [C.user, C.track], "test events")
    started = time.perf_counter()
    train_index = _TrainIndex.build(train)
    users = _warm_users(test, train_index.users)
    if not len(users):
        raise DataError("no test user has train events: nothing to evaluate")
    user_index = _IdSet(users)
    test_index = _TestIndex.build(test, user_index)
    groups = _segments(segments, users)
    # One pass over train for every source: pairs of the evaluated users on recommended tracks.
    k_max = max(ks)
    shown = []
    for name, reco in recs.items():
        _check_columns(reco, [C.user, C.track, C.rank], f"recommendations {name!r}")
        shown.append(reco[C.track].to_numpy()[reco[C.rank].to_numpy() <= k_max])
    tracks = _IdSet(np.concatenate(shown) if shown else np.empty(0, np.int64), positions=False)
    train_index.pair_users = user_index
    train_index.pairs = _train_pairs(train_index.user, train_index.track, user_index, tracks)
    log.info("train pairs for the heard check: %d", len(train_index.pairs))
    log.info("evaluating %d sources on %d warm test users", len(recs), len(users))

    rows: dict[str, list[dict]] = {group.name: [] for group in groups}
    for source, reco in recs.items():
        t0 = time.perf_counter()
        table = HitTable.build(reco, k_max, test=test_index, train=train_index)
        scored = _score_source(source, reco, table, ks, n_items, groups, int(bootstrap), seed)
        for name, source_rows in scored.items():
            rows[name].extend(source_rows)
        log.info("evaluated %s in %.1fs", source, time.perf_counter() - t0)
    log.info("evaluation took %.1fs", time.perf_counter() - started)
    columns = ["source", "k", *METRIC_COLUMNS]
    if bootstrap:
        columns += ["ndcg_low", "ndcg_high"]
    if segments is not None:
        columns.insert(0, "segment")
    out = pd.DataFrame([row for group in groups for row in rows[group.name]], columns=columns)
    return out.astype({"k": np.int64})


def activity_segments(train: pd.DataFrame, users: np.ndarray) -> dict[str, np.ndarray]:
    """Split ``users`` into "light" / "medium" / "heavy" by their number of train events.

    The cut points are the 1/3 and 2/3 quantiles (numpy's default, linear interpolation) of the
    train event counts of ``users`` themselves, so pass the evaluated users (``evaluated_users``)
    to get terciles of the users that are scored: light = count <= q(1/3), medium = q(1/3) <
    count <= q(2/3), heavy = count > q(2/3). A user without train events counts 0; ties at a cut
    point all go to the lower segment, so the thirds are only even when the counts are spread.
    The cut points are logged. Returns sorted distinct user ids (int64) per segment; use it as
    ``evaluate(..., segments=activity_segments(train, users))``.
    """
    _check_columns(train, [C.user], "train")
    index = _IdSet(_as_int64(np.asarray(users)))
    counts = np.zeros(len(index.ids), dtype=np.int64)
    train_user = train[C.user].to_numpy()
    for start in range(0, len(train_user), _TRAIN_CHUNK):
        uidx = index.index(train_user[start : start + _TRAIN_CHUNK])
        counts += np.bincount(uidx[uidx >= 0], minlength=len(counts))
    if not len(counts):
        return {name: np.empty(0, dtype=np.int64) for name in ("light", "medium", "heavy")}
    low, high = (float(q) for q in np.quantile(counts, [1 / 3, 2 / 3]))
    segments = {
        "light": index.ids[counts <= low],
        "medium": index.ids[(counts > low) & (counts <= high)],
        "heavy": index.ids[counts > high],
    }
    log.info(
        "activity segments by train events: light <= %g < medium <= %g < heavy; users %s",
        low,
        high,
        {name: len(ids) for name, ids in segments.items()},
    )
    return segments


# --- candidate sets ---------------------------------------------------------------------------

CANDIDATE_COLUMNS = ("source", "pairs", "per_user", "hits", "relevant", "recall", "ceiling_ndcg")


_SORT_RUN = 1 << 16  # 512 KB of int64 keys: a run sorts inside the L2 cache


def _sort_in_runs(keys: np.ndarray) -> None:
    """Sort int64 keys in place: cache-sized runs first, then timsort merges the runs.

    When the rows come grouped by user (lists are written user by user) the sorted runs are
    already in order and the merge is one linear pass; the whole costs about half a plain
    ``np.sort`` of 100 M keys, and about the same as it on shuffled rows.
    """
    for start in range(0, len(keys), _SORT_RUN):
        keys[start : start + _SORT_RUN].sort()
    keys.sort(kind="stable")


def _candidate_keys(reco: pd.DataFrame, users: _IdSet, name: str) -> tuple[np.ndarray, int]:
    """Sorted packed (user index, track) keys of the evaluated users' candidates, and the
    number of distinct ones (a repeated pair is left in place: searches and the union merge
    do not mind, and compacting would copy the largest array)."""
    _check_columns(reco, [C.user, C.track], f"candidates {name!r}")
    user = reco[C.user].to_numpy()
    track = reco[C.track].to_numpy()
    _check_track_ids(track, f"candidates {name!r}")
    parts = []
    for start in range(0, len(user), _TRAIN_CHUNK):  # chunks bound the int64 temporaries
        uidx = users.index(user[start : start + _TRAIN_CHUNK])
        ok = uidx >= 0
        parts.append((uidx[ok] << TRACK_BITS) | track[start : start + _TRAIN_CHUNK][ok])
    keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    del parts
    _sort_in_runs(keys)
    return keys, len(keys) - int(np.count_nonzero(keys[1:] == keys[:-1]))


def _count_union(keys: list[np.ndarray]) -> int:
    """Distinct keys over several sorted key arrays (consumes the list)."""
    merged = np.concatenate(keys) if keys else np.empty(0, dtype=np.int64)
    keys.clear()
    merged.sort(kind="stable")  # timsort: merging sorted runs is linear
    return int(np.count_nonzero(merged[1:] != merged[:-1])) + 1 if len(merged) else 0


def candidate_recall(
    candidates: Mapping[str, pd.DataFrame],
    test: pd.DataFrame,
    train: pd.DataFrame,
    users: np.ndarray | None = None,
    k: int = 10,
) -> pd.DataFrame:
    """How much of the test period each candidate set can reach, and the NDCG a perfect
    re-ranking of it would score: the ceiling of a ranker fed with these candidates.

    Evaluated users: ``users`` if given, else the test users with train history (as in
    ``evaluate``). Relevant pairs are the distinct test (user, track) pairs of the evaluated
    users that the user did not hear in train: a track already heard in train is never
    recommended, so it is out of the denominator (and out of the hits). Per candidate source
    (a recs table with user_id, track_id and any list length) and for the ``union`` of all
    sources, one row with:

    - ``pairs``: distinct candidate (user, track) pairs of the evaluated users;
    - ``per_user``: pairs / evaluated users (users without candidates count 0);
    - ``hits``: relevant pairs found among the candidates; ``relevant``: all relevant pairs;
    - ``recall`` = hits / relevant, pooled over pairs (not a per-user mean);
    - ``ceiling_ndcg``: mean over evaluated users of the NDCG@k of the best ordering of the
      user's candidates: h = the user's hits, DCG of min(h, k) hits at ranks 1..min(h, k) over
      the ideal DCG of min(k, |test items|) hits, |test items| counting every distinct test
      track as ``NDCG`` does (so it bounds ``evaluate``'s ndcg@k of any ranking of the set).

    Costs one sort of each source's packed keys and a linear merge for the union.
    """
    k = _check_k(k)
    _check_columns(test, [C.user, C.track], "test events")
    _check_columns(train, [C.user, C.track], "train")
    started = time.perf_counter()
    train_user = train[C.user].to_numpy()
    train_track = train[C.track].to_numpy()
    if users is None:
        users = _warm_users(test, _IdSet(train_user, positions=False))
    user_index = _IdSet(_as_int64(np.asarray(users)))
    n_users = len(user_index.ids)
    if not n_users:
        raise DataError("no evaluated user: no test user has train events")
    test_index = _TestIndex.build(test, user_index)
    test_track = test_index.keys & ((1 << TRACK_BITS) - 1)
    heard_keys = _train_pairs(
        train_user, train_track, user_index, _IdSet(test_track, positions=False)
    )
    relevant = test_index.keys[~in_sorted(heard_keys, test_index.keys)]
    relevant_user = relevant >> TRACK_BITS
    log.info(
        "candidate recall on %d users: %d test pairs, %d heard in train, %d relevant",
        n_users,
        len(test_index.keys),
        len(test_index.keys) - len(relevant),
        len(relevant),
    )
    ideal = _ideal_dcg(k)
    idcg = ideal[np.minimum(k, test_index.n_relevant)]

    def row(source: str, pairs: int, found: np.ndarray) -> dict:
        hits_per_user = np.bincount(relevant_user[found], minlength=n_users)
        dcg = ideal[np.minimum(hits_per_user, k)]
        ceiling = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
        hits = int(found.sum())
        return {
            "source": source,
            "pairs": pairs,
            "per_user": pairs / n_users,
            "hits": hits,
            "relevant": len(relevant),
            "recall": hits / len(relevant) if len(relevant) else float("nan"),
            "ceiling_ndcg": float(ceiling.mean()),
        }

    rows = []
    found_any = np.zeros(len(relevant), dtype=bool)
    all_keys = []
    for name, reco in candidates.items():
        t0 = time.perf_counter()
        keys, pairs = _candidate_keys(reco, user_index, name)
        found = in_sorted(keys, relevant)
        found_any |= found
        rows.append(row(name, pairs, found))
        all_keys.append(keys)
        del keys  # the list holds it; the union merge frees it
        log.info("candidates %s: %d pairs in %.1fs", name, pairs, time.perf_counter() - t0)
    rows.append(row("union", _count_union(all_keys), found_any))
    log.info("candidate recall took %.1fs", time.perf_counter() - started)
    out = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS))
    return out.astype({"pairs": np.int64, "hits": np.int64, "relevant": np.int64})


# --- variety: artists within a list -----------------------------------------------------------

VARIETY_COLUMNS = ("source", "k", "users", "diversity", "top_artist_share", "top10_artists_share")


def list_diversity(artists: Sequence[int]) -> float:
    """Intra-list diversity of one list: the share of distinct artists among its tracks (1.0
    when every track is by another artist; a negative artist is unknown and counts as
    distinct); 1.0 for an empty list."""
    if len(artists) == 0:
        return 1.0
    known = [a for a in artists if a >= 0]
    return (len(set(known)) + len(artists) - len(known)) / len(artists)


def list_concentration(artists: Sequence[int]) -> float:
    """Per-artist concentration of one list: the share of it held by its most frequent
    artist (1/len when every track is by another artist); 0.0 for an empty list."""
    if len(artists) == 0:
        return 0.0
    known = np.asarray([a for a in artists if a >= 0], dtype=np.int64)
    top = int(np.bincount(known - known.min()).max()) if known.size else 1
    return top / len(artists)


def _variety_per_list(users: np.ndarray, artist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`list_diversity` and :func:`list_concentration` of every list at once: rows
    grouped by ``users`` (consecutive), ``artist`` the artist of each row (-1 unknown)."""
    if users.size == 0:
        return np.zeros(0), np.zeros(0)
    starts = np.flatnonzero(group_starts(users))
    owner = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, users.size]))
    lengths = np.bincount(owner, minlength=starts.size).astype(np.float64)
    known = artist >= 0
    span = int(artist.max()) + 1 if known.any() else 1
    keys = np.sort(owner[known].astype(np.int64) * span + artist[known])
    first = group_starts(keys)
    distinct_known = np.bincount(keys[first] // span, minlength=starts.size)
    unknown = np.bincount(owner[~known], minlength=starts.size)
    runs = np.diff(np.r_[np.flatnonzero(first), keys.size])  # rows of each (list, artist)
    top = np.zeros(starts.size, dtype=np.int64)
    np.maximum.at(top, keys[first] // span, runs)
    top[top == 0] = 1  # no known artist: as list_concentration counts it
    return (distinct_known + unknown) / lengths, top / lengths


def artist_variety(
    recs: Mapping[str, pd.DataFrame],
    track_ids: np.ndarray,
    artist_ids: np.ndarray,
    ks: Sequence[int] = (10,),
) -> pd.DataFrame:
    """Rows (``VARIETY_COLUMNS``) per source and k over every user's first k: ``diversity``
    (mean intra-list share of distinct artists), ``top_artist_share`` (mean share of a list
    held by its most frequent artist) and ``top10_artists_share`` (share of all the listed
    slots held by the ten most listed artists: concentration across users).
    ``artist_ids[i]`` is the (first) artist of ``track_ids[i]``; -1 or an absent track is
    unknown and counted as its own artist."""
    order = np.argsort(np.asarray(track_ids, dtype=np.int64), kind="stable")
    ids = np.asarray(track_ids, dtype=np.int64)[order]
    arts = np.asarray(artist_ids, dtype=np.int64)[order]
    rows = []
    for source, reco in recs.items():
        _check_columns(reco, [C.user, C.track, C.rank], f"recommendations {source!r}")
        for k in sorted({_check_k(k) for k in ks}):
            top = reco[reco[C.rank].to_numpy() <= k].sort_values([C.user, C.rank])
            tracks = top[C.track].to_numpy().astype(np.int64)
            artist = np.full(tracks.size, -1, dtype=np.int64)
            if ids.size:
                pos = lookup_sorted(ids, tracks)
                artist = np.where(pos >= 0, arts[pos], -1)
            users = top[C.user].to_numpy()
            diversity, concentration = _variety_per_list(users, artist)
            counted = np.sort(artist[artist >= 0])  # slots per artist: run lengths
            runs = (
                np.diff(np.r_[np.flatnonzero(group_starts(counted)), counted.size])
                if counted.size
                else np.zeros(0, np.int64)
            )
            top10 = np.sort(runs)[::-1][:10].sum() / max(artist.size, 1)
            rows.append(
                {
                    "source": source,
                    "k": k,
                    "users": diversity.size,
                    "diversity": float(diversity.mean()) if diversity.size else float("nan"),
                    "top_artist_share": float(concentration.mean())
                    if diversity.size
                    else float("nan"),
                    "top10_artists_share": float(top10),
                }
            )
    return pd.DataFrame(rows, columns=list(VARIETY_COLUMNS))
