"""Candidate sources: one contract test run on every source of SOURCES (on generated data),
plus hand-computed checks of what each source computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from implicit.cpu.als import AlternatingLeastSquares

from musicrec import io
from musicrec.features import build_history
from musicrec.settings import Settings
from musicrec.sources import SOURCES, Lists, TrainData, make_source

SETTINGS = Settings(als_iterations=3, ease_max_items=500, threads=1, seed=3)


def small_params(name: str) -> dict:
    """The source's first configuration, made cheap for tests."""
    params = dict(SOURCES[name].space(SETTINGS)[0])
    if name == "als":
        params["factors"] = 8
    return params


@pytest.fixture(scope="module")
def tiny(tiny_prepared: Path) -> tuple[pd.DataFrame, pa.Table, int]:
    events = io.read_events(tiny_prepared / io.EVENTS)
    items = pq.read_table(tiny_prepared / io.ITEMS, columns=["track_id", "genre_ids",
                                                             "artist_ids"])
    days = events["day"].to_numpy()
    cutoff = int(np.quantile(days, 0.9))
    return events, items, cutoff


def _data(events: pd.DataFrame, items: pa.Table, cutoff: int) -> TrainData:
    before = events[events["day"].to_numpy() < cutoff].reset_index(drop=True)
    return TrainData.build(build_history(before, cutoff), items)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_contract(name: str, tiny: tuple[pd.DataFrame, pa.Table, int]) -> None:
    events, items, cutoff = tiny
    data = _data(events, items, cutoff)
    h = data.history
    users = np.arange(0, h.n_users, 3, dtype=np.int64)
    lists = make_source(name, SETTINGS, small_params(name)).fit(data).recommend(users, 20)
    assert lists.n_users == users.size
    assert np.all(np.diff(lists.indptr) <= 20)
    assert np.diff(lists.indptr).sum() > 0, "a source must propose something"
    local = lists.local()
    # unheard: no entry is in the user's history
    heard = set(zip(np.repeat(np.arange(h.n_users), h.counts()).tolist(),
                    h.track_codes.tolist(), strict=True))
    assert not any((int(users[u]), int(t)) in heard
                   for u, t in zip(local, lists.tracks, strict=True))
    # no duplicates, best first, ranks from 1
    keys = local.astype(np.int64) * h.n_tracks + lists.tracks
    assert np.unique(keys).size == keys.size
    same = local[1:] == local[:-1]
    assert np.all(lists.scores[1:][same] <= lists.scores[:-1][same])
    assert np.all(lists.ranks()[np.r_[True, ~same]] == 1)
    # no later period seen: events after the cut-off change nothing
    later = events[events["day"].to_numpy() >= cutoff].copy()
    later["track_id"] = later["track_id"].to_numpy()[::-1]
    noisy = pd.concat([events, later], ignore_index=True)
    again = make_source(name, SETTINGS, small_params(name)).fit(
        _data(noisy, items, cutoff)).recommend(users, 20)
    np.testing.assert_array_equal(again.tracks, lists.tracks)
    np.testing.assert_array_equal(again.indptr, lists.indptr)


def _hand_history(rows: list[tuple[int, int, int]], cutoff: int = 20,
                  artists: dict[int, list[int]] | None = None) -> TrainData:
    user, track, day = zip(*rows, strict=True)
    events = pd.DataFrame({"user_id": np.array(user, np.int32),
                           "track_id": np.array(track, np.int32),
                           "day": np.array(day, np.int16)})
    items = None
    if artists is not None:
        ids = sorted(artists)
        items = pa.table({"track_id": pa.array(ids, pa.int32()),
                          "artist_ids": pa.array([artists[i] for i in ids],
                                                 pa.list_(pa.int64())),
                          "genre_ids": pa.array([[1] for _ in ids], pa.list_(pa.int64()))})
    return TrainData.build(build_history(events, cutoff), items)


def random_rows(seed: int, users: int, tracks: int, n: int) -> list[tuple[int, int, int]]:
    """``n`` random (user, track, day) events over 20 days."""
    rng = np.random.default_rng(seed)
    return list(zip(rng.integers(0, users, n).tolist(), rng.integers(0, tracks, n).tolist(),
                    rng.integers(0, 20, n).tolist(), strict=True))


def test_popular_counts_recent_listeners_then_all_time() -> None:
    # tracks 10 (3 old listeners), 11 (2 recent), 12 (1 recent); user 4 heard 11
    data = _hand_history([(1, 10, 0), (2, 10, 1), (3, 10, 2), (1, 11, 18), (4, 11, 19),
                          (2, 12, 19)])
    source = make_source("popular", SETTINGS, {"window": 0.1}).fit(data)  # 2-day window
    codes = data.history.tracks.codes(np.array([11, 12, 10]))
    np.testing.assert_array_equal(source.order, codes)
    lists = source.recommend(data.history.users.codes(np.array([4])).astype(np.int64), 5)
    np.testing.assert_array_equal(data.history.tracks.ids[lists.tracks], [12, 10])


def test_als_alpha_zero_is_plain_implicit_on_the_binary_matrix() -> None:
    data = _hand_history(random_rows(seed=0, users=30, tracks=40, n=400))
    params = {"factors": 4, "regularization": 0.01, "alpha": 0.0, "half_life": None}
    ours = make_source("als", SETTINGS, params).fit(data).model.model
    plain = AlternatingLeastSquares(factors=4, regularization=0.01, iterations=3,
                                    random_state=SETTINGS.seed, num_threads=1)
    plain.fit(data.binary(), show_progress=False)
    np.testing.assert_allclose(ours.item_factors, plain.item_factors, rtol=1e-4, atol=1e-5)


def test_als_confidence_is_one_plus_alpha_times_strength() -> None:
    data = _hand_history([(1, 10, 19), (1, 11, 9), (2, 10, 19), (2, 12, 8), (2, 13, 10),
                          (2, 14, 11)], cutoff=20)
    source = make_source("als", SETTINGS, {"factors": 2, "regularization": 0.1, "alpha": 4.0,
                                           "half_life": 0.5}).fit(data)
    # daily dates, span 12 days -> half-life 6 days; ages 0 and 10 days
    matrix = source.model.user_items.toarray()
    expected = 1 + 4 * 0.5 ** (10 / 6)
    assert matrix[0, data.history.tracks.codes(np.array([10]))[0]] == pytest.approx(5.0)
    assert matrix[0, data.history.tracks.codes(np.array([11]))[0]] == pytest.approx(expected,
                                                                                    rel=1e-5)


def test_item_knn_scores_are_weighted_sums_of_neighbour_similarities() -> None:
    data = _hand_history(random_rows(seed=1, users=40, tracks=25, n=500))
    source = make_source("item_knn", SETTINGS, {"weighting": "cosine", "neighbours": 100,
                                                "half_life": None}).fit(data)
    x = data.binary().toarray()
    norms = np.sqrt((x ** 2).sum(axis=0))
    cosine = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(cosine, 0)
    np.testing.assert_allclose(source.similarity.toarray(), cosine, rtol=1e-4, atol=1e-6)
    user = np.array([0], np.int64)
    lists = source.recommend(user, 3)
    heard_on_days = data.history.matrix().toarray()[0]  # a track heard on two days weighs 2
    expected = heard_on_days @ cosine
    expected[x[0] > 0] = -np.inf
    best = np.argsort(-expected, kind="stable")[:3]
    np.testing.assert_allclose(lists.scores, expected[best], rtol=1e-4)


def test_ease_matches_the_closed_form() -> None:
    data = _hand_history(random_rows(seed=2, users=50, tracks=20, n=600))
    source = make_source("ease", SETTINGS, {"l2": 10.0}).fit(data)
    x = data.binary().toarray()
    p = np.linalg.inv(x.T @ x + 10.0 * np.eye(x.shape[1]))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0)
    np.testing.assert_allclose(source.weights, b, rtol=1e-4, atol=1e-6)


def test_artist_source_ranks_unheard_tracks_of_played_artists() -> None:
    # user 1 plays artist 100 twice and artist 200 once; tracks 12 (artist 100, 2 listeners),
    # 13 (artist 100, 1 listener), 22 (artist 200, 2 listeners), 30 (artist 300)
    rows = [(1, 10, 15), (1, 11, 16), (1, 20, 17),
            (2, 12, 18), (3, 12, 18), (4, 13, 18), (2, 22, 18), (3, 22, 18),
            (5, 30, 18)]
    artists = {10: [100], 11: [100], 12: [100], 13: [100], 20: [200], 22: [200], 30: [300]}
    data = _hand_history(rows, artists=artists)
    source = make_source("artist", SETTINGS, {"window": None, "per_artist": 30}).fit(data)
    lists = source.recommend(data.history.users.codes(np.array([1])).astype(np.int64), 5)
    got = data.history.tracks.ids[lists.tracks]
    # 12: 2/3 * log1p(2) = .73, 13: 2/3 * log1p(1) = .46, 22: 1/3 * log1p(2) = .37
    np.testing.assert_array_equal(got, [12, 13, 22])
    assert 30 not in got


def test_lists_head_and_ranks() -> None:
    lists = Lists(np.array([0, 3, 3, 5]), np.array([5, 6, 7, 8, 9], np.int32),
                  np.array([3, 2, 1, 2, 1], np.float32))
    np.testing.assert_array_equal(lists.ranks(), [1, 2, 3, 1, 2])
    head = lists.head(2)
    np.testing.assert_array_equal(head.indptr, [0, 2, 2, 4])
    np.testing.assert_array_equal(head.tracks, [5, 6, 8, 9])
