"""Candidate sources: one contract test run on every source of SOURCES (on generated data),
plus hand-computed checks of what each source computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from musicrec import io
from musicrec.listens import build_listens
from musicrec.settings import Settings
from musicrec.sources import SOURCES, Lists, TrainData, _gram, make_source

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
    items = pq.read_table(tiny_prepared / io.ITEMS, columns=["track_id", "genre_ids", "artist_ids"])
    days = events["day"].to_numpy()
    cutoff = int(np.quantile(days, 0.9))
    return events, items, cutoff


def _data(events: pd.DataFrame, items: pa.Table, cutoff: int) -> TrainData:
    before = events[events["day"].to_numpy() < cutoff].reset_index(drop=True)
    return TrainData.build(build_listens(before, cutoff), items)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_contract(name: str, tiny: tuple[pd.DataFrame, pa.Table, int]) -> None:
    events, items, cutoff = tiny
    data = _data(events, items, cutoff)
    h = data.listens
    users = np.arange(0, h.n_users, 3, dtype=np.int64)
    lists = make_source(name, SETTINGS, small_params(name)).fit(data).recommend(users, 20)
    assert lists.n_users == users.size
    assert np.all(np.diff(lists.indptr) <= 20)
    assert np.diff(lists.indptr).sum() > 0, "a source must propose something"
    local = lists.local()
    # unheard: no entry is in the user's history
    heard = set(
        zip(
            np.repeat(np.arange(h.n_users), h.counts()).tolist(),
            h.track_codes.tolist(),
            strict=True,
        )
    )
    assert not any(
        (int(users[u]), int(t)) in heard for u, t in zip(local, lists.tracks, strict=True)
    )
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
    again = (
        make_source(name, SETTINGS, small_params(name))
        .fit(_data(noisy, items, cutoff))
        .recommend(users, 20)
    )
    np.testing.assert_array_equal(again.tracks, lists.tracks)
    np.testing.assert_array_equal(again.indptr, lists.indptr)


def _hand_history(
    rows: list[tuple[int, int, int]], cutoff: int = 20, artists: dict[int, list[int]] | None = None
) -> TrainData:
    user, track, day = zip(*rows, strict=True)
    events = pd.DataFrame(
        {
            "user_id": np.array(user, np.int32),
            "track_id": np.array(track, np.int32),
            "day": np.array(day, np.int16),
        }
    )
    items = None
    if artists is not None:
        ids = sorted(artists)
        items = pa.table(
            {
                "track_id": pa.array(ids, pa.int32()),
                "artist_ids": pa.array([artists[i] for i in ids], pa.list_(pa.int64())),
                "genre_ids": pa.array([[1] for _ in ids], pa.list_(pa.int64())),
            }
        )
    return TrainData.build(build_listens(events, cutoff), items)


def random_rows(seed: int, users: int, tracks: int, n: int) -> list[tuple[int, int, int]]:
    """``n`` random (user, track, day) events over 20 days."""
    rng = np.random.default_rng(seed)
    return list(
        zip(
            rng.integers(0, users, n).tolist(),
            rng.integers(0, tracks, n).tolist(),
            rng.integers(0, 20, n).tolist(),
            strict=True,
        )
    )


def test_popular_counts_recent_listeners_then_all_time() -> None:
    # tracks 10 (3 old listeners), 11 (2 recent), 12 (1 recent); user 4 heard 11
    data = _hand_history(
        [(1, 10, 0), (2, 10, 1), (3, 10, 2), (1, 11, 18), (4, 11, 19), (2, 12, 19)]
    )
    source = make_source("popular", SETTINGS, {"window": 0.1}).fit(data)  # 2-day window
    codes = data.listens.tracks.codes(np.array([11, 12, 10]))
    np.testing.assert_array_equal(source.order, codes)
    lists = source.recommend(data.listens.users.codes(np.array([4])).astype(np.int64), 5)
    np.testing.assert_array_equal(data.listens.tracks.ids[lists.tracks], [12, 10])


def test_als_alpha_zero_is_plain_implicit_on_the_binary_matrix() -> None:
    data = _hand_history(random_rows(seed=0, users=30, tracks=40, n=400))
    params = {"factors": 4, "regularization": 0.01, "alpha": 0.0, "half_life": None}
    ours = make_source("als", SETTINGS, params).fit(data).model.model
    plain = AlternatingLeastSquares(
        factors=4, regularization=0.01, iterations=3, random_state=SETTINGS.seed, num_threads=1
    )
    plain.fit(data.binary(), show_progress=False)
    np.testing.assert_allclose(ours.item_factors, plain.item_factors, rtol=1e-4, atol=1e-5)


def test_als_confidence_is_one_plus_alpha_times_strength(monkeypatch: pytest.MonkeyPatch) -> None:
    import musicrec.sources as sources_module

    fitted_on: list = []

    class Spy(AlternatingLeastSquares):
        def fit(self, user_items, show_progress=True, callback=None):  # noqa: ANN001
            fitted_on.append(user_items.toarray())
            return super().fit(user_items, show_progress=show_progress)

    monkeypatch.setattr(sources_module, "AlternatingLeastSquares", Spy)
    data = _hand_history(
        [(1, 10, 19), (1, 11, 9), (2, 10, 19), (2, 12, 8), (2, 13, 10), (2, 14, 11)], cutoff=20
    )
    source = make_source(
        "als", SETTINGS, {"factors": 2, "regularization": 0.1, "alpha": 4.0, "half_life": 0.5}
    ).fit(data)
    # the model keeps only what was heard (the shared 0/1 matrix), not the confidences
    assert source.model.user_items is data.binary()
    # daily dates, span 12 days -> half-life 6 days; ages 0 and 10 days
    matrix = fitted_on[0]
    expected = 1 + 4 * 0.5 ** (10 / 6)
    assert matrix[0, data.listens.tracks.codes(np.array([10]))[0]] == pytest.approx(5.0)
    assert matrix[0, data.listens.tracks.codes(np.array([11]))[0]] == pytest.approx(
        expected, rel=1e-5
    )


def test_item_knn_scores_are_weighted_sums_of_neighbour_similarities() -> None:
    data = _hand_history(random_rows(seed=1, users=40, tracks=25, n=500))
    source = make_source(
        "item_knn", SETTINGS, {"weighting": "cosine", "neighbours": 100, "half_life": None}
    ).fit(data)
    x = data.binary().toarray()
    norms = np.sqrt((x**2).sum(axis=0))
    cosine = (x.T @ x) / np.outer(norms, norms)
    np.fill_diagonal(cosine, 0)
    np.testing.assert_allclose(source.similarity.toarray(), cosine, rtol=1e-4, atol=1e-6)
    user = np.array([0], np.int64)
    lists = source.recommend(user, 3)
    heard_on_days = data.listens.matrix().toarray()[0]  # a track heard on two days weighs 2
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
    rows = [
        (1, 10, 15),
        (1, 11, 16),
        (1, 20, 17),
        (2, 12, 18),
        (3, 12, 18),
        (4, 13, 18),
        (2, 22, 18),
        (3, 22, 18),
        (5, 30, 18),
    ]
    artists = {10: [100], 11: [100], 12: [100], 13: [100], 20: [200], 22: [200], 30: [300]}
    data = _hand_history(rows, artists=artists)
    source = make_source("artist", SETTINGS, {"window": None, "per_artist": 30}).fit(data)
    lists = source.recommend(data.listens.users.codes(np.array([1])).astype(np.int64), 5)
    got = data.listens.tracks.ids[lists.tracks]
    # 12: 2/3 * log1p(2) = .73, 13: 2/3 * log1p(1) = .46, 22: 1/3 * log1p(2) = .37
    np.testing.assert_array_equal(got, [12, 13, 22])
    assert 30 not in got


def test_lists_head_and_ranks() -> None:
    lists = Lists(
        np.array([0, 3, 3, 5]),
        np.array([5, 6, 7, 8, 9], np.int32),
        np.array([3, 2, 1, 2, 1], np.float32),
    )
    np.testing.assert_array_equal(lists.ranks(), [1, 2, 3, 1, 2])
    head = lists.head(2)
    np.testing.assert_array_equal(head.indptr, [0, 2, 2, 4])
    np.testing.assert_array_equal(head.tracks, [5, 6, 8, 9])


def test_item_knn_counts_co_listening_and_scores_from_the_last_events_only() -> None:
    # user 1 heard 10 long ago, then 11 and 12; user 2 heard 10 and 13
    data = _hand_history(
        [(1, 10, 1), (1, 11, 5), (1, 12, 6), (2, 10, 7), (2, 13, 8), (3, 11, 8), (3, 13, 9)]
    )
    codes = data.listens.tracks.codes
    recent = make_source(
        "item_knn",
        SETTINGS,
        {"weighting": "cosine", "neighbours": 10, "half_life": None, "recent": 2},
    ).fit(data)
    sim = recent.similarity.toarray()  # every track is in the head here
    assert sim[codes(np.array([10]))[0], codes(np.array([11]))[0]] == 0  # 10 is not recent
    assert sim[codes(np.array([11]))[0], codes(np.array([12]))[0]] > 0
    lists = recent.recommend(data.listens.users.codes(np.array([2])).astype(np.int64), 5)
    # user 2 scores from 10 and 13; 13 -> 11 (user 3), 10 has no recent co-listening
    assert list(data.listens.tracks.ids[lists.tracks]) == [11]
    whole = make_source(
        "item_knn",
        SETTINGS,
        {"weighting": "cosine", "neighbours": 10, "half_life": None, "recent": 500},
    ).fit(data)
    assert whole.similarity[codes(np.array([10]))[0], codes(np.array([11]))[0]] > 0


def test_item_knn_learns_neighbours_among_the_most_listened_tracks_only() -> None:
    rows = random_rows(seed=4, users=40, tracks=30, n=600)
    data = _hand_history(rows)
    settings = SETTINGS.model_copy(update={"knn_max_items": 10})
    source = make_source(
        "item_knn",
        settings,
        {"weighting": "cosine", "neighbours": 100, "half_life": None, "recent": 500},
    ).fit(data)
    head = data.head_tracks(10)
    np.testing.assert_array_equal(source.head, head)
    assert source.similarity.shape == (10, 10) and source.similarity.nnz > 0
    query, similar, _ = source.similar(5)
    assert set(query) <= set(head) and set(similar) <= set(head)
    # the head is by distinct listeners
    listeners = data.listeners(None)
    assert listeners[head].min() >= np.delete(listeners, head).max()


def test_sparse_top_matches_a_full_sort() -> None:
    from scipy import sparse

    from musicrec.sources import _sparse_top

    data = _hand_history(random_rows(seed=5, users=30, tracks=200, n=1500))
    users = np.arange(data.listens.n_users, dtype=np.int64)
    rng = np.random.default_rng(0)
    scores = sparse.random(
        users.size,
        data.listens.n_tracks,
        density=0.3,
        random_state=1,
        format="csr",
        dtype=np.float32,
    )
    scores.data -= 0.2  # some non-positive entries, never recommended
    got = _sparse_top(scores, data.heard(users), 7)
    dense = scores.toarray()
    dense[data.binary().toarray() > 0] = 0
    for row in rng.choice(users.size, 10, replace=False):
        expected = np.argsort(-dense[row], kind="stable")[:7]
        expected = expected[dense[row, expected] > 0]
        part = slice(got.indptr[row], got.indptr[row + 1])
        np.testing.assert_array_equal(got.tracks[part], expected)


def test_recent_binary_keeps_each_users_last_events() -> None:
    data = _hand_history([(1, 10, 1), (1, 11, 2), (1, 12, 3), (1, 11, 4), (2, 10, 5)])
    m = data.recent_binary(2).toarray()
    c = data.listens.tracks.codes(np.array([10, 11, 12]))
    assert list(m[0, c]) == [0, 1, 1] and list(m[1, c]) == [1, 0, 0]
    assert m.max() == 1


def test_als_warm_start_carries_known_factors_and_refits_in_a_few_iterations() -> None:
    from musicrec.sources import AlsSource

    rows = random_rows(seed=6, users=40, tracks=30, n=700)
    early = _hand_history([r for r in rows if r[2] < 15], cutoff=15)
    later = _hand_history(rows + [(99, 5, 19), (1, 77, 19)], cutoff=20)  # a new user, track
    params = {"factors": 4, "regularization": 0.1, "alpha": 2.0, "half_life": None}
    settings = SETTINGS.model_copy(update={"als_iterations": 10, "als_refit_iterations": 1})
    first = make_source("als", settings, params).fit(early)
    state = first.state()
    seen: dict[str, np.ndarray] = {}

    class Spy(AlternatingLeastSquares):
        def fit(self, user_items, show_progress=True, callback=None):  # noqa: ANN001
            seen["items"] = self.item_factors.copy()
            seen["iterations"] = np.array(self.iterations)
            return super().fit(user_items, show_progress=show_progress)

    import musicrec.sources as sources_module

    original = sources_module.AlternatingLeastSquares
    sources_module.AlternatingLeastSquares = Spy
    try:
        warm = make_source("als", settings, params).warm(state).fit(later)
    finally:
        sources_module.AlternatingLeastSquares = original
    assert int(seen["iterations"]) == 1
    old = {int(t): i for i, t in enumerate(state["track_ids"])}
    for code, track in enumerate(later.listens.tracks.ids):
        if int(track) in old:
            np.testing.assert_array_equal(
                seen["items"][code], state["item_factors"][old[int(track)]]
            )
        else:  # a new track starts as implicit starts a cold fit
            assert seen["items"][code].max() < 0.01
    assert warm.model.model.item_factors.shape == (later.listens.n_tracks, 4)
    assert isinstance(first, AlsSource)


def test_a_judged_warm_fit_stops_when_its_judge_says_so() -> None:
    from musicrec.sources import AlsSource, Source

    rows = random_rows(seed=6, users=40, tracks=30, n=700)
    early = _hand_history([r for r in rows if r[2] < 15], cutoff=15)
    later = _hand_history(rows, cutoff=20)
    params = {"factors": 4, "regularization": 0.1, "alpha": 2.0, "half_life": None}
    settings = SETTINGS.model_copy(update={"als_iterations": 10})
    state = AlsSource(settings, **params).fit(early).state()

    def judge_with(stop_at: int) -> tuple[list[np.ndarray], Callable[[Source], bool]]:
        judged: list[np.ndarray] = []

        def judge(src: Source) -> bool:
            # the source answers from the factors as they stand after this iteration
            assert isinstance(src, AlsSource)
            assert src.recommend(np.arange(5, dtype=np.int64), 3).n_users == 5
            judged.append(src.model.model.item_factors.copy())
            return 0 < stop_at <= len(judged)

        return judged, judge

    # the judge sees the carried factors, then each iteration's: it stops at its fourth look
    judged, judge = judge_with(4)
    warm = AlsSource(settings, **params).stop_when(judge).warm(state, 8).fit(later)
    assert warm.iterations_run == 3 and len(judged) == 4
    np.testing.assert_array_equal(judged[0], state["item_factors"])  # no track is new
    assert not np.array_equal(judged[1], judged[2]), "each judgement follows an iteration"
    np.testing.assert_array_equal(warm.model.model.item_factors, judged[-1])
    assert warm.recommend(np.arange(5, dtype=np.int64), 3).n_users == 5

    # what it says of the start is ignored: at least one iteration runs
    judged, judge = judge_with(1)
    warm = AlsSource(settings, **params).stop_when(judge).warm(state, 8).fit(later)
    assert warm.iterations_run == 1 and len(judged) == 2

    # a judge that never stops it runs every warm iteration, and no more
    judged, judge = judge_with(-1)
    warm = AlsSource(settings, **params).stop_when(judge).warm(state, 6).fit(later)
    assert warm.iterations_run == 6 and len(judged) == 7

    # a cold fit is never judged: the factors of new users start random
    judged, judge = judge_with(1)
    cold = AlsSource(settings, **params).stop_when(judge).fit(later)
    assert cold.iterations_run == 10 and judged == []


def test_knn_window_is_the_largest_the_pair_budget_affords() -> None:
    rows = [(1, t, t) for t in range(3)] + [(2, 10 + t, t) for t in range(10)]
    data = _hand_history(rows)  # users with 3 and 10 events
    assert data.with_listens(data.listens).knn_window(109) == 10  # 9 + 100: everything
    assert data.with_listens(data.listens).knn_window(50) == 6  # 9 + 36 <= 50 < 9 + 49
    sample = data.with_listens(data.listens.subset(np.array([0])))
    assert sample.keep_knn_window_of(data.with_listens(data.listens), 50).knn_window(1e9) == 6


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_gram_matrix_in_blocks_of_rows_is_the_whole_product(threads: int) -> None:
    rng = np.random.default_rng(4)
    x = sp.random(101, 17, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    x.data[:] = 1.0
    np.testing.assert_array_equal(_gram(x, threads), (x.T @ x).toarray())
