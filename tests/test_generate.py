"""The generator: exact schema, determinism, quirks, shape and learnable tastes.

The profiles (multi_year, small_dense, weak_loyalty, repeat_listens) are checked for their own
shape, for the default preset's exact schema, and for a personal signal that a plain model can
learn but that does not make popularity useless.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from musicrec import io
from musicrec.checkdata import check_data
from musicrec.generate import PRESETS, PROFILES, generate
from musicrec.settings import Preset

EXPECTED_SCHEMAS = {
    io.TRACKS: pa.schema(
        [
            ("track_id", pa.int64()),
            ("albums", pa.list_(pa.int64())),
            ("artists", pa.list_(pa.int64())),
            ("genres", pa.list_(pa.int64())),
        ]
    ),
    io.CATALOG_NAMES: pa.schema([("id", pa.int64()), ("type", pa.string()), ("name", pa.string())]),
    io.INTERACTIONS: pa.schema(
        [
            ("user_id", pa.int32()),
            ("track_id", pa.int32()),
            ("track_seq", pa.int16()),
            ("started_at", pa.timestamp("ns")),
        ]
    ),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate("small", out, seed=42)
    return out


def test_exact_schema(tiny_data: Path) -> None:
    for name, schema in EXPECTED_SCHEMAS.items():
        assert pq.read_schema(tiny_data / name).remove_metadata() == schema, name


def test_same_seed_same_files_other_seed_other_files(tiny_data: Path, tmp_path: Path) -> None:
    generate("tiny", tmp_path / "again", seed=7)
    generate("tiny", tmp_path / "other", seed=8)
    for name in io.INPUT_FILES:
        first = pq.read_table(tiny_data / name)
        assert first.equals(pq.read_table(tmp_path / "again" / name)), name
    assert not pq.read_table(tiny_data / io.INTERACTIONS).equals(
        pq.read_table(tmp_path / "other" / io.INTERACTIONS)
    )


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        generate("huge", tmp_path)


def test_quirks_of_the_real_data(tiny_data: Path) -> None:
    tracks = pq.read_table(tiny_data / io.TRACKS)
    catalog = pq.read_table(tiny_data / io.CATALOG_NAMES).to_pandas()
    for column in ("albums", "artists", "genres"):
        lengths = pc.list_value_length(tracks.column(column)).to_numpy()
        assert (lengths == 0).sum() >= 1, f"no track with an empty {column} list"
    ids = tracks.column("track_id").to_numpy()
    assert ids.min() == 26 and len(np.unique(ids)) == len(ids)
    assert (np.diff(np.sort(ids)) > 1).mean() > 0.9, "track ids should be sparse"
    genre_names = set(catalog.loc[catalog["type"] == "genre", "id"])
    used = set(pc.list_flatten(tracks.column("genres")).to_pylist())
    assert len(used - genre_names) >= 1, "some genre ids must be missing from the catalogue"
    assert set(catalog["type"]) == {"track", "album", "artist", "genre"}
    assert catalog["name"].notna().all() and (catalog["name"].str.len() > 0).all()


def test_events_are_unique_ordered_and_date_only(tiny_data: Path) -> None:
    events = pq.read_table(tiny_data / io.INTERACTIONS).to_pandas()
    assert not events.duplicated(["user_id", "track_id"]).any()
    # track_seq is the rank of the event within the user, in date order
    expected_seq = events.groupby("user_id").cumcount() + 1
    assert (events["track_seq"].to_numpy() == expected_seq.to_numpy()).all()
    assert events.groupby("user_id")["started_at"].is_monotonic_increasing.all()
    assert (events["started_at"] == events["started_at"].dt.normalize()).all()
    assert events["started_at"].min() >= pd.Timestamp("2022-01-01")
    assert events["started_at"].max() <= pd.Timestamp("2022-12-31")
    tracks = pq.read_table(tiny_data / io.TRACKS).column("track_id").to_numpy()
    assert set(events["track_id"]) == set(tracks), "every track is listened to at least once"


def test_small_shape_close_to_the_real_data(small_data: Path) -> None:
    figures = check_data(small_data)
    assert figures["users"] == 20_000 and figures["tracks"] == 30_000
    assert 1.5e6 < figures["events"] < 3.5e6
    # heavy tail: the real mean is about three times the median
    assert 2.3 < figures["events per user, mean / median"] < 3.8
    # monthly growth: real November is 14.4x January, December 0.92x November
    assert 9 < figures["busiest month / first month"] < 22
    assert 0.8 < figures["last month / busiest month"] <= 1.0
    assert 0.04 < figures["share of events in the last 16 days"] < 0.10
    assert 0.45 < figures["users of the last 16 days"] / figures["users"] < 0.70
    assert figures["repeated (user, track) pairs"] == 0
    assert figures["tracks nobody listened to"] == 0
    # long tail: a few tracks reach many users, many tracks very few
    assert figures["top track's share of users"] > 0.05
    assert figures["share of tracks with < 10 listeners"] > 0.2


def test_users_have_tastes_beyond_popularity(small_data: Path) -> None:
    """A user's listening is concentrated on a few genres far more than chance would give."""
    events = pq.read_table(small_data / io.INTERACTIONS, columns=["user_id", "track_id"])
    tracks = pq.read_table(small_data / io.TRACKS)
    first_genre = pc.list_element(
        pc.if_else(
            pc.equal(pc.list_value_length(tracks.column("genres")), 0),
            pa.scalar([-1], pa.list_(pa.int64())),
            tracks.column("genres"),
        ),
        0,
    )
    genre_of = pd.Series(first_genre.to_numpy(), index=tracks.column("track_id").to_numpy())
    frame = events.to_pandas()
    frame = frame[frame.groupby("user_id")["track_id"].transform("size") >= 50]

    def top_genre_share(track_ids: np.ndarray) -> float:
        genre = genre_of.reindex(track_ids).to_numpy()
        counts = pd.DataFrame({"u": frame["user_id"].to_numpy(), "g": genre}).value_counts()
        return float((counts.groupby(level="u").max() / counts.groupby(level="u").sum()).mean())

    real = top_genre_share(frame["track_id"].to_numpy())
    shuffled = top_genre_share(np.random.default_rng(0).permutation(frame["track_id"].to_numpy()))
    assert real > shuffled + 0.05, (real, shuffled)


# --- profiles: other log shapes ---------------------------------------------------------------

PROFILE_SEED = 42


@pytest.fixture(scope="module")
def profile_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The input files of a profile (seed PROFILE_SEED), generated once per module on demand."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            generate(name, made[name], seed=PROFILE_SEED)
        return made[name]

    return get


def _events(data: Path) -> pd.DataFrame:
    return pq.read_table(data / io.INTERACTIONS).to_pandas()


def _first_of(tracks: pa.Table, column: str) -> pd.Series:
    """The first id of a list column per track id (-1 for an empty list)."""
    values = tracks.column(column)
    filled = pc.if_else(
        pc.equal(pc.list_value_length(values), 0), pa.scalar([-1], pa.list_(pa.int64())), values
    )
    return pd.Series(
        pc.list_element(filled, 0).to_numpy(), index=tracks.column("track_id").to_numpy()
    )


def _loyalty_gap(data: Path, column: str) -> float:
    """Mean share of a user's top genre/artist minus the same with tracks shuffled over users."""
    events = _events(data)
    events = events[events.groupby("user_id")["track_id"].transform("size") >= 30]
    key_of = _first_of(pq.read_table(data / io.TRACKS), column)

    def top_share(track_ids: np.ndarray) -> float:
        key = key_of.reindex(track_ids).to_numpy()
        counts = pd.DataFrame({"u": events["user_id"].to_numpy(), "k": key}).value_counts()
        return float((counts.groupby(level="u").max() / counts.groupby(level="u").sum()).mean())

    track_ids = events["track_id"].to_numpy()
    return top_share(track_ids) - top_share(np.random.default_rng(0).permutation(track_ids))


def test_every_preset_is_a_settings_choice() -> None:
    assert set(get_args(Preset)) == set(PRESETS)
    assert set(PROFILES) < set(PRESETS)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_schema_is_the_default_presets(
    name: str, profile_data: Callable[[str], Path], tiny_data: Path
) -> None:
    data = profile_data(name)
    for file, schema in EXPECTED_SCHEMAS.items():
        assert pq.read_schema(data / file).remove_metadata() == schema, (name, file)
        assert (
            pq.read_schema(data / file).remove_metadata()
            == pq.read_schema(tiny_data / file).remove_metadata()
        ), (name, file)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_sizes_order_and_coverage(name: str, profile_data: Callable[[str], Path]) -> None:
    data = profile_data(name)
    preset = PRESETS[name]
    events = _events(data)
    track_ids = pq.read_table(data / io.TRACKS).column("track_id").to_numpy()
    assert events["user_id"].nunique() == preset.users and len(track_ids) == preset.tracks
    assert 1e5 < len(events) <= 3.2e5, "small enough for a pipeline run in seconds"
    assert set(events["track_id"]) == set(track_ids), "every track is listened to at least once"
    expected_seq = events.groupby("user_id").cumcount() + 1
    assert (events["track_seq"].to_numpy() == expected_seq.to_numpy()).all()
    assert events.groupby("user_id")["started_at"].is_monotonic_increasing.all()
    assert (events["started_at"] == events["started_at"].dt.normalize()).all()
    repeats = events.duplicated(["user_id", "track_id"]).sum()
    assert (repeats > 0) == (PRESETS[name].repeat_share > 0), repeats


@pytest.mark.parametrize("name", PROFILES)
def test_profile_same_seed_same_files_other_seed_other_files(
    name: str, profile_data: Callable[[str], Path], tmp_path: Path
) -> None:
    generate(name, tmp_path / "again", seed=PROFILE_SEED)
    for file in io.INPUT_FILES:
        assert pq.read_table(profile_data(name) / file).equals(
            pq.read_table(tmp_path / "again" / file)
        ), (name, file)
    generate(name, tmp_path / "other", seed=PROFILE_SEED + 1)
    assert not pq.read_table(profile_data(name) / io.INTERACTIONS).equals(
        pq.read_table(tmp_path / "other" / io.INTERACTIONS)
    )


def test_multi_year_spans_six_years_of_monthly_dates(profile_data: Callable[[str], Path]) -> None:
    events = _events(profile_data("multi_year"))
    dates = events["started_at"]
    assert dates.min() == pd.Timestamp("2017-01-01") and dates.max() == pd.Timestamp("2022-12-01")
    assert (dates.dt.day == 1).all(), "every date is the first day of its month"
    assert dates.nunique() == 72
    per_user = events.groupby("user_id")["started_at"].agg(["min", "max"])
    joined = per_user["min"].dt.year.value_counts()
    assert set(joined.index) == set(range(2017, 2023)) and joined.min() > 0.05 * len(per_user)
    assert ((per_user["max"] - per_user["min"]).dt.days > 365).mean() > 0.25, "long-lived users"
    assert (per_user["max"] < pd.Timestamp("2022-01-01")).mean() > 0.2, "users who left"
    sizes = events.groupby("user_id").size()
    assert 15 <= sizes.median() <= 40 and 2.0 < sizes.mean() / sizes.median() < 4.0


def test_multi_year_tastes_drift(profile_data: Callable[[str], Path]) -> None:
    """A long-lived user's artists in the first and second half of their history overlap less
    than two interleaved halves of it do."""
    data = profile_data("multi_year")
    events = _events(data)
    span = events.groupby("user_id")["started_at"].agg(lambda s: (s.max() - s.min()).days)
    size = events.groupby("user_id").size()
    events = events[events["user_id"].isin(span[(span >= 365) & (size >= 40)].index)].copy()
    events["key"] = (
        _first_of(pq.read_table(data / io.TRACKS), "artists").reindex(events["track_id"]).to_numpy()
    )
    last = events.groupby("user_id")["track_seq"].transform("max")

    def cosine(first: pd.Series) -> float:
        a = events[first].groupby(["user_id", "key"]).size()
        b = events[~first].groupby(["user_id", "key"]).size()
        both = pd.concat([a, b], axis=1).fillna(0)
        dot = (both[0] * both[1]).groupby(level=0).sum()
        norms = (both[0] ** 2).groupby(level=0).sum() * (both[1] ** 2).groupby(level=0).sum()
        return float((dot / np.sqrt(norms)).mean())

    halves = cosine(events["track_seq"] <= last / 2)
    interleaved = cosine(events["track_seq"] % 2 == 0)
    assert halves < interleaved - 0.015, (halves, interleaved)


def test_small_dense_users_cover_much_of_a_small_catalogue(
    profile_data: Callable[[str], Path],
) -> None:
    events = _events(profile_data("small_dense"))
    dates = events["started_at"]
    assert dates.min() >= pd.Timestamp("2019-06-01") and dates.max() <= pd.Timestamp("2019-12-31")
    assert dates.dt.to_period("M").nunique() == 7 and dates.nunique() > 200
    sizes = events.groupby("user_id").size()
    assert sizes.min() >= 20 and sizes.median() >= 40
    coverage = sizes / PRESETS["small_dense"].tracks
    assert coverage.mean() > 0.03 and coverage.quantile(0.9) > 0.08 and coverage.max() > 0.2


def test_weak_loyalty_has_little_artist_genre_loyalty_and_hot_releases(
    profile_data: Callable[[str], Path], tiny_data: Path
) -> None:
    data = profile_data("weak_loyalty")
    assert _loyalty_gap(tiny_data, "genres") > 0.05 and _loyalty_gap(tiny_data, "artists") > 0.03
    assert abs(_loyalty_gap(data, "genres")) < 0.02
    assert abs(_loyalty_gap(data, "artists")) < 0.015
    # recency: the last 30 days' chart predicts the next 16 days far better than the year's
    events = _events(data)
    cut = events["started_at"].max() - pd.Timedelta(days=16)
    train, future = events[events["started_at"] <= cut], events[events["started_at"] > cut]
    recent = train[train["started_at"] > cut - pd.Timedelta(days=30)]
    year_top = train["track_id"].value_counts().index[:100]
    recent_top = recent["track_id"].value_counts().index[:100]
    hits_year = future["track_id"].isin(year_top).mean()
    hits_recent = future["track_id"].isin(recent_top).mean()
    assert hits_recent > 1.4 * hits_year, (hits_recent, hits_year)
    assert events["started_at"].dt.to_period("M").nunique() == 12


def test_repeat_listens_repeat_on_the_same_and_later_days(
    profile_data: Callable[[str], Path],
) -> None:
    events = _events(profile_data("repeat_listens"))
    repeated = events.duplicated(["user_id", "track_id"])
    assert 0.25 < repeated.mean() < 0.35
    same_day = events.duplicated(["user_id", "track_id", "started_at"])
    assert 0.2 < same_day.sum() / repeated.sum() < 0.6, "some repeats on the same day"
    assert (events.groupby(["user_id", "track_id"]).size() >= 3).any()


# ALS parameters per profile that a reasonable search finds (the defaults of the real log's
# shape are not right everywhere: that is what the profiles are for)
PROFILE_ALS = {
    "multi_year": {"factors": 64, "regularization": 0.05, "alpha": 5.0, "half_life": 365.0},
    "small_dense": {"factors": 16, "regularization": 1.0, "alpha": 5.0, "half_life": None},
    "weak_loyalty": {"factors": 64, "regularization": 0.05, "alpha": 5.0, "half_life": 14.0},
    "repeat_listens": {"factors": 64, "regularization": 0.05, "alpha": 5.0, "half_life": 60.0},
}


def _ndcg10(recs: np.ndarray, truth: sp.csr_matrix, users: np.ndarray) -> float:
    hits = np.asarray(truth[np.repeat(users, recs.shape[1]), recs.ravel()]).reshape(recs.shape)
    discount = 1.0 / np.log2(np.arange(2, recs.shape[1] + 2))
    n_relevant = np.minimum(np.diff(truth.indptr)[users], recs.shape[1])
    ideal = np.cumsum(discount)[n_relevant - 1]
    return float(((hits > 0) @ discount / ideal).mean())


@pytest.mark.parametrize("name", PROFILES)
def test_profile_has_personal_signal_beyond_popularity(
    name: str, profile_data: Callable[[str], Path]
) -> None:
    """Implicit ALS beats the better popular chart (all train or its last 30 days) on the last
    ~6 % of events, clearly but not absurdly: users have tastes, popularity still matters."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    events = _events(profile_data(name))
    day = (events["started_at"] - events["started_at"].min()).dt.days.to_numpy()
    on_or_after = np.cumsum(np.bincount(day)[::-1])[::-1]
    cut = int(np.flatnonzero(on_or_after >= 0.06 * len(day))[-1])
    user = np.unique(events["user_id"].to_numpy(), return_inverse=True)[1]
    track = np.unique(events["track_id"].to_numpy(), return_inverse=True)[1]
    shape = (user.max() + 1, track.max() + 1)
    train = day < cut
    heard = sp.csr_matrix((np.ones(train.sum()), (user[train], track[train])), shape=shape)
    heard.sum_duplicates()
    # relevant: what a user heard after the cut and not before (repeats are not news)
    new = ~train & (np.asarray(heard[user, track]).ravel() == 0)
    truth = sp.csr_matrix((np.ones(new.sum()), (user[new], track[new])), shape=shape)
    truth.sum_duplicates()
    users = np.flatnonzero((np.diff(truth.indptr) > 0) & (np.diff(heard.indptr) > 0))

    params = PROFILE_ALS[name]
    weight = np.ones(train.sum(), np.float32)
    if params["half_life"]:
        weight = 0.5 ** ((cut - 1 - day[train]) / params["half_life"])
    user_items = sp.csr_matrix((weight, (user[train], track[train])), shape=shape)
    with threadpool_limits(1):
        model = AlternatingLeastSquares(
            factors=params["factors"],
            regularization=params["regularization"],
            alpha=params["alpha"],
            iterations=15,
            random_state=0,
            num_threads=1,
        )
        model.fit(user_items, show_progress=False)
        recs, _ = model.recommend(users, user_items[users], N=10)
    als = _ndcg10(recs, truth, users)

    def chart(mask: np.ndarray) -> float:
        """NDCG@10 of the top tracks of ``mask``'s events a user has not heard."""
        top = np.argsort(-np.bincount(track[mask], minlength=shape[1]), kind="stable")[:500]
        seen = heard[users][:, top].toarray() > 0
        first_unheard = np.argsort(seen, axis=1, kind="stable")[:, :10]
        return _ndcg10(top[first_unheard], truth, users)

    popular = max(chart(train), chart(train & (day >= cut - 30)))
    assert 1.15 < als / popular < 3.5, (name, als, popular)
