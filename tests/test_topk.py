"""IVF top-k: exact when every cluster is probed, the heard filter, the short-list fallback,
and the cosine variant for similar tracks."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from musicrec import als as als_module
from musicrec.als import als_from_factors, item_index, recommend_codes
from musicrec.listens import build_listens
from musicrec.settings import Settings
from musicrec.similar import similar_tracks
from musicrec.sources import TrainData, make_source
from musicrec.topk import IvfIndex, default_nlist


def random_factors(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_default_nlist_keeps_clusters_populated() -> None:
    assert default_nlist(10) == 1
    assert default_nlist(1_600) == 100  # 16 items per cluster binds before 4 * sqrt(n) = 160
    assert default_nlist(1_000_000) == 4000


def test_inner_product_search_is_exact_when_every_cluster_is_probed() -> None:
    items = random_factors(500, 8, seed=1)
    items[7] *= 5  # a long vector: inner product must find it where cosine would not
    queries = random_factors(20, 8, seed=2)
    index = IvfIndex(items, metric="ip", nlist=10, nprobe=10)
    codes, scores = index.search(queries, k=5)
    exact = queries @ items.T
    expected = np.argsort(-exact, axis=1)[:, :5]
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, axis=1), rtol=1e-5)


def test_cosine_search_returns_cosines_best_first() -> None:
    items = np.array([[1, 0], [0.9, 0.1], [0, 3], [-1, 0]], np.float32)
    index = IvfIndex(items, metric="cosine", nlist=1, nprobe=1)
    codes, scores = index.search(items[:1] * 10, k=3)
    assert codes.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(scores[0], [1.0, 0.9 / np.hypot(0.9, 0.1), 0.0], atol=1e-6)


def test_probing_fewer_clusters_can_miss_but_scores_stay_exact() -> None:
    items = random_factors(2000, 8, seed=3)
    queries = random_factors(50, 8, seed=4)
    index = IvfIndex(items, metric="ip", nlist=40, nprobe=2)
    codes, scores = index.search(queries, k=10)
    exact = queries @ items.T
    found = codes >= 0
    np.testing.assert_allclose(
        scores[found],
        np.take_along_axis(exact, np.where(found, codes, 0), axis=1)[found],
        rtol=1e-5,
    )
    best = np.argsort(-exact, axis=1)[:, :10]
    recall = np.mean([len(set(c[c >= 0]) & set(b)) / 10 for c, b in zip(codes, best, strict=True)])
    assert 0.3 < recall <= 1.0


def test_bad_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="metric"):
        IvfIndex(random_factors(10, 2, 0), metric="l1")


def model_with_history(n_users: int = 30, n_tracks: int = 200, seed: int = 5):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users, dtype=np.int32) + 100, 12)
    tracks = np.concatenate([rng.choice(n_tracks, 12, replace=False) for _ in range(n_users)])
    events = pd.DataFrame(
        {
            "user_id": users,
            "track_id": (tracks + 1000).astype(np.int32),
            "day": np.full(users.size, 50, np.int16),
        }
    )
    history = build_listens(events, cutoff=51)
    settings = Settings(als_iterations=3, threads=1, seed=3, topk_method="exact")
    params = {"factors": 6, "regularization": 0.1, "alpha": 4.0, "half_life": None}
    source = make_source("als", settings, params).fit(TrainData.build(history, None))
    return source.model, history


def test_ann_recommendations_equal_exact_ones_when_every_cluster_is_probed() -> None:
    model, history = model_with_history()
    rows = np.arange(history.n_users)
    exact = recommend_codes(model, rows, 10, progress=False)
    index = IvfIndex(model.model.item_factors, nlist=8, nprobe=8)
    approx = recommend_codes(model, rows, 10, progress=False, index=index)
    np.testing.assert_array_equal(approx[0], exact[0])
    np.testing.assert_array_equal(approx[1], exact[1])
    np.testing.assert_allclose(approx[2], exact[2], rtol=1e-4, atol=1e-6)
    heard = set(zip(*np.nonzero(model.user_items.toarray()), strict=True))
    assert not any((r, t) in heard for r, t in zip(approx[0], approx[1], strict=True))


def test_short_ann_lists_fall_back_to_the_exact_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, history = model_with_history()
    rows = np.array([3, 0, 7, 12, 20])  # any order: results follow it
    exact = recommend_codes(model, rows, 10, progress=False)
    # ask the index for exactly n results: heard tracks eat into them, lists come out short
    monkeypatch.setattr(als_module, "_MAX_EXTRA", 0)
    index = IvfIndex(model.model.item_factors, nlist=8, nprobe=8)
    with caplog.at_level("INFO", logger="musicrec.als"):
        approx = recommend_codes(model, rows, 10, progress=False, index=index)
    assert "short ANN list, served exactly" in caplog.text
    np.testing.assert_array_equal(approx[0], np.repeat(rows, 10))
    np.testing.assert_array_equal(approx[1], exact[1])


def test_item_index_follows_the_settings() -> None:
    model, _ = model_with_history()
    assert item_index(model, Settings(topk_method="exact")) is None
    assert item_index(model, Settings(topk_method="auto", ann_min_tracks=10_000)) is None
    assert isinstance(item_index(model, Settings(topk_method="auto", ann_min_tracks=100)), IvfIndex)
    assert item_index(model, Settings(topk_method="ann"), "cosine").metric == "cosine"


def test_similar_tracks_with_a_full_probe_index_equal_exact_ones() -> None:
    items = random_factors(300, 6, seed=8)
    model = als_from_factors(
        np.ones((1, 6), np.float32),
        items,
        np.array([1], np.int32),
        np.arange(300, dtype=np.int32) * 3,
        None,
    )
    exact = similar_tracks(model, n=7)
    approx = similar_tracks(model, n=7, index=IvfIndex(items, "cosine", nlist=6, nprobe=6))
    pd.testing.assert_frame_equal(
        approx[["track_id", "similar_track_id", "rank"]],
        exact[["track_id", "similar_track_id", "rank"]],
    )
    np.testing.assert_allclose(approx["score"], exact["score"], atol=1e-5)
    assert (approx["track_id"] != approx["similar_track_id"]).all()


def test_short_ann_lists_scan_more_clusters_before_the_exact_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, history = model_with_history()
    rows = np.arange(history.n_users)
    # 8 probed clusters of 64 hold too few tracks for some users: they scan all 64
    index = IvfIndex(model.model.item_factors, nlist=64, nprobe=8)
    with caplog.at_level("INFO", logger="musicrec.als"):
        approx = recommend_codes(model, rows, 10, progress=False, index=index)
    assert "at nprobe 8, scanning 64" in caplog.text
    assert "served exactly" not in caplog.text
    np.testing.assert_array_equal(approx[0], np.repeat(rows, 10))  # every list full
    heard = set(zip(*np.nonzero(model.user_items.toarray()), strict=True))
    assert not any((r, t) in heard for r, t in zip(approx[0], approx[1], strict=True))
    assert all(np.all(np.diff(approx[2][approx[0] == r]) <= 0) for r in rows)


def test_mostly_short_ann_lists_go_straight_to_the_exact_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When most lists come out short the clustering does not suit the factors: a wider scan
    would cost more than the exact path, which serves them."""
    model, history = model_with_history()
    rows = np.arange(history.n_users)
    exact = recommend_codes(model, rows, 10, progress=False)
    index = IvfIndex(model.model.item_factors, nlist=64, nprobe=1)
    with caplog.at_level("INFO", logger="musicrec.als"):
        approx = recommend_codes(model, rows, 10, progress=False, index=index)
    assert "scanning" not in caplog.text and "served exactly" in caplog.text
    np.testing.assert_array_equal(approx[1], exact[1])


def brute_force(model, rows: np.ndarray, n: int) -> list[list[int]]:
    """Every track scored, heard ones dropped, best n (ties by code)."""
    scores = model.model.user_factors[rows] @ model.model.item_factors.T
    out = []
    for row, user in zip(scores, rows, strict=True):
        heard = set(model.user_items[user].indices.tolist())
        order = np.lexsort((np.arange(row.size), -row))
        out.append([int(c) for c in order if c not in heard][:n])
    return out


@pytest.mark.parametrize("spread", [0.0, 3.0])
def test_the_norm_pruned_exact_scan_matches_brute_force(monkeypatch, spread: float) -> None:
    # norms spread over orders of magnitude (as ALS gives) or all alike; some users have
    # negative scores everywhere, so they must scan the whole catalogue
    monkeypatch.setattr(als_module, "_FIRST_SCAN", 64)  # several passes on 3000 tracks
    rng = np.random.default_rng(11)
    n_users, n_tracks, d = 60, 3000, 8
    items = random_factors(n_tracks, d, seed=12) * np.exp(spread * rng.random((n_tracks, 1)))
    users = random_factors(n_users, d, seed=13)
    users[:5] = -np.abs(users[:5])
    items[: n_tracks // 2] = np.abs(items[: n_tracks // 2])  # half score < 0 for those 5
    heard = sp.csr_matrix(
        (
            np.ones(n_users * 40, np.float32),
            (np.repeat(np.arange(n_users), 40), rng.integers(0, n_tracks, n_users * 40)),
        ),
        shape=(n_users, n_tracks),
    )
    heard.sum_duplicates()
    model = als_from_factors(
        users, items.astype(np.float32), np.arange(n_users), np.arange(n_tracks), heard
    )
    rows = np.arange(n_users, dtype=np.int32)
    got_rows, got_tracks, got_scores = recommend_codes(model, rows, 20, progress=False)
    expected = brute_force(model, rows, 20)
    for user in rows:
        mine = got_tracks[got_rows == user]
        assert mine.size == 20
        assert not set(mine.tolist()) & set(heard[user].indices.tolist())
        want = model.model.user_factors[user] @ model.model.item_factors[expected[user]].T
        # the same scores in the same order (tracks may differ only between exact ties)
        np.testing.assert_allclose(got_scores[got_rows == user], want, rtol=1e-5)
    assert np.mean([set(got_tracks[got_rows == u]) == set(expected[u]) for u in rows]) == 1.0
