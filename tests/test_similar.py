"""Similar tracks: cosine of the item factors, never the track itself, sorted."""

import numpy as np
import pandas as pd

from musicrec.als import als_from_factors
from musicrec.similar import similar_tracks

# four tracks in 2-d: 10 and 11 point almost the same way, 12 is orthogonal, 13 opposite 10
ITEM_FACTORS = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]], np.float32)
TRACK_IDS = np.array([10, 11, 12, 13], np.int32)


def model():
    users = np.ones((1, 2), np.float32)
    return als_from_factors(users, ITEM_FACTORS, np.array([1], np.int32), TRACK_IDS, None)


def cosine(a: int, b: int) -> float:
    x, y = ITEM_FACTORS[a], ITEM_FACTORS[b]
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_no_self_sorted_with_cosine_scores() -> None:
    table = similar_tracks(model(), n=2)
    assert table["track_id"].tolist() == [10, 10, 11, 11, 12, 12, 13, 13]
    assert (table["track_id"] != table["similar_track_id"]).all()
    assert table["rank"].tolist() == [1, 2] * 4
    first = table[table["track_id"] == 10]
    assert first["similar_track_id"].tolist() == [11, 12]
    np.testing.assert_allclose(first["score"], [cosine(0, 1), 0.0], atol=1e-6)
    assert table.groupby("track_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert table.dtypes.astype(str).tolist() == ["int32", "int32", "float32", "int16"]


def test_only_requested_tracks_and_n_capped_by_catalogue() -> None:
    table = similar_tracks(model(), n=10, track_ids=np.array([13, 99]))  # 99 is unknown
    assert table["track_id"].tolist() == [13, 13, 13]
    assert table["similar_track_id"].tolist() == [12, 11, 10]
    np.testing.assert_allclose(table["score"], [0.0, cosine(3, 1), -1.0], atol=1e-6)
    assert isinstance(table, pd.DataFrame)
