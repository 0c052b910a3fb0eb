"""ALS through its source: the strength matrix, unheard recommendations with input ids,
determinism."""

import numpy as np
import pandas as pd
import pytest

from musicrec.als import AlsModel, recommend_als, recs_frame
from musicrec.listens import build_listens
from musicrec.settings import Settings
from musicrec.sources import TrainData, make_source

SETTINGS = Settings(als_iterations=10, threads=1, seed=7)
PARAMS = {"factors": 3, "regularization": 0.1, "alpha": 10.0, "half_life": None}


def fit_als(events: pd.DataFrame, settings: Settings, last_day: int) -> AlsModel:
    listens = build_listens(events, last_day + 1)
    return make_source("als", settings, PARAMS).fit(TrainData.build(listens, None)).model


def two_tastes(seed: int = 0) -> pd.DataFrame:
    """Users 500, 507, ... hear 6 of tracks 1001..1010 (first half) or 2001..2010 (second)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(60):
        base = 1000 if i < 30 else 2000
        for track in rng.choice(np.arange(base + 1, base + 11), 6, replace=False):
            rows.append((500 + 7 * i, int(track), 300 + int(rng.integers(0, 30))))
    user, track, day = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": np.array(user, np.int32),
            "track_id": np.array(track, np.int32),
            "day": np.array(day, np.int16),
        }
    )


def test_matrix_weights_decay_with_age() -> None:
    events = pd.DataFrame(
        {
            "user_id": np.array([5, 5, 9], np.int32),
            "track_id": np.array([70, 80, 70], np.int32),
            "day": np.array([100, 90, 80], np.int16),
        }
    )
    listens = build_listens(events, cutoff=101)  # last day 100
    matrix = listens.matrix(half_life_days=10.0).toarray()
    # rows: users 5, 9; columns: tracks 70, 80; ages 0, 10 and 20 days
    np.testing.assert_allclose(matrix, [[1.0, 0.5], [0.25, 0.0]], rtol=1e-6)


def test_matrix_sums_plays_and_days_of_one_track() -> None:
    events = pd.DataFrame(
        {
            "user_id": np.array([5, 5, 5], np.int32),
            "track_id": np.array([70, 80, 70], np.int32),
            "day": np.array([90, 95, 100], np.int16),
            "plays": np.array([3, 1, 2], np.int32),
        }
    )
    listens = build_listens(events, cutoff=101)
    np.testing.assert_allclose(listens.matrix().toarray(), [[5.0, 1.0]])
    np.testing.assert_allclose(listens.matrix(10.0).toarray(), [[3 * 0.5 + 2, 0.5**0.5]], rtol=1e-6)
    codes_before = listens.track_codes.copy()
    listens.matrix()
    np.testing.assert_array_equal(listens.track_codes, codes_before)  # not sorted in place


def test_recommendations_are_unheard_in_taste_and_use_input_ids() -> None:
    events = two_tastes()
    model = fit_als(events, SETTINGS, last_day=329)
    users = np.array([500, 500 + 7 * 45, 12345])  # 12345 has no events: skipped
    recs = recommend_als(model, users, n=3)
    assert set(recs["user_id"]) == {500, 815}
    assert recs.dtypes.astype(str).tolist() == ["int32", "int32", "float32", "int16"]
    heard = set(zip(events["user_id"], events["track_id"], strict=True))
    assert not any((u, t) in heard for u, t in zip(recs["user_id"], recs["track_id"], strict=True))
    first = recs[recs["user_id"] == 500]
    second = recs[recs["user_id"] == 815]
    assert first["track_id"].between(1001, 1010).all()  # same taste, not the other cluster
    assert second["track_id"].between(2001, 2010).all()
    assert first["rank"].tolist() == [1, 2, 3]
    assert (np.diff(first["score"].to_numpy()) <= 0).all()


def test_n_larger_than_unheard_tracks_returns_only_real_recommendations() -> None:
    events = two_tastes()
    model = fit_als(events, SETTINGS, last_day=329)
    recs = recommend_als(model, np.array([500]), n=50)
    assert len(recs) == 20 - 6  # 20 tracks, 6 heard
    assert recs["track_id"].is_unique


def test_same_seed_same_model() -> None:
    events = two_tastes()
    a = fit_als(events, SETTINGS, last_day=329)
    b = fit_als(events, SETTINGS, last_day=329)
    np.testing.assert_array_equal(a.model.item_factors, b.model.item_factors)
    np.testing.assert_array_equal(a.track_ids, np.r_[1001:1011, 2001:2011])


def test_recs_frame_sorts_and_ranks() -> None:
    recs = recs_frame(np.array([3, 1, 3]), np.array([7, 8, 9]), np.array([0.1, 0.5, 0.9]))
    assert recs["user_id"].tolist() == [1, 3, 3]
    assert recs["track_id"].tolist() == [8, 9, 7]
    assert recs["rank"].tolist() == [1, 1, 2]


def test_history_after_cutoff_is_refused() -> None:
    with pytest.raises(ValueError, match="at or after"):
        fit_als(two_tastes(), SETTINGS, last_day=310)
