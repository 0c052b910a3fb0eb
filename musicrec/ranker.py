"""The union of every source's candidates, features for each (user, track) pair, and a
CatBoost ranker that orders each user's candidates.

Features are named after the sources (``als_score``, ``item_knn_rank`` …, see
``feature_names``) and normalised within each user (rank, score / the user's best score of
that source), plus taste features: the user's share of listening on the track's artist and
genre, the user's mainstreamness, the track's rank within its artist by recent listeners.

The ranker (``CatBoostRanker`` with YetiRank, grouped by user) is trained on candidates of
models fitted before the validation period, labelled by it, with early stopping on other
users; it is applied to the candidates of models fitted the same way on a later cut-off.
Work is done per batch of users, so memory stays flat at full scale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from catboost import CatBoostRanker, Pool
from tqdm.auto import tqdm

from musicrec.arrays import distinct, gather_rows, in_sorted, rank_in_groups
from musicrec.selection import Truth
from musicrec.settings import Settings
from musicrec.sources import Lists, Source, TrainData, join_lists

log = logging.getLogger(__name__)

PER_SOURCE = ("score", "rank", "norm")
GENERAL = (
    "n_sources",
    "track_listeners",
    "track_recent_listeners",
    "track_trend",
    "track_age_days",
    "track_rank_in_artist",
    "artist_share",
    "genre_share",
    "user_events",
    "user_days_active_span",
    "user_days_since_last",
    "user_mainstream",
)
RECENT_FRACTION = 1 / 12  # the "recent" window of the track features, as a share of the span


def feature_names(sources: dict[str, Source]) -> list[str]:
    """Feature columns for these sources, in order."""
    names = [f"{name}_{suffix}" for name in sources for suffix in PER_SOURCE]
    names += [
        f"{name}_pair"
        for name, src in sources.items()
        if type(src).pair_scores is not Source.pair_scores
    ]
    return names + list(GENERAL)


@dataclass
class TrackFeatures:
    """Per-track features of one ``TrainData``, aligned with its track codes."""

    listeners: np.ndarray
    recent: np.ndarray
    first_day: np.ndarray
    rank_in_artist: np.ndarray

    @classmethod
    def build(cls, data: TrainData) -> TrackFeatures:
        h = data.listens
        listeners = data.listeners(None)
        recent = data.listeners(data.window(RECENT_FRACTION))
        first_day = np.full(h.n_tracks, np.iinfo(np.int32).max, dtype=np.int32)
        np.minimum.at(first_day, h.track_codes, h.days.astype(np.int32))
        # rank within each of its artists by recent then all-time listeners; best over artists
        by_artist = data.artists.T.tocoo()
        order = np.lexsort((-listeners[by_artist.col], -recent[by_artist.col], by_artist.row))
        rows = by_artist.row[order]
        rank = np.full(h.n_tracks, np.nan, dtype=np.float32)
        if rows.size:
            rank_values = (rank_in_groups(rows) + 1).astype(np.float32)
            tracks = by_artist.col[order]
            best = np.full(h.n_tracks, np.inf, dtype=np.float32)
            np.minimum.at(best, tracks, rank_values)
            rank = np.where(np.isfinite(best), best, np.nan).astype(np.float32)
        return cls(listeners, recent, first_day, rank)


def _max_over_attributes(
    user_attr: sp.csr_matrix, track_attr: sp.csr_matrix, local: np.ndarray, tracks: np.ndarray
) -> np.ndarray:
    """For each pair, the largest value of ``user_attr[local]`` over the track's attributes."""
    positions, pair = gather_rows(track_attr.indptr, tracks)
    out = np.zeros(local.size, dtype=np.float32)
    if positions.size:
        values = np.asarray(user_attr[local[pair], track_attr.indices[positions]]).ravel()
        np.maximum.at(out, pair, values.astype(np.float32))
    return out


@dataclass
class Candidates:
    """The union of the sources' lists for a batch of users, one row per (user, track)."""

    lists: dict[str, Lists]  # each source's list (longer than the candidates when asked)
    local: np.ndarray  # int32 batch row of each pair, ascending
    tracks: np.ndarray  # int32 track codes
    features: pd.DataFrame


def candidates(
    data: TrainData,
    sources: dict[str, Source],
    track_features: TrackFeatures,
    users: np.ndarray,
    n: int,
    longer: Mapping[str, int] | None = None,
) -> Candidates:
    """Top-``n`` of every source for the user codes ``users`` (sorted), merged, with features.

    A source named in ``longer`` is asked once for that many (when more than ``n``): its
    candidates are the head of that list, and ``Candidates.lists`` keeps the whole of it, so
    a caller who also needs the source's own longer list does not compute it twice."""
    h, n_tracks = data.listens, data.listens.n_tracks
    longer = longer or {}
    full = {
        name: src.recommend(users, max(n, longer.get(name, n))) for name, src in sources.items()
    }
    lists = {name: lst.head(n) if longer.get(name, n) > n else lst for name, lst in full.items()}
    keys = np.concatenate(
        [lst.local().astype(np.int64) * n_tracks + lst.tracks for lst in lists.values()]
    )
    union = distinct(keys)
    inverse = np.searchsorted(union, keys)
    local = (union // n_tracks).astype(np.int32)
    tracks = (union % n_tracks).astype(np.int32)
    f: dict[str, np.ndarray] = {}
    n_sources = np.zeros(union.size, dtype=np.float32)
    offset = 0
    for name, lst in lists.items():
        idx = inverse[offset : offset + lst.tracks.size]
        offset += lst.tracks.size
        for suffix in PER_SOURCE:
            f[f"{name}_{suffix}"] = np.full(union.size, np.nan, dtype=np.float32)
        f[f"{name}_score"][idx] = lst.scores
        f[f"{name}_rank"][idx] = lst.ranks()
        best = np.zeros(users.size, dtype=np.float32)
        lengths = np.diff(lst.indptr)
        best[lengths > 0] = np.abs(lst.scores[lst.indptr[:-1][lengths > 0]])
        f[f"{name}_norm"][idx] = lst.scores / np.maximum(best[lst.local()], 1e-12)
        n_sources[idx] += 1
    for name, src in sources.items():
        pair = src.pair_scores(users, local, tracks)
        if pair is not None:
            f[f"{name}_pair"] = pair.astype(np.float32)
    f["n_sources"] = n_sources

    t = track_features
    f["track_listeners"] = np.log1p(t.listeners[tracks])
    f["track_recent_listeners"] = np.log1p(t.recent[tracks])
    f["track_trend"] = t.recent[tracks] / np.maximum(t.listeners[tracks], 1)
    f["track_age_days"] = (h.cutoff - t.first_day[tracks]).astype(np.float32)
    f["track_rank_in_artist"] = t.rank_in_artist[tracks]

    for name, attribute in (("artist_share", "artists"), ("genre_share", "genres")):
        f[name] = _max_over_attributes(
            data.shares(users, attribute), getattr(data, attribute), local, tracks
        )

    starts, ends = h.indptr[users], h.indptr[users + 1]
    positions, owner = gather_rows(h.indptr, users)
    days = h.days[positions].astype(np.int32)
    # every user of a history has an event, so both are set for each
    first_day = np.full(users.size, h.cutoff, dtype=np.int32)
    last_day = np.full(users.size, np.iinfo(np.int32).min, dtype=np.int32)
    np.minimum.at(first_day, owner, days)
    np.maximum.at(last_day, owner, days)
    mainstream = np.bincount(
        owner, weights=np.log1p(t.listeners[h.track_codes[positions]]), minlength=users.size
    ) / np.maximum(ends - starts, 1)
    f["user_events"] = (ends - starts)[local].astype(np.float32)
    f["user_days_active_span"] = (last_day - first_day + 1)[local].astype(np.float32)
    f["user_days_since_last"] = (h.cutoff - last_day)[local].astype(np.float32)
    f["user_mainstream"] = mainstream[local].astype(np.float32)
    columns = feature_names(sources)
    return Candidates(full, local, tracks, pd.DataFrame({c: f[c] for c in columns}))


# --- training ---------------------------------------------------------------------------


@dataclass
class TrainingSet:
    features: pd.DataFrame
    target: np.ndarray  # int8
    group: np.ndarray  # user code of each row (rows grouped by user)

    def pool(self) -> Pool:
        return Pool(self.features, label=self.target, group_id=self.group)


def training_set(
    data: TrainData,
    sources: dict[str, Source],
    truth: Truth,
    settings: Settings,
    sample_negatives: bool = True,
    batch_users: int = 2000,
) -> TrainingSet:
    """Candidates of ``truth``'s users labelled by their validation listens. Users without a
    positive candidate are dropped (they teach a ranker nothing); with ``sample_negatives``
    each user keeps ``settings.ranker_negatives`` random negatives per positive."""
    rng = np.random.default_rng(settings.seed)
    track_features = TrackFeatures.build(data)
    frames, targets, groups = [], [], []
    n_pairs = n_pos = 0
    for start in range(0, truth.users.size, batch_users):
        users = truth.users[start : start + batch_users]
        cand = candidates(data, sources, track_features, users, settings.n_candidates)
        keys = (cand.local.astype(np.int64) + start) * truth.n_tracks + cand.tracks
        target = in_sorted(truth.keys, keys)
        positives = np.bincount(cand.local, weights=target, minlength=users.size)
        keep = positives[cand.local] > 0
        if sample_negatives:
            noise = rng.random(keys.size)
            neg = np.flatnonzero(~target & keep)
            order = neg[np.lexsort((noise[neg], cand.local[neg]))]
            grp = cand.local[order]
            chosen = order[rank_in_groups(grp) < settings.ranker_negatives * positives[grp]]
            keep = np.zeros(keys.size, dtype=bool)
            keep[chosen] = True
            keep |= target
        rows = np.flatnonzero(keep)
        n_pairs += keys.size
        n_pos += int(target.sum())
        frames.append(cand.features.iloc[rows])
        targets.append(target[rows].astype(np.int8))
        groups.append(users[cand.local[rows]])
    if not frames or n_pos == 0:
        return TrainingSet(
            pd.DataFrame(columns=feature_names(sources)),
            np.zeros(0, np.int8),
            np.zeros(0, np.int64),
        )
    log.info(
        "ranker pairs: %d users, %d candidates, %d positives (%.1f%% of their %d "
        "validation listens)",
        truth.users.size,
        n_pairs,
        n_pos,
        100.0 * n_pos / max(truth.keys.size, 1),
        truth.keys.size,
    )
    return TrainingSet(
        pd.concat(frames, ignore_index=True), np.concatenate(targets), np.concatenate(groups)
    )


def train_ranker(
    train: TrainingSet, stop: TrainingSet, settings: Settings
) -> CatBoostRanker | None:
    """YetiRank over users' candidate groups, early-stopped on other users' groups; None
    when there is too little to learn from (fewer than ``settings.ranker_min_positives``)."""
    positives = int(train.target.sum())
    if positives < settings.ranker_min_positives or int(stop.target.sum()) == 0:
        log.info(
            "ranker: %d training positives (need %d) and %d early-stopping positives: not trained",
            positives,
            settings.ranker_min_positives,
            int(stop.target.sum()),
        )
        return None
    model = CatBoostRanker(
        loss_function="YetiRank",
        eval_metric="NDCG:top=10",
        iterations=settings.ranker_iterations,
        learning_rate=settings.ranker_learning_rate,
        random_seed=settings.seed,
        thread_count=settings.threads,
        verbose=False,
        allow_writing_files=False,
    )
    started = time.perf_counter()
    model.fit(train.pool(), eval_set=stop.pool(), early_stopping_rounds=50, use_best_model=True)
    log.info(
        "CatBoostRanker: %d pairs, %d positives, best iteration %d of %d (learning rate %g) "
        "in %.1f s",
        len(train.target),
        positives,
        model.get_best_iteration(),
        settings.ranker_iterations,
        settings.ranker_learning_rate,
        time.perf_counter() - started,
    )
    importance = sorted(
        zip(
            model.get_feature_importance(type="PredictionValuesChange"),
            train.features.columns,
            strict=True,
        ),
        reverse=True,
    )
    log.info(
        "feature importance: %s", ", ".join(f"{name} {value:.2f}" for value, name in importance[:8])
    )
    return model


def rank(
    model: CatBoostRanker,
    data: TrainData,
    sources: dict[str, Source],
    users: np.ndarray,
    n: int,
    n_candidates: int,
    batch_users: int = 2000,
    progress: bool = False,
    threads: int = 1,
) -> Lists:
    """The ranker's top-``n`` of the union of the sources' candidates, per user code."""
    return rank_with_lists(
        model, data, sources, users, n, n_candidates, {}, batch_users, progress, threads
    )[0]


def rank_with_lists(
    model: CatBoostRanker,
    data: TrainData,
    sources: dict[str, Source],
    users: np.ndarray,
    n: int,
    n_candidates: int,
    keep: Mapping[str, int],
    batch_users: int = 2000,
    progress: bool = False,
    threads: int = 1,
) -> tuple[Lists, dict[str, Lists]]:
    """``rank``, and the top-``keep[name]`` lists of the sources named in ``keep`` from the
    same pass (the candidates are their heads): the serve and evaluate stages write those
    lists too, and at full scale a second top-k pass over every user costs minutes.

    Batches run on ``threads`` threads: sorting, sparse products, the ANN search and
    CatBoost release the GIL, so two threads keep two cores busy for most of a batch."""
    track_features = TrackFeatures.build(data)

    def one(start: int) -> tuple[Lists, dict[str, Lists]]:
        batch = users[start : start + batch_users]
        cand = candidates(data, sources, track_features, batch, n_candidates, keep)
        score = model.predict(cand.features, thread_count=1).astype(np.float32)
        kept = {name: cand.lists[name].head(size) for name, size in keep.items()}
        return Lists.best(batch.size, cand.local, cand.tracks, score, n), kept

    starts = range(0, users.size, batch_users)
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        parts = list(
            tqdm(
                pool.map(one, starts),
                total=len(starts),
                desc="ranking",
                unit="batch",
                disable=not progress,
                mininterval=2,
            )
        )
    return (
        join_lists([ranked for ranked, _ in parts]),
        {name: join_lists([kept[name] for _, kept in parts]) for name in keep},
    )
