"""One typed settings object for every path and parameter (env prefix ``MUSICREC_``).

Build it with ``Settings()`` (reads the environment and ``.env``) or ``Settings(**overrides)``
and pass it in; nothing in the package reads a global.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# tiny / small / full: sizes of the real log's shape; the others are profiles of other log
# shapes (musicrec.generate.PRESETS says what each one changes)
Preset = Literal[
    "tiny", "small", "full", "multi_year", "small_dense", "weak_loyalty", "repeat_listens"
]


class Settings(BaseSettings):
    """Every path and parameter of the pipeline and the service."""

    model_config = SettingsConfigDict(
        env_prefix="MUSICREC_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_parse_none_str="null",  # MUSICREC_REPORT_USERS=null: None, as `--set x=null`
    )

    # --- locations -------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="folder with the three input parquet files")
    parquet_dir: Path = Field(Path("parquet"), description="folder of the artefacts")

    # --- built-in data generator -----------------------------------------------------------
    preset: Preset = Field(
        "small",
        description="generated data set: a size of the real log's shape (tiny, small, full) "
        "or a profile of another shape (multi_year, small_dense, weak_loyalty, repeat_listens)",
    )
    seed: int = Field(42, description="random seed of the generator and of every model")

    # --- the real data (public bucket) -----------------------------------------------------
    source_endpoint_url: str = Field(
        "https://storage.yandexcloud.net",
        description="endpoint of the public bucket `download` reads the real data from",
    )
    source_bucket: str = Field("mle-data", description="public bucket holding the real data")
    source_prefix: str = Field("ym", description="key prefix of the real data in that bucket")
    source_region: str = Field("ru-central1", description="region used to sign source requests")

    # --- the user's own bucket for artefacts (s3 push / pull) ------------------------------
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; None = AWS")
    s3_bucket: str | None = Field(None, description="bucket for artefacts")
    s3_prefix: str = Field("musicrec", description="key prefix for artefacts in the bucket")
    s3_region: str = Field("us-east-1", description="region of the artefact bucket")

    # --- split -----------------------------------------------------------------------------
    test_start: date | None = Field(None, description="first day of the test period")
    label_start: date | None = Field(None, description="first day of the ranker-label period")
    test_share: float = Field(0.06, gt=0, lt=0.5, description="share of events for test")

    # --- prepare ---------------------------------------------------------------------------
    min_plausible_date: date | None = Field(
        None,
        description="prepare warns about events dated before this day or after today; "
        "None = 1990-01-01",
    )
    drop_implausible_dates: bool = Field(
        False,
        description="prepare drops the events with implausible dates instead of keeping them "
        "with a warning",
    )

    # --- models: every source is chosen by validation on the label period -----------------
    sources: tuple[str, ...] = Field(
        ("popular", "als", "item_knn", "ease", "artist"),
        description="candidate sources (musicrec.sources.SOURCES); each is searched, the ranker "
        "sees them all, and the best on validation is served",
    )
    search_trials: int = Field(
        6, ge=1, description="configurations tried per source (its plain default first)"
    )
    search_seconds: float = Field(
        1800.0,
        ge=0,
        description="time budget of the search; past it each source runs only "
        "its first configuration",
    )
    search_train_users: int | None = Field(
        100_000,
        ge=1,
        description="search trials learn from this many sampled users (the "
        "scored ones among them) and the tracks they heard; None = all. Larger logs keep the "
        "search a fraction of one fit (at full scale ~8 % of the events)",
    )
    search_warm_iterations: int | None = Field(
        8,
        ge=1,
        description="iterations of a search trial that starts from the factors of the best "
        "trial so far (ALS, same factor count; a step changes one parameter, so the two are "
        "close); None, or not fewer than als_iterations = every trial from scratch",
    )
    search_users: int = Field(
        10_000, ge=1, description="validation users that score each search trial"
    )
    validation_users: int = Field(
        50_000,
        ge=3,
        description="label-period users sampled for validation: 60 % train the "
        "ranker (the search scores a sample of them), 20 % early-stop it, 20 % pick the "
        "served model",
    )
    popular_window_days: int = Field(
        30, ge=1, description="recent window of the popularity figures in the notebook"
    )
    als_factors: int = Field(64, ge=2, description="factors of the configured ALS trial")
    als_iterations: int = Field(15, ge=1, description="iterations of an ALS fit from scratch")
    als_refit_iterations: int = Field(
        3,
        ge=1,
        description="most iterations of the refits before the test period and on the whole "
        "log, which start from the factors of the previous cut-off; each stops once "
        "als_stop_overlap of sampled users' top-10 lists stay as they were",
    )
    als_sample_start_iterations: int = Field(
        8,
        ge=1,
        description="most iterations of the first full ALS fits (for the ranker, and the "
        "plain baseline of the report), which start from the search trial's factors learnt "
        "from the user sample. Each stops earlier: the ranker's once an iteration gains less "
        "than als_stop_gain NDCG@10 on the ranker's early-stopping users, the baseline's "
        "(no validation period follows its cut-off) once als_stop_overlap of its top-10 "
        "lists stay as they were",
    )
    als_stop_gain: float = Field(
        0.01,
        ge=0,
        description="a warm ALS fit judged on validation users stops once an iteration "
        "improves their NDCG@10 by less than this share (0 = only when it gets worse)",
    )
    als_stop_overlap: float = Field(
        0.9,
        ge=0,
        le=1,
        description="a warm ALS fit without validation users (the plain baseline, a "
        "refit) stops once this share of the entries of search_users sampled "
        "users' top-10 lists are those before the iteration (1 = only once they no longer "
        "change)",
    )
    als_regularization: float = Field(0.1, ge=0, description="of the configured ALS trial")
    als_alpha: float = Field(
        4.0, ge=0, description="configured ALS trial: confidence = 1 + alpha * strength"
    )
    recency_half_life: float | None = Field(
        0.125,
        gt=0,
        description="configured ALS trial: half-life of an event's strength as a "
        "share of the history's span; None = no decay",
    )
    ease_max_items: int = Field(
        4000,
        ge=2,
        description="EASE runs on this many most listened tracks (a dense "
        "inversion: 2k tracks ~1 s, 4k ~3 s, 8k ~18 s on 2 cores)",
    )
    knn_max_pairs: float = Field(
        2e9,
        gt=0,
        description="item_knn counts co-listening within each user's most recent "
        "events, as many as keep the all-pairs pass under this many pair visits (the whole "
        "history on small logs; ~50 events at full scale; ~30 s per 1e9 on 2 cores)",
    )
    knn_max_items: int = Field(
        200_000,
        ge=2,
        description="item_knn learns neighbours among this many most listened "
        "tracks (the all-pairs pass touches one accumulator per track: a smaller catalogue "
        "stays in cache)",
    )
    n_candidates: int = Field(50, ge=1, description="candidates per source for the ranker")
    n_similar: int = Field(50, ge=1, description="similar tracks kept per track")
    n_recommendations: int = Field(100, ge=1, description="final list length per user")
    ranker_negatives: int = Field(
        5,
        ge=1,
        description="negatives sampled per positive (5 ranks as well as 20 on small, "
        "in a sixth of the time)",
    )
    ranker_min_positives: int = Field(
        200, ge=1, description="fewer positives than this: no ranker is trained"
    )
    ranker_iterations: int = Field(500, ge=1, description="most trees (early stopping)")
    ranker_learning_rate: float = Field(
        0.1,
        gt=0,
        description="CatBoost's step; early stopping on other users picks the tree count. "
        "At full scale CatBoost's own 0.03 was still gaining at tree 500 and scored 0.0049 "
        "NDCG@10 below 0.1 on the choosing users; 0.2 did no better there and overfitted the "
        "small weak-loyalty profile",
    )
    threads: int = Field(2, ge=1, description="worker threads for ALS and CatBoost")
    engine: Literal["local", "spark"] = Field(
        "local",
        description="where prepare and run compute: local (in this process) or spark "
        "(preparation, split, top popular and ALS on a Spark session; musicrec.spark_engine)",
    )
    spark_master: str | None = Field(
        None,
        description="Spark master of --engine spark (local[*] when unset and not under "
        "spark-submit; e.g. spark://host:7077, yarn, k8s://https://host:443)",
    )
    spark_partitions: int = Field(
        8,
        ge=1,
        description="Spark shuffle partitions (and default parallelism) of the spark "
        "engine; a few per executor core",
    )
    spark_driver_memory: str = Field(
        "2g", description="spark.driver.memory of a session the spark engine starts itself"
    )
    progress: bool = Field(
        True,
        description="progress bars and stage counters of the long steps on stderr; "
        "false silences them (the notebook turns them off: a saved notebook would keep stale bars)",
    )
    bootstrap: int = Field(
        1000, ge=0, description="bootstrap resamples of the 95 % intervals; 0 = none"
    )
    report_users: int | None = Field(
        100_000,
        ge=1,
        description="test users sampled for the report (metrics and their intervals); None = all",
    )
    topk_method: Literal["auto", "exact", "ann"] = Field(
        "auto",
        description="top-k over tracks: exact (tracks scanned by decreasing factor norm until "
        "no track left can enter the list), an IVF index (ann), or ann from ann_min_tracks "
        "tracks on (auto; the search's trials, which score few users, are always exact)",
    )
    ann_min_tracks: int = Field(200_000, ge=1, description="catalogue size where auto uses ann")
    ann_nprobe: int = Field(32, ge=1, description="IVF clusters scanned per query")
    eval_k: tuple[int, ...] = Field(
        (5, 10, 25),
        description="list lengths k of the report's metrics (precision, recall, NDCG, MAP @k)",
    )

    # --- service ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address the service listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the service listens on")
    workers: int = Field(
        1,
        ge=1,
        description="uvicorn worker processes of the service (they share the mapped "
        "artefacts and the history store)",
    )
    history_url: str = Field(
        "sqlite:///parquet/history.db",
        description="online history store: sqlite:///PATH "
        "(one machine) or redis://[:password@]host:port/db[?prefix=NAME] (replicas sharing it)",
    )
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    default_k: int = Field(25, ge=1, description="k of a list when the client gives none")
    online_history_window: int = Field(
        10, ge=1, description="recent online events used for similar tracks"
    )
    online_method: Literal["similar", "foldin", "blend"] = Field(
        "foldin",
        description="list for a user with online events: 'foldin' (ALS fold-in of the "
        "online events onto the offline factors), 'similar' (tracks similar to the recent "
        "events blended with the offline list) or 'blend' (those similar tracks blended with the "
        "fold-in list); chosen by the replay evaluation (python -m musicrec replay)",
    )
    foldin_nprobe: int = Field(
        32,
        ge=0,
        description="fold-in scores the tracks of this many IVF clusters nearest the "
        "user's vector (0 = every track, exact; catalogues with fewer clusters are exact): "
        "what keeps a request within its latency budget",
    )
    artist_cap: int = Field(
        2,
        ge=0,
        description="at most this many tracks of one artist in the first k of a list "
        "(0 = no cap); chosen by the replay evaluation",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token of POST /admin/reload; None = the endpoint is off "
        "(a secret: never in manifest.json, logs or repr)",
    )
    reload_poll_seconds: float = Field(
        5.0, ge=0, description="reload when manifest.json names a new run; 0 = no watching"
    )
    max_body_bytes: int = Field(
        262_144,
        ge=1,
        description="request bodies above this many bytes get 413 before they "
        "are parsed (10,000 track ids take ~110 KiB)",
    )
    history_max_events: int = Field(
        1_000,
        ge=1,
        description="events kept per user; a write beyond it drops the oldest "
        "(retention by count, in the same transaction); reads never return more",
    )
    history_cache_events: int = Field(
        1_000_000,
        ge=0,
        description="events of recently read histories each worker keeps to answer "
        "without the store while no write to the user was acknowledged (SQLite only: "
        "change counters in a file beside it); about 40 bytes an event; 0: off",
    )
    answer_cache_users: int = Field(
        100_000,
        ge=0,
        description="answers each worker keeps per (user, k, blend, p), served again "
        "while the user's online history and the artefact set are unchanged (a few "
        "hundred bytes each); 0: every request computed",
    )
    history_page_default: int = Field(
        1_000, ge=1, description="events per GET /history page when no limit is given"
    )
    history_page_max: int = Field(1_000, ge=1, description="largest limit GET /history accepts")
    history_read_timeout_ms: int = Field(
        20,
        ge=0,
        description="how long a history read (in a read thread) waits for a "
        "locked store before the request gets 503 with Retry-After",
    )
    history_write_timeout_ms: int = Field(
        5_000,
        ge=0,
        description="how long a history write (in a thread) waits for a locked "
        "store before 503 with Retry-After",
    )
    idempotency_seconds: float = Field(
        86_400.0,
        gt=0,
        description="how long an Idempotency-Key of POST /history is "
        "remembered (its first answer replayed, nothing stored again)",
    )
    retry_after_seconds: int = Field(
        1, ge=0, description="Retry-After of a 503 when the history store is busy"
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access log (one line per request, with user ids in "
        "the paths); off unless turned on",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="service log lines: text, or json (one object per line with "
        "time, level, logger, message, request_id)",
    )
    metrics_enabled: bool = Field(
        True,
        description="GET /metrics (Prometheus text format, counts of all workers); "
        "false: no metric files are written and /metrics is 404",
    )
    metrics_dir: Path | None = Field(
        None,
        description="folder where each server keeps its prometheus_client multiprocess "
        "files (a sub-folder per server, removed at a later start once that server is gone); "
        "None = <temp dir>/musicrec-metrics; PROMETHEUS_MULTIPROC_DIR, when set, wins and "
        "is never emptied",
    )
    metrics_flush_seconds: float = Field(
        1.0,
        gt=0,
        description="how often a worker writes the request counts it keeps in "
        "memory into the shared metric files (the delay before another worker's /metrics "
        "shows them)",
    )
