"""Charts on tiny hand-made frames: the right number of bars/lines, labels and heights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from musicrec import io
from musicrec.plots import (
    _id_counts,
    activity_by_month,
    plot_activity_by_month,
    plot_events_per_user,
    plot_metrics,
    plot_ndcg_intervals,
    plot_popularity_long_tail,
    plot_top_names,
    top_names,
    unheard_share,
)


def day(text: str) -> int:
    return io.date_to_day(text)


# u1: 10 (Jan 5), 11 (Jan 6), 12 (Feb 1), 13 (Mar 1)      -> 4 events
# u2: 10 (Jan 7), 13 (Mar 3)                              -> 2 events
# u3: 10 (Feb 2), 11 (Jan 20)                             -> 2 events
# u4: 10 (Mar 9)                                          -> 1 event
# listeners: track 10 -> 4, 11 -> 2, 12 -> 1, 13 -> 2; tracks 14, 15 nobody
EVENTS = pd.DataFrame(
    {
        "user_id": np.array([1, 1, 1, 1, 2, 2, 3, 3, 4], dtype=np.int32),
        "track_id": np.array([10, 11, 12, 13, 10, 13, 10, 11, 10], dtype=np.int32),
        "day": np.array(
            [
                day("2022-01-05"), day("2022-01-06"), day("2022-02-01"), day("2022-03-01"),
                day("2022-01-07"), day("2022-03-03"),
                day("2022-02-02"), day("2022-01-20"),
                day("2022-03-09"),
            ],
            dtype=np.int16,
        ),
    }
)  # fmt: skip
ITEMS = pd.DataFrame(
    {
        "track_id": np.array([10, 11, 12, 13, 14, 15], dtype=np.int32),
        "name": ["Alpha", "Beta", "Gamma", "Delta", "Eps", "Zeta"],
        "artist_ids": [[1], [1, 2], [2], [3], [1], []],
        "artists": [["A"], ["A", "B"], ["B"], ["C"], ["A"], []],
        "genre_ids": [[7], [8], [7, 8], [], [9], [9]],
        "genres": [["pop"], ["rock"], ["pop", "rock"], [], ["jazz"], ["jazz"]],
    }
)


def bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_plot_metrics_groups_bars_by_k_and_source() -> None:
    metrics = pd.DataFrame(
        {
            "source": ["als", "als", "top_popular", "top_popular"],
            "k": [5, 10, 5, 10],
            "precision": [0.1, 0.2, 0.3, 0.4],
            "recall": [0.5, 0.6, 0.7, 0.8],
            "ndcg": [0.01, 0.02, 0.03, 0.04],
        }
    )
    fig = plot_metrics(metrics)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["ndcg", "precision", "recall"]
    for ax in axes:
        assert len(ax.patches) == 4  # 2 sources x 2 cut-offs
        assert [t.get_text() for t in ax.get_xticklabels()] == ["@5", "@10"]
    # bars come source by source: als @5, als @10, top_popular @5, top_popular @10
    assert bar_heights(axes[1]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    legend = axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["als", "top_popular"]
    with pytest.raises(ValueError, match="lacks column"):
        plot_metrics(metrics.drop(columns="ndcg"))


def test_plot_ndcg_intervals_draws_each_source_with_its_interval() -> None:
    metrics = pd.DataFrame(
        {
            "segment": ["all", "all", "all", "all", "light"],
            "source": ["popular", "als", "served", "als", "als"],
            "k": [10, 10, 10, 5, 10],
            "ndcg": [0.10, 0.30, 0.20, 0.9, 0.9],
            "ndcg_low": [0.08, 0.25, np.nan, 0.8, 0.8],
            "ndcg_high": [0.12, 0.35, np.nan, 1.0, 1.0],
        }
    )
    fig = plot_ndcg_intervals(metrics, k=10)
    ax = fig.axes[0]
    # only segment "all" at k=10, best on top (the last y tick is the top row)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["popular", "served", "als"]
    points = ax.collections[-1]  # the scatter of the values
    assert list(points.get_offsets()[:, 0]) == pytest.approx([0.10, 0.20, 0.30])
    colors = points.get_facecolors()
    assert tuple(colors[1][:3]) != tuple(colors[0][:3]) == tuple(colors[2][:3])  # served red
    bars = ax.collections[0].get_segments()  # the error bars: low .. high per source
    ends = [x for segment in bars for x in (segment[0][0], segment[1][0])]
    assert ends == pytest.approx([0.08, 0.12, 0.20, 0.20, 0.25, 0.35])  # no interval: length 0
    assert [t.get_text() for t in ax.texts] == ["0.100", "0.200", "0.300"]
    assert "NDCG@10" in ax.get_xlabel()
    # a table without segments (e.g. the validation selection) and the errors
    plain = metrics[metrics["segment"] == "all"].drop(columns="segment")
    assert len(plot_ndcg_intervals(plain, k=5).axes[0].get_yticklabels()) == 1
    with pytest.raises(ValueError, match="lacks column"):
        plot_ndcg_intervals(metrics.drop(columns="ndcg_low"))
    with pytest.raises(ValueError, match="no rows"):
        plot_ndcg_intervals(metrics, k=25)


def test_events_per_user_marks_mean_and_median() -> None:
    fig = plot_events_per_user(EVENTS)
    ax = fig.axes[0]
    # events per user 4, 2, 2, 1: mean 9/4 = 2.25, median 2
    mean_line, median_line = ax.lines
    assert mean_line.get_xdata()[0] == pytest.approx(2.25)
    assert median_line.get_xdata()[0] == pytest.approx(2.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean 2.2", "median 2.0"]
    assert sum(bar_heights(ax)) == 4  # every user falls in one bin
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_popularity_long_tail_is_sorted() -> None:
    fig = plot_popularity_long_tail(EVENTS)
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == [4, 2, 2, 1]
    # 4 tracks: the top 1 % is one track with 4 of 9 listens -> 44 %
    assert "44%" in fig.axes[0].get_title()


def test_popularity_long_tail_thins_points_on_log_ranks() -> None:
    # 1000 tracks with 1000, 999, ... 1 listeners; drawn with at most 20 points
    tracks = np.repeat(np.arange(1000), np.arange(1000, 0, -1)).astype(np.int32)
    events = pd.DataFrame({"user_id": np.zeros(len(tracks), np.int32), "track_id": tracks})
    (line,) = plot_popularity_long_tail(events, max_points=20).axes[0].lines
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert len(x) <= 20 and x[0] == 1 and x[-1] == 1000
    assert list(y) == list(1001 - x)  # the rank r track has 1001 - r listeners


def test_top_tracks_with_names_and_artist() -> None:
    # 10 -> 4, then 11 and 13 tie at 2 (by id: 11 first)
    top = top_names(EVENTS, ITEMS, by="track", n=3)
    assert list(top.index) == ["Alpha — A", "Beta — A", "Delta — C"]
    assert list(top) == [4, 2, 2]
    fig = plot_top_names(EVENTS, ITEMS, by="track", n=3)
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == [4, 2, 2]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(top.index)
    assert ax.yaxis_inverted()  # the most listened on top


def test_top_artists_and_genres_explode_lists() -> None:
    # artist A: tracks 10 (4) + 11 (2) = 6; B: 11 (2) + 12 (1) = 3; C: 13 (2) = 2
    artists = top_names(EVENTS, ITEMS, by="artist", n=15)
    assert artists.to_dict() == {"A": 6, "B": 3, "C": 2}
    # pop: 10 (4) + 12 (1) = 5; rock: 11 (2) + 12 (1) = 3; jazz only on unheard tracks;
    # track 13 has no genre
    genres = top_names(EVENTS, ITEMS, by="genre", n=1)
    assert genres.to_dict() == {"pop": 5}
    fig = plot_top_names(EVENTS, ITEMS, by="genre")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["pop", "rock"]
    with pytest.raises(ValueError, match="by must be one of"):
        top_names(EVENTS, ITEMS, by="album")


def test_top_artists_group_by_id_not_name() -> None:
    # two different artists named "A" (ids 1 and 5) stay apart
    items = ITEMS.copy()
    items["artist_ids"] = [[1], [5, 2], [2], [3], [1], []]
    top = top_names(EVENTS, items, by="artist")
    assert list(top.index) == ["A", "B", "C", "A"] and list(top) == [4, 3, 2, 2]


def test_activity_by_month() -> None:
    # Jan: u1 x2, u2, u3 -> 4 events, 3 users; Feb: u1, u3 -> 2 events, 2 users;
    # Mar: u1, u2, u4 -> 3 events, 3 users
    table = activity_by_month(EVENTS)
    assert list(table.index) == ["2022-01", "2022-02", "2022-03"]
    assert list(table["events"]) == [4, 2, 3]
    assert list(table["active_users"]) == [3, 2, 3]
    fig = plot_activity_by_month(EVENTS)
    events_ax, users_ax = fig.axes
    assert bar_heights(events_ax) == [4, 2, 3]
    assert bar_heights(users_ax) == [3, 2, 3]
    assert [t.get_text() for t in users_ax.get_xticklabels()] == list(table.index)


def test_unheard_share() -> None:
    # catalogue 10..15, heard 10, 11, 12, 13 -> 2 of 6 unheard
    assert unheard_share(EVENTS, ITEMS) == pytest.approx(2 / 6)
    assert unheard_share(EVENTS.iloc[:0], ITEMS) == pytest.approx(1.0)


def test_id_counts_dense_and_sparse_paths_agree() -> None:
    values = np.array([5, 3, 5, 40_000_000, 3, 5], dtype=np.int32)  # span > 2**24: sorted
    ids, counts = _id_counts(values)
    assert list(ids) == [3, 5, 40_000_000] and list(counts) == [2, 3, 1]
    ids, counts = _id_counts(values[values < 100])  # small span: bincount
    assert list(ids) == [3, 5] and list(counts) == [2, 3]


def test_write_figure_is_a_png(tmp_path) -> None:
    path = io.write_figure(plot_popularity_long_tail(EVENTS), tmp_path / "sub" / "tail.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["tail.png"]  # no temporary left
