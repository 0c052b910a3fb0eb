"""Charts for the notebook and the pipeline: DataFrames in, a matplotlib ``Figure`` out.

Figures are built on the Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never through
``pyplot``: no global backend switch, no window, no figure left open in pyplot's registry.
A notebook displays a returned Figure as PNG; the pipeline saves it with ``io.write_figure``.

The EDA functions take ``events`` in the compact form of ``io.read_events`` (user_id int32,
track_id int32, day int16) and stay cheap at 200 M rows: per-id counts by ``np.bincount`` over
small id spans or one ``np.sort`` otherwise, and catalogue lists are exploded only after the
events were reduced to one count per track. Events hold each (user, track) pair once (the data
contract), so events per track are its listeners.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from musicrec.arrays import distinct, group_starts
from musicrec.columns import Columns as C

log = logging.getLogger(__name__)

PLOTTED_METRICS = ("ndcg", "precision", "recall")
_BINCOUNT_SPAN = 1 << 24  # a count table this small stays in cache; wider spans are sorted
_CHUNK = 1 << 24
_LABEL_CHARS = 42


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (9, 5), **kw):
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _id_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids (ascending) and how often each occurs."""
    values = np.asarray(values)
    if len(values) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < _BINCOUNT_SPAN:
        counts = np.bincount((values - lo).astype(np.int64, copy=False), minlength=hi - lo + 1)
        ids = np.flatnonzero(counts)
        return ids + lo, counts[ids]
    ordered = np.sort(values)  # a bincount would scatter over the whole (sparse) id span
    starts = np.flatnonzero(group_starts(ordered))
    return ordered[starts].astype(np.int64), np.diff(np.r_[starts, len(ordered)])


def _thousands(value: float, _pos: int | None = None) -> str:
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _short(label: object) -> str:
    text = str(label)
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


# --- metrics -------------------------------------------------------------------------------


def plot_metrics(metrics: pd.DataFrame, names: Sequence[str] = PLOTTED_METRICS) -> Figure:
    """Grouped bars of each metric in ``names``: one panel per metric, a group per k, a bar per
    source (sources in the order of the table), the value written above each bar."""
    missing = [c for c in ("source", "k", *names) if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}")
    sources = list(dict.fromkeys(metrics["source"]))
    ks = sorted(metrics["k"].unique())
    fig, axes = _figure(1, len(names), size=(4.2 * len(names) + 1, 4.5))
    width = 0.8 / max(len(sources), 1)
    x = np.arange(len(ks))
    table = metrics.set_index(["source", "k"])
    for ax, name in zip(axes[0], names, strict=True):
        for i, source in enumerate(sources):
            values = [
                float(table.loc[(source, k), name]) if (source, k) in table.index else np.nan
                for k in ks
            ]
            bars = ax.bar(x + (i - (len(sources) - 1) / 2) * width, values, width, label=source)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(x, [f"@{k}" for k in ks])
        ax.set_title(name)
        ax.margins(y=0.25)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("value on the test period")
    axes[0][-1].legend(title="source", fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def plot_ndcg_intervals(
    metrics: pd.DataFrame,
    k: int = 10,
    segment: str = "all",
    highlight: str | None = "served",
    title: str | None = None,
) -> Figure:
    """NDCG@k of each source as a point with its interval (``ndcg_low`` .. ``ndcg_high``) as an
    error bar, one row per source, the best on top; ``highlight`` is drawn in red.

    ``metrics`` has the columns ``source, k, ndcg, ndcg_low, ndcg_high`` (and ``segment``, of
    which only ``segment`` is drawn, when present) — the table ``evaluate`` writes with
    bootstrap intervals. A row without an interval (NaN bounds) is drawn as a bare point.
    """
    missing = [c for c in ("source", "k", "ndcg", "ndcg_low", "ndcg_high") if c not in metrics]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}")
    rows = metrics[metrics["k"] == k]
    if "segment" in rows.columns:
        rows = rows[rows["segment"] == segment]
    if rows.empty:
        raise ValueError(
            f"no rows at k={k}" + (f", segment {segment!r}" if "segment" in metrics else "")
        )
    rows = rows.drop_duplicates("source").sort_values("ndcg", kind="stable")  # best on top
    value = rows["ndcg"].to_numpy(dtype=float)
    low = np.where(np.isnan(rows["ndcg_low"].to_numpy(dtype=float)), value, rows["ndcg_low"])
    high = np.where(np.isnan(rows["ndcg_high"].to_numpy(dtype=float)), value, rows["ndcg_high"])
    fig, axes = _figure(size=(8, 0.45 * len(rows) + 1.5))
    ax: Axes = axes[0][0]
    y = np.arange(len(rows))
    colors = ["tab:red" if s == highlight else "tab:blue" for s in rows["source"]]
    ax.errorbar(
        value,
        y,
        xerr=np.vstack([value - low, high - value]),
        fmt="none",
        ecolor="grey",
        capsize=4,
        linewidth=1.2,
    )
    ax.scatter(value, y, c=colors, zorder=3)
    for yi, v, h in zip(y, value, high, strict=True):
        ax.annotate(
            f"{v:.3f}", (h, yi), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8
        )
    ax.set_yticks(y, [_short(s) for s in rows["source"]])
    ax.set_xlabel(f"NDCG@{k} (bar: 95 % bootstrap interval over users)")
    ax.set_xlim(left=0, right=float(np.nanmax(high)) * 1.15 or 1.0)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"NDCG@{k} by source, segment {segment}")
    return fig


# --- EDA -----------------------------------------------------------------------------------


def plot_events_per_user(events: pd.DataFrame) -> Figure:
    """Histogram of events per user on log-spaced bins, log axes, mean and median marked."""
    _, per_user = _id_counts(events[C.user].to_numpy())
    if not len(per_user):
        raise ValueError("no events to plot")
    fig, axes = _figure()
    ax: Axes = axes[0][0]
    top = max(int(per_user.max()), 2)
    bins = np.unique(np.geomspace(1, top + 1, 50).round())
    ax.hist(per_user, bins=bins.tolist(), color="tab:blue", alpha=0.8)
    mean, median = float(per_user.mean()), float(np.median(per_user))
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:,.1f}")
    ax.axvline(median, color="tab:green", linestyle="-", label=f"median {median:,.1f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events per user")
    ax.set_ylabel("users")
    ax.set_title(f"Events per user ({len(per_user):,} users, max {int(per_user.max()):,})")
    ax.legend()
    return fig


def plot_popularity_long_tail(events: pd.DataFrame, max_points: int = 4000) -> Figure:
    """Listeners per track, most popular first, on log-log axes.

    At most ``max_points`` log-spaced ranks are drawn: on log-log axes they show the same
    curve as a million points, at a fraction of the rendering cost.
    """
    _, listeners = _id_counts(events[C.track].to_numpy())
    if not len(listeners):
        raise ValueError("no events to plot")
    listeners = np.sort(listeners)[::-1]
    ranks = np.arange(1, len(listeners) + 1)
    if len(listeners) > max_points:
        keep = np.unique(np.geomspace(1, len(listeners), max_points).astype(np.int64)) - 1
        ranks, shown = ranks[keep], listeners[keep]
    else:
        shown = listeners
    top = max(1, len(listeners) // 100)
    share = listeners[:top].sum() / listeners.sum()
    fig, axes = _figure()
    ax: Axes = axes[0][0]
    ax.plot(ranks, shown, color="tab:purple")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("track rank by popularity")
    ax.set_ylabel("listeners")
    ax.set_title(
        f"Popularity long tail: the top 1 % of {len(listeners):,} tracks get {share:.0%} of listens"
    )
    ax.grid(alpha=0.3, which="both")
    return fig


_BY = {
    "track": (None, None),
    "artist": (C.artist_ids, C.artists),
    "genre": (C.genre_ids, C.genres),
}


def _track_label(items: pd.DataFrame, track_id: int, pos: int) -> str:
    """'name — first artist', falling back to 'track <id>' for a track missing from items."""
    if pos < 0 or C.name not in items.columns:
        return f"track {track_id}"
    name = items[C.name].iloc[pos]
    label = str(name) if isinstance(name, str) and name else f"track {track_id}"
    if C.artists in items.columns:
        artists = items[C.artists].iloc[pos]
        if artists is not None and len(artists):
            label += f" — {artists[0]}"
    return label


def top_names(
    events: pd.DataFrame, items: pd.DataFrame, by: str = "track", n: int = 15
) -> pd.Series:
    """The ``n`` most listened tracks/artists/genres: listens (events) indexed by name.

    Counts per track come first; only the catalogue rows of heard tracks are then exploded to
    artists or genres (a track with two artists counts for both). Groups are formed by id when
    the catalogue has the id lists (two artists may share a name), else by name.
    """
    if by not in _BY:
        raise ValueError(f"by must be one of {sorted(_BY)}, got {by!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    ids, counts = _id_counts(events[C.track].to_numpy())
    position = pd.Index(items[C.track].to_numpy()).get_indexer(ids)
    if by == "track":
        order = np.lexsort((ids, -counts))[:n]  # most listens first; ties by id
        labels = [
            _track_label(items, tid, pos)
            for tid, pos in zip(ids[order], position[order], strict=True)
        ]
        return pd.Series(counts[order], index=labels, name="listens")

    id_col, name_col = _BY[by]
    if name_col not in items.columns:
        raise ValueError(f"items lack the column {name_col!r} needed for by={by!r}")
    heard = position >= 0
    cols = [name_col] + ([id_col] if id_col in items.columns else [])
    sub = items.iloc[position[heard], :][cols].reset_index(drop=True)
    sub["listens"] = counts[heard]
    if len(cols) == 2:
        same = sub[name_col].map(len).to_numpy() == sub[id_col].map(len).to_numpy()
        if not same.all():
            raise ValueError(f"items: {name_col} and {id_col} lists differ in length")
    exploded = sub.explode(cols).dropna(subset=[name_col])
    key = cols[-1]  # the id when present, else the name
    grouped = exploded.groupby(key, sort=False).agg(
        listens=("listens", "sum"), name=(name_col, "first")
    )
    grouped = grouped.reset_index().sort_values(["listens", key], ascending=[False, True])
    head = grouped.head(n)
    return pd.Series(head["listens"].to_numpy(), index=head["name"].astype(str), name="listens")


def plot_top_names(
    events: pd.DataFrame, items: pd.DataFrame, by: str = "track", n: int = 15
) -> Figure:
    """Horizontal bars of the ``n`` most listened tracks, artists or genres, the top one on top."""
    top = top_names(events, items, by=by, n=n)
    fig, axes = _figure(size=(9, 0.32 * len(top) + 1.5))
    ax: Axes = axes[0][0]
    positions = np.arange(len(top))
    ax.barh(positions, top.to_numpy(), color="tab:orange")
    ax.set_yticks(positions, [_short(name) for name in top.index])
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("listens (events)")
    ax.set_title(f"Top {len(top)} {by}s by listens")
    return fig


def activity_by_month(events: pd.DataFrame) -> pd.DataFrame:
    """Events and distinct active users per calendar month (index: 'YYYY-MM')."""
    day = events[C.day].to_numpy()
    user = events[C.user].to_numpy()
    if not len(day):
        raise ValueError("no events to plot")
    days, per_day = _id_counts(day)
    months_of_days = days.astype("datetime64[D]").astype("datetime64[M]")
    months, month_of_day = np.unique(months_of_days, return_inverse=True)
    n_months = len(months)
    n_events = np.bincount(month_of_day, weights=per_day, minlength=n_months).astype(np.int64)

    # month of each event through a day -> month table; distinct (user, month) pairs by a
    # dense mark table when it is small (1.4 M users x 12 months), else by sorting keys
    day_lo = int(days[0])
    month_table = np.zeros(int(days[-1]) - day_lo + 1, dtype=np.int64)
    month_table[days - day_lo] = month_of_day
    user_lo, user_hi = int(user.min()), int(user.max())
    dense = (user_hi - user_lo + 1) * n_months <= 1 << 28
    seen = np.zeros((user_hi - user_lo + 1) * n_months if dense else 0, dtype=bool)
    keys = []
    for start in range(0, len(day), _CHUNK):
        m = month_table[day[start : start + _CHUNK] - day_lo]
        key = (user[start : start + _CHUNK].astype(np.int64) - user_lo) * n_months + m
        if dense:
            seen[key] = True
        else:
            keys.append(distinct(key))
    if dense:
        n_users = seen.reshape(-1, n_months).sum(axis=0)
    else:
        n_users = np.bincount(distinct(np.concatenate(keys)) % n_months, minlength=n_months)
    index = pd.Index([str(m) for m in months], name="month")
    return pd.DataFrame({"events": n_events, "active_users": n_users}, index=index)


def plot_activity_by_month(events: pd.DataFrame) -> Figure:
    """Two panels sharing the month axis: events per month and active users per month."""
    table = activity_by_month(events)
    fig, axes = _figure(2, 1, size=(9, 6), sharex=True)
    x = np.arange(len(table))
    for ax, column, color, title in (
        (axes[0][0], "events", "tab:blue", "Events per month"),
        (axes[1][0], "active_users", "tab:green", "Active users per month"),
    ):
        ax.bar(x, table[column].to_numpy(), color=color)
        ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1][0].set_xticks(x, list(table.index), rotation=45, ha="right")
    return fig


def unheard_share(events: pd.DataFrame, items: pd.DataFrame) -> float:
    """Share of catalogue tracks (rows of ``items``) that nobody listened to in ``events``."""
    catalogue = items[C.track].to_numpy()
    if not len(catalogue):
        raise ValueError("the catalogue is empty")
    heard_ids, _ = _id_counts(events[C.track].to_numpy())
    heard = np.isin(catalogue, heard_ids, assume_unique=False)
    return float(1.0 - heard.mean())
