"""Array primitives: distinct values, sorted membership, positions in groups and rows, row
gathers, top-k per group, time decay."""

import numpy as np

from musicrec.arrays import (
    days_decay,
    distinct,
    gather_rows,
    group_starts,
    in_sorted,
    lookup_sorted,
    rank_in_groups,
    rank_in_rows,
    top_k_per_group,
)


def test_gather_rows() -> None:
    indptr = np.array([0, 2, 2, 5])
    positions, local = gather_rows(indptr, np.array([2, 0, 1]))
    assert positions.tolist() == [2, 3, 4, 0, 1]
    assert local.tolist() == [0, 0, 0, 1, 1]


def test_top_k_per_group_with_ties() -> None:
    groups = np.array([1, 0, 1, 1, 0])
    scores = np.array([0.5, 0.2, 0.9, 0.5, 0.7])
    tiebreak = np.array([30, 10, 20, 10, 40])
    idx, rank = top_k_per_group(groups, scores, 2, tiebreak)
    assert idx.tolist() == [4, 1, 2, 3]  # group 0: 0.7, 0.2; group 1: 0.9, then tie 0.5 -> id 10
    assert rank.tolist() == [1, 2, 1, 2]


def test_days_decay() -> None:
    np.testing.assert_allclose(days_decay(np.array([0, 30, 60]), 30.0), [1.0, 0.5, 0.25])


def test_top_k_per_group_keeps_input_order_on_ties_and_handles_negative_scores() -> None:
    groups = np.array([0, 0, 0, 1, 1])
    scores = np.array([-0.5, 2.0, -0.5, -3.0, -1.0], np.float32)
    idx, rank = top_k_per_group(groups, scores, 3)
    assert idx.tolist() == [1, 0, 2, 4, 3]
    assert rank.tolist() == [1, 2, 3, 1, 2]


def test_group_starts_and_rank_in_groups() -> None:
    groups = np.array([7, 7, 3, 3, 3, 7])  # contiguous, not sorted: the last 7 is a new run
    assert group_starts(groups).tolist() == [True, False, True, False, False, True]
    assert rank_in_groups(groups).tolist() == [0, 1, 0, 1, 2, 0]
    assert rank_in_groups(np.zeros(0, np.int32)).tolist() == []
    assert group_starts(np.zeros(0, np.int32)).tolist() == []


def test_rank_in_rows() -> None:
    assert rank_in_rows(np.array([0, 2, 2, 5])).tolist() == [0, 1, 0, 1, 2]
    assert rank_in_rows(np.array([3, 4, 6])).tolist() == [0, 0, 1]  # a slice of a layout
    assert rank_in_rows(np.array([0])).tolist() == []


def test_in_sorted() -> None:
    values = np.array([2, 5, 9])
    assert in_sorted(values, np.array([9, 1, 5, 10, 2])).tolist() == [
        True,
        False,
        True,
        False,
        True,
    ]
    assert in_sorted(values[:0], np.array([1, 2])).tolist() == [False, False]
    rng = np.random.default_rng(0)
    big, queries = np.unique(rng.integers(0, 1000, 300)), rng.integers(-5, 1005, 500)
    np.testing.assert_array_equal(in_sorted(big, queries), np.isin(queries, big))


def test_distinct() -> None:
    assert distinct(np.array([3, 1, 3, 2, 1])).tolist() == [1, 2, 3]
    assert distinct(np.array([4])).tolist() == [4]
    assert distinct(np.zeros(0, np.int64)).tolist() == []


def test_lookup_sorted() -> None:
    values = np.array([2, 5, 9], np.int32)
    assert lookup_sorted(values, np.array([9, 1, 5, 10, 2], np.int32)).tolist() == [2, -1, 1, -1, 0]
    assert lookup_sorted(values[:0], np.array([1])).tolist() == [-1]
    assert lookup_sorted(values, np.array([[2, 3], [5, 9]])).tolist() == [[0, -1], [1, 2]]
