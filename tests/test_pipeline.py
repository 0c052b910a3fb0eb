"""The whole pipeline on the generated ``tiny`` preset: every artefact, its schema, the
manifest, and a failed run that leaves the previous artefact set untouched."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from musicrec import io, pipeline
from musicrec.generate import generate
from musicrec.prepare import prepare_files
from musicrec.settings import Settings

SCHEMAS = {
    io.TOP_POPULAR: io.POPULAR_SCHEMA,
    io.PERSONAL_ALS: io.RECS_SCHEMA,
    io.RECOMMENDATIONS: io.RECS_SCHEMA,
    io.SIMILAR: io.SIMILAR_SCHEMA,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict]:
    root = tmp_path_factory.mktemp("tiny")
    generate("tiny", root / "data", seed=5)
    prepare_files(root / "data", root / "parquet")
    settings = Settings(data_dir=root / "data", parquet_dir=root / "parquet", als_factors=16,
                        als_iterations=5, ranker_iterations=30, n_similar=20, threads=2, seed=5)
    return settings, pipeline.run_all(settings)


def test_every_artefact_with_its_schema(built: tuple[Settings, dict]) -> None:
    settings, _ = built
    parquet = Path(settings.parquet_dir)
    for name, schema in SCHEMAS.items():
        table = pq.read_table(parquet / name)
        assert table.schema.equals(schema, check_metadata=False), name
        assert table.num_rows > 0, name
    for name in (io.RANKER_MODEL, io.METRICS, io.METRICS_PNG, io.MANIFEST):
        assert (parquet / name).stat().st_size > 0, name
    assert not list(parquet.glob(".staging-*"))


def test_lists_are_sorted_unheard_and_cover_users_with_history(
    built: tuple[Settings, dict],
) -> None:
    settings, manifest = built
    parquet = Path(settings.parquet_dir)
    events = io.read_events(parquet / io.EVENTS)
    test_start = io.date_to_day(manifest["split"]["test_start"])
    history = events[events["day"] < test_start]
    recs = pd.read_parquet(parquet / io.RECOMMENDATIONS)
    assert set(recs["user_id"]) == set(history["user_id"])
    assert recs.groupby("user_id")["rank"].max().max() <= settings.n_recommendations
    assert recs["user_id"].is_monotonic_increasing
    keys = recs["user_id"].astype(np.int64) * 2**32 + recs["track_id"]
    heard = history["user_id"].astype(np.int64) * 2**32 + history["track_id"]
    assert not np.isin(keys, heard).any()
    assert keys.is_unique
    similar = pd.read_parquet(parquet / io.SIMILAR)
    assert (similar["track_id"] != similar["similar_track_id"]).all()


def test_manifest_records_the_run(built: tuple[Settings, dict]) -> None:
    settings, manifest = built
    parquet = Path(settings.parquet_dir)
    on_disk = io.read_json(parquet / io.MANIFEST)
    assert on_disk["run_id"] == manifest["run_id"]
    assert set(on_disk["input_files"]) == set(io.INPUT_FILES)
    assert on_disk["parameters"]["als_factors"] == 16
    split = on_disk["split"]
    assert split["label_start"] < split["test_start"] <= split["last_day"]
    assert set(on_disk["stage_seconds"]) == set(pipeline.STAGES)
    for name in (io.TOP_POPULAR, io.PERSONAL_ALS, io.SIMILAR, io.RECOMMENDATIONS, io.METRICS):
        entry = on_disk["artefacts"][name]
        assert entry["rows"] == pq.ParquetFile(parquet / name).metadata.num_rows
        assert entry["bytes"] == (parquet / name).stat().st_size
    sources = {row["source"] for row in on_disk["metrics"]}
    assert {"top_popular", "als", "ranker"} <= sources
    assert {row["k"] for row in on_disk["metrics"]} == set(settings.eval_k)


def test_a_failed_run_leaves_the_previous_set(
    built: tuple[Settings, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, manifest = built
    parquet = Path(settings.parquet_dir)
    before = {name: (parquet / name).read_bytes() for name in
              (io.RECOMMENDATIONS, io.TOP_POPULAR, io.MANIFEST)}

    def broken(run: pipeline.RunContext) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "evaluate", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pipeline.run_all(settings)
    after = {name: (parquet / name).read_bytes() for name in before}
    assert after == before
    assert not list(parquet.glob(".staging-*"))


def test_a_single_stage_runs_alone(built: tuple[Settings, dict]) -> None:
    settings, _ = built
    parquet = Path(settings.parquet_dir)
    pipeline.run_stage("popular", settings)
    top = pd.read_parquet(parquet / io.TOP_POPULAR)
    assert top["rank"].tolist() == list(range(1, len(top) + 1))
    assert io.read_json(parquet / io.MANIFEST)["run_id"].startswith("stage-popular")
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run_stage("nope", settings)
