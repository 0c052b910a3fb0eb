"""Candidates from several sources, features for each (user, track) pair, a CatBoost ranker.

Two contexts are built the same way: one on P1 (before the label period) whose candidates are
labelled by P2 listens to train the ranker, and one on P1+P2 whose candidates are scored by the
trained ranker to give the final lists evaluated on P3. A context only holds data from before
its cut-off day, so no feature can see the period it predicts.

Work is done per batch of users (a few thousand), so memory stays flat at full scale.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from catboost import CatBoostClassifier
from tqdm.auto import tqdm

from musicrec.als import recs_frame
from musicrec.columns import Columns as C
from musicrec.features import History, IdIndex, gather_rows, top_k_per_group
from musicrec.settings import Settings

log = logging.getLogger(__name__)

MISSING_RANK = 10_000.0  # rank of a pair that a source did not propose

FEATURES = [
    "als_score",
    "als_rank",
    "sim_score",
    "sim_max",
    "sim_count",
    "sim_rank",
    "pop_rank",
    "track_listeners",
    "track_recent_listeners",
    "track_trend",
    "track_age_days",
    "genre_share",
    "artist_share",
    "user_events",
    "user_days",
    "user_recent_events",
    "user_days_since_last",
    "n_sources",
]


@dataclass
class TrackTable:
    """Per-track arrays aligned with a history's track codes."""

    listeners: np.ndarray  # float32
    recent_listeners: np.ndarray  # float32
    first_day: np.ndarray  # int32
    popular_rank: np.ndarray  # float32, 1 = most popular
    genres: sp.csr_matrix  # tracks x genres, 1 where the track has the genre
    artists: sp.csr_matrix  # tracks x artists


@dataclass
class RankContext:
    """Everything candidate generation and features need, all from before ``history.cutoff``."""

    history: History
    tracks: TrackTable
    user_factors: np.ndarray  # rows = history user codes
    item_factors: np.ndarray  # rows = history track codes
    als_indptr: np.ndarray  # ALS candidates grouped by user code (best first)
    als_tracks: np.ndarray
    similar: sp.csr_matrix  # tracks x tracks cosine of the similar-tracks table
    popular_codes: np.ndarray  # track codes, most popular first
    popular_scores: np.ndarray


# --- building the context ------------------------------------------------------------------


def _attribute_matrix(
    items: pa.Table | pd.DataFrame | None, column: str, tracks: IdIndex
) -> sp.csr_matrix:
    """tracks x attribute (genre / artist) 0-1 matrix from a list column of items, built from
    the flattened arrow list (no per-row Python)."""
    if isinstance(items, pd.DataFrame) and column in items:
        items = pa.Table.from_pandas(items[[C.track, column]], preserve_index=False)
    if not isinstance(items, pa.Table) or column not in items.column_names:
        return sp.csr_matrix((len(tracks), 1), dtype=np.float32)
    lists = items.column(column).combine_chunks()
    codes = tracks.codes(items.column(C.track).to_numpy())
    offsets = lists.offsets.to_numpy()
    lengths = np.diff(offsets)
    if lists.null_count:
        lengths = np.where(lists.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    values = lists.values.to_numpy()[
        np.repeat(offsets[:-1], lengths) + _ranges(lengths)] if lengths.sum() else \
        np.zeros(0, np.int64)
    rows = np.repeat(codes, lengths)
    keep = rows >= 0
    rows, values = rows[keep], values[keep]
    attr = IdIndex.from_values(values) if values.size else IdIndex(np.zeros(0, np.int64))
    matrix = sp.csr_matrix(
        (np.ones(values.size, np.float32), (rows, attr.codes(values))),
        shape=(len(tracks), max(len(attr), 1)),
    )
    matrix.data[:] = 1.0  # a repeated attribute in one list counts once
    return matrix


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in ``lengths``, concatenated."""
    total = int(lengths.sum())
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def track_table(
    history: History, items: pa.Table | pd.DataFrame | None, window_days: int, popular: pd.DataFrame
) -> TrackTable:
    """Track popularity, recency and age from the history; genres and artists from items."""
    n = history.n_tracks
    listeners = np.bincount(history.track_codes, minlength=n).astype(np.float32)
    recent_mask = history.days >= history.cutoff - window_days
    recent = np.bincount(history.track_codes[recent_mask], minlength=n).astype(np.float32)
    first_day = np.full(n, np.iinfo(np.int32).max, dtype=np.int32)
    np.minimum.at(first_day, history.track_codes, history.days.astype(np.int32))
    popular_rank = np.full(n, MISSING_RANK, dtype=np.float32)
    pop_codes = history.tracks.codes(popular[C.track].to_numpy())
    ok = pop_codes >= 0
    popular_rank[pop_codes[ok]] = popular[C.rank].to_numpy()[ok]
    return TrackTable(listeners, recent, first_day, popular_rank,
                      _attribute_matrix(items, C.genre_ids, history.tracks),
                      _attribute_matrix(items, C.artist_ids, history.tracks))


def build_context(
    history: History,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    als_user_ids: np.ndarray,
    als_track_ids: np.ndarray,
    als_candidates: pd.DataFrame,
    similar: pd.DataFrame,
    popular: pd.DataFrame,
    items: pa.Table | pd.DataFrame | None,
    settings: Settings,
) -> RankContext:
    """Tie the candidate models (fitted on ``history``) to the history's codes."""
    if not (np.array_equal(als_user_ids, history.users.ids)
            and np.array_equal(als_track_ids, history.tracks.ids)):
        raise ValueError("the ALS model was not fitted on this history (ids differ); rerun als")
    users, tracks = history.users, history.tracks
    # ALS candidates grouped by user code, best first (the table is sorted by user, rank)
    cand_users = users.codes(als_candidates[C.user].to_numpy())
    cand_tracks = tracks.codes(als_candidates[C.track].to_numpy())
    ok = (cand_users >= 0) & (cand_tracks >= 0)
    cand_users, cand_tracks = cand_users[ok], cand_tracks[ok]
    ranks = als_candidates[C.rank].to_numpy()[ok]
    same_user = cand_users[1:] == cand_users[:-1]
    if np.all(cand_users[1:] >= cand_users[:-1]) and np.all(ranks[1:][same_user]
                                                             > ranks[:-1][same_user]):
        order = slice(None)  # the artefact's own order (user, rank): no sort of 100 M rows
    else:
        order = np.lexsort((ranks, cand_users))
    als_indptr = np.zeros(history.n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(cand_users, minlength=history.n_users), out=als_indptr[1:])
    # similar-tracks table as a sparse tracks x tracks matrix
    src = tracks.codes(similar[C.track].to_numpy())
    dst = tracks.codes(similar[C.similar].to_numpy())
    ok_s = (src >= 0) & (dst >= 0)
    sim = sp.csr_matrix(
        (np.maximum(similar[C.score].to_numpy()[ok_s], 0).astype(np.float32),
         (src[ok_s], dst[ok_s])), shape=(history.n_tracks, history.n_tracks))
    pop_codes = tracks.codes(popular[C.track].to_numpy())
    ok_p = pop_codes >= 0
    return RankContext(
        history=history,
        tracks=track_table(history, items, settings.popular_window_days, popular),
        user_factors=np.asarray(user_factors, np.float32),
        item_factors=np.asarray(item_factors, np.float32),
        als_indptr=als_indptr,
        als_tracks=cand_tracks[order],
        similar=sim,
        popular_codes=pop_codes[ok_p],
        popular_scores=popular[C.score].to_numpy()[ok_p].astype(np.float32),
    )


# --- candidates and features for a batch of users --------------------------------------------


@dataclass
class Batch:
    """Candidate pairs of a batch of users: ``users[local]`` is the user code of each pair."""

    users: np.ndarray  # user codes of the batch
    local: np.ndarray  # int32, index into users
    track_codes: np.ndarray  # int32
    features: pd.DataFrame  # FEATURES, float32, one row per pair
    similar_recent: tuple[np.ndarray, np.ndarray, np.ndarray]  # (local, track, score) top list


def recent_tracks(history: History, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(local row, track code) of the last ``n`` listened tracks of each user code."""
    positions, local = gather_rows(history.indptr, users)
    ends = history.indptr[np.asarray(users) + 1]
    recent = positions >= ends[local] - n
    return local[recent], history.track_codes[positions[recent]]


def _pair_keys(local: np.ndarray, tracks: np.ndarray, n_tracks: int) -> np.ndarray:
    return local.astype(np.int64) * n_tracks + tracks


def _max_over_attributes(
    user_attr: sp.csr_matrix, track_attr: sp.csr_matrix, local: np.ndarray, tracks: np.ndarray
) -> np.ndarray:
    """For each pair, the largest value of ``user_attr[local]`` over the track's attributes."""
    positions, pair = gather_rows(track_attr.indptr, tracks)
    out = np.zeros(local.size, dtype=np.float32)
    if positions.size:
        attrs = track_attr.indices[positions]
        values = np.asarray(user_attr[local[pair], attrs]).ravel().astype(np.float32)
        np.maximum.at(out, pair, values)
    return out


def candidates(ctx: RankContext, users: np.ndarray, settings: Settings) -> Batch:
    """Candidate pairs and their features for the user codes ``users`` (sorted, unique)."""
    hist, n_tracks = ctx.history, ctx.history.n_tracks
    users = np.asarray(users, dtype=np.int64)
    b = users.size
    positions, h_local = gather_rows(hist.indptr, users)
    h_tracks = hist.track_codes[positions]
    h_days = hist.days[positions].astype(np.int32)
    heard = np.sort(_pair_keys(h_local, h_tracks, n_tracks))
    lengths = (hist.indptr[users + 1] - hist.indptr[users]).astype(np.int64)
    local_indptr = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(lengths, out=local_indptr[1:])
    heard_matrix = sp.csr_matrix((np.ones(h_tracks.size, np.float32), h_tracks, local_indptr),
                                 shape=(b, n_tracks))

    def not_heard(keys: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(heard, keys)
        pos = np.minimum(pos, max(heard.size - 1, 0))
        return heard[pos] != keys if heard.size else np.ones(keys.size, bool)

    # 1. ALS candidates (already unheard), best first per user
    a_pos, a_local = gather_rows(ctx.als_indptr, users)
    a_tracks = ctx.als_tracks[a_pos]
    a_rank = (a_pos - ctx.als_indptr[users][a_local] + 1).astype(np.float32)

    # 2. tracks similar to the last listened ones, similarity summed over them, unheard
    r_local, r_tracks = recent_tracks(hist, users, settings.ranker_recent_tracks)
    e_pos, e_idx = gather_rows(ctx.similar.indptr, r_tracks)
    e_keys = _pair_keys(r_local[e_idx], ctx.similar.indices[e_pos], n_tracks)
    e_score = ctx.similar.data[e_pos]
    sim_keys, e_inverse = np.unique(e_keys, return_inverse=True)
    sim_sum = np.bincount(e_inverse, weights=e_score, minlength=sim_keys.size)
    sim_cnt = np.bincount(e_inverse, minlength=sim_keys.size).astype(np.float32)
    sim_max = np.zeros(sim_keys.size, dtype=np.float32)
    np.maximum.at(sim_max, e_inverse, e_score)
    ok = not_heard(sim_keys) & (sim_sum > 0)
    s_keys, s_score = sim_keys[ok], sim_sum[ok].astype(np.float32)
    s_local, s_tracks = s_keys // n_tracks, (s_keys % n_tracks).astype(np.int32)
    # s_keys are sorted by (user, track): ties keep the lower track id first
    top, s_rank = top_k_per_group(s_local, s_score, settings.n_similar_candidates)
    s_local, s_tracks, s_score = s_local[top], s_tracks[top], s_score[top]

    # 3. popular tracks the user has not heard
    pool = ctx.popular_codes[: settings.n_popular_candidates * 3 + 100]
    p_local = np.repeat(np.arange(b, dtype=np.int32), pool.size)
    p_tracks = np.tile(pool, b)
    ok = not_heard(_pair_keys(p_local, p_tracks, n_tracks))
    p_local, p_tracks = p_local[ok], p_tracks[ok]
    starts = np.r_[True, p_local[1:] != p_local[:-1]] if p_local.size else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(p_local.size), 0))
    keep = np.arange(p_local.size) - first < settings.n_popular_candidates
    p_local, p_tracks = p_local[keep], p_tracks[keep]

    # union of the sources: one row per (user, track)
    all_keys = np.concatenate([_pair_keys(a_local, a_tracks, n_tracks),
                               _pair_keys(s_local, s_tracks, n_tracks),
                               _pair_keys(p_local, p_tracks, n_tracks)])
    keys, inverse = np.unique(all_keys, return_inverse=True)
    n_pairs = keys.size
    local = (keys // n_tracks).astype(np.int32)
    tracks = (keys % n_tracks).astype(np.int32)
    idx_a = inverse[: a_local.size]
    idx_s = inverse[a_local.size: a_local.size + s_local.size]
    idx_p = inverse[a_local.size + s_local.size:]

    f = {name: np.zeros(n_pairs, dtype=np.float32) for name in FEATURES}
    # ALS score for every pair (not only ALS's own candidates), chunked dot products
    user_codes = users[local]
    for start in range(0, n_pairs, 200_000):
        sl = slice(start, start + 200_000)
        f["als_score"][sl] = np.einsum("ij,ij->i", ctx.user_factors[user_codes[sl]],
                                       ctx.item_factors[tracks[sl]])
    f["als_rank"][:] = MISSING_RANK
    f["als_rank"][idx_a] = a_rank
    f["sim_rank"][:] = MISSING_RANK
    f["sim_rank"][idx_s] = s_rank
    # similarity to the recent tracks for every pair, not only the similar-source ones
    where = np.minimum(np.searchsorted(sim_keys, keys), max(sim_keys.size - 1, 0))
    found = (sim_keys[where] == keys) if sim_keys.size else np.zeros(n_pairs, bool)
    f["sim_score"][found] = sim_sum[where[found]]
    f["sim_count"][found] = sim_cnt[where[found]]
    f["sim_max"][found] = sim_max[where[found]]
    n_sources = np.zeros(n_pairs, dtype=np.float32)
    for idx in (idx_a, idx_s, idx_p):
        n_sources[idx] += 1
    f["n_sources"][:] = n_sources

    t = ctx.tracks
    f["pop_rank"][:] = t.popular_rank[tracks]
    f["track_listeners"][:] = t.listeners[tracks]
    f["track_recent_listeners"][:] = t.recent_listeners[tracks]
    f["track_trend"][:] = t.recent_listeners[tracks] / np.maximum(t.listeners[tracks], 1)
    f["track_age_days"][:] = hist.cutoff - t.first_day[tracks]

    # taste: share of the user's listens in the track's genres / by its artists
    user_events = lengths.astype(np.float32)
    for name, attr in (("genre_share", t.genres), ("artist_share", t.artists)):
        user_attr = (heard_matrix @ attr).tocsr()
        user_attr = sp.diags(1.0 / np.maximum(user_events, 1)) @ user_attr
        f[name][:] = _max_over_attributes(user_attr.tocsr(), attr, local, tracks)

    # user activity
    day_keys = np.unique(h_local.astype(np.int64) << 16 | (h_days - h_days.min()
                                                          if h_days.size else h_days))
    n_days = np.bincount((day_keys >> 16).astype(np.int64), minlength=b).astype(np.float32)
    recent_events = np.bincount(
        h_local[h_days >= hist.cutoff - settings.popular_window_days], minlength=b)
    last_day = np.full(b, hist.cutoff - 1, dtype=np.int32)
    nonempty = lengths > 0
    if nonempty.any():
        last_day[nonempty] = np.maximum.reduceat(h_days, local_indptr[:-1][nonempty])
    f["user_events"][:] = user_events[local]
    f["user_days"][:] = n_days[local]
    f["user_recent_events"][:] = recent_events[local].astype(np.float32)
    f["user_days_since_last"][:] = (hist.cutoff - last_day)[local].astype(np.float32)

    return Batch(users, local, tracks, pd.DataFrame(f, columns=FEATURES),
                 (s_local.astype(np.int32), s_tracks.astype(np.int32),
                  s_score.astype(np.float32)))


# --- training -----------------------------------------------------------------------------


def training_users(history: History, label_events: pd.DataFrame, settings: Settings) -> np.ndarray:
    """User codes (sorted) of users with history who listen in the label period, sampled down
    to ``settings.ranker_train_users`` with ``settings.seed``."""
    codes = history.users.codes(np.unique(label_events[C.user].to_numpy()))
    codes = codes[codes >= 0]
    if codes.size > settings.ranker_train_users:
        rng = np.random.default_rng(settings.seed)
        codes = rng.choice(codes, settings.ranker_train_users, replace=False)
    return np.sort(codes).astype(np.int64)


def label_keys(history: History, label_events: pd.DataFrame) -> np.ndarray:
    """Sorted (user code * n_tracks + track code) of label listens on known users and tracks."""
    u = history.users.codes(label_events[C.user].to_numpy())
    t = history.tracks.codes(label_events[C.track].to_numpy())
    ok = (u >= 0) & (t >= 0)
    return np.sort(u[ok].astype(np.int64) * history.n_tracks + t[ok])


def training_frame(
    ctx: RankContext,
    label_events: pd.DataFrame,
    settings: Settings,
    batch_users: int = 4000,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Features, 0/1 targets and user codes of the sampled training pairs.

    A pair is positive when the user listened to the track in the label period. Users without
    a positive candidate are dropped; each positive keeps ``settings.ranker_negatives`` random
    negatives of the same user.
    """
    users = training_users(ctx.history, label_events, settings)
    positives = label_keys(ctx.history, label_events)
    rng = np.random.default_rng(settings.seed)
    frames, targets, groups = [], [], []
    n_candidates = n_pos_total = 0
    for start in tqdm(range(0, users.size, batch_users), desc="ranker training pairs",
                      unit="batch", mininterval=2):
        batch = candidates(ctx, users[start:start + batch_users], settings)
        user_codes = batch.users[batch.local]
        keys = user_codes.astype(np.int64) * ctx.history.n_tracks + batch.track_codes
        pos = np.searchsorted(positives, keys)
        pos = np.minimum(pos, max(positives.size - 1, 0))
        target = (positives[pos] == keys) if positives.size else np.zeros(keys.size, bool)
        n_candidates += keys.size
        n_pos = np.bincount(batch.local, weights=target, minlength=batch.users.size)
        # sample negatives: random order within user, keep ratio * positives of that user
        random_key = rng.random(keys.size)
        neg = np.flatnonzero(~target & (n_pos[batch.local] > 0))
        order = neg[np.lexsort((random_key[neg], batch.local[neg]))]
        grp = batch.local[order]
        starts = np.r_[True, grp[1:] != grp[:-1]] if grp.size else np.zeros(0, bool)
        first = np.maximum.accumulate(np.where(starts, np.arange(grp.size), 0))
        keep_neg = order[np.arange(grp.size) - first < settings.ranker_negatives * n_pos[grp]]
        chosen = np.sort(np.concatenate([np.flatnonzero(target), keep_neg]))
        n_pos_total += int(target.sum())
        frames.append(batch.features.iloc[chosen])
        targets.append(target[chosen].astype(np.int8))
        groups.append(user_codes[chosen])
    if n_pos_total == 0:
        raise ValueError("no candidate was listened to in the label period: cannot train the "
                         "ranker (check the split dates and the candidate counts)")
    log.info("ranker training: %d users, %d candidates, %d positives (recall of candidates "
             "%.1f%% of label listens on known tracks)", users.size, n_candidates, n_pos_total,
             100.0 * n_pos_total / max(positives.size, 1))
    return (pd.concat(frames, ignore_index=True), np.concatenate(targets),
            np.concatenate(groups))


def train_ranker(features: pd.DataFrame, target: np.ndarray, settings: Settings
                 ) -> CatBoostClassifier:
    """CatBoost classifier of 'listened in the next period' over the candidate features."""
    model = CatBoostClassifier(
        iterations=settings.ranker_iterations,
        random_seed=settings.seed,
        thread_count=settings.threads,
        verbose=False,
        allow_writing_files=False,
    )
    started = time.perf_counter()
    model.fit(features, target)
    log.info("CatBoost: %d pairs (%.1f%% positive), %d iterations in %.1f s", len(target),
             100.0 * target.mean(), settings.ranker_iterations, time.perf_counter() - started)
    importance = sorted(
        zip(model.get_feature_importance(), features.columns, strict=True), reverse=True
    )
    log.info("feature importance: %s",
             ", ".join(f"{name} {value:.1f}" for value, name in importance[:8]))
    return model


# --- final lists ------------------------------------------------------------------------------


def rank_users(
    ctx: RankContext,
    model: CatBoostClassifier,
    settings: Settings,
    users: np.ndarray | None = None,
    batch_users: int = 4000,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ranked top-``settings.n_recommendations`` for user codes ``users`` (default: every user
    of the history) and the similar-to-recent list, both in the recs schema with input ids."""
    if users is None:
        users = np.arange(ctx.history.n_users, dtype=np.int64)
    users = np.asarray(users, dtype=np.int64)
    user_ids, track_ids = ctx.history.users.ids, ctx.history.tracks.ids
    recs, sims = [], []
    for start in tqdm(range(0, users.size, batch_users), desc="ranking", unit="batch",
                      mininterval=2):
        batch = candidates(ctx, users[start:start + batch_users], settings)
        score = model.predict_proba(batch.features)[:, 1].astype(np.float32)
        top, _ = top_k_per_group(batch.local, score, settings.n_recommendations)
        recs.append((user_ids[batch.users[batch.local[top]]], track_ids[batch.track_codes[top]],
                     score[top]))
        s_local, s_tracks, s_score = batch.similar_recent
        sims.append((user_ids[batch.users[s_local]], track_ids[s_tracks], s_score))

    def frame(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> pd.DataFrame:
        if not parts:
            return recs_frame(np.zeros(0, np.int32), np.zeros(0, np.int32),
                              np.zeros(0, np.float32))
        return recs_frame(*(np.concatenate([p[i] for p in parts]) for i in range(3)))

    return frame(recs), frame(sims)
