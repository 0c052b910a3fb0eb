"""Top popular: distinct listeners, recent window first, overall listeners as fallback."""

import numpy as np
import pandas as pd

from musicrec.popular import popular_for_users, top_popular


def events(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    user, track, day = zip(*rows, strict=True)
    return pd.DataFrame({"user_id": np.array(user, np.int32),
                         "track_id": np.array(track, np.int32),
                         "day": np.array(day, np.int16)})


LOG = events([
    # track 10: three listeners, all long ago
    (1, 10, 100), (2, 10, 101), (3, 10, 102),
    # track 20: two listeners inside the 5-day window ending on day 200
    (1, 20, 199), (2, 20, 196),
    # track 30: one listener in the window, one exactly on its edge (day 195 is outside)
    (3, 30, 200), (4, 30, 195),
    # track 40: one old listener
    (4, 40, 150),
])


def test_order_scores_and_fallback() -> None:
    top = top_popular(LOG, window_days=5, last_day=200)
    assert top["track_id"].tolist() == [20, 30, 10, 40]
    assert top["score"].tolist() == [2.0, 1.0, 0.0, 0.0]  # recent listeners
    assert top["listeners"].tolist() == [2, 2, 3, 1]  # overall, breaks the 0-score tie
    assert top["rank"].tolist() == [1, 2, 3, 4]
    assert top.dtypes.astype(str).tolist() == ["int32", "int64", "float32", "int32"]


def test_a_wider_window_changes_the_order() -> None:
    top = top_popular(LOG, window_days=120, last_day=200)  # days 81..200: everything
    assert top["track_id"].tolist() == [10, 20, 30, 40]
    assert top["score"].tolist() == [3.0, 2.0, 2.0, 1.0]


def test_window_without_events_falls_back_to_all_listeners() -> None:
    top = top_popular(LOG, window_days=5, last_day=400)
    assert top["track_id"].tolist() == [10, 20, 30, 40]
    assert top["score"].tolist() == [3.0, 2.0, 2.0, 1.0]


def test_popular_for_users_skips_heard_tracks() -> None:
    top = top_popular(LOG, window_days=5, last_day=200)
    recs = popular_for_users(top, np.array([4, 1]), heard=LOG, n=2)
    # user 1 heard 10 and 20; user 4 heard 30 and 40
    assert recs["user_id"].tolist() == [1, 1, 4, 4]
    assert recs["track_id"].tolist() == [30, 40, 20, 10]
    assert recs["rank"].tolist() == [1, 2, 1, 2]
