"""Built-in data generator: the three input files with the real data's exact schema and shape.

The real listening log cannot be downloaded on every machine, so this writes
``tracks.parquet``, ``catalog_names.parquet`` and ``interactions.parquet`` with the same column
names, dtypes and quirks (DATA.md), and with learnable structure:

* a catalogue hierarchy genre -> artist -> album -> track with skewed sizes and a long-tail
  track popularity; a share of tracks is released during the year and is hot for a while;
* every user has tastes (favourite genres and artists) that drift from an early to a late
  profile over the year, and a personal mix of mainstream, genre and artist listening, so
  collaborative filtering has signal and popularity alone does not explain everything;
* heavy-tailed events per user (median about a third of the mean), users who join and leave
  during the year, and monthly volume that grows as in the real log.

Everything is vectorised with numpy and streamed to parquet a chunk of users at a time, so the
full preset (1.37 M users, 1 M tracks, 222 M events) never holds Python objects per event.

Besides the three sizes of that one log (tiny, small, full) there are PROFILES: small presets of
other log shapes (several years with month-granular dates, a small dense catalogue, weak
artist/genre loyalty), so that tests see data on which the defaults tuned to the real log are
wrong. A profile is a preset whose timeline, user and taste fields differ from the defaults.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from musicrec import io
from musicrec.columns import Columns as C

log = logging.getLogger(__name__)

# Events per month in the real log (millions): January and November/December are published,
# the months between grow about linearly (DATA.md); only the shape matters here.
MONTH_VOLUME = (2.29, 5.35, 8.41, 11.47, 14.53, 17.59, 20.65, 23.71, 26.77, 29.83, 32.9, 30.2)

INTERACTIONS_SCHEMA = pa.schema(
    [
        (C.user, pa.int32()),
        (C.track, pa.int32()),
        (C.seq, pa.int16()),
        (C.started_at, pa.timestamp("ns")),
    ]
)
TRACKS_SCHEMA = pa.schema(
    [
        (C.track, pa.int64()),
        ("albums", pa.list_(pa.int64())),
        ("artists", pa.list_(pa.int64())),
        ("genres", pa.list_(pa.int64())),
    ]
)
CATALOG_SCHEMA = pa.schema([("id", pa.int64()), ("type", pa.string()), ("name", pa.string())])


@dataclass(frozen=True)
class Preset:
    """Sizes and shape of one generated data set.

    The fields after ``chunk_users`` default to the real log's shape (one year of day-granular
    dates, strong artist/genre loyalty); the profiles change them.
    """

    users: int
    max_user_id: int
    tracks: int
    max_track_id: int
    albums: int
    artists: int
    genres: int  # genres with a name in the catalogue
    missing_genres: int  # genre ids used by tracks but absent from the catalogue
    median_events: float
    max_events: int
    chunk_users: int
    # --- timeline --------------------------------------------------------------------------
    start: str = "2022-01-01"  # first day of the log, the first of a month
    month_volume: tuple[float, ...] = MONTH_VOLUME  # relative events per month; len = months
    monthly_dates: bool = False  # every started_at is the first day of its month
    # --- users -----------------------------------------------------------------------------
    stay_share: float = 0.3  # share of users active until the end of the log
    mean_lifetime_days: float = 90.0  # mean activity span of the others (exponential)
    events_sigma: float = 1.15  # lognormal spread of a user's listening rate
    min_events: int = 1
    # --- tastes ----------------------------------------------------------------------------
    # Dirichlet weights of a user's mix of popular / genre / artist listening, and a fourth of
    # listening in co-listening clusters (tracks grouped across genres and artists) if given
    mix: tuple[float, ...] = (1.5, 4.0, 3.0)
    clusters: int = 0  # number of co-listening clusters; 0 = none
    genre_drift: float = 0.3  # share of favourite genres replaced by the end of a user's window
    artist_drift: float = 0.0  # share of favourite artists replaced likewise
    # share of events that listen again to a track the user already heard (0 in the real
    # log, whose (user, track) pairs are unique): some the same day, most days later
    repeat_share: float = 0.0
    # --- catalogue -------------------------------------------------------------------------
    release_share: float = 0.25  # tracks released during the log, hot for a while
    release_boost: float = 5.0  # popularity multiplier of a new release (1 + boost)
    release_decay_months: float = 1.5  # e-folding time of the boost

    @property
    def months(self) -> int:
        return len(self.month_volume)


def _ramp(months: int, first: float, last: float, seasonal: float = 0.0) -> tuple[float, ...]:
    """Monthly volume growing linearly from ``first`` to ``last``, with a yearly wobble."""
    month = np.arange(months)
    volume = np.linspace(first, last, months) * (1.0 + seasonal * np.cos(2 * np.pi * month / 12))
    return tuple(float(round(v, 4)) for v in volume)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        users=1_200,
        max_user_id=1_250,
        tracks=3_000,
        max_track_id=400_000,
        albums=2_000,
        artists=460,
        genres=24,
        missing_genres=4,
        median_events=22,
        max_events=600,
        chunk_users=1_200,
    ),
    "small": Preset(
        users=20_000,
        max_user_id=20_400,
        tracks=30_000,
        max_track_id=3_000_000,
        albums=19_800,
        artists=4_600,
        genres=80,
        missing_genres=12,
        median_events=40,
        max_events=2_500,
        chunk_users=20_000,
    ),
    "full": Preset(
        users=1_373_221,
        max_user_id=1_374_582,
        tracks=1_000_000,
        max_track_id=101_521_819,
        albums=658_724,
        artists=153_581,
        genres=166,
        missing_genres=30,
        median_events=54,
        max_events=16_600,
        chunk_users=60_000,
    ),
    # --- profiles: other log shapes, each a few seconds to generate ------------------------
    # six years of month-granular dates: users join and leave over the years, the catalogue
    # grows (most tracks are released during the log), tastes drift slowly
    "multi_year": Preset(
        users=5_000,
        max_user_id=5_300,
        tracks=10_000,
        max_track_id=1_200_000,
        albums=6_600,
        artists=1_500,
        genres=30,
        missing_genres=5,
        median_events=20,
        max_events=1_500,
        chunk_users=5_000,
        start="2017-01-01",
        month_volume=_ramp(72, 1.0, 3.0, seasonal=0.1),
        monthly_dates=True,
        stay_share=0.15,
        mean_lifetime_days=540.0,
        events_sigma=1.0,
        genre_drift=0.5,
        artist_drift=0.5,
        release_share=0.7,
        release_boost=3.0,
        release_decay_months=4.0,
    ),
    # a small dense catalogue, as in a ratings-style log: every user hears a good share of it
    "small_dense": Preset(
        users=3_000,
        max_user_id=3_100,
        tracks=2_000,
        max_track_id=200_000,
        albums=1_300,
        artists=300,
        genres=16,
        missing_genres=3,
        median_events=55,
        max_events=900,
        chunk_users=3_000,
        start="2019-06-01",
        month_volume=_ramp(7, 1.0, 1.4),
        stay_share=0.4,
        mean_lifetime_days=120.0,
        events_sigma=0.8,
        min_events=20,
        mix=(1.0, 4.0, 3.0),
        release_share=0.1,
    ),
    # weak artist/genre loyalty: fresh releases are hot for a few weeks and a third of the
    # listening follows the chart; the personal signal left is mostly co-listening clusters
    # that cut across genres and artists (so artist and genre features explain little)
    "weak_loyalty": Preset(
        users=5_000,
        max_user_id=5_200,
        tracks=20_000,
        max_track_id=2_000_000,
        albums=13_200,
        artists=3_000,
        genres=60,
        missing_genres=10,
        median_events=18,
        max_events=1_500,
        chunk_users=5_000,
        mix=(3.0, 0.5, 0.3, 5.0),
        clusters=40,
        release_share=0.5,
        release_boost=8.0,
        release_decay_months=1.0,
    ),
    # the real log's shape, but people listen to tracks again (same day or later): the input
    # has repeated (user, track) pairs, as play logs other than the real one do
    "repeat_listens": Preset(
        users=3_000,
        max_user_id=3_100,
        tracks=6_000,
        max_track_id=600_000,
        albums=4_000,
        artists=900,
        genres=30,
        missing_genres=5,
        median_events=20,
        max_events=1_200,
        chunk_users=3_000,
        repeat_share=0.3,
    ),
}
PROFILES = ("multi_year", "small_dense", "weak_loyalty", "repeat_listens")

GENRE_NAMES = [
    "pop",
    "rock",
    "rusrap",
    "rap",
    "electronics",
    "dance",
    "alternative",
    "metal",
    "indie",
    "rusrock",
    "jazz",
    "classical",
    "folk",
    "soundtrack",
    "hiphop",
    "rnb",
    "punk",
    "techno",
    "house",
    "trance",
    "dubstep",
    "ambient",
    "blues",
    "country",
    "reggae",
    "latin",
    "soul",
    "funk",
    "disco",
    "lounge",
    "chanson",
    "estrada",
    "kpop",
    "jpop",
    "anime",
    "films",
    "children",
    "podcasts",
    "audiobooks",
    "spoken",
    "local",
    "relax",
    "meditation",
]
WORDS_A = [
    "Midnight",
    "Golden",
    "Silent",
    "Electric",
    "Broken",
    "Wild",
    "Neon",
    "Lonely",
    "Burning",
    "Frozen",
    "Hidden",
    "Endless",
    "Crystal",
    "Velvet",
    "Distant",
    "Sweet",
    "Bitter",
    "Northern",
    "Summer",
    "Winter",
    "Little",
    "Crazy",
    "Lost",
    "Secret",
    "Falling",
    "Rising",
    "Open",
    "Empty",
    "Blue",
    "Red",
    "Black",
    "White",
    "Silver",
    "Paper",
    "Glass",
    "Stone",
    "Ocean",
    "Desert",
]
WORDS_B = [
    "River",
    "Heart",
    "Dream",
    "Road",
    "Night",
    "Fire",
    "Rain",
    "Light",
    "Shadow",
    "City",
    "Sky",
    "Moon",
    "Sun",
    "Star",
    "Wave",
    "Storm",
    "Garden",
    "Mirror",
    "Echo",
    "Window",
    "Train",
    "Letter",
    "Song",
    "Dance",
    "Story",
    "Island",
    "Forest",
    "Memory",
    "Signal",
    "Horizon",
    "Engine",
    "Ghost",
    "Machine",
    "Kingdom",
    "Harbor",
    "Avenue",
    "Bridge",
    "Circle",
    "Season",
]
FIRST = [
    "Anna",
    "Max",
    "Lena",
    "Ivan",
    "Maria",
    "Alex",
    "Nina",
    "Oleg",
    "Sara",
    "Tom",
    "Eva",
    "Leo",
    "Vera",
    "Mark",
    "Zoe",
    "Ilya",
    "Kate",
    "Dan",
    "Olga",
    "Paul",
    "Rita",
    "Yuri",
    "Mila",
    "Sam",
]
LAST = [
    "Volkov",
    "Stone",
    "Petrova",
    "Reed",
    "Orlov",
    "Blake",
    "Sokolova",
    "Gray",
    "Morozov",
    "Lane",
    "Kuznetsova",
    "Hart",
    "Novak",
    "Frost",
    "Belova",
    "Wolfe",
    "Lebedev",
    "Cross",
    "Pavlova",
    "Quinn",
]


def _names(
    rng: np.random.Generator, n: int, left: list[str], right: list[str], prefix: str = ""
) -> pa.Array:
    """``n`` readable names "Left Right" (numbered when they repeat), built by arrow compute."""
    a = pa.array(left).take(pa.array(rng.integers(0, len(left), n)))
    b = pa.array(right).take(pa.array(rng.integers(0, len(right), n)))
    names = pc.binary_join_element_wise(a, b, " ")
    if prefix:
        names = pc.binary_join_element_wise(pa.array([prefix] * n), names, "")
    # a suffix keeps names from colliding too often in a large catalogue
    suffix = pc.cast(pa.array(rng.integers(1, 1000, n)), pa.string())
    with_suffix = pc.binary_join_element_wise(names, suffix, " ")
    return pc.if_else(pa.array(rng.random(n) < 0.5), names, with_suffix)


def _sparse_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """``n`` distinct sorted ids in [low, high], both ends included (ids are sparse)."""
    inner = rng.choice(high - low - 1, size=n - 2, replace=False) + low + 1
    return np.sort(np.concatenate([[low, high], inner])).astype(np.int64)


@dataclass
class _Pool:
    """Pre-drawn tracks per (month, segment) so that one draw is an O(1) gather.

    For each month and segment (the whole catalogue, a genre or an artist) the pool holds
    tracks drawn by weight with stratified uniforms — at least ``min_per_segment`` of them, so
    a small segment keeps its variety — and a draw picks one at random.
    """

    items: np.ndarray  # track indices, all months and segments one after another
    start: np.ndarray  # (months, segments): first position of a segment's tracks
    count: np.ndarray  # (months, segments): how many; 0 when the segment has no weight

    def draw(
        self, month: np.ndarray, segment: np.ndarray, u: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        count = self.count[month, segment]
        pos = self.start[month, segment] + (u * count).astype(np.int64)
        ok = count > 0
        return self.items[np.where(ok, pos, 0)], ok


def _build_pool(
    monthly: np.ndarray,
    segment_of: np.ndarray,
    n_segments: int,
    size: int,
    min_per_segment: int,
    rng: np.random.Generator,
) -> _Pool:
    order = np.argsort(segment_of, kind="stable")
    sorted_segment = segment_of[order]
    items, starts, counts = [], [], []
    offset = 0
    for weights in monthly:
        w = weights[order]
        cum = np.cumsum(w)
        total = np.bincount(sorted_segment, weights=w, minlength=n_segments)
        seg_start = np.concatenate([[0.0], np.cumsum(total)[:-1]])
        count = np.where(
            total > 0, np.maximum(min_per_segment, np.round(total / total.sum() * size)), 0
        ).astype(np.int64)
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        segment = np.repeat(np.arange(n_segments), count)
        within = np.arange(count.sum()) - first[segment]
        u = (within + rng.random(len(segment))) / count[segment]  # sorted inside a segment
        pos = np.searchsorted(cum, seg_start[segment] + u * total[segment], side="right")
        items.append(order[np.minimum(pos, len(order) - 1)].astype(np.int32))
        starts.append(first + offset)
        counts.append(count)
        offset += int(count.sum())
    return _Pool(np.concatenate(items), np.stack(starts), np.stack(counts))


@dataclass
class _Catalogue:
    """The generated catalogue and the pools that make per-event draws vectorised."""

    track_ids: np.ndarray
    genre_pop: np.ndarray
    popular: _Pool  # by popularity over the whole catalogue
    by_genre: _Pool
    by_artist: _Pool
    artist_by_genre: _Pool  # favourite artists: one "month", segments are genres
    by_cluster: _Pool | None = None  # co-listening clusters, if the preset has them


def _monthly_popularity(p: Preset, base_pop: np.ndarray, release_month: np.ndarray) -> np.ndarray:
    """(months, tracks) weights: a base popularity, 0 before a release, a hot spell after it."""
    months = np.arange(p.months)[:, None]
    age = months - release_month[None, :]
    boost = 1.0 + p.release_boost * np.exp(-np.clip(age, 0, None) / p.release_decay_months)
    return np.where(
        release_month[None, :] < 0,
        base_pop[None, :],
        np.where(age < 0, 0.0, base_pop[None, :] * boost),
    )


def _build_catalogue(p: Preset, rng: np.random.Generator) -> tuple[_Catalogue, pa.Table, pa.Table]:
    n_genres = p.genres + p.missing_genres
    # genres: a few huge ones, many small ones; the podcast genre is mid-sized
    genre_pop = 1.0 / np.arange(1, n_genres + 1) ** 1.1
    genre_pop /= genre_pop.sum()
    podcast_genre = min(12, p.genres - 1)

    # artists: primary genre by genre size, popularity lognormal
    artist_genre = rng.choice(n_genres, size=p.artists, p=genre_pop)
    artist_pop = rng.lognormal(0.0, 1.0, p.artists)
    artist_size = rng.lognormal(0.0, 1.1, p.artists)

    # tracks: artist by artist size; genre = artist's genre; popularity lognormal x artist's
    track_artist = rng.choice(p.artists, size=p.tracks, p=artist_size / artist_size.sum())
    track_artist[: p.artists] = np.arange(p.artists)[: p.tracks]  # every artist has a track
    rng.shuffle(track_artist)
    track_genre = artist_genre[track_artist]
    base_pop = rng.lognormal(0.0, 1.6, p.tracks) * artist_pop[track_artist]
    # a share of the tracks (a quarter in the real log) is released during the log and is hot
    # for a few months
    release_month = np.where(
        rng.random(p.tracks) < p.release_share, rng.integers(0, p.months, p.tracks), -1
    )
    monthly = _monthly_popularity(p, base_pop, release_month)

    pool_size = 4 * p.tracks
    popular = _build_pool(monthly, np.zeros(p.tracks, np.int64), 1, pool_size, 1, rng)
    by_genre = _build_pool(monthly, track_genre, n_genres, pool_size, 64, rng)
    by_artist = _build_pool(monthly, track_artist, p.artists, pool_size // 2, 16, rng)
    artist_by_genre = _build_pool(
        artist_pop[None, :], artist_genre, n_genres, 4 * p.artists, 16, rng
    )
    del monthly

    track_ids = _sparse_ids(rng, p.tracks, 26, p.max_track_id)
    tracks, catalog = _catalogue_tables(
        p, rng, track_ids, track_artist, track_genre, genre_pop, podcast_genre
    )
    by_cluster = None
    if p.clusters:
        # drawn last, so presets without clusters draw exactly what they always drew; a
        # cluster mixes tracks of every genre and artist
        track_cluster = rng.integers(0, p.clusters, p.tracks)
        monthly = _monthly_popularity(p, base_pop, release_month)
        by_cluster = _build_pool(monthly, track_cluster, p.clusters, pool_size, 32, rng)
    cat = _Catalogue(
        track_ids=track_ids,
        genre_pop=genre_pop,
        popular=popular,
        by_genre=by_genre,
        by_artist=by_artist,
        artist_by_genre=artist_by_genre,
        by_cluster=by_cluster,
    )
    return cat, tracks, catalog


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))


def _catalogue_tables(
    p: Preset,
    rng: np.random.Generator,
    track_ids: np.ndarray,
    track_artist: np.ndarray,
    track_genre: np.ndarray,
    genre_pop: np.ndarray,
    podcast_genre: int,
) -> tuple[pa.Table, pa.Table]:
    """tracks.parquet and catalog_names.parquet with the real data's quirks."""
    n_genres = p.genres + p.missing_genres
    scale = p.tracks / 1_000_000
    genre_ids = _sparse_ids(rng, n_genres, 0, max(n_genres * 5, 300))
    # the least popular ids are the ones missing from the catalogue
    named = np.ones(n_genres, bool)
    named[-p.missing_genres :] = False
    artist_ids = _sparse_ids(rng, p.artists, 1, p.artists * 40)
    album_ids = _sparse_ids(rng, p.albums, 1, p.albums * 40)

    # albums: tracks of one artist fill consecutive albums; a few tracks also sit on a second
    # album (a compilation); some albums stay unused, as in any catalogue
    order = np.argsort(track_artist, kind="stable")
    album_of = np.empty(p.tracks, np.int64)
    album_of[order] = np.minimum(np.arange(p.tracks) * p.albums // p.tracks, p.albums - 1)
    n_album = np.where(rng.random(p.tracks) < 0.3, 2, 1)
    n_album[rng.choice(p.tracks, max(1, round(18 * scale)), replace=False)] = 0
    second = rng.integers(0, p.albums, p.tracks)
    album_vals = np.stack([album_of, second], 1)[np.arange(2)[None, :] < n_album[:, None]]

    # artists: usually one; podcasts have none, and a few other tracks neither
    n_artist = np.where(rng.random(p.tracks) < 0.06, 2, 1)
    no_artist = track_genre == podcast_genre
    extra = max(1, round(415 * scale))
    no_artist[rng.choice(p.tracks, extra, replace=False)] = True
    n_artist[no_artist] = 0
    artist_vals = np.stack([track_artist, rng.integers(0, p.artists, p.tracks)], 1)[
        np.arange(2)[None, :] < n_artist[:, None]
    ]

    # genres: 97 % have one or two; a few have none
    n_genre = rng.choice([1, 2, 3], size=p.tracks, p=[0.70, 0.274, 0.026])
    n_genre[rng.choice(p.tracks, max(1, round(3_687 * scale)), replace=False)] = 0
    second_genre = rng.choice(n_genres, size=(p.tracks, 2), p=genre_pop)
    genre_vals = np.column_stack([track_genre, second_genre])[
        np.arange(3)[None, :] < n_genre[:, None]
    ]

    def offsets(counts: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(counts)])

    tracks = pa.table(
        {
            C.track: pa.array(track_ids, pa.int64()),
            "albums": _list_array(offsets(n_album), album_ids[album_vals]),
            "artists": _list_array(offsets(n_artist), artist_ids[artist_vals]),
            "genres": _list_array(offsets(n_genre), genre_ids[genre_vals]),
        },
        schema=TRACKS_SCHEMA,
    )

    genre_names = [
        GENRE_NAMES[i] if i < len(GENRE_NAMES) else f"{GENRE_NAMES[i % 20]}-{i}"
        for i in range(n_genres)
    ]
    genre_names[podcast_genre] = "podcasts"
    parts = [
        ("track", track_ids, _names(rng, p.tracks, WORDS_A, WORDS_B)),
        ("album", album_ids, _names(rng, p.albums, WORDS_B, WORDS_A)),
        ("artist", artist_ids, _names(rng, p.artists, FIRST, LAST)),
        ("genre", genre_ids[named], pa.array(np.array(genre_names)[named].tolist())),
    ]
    catalog = pa.concat_tables(
        [
            pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "type": pa.array([kind] * len(ids)),
                    "name": names,
                },
                schema=CATALOG_SCHEMA,
            )
            for kind, ids, names in parts
        ]
    )
    return tracks, catalog


# Users join through the log (a join day follows its volume), ``stay_share`` of them stay to
# the end, the rest leave after an exponential lifetime. Both the day of an event and the size
# of a user's history follow a daily weight corrected for how many users are active that day,
# so that the whole log's monthly volume is the preset's (``month_volume``) and a user who is
# active longer listens more.


def _user_windows(
    p: Preset, target_cdf: np.ndarray, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """First and last active day of each of ``n`` users (join days follow ``target_cdf``)."""
    n_days = len(target_cdf)
    start = np.searchsorted(target_cdf, rng.random(n) * 0.985, side="right")
    stays = rng.random(n) < p.stay_share
    lifetime = rng.exponential(p.mean_lifetime_days, n).astype(np.int64)
    end = np.where(stays, n_days - 1, start + lifetime)
    return start, np.minimum(end, n_days - 1)


@dataclass(frozen=True, eq=False)
class _Timeline:
    """The days of a preset's log and the daily weights that place events on them."""

    preset: Preset
    start: np.datetime64  # first day
    n_days: int
    month_of_day: np.ndarray  # month index of every day
    target_cdf: np.ndarray  # cumulative target volume per day (join days follow it)
    w: np.ndarray  # cumulative activity weight: w[d] = weight before day d
    median_mass: float  # median weight of a user's window

    def user_windows(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return _user_windows(self.preset, self.target_cdf, rng, n)


@functools.lru_cache(maxsize=16)
def _timeline(p: Preset) -> _Timeline:
    """The timeline of a preset.

    The weight of a day is its target volume divided by the expected share of active users,
    computed from a fixed sample of windows.
    """
    first_month = np.datetime64(p.start, "M")
    start = first_month.astype("datetime64[D]")
    if start != np.datetime64(p.start, "D"):
        raise ValueError(f"a preset starts on the first of a month, not {p.start}")
    end = (first_month + p.months).astype("datetime64[D]")
    n_days = int((end - start).astype(np.int64))
    days = start + np.arange(n_days).astype("timedelta64[D]")
    month_of_day = days.astype("datetime64[M]").astype(np.int64) - first_month.astype(np.int64)
    days_in_month = np.bincount(month_of_day, minlength=p.months)
    target = (np.asarray(p.month_volume) / days_in_month)[month_of_day]
    target /= target.sum()
    target_cdf = np.cumsum(target)

    first, last = _user_windows(p, target_cdf, np.random.default_rng(0), 200_000)
    change = np.zeros(n_days + 1)
    np.add.at(change, first, 1.0)
    np.add.at(change, last + 1, -1.0)
    active = np.cumsum(change)[:n_days] / len(first)
    weight = target / np.maximum(active, 1e-3)
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    cum /= cum[-1]
    return _Timeline(
        preset=p,
        start=start,
        n_days=n_days,
        month_of_day=month_of_day,
        target_cdf=target_cdf,
        w=cum,
        median_mass=float(np.median(cum[last + 1] - cum[first])),
    )


@dataclass
class _Users:
    """One chunk of users: activity window, history size and tastes."""

    n_events: np.ndarray
    start: np.ndarray
    end: np.ndarray
    early: np.ndarray  # favourite genres at the start of the window (users x k)
    late: np.ndarray  # ... and at its end: a few have changed
    genre_cum: np.ndarray  # cumulative preference over the k genre slots
    fav_artist: np.ndarray  # favourite artists (users x k)
    mix: np.ndarray  # cumulative share of popular / genre / artist [/ cluster] listening
    late_artist: np.ndarray | None = None  # favourite artists at the end, if they drift
    fav_cluster: np.ndarray | None = None  # favourite co-listening clusters (users x k)


K_GENRES = 4
K_ARTISTS = 8
K_CLUSTERS = 3


def _draw_users(
    p: Preset, tl: _Timeline, cat: _Catalogue, n_users: int, rng: np.random.Generator
) -> _Users:
    """Windows, history sizes and tastes of ``n_users`` users.

    Draws beyond the real log's model (drifting artists, clusters) come last and only when the
    preset asks for them, so the default presets keep their exact output.
    """
    n_genres = len(cat.genre_pop)
    start, end = tl.user_windows(rng, n_users)
    mass = tl.w[end + 1] - tl.w[start]
    rate = rng.lognormal(np.log(p.median_events), p.events_sigma, n_users)
    n_events = np.round(rate * mass / tl.median_mass)
    n_events = np.clip(n_events, p.min_events, p.max_events).astype(np.int64)
    # favourite genres drawn with a flattened popularity, so niche genres have fans
    genre_p = cat.genre_pop**0.6 / (cat.genre_pop**0.6).sum()
    early = rng.choice(n_genres, size=(n_users, K_GENRES), p=genre_p)
    late = early.copy()
    drift = rng.random((n_users, K_GENRES)) < p.genre_drift
    late[drift] = rng.choice(n_genres, size=int(drift.sum()), p=genre_p)
    # favourite artists: half from the first genre, half from any favourite genre
    slots = rng.integers(0, K_GENRES, (n_users, K_ARTISTS))
    slots[rng.random((n_users, K_ARTISTS)) < 0.5] = 0
    fav_genre = early[np.arange(n_users)[:, None], slots]
    fav_artist, _ = cat.artist_by_genre.draw(
        np.zeros(slots.size, np.int64), fav_genre.ravel(), rng.random(slots.size)
    )
    users = _Users(
        n_events=n_events,
        start=start,
        end=end,
        early=early,
        late=late,
        genre_cum=rng.dirichlet(np.full(K_GENRES, 0.5), n_users).cumsum(1),
        fav_artist=fav_artist.reshape(n_users, K_ARTISTS),
        mix=rng.dirichlet(p.mix, n_users).cumsum(1),
    )
    if p.artist_drift > 0:
        # replaced artists come from the late favourite genres
        late_genre = late[np.arange(n_users)[:, None], slots]
        drawn, _ = cat.artist_by_genre.draw(
            np.zeros(slots.size, np.int64), late_genre.ravel(), rng.random(slots.size)
        )
        replace = rng.random(slots.size) < p.artist_drift
        users.late_artist = np.where(replace, drawn, users.fav_artist.ravel()).reshape(
            n_users, K_ARTISTS
        )
    if cat.by_cluster is not None:
        users.fav_cluster = rng.integers(0, p.clusters, (n_users, K_CLUSTERS))
    return users


def _draw_events(
    tl: _Timeline,
    cat: _Catalogue,
    users: _Users,
    who: np.ndarray,
    n_draws: np.ndarray,
    rng: np.random.Generator,
    popular_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_draws[i]`` events of user ``who[i]``: (user, track index, day), repeats possible."""
    user = np.repeat(who, n_draws)
    lo, hi = tl.w[users.start], tl.w[users.end + 1]
    v = lo[user] + rng.random(len(user)) * (hi[user] - lo[user])
    day = np.clip(np.searchsorted(tl.w, v, side="right") - 1, users.start[user], users.end[user])
    month = tl.month_of_day[day]
    span = np.maximum(users.end - users.start, 1)[user]
    is_late = rng.random(len(user)) < (day - users.start[user]) / span
    if popular_only:
        source = np.zeros(len(user), np.int64)
    else:  # 0 popular, 1 genre, 2 artist, 3 cluster
        r = rng.random(len(user))
        source = np.zeros(len(user), np.int8)
        for column in range(users.mix.shape[1] - 1):
            source += r > users.mix[user, column]

    u = rng.random(len(user))
    track, _ = cat.popular.draw(month, np.zeros(len(user), np.int64), u)
    sel = np.flatnonzero(source == 1)
    slot = (rng.random(len(sel))[:, None] > users.genre_cum[user[sel]]).sum(1)
    slot = slot.clip(0, K_GENRES - 1)
    genres = np.where(is_late[sel], users.late[user[sel], slot], users.early[user[sel], slot])
    drawn, ok = cat.by_genre.draw(month[sel], genres, u[sel])
    track[sel[ok]] = drawn[ok]
    sel = np.flatnonzero(source == 2)
    slot = rng.integers(0, K_ARTISTS, len(sel))
    artists = users.fav_artist[user[sel], slot]
    if users.late_artist is not None:
        artists = np.where(is_late[sel], users.late_artist[user[sel], slot], artists)
    drawn, ok = cat.by_artist.draw(month[sel], artists, u[sel])
    track[sel[ok]] = drawn[ok]
    if cat.by_cluster is not None and users.fav_cluster is not None:
        sel = np.flatnonzero(source == 3)
        clusters = users.fav_cluster[user[sel], rng.integers(0, K_CLUSTERS, len(sel))]
        drawn, ok = cat.by_cluster.draw(month[sel], clusters, u[sel])
        track[sel[ok]] = drawn[ok]
    return user, track.astype(np.int64), day


def _chunk_events(
    p: Preset, tl: _Timeline, cat: _Catalogue, n_users: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events of one chunk of users: (user index, track index, day), unique pairs.

    Draws with repeats, keeps the first draw of each (user, track) pair and draws again for
    users still short (a heavy listener exhausts their favourite genres, so the last rounds
    draw from overall popularity), then keeps a random subset of the wanted size per user.
    """
    users = _draw_users(p, tl, cat, n_users, rng)
    n_tracks = len(cat.track_ids)
    user = np.zeros(0, np.int64)
    track = np.zeros(0, np.int64)
    day = np.zeros(0, np.int64)
    who, need = np.arange(n_users), users.n_events
    for attempt in range(4):
        got = _draw_events(
            tl,
            cat,
            users,
            who,
            np.ceil(need * 1.3 + 5).astype(np.int64),
            rng,
            popular_only=attempt >= 2,
        )
        user, track, day = (
            np.concatenate([a, b]) for a, b in zip((user, track, day), got, strict=True)
        )
        _, first = np.unique(user * n_tracks + track, return_index=True)
        first.sort()  # earlier rounds first
        user, track, day = user[first], track[first], day[first]
        have = np.bincount(user, minlength=n_users)
        short = have < users.n_events
        if not short.any():
            break
        who, need = np.flatnonzero(short), (users.n_events - have)[short]

    # draws are independent, so a user's first unique draws are a random subset of them
    order = np.argsort(user, kind="stable")
    user, track, day = user[order], track[order], day[order]
    rank = np.arange(len(user)) - np.searchsorted(user, user)
    keep = rank < users.n_events[user]
    user, track, day = user[keep], track[keep], day[keep]
    if p.repeat_share > 0:
        user, track, day = _add_repeats(p.repeat_share, users, user, track, day, rng)
    return user, track, day


SAME_DAY_REPEATS = 0.35  # share of repeated listens on the day of the listen they repeat
REPEAT_GAP_DAYS = 20.0  # mean gap of the others (geometric)


def _add_repeats(
    share: float,
    users: _Users,
    user: np.ndarray,
    track: np.ndarray,
    day: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Append listens again to already heard tracks so that ``share`` of all rows repeat one.

    A repeat copies a random listen of the user (a track heard often attracts more) to the
    same day or a later day inside the user's window; rows stay grouped by user.
    """
    n_repeats = rng.poisson(len(user) * share / (1.0 - share))
    source = np.sort(rng.integers(0, len(user), n_repeats))
    gap = np.where(
        rng.random(n_repeats) < SAME_DAY_REPEATS,
        0,
        rng.geometric(1.0 / REPEAT_GAP_DAYS, n_repeats),
    )
    who = user[source]
    new_day = np.minimum(day[source] + gap, users.end[who])
    user, track, day = (
        np.concatenate([a, b])
        for a, b in zip((user, track, day), (who, track[source], new_day), strict=True)
    )
    order = np.argsort(user, kind="stable")
    return user[order], track[order], day[order]


def _events_table(
    tl: _Timeline,
    monthly_dates: bool,
    user_ids: np.ndarray,
    user: np.ndarray,
    track_ids: np.ndarray,
    track: np.ndarray,
    day: np.ndarray,
) -> pa.Table:
    """Sort a chunk by user and day and number each user's events (track_seq).

    Events of one day keep their (random) draw order. With ``monthly_dates`` the written date
    is the first day of the month, while track_seq still follows the drawn days (a log that
    only keeps months still knows the order of its events).
    """
    order = np.argsort(user.astype(np.int64) * tl.n_days + day, kind="stable")
    user, track, day = user[order], track[order], day[order]
    group_start = np.searchsorted(user, user)
    seq = np.arange(len(user)) - group_start + 1
    dates = tl.start + day.astype("timedelta64[D]")
    if monthly_dates:
        dates = dates.astype("datetime64[M]").astype("datetime64[D]")
    started = dates.astype("datetime64[ns]")
    return pa.table(
        {
            C.user: pa.array(user_ids[user].astype(np.int32)),
            C.track: pa.array(track_ids[track].astype(np.int32)),
            C.seq: pa.array(seq.astype(np.int16)),
            C.started_at: pa.array(started),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def generate(preset: str, out_dir: Path, seed: int = 42) -> dict[str, int]:
    """Write the three input files of a preset into ``out_dir``; deterministic for a seed.

    Returns the counts of users, tracks and events written.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    tl = _timeline(p)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    cat, tracks, catalog = _build_catalogue(p, rng)
    io.write_table(tracks, out_dir / io.TRACKS)
    io.write_table(catalog, out_dir / io.CATALOG_NAMES)
    log.info(
        "catalogue: %d tracks, %d names (%.1f s)",
        tracks.num_rows,
        catalog.num_rows,
        time.perf_counter() - started,
    )

    user_ids = _sparse_ids(rng, p.users, 1, p.max_user_id)
    seen = np.zeros(p.tracks, bool)
    n_events = 0
    chunks = range(0, p.users, p.chunk_users)
    with (
        io.atomic_path(out_dir / io.INTERACTIONS) as tmp,
        pq.ParquetWriter(tmp, INTERACTIONS_SCHEMA, compression="zstd") as writer,
    ):
        for index, first in enumerate(
            tqdm(chunks, desc="users", unit="chunk", disable=len(chunks) < 3)
        ):
            chunk_rng = np.random.default_rng([seed, index])
            ids = user_ids[first : first + p.chunk_users]
            user, track, day = _chunk_events(p, tl, cat, len(ids), chunk_rng)
            seen[track] = True
            if first + p.chunk_users >= p.users:
                user, track, day = _cover_unseen(
                    seen, user, track, day, len(ids), tl.n_days, chunk_rng
                )
            table = _events_table(tl, p.monthly_dates, ids, user, cat.track_ids, track, day)
            writer.write_table(table, row_group_size=2_000_000)
            n_events += table.num_rows
    log.info(
        "generated %s: %d users, %d tracks, %d events in %.1f s",
        preset,
        p.users,
        p.tracks,
        n_events,
        time.perf_counter() - started,
    )
    return {"users": p.users, "tracks": p.tracks, "events": n_events}


def _cover_unseen(
    seen: np.ndarray,
    user: np.ndarray,
    track: np.ndarray,
    day: np.ndarray,
    n_users: int,
    n_days: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give every track nobody drew one listener, so each track appears at least once.

    The real log has this property (its catalogue is the set of tracks listened to).
    """
    unseen = np.flatnonzero(~seen)
    seen[unseen] = True
    if len(unseen) == 0:
        return user, track, day
    extra_user = rng.integers(0, n_users, len(unseen))
    # the day of a listener's existing event keeps the new event inside the user's window
    first_of_user = np.searchsorted(user, extra_user)
    has_events = first_of_user < len(user)
    extra_day = np.where(
        has_events,
        day[np.minimum(first_of_user, len(day) - 1)],
        rng.integers(0, n_days, len(unseen)),
    )
    return (
        np.concatenate([user, extra_user]),
        np.concatenate([track, unseen]),
        np.concatenate([day, extra_day]),
    )
