"""Array helpers: id index, grouped history, row gathers, top-k per group."""

import numpy as np
import pandas as pd

from musicrec.features import (
    IdIndex,
    build_history,
    days_decay,
    gather_rows,
    top_k_per_group,
)


def test_id_index_dense_and_sparse_ids() -> None:
    for ids in (np.array([3, 8, 20]), np.array([3, 8, 3_000_000_000])):  # lookup / search
        index = IdIndex(ids)
        assert index.codes(np.array([20, 3, 4, 8, -1, 3_000_000_000])).tolist() == (
            [2, 0, -1, 1, -1, -1] if ids[-1] == 20 else [-1, 0, -1, 1, -1, 2])
    assert IdIndex.from_values(np.array([9, 2, 9, 5], np.int32)).ids.tolist() == [2, 5, 9]


def test_history_groups_users_and_keeps_time_order() -> None:
    # not grouped by user: the fallback orders by user, then day
    events = pd.DataFrame({"user_id": np.array([7, 3, 7, 3], np.int32),
                           "track_id": np.array([50, 60, 40, 50], np.int32),
                           "day": np.array([12, 11, 10, 13], np.int16)})
    history = build_history(events, cutoff=14)
    assert history.users.ids.tolist() == [3, 7]
    assert history.tracks.ids.tolist() == [40, 50, 60]
    assert history.indptr.tolist() == [0, 2, 4]
    # user 3: 60 (day 11), 50 (day 13); user 7: 40 (day 10), 50 (day 12)
    assert history.tracks.ids[history.track_codes].tolist() == [60, 50, 40, 50]
    assert history.days.tolist() == [11, 13, 10, 12]


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


def test_history_subset_keeps_users_events_and_track_codes() -> None:
    events = pd.DataFrame({"user_id": np.array([1, 1, 2, 3, 3, 3], np.int32),
                           "track_id": np.array([10, 11, 10, 12, 13, 10], np.int32),
                           "day": np.array([1, 2, 3, 4, 5, 6], np.int16)})
    history = build_history(events, cutoff=7)
    sub = history.subset(np.array([0, 2]))  # users 1 and 3
    np.testing.assert_array_equal(sub.users.ids, [1, 3])
    np.testing.assert_array_equal(sub.indptr, [0, 2, 5])
    np.testing.assert_array_equal(sub.tracks.ids[sub.track_codes], [10, 11, 12, 13, 10])
    np.testing.assert_array_equal(sub.days, [1, 2, 4, 5, 6])
    assert sub.n_tracks == history.n_tracks and sub.cutoff == 7
