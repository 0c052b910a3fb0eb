"""Shape figures of a data folder, printed beside the real data set's (DATA.md).

Reads the interactions a row group at a time and keeps only per-user and per-track counters,
so it runs on the full 222 M events in a few GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musicrec import io
from musicrec.arrays import distinct
from musicrec.columns import Columns as C
from musicrec.errors import DataError

# The real data set's figures (DATA.md); None where DATA.md gives none.
REAL: dict[str, Any] = {
    "users": 1_373_221,
    "tracks": 1_000_000,
    "events": 222_629_898,
    "catalogue names": 1_812_471,
    "events per user, mean": "156-162",
    "events per user, median": "54-55",
    "events per user, mean / median": 2.9,
    "events per user, max": 16_600,
    "first month's events": 2_290_000,
    "busiest month / first month": 14.4,
    "last month / busiest month": 0.92,
    "tracks with no album": 18,
    "tracks with no artist": 15_369,
    "tracks with no genre": 3_687,
    "genre ids missing from the catalogue": 30,
    "tracks using a missing genre id": 48_345,
    "share of events in the last 16 days": 0.062,
    "users of the last 16 days": 783_525,
    "repeated (user, track) pairs": 0,
    "tracks nobody listened to": 0,
}


def check_data(data_dir: Path) -> dict[str, Any]:
    """Compute the figures of REAL for the three input files in ``data_dir``."""
    data_dir = Path(data_dir)
    for name in io.INPUT_FILES:
        if not (data_dir / name).exists():
            raise DataError(f"{data_dir / name}: file not found")
    tracks = pq.read_table(data_dir / io.TRACKS)
    catalog = pq.read_table(data_dir / io.CATALOG_NAMES, columns=["id", "type"])
    track_ids = np.sort(tracks.column(C.track).to_numpy())

    genre_names = catalog.filter(pc.equal(catalog.column("type"), "genre")).column("id")
    genres = tracks.column("genres").combine_chunks()
    used = pc.list_flatten(genres)
    missing_genres = pc.invert(pc.is_in(used, value_set=genre_names.combine_chunks()))
    missing_ids = pc.unique(pc.filter(used, missing_genres))
    parents = pc.list_parent_indices(genres)
    tracks_with_missing = len(pc.unique(pc.filter(parents, missing_genres)))

    handle = pq.ParquetFile(data_dir / io.INTERACTIONS)
    per_user = np.zeros(0, np.int64)
    per_track = np.zeros(len(track_ids), np.int64)
    per_day: dict[int, int] = {}
    for group in range(handle.num_row_groups):
        table = handle.read_row_group(group, columns=[C.user, C.track, C.started_at])
        user = table.column(C.user).to_numpy()
        counts = np.bincount(user)
        if len(counts) > len(per_user):
            per_user = np.pad(per_user, (0, len(counts) - len(per_user)))
        per_user[: len(counts)] += counts
        index = np.searchsorted(track_ids, table.column(C.track).to_numpy())
        per_track += np.bincount(index, minlength=len(track_ids))[: len(track_ids)]
        day = table.column(C.started_at).cast(pa.date32()).cast(pa.int32()).to_numpy()
        days, day_counts = np.unique(day, return_counts=True)
        for d, n in zip(days.tolist(), day_counts.tolist(), strict=True):
            per_day[d] = per_day.get(d, 0) + n
    users_seen = per_user[per_user > 0]
    n_events = int(per_user.sum())

    day_axis = np.array(sorted(per_day))
    day_counts = np.array([per_day[d] for d in day_axis])
    months = day_axis.astype("datetime64[D]").astype("datetime64[M]")
    month_keys, month_index = np.unique(months, return_inverse=True)
    per_month = np.bincount(month_index, weights=day_counts)
    last_16 = day_counts[day_axis > day_axis.max() - 16].sum()
    users_last_16 = _users_since(handle, int(day_axis.max()) - 15)

    return {
        "users": len(users_seen),
        "tracks": tracks.num_rows,
        "events": n_events,
        "catalogue names": catalog.num_rows,
        "events per user, mean": round(float(users_seen.mean()), 1),
        "events per user, median": float(np.median(users_seen)),
        "events per user, mean / median": round(
            float(users_seen.mean() / np.median(users_seen)), 2
        ),
        "events per user, max": int(users_seen.max()),
        "first month's events": int(per_month[0]),
        "busiest month / first month": round(float(per_month.max() / per_month[0]), 1),
        "last month / busiest month": round(float(per_month[-1] / per_month.max()), 2),
        "tracks with no album": _empty_lists(tracks, "albums"),
        "tracks with no artist": _empty_lists(tracks, "artists"),
        "tracks with no genre": _empty_lists(tracks, "genres"),
        "genre ids missing from the catalogue": len(missing_ids),
        "tracks using a missing genre id": tracks_with_missing,
        "share of events in the last 16 days": round(float(last_16 / n_events), 3),
        "users of the last 16 days": users_last_16,
        "repeated (user, track) pairs": _repeated_pairs(handle),
        "tracks nobody listened to": int((per_track == 0).sum()),
        "months": {str(m): int(n) for m, n in zip(month_keys, per_month, strict=True)},
        "top track's share of users": round(float(per_track.max() / len(users_seen)), 4),
        "share of tracks with < 10 listeners": round(float((per_track < 10).mean()), 3),
    }


def _empty_lists(tracks: pa.Table, column: str) -> int:
    lengths = pc.list_value_length(tracks.column(column)).to_numpy(zero_copy_only=False)
    return int(np.sum(np.nan_to_num(lengths.astype(float)) == 0))


def _users_since(handle: pq.ParquetFile, first_day: int) -> int:
    users: list[np.ndarray] = []
    for group in range(handle.num_row_groups):
        table = handle.read_row_group(group, columns=[C.user, C.started_at])
        day = table.column(C.started_at).cast(pa.date32()).cast(pa.int32()).to_numpy()
        users.append(distinct(table.column(C.user).to_numpy()[day >= first_day]))
    return len(distinct(np.concatenate(users))) if users else 0


def _repeated_pairs(handle: pq.ParquetFile) -> int:
    """Repeated (user, track) pairs; a user's events may span row groups, so sort all keys."""
    keys = []
    for group in range(handle.num_row_groups):
        table = handle.read_row_group(group, columns=[C.user, C.track])
        user = table.column(C.user).to_numpy().astype(np.int64)
        keys.append((user << 32) | table.column(C.track).to_numpy().astype(np.int64))
    key = np.concatenate(keys)
    del keys
    key.sort()
    return int(np.sum(key[1:] == key[:-1]))


def format_report(figures: dict[str, Any]) -> str:
    """A two-column text table: this data set beside the real one."""
    lines = [f"{'figure':<40} {'this data':>16} {'real data':>16}", "-" * 74]
    for name, value in figures.items():
        if name == "months":
            continue
        real = REAL.get(name, "")
        lines.append(f"{name:<40} {_fmt(value):>16} {_fmt(real):>16}")
    lines.append("")
    lines.append(
        "events per month: "
        + ", ".join(
            f"{month[5:7]}: {count / 1e6:.2f} M" for month, count in figures["months"].items()
        )
    )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value)
