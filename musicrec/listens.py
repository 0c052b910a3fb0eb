"""The listening log grouped by user: dense id codes and each user's events before a cut-off.

Named ``Listens`` (not "history") so it is not confused with the service's online history
store (``musicrec.history``). Everything is vectorised numpy over compact dtypes so it holds
at 222 M events: ids are mapped to dense codes with a lookup table (no sort of the events), a
user's events are a slice in their file order (``events.parquet`` is sorted by user and
track_seq), and per-user work is done in batches of users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from musicrec.arrays import days_decay, distinct, gather_rows, lookup_sorted
from musicrec.columns import Columns as C
from musicrec.errors import DataError

# A dense lookup table (one int32 per possible id) is used while it stays this small.
_MAX_LOOKUP_IDS = 400_000_000


class IdIndex:
    """Sorted unique input ids and their dense codes 0..n-1 (code = position in ``ids``)."""

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and np.any(ids[1:] <= ids[:-1]):
            raise ValueError("IdIndex needs sorted unique ids")
        self.ids = ids
        self._lookup: np.ndarray | None = None
        if ids.size and ids[0] >= 0 and int(ids[-1]) < _MAX_LOOKUP_IDS:
            self._lookup = np.full(int(ids[-1]) + 1, -1, dtype=np.int32)
            self._lookup[ids] = np.arange(ids.size, dtype=np.int32)

    def __len__(self) -> int:
        return int(self.ids.size)

    @classmethod
    def from_values(cls, values: np.ndarray) -> IdIndex:
        """The index of the distinct values (a presence table instead of a sort when possible)."""
        values = np.asarray(values)
        if values.size == 0:
            return cls(values[:0].astype(np.int64))
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi < _MAX_LOOKUP_IDS:
            present = np.zeros(hi + 1, dtype=bool)
            present[values] = True
            return cls(np.flatnonzero(present).astype(values.dtype))
        return cls(distinct(values))

    def codes(self, values: np.ndarray) -> np.ndarray:
        """int32 codes of ``values``; ids not in the index get -1."""
        values = np.asarray(values)
        if self._lookup is not None:
            out = np.full(values.shape, -1, dtype=np.int32)
            inside = (values >= 0) & (values < self._lookup.size)
            out[inside] = self._lookup[values[inside]]
            return out
        return lookup_sorted(self.ids, values).astype(np.int32)


@dataclass
class Listens:
    """Listening events before ``cutoff`` grouped by user, in the order of the events file.

    ``track_codes[indptr[u]:indptr[u + 1]]`` are the tracks of user code ``u`` (oldest first),
    ``days`` their day numbers. Users and tracks are only those with at least one event.
    """

    users: IdIndex
    tracks: IdIndex
    indptr: np.ndarray  # int64, n_users + 1
    track_codes: np.ndarray  # int32, n_events
    days: np.ndarray  # int16, n_events
    cutoff: int  # first day NOT in the log
    plays: np.ndarray | None = None  # int32 plays merged into each event; None = one each

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_tracks(self) -> int:
        return len(self.tracks)

    @property
    def n_events(self) -> int:
        return int(self.track_codes.size)

    def counts(self) -> np.ndarray:
        """Events per user code."""
        return np.diff(self.indptr)

    def subset(self, user_codes: np.ndarray) -> Listens:
        """The events of some users (sorted codes; code i of the result is
        ``user_codes[i]``), on the same track codes."""
        user_codes = np.asarray(user_codes, dtype=np.int64)
        positions, _ = gather_rows(self.indptr, user_codes)
        indptr = np.zeros(user_codes.size + 1, dtype=np.int64)
        np.cumsum(self.indptr[user_codes + 1] - self.indptr[user_codes], out=indptr[1:])
        return Listens(
            IdIndex(self.users.ids[user_codes]),
            self.tracks,
            indptr,
            self.track_codes[positions],
            self.days[positions],
            self.cutoff,
            None if self.plays is None else self.plays[positions],
        )

    def compact(self) -> tuple[Listens, np.ndarray]:
        """The same events on only the tracks they hold (re-coded), and the old code of each
        new one: a user sample's ALS then solves no factors for tracks nobody in it heard."""
        kept = np.flatnonzero(np.bincount(self.track_codes, minlength=self.n_tracks))
        recode = np.full(self.n_tracks, -1, dtype=np.int32)
        recode[kept] = np.arange(kept.size, dtype=np.int32)
        return (
            Listens(
                self.users,
                IdIndex(self.tracks.ids[kept]),
                self.indptr,
                recode[self.track_codes],
                self.days,
                self.cutoff,
                self.plays,
            ),
            kept.astype(np.int32),
        )

    @property
    def span_days(self) -> int:
        """Days from the first event to the cut-off."""
        return int(self.cutoff - int(self.days.min())) if self.n_events else 1

    def strength(
        self, half_life_days: float | None = None, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """Listening strength of the events at ``positions`` (all when None): plays, times
        ``0.5 ** (age / half_life)`` when a half-life is given (age in days before the
        cut-off)."""
        plays = self.plays if positions is None or self.plays is None else self.plays[positions]
        days = self.days if positions is None else self.days[positions]
        weights = np.ones(days.size, np.float32) if plays is None else plays.astype(np.float32)
        if half_life_days is not None:
            weights *= days_decay((self.cutoff - 1) - days.astype(np.int32), half_life_days)
        return weights

    def matrix(self, half_life_days: float | None = None) -> sp.csr_matrix:
        """users x tracks CSR of listening ``strength``; a track heard on several days is one
        cell holding the sum."""
        weights = self.strength(half_life_days)
        # copies: scipy shares the arrays it is given and sum_duplicates sorts them in place
        matrix = sp.csr_matrix(
            (weights, self.track_codes.copy(), self.indptr.copy()),
            shape=(self.n_users, self.n_tracks),
        )
        matrix.sum_duplicates()
        return matrix


def build_listens(events: pd.DataFrame, cutoff: int) -> Listens:
    """Group the events (all before ``cutoff``) by user without sorting them when they are
    already sorted by user, as ``events.parquet`` is."""
    if len(events) == 0:
        raise DataError("no listening events before the cut-off day: nothing to learn from")
    user_values = events[C.user].to_numpy()
    track_values = events[C.track].to_numpy()
    days = events[C.day].to_numpy().astype(np.int16, copy=False)
    plays = events[C.plays].to_numpy() if C.plays in events else None
    if plays is not None and bool(np.all(plays == 1)):
        plays = None
    if int(days.max()) >= cutoff:
        raise ValueError(f"events reach day {int(days.max())}, at or after {cutoff}")
    users = IdIndex.from_values(user_values)
    tracks = IdIndex.from_values(track_values)
    user_codes = users.codes(user_values)
    track_codes = tracks.codes(track_values)
    if user_codes.size > 1 and np.any(user_codes[1:] < user_codes[:-1]):
        # Not grouped by user: order by user, then day (stable keeps the file order in a day).
        order = np.lexsort((days, user_codes))
        user_codes, track_codes, days = user_codes[order], track_codes[order], days[order]
        plays = plays[order] if plays is not None else None
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_codes, minlength=len(users)), out=indptr[1:])
    return Listens(
        users,
        tracks,
        indptr,
        track_codes,
        days,
        cutoff,
        None if plays is None else plays.astype(np.int32, copy=False),
    )
