"""Metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from musicrec.errors import DataError
from musicrec.metrics import (
    CANDIDATE_COLUMNS,
    MAP,
    METRIC_COLUMNS,
    NDCG,
    Coverage,
    HitTable,
    Novelty,
    NoveltyBits,
    Precision,
    Recall,
    activity_segments,
    bootstrap_difference,
    bootstrap_interval,
    candidate_recall,
    evaluate,
    evaluated_users,
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
    p = r = ndcg_sum = ap = 0.0
    nov, bits = [], []
    for u in users:
        rel = test_sets[u]
        top = lists.get(u, [])[:k]
        hits = [t in rel for t in top]
        ideal = min(k, len(rel))
        p += sum(hits) / k
        r += sum(hits) / ideal
        ndcg_sum += sum(h / math.log2(i + 2) for i, h in enumerate(hits)) / sum(
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
        "ndcg": ndcg_sum / n,
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


# --- per-user values ---------------------------------------------------------------------------


def test_per_user_values_match_hand_computation() -> None:
    # Evaluated users u1, u2, u3 (in id order); the per-user values at k=2 are the ones spelled
    # out in test_accuracy_at_2, and u3 (no list) scores 0.
    table = HitTable.build(RECO_A, 3, test=TEST, users=np.array([1, 2, 3]))
    expected = {
        Precision(2): [0.5, 0.5, 0.0],
        Recall(2): [0.5, 1.0, 0.0],
        NDCG(2): [1 / (1 + 1 / L3), 1 / L3, 0.0],
        MAP(2): [0.5, 0.5, 0.0],
        # k=3: u1 AP = (1/1 + 2/3) / 3 = 5/9, u2 AP = (1/2) / 1
        MAP(3): [5 / 9, 0.5, 0.0],
        NDCG(3): [1.5 / (1.5 + 1 / L3), 1 / L3, 0.0],
    }
    for metric, values in expected.items():
        per_user = metric.per_user_from(table)
        assert per_user == pytest.approx(values), metric
        assert metric.calc_from(table) == pytest.approx(np.mean(values)), metric


def test_evaluated_users_are_warm_test_users() -> None:
    # test users 1, 2, 3, 5; u5 has no train events
    assert evaluated_users(TEST, TRAIN).tolist() == [1, 2, 3]


# --- bootstrap intervals -----------------------------------------------------------------------


def _width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


def test_bootstrap_interval_contains_mean_and_is_deterministic() -> None:
    values = np.random.default_rng(1).random(500)
    low, high = bootstrap_interval(values, n_boot=500, seed=4)
    assert low < values.mean() < high
    assert bootstrap_interval(values, n_boot=500, seed=4) == (low, high)
    assert bootstrap_interval(values, n_boot=500, seed=5) != (low, high)
    # a wider level gives a wider interval from the same resamples
    assert _width(bootstrap_interval(values, n_boot=500, seed=4, level=0.99)) > high - low


def test_bootstrap_interval_narrows_with_more_users() -> None:
    rng = np.random.default_rng(2)
    small, large = rng.random(200), rng.random(20_000)
    # the width falls like 1/sqrt(n): 10 times narrower for 100 times the users
    ratio = _width(bootstrap_interval(small)) / _width(bootstrap_interval(large))
    assert 7 < ratio < 14


@pytest.mark.parametrize(
    "values",
    [
        # few distinct values: the exact multinomial over distinct values
        (np.random.default_rng(3).random(30_000) < 0.2).astype(float),
        # 2 000 distinct values: still exact
        np.random.default_rng(4).random(2_000),
        # 30 000 distinct values: groups of sorted values with the normal within-group term
        np.random.default_rng(5).exponential(size=30_000),
    ],
    ids=["binary", "exact", "grouped"],
)
def test_bootstrap_interval_matches_normal_theory(values: np.ndarray) -> None:
    # For a mean of many users the bootstrap interval is close to mean +- 1.96 sd / sqrt(n)
    low, high = bootstrap_interval(values, n_boot=1000, seed=0)
    half = 1.959964 * values.std() / math.sqrt(len(values))
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.15 * half)
    assert (high - low) / 2 == pytest.approx(half, rel=0.12)


def test_bootstrap_groups_keep_the_within_group_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two groups of sorted values: 0/1 hits (p = 0.3) made distinct by tiny noise. The upper
    # half mixes zeros and ones, so the spread inside it is most of the variance: a group-mean
    # approximation alone would give an interval about 0.65 times too narrow.
    monkeypatch.setattr("musicrec.metrics._BOOT_GROUPS", 2)
    rng = np.random.default_rng(9)
    values = (rng.random(20_000) < 0.3) + rng.random(20_000) * 1e-9
    low, high = bootstrap_interval(values, n_boot=1000, seed=1)
    half = 1.959964 * values.std() / math.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.12)


def test_bootstrap_difference_is_paired() -> None:
    rng = np.random.default_rng(6)
    n = 2_000
    a = rng.random(n)
    # b is a minus 0.01 for half of the users: a is better by 0.005 on average, far less than
    # the spread of either mean (their own intervals overlap), but the pairs show it clearly.
    b = a - 0.01 * (rng.random(n) < 0.5)
    low_a, high_a = bootstrap_interval(a)
    low_b, high_b = bootstrap_interval(b)
    assert low_a < high_b and low_b < high_a  # unpaired, the two sources are not told apart
    low, high = bootstrap_difference(a, b)
    assert 0 < low < a.mean() - b.mean() < high
    low, high = bootstrap_difference(b, a)
    assert high < 0
    # the same source against itself, and against its values given to other users
    assert bootstrap_difference(a, a) == (0.0, 0.0)
    low, high = bootstrap_difference(a, rng.permutation(a))
    assert low < 0 < high
    with pytest.raises(ValueError, match="same users"):
        bootstrap_difference(a, a[:-1])


def test_bootstrap_edge_cases() -> None:
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([])))
    assert bootstrap_interval(np.array([0.25])) == (0.25, 0.25)
    assert bootstrap_interval(np.full(10, 0.5)) == (0.5, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval(np.array([0.1]), n_boot=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.array([0.1]), level=95)


def test_evaluate_with_bootstrap(result: pd.DataFrame) -> None:
    recs = {"a": RECO_A, "empty": RECO_A.iloc[:0]}
    got = evaluate(recs, TEST, TRAIN, n_items=N_ITEMS, ks=(3, 2), bootstrap=300, seed=7)
    assert list(got.columns) == ["source", "k", *METRIC_COLUMNS, "ndcg_low", "ndcg_high"]
    pd.testing.assert_frame_equal(got[result.columns], result)
    table = HitTable.build(RECO_A, 3, test=TEST, users=np.array([1, 2, 3]))
    for k in (2, 3):
        r = row(got, "a", k)
        expected = bootstrap_interval(NDCG(k).per_user_from(table), n_boot=300, seed=7)
        assert (r["ndcg_low"], r["ndcg_high"]) == pytest.approx(expected)
        # three users: the resampled means lie between the smallest and largest user value
        assert 0.0 <= r["ndcg_low"] < r["ndcg"] < r["ndcg_high"] <= 1.0
    assert (row(got, "empty", 3)["ndcg_low"], row(got, "empty", 3)["ndcg_high"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="bootstrap"):
        evaluate(recs, TEST, TRAIN, n_items=N_ITEMS, bootstrap=-1)


# --- segments ----------------------------------------------------------------------------------


def test_segments_match_evaluate_on_the_segment_users() -> None:
    recs = {"a": RECO_A, "empty": RECO_A.iloc[:0]}
    # s2: u3 (evaluated, no list), u4 (list, no test events), u5 (list, cold)
    segments = {"s1": np.array([1, 2]), "s2": np.array([3, 4, 5])}
    kw = {"n_items": N_ITEMS, "ks": (2, 3), "bootstrap": 100, "seed": 3}
    got = evaluate(recs, TEST, TRAIN, segments=segments, **kw)
    plain = evaluate(recs, TEST, TRAIN, **kw)
    assert list(got.columns) == ["segment", *plain.columns]
    assert list(dict.fromkeys(got["segment"])) == ["all", "s1", "s2"]
    part = got[got["segment"] == "all"].drop(columns="segment").reset_index(drop=True)
    pd.testing.assert_frame_equal(part, plain)
    for name, ids in segments.items():
        cut = {s: r[r["user_id"].isin(ids)] for s, r in recs.items()}
        alone = evaluate(cut, TEST[TEST["user_id"].isin(ids)], TRAIN, **kw)
        part = got[got["segment"] == name].drop(columns="segment").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone)
    # by hand, s1 at k=2: u1 and u2 (see test_accuracy_at_2); coverage counts their lists only:
    # {20, 99} and {10, 30} -> 4 / 10 (all users: 5 / 10)
    s1 = got[(got["segment"] == "s1") & (got["source"] == "a") & (got["k"] == 2)].iloc[0]
    assert s1["precision"] == pytest.approx(0.5)
    assert s1["ndcg"] == pytest.approx((1 / (1 + 1 / L3) + 1 / L3) / 2)
    assert s1["coverage"] == pytest.approx(0.4)
    assert s1["users_covered"] == 1.0
    # s2 at k=2: u3 alone is evaluated and has no list; lists of u4 {11}, u5 {20} -> 2 / 10
    s2 = got[(got["segment"] == "s2") & (got["source"] == "a") & (got["k"] == 2)].iloc[0]
    assert s2["precision"] == 0.0 and s2["users_covered"] == 0.0
    assert s2["coverage"] == pytest.approx(0.2)
    assert math.isnan(s2["novelty"])


def test_segment_without_evaluated_users_and_reserved_name() -> None:
    got = evaluate({"a": RECO_A}, TEST, TRAIN, N_ITEMS, ks=(2,), segments={"none": np.array([4])})
    r = got[got["segment"] == "none"].iloc[0]
    assert math.isnan(r["precision"]) and math.isnan(r["ndcg"])
    assert r["coverage"] == pytest.approx(0.1)  # u4's list {11}
    with pytest.raises(ValueError, match="reserved"):
        evaluate({"a": RECO_A}, TEST, TRAIN, N_ITEMS, segments={"all": np.array([1])})


def test_activity_segments_terciles(caplog: pytest.LogCaptureFixture) -> None:
    # train events: u1..u6 have 1..6 events, u7 none, u8 has 20 but is not among the users.
    pairs = [(u, 100 + t) for u in range(1, 7) for t in range(u)] + [(8, t) for t in range(20)]
    users = np.array([7, 1, 2, 3, 4, 5, 6, 6])  # any order, repeats ignored
    # counts of the 7 users, sorted: 0 1 2 3 4 5 6 -> 1/3 quantile at position 2 = 2,
    # 2/3 quantile at position 4 = 4: light <= 2 < medium <= 4 < heavy
    with caplog.at_level("INFO", logger="musicrec.metrics"):
        got = activity_segments(events(pairs), users)
    assert list(got) == ["light", "medium", "heavy"]
    assert got["light"].tolist() == [1, 2, 7]
    assert got["medium"].tolist() == [3, 4]
    assert got["heavy"].tolist() == [5, 6]
    assert "light <= 2 < medium <= 4 < heavy" in caplog.text
    # terciles are of the given users: without u7, counts 1..6 -> cuts 2.667 and 4.333
    got = activity_segments(events(pairs), np.arange(1, 7))
    assert [len(got[s]) for s in ("light", "medium", "heavy")] == [2, 2, 2]


# --- candidate recall --------------------------------------------------------------------------

# Train: u1 heard 10, 11; u2 heard 12; u3 heard 13; u9 heard 10 (no test events).
TRAIN_C = events([(1, 10), (1, 11), (2, 12), (3, 13), (9, 10)])
# Test: u1 -> {20, 21, 10}, but 10 was heard in train: out of the denominator; u2 -> {30};
# u3 -> {40, 41}; u7 is cold. Evaluated: u1, u2, u3; relevant pairs: 2 + 1 + 2 = 5.
TEST_C = events([(1, 20), (1, 21), (1, 10), (2, 30), (3, 40), (3, 41), (7, 20)])
# a: u1 -> 20 (hit), 10 (heard test pair: not a hit), 99; u2 -> 31; u3 -> 40 (hit); u7 ignored
CAND_A = reco([(1, 1, 20), (1, 2, 10), (1, 3, 99), (2, 1, 31), (3, 1, 40), (7, 1, 20)])
# b: u1 -> 21 (hit), 20 (hit, also in a); u2 -> 30 (hit); u3 -> 98
CAND_B = reco([(1, 1, 21), (1, 2, 20), (2, 1, 30), (3, 1, 98)])


def test_candidate_recall_by_hand() -> None:
    got = candidate_recall({"a": CAND_A, "b": CAND_B}, TEST_C, TRAIN_C, k=3).set_index("source")
    assert list(got.reset_index().columns) == list(CANDIDATE_COLUMNS)
    assert list(got.index) == ["a", "b", "union"]
    # pairs: a 3 + 1 + 1 = 5; b 2 + 1 + 1 = 4; union u1 {20, 10, 99, 21}, u2 {31, 30},
    # u3 {40, 98} = 8 (20 of u1 is in both)
    assert got["pairs"].tolist() == [5, 4, 8]
    assert got["per_user"].tolist() == pytest.approx([5 / 3, 4 / 3, 8 / 3])
    assert (got["relevant"] == 5).all()
    # hits: a {(1, 20), (3, 40)}; b {(1, 21), (1, 20), (2, 30)}; union 4 of 5
    assert got["hits"].tolist() == [2, 3, 4]
    assert got["recall"].tolist() == pytest.approx([0.4, 0.6, 0.8])
    # ceiling@3; ideal DCG of min(3, |test items|) with |test items| counting the heard one:
    # u1 3 items -> I3, u2 1 -> 1, u3 2 -> I2
    i2, i3 = 1 + 1 / L3, 1 + 1 / L3 + 0.5
    assert got.loc["a", "ceiling_ndcg"] == pytest.approx((1 / i3 + 0 + 1 / i2) / 3)
    assert got.loc["b", "ceiling_ndcg"] == pytest.approx((i2 / i3 + 1 + 0) / 3)
    assert got.loc["union", "ceiling_ndcg"] == pytest.approx((i2 / i3 + 1 + 1 / i2) / 3)
    # at k=1 every user has a hit in the union: a perfect ordering scores 1
    at1 = candidate_recall({"a": CAND_A, "b": CAND_B}, TEST_C, TRAIN_C, k=1)
    assert at1["ceiling_ndcg"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_candidate_recall_users_and_repeated_pairs() -> None:
    repeated = pd.concat([CAND_A, reco([(1, 4, 20)])])  # (1, 20) listed twice counts once
    got = candidate_recall({"a": repeated}, TEST_C, TRAIN_C, users=np.array([1, 2]), k=3)
    # users u1, u2: relevant {(1, 20), (1, 21), (2, 30)}; a has (1, 20) -> 1 / 3
    a = got.set_index("source").loc["a"]
    assert (a["pairs"], a["hits"], a["relevant"]) == (4, 1, 3)
    assert a["recall"] == pytest.approx(1 / 3)
    assert got.set_index("source").loc["union", "pairs"] == 4
    with pytest.raises(DataError, match="no evaluated user"):
        candidate_recall({"a": CAND_A}, events([(9, 1)]), events([(8, 1)]))


def _brute_candidates(
    cands: dict[str, pd.DataFrame], test: pd.DataFrame, train: pd.DataFrame, k: int
) -> dict[str, tuple[int, int, float]]:
    """(pairs, hits, ceiling) per source and for the union, as a plain loop per user."""
    heard = train.groupby("user_id").track_id.apply(set)
    test_sets = test.groupby("user_id").track_id.apply(set)
    users = [u for u in test_sets.index if u in heard.index]
    sets = {name: c.groupby("user_id").track_id.apply(set) for name, c in cands.items()}
    lists = {name: {u: s.get(u, set()) for u in users} for name, s in sets.items()}
    lists["union"] = {u: set().union(*(lists[name][u] for name in sets)) for u in users}
    ideal = [sum(1 / math.log2(i + 2) for i in range(n)) for n in range(k + 1)]
    out = {}
    for name, by_user in lists.items():
        pairs = hits = 0
        ceiling = 0.0
        for u in users:
            h = len(by_user[u] & (test_sets[u] - heard[u]))
            pairs += len(by_user[u])
            hits += h
            ceiling += ideal[min(h, k)] / ideal[min(k, len(test_sets[u]))]
        out[name] = (pairs, hits, ceiling / len(users))
    return out


def test_candidate_recall_matches_a_plain_loop_and_bounds_ndcg() -> None:
    rng = np.random.default_rng(8)
    n_users, n_tracks = 50, 60

    def random_events(n: int) -> pd.DataFrame:
        pairs = {(int(u), int(t)) for u, t in rng.integers(0, [n_users, n_tracks], (n, 2))}
        return events(sorted(pairs))

    def random_lists(every: int, length: int) -> pd.DataFrame:
        rows = [
            (u, rank, int(t))
            for u in range(0, n_users, every)
            for rank, t in enumerate(rng.choice(n_tracks, length, replace=False), start=1)
        ]
        return reco(rows)

    train, test = random_events(700), random_events(400)
    cands = {"x": random_lists(1, 15), "y": random_lists(2, 25)}
    got = candidate_recall(cands, test, train, k=5).set_index("source")
    expected = _brute_candidates(cands, test, train, k=5)
    n_relevant = sum(
        len(set(g.track_id) - set(train.track_id[train.user_id == u]))
        for u, g in test.groupby("user_id")
        if u in set(train.user_id)
    )
    for name, (pairs, hits, ceiling) in expected.items():
        assert got.loc[name, "pairs"] == pairs, name
        assert got.loc[name, "hits"] == hits, name
        assert got.loc[name, "recall"] == pytest.approx(hits / n_relevant), name
        assert got.loc[name, "ceiling_ndcg"] == pytest.approx(ceiling), name
    assert got.loc["union", "recall"] > max(got.loc["x", "recall"], got.loc["y", "recall"])
    # any ordering of x's candidates (heard tracks dropped) scores at most the ceiling
    x = cands["x"].merge(train, on=["user_id", "track_id"], how="left", indicator=True)
    x = x[x["_merge"] == "left_only"].drop(columns="_merge")
    x["rank"] = x.groupby("user_id").cumcount() + 1
    ndcg = evaluate({"x": x}, test, train, n_items=n_tracks, ks=(5,))["ndcg"].iloc[0]
    assert 0 < ndcg <= got.loc["x", "ceiling_ndcg"]


def test_artist_variety_rows_by_hand() -> None:
    from musicrec.metrics import VARIETY_COLUMNS, artist_variety

    # user 1: tracks 10, 11, 12 by artists 5, 5, 6 -> diversity 2/3, top share 2/3
    # user 2: tracks 12, 13 by 6 and unknown (13 not in the table) -> 1.0, 1/2
    recs = reco([(1, 1, 10), (1, 2, 11), (1, 3, 12), (2, 1, 12), (2, 2, 13), (2, 3, 10)])
    table = artist_variety({"a": recs}, np.array([12, 11, 10]), np.array([6, 5, 5]), ks=(2, 3))
    assert list(table.columns) == list(VARIETY_COLUMNS)
    at3 = table[table["k"] == 3].iloc[0]
    # user 2 at k=3: artists 6, unknown, 5 -> 1.0 and 1/3
    assert at3["diversity"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert at3["top_artist_share"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # slots with a known artist: 5, 5, 6, 6, 5 of 6 slots; the top ten artists hold all five
    assert at3["top10_artists_share"] == pytest.approx(5 / 6)
    at2 = table[table["k"] == 2].iloc[0]
    assert at2["diversity"] == pytest.approx((0.5 + 1.0) / 2)
    assert at2["users"] == 2


def test_variety_of_many_lists_equals_the_one_list_functions() -> None:
    from musicrec.metrics import _variety_per_list, list_concentration, list_diversity

    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 12, 300)
    users = np.repeat(np.arange(300) * 7, lengths)
    artist = rng.integers(-1, 6, users.size)  # -1: unknown
    diversity, concentration = _variety_per_list(users, artist)
    bounds = np.r_[0, np.cumsum(lengths)]
    lists = [artist[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    np.testing.assert_allclose(diversity, [list_diversity(a) for a in lists])
    np.testing.assert_allclose(concentration, [list_concentration(a) for a in lists])
