"""The ranker's candidates and features on a hand-built history (no duplicate pairs, nothing
heard, hand-computed values), its training pairs, and the final lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from catboost import CatBoostRanker

from musicrec.listens import Listens, build_listens
from musicrec.ranker import (
    TrackFeatures,
    candidates,
    feature_names,
    rank,
    rank_with_lists,
    train_ranker,
    training_set,
)
from musicrec.selection import Truth
from musicrec.settings import Settings
from musicrec.sources import TrainData, make_source

SETTINGS = Settings(
    n_candidates=3,
    ranker_negatives=1,
    ranker_iterations=20,
    ranker_min_positives=1,
    threads=1,
    seed=3,
)
CUTOFF = 20

# user 1: tracks 10, 11 (artist 100), 20 (artist 200); users 2..5 make tracks popular
HISTORY = [
    (1, 10, 15),
    (1, 11, 16),
    (1, 20, 17),
    (2, 12, 18),
    (3, 12, 18),
    (4, 13, 18),
    (2, 22, 18),
    (3, 22, 18),
    (5, 30, 19),
    (5, 10, 19),
]
ARTISTS = {10: [100], 11: [100], 12: [100], 13: [100], 20: [200], 22: [200], 30: [300]}
LATER = [(1, 12, 21), (1, 30, 22), (2, 10, 21), (5, 99, 21)]  # 99: unknown track


def frame(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    user, track, day = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": np.array(user, np.int32),
            "track_id": np.array(track, np.int32),
            "day": np.array(day, np.int16),
        }
    )


def heard_pairs(listens: Listens) -> set[tuple[int, int]]:
    """Every (user code, track code) the log holds."""
    users = np.repeat(np.arange(listens.n_users), listens.counts())
    return set(zip(users.tolist(), listens.track_codes.tolist(), strict=True))


@pytest.fixture(scope="module")
def fitted() -> tuple[TrainData, dict]:
    ids = sorted(ARTISTS)
    items = pa.table(
        {
            "track_id": pa.array(ids, pa.int32()),
            "artist_ids": pa.array([ARTISTS[i] for i in ids], pa.list_(pa.int64())),
            "genre_ids": pa.array([[1] if i < 20 else [2] for i in ids], pa.list_(pa.int64())),
        }
    )
    data = TrainData.build(build_listens(frame(HISTORY), CUTOFF), items)
    sources = {
        "popular": make_source("popular", SETTINGS, {"window": None}).fit(data),
        "artist": make_source("artist", SETTINGS, {"window": None, "per_artist": 30}).fit(data),
    }
    return data, sources


def test_union_without_duplicates_or_heard_tracks(fitted: tuple[TrainData, dict]) -> None:
    data, sources = fitted
    users = np.arange(data.listens.n_users, dtype=np.int64)
    cand = candidates(data, sources, TrackFeatures.build(data), users, 3)
    keys = cand.local.astype(np.int64) * data.listens.n_tracks + cand.tracks
    assert np.unique(keys).size == keys.size
    heard = heard_pairs(data.listens)
    assert not any(
        (int(users[u]), int(t)) in heard for u, t in zip(cand.local, cand.tracks, strict=True)
    )
    assert list(cand.features.columns) == feature_names(sources)
    assert len(cand.features) == keys.size


def test_features_hand_computed(fitted: tuple[TrainData, dict]) -> None:
    data, sources = fitted
    h = data.listens
    user = h.users.codes(np.array([1])).astype(np.int64)
    cand = candidates(data, sources, TrackFeatures.build(data), user, 3)
    got = pd.DataFrame(cand.features).assign(track=h.tracks.ids[cand.tracks]).set_index("track")
    # popular (all-time listeners): 10 (2, heard), 12 (2), 22 (2), 11/13/20/30 (1); user 1
    # heard 10, 11, 20
    assert got.loc[12, "popular_rank"] == 1 and got.loc[22, "popular_rank"] == 2
    assert got.loc[12, "popular_norm"] == pytest.approx(1.0)
    # artist: 12 = 2/3 log1p(2), 13 = 2/3 log1p(1), 22 = 1/3 log1p(2): 12, 13, 22
    assert got.loc[12, "artist_rank"] == 1 and got.loc[13, "artist_rank"] == 2
    assert got.loc[13, "popular_rank"] == 3  # ties (1 listener) by track id: 13 before 30
    assert 30 not in got.index  # fourth for popular, not by a played artist
    assert got.loc[12, "n_sources"] == 2
    assert got.loc[12, "artist_share"] == pytest.approx(2 / 3)
    assert got.loc[22, "artist_share"] == pytest.approx(1 / 3)
    assert got.loc[12, "genre_share"] == pytest.approx(2 / 3)  # genre 1: tracks 10, 11
    assert got.loc[12, "track_listeners"] == pytest.approx(np.log1p(2))
    # artist 100 by recent listeners (last 2 days: 18, 19): 12 (2), 10 (1), 13 (1), 11 (0)
    assert got.loc[12, "track_rank_in_artist"] == 1
    assert got.loc[13, "track_rank_in_artist"] == 3
    assert got.loc[12, "user_events"] == 3
    assert got.loc[12, "user_days_since_last"] == CUTOFF - 17
    assert got.loc[12, "user_days_active_span"] == 3


def test_truth_keeps_unheard_known_tracks_only(fitted: tuple[TrainData, dict]) -> None:
    data, _ = fitted
    truth = Truth.build(data.listens, frame(LATER))
    h = data.listens
    # user 1: 12 and 30 (both unheard); user 2: 10 (unheard); user 5: only an unknown track
    np.testing.assert_array_equal(h.users.ids[truth.users], [1, 2])
    np.testing.assert_array_equal(truth.counts, [2, 1])


def test_training_pairs_keep_positive_users_and_sample_negatives(
    fitted: tuple[TrainData, dict],
) -> None:
    data, sources = fitted
    truth = Truth.build(data.listens, frame(LATER))
    train = training_set(data, sources, truth, SETTINGS)
    # each user with a positive keeps its positives and ranker_negatives (1) per positive
    assert train.target.sum() >= 1
    for user in np.unique(train.group):
        target = train.target[train.group == user]
        assert (target == 0).sum() <= SETTINGS.ranker_negatives * target.sum()
    assert np.all(np.diff(train.group) >= 0)  # grouped by user


def test_no_ranker_without_enough_positives(fitted: tuple[TrainData, dict]) -> None:
    data, sources = fitted
    truth = Truth.build(data.listens, frame(LATER))
    train = training_set(data, sources, truth, SETTINGS)
    strict = SETTINGS.model_copy(update={"ranker_min_positives": 1000})
    assert train_ranker(train, train, strict) is None


@pytest.fixture(scope="module")
def trained(fitted: tuple[TrainData, dict]) -> CatBoostRanker:
    """A ranker trained on the later listens of ``fitted``'s users."""
    data, sources = fitted
    truth = Truth.build(data.listens, frame(LATER))
    train = training_set(data, sources, truth, SETTINGS.model_copy(update={"ranker_negatives": 5}))
    model = train_ranker(train, train, SETTINGS)
    assert model is not None
    return model


def test_final_lists_are_unheard_ranked_and_capped(
    fitted: tuple[TrainData, dict], trained: CatBoostRanker
) -> None:
    data, sources = fitted
    model = trained
    users = np.arange(data.listens.n_users, dtype=np.int64)
    lists = rank(model, data, sources, users, 2, 3)
    assert np.all(np.diff(lists.indptr) <= 2)
    local = lists.local()
    same = local[1:] == local[:-1]
    assert np.all(lists.scores[1:][same] <= lists.scores[:-1][same])
    heard = heard_pairs(data.listens)
    assert not any(
        (int(users[u]), int(t)) in heard for u, t in zip(local, lists.tracks, strict=True)
    )


def test_one_pass_keeps_the_longer_source_lists_and_ranks_the_same(
    fitted: tuple[TrainData, dict], trained: CatBoostRanker
) -> None:
    data, sources = fitted
    model = trained
    users = np.arange(data.listens.n_users, dtype=np.int64)
    name = next(iter(sources))
    alone = rank(model, data, sources, users, 2, 2, batch_users=3)
    ranked, kept = rank_with_lists(model, data, sources, users, 2, 2, {name: 4}, batch_users=3)
    # the candidates are the head of the longer list, so the ranking does not change
    np.testing.assert_array_equal(ranked.indptr, alone.indptr)
    np.testing.assert_array_equal(ranked.tracks, alone.tracks)
    own = sources[name].recommend(users, 4)
    assert list(kept) == [name]
    np.testing.assert_array_equal(kept[name].indptr, own.indptr)
    np.testing.assert_array_equal(kept[name].tracks, own.tracks)
    assert np.diff(own.indptr).max() > 2  # the kept list is longer than the candidates
