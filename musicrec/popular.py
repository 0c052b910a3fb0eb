"""Top popular tracks by distinct listeners, recent listeners first."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from musicrec.columns import Columns as C
from musicrec.features import IdIndex

log = logging.getLogger(__name__)


def top_popular(events: pd.DataFrame, window_days: int, last_day: int) -> pd.DataFrame:
    """Every track with a listener, best first, in the ``top_popular`` schema.

    ``listeners`` counts distinct listeners overall; ``score`` counts distinct listeners in the
    ``window_days`` days ending at ``last_day``. Tracks are ordered by score, then by overall
    listeners (the fallback for tracks nobody played recently), then by id. The events hold one
    row per (user, track) — the log has no repeated pairs — so a row count is a listener count.
    """
    tracks = events[C.track].to_numpy()
    days = events[C.day].to_numpy()
    index = IdIndex.from_values(tracks)
    codes = index.codes(tracks)
    listeners = np.bincount(codes, minlength=len(index)).astype(np.int64)
    recent_mask = (days > last_day - window_days) & (days <= last_day)
    recent = np.bincount(codes[recent_mask], minlength=len(index)).astype(np.int64)
    if not recent.any():
        log.warning("no events in the last %d days before day %d: ranking by all listeners",
                    window_days, last_day)
        recent = listeners
    order = np.lexsort((index.ids, -listeners, -recent))
    return pd.DataFrame(
        {
            C.track: index.ids[order].astype(np.int32),
            C.listeners: listeners[order],
            C.score: recent[order].astype(np.float32),
            C.rank: np.arange(1, order.size + 1, dtype=np.int32),
        }
    )


def popular_for_users(
    popular: pd.DataFrame, user_ids: np.ndarray, heard: pd.DataFrame | None, n: int
) -> pd.DataFrame:
    """The ``n`` most popular tracks for each user, minus tracks in ``heard`` (recs schema)."""
    user_ids = np.unique(np.asarray(user_ids, dtype=np.int32))
    pool_size = min(len(popular), n * 3 + 100)
    pool = popular[C.track].to_numpy()[:pool_size].astype(np.int32)
    pool_score = popular[C.score].to_numpy()[:pool_size].astype(np.float32)
    users = np.repeat(user_ids, pool_size)
    tracks = np.tile(pool, user_ids.size)
    scores = np.tile(pool_score, user_ids.size)
    keep = np.ones(users.size, dtype=bool)
    if heard is not None and len(heard):
        # only heard rows of pool tracks can remove anything: filter those first (one lookup)
        heard_tracks = heard[C.track].to_numpy()
        in_pool = IdIndex.from_values(pool).codes(heard_tracks) >= 0
        keys = users.astype(np.int64) << 32 | tracks.astype(np.int64)
        heard_keys = (heard[C.user].to_numpy()[in_pool].astype(np.int64) << 32
                      | heard_tracks[in_pool].astype(np.int64))
        heard_keys.sort()
        pos = np.minimum(np.searchsorted(heard_keys, keys), max(heard_keys.size - 1, 0))
        keep = (heard_keys[pos] != keys) if heard_keys.size else keep
    users, tracks, scores = users[keep], tracks[keep], scores[keep]
    # rank within user: position among the kept rows of that user (rows stay in pool order)
    starts = np.r_[True, users[1:] != users[:-1]] if users.size else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(users.size), 0))
    rank = np.arange(users.size) - first + 1
    take = rank <= n
    return pd.DataFrame(
        {
            C.user: users[take],
            C.track: tracks[take],
            C.score: scores[take],
            C.rank: rank[take].astype(np.int16),
        }
    )
