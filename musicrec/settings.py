"""One typed settings object for every path and parameter (env prefix ``MUSICREC_``).

Build it with ``Settings()`` (reads the environment and ``.env``) or ``Settings(**overrides)``
and pass it in; nothing in the package reads a global.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Preset = Literal["tiny", "small", "full"]


class Settings(BaseSettings):
    """Every path and parameter of the pipeline and the service."""

    model_config = SettingsConfigDict(
        env_prefix="MUSICREC_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- locations -------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="folder with the three input parquet files")
    parquet_dir: Path = Field(Path("parquet"), description="folder of the artefacts")

    # --- built-in data generator -----------------------------------------------------------
    preset: Preset = Field("small", description="size of the generated data set")
    seed: int = Field(42, description="random seed of the generator and of every model")

    # --- the real data (public bucket) -----------------------------------------------------
    source_endpoint_url: str = "https://storage.yandexcloud.net"
    source_bucket: str = "mle-data"
    source_prefix: str = "ym"
    source_region: str = Field("ru-central1", description="region used to sign source requests")

    # --- the user's own bucket for artefacts (s3 push / pull) ------------------------------
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; None = AWS")
    s3_bucket: str | None = Field(None, description="bucket for artefacts")
    s3_prefix: str = Field("musicrec", description="key prefix for artefacts in the bucket")
    s3_region: str = "us-east-1"

    # --- split -----------------------------------------------------------------------------
    test_start: date | None = Field(None, description="first day of the test period")
    label_start: date | None = Field(None, description="first day of the ranker-label period")
    test_share: float = Field(0.06, gt=0, lt=0.5, description="share of events for test")

    # --- models ----------------------------------------------------------------------------
    popular_window_days: int = Field(30, ge=1, description="recent window for popularity")
    als_factors: int = Field(64, ge=2)
    als_iterations: int = Field(15, ge=1)
    als_regularization: float = Field(0.05, ge=0)
    als_alpha: float = Field(20.0, gt=0, description="confidence scale of an event")
    recency_half_life_days: float = Field(
        60.0, gt=0, description="an event this many days old weighs half as much"
    )
    n_als_candidates: int = Field(100, ge=1, description="ALS candidates per user")
    n_similar: int = Field(50, ge=1, description="similar tracks kept per track")
    n_recommendations: int = Field(100, ge=1, description="final list length per user")
    ranker_negatives: int = Field(20, ge=1, description="negatives sampled per positive")
    n_similar_candidates: int = Field(
        50, ge=1, description="ranker candidates similar to the user's recent tracks"
    )
    n_popular_candidates: int = Field(30, ge=1, description="popular unheard ranker candidates")
    ranker_recent_tracks: int = Field(
        20, ge=1, description="last listened tracks that seed similar-track candidates"
    )
    ranker_train_users: int = Field(
        50_000, ge=1, description="label-period users sampled to train the ranker"
    )
    ranker_iterations: int = Field(300, ge=1)
    threads: int = Field(2, ge=1, description="worker threads for ALS and CatBoost")
    als_warm_iterations: int = Field(
        2, ge=0, description="iterations of the P1+P2 ALS fit warm-started from the P1 factors; "
        "0 = a second full fit from scratch"
    )
    topk_method: Literal["auto", "exact", "ann"] = Field(
        "auto", description="top-k over tracks: exact brute force, an IVF index (ann), or ann "
        "from ann_min_tracks tracks on (auto)"
    )
    ann_min_tracks: int = Field(200_000, ge=1, description="catalogue size where auto uses ann")
    ann_nprobe: int = Field(32, ge=1, description="IVF clusters scanned per query")
    eval_k: tuple[int, ...] = (5, 10, 25)

    # --- service ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    history_url: str = Field(
        "sqlite:///parquet/history.db", description="online history store (sqlite:///PATH)"
    )
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    default_k: int = Field(25, ge=1)
    online_history_window: int = Field(
        10, ge=1, description="recent online events used for similar tracks"
    )
    admin_token: str | None = Field(
        None, description="bearer token of POST /admin/reload; None = the endpoint is off"
    )
    reload_poll_seconds: float = Field(
        5.0, ge=0, description="reload when manifest.json names a new run; 0 = no watching"
    )
