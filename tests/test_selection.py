"""Choosing by validation: the truth users and their NDCG, and the greedy search over a
source's steps (applied to the best configuration so far, repeats skipped, bounded)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest

from musicrec import selection, sources
from musicrec.selection import Truth, ndcg_per_user, search
from musicrec.settings import Settings
from musicrec.sources import Lists, Source

N_TRACKS = 10
TRUTH = Truth(
    users=np.arange(3, dtype=np.int64),
    keys=np.arange(3, dtype=np.int64) * N_TRACKS,
    counts=np.ones(3, np.int64),
    n_tracks=N_TRACKS,
)  # each user's answer: track 0


class ScriptedSource(Source):
    """Puts track 0 at rank 5 - (a + b): the more a + b, the better."""

    name: ClassVar[str] = "scripted"
    fitted: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def space(cls, settings: Settings) -> list[dict[str, Any]]:
        return [{"a": 0, "b": 0}, {"a": 1}, {"b": 1}, {"a": 1}, {"a": 0}, {"b": 2}]

    def fit(self, data: Any) -> ScriptedSource:
        self.fitted.append(dict(self.params))
        return self

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        rank = 5 - (self.params["a"] + self.params["b"])
        row = [t for t in range(1, n + 1)]
        row.insert(rank - 1, 0)
        row = row[:n]
        tracks = np.tile(np.array(row, np.int32), users.size)
        scores = np.tile(-np.arange(n, dtype=np.float32), users.size)
        return Lists.from_flat(users.size, np.repeat(np.arange(users.size), n), tracks, scores)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedSource]:
    monkeypatch.setitem(sources.SOURCES, "scripted", ScriptedSource)
    monkeypatch.setitem(selection.SOURCES, "scripted", ScriptedSource)
    ScriptedSource.fitted = []
    return ScriptedSource


def test_ndcg_per_user_hand_computed() -> None:
    lists = Lists(
        np.array([0, 2, 4, 4]), np.array([5, 0, 0, 7], np.int32), np.array([2, 1, 2, 1], np.float32)
    )
    np.testing.assert_allclose(ndcg_per_user(lists, TRUTH, k=10), [1 / np.log2(3), 1.0, 0.0])


def test_search_steps_from_the_best_so_far_and_skips_repeats(
    scripted: type[ScriptedSource],
) -> None:
    settings = Settings(search_trials=4, search_seconds=600)
    choice = search(None, TRUTH, settings, ["scripted"])["scripted"]
    # {a0 b0} -> {a1 b0} better -> {a1 b1} better -> ({a1 b1} again: skipped) -> {a0 b1} worse
    assert scripted.fitted == [
        {"a": 0, "b": 0},
        {"a": 1, "b": 0},
        {"a": 1, "b": 1},
        {"a": 0, "b": 1},
    ]
    assert choice.params == {"a": 1, "b": 1}
    assert choice.ndcg == pytest.approx(1 / np.log2(4))
    assert [round(t.ndcg, 4) for t in choice.trials] == [
        round(1 / np.log2(6), 4),
        round(1 / np.log2(5), 4),
        round(1 / np.log2(4), 4),
        round(1 / np.log2(5), 4),
    ]


def test_search_time_budget_keeps_only_the_first_configuration(
    scripted: type[ScriptedSource],
) -> None:
    choice = search(None, TRUTH, Settings(search_trials=6, search_seconds=0), ["scripted"])[
        "scripted"
    ]
    assert len(choice.trials) == 1 and choice.params == {"a": 0, "b": 0}


class StatefulSource(ScriptedSource):
    """A scripted source with a state (its params), recording the state each fit started from."""

    name: ClassVar[str] = "scripted"
    starts: ClassVar[list[tuple[dict[str, Any] | None, int | None]]] = []

    def fit(self, data: Any) -> StatefulSource:
        warm = getattr(self, "_warm", None)
        start = None if warm is None else (warm["params"].item(), self._warm_iterations)
        self.starts.append(start or (None, None))
        return super().fit(data)

    def state(self) -> dict[str, np.ndarray]:
        return {"params": np.array(dict(self.params), dtype=object)}


@pytest.mark.parametrize(("warm", "als_iterations"), [(2, 6), (None, 6), (6, 6)])
def test_search_trials_start_from_the_best_trial_so_far(
    monkeypatch: pytest.MonkeyPatch, warm: int | None, als_iterations: int
) -> None:
    monkeypatch.setitem(sources.SOURCES, "scripted", StatefulSource)
    monkeypatch.setitem(selection.SOURCES, "scripted", StatefulSource)
    StatefulSource.fitted, StatefulSource.starts = [], []
    settings = Settings(
        search_trials=4,
        search_seconds=600,
        search_warm_iterations=warm,
        als_iterations=als_iterations,
    )
    search(None, TRUTH, settings, ["scripted"])
    if warm is None or warm >= als_iterations:
        # no iterations to save: every trial from scratch
        assert StatefulSource.starts == [(None, None)] * 4
        return
    # trials: {a0 b0} cold, {a1 b0} from it, {a1 b1} from {a1 b0} (the best so far), and
    # {a0 b1} from {a1 b1}
    assert StatefulSource.starts == [
        (None, None),
        ({"a": 0, "b": 0}, 2),
        ({"a": 1, "b": 0}, 2),
        ({"a": 1, "b": 1}, 2),
    ]


class StepSource(Source):
    """Its lists are ``steps[i]`` (the same tracks for every user) after the i-th call to
    ``step``: an iterative fit whose lists move as scripted."""

    name: ClassVar[str] = "step"

    def __init__(self, steps: list[list[int]]) -> None:
        super().__init__(Settings())
        self.steps, self.i = steps, -1
        self._data = SimpleNamespace(listens=SimpleNamespace(n_tracks=100))  # type: ignore[assignment]

    def recommend(self, users: np.ndarray, n: int) -> Lists:
        row = np.array(self.steps[self.i][:n], np.int32)
        return Lists.from_flat(
            users.size,
            np.repeat(np.arange(users.size), row.size),
            np.tile(row, users.size),
            np.tile(-np.arange(row.size, dtype=np.float32), users.size),
        )


def _judge_until_stop(source: StepSource, judge: Any) -> int:
    """Iterations an ``AlsSource.stop_when`` fit would run with ``judge``: the first step is
    the start (what the judge says of it is ignored), each later one an iteration."""
    source.i = 0
    judge(source)
    for i in range(1, len(source.steps)):
        source.i = i
        if judge(source):
            return i
    return len(source.steps) - 1


def test_ndcg_plateau_stops_once_an_iteration_gains_too_little() -> None:
    # track 0, every user's answer, at ranks 5, 3, 1, 1 (NDCG 0.39, 0.5, 1, 1)
    ranks = [5, 3, 1, 1, 1]
    steps = [list(range(1, r)) + [0] + list(range(r, 10)) for r in ranks]
    judge = selection.NdcgPlateau(TRUTH, gain=0.01)
    assert _judge_until_stop(StepSource(steps), judge) == 3
    np.testing.assert_allclose(judge.scores, [1 / np.log2(6), 0.5, 1.0, 1.0])
    # a worse iteration stops it too
    judge = selection.NdcgPlateau(TRUTH, gain=0.0)
    assert _judge_until_stop(StepSource([steps[2], steps[0], steps[2]]), judge) == 1


@pytest.mark.parametrize(("overlap", "iterations"), [(0.9, 2), (0.95, 3), (0.5, 1)])
def test_lists_settled_stops_once_the_lists_stop_moving(overlap: float, iterations: int) -> None:
    # each user's top 10: tracks 0-9 at the start, then 5-14 (half kept), 6-15 (9 of 10),
    # 6-15 (all)
    steps = [list(range(0, 10)), list(range(5, 15)), list(range(6, 16)), list(range(6, 16))]
    judge = selection.ListsSettled(np.arange(4, dtype=np.int64), overlap)
    assert _judge_until_stop(StepSource(steps), judge) == iterations
    np.testing.assert_allclose(judge.shares, [0.5, 0.9, 1.0][:iterations])
