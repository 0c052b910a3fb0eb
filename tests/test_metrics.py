"""Metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from musicrec.errors import DataError
from musicrec.metrics import (
    MAP,
    METRIC_COLUMNS,
    NDCG,
    Coverage,
    Novelty,
    NoveltyBits,
    Precision,
    Recall,
    evaluate,
)

L3 = math.log2(3)  # the discount at rank 2 is 1 / log2(3)


def events(pairs: list[tuple[int, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(pairs, columns=["user_id", "track_id"]).astype("int32")
    frame["day"] = np.int16(19000)
    return frame


def reco(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    """Rows of (user, rank, track); the score falls with the rank."""
    frame = pd.DataFrame(rows, columns=["user_id", "rank", "track_id"])
    frame["score"] = (1.0 / frame["rank"]).astype("float32")
    return frame.astype({"user_id": "int32", "track_id": "int32", "rank": "int16"})


# Train: u1 heard 10, 11; u2 heard 10, 12; u3 heard 13; u4 heard 10 (4 train users;
# listeners: track 10 -> 3, tracks 11, 12, 13 -> 1, every other track -> 0).
TRAIN = events([(1, 10), (1, 11), (2, 10), (2, 12), (3, 13), (4, 10)])
# Test: u1 -> {20, 21, 22}; u2 -> {30} (the event appears twice, it counts once);
# u3 -> {40, 41}; u5 -> {20} but u5 has no train events (cold), so it is not evaluated.
# Evaluated users: u1, u2, u3 (u4 has no test events).
TEST = events([(1, 20), (1, 21), (1, 22), (2, 30), (2, 30), (3, 40), (3, 41), (5, 20)])
# Source "a": u1 -> 20 (hit), 99, 22 (hit), 21 (hit, but rank 4 is beyond max k = 3);
# u2 -> 10 (heard in train), 30 (hit), 98; u3 has no list; u4 and u5 have lists but are not
# evaluated (they still count for catalogue coverage).
RECO_A = reco(
    [
        (1, 1, 20), (1, 2, 99), (1, 3, 22), (1, 4, 21),
        (2, 1, 10), (2, 2, 30), (2, 3, 98),
        (4, 1, 11),
        (5, 1, 20),
    ]
)  # fmt: skip
N_ITEMS = 10


@pytest.fixture(scope="module")
def result() -> pd.DataFrame:
    recs = {"a": RECO_A, "empty": RECO_A.iloc[:0]}
    return evaluate(recs, TEST, TRAIN, n_items=N_ITEMS, ks=(3, 2))


def row(result: pd.DataFrame, source: str, k: int) -> pd.Series:
    found = result[(result["source"] == source) & (result["k"] == k)]
    assert len(found) == 1
    return found.iloc[0]


def test_shape_and_order(result: pd.DataFrame) -> None:
    assert list(result.columns) == ["source", "k", *METRIC_COLUMNS]
    # sources in the order given (not alphabetical), k ascending
    assert list(zip(result["source"], result["k"], strict=True)) == [
        ("a", 2), ("a", 3), ("empty", 2), ("empty", 3)
    ]  # fmt: skip


def test_accuracy_at_2(result: pd.DataFrame) -> None:
    r = row(result, "a", 2)
    # u1 top-2 = [20 hit, 99]: P = 1/2, R = 1/min(2, 3) = 1/2, DCG = 1,
    #   IDCG = 1 + 1/log2(3), AP = (1/1) / min(2, 3) = 1/2
    # u2 top-2 = [10, 30 hit]: P = 1/2, R = 1/min(2, 1) = 1, DCG = 1/log2(3), IDCG = 1,
    #   AP = (1/2) / 1 = 1/2
    # u3: no list -> 0 everywhere; means over 3 users
    assert r["precision"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert r["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert r["ndcg"] == pytest.approx((1 / (1 + 1 / L3) + 1 / L3) / 3)
    assert r["map"] == pytest.approx((0.5 + 0.5) / 3)


def test_accuracy_at_3(result: pd.DataFrame) -> None:
    r = row(result, "a", 3)
    # u1 top-3 = [20 hit, 99, 22 hit]: P = 2/3, R = 2/3, DCG = 1 + 1/log2(4) = 1.5,
    #   IDCG = 1 + 1/log2(3) + 1/2, AP = (1/1 + 2/3) / 3 = 5/9
    # u2 top-3 = [10, 30 hit, 98]: P = 1/3, R = 1/min(3, 1) = 1, nDCG = 1/log2(3), AP = 1/2
    assert r["precision"] == pytest.approx((2 / 3 + 1 / 3) / 3)
    assert r["recall"] == pytest.approx((2 / 3 + 1) / 3)
    assert r["ndcg"] == pytest.approx((1.5 / (1.5 + 1 / L3) + 1 / L3) / 3)
    assert r["map"] == pytest.approx((5 / 9 + 1 / 2) / 3)


def test_coverage_novelty_users_covered(result: pd.DataFrame) -> None:
    r2, r3 = row(result, "a", 2), row(result, "a", 3)
    # top-2 of every list: u1 {20, 99}, u2 {10, 30}, u4 {11}, u5 {20} -> 5 distinct / 10
    assert r2["coverage"] == pytest.approx(0.5)
    # top-3 adds 22 and 98 -> 7 / 10
    assert r3["coverage"] == pytest.approx(0.7)
    # novelty over u1, u2 (u3 has no list): u1 heard none of its recs -> 1;
    # u2 heard track 10: 1/2 unheard at k=2, 2/3 at k=3
    assert r2["novelty"] == pytest.approx((1 + 1 / 2) / 2)
    assert r3["novelty"] == pytest.approx((1 + 2 / 3) / 2)
    # bits: 4 train users; track 10 heard by 3 -> -log2(3/4); never heard -> log2(4) = 2
    b10 = -math.log2(3 / 4)
    assert r2["novelty_bits"] == pytest.approx((2 + (b10 + 2) / 2) / 2)
    assert r3["novelty_bits"] == pytest.approx((2 + (b10 + 2 + 2) / 3) / 2)
    assert r2["users_covered"] == pytest.approx(2 / 3)
    assert r3["users_covered"] == pytest.approx(2 / 3)


def test_source_without_lists_scores_zero(result: pd.DataFrame) -> None:
    r = row(result, "empty", 3)
    for name in ("precision", "recall", "ndcg", "map", "coverage", "users_covered"):
        assert r[name] == 0.0
    # nothing recommended, nothing to judge
    assert math.isnan(r["novelty"]) and math.isnan(r["novelty_bits"])


def test_cold_test_users_are_not_evaluated() -> None:
    # Only u5 (cold) has a list, and it is a hit; the warm users get nothing -> all zero.
    only_cold = reco([(5, 1, 20)])
    r = evaluate({"cold": only_cold}, TEST, TRAIN, n_items=N_ITEMS, ks=(1,)).iloc[0]
    assert r["precision"] == 0.0 and r["users_covered"] == 0.0
    # The standalone metric averages over every test user: u1 0, u2 0, u3 0, u5 1 -> 1/4
    assert Precision(1).calc(only_cold, TEST) == pytest.approx(0.25)


def test_perfect_list_for_user_with_fewer_test_items_than_k() -> None:
    # u2 has a single test track; a top-3 list holding it at rank 1 is perfect:
    # R = 1/min(3, 1) = 1, nDCG = 1/1 = 1, AP = (1/1)/1 = 1, P = 1/3
    one = reco([(2, 1, 30), (2, 2, 98), (2, 3, 97)])
    test = events([(2, 30)])
    assert Recall(3).calc(one, test) == pytest.approx(1.0)
    assert NDCG(3).calc(one, test) == pytest.approx(1.0)
    assert MAP(3).calc(one, test) == pytest.approx(1.0)
    assert Precision(3).calc(one, test) == pytest.approx(1 / 3)


def test_duplicate_test_events_count_once() -> None:
    # (u2, 30) twice in test: one relevant item, one hit -> recall 1, not 2
    one = reco([(2, 1, 30)])
    test = events([(2, 30), (2, 30)])
    assert Recall(1).calc(one, test) == pytest.approx(1.0)
    assert Precision(1).calc(one, test) == pytest.approx(1.0)


def test_duplicate_recommendation_rows_are_rejected() -> None:
    twice = reco([(1, 1, 20), (1, 2, 20)])
    with pytest.raises(ValueError, match="repeat track 20 for user 1"):
        Precision(2).calc(twice, TEST)
    same_rank = reco([(1, 1, 20), (1, 1, 21)])
    with pytest.raises(ValueError, match="same rank"):
        Precision(2).calc(same_rank, TEST)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="ranks start at 1"):
        Precision(2).calc(reco([(1, 0, 20)]), TEST)
    with pytest.raises(ValueError, match="lacks column"):
        Precision(2).calc(RECO_A.drop(columns="rank"), TEST)
    with pytest.raises(ValueError, match="positive integer"):
        Precision(0)
    with pytest.raises(DataError, match="no test user has train events"):
        evaluate({"a": RECO_A}, events([(9, 1)]), TRAIN, n_items=N_ITEMS)


def test_standalone_beyond_accuracy_metrics() -> None:
    # Coverage: top-1 of u1, u2, u4, u5 = {20, 10, 11, 20} -> 3 distinct / 10
    assert Coverage(1).calc(RECO_A, n_items=N_ITEMS) == pytest.approx(0.3)
    # Novelty over every user of the reco at k=1: u1 20 unheard (1), u2 10 heard (0),
    # u4 11 unheard (1; u4 heard only 10), u5 20 unheard (1) -> 3/4
    assert Novelty(1).calc(RECO_A, TRAIN) == pytest.approx(0.75)
    # bits at k=1: 20 -> 2, 10 -> -log2(3/4), 11 (one listener) -> -log2(1/4) = 2, 20 -> 2
    assert NoveltyBits(1).calc(RECO_A, TRAIN) == pytest.approx((6 - math.log2(3 / 4)) / 4)


def test_unsorted_input_gives_the_same_result(result: pd.DataFrame) -> None:
    shuffled = RECO_A.sample(frac=1.0, random_state=3)
    recs = {"a": shuffled, "empty": RECO_A.iloc[:0]}
    again = evaluate(recs, TEST.sample(frac=1.0, random_state=4), TRAIN, N_ITEMS, ks=(2, 3))
    pd.testing.assert_frame_equal(again, result)


def _brute_force(reco_: pd.DataFrame, test: pd.DataFrame, train: pd.DataFrame, k: int) -> dict:
    """The definitions written as a plain loop per user, to check the vectorised code."""
    train_users = set(train.user_id)
    test_sets = test.groupby("user_id").track_id.apply(set)
    heard = train.groupby("user_id").track_id.apply(set)
    listeners = train.track_id.value_counts()
    n_train = len(train_users)
    lists = reco_.sort_values(["user_id", "rank"]).groupby("user_id").track_id.apply(list)
    users = [u for u in test_sets.index if u in train_users]
    p = r = nd = ap = 0.0
    nov, bits = [], []
    for u in users:
        rel = test_sets[u]
        top = lists.get(u, [])[:k]
        hits = [t in rel for t in top]
        ideal = min(k, len(rel))
        p += sum(hits) / k
        r += sum(hits) / ideal
        nd += sum(h / math.log2(i + 2) for i, h in enumerate(hits)) / sum(
            1 / math.log2(i + 2) for i in range(ideal)
        )
        ap += sum(sum(hits[: i + 1]) / (i + 1) for i, h in enumerate(hits) if h) / ideal
        if top:
            nov.append(np.mean([t not in heard.get(u, set()) for t in top]))
            bits.append(np.mean([-math.log2(max(listeners.get(t, 0), 1) / n_train) for t in top]))
    n = len(users)
    return {
        "precision": p / n,
        "recall": r / n,
        "ndcg": nd / n,
        "map": ap / n,
        "novelty": float(np.mean(nov)),
        "novelty_bits": float(np.mean(bits)),
    }


def test_matches_a_plain_loop_on_random_data() -> None:
    rng = np.random.default_rng(7)
    n_users, n_tracks = 60, 40

    def random_events(n: int) -> pd.DataFrame:
        pairs = {(int(u), int(t)) for u, t in rng.integers(0, [n_users, n_tracks], (n, 2))}
        return events(sorted(pairs))

    train, test = random_events(900), random_events(300)
    rows = []
    for u in range(0, n_users, 2):  # every other user gets a list of 8 distinct tracks
        for rank, t in enumerate(rng.choice(n_tracks, 8, replace=False), start=1):
            rows.append((u, rank, int(t)))
    reco_ = reco(rows)
    got = evaluate({"x": reco_}, test, train, n_items=n_tracks, ks=(3, 8))
    for k in (3, 8):
        expected = _brute_force(reco_, test, train, k)
        actual = row(got, "x", k)
        for name, value in expected.items():
            assert actual[name] == pytest.approx(value), (name, k)
