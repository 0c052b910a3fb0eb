"""The whole pipeline on the generated ``tiny`` preset: every artefact, its schema, the
manifest, and a failed run that leaves the previous artefact set untouched."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musicrec import io, pipeline
from musicrec.generate import generate
from musicrec.prepare import prepare_files
from musicrec.settings import Settings
from musicrec.sources import AlsSource, make_source

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
    settings = Settings(
        data_dir=root / "data",
        parquet_dir=root / "parquet",
        als_factors=16,
        als_iterations=5,
        ranker_iterations=30,
        n_similar=20,
        threads=2,
        seed=5,
        search_trials=2,
        ease_max_items=300,
        bootstrap=50,
        ranker_min_positives=20,
    )
    return settings, pipeline.run_all(settings)


def test_every_artefact_with_its_schema(built: tuple[Settings, dict]) -> None:
    settings, _ = built
    parquet = Path(settings.parquet_dir)
    for name, schema in SCHEMAS.items():
        table = pq.read_table(parquet / name)
        assert table.schema.equals(schema, check_metadata=False), name
        assert table.num_rows > 0, name
    for name in (io.METRICS, io.CANDIDATE_RECALL, io.METRICS_PNG, io.MANIFEST):
        assert (parquet / name).stat().st_size > 0, name
    # the ranker is kept whenever one was trained (the report shows it even where it lost)
    trained = "ranker" in io.read_json(parquet / io.MANIFEST)["selection"]["ndcg@10"]
    assert (parquet / io.RANKER_MODEL).exists() == trained
    assert not list(parquet.glob(".staging-*"))


def test_served_lists_are_sorted_unheard_and_cover_every_user_of_the_whole_log(
    built: tuple[Settings, dict],
) -> None:
    """What is served is refitted on every event, the test period included."""
    settings, _ = built
    parquet = Path(settings.parquet_dir)
    history = io.read_events(parquet / io.EVENTS)
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
    best = similar[similar["rank"] == 1]["score"].to_numpy()
    np.testing.assert_allclose(best, 1.0, rtol=1e-6)  # scaled to each track's best neighbour
    assert similar["score"].between(0, 1 + 1e-6).all()


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
    assert {"popular", "als", "item_knn", "ease", "artist", "served"} <= sources
    assert {row["k"] for row in on_disk["metrics"]} == set(settings.eval_k)
    assert set(on_disk["search"]) == set(settings.sources)
    assert all(len(choice["trials"]) == 2 for choice in on_disk["search"].values())
    selection = on_disk["selection"]
    scores = selection["ndcg@10"]
    assert selection["winner"] == max(scores, key=lambda name: scores[name]["ndcg"])
    assert scores[selection["winner"]]["ndcg"] >= scores["popular"]["ndcg"]


def test_the_report_scores_the_served_list_with_intervals(built: tuple[Settings, dict]) -> None:
    settings, manifest = built
    metrics = pd.read_parquet(Path(settings.parquet_dir) / io.METRICS)
    all_users = metrics[metrics["segment"] == "all"].set_index(["source", "k"])
    winner = manifest["selection"]["winner"]
    served = all_users.loc[("served", 10)]
    assert served["ndcg"] == all_users.loc[(winner, 10), "ndcg"]
    assert served["ndcg_low"] <= served["ndcg"] <= served["ndcg_high"]
    assert {"light", "medium", "heavy"} <= set(metrics["segment"])
    # artist variety of every list: a share of distinct artists, and the top artist's share
    assert 0 < served["diversity"] <= 1 and 0 < served["top_artist_share"] <= 1
    assert metrics[metrics["segment"] == "light"]["diversity"].isna().all()
    recall = pd.read_parquet(Path(settings.parquet_dir) / io.CANDIDATE_RECALL)
    union = recall.set_index("source").loc["union", "recall"]
    assert union >= recall.set_index("source").drop("union")["recall"].max()


def test_a_failed_run_leaves_the_previous_set(
    built: tuple[Settings, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, manifest = built
    parquet = Path(settings.parquet_dir)
    before = {
        name: (parquet / name).read_bytes()
        for name in (io.RECOMMENDATIONS, io.TOP_POPULAR, io.MANIFEST)
    }

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
    pipeline.run_stage("serve", settings)
    top = pd.read_parquet(parquet / io.TOP_POPULAR)
    assert top["rank"].tolist() == list(range(1, len(top) + 1))
    manifest = io.read_json(parquet / io.MANIFEST)
    assert manifest["run_id"].startswith("stage-serve")
    # the service maps the new lists, not a served form left by the previous run
    recorded = manifest["artefacts"]
    mapped = [name for name, entry in recorded.items() if "crc32" in entry]
    assert mapped and all(
        (parquet / name).stat().st_size == recorded[name]["bytes"] for name in mapped
    )
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run_stage("nope", settings)


def test_search_on_a_user_sample(
    built: tuple[Settings, dict], caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = built
    sampled = settings.model_copy(
        update={"search_train_users": 400, "search_users": 100, "search_trials": 1}
    )
    with caplog.at_level("INFO", logger="musicrec.pipeline"):
        pipeline.run_stage("search", sampled)
    assert "trials learn from 400 of" in caplog.text  # the 100 scored users among them
    search = io.read_json(Path(settings.parquet_dir) / pipeline.WORK_DIR / pipeline.SEARCH_JSON)
    assert set(search) == set(settings.sources)
    assert all(0 < choice["ndcg"] <= 1 for choice in search.values())
    # the sample fit of ALS is kept (best and plain trial) and the ranker's fit starts there
    run = pipeline.RunContext(sampled, Path(settings.parquet_dir))
    chosen = search["als"]["params"]
    state = run.load_state("search", "als", chosen)
    assert state is not None and state["user_ids"].size == 400
    assert run.load_state("search", "als_plain", AlsSource.space(settings)[0]) is not None
    caplog.clear()
    with caplog.at_level("INFO", logger="musicrec.pipeline"):
        pipeline.run_stage("rank", sampled.model_copy(update={"als_sample_start_iterations": 2}))
    fitted = [line for line in caplog.messages if line.startswith("fitted als(")]
    # judged on validation users, but never before two iterations: the first sets the mark
    assert len(fitted) == 1 and "(warm start, 2 iterations)" in fitted[0]


def test_without_a_ranker_the_best_source_is_served(tmp_path: Path) -> None:
    """Too few positives to train a ranker (a small real log): a source wins validation, is
    served, and the report's served row is that source's."""
    generate("tiny", tmp_path / "data", seed=6)
    prepare_files(tmp_path / "data", tmp_path / "parquet")
    settings = Settings(
        data_dir=tmp_path / "data",
        parquet_dir=tmp_path / "parquet",
        seed=6,
        als_iterations=5,
        search_trials=1,
        ease_max_items=300,
        bootstrap=50,
        ranker_min_positives=10**9,
        threads=2,
    )
    manifest = pipeline.run_all(settings)
    selection = manifest["selection"]
    assert "ranker" not in selection["ndcg@10"] and "no ranker" in selection["reason"]
    winner = selection["winner"]
    assert winner in settings.sources
    assert selection["ndcg@10"][winner]["ndcg"] >= selection["ndcg@10"]["popular"]["ndcg"]
    parquet = Path(settings.parquet_dir)
    assert not (parquet / io.RANKER_MODEL).exists()
    metrics = pd.read_parquet(parquet / io.METRICS)
    at10 = metrics[(metrics["k"] == 10) & (metrics["segment"] == "all")].set_index("source")
    assert "ranker" not in at10.index
    assert at10.loc["served", "ndcg"] == at10.loc[winner, "ndcg"]
    recs = pd.read_parquet(parquet / io.RECOMMENDATIONS)
    assert recs["rank"].min() == 1 and recs["user_id"].nunique() > 0


def test_refits_start_from_the_previous_cut_off(
    built: tuple[Settings, dict], caplog: pytest.LogCaptureFixture
) -> None:
    """The rank and evaluate stages save their ALS factors; the next stage starts from them,
    unless they were fitted with other parameters, and stops once its lists settle."""
    settings, _ = built
    run = pipeline.RunContext(settings, Path(settings.parquet_dir))
    assert (run.work / "rank-als.npz").exists() and (run.work / "evaluate-als.npz").exists()
    params = run.choices()["als"].params  # the last search of this module chose these
    state = make_source("als", settings, params).fit(run.train_data(None)).state()
    run.save_state("evaluate", "als", params, state)
    with caplog.at_level("INFO", logger="musicrec.pipeline"):
        pipeline.run_stage("serve", settings)
    fitted = [line for line in caplog.messages if line.startswith("fitted als(")]
    # factors fitted on this very log: the first iteration leaves the lists where they were
    assert settings.als_refit_iterations > 1
    assert len(fitted) == 1 and "(warm start, 1 iteration)" in fitted[0]
    saved = run.load_state("evaluate", "als", params)
    np.testing.assert_array_equal(saved["item_factors"], state["item_factors"])
    assert run.load_state("evaluate", "als", {**params, "factors": 3}) is None


def test_lists_are_written_a_batch_of_users_at_a_time(tmp_path: Path) -> None:
    from musicrec.listens import IdIndex, Listens
    from musicrec.sources import Lists

    listens = Listens(
        IdIndex(np.array([10, 20, 30, 40, 50])),
        IdIndex(np.array([7, 8, 9])),
        np.zeros(6, np.int64),
        np.zeros(0, np.int32),
        np.zeros(0, np.int16),
        5,
    )
    lists = Lists(
        np.array([0, 2, 2, 5, 6, 8]),  # the second user has an empty list
        np.array([2, 0, 1, 2, 0, 1, 0, 2], np.int32),
        np.array([0.9, 0.5, 0.8, 0.7, 0.1, 0.3, 0.6, 0.2], np.float32),
    )
    users = np.arange(5)
    assert lists.rows(2, 4).indptr.tolist() == [0, 3, 4]
    whole = pipeline._frame(lists, listens, users)
    pipeline._write_lists(lists, listens, users, tmp_path / "recs.parquet", batch_users=2)
    written = pq.read_table(tmp_path / "recs.parquet")
    assert written.schema.equals(io.RECS_SCHEMA)
    assert pq.ParquetFile(tmp_path / "recs.parquet").metadata.num_row_groups == 3
    pd.testing.assert_frame_equal(
        written.to_pandas(),
        pd.DataFrame(pa.Table.from_pandas(whole).cast(io.RECS_SCHEMA).to_pandas()),
    )
    assert written.column("rank").to_pylist() == [1, 2, 1, 2, 3, 1, 1, 2]
