"""The listening log grouped by user: id index, grouping, subsets."""

import numpy as np
import pandas as pd

from musicrec.listens import IdIndex, build_listens


def test_id_index_dense_and_sparse_ids() -> None:
    for ids in (np.array([3, 8, 20]), np.array([3, 8, 3_000_000_000])):  # lookup / search
        index = IdIndex(ids)
        assert index.codes(np.array([20, 3, 4, 8, -1, 3_000_000_000])).tolist() == (
            [2, 0, -1, 1, -1, -1] if ids[-1] == 20 else [-1, 0, -1, 1, -1, 2]
        )
    assert IdIndex.from_values(np.array([9, 2, 9, 5], np.int32)).ids.tolist() == [2, 5, 9]


def test_listens_groups_users_and_keeps_time_order() -> None:
    # not grouped by user: the fallback orders by user, then day
    events = pd.DataFrame(
        {
            "user_id": np.array([7, 3, 7, 3], np.int32),
            "track_id": np.array([50, 60, 40, 50], np.int32),
            "day": np.array([12, 11, 10, 13], np.int16),
        }
    )
    listens = build_listens(events, cutoff=14)
    assert listens.users.ids.tolist() == [3, 7]
    assert listens.tracks.ids.tolist() == [40, 50, 60]
    assert listens.indptr.tolist() == [0, 2, 4]
    # user 3: 60 (day 11), 50 (day 13); user 7: 40 (day 10), 50 (day 12)
    assert listens.tracks.ids[listens.track_codes].tolist() == [60, 50, 40, 50]
    assert listens.days.tolist() == [11, 13, 10, 12]


def test_listens_subset_keeps_users_events_and_track_codes() -> None:
    events = pd.DataFrame(
        {
            "user_id": np.array([1, 1, 2, 3, 3, 3], np.int32),
            "track_id": np.array([10, 11, 10, 12, 13, 10], np.int32),
            "day": np.array([1, 2, 3, 4, 5, 6], np.int16),
        }
    )
    listens = build_listens(events, cutoff=7)
    sub = listens.subset(np.array([0, 2]))  # users 1 and 3
    np.testing.assert_array_equal(sub.users.ids, [1, 3])
    np.testing.assert_array_equal(sub.indptr, [0, 2, 5])
    np.testing.assert_array_equal(sub.tracks.ids[sub.track_codes], [10, 11, 12, 13, 10])
    np.testing.assert_array_equal(sub.days, [1, 2, 4, 5, 6])
    assert sub.n_tracks == listens.n_tracks and sub.cutoff == 7
