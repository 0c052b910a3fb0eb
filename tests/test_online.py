"""Live personalisation: ALS fold-in against implicit's own solve, the per-artist cap, the
fold-in model over served arrays, and the running service changing a list at once after
POST /history, with reasons and the cap (real uvicorn process on the tiny artefacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from musicrec import io
from musicrec.metrics import list_concentration, list_diversity
from musicrec.online import (
    cap_per_artist,
    fold_in,
    fold_in_arrays,
    model_from_arrays,
    online_confidence,
    top_rows,
)
from tests.service_support import Service, tiny_artefacts


@pytest.fixture(scope="module")
def tiny_model() -> tuple[AlternatingLeastSquares, sp.csr_matrix]:
    """implicit ALS fitted on 40 users x 60 tracks with confidences 1 + 4 * plays."""
    rng = np.random.default_rng(3)
    dense = (rng.random((40, 60)) < 0.15) * rng.integers(1, 4, (40, 60))
    matrix = sp.csr_matrix((1.0 + 4.0 * dense) * (dense > 0), dtype=np.float32)
    model = AlternatingLeastSquares(
        factors=8, regularization=0.3, alpha=1.0, iterations=5, random_state=1, num_threads=1
    )
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(matrix, show_progress=False)
    return model, matrix


def test_fold_in_matches_implicit_recalculate_user(tiny_model) -> None:
    model, _ = tiny_model
    rows = np.array([3, 17, 42, 55])
    confidence = np.array([1.0, 5.0, 9.0, 2.5])
    user = sp.csr_matrix((confidence.astype(np.float32), (np.zeros(4, int), rows)), shape=(1, 60))
    expected = np.asarray(model.recalculate_user(0, user)).ravel()
    y = model.item_factors.astype(np.float64)
    mine, _ = fold_in(model.item_factors, y.T @ y, model.regularization, rows, confidence)
    assert np.allclose(mine, expected, rtol=1e-3, atol=1e-4), (mine, expected)
    # a different history gives a different vector (the comparison is not vacuous)
    other, _ = fold_in(model.item_factors, y.T @ y, model.regularization, rows[:2], confidence[:2])
    assert not np.allclose(other, expected, atol=1e-3)


def test_fold_in_keeps_the_prior_without_events_and_moves_with_them(tiny_model) -> None:
    model, _ = tiny_model
    y = model.item_factors.astype(np.float64)
    prior = model.user_factors[5].astype(np.float64)
    none, _ = fold_in(model.item_factors, y.T @ y, 0.3, np.zeros(0, int), np.zeros(0), prior)
    assert np.allclose(none, prior)
    rows, conf = online_confidence(np.array([7, 7, 7, 9]), alpha=4.0)
    assert rows.tolist() == [7, 9] and conf.tolist() == [13.0, 5.0]  # 1 + 4 * plays
    moved, _ = fold_in(model.item_factors, y.T @ y, 0.3, rows, conf, prior)
    # the events' tracks score higher than before
    assert (model.item_factors[7] @ moved) > (model.item_factors[7] @ prior)


def test_the_fold_in_model_never_recommends_heard_tracks(tiny_model) -> None:
    model, matrix = tiny_model

    class Fitted:  # the AlsModel fields fold_in_arrays reads
        pass

    fitted = Fitted()
    fitted.model, fitted.user_items = model, matrix
    fitted.user_ids = np.arange(100, 140, dtype=np.int32)
    fitted.track_ids = np.arange(1000, 1060, dtype=np.int32)
    listeners = np.asarray((matrix > 0).sum(axis=0)).ravel()
    fm = model_from_arrays(fold_in_arrays(fitted, listeners, 0.3, 4.0))
    # rows are grouped by cluster, most listened first within one; the id index finds all
    bounds = fm.list_offsets
    assert bounds[0] == 0 and bounds[-1] == 60 and fm.centroids.shape == (bounds.size - 1, 8)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        assert np.all(np.diff(listeners[fm.track_ids[lo:hi] - 1000]) <= 0)
    assert fm.rows_of([1000 + t for t in range(60)]).tolist() == [
        int(np.flatnonzero(fm.track_ids == 1000 + t)[0]) for t in range(60)
    ]
    user = 7
    heard = set((1000 + matrix[user].indices).tolist())
    online = [1000 + t for t in range(60) if 1000 + t not in heard][:3]
    before = fm.recommend(100 + user, [], 60, 0)
    after = fm.recommend(100 + user, online, 60, 0)
    assert len(before) == 60 - len(heard) and not heard & set(before)
    assert not (heard | set(online)) & set(after) and len(after) == len(before) - 3
    # a new user: the vector comes from the online events alone
    fresh = fm.recommend(999, online, 10, 0)
    assert len(fresh) == 10 and not set(online) & set(fresh)
    # one probed cluster: the tracks all come from the cluster whose bound is best
    _, _, _, vector, _ = fm.solve(999, online)
    rows = fm.candidate_rows(vector, 1)
    assert rows is not None and 0 < rows.size < 60
    probed = fm.recommend(999, online, 5, 1)
    assert set(probed) <= set(fm.track_ids[rows].tolist()) and len(probed) == 5
    # too few rows in the probed cluster for 50: the probe widens (x4) before the exact path
    wide, widest = 1, rows
    while widest is not None and widest.size < 50 + len(online):
        wide *= 4
        widest = fm.candidate_rows(vector, wide)
    widened = fm.recommend(999, online, 50, 1)
    assert len(widened) == 50 and not set(online) & set(widened)
    if widest is not None:
        assert set(widened) <= set(fm.track_ids[widest].tolist())
    assert fm.candidate_rows(vector, 0) is None  # 0: every row, exact
    reasons = fm.explain_tracks(100 + user, online, after[:5])
    assert all(1 <= len(r) <= 3 and set(r) <= heard | set(online) for r in reasons)


def test_top_rows_orders_and_excludes() -> None:
    scores = np.array([0.5, 2.0, 1.0, 2.0, -1.0])
    assert top_rows(scores.copy(), np.array([1]), 3).tolist() == [3, 2, 0]
    assert top_rows(scores.copy(), np.array([], dtype=np.int64), 10).tolist() == [1, 3, 2, 0, 4]


def test_cap_per_artist_holds_and_keeps_the_order() -> None:
    tracks = [1, 2, 3, 4, 5, 6, 7]
    artists = [9, 9, 9, 8, 9, -1, -1]
    assert cap_per_artist(tracks, artists, 2, 5) == [1, 2, 4, 6, 7]
    assert cap_per_artist(tracks, artists, 1, 4) == [1, 4, 6, 7]
    assert cap_per_artist(tracks, artists, 0, 4) == [1, 2, 3, 4]  # 0: no cap
    # too few other artists: the list is still k long, the pushed-out tracks follow
    assert cap_per_artist([1, 2, 3], [9, 9, 9], 1, 3) == [1, 2, 3]
    assert list_diversity([9, 9, 8, -1]) == 0.75
    assert list_concentration([9, 9, 8, -1]) == 0.5


def _user_with_history(parquet: Path) -> tuple[int, set[int]]:
    events = pd.read_parquet(parquet / io.EVENTS, columns=["user_id", "track_id"])
    user = int(events["user_id"].value_counts().index[0])
    return user, set(events.loc[events["user_id"] == user, "track_id"].tolist())


def test_the_service_folds_online_events_in_at_once(tmp_path: Path) -> None:
    """After POST /history the next list is the fold-in list (source header), differs from
    the offline one, holds none of the posted tracks; details give reasons whose ``because``
    ids are the user's own tracks; and no artist has more than the cap in the first k."""
    parquet = tiny_artefacts()
    user, offline_heard = _user_with_history(parquet)
    with Service(
        parquet,
        tmp_path / "history.db",
        tmp_path / "server.log",
        MUSICREC_ARTIST_CAP="1",
        MUSICREC_ONLINE_METHOD="foldin",
    ) as service:
        service.start()
        url = f"{service.url}/recommendations/{user}?k=10"
        before = requests.get(f"{service.url}/recommendations/{user}?k=13", timeout=10)
        assert before.ok and before.headers["X-Recommendation-Source"] == "personal"
        posted = before.json()[:3]
        assert requests.post(f"{service.url}/history/{user}", json=posted, timeout=10).ok
        after = requests.get(url, timeout=10)
        assert after.headers["X-Recommendation-Source"] == "fold-in"
        # re-scored, not the offline list with the posted tracks dropped
        assert after.json() != before.json()[3:]
        assert not set(posted) & set(after.json())
        assert len(after.json()) == 10 == len(set(after.json()))
        detailed = requests.get(url + "&details=true", timeout=10).json()
        assert [d["track_id"] for d in detailed] == after.json()
        own = offline_heard | set(posted)
        for item in detailed:
            reason = item["reason"]
            assert reason["source"] in ("fold-in", "popular")
            assert len(reason["because"]) <= 3 and set(reason["because"]) <= own
        assert any(item["reason"]["because"] for item in detailed)
        firsts = [d["artists"][0] for d in detailed if d["artists"]]
        assert len(firsts) == len(set(firsts)), firsts  # the cap of 1 holds
        # the offline list of a user without online events is capped too, with reasons
        other = requests.get(
            f"{service.url}/recommendations/{user + 1}?k=10&details=true", timeout=10
        ).json()
        firsts = [d["artists"][0] for d in other if d["artists"]]
        assert len(firsts) == len(set(firsts))
        assert all(d["reason"]["source"] in ("personal", "popular") for d in other)
