"""Candidates and features on a hand-built context: no duplicate pairs, no label/test data,
hand-computed feature values; training pairs and final lists."""

import numpy as np
import pandas as pd
import pytest

from musicrec.features import build_history
from musicrec.popular import top_popular
from musicrec.ranker import (
    FEATURES,
    MISSING_RANK,
    build_context,
    candidates,
    rank_users,
    train_ranker,
    training_frame,
)
from musicrec.settings import Settings

SETTINGS = Settings(n_similar_candidates=5, n_popular_candidates=2, ranker_recent_tracks=2,
                    popular_window_days=5, ranker_negatives=1, ranker_iterations=5,
                    n_recommendations=2, threads=1, seed=3)
CUTOFF = 110  # history = days before 110; the label period starts on day 110


def frame(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    user, track, day = zip(*rows, strict=True)
    return pd.DataFrame({"user_id": np.array(user, np.int32),
                         "track_id": np.array(track, np.int32),
                         "day": np.array(day, np.int16)})


HISTORY = frame([(1, 10, 100), (1, 11, 101), (1, 12, 105),
                 (2, 10, 102), (2, 13, 108),
                 (3, 14, 109)])
# label period: 15 is first heard here; user 3 listens to a track that is not its candidate
LABEL = frame([(1, 13, 110), (1, 15, 111), (2, 11, 112), (3, 11, 113)])
ITEMS = pd.DataFrame({
    "track_id": np.array([10, 11, 12, 13, 14, 15], np.int32),
    "genre_ids": [[1], [1, 2], [2], [1], [3], [1]],
    "artist_ids": [[100], [100], [101], [102], [103], [100]],
})
ALS_CANDIDATES = pd.DataFrame({
    "user_id": np.array([1, 1, 2, 2, 3], np.int32),
    "track_id": np.array([13, 14, 11, 12, 10], np.int32),
    "score": np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32),
    "rank": np.array([1, 2, 1, 2, 1], np.int16),
})
SIMILAR = pd.DataFrame({
    "track_id": np.array([10, 10, 11, 11, 12, 13, 14], np.int32),
    "similar_track_id": np.array([11, 13, 10, 13, 14, 10, 12], np.int32),
    "score": np.array([0.9, 0.5, 0.9, 0.4, 0.3, 0.5, 0.3], np.float32),
    "rank": np.array([1, 2, 1, 2, 1, 1, 1], np.int16),
})
USER_FACTORS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)  # users 1, 2, 3
ITEM_FACTORS = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8], [0.9, 1.0]],
                        np.float32)  # tracks 10..14


def context():
    history = build_history(HISTORY, CUTOFF)
    popular = top_popular(HISTORY, SETTINGS.popular_window_days, CUTOFF - 1)
    return build_context(history, USER_FACTORS, ITEM_FACTORS, history.users.ids,
                         history.tracks.ids, ALS_CANDIDATES, SIMILAR, popular, ITEMS, SETTINGS)


def pairs_of(batch, ctx) -> pd.DataFrame:
    out = batch.features.copy()
    out.insert(0, "user_id", ctx.history.users.ids[batch.users[batch.local]])
    out.insert(1, "track_id", ctx.history.tracks.ids[batch.track_codes])
    return out.set_index(["user_id", "track_id"])


def test_candidates_union_without_duplicates_or_heard_tracks() -> None:
    ctx = context()
    pairs = pairs_of(candidates(ctx, np.arange(3), SETTINGS), ctx)
    assert pairs.index.is_unique
    assert sorted(pairs.index) == [(1, 13), (1, 14), (2, 11), (2, 12), (2, 14),
                                   (3, 10), (3, 12), (3, 13)]
    heard = set(zip(HISTORY["user_id"], HISTORY["track_id"], strict=True))
    assert not heard & set(pairs.index)


def test_features_hand_computed() -> None:
    ctx = context()
    pairs = pairs_of(candidates(ctx, np.arange(3), SETTINGS), ctx)
    row = pairs.loc[(1, 13)]
    assert row["als_score"] == pytest.approx(0.7)  # (1, 0) . (0.7, 0.8)
    assert row["als_rank"] == 1
    assert row["sim_score"] == pytest.approx(0.4)  # recent 11 -> 13 (0.4); 12 does not point
    assert (row["sim_count"], row["sim_max"], row["sim_rank"]) == (1, pytest.approx(0.4), 1)
    # popularity over days 105..109: 12, 13, 14 one listener each; then 10 (2), 11 (1)
    assert row["pop_rank"] == 2
    assert (row["track_listeners"], row["track_recent_listeners"], row["track_trend"]) == (1, 1, 1)
    assert row["track_age_days"] == 2  # first heard on day 108
    assert row["genre_share"] == pytest.approx(2 / 3)  # genre 1: tracks 10 and 11 of 3
    assert row["artist_share"] == 0
    assert (row["user_events"], row["user_days"], row["user_recent_events"]) == (3, 3, 1)
    assert row["user_days_since_last"] == 5
    assert row["n_sources"] == 3
    # (2, 11): ALS and similar (recent 10 -> 11, 0.9), not popular enough for user 2's top 2
    row = pairs.loc[(2, 11)]
    assert (row["als_rank"], row["sim_score"], row["n_sources"]) == (1, pytest.approx(0.9), 2)
    assert row["pop_rank"] == 5
    assert row["genre_share"] == pytest.approx(1.0)  # user 2: genre 1 in both tracks (max)
    assert row["artist_share"] == pytest.approx(0.5)  # artist 100 (track 10) of 2 tracks
    # (3, 13): only popular
    row = pairs.loc[(3, 13)]
    assert (row["als_rank"], row["sim_rank"], row["sim_score"]) == (MISSING_RANK, MISSING_RANK, 0)
    assert row["als_score"] == pytest.approx(1.5)


def test_features_do_not_see_the_label_period() -> None:
    ctx = context()
    assert 15 not in ctx.history.tracks.ids  # first heard in the label period: no candidate
    pairs = pairs_of(candidates(ctx, np.arange(3), SETTINGS), ctx)
    # 13 is heard again in the label period, but its popularity is the history's
    assert pairs.loc[(1, 13), "track_listeners"] == 1
    assert pairs["user_days_since_last"].min() >= 1
    assert (pairs["track_age_days"] >= 1).all()


def test_training_pairs_drop_users_without_positives_and_sample_negatives() -> None:
    ctx = context()
    features, target, groups = training_frame(ctx, LABEL, SETTINGS)
    users = ctx.history.users.ids[groups]
    # user 3's label listen (11) is not among its candidates: dropped; one negative per positive
    assert sorted(users.tolist()) == [1, 1, 2, 2]
    assert target.sum() == 2
    assert list(features.columns) == FEATURES
    for user in (1, 2):
        assert target[users == user].tolist().count(1) == 1


def test_final_lists_are_unheard_ranked_and_capped() -> None:
    ctx = context()
    features, target, _ = training_frame(ctx, LABEL, SETTINGS)
    model = train_ranker(features, target, SETTINGS)
    recs, similar_recent = rank_users(ctx, model, SETTINGS)
    assert recs["user_id"].tolist() == [1, 1, 2, 2, 3, 3]
    assert recs["rank"].tolist() == [1, 2] * 3
    heard = set(zip(HISTORY["user_id"], HISTORY["track_id"], strict=True))
    assert not heard & set(zip(recs["user_id"], recs["track_id"], strict=True))
    assert recs.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert similar_recent[similar_recent["user_id"] == 1]["track_id"].tolist() == [13, 14]
