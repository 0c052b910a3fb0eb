"""Quality on data that is not the generator's home ground: for each generator profile
(years of month-granular dates, a small dense catalogue, weak artist loyalty, repeated
listens) the whole pipeline runs and the list it serves must beat top popular on that
profile's own held-out future, by the lower end of its bootstrap interval.

These are the slowest tests of the suite (a whole run per profile, with a small search)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from musicrec import io, pipeline
from musicrec.generate import generate
from musicrec.prepare import prepare_files
from musicrec.settings import Settings

PROFILES = ["multi_year", "small_dense", "weak_loyalty", "repeat_listens"]
# a bounded search keeps each run under a minute or so on two cores
FAST = {
    "search_trials": 3,
    "ease_max_items": 1000,
    "als_iterations": 8,
    "bootstrap": 200,
    "ranker_iterations": 150,
    "threads": 2,
}
MIN_RATIO = 1.3  # served NDCG@10 / top popular NDCG@10


@pytest.mark.parametrize("preset", PROFILES)
def test_served_list_beats_top_popular_on_the_profiles_future(preset: str, tmp_path: Path) -> None:
    generate(preset, tmp_path / "data", seed=11)
    settings = Settings(
        data_dir=tmp_path / "data", parquet_dir=tmp_path / "parquet", seed=11, **FAST
    )
    prepare_files(settings.data_dir, settings.parquet_dir, settings)
    manifest = pipeline.run_all(settings)
    metrics = pd.read_parquet(settings.parquet_dir / io.METRICS)
    at10 = metrics[(metrics["k"] == 10) & (metrics["segment"] == "all")].set_index("source")
    served, popular = at10.loc["served"], at10.loc["popular"]
    selection = manifest["selection"]
    assert served["ndcg"] >= MIN_RATIO * popular["ndcg"], (preset, selection["reason"])
    assert served["ndcg_low"] > popular["ndcg"], (preset, selection["reason"])
    # never served: a model that loses to a simpler one on validation
    scores = selection["ndcg@10"]
    assert scores[selection["winner"]]["ndcg"] == max(s["ndcg"] for s in scores.values())
