"""Column names shared by every table, so a rename happens in one place."""


class Columns:
    """Names of the columns of the input data and of the artefacts."""

    user = "user_id"
    track = "track_id"
    seq = "track_seq"
    started_at = "started_at"
    day = "day"  # days since 1970-01-01 (int16), the in-memory form of started_at
    plays = "plays"  # listens merged into one event (same user, track and day)
    score = "score"
    rank = "rank"
    similar = "similar_track_id"
    listeners = "listeners"
    target = "target"
    # catalogue
    name = "name"
    album_ids = "album_ids"
    artist_ids = "artist_ids"
    genre_ids = "genre_ids"
    albums = "albums"
    artists = "artists"
    genres = "genres"
