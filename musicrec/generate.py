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
"""

from __future__ import annotations

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

YEAR_START = np.datetime64("2022-01-01", "D")
N_DAYS = 365
N_MONTHS = 12
# Events per month in the real log (millions): January and November/December are published,
# the months between grow about linearly (DATA.md); only the shape matters here.
MONTH_VOLUME = np.array(
    [2.29, 5.35, 8.41, 11.47, 14.53, 17.59, 20.65, 23.71, 26.77, 29.83, 32.9, 30.2]
)

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
    """Sizes of one generated data set."""

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
}

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
    # a quarter of the tracks are released during the year and are hot for a few months
    release_month = np.where(rng.random(p.tracks) < 0.25, rng.integers(0, N_MONTHS, p.tracks), -1)
    months = np.arange(N_MONTHS)[:, None]
    age = months - release_month[None, :]
    monthly = np.where(
        release_month[None, :] < 0,
        base_pop[None, :],
        np.where(
            age < 0, 0.0, base_pop[None, :] * (1.0 + 5.0 * np.exp(-np.clip(age, 0, None) / 1.5))
        ),
    )

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
    cat = _Catalogue(
        track_ids=track_ids,
        genre_pop=genre_pop,
        popular=popular,
        by_genre=by_genre,
        by_artist=by_artist,
        artist_by_genre=artist_by_genre,
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


_MONTH_OF_DAY = (YEAR_START + np.arange(N_DAYS).astype("timedelta64[D]")).astype(
    "datetime64[M]"
).astype(np.int64) - YEAR_START.astype("datetime64[M]").astype(np.int64)

# Users join through the year (a join day follows the year's volume), 30 % stay to the end,
# the rest leave after an exponential lifetime. Both the day of an event and the size of a
# user's history follow a daily weight corrected for how many users are active that day, so
# that the whole log's monthly volume is the real one (MONTH_VOLUME) and a user who is active
# longer listens more.
STAY_SHARE = 0.3
MEAN_LIFETIME_DAYS = 90.0
EVENTS_SIGMA = 1.15  # lognormal spread of a user's listening rate


def _target_daily() -> np.ndarray:
    days_in_month = np.bincount(_MONTH_OF_DAY, minlength=N_MONTHS)
    daily = (MONTH_VOLUME / days_in_month)[_MONTH_OF_DAY]
    return daily / daily.sum()


_TARGET_CDF = np.cumsum(_target_daily())


def _user_windows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last active day of each of ``n`` users."""
    start = np.searchsorted(_TARGET_CDF, rng.random(n) * 0.985, side="right")
    stays = rng.random(n) < STAY_SHARE
    lifetime = rng.exponential(MEAN_LIFETIME_DAYS, n).astype(np.int64)
    end = np.where(stays, N_DAYS - 1, start + lifetime)
    return start, np.minimum(end, N_DAYS - 1)


def _activity_weights() -> tuple[np.ndarray, float]:
    """Cumulative daily weight W (W[d] = weight before day d) and the median window mass.

    The weight of a day is the target volume divided by the expected share of active users,
    computed once from a fixed sample of windows.
    """
    start, end = _user_windows(np.random.default_rng(0), 200_000)
    change = np.zeros(N_DAYS + 1)
    np.add.at(change, start, 1.0)
    np.add.at(change, end + 1, -1.0)
    active = np.cumsum(change)[:N_DAYS] / len(start)
    weight = _target_daily() / np.maximum(active, 1e-3)
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    cum /= cum[-1]
    return cum, float(np.median(cum[end + 1] - cum[start]))


_W, _MEDIAN_MASS = _activity_weights()


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
    mix: np.ndarray  # cumulative share of popular / genre / artist listening


K_GENRES = 4
K_ARTISTS = 8


def _draw_users(p: Preset, cat: _Catalogue, n_users: int, rng: np.random.Generator) -> _Users:
    n_genres = len(cat.genre_pop)
    start, end = _user_windows(rng, n_users)
    mass = _W[end + 1] - _W[start]
    rate = rng.lognormal(np.log(p.median_events), EVENTS_SIGMA, n_users)
    n_events = np.clip(np.round(rate * mass / _MEDIAN_MASS), 1, p.max_events).astype(np.int64)
    # favourite genres drawn with a flattened popularity, so niche genres have fans
    genre_p = cat.genre_pop**0.6 / (cat.genre_pop**0.6).sum()
    early = rng.choice(n_genres, size=(n_users, K_GENRES), p=genre_p)
    late = early.copy()
    drift = rng.random((n_users, K_GENRES)) < 0.3
    late[drift] = rng.choice(n_genres, size=int(drift.sum()), p=genre_p)
    # favourite artists: half from the first genre, half from any favourite genre
    slots = rng.integers(0, K_GENRES, (n_users, K_ARTISTS))
    slots[rng.random((n_users, K_ARTISTS)) < 0.5] = 0
    fav_genre = early[np.arange(n_users)[:, None], slots]
    fav_artist, _ = cat.artist_by_genre.draw(
        np.zeros(slots.size, np.int64), fav_genre.ravel(), rng.random(slots.size)
    )
    return _Users(
        n_events=n_events,
        start=start,
        end=end,
        early=early,
        late=late,
        genre_cum=rng.dirichlet(np.full(K_GENRES, 0.5), n_users).cumsum(1),
        fav_artist=fav_artist.reshape(n_users, K_ARTISTS),
        mix=rng.dirichlet([1.5, 4.0, 3.0], n_users).cumsum(1),
    )


def _draw_events(
    cat: _Catalogue,
    users: _Users,
    who: np.ndarray,
    n_draws: np.ndarray,
    rng: np.random.Generator,
    popular_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_draws[i]`` events of user ``who[i]``: (user, track index, day), repeats possible."""
    user = np.repeat(who, n_draws)
    lo, hi = _W[users.start], _W[users.end + 1]
    v = lo[user] + rng.random(len(user)) * (hi[user] - lo[user])
    day = np.clip(np.searchsorted(_W, v, side="right") - 1, users.start[user], users.end[user])
    month = _MONTH_OF_DAY[day]
    span = np.maximum(users.end - users.start, 1)[user]
    is_late = rng.random(len(user)) < (day - users.start[user]) / span
    if popular_only:
        source = np.zeros(len(user), np.int64)
    else:  # 0 popular, 1 genre, 2 artist
        r = rng.random(len(user))
        source = (r > users.mix[user, 0]).astype(np.int8) + (r > users.mix[user, 1])

    u = rng.random(len(user))
    track, _ = cat.popular.draw(month, np.zeros(len(user), np.int64), u)
    sel = np.flatnonzero(source == 1)
    slot = (rng.random(len(sel))[:, None] > users.genre_cum[user[sel]]).sum(1)
    slot = slot.clip(0, K_GENRES - 1)
    genres = np.where(is_late[sel], users.late[user[sel], slot], users.early[user[sel], slot])
    drawn, ok = cat.by_genre.draw(month[sel], genres, u[sel])
    track[sel[ok]] = drawn[ok]
    sel = np.flatnonzero(source == 2)
    artists = users.fav_artist[user[sel], rng.integers(0, K_ARTISTS, len(sel))]
    drawn, ok = cat.by_artist.draw(month[sel], artists, u[sel])
    track[sel[ok]] = drawn[ok]
    return user, track.astype(np.int64), day


def _chunk_events(
    p: Preset, cat: _Catalogue, n_users: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events of one chunk of users: (user index, track index, day), unique pairs.

    Draws with repeats, keeps the first draw of each (user, track) pair and draws again for
    users still short (a heavy listener exhausts their favourite genres, so the last rounds
    draw from overall popularity), then keeps a random subset of the wanted size per user.
    """
    users = _draw_users(p, cat, n_users, rng)
    n_tracks = len(cat.track_ids)
    user = np.zeros(0, np.int64)
    track = np.zeros(0, np.int64)
    day = np.zeros(0, np.int64)
    who, need = np.arange(n_users), users.n_events
    for attempt in range(4):
        got = _draw_events(
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
    return user[keep], track[keep], day[keep]


def _events_table(
    user_ids: np.ndarray,
    user: np.ndarray,
    track_ids: np.ndarray,
    track: np.ndarray,
    day: np.ndarray,
) -> pa.Table:
    """Sort a chunk by user and day and number each user's events (track_seq).

    Events of one day keep their (random) draw order.
    """
    order = np.argsort(user.astype(np.int64) * N_DAYS + day, kind="stable")
    user, track, day = user[order], track[order], day[order]
    group_start = np.searchsorted(user, user)
    seq = np.arange(len(user)) - group_start + 1
    started = (YEAR_START + day.astype("timedelta64[D]")).astype("datetime64[ns]")
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
            user, track, day = _chunk_events(p, cat, len(ids), chunk_rng)
            seen[track] = True
            if first + p.chunk_users >= p.users:
                user, track, day = _cover_unseen(seen, user, track, day, len(ids), chunk_rng)
            table = _events_table(ids, user, cat.track_ids, track, day)
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
        rng.integers(0, N_DAYS, len(unseen)),
    )
    return (
        np.concatenate([user, extra_user]),
        np.concatenate([track, unseen]),
        np.concatenate([day, extra_day]),
    )
