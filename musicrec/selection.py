"""Choosing by validation: the label period inside the training data scores every trial.

``Truth`` holds, for a sample of users, what they listened to in the validation period among
the tracks the log knows and they had not heard (the only tracks a list can hit).
``search`` fits each source's configurations in turn (the plain default first) within a
trial count and a time budget and keeps the one with the best NDCG@k on those users.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from musicrec.arrays import distinct, in_sorted
from musicrec.columns import Columns as C
from musicrec.listens import Listens
from musicrec.settings import Settings
from musicrec.sources import (
    SOURCES,
    HeardFilter,
    Lists,
    Source,
    TrainData,
    join_lists,
    make_source,
)

log = logging.getLogger(__name__)


@dataclass
class Truth:
    """Validation listens of ``users`` (sorted history user codes): sorted keys
    ``local * n_tracks + track code`` and the count per user."""

    users: np.ndarray
    keys: np.ndarray
    counts: np.ndarray
    n_tracks: int

    @classmethod
    def build(cls, listens: Listens, later: pd.DataFrame) -> Truth:
        """Listens in ``later`` (events after the log's cut-off) of users in the log, on
        known tracks they had not heard before; users left without one are dropped."""
        u = listens.users.codes(later[C.user].to_numpy())
        t = listens.tracks.codes(later[C.track].to_numpy())
        ok = (u >= 0) & (t >= 0)
        n_tracks = listens.n_tracks
        keys = distinct(u[ok].astype(np.int64) * n_tracks + t[ok])
        users = distinct(keys // n_tracks)
        local = np.searchsorted(users, keys // n_tracks)
        unheard = HeardFilter(listens, users).unheard(local, keys % n_tracks)
        keys, local = keys[unheard], local[unheard]
        kept = distinct(local)
        local = np.searchsorted(kept, local)
        return cls(
            users[kept],
            local * n_tracks + keys % n_tracks,
            np.bincount(local, minlength=kept.size),
            n_tracks,
        )

    def subset(self, rows: np.ndarray) -> Truth:
        """The truth of ``self.users[rows]`` (``rows`` sorted, unique)."""
        rows = np.asarray(rows, dtype=np.int64)
        local = self.keys // self.n_tracks
        new = np.full(self.users.size, -1, dtype=np.int64)
        new[rows] = np.arange(rows.size)
        keep = new[local] >= 0
        keys = new[local[keep]] * self.n_tracks + self.keys[keep] % self.n_tracks
        return Truth(self.users[rows], keys, self.counts[rows], self.n_tracks)

    def on_tracks(self, kept: np.ndarray) -> Truth:
        """The listens on the track codes ``kept`` (sorted), re-coded to their positions
        there; each user's count of listens (the ideal DCG) stays as it was."""
        local, tracks = self.keys // self.n_tracks, self.keys % self.n_tracks
        recode = np.full(self.n_tracks, -1, dtype=np.int64)
        recode[kept] = np.arange(kept.size)
        new = recode[tracks]
        ok = new >= 0
        return Truth(self.users, local[ok] * kept.size + new[ok], self.counts, int(kept.size))

    def hits(self, lists: Lists) -> np.ndarray:
        """Whether each list entry is a validation listen."""
        return in_sorted(self.keys, lists.local().astype(np.int64) * self.n_tracks + lists.tracks)


def ndcg_per_user(lists: Lists, truth: Truth, k: int = 10) -> np.ndarray:
    """NDCG@k of each truth user's list (binary relevance, ideal = min(k, listens) hits)."""
    top = lists.head(k)
    gain = truth.hits(top) / np.log2(top.ranks() + 1.0)
    dcg = np.bincount(top.local(), weights=gain, minlength=truth.users.size)
    ideal = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]
    return dcg / ideal[np.minimum(truth.counts, k)]


def recommend_batched(source: Source, users: np.ndarray, n: int, batch: int = 4096) -> Lists:
    """``source.recommend`` over batches of users, joined into one ``Lists``."""
    return join_lists(
        [source.recommend(users[start : start + batch], n) for start in range(0, users.size, batch)]
    )


class NdcgPlateau:
    """A stop rule for an iterative fit (``AlsSource.stop_when``): NDCG@10 on validation
    users at the start and after each iteration; stop once an iteration gains less than
    ``gain`` of the score before it."""

    def __init__(self, truth: Truth, gain: float) -> None:
        self.truth, self.gain = truth, gain
        self.scores: list[float] = []

    def __call__(self, source: Source) -> bool:
        lists = recommend_batched(source, self.truth.users, 10)
        self.scores.append(float(ndcg_per_user(lists, self.truth).mean()))
        log.info(
            "%s, iteration %d: NDCG@10 %.4f on %d validation users",
            source,
            len(self.scores) - 1,
            self.scores[-1],
            self.truth.users.size,
        )
        return len(self.scores) >= 2 and self.scores[-1] < self.scores[-2] * (1 + self.gain)


class ListsSettled:
    """A stop rule that needs no labels (a fit with no validation period after its cut-off):
    the top-10 lists of ``users`` at the start and after each iteration; stop once at least
    ``overlap`` of their entries were in the lists before the iteration. Lists that stopped
    moving keep any metric of them where it is."""

    def __init__(self, users: np.ndarray, overlap: float) -> None:
        self.users, self.overlap = users, overlap
        self.previous: np.ndarray | None = None
        self.shares: list[float] = []

    @classmethod
    def watching(cls, n_users: int, settings: Settings) -> ListsSettled:
        """The rule on a seeded random sample of ``settings.search_users`` of ``n_users``
        user codes, with ``settings.als_stop_overlap``."""
        rng = np.random.default_rng(settings.seed)
        users = np.sort(rng.choice(n_users, min(settings.search_users, n_users), replace=False))
        return cls(users, settings.als_stop_overlap)

    def __call__(self, source: Source) -> bool:
        lists = recommend_batched(source, self.users, 10)
        keys = np.sort(lists.local().astype(np.int64) * source.data.listens.n_tracks + lists.tracks)
        previous, self.previous = self.previous, keys
        if previous is None:
            return False
        self.shares.append(float(in_sorted(previous, keys).mean()) if keys.size else 1.0)
        log.info(
            "%s, iteration %d: %.1f%% of %d users' top-10 entries unchanged",
            source,
            len(self.shares),
            100 * self.shares[-1],
            self.users.size,
        )
        return self.shares[-1] >= self.overlap


@dataclass
class Trial:
    source: str
    params: dict[str, Any]
    ndcg: float
    seconds: float


@dataclass
class Choice:
    """The configuration kept for one source and every trial that led to it."""

    source: str
    params: dict[str, Any]
    ndcg: float
    trials: list[Trial] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def search(
    data: TrainData,
    truth: Truth,
    settings: Settings,
    names: list[str] | None = None,
    on_trial: Callable[[Trial, Source], None] | None = None,
) -> dict[str, Choice]:
    """The best configuration of each source by NDCG@10 on ``truth``'s users.

    Each source walks its space (``Source.space``: the plain default, then steps from the best
    configuration so far) for up to ``settings.search_trials`` scored configurations; once
    ``settings.search_seconds`` have passed, every source still runs its first configuration
    and nothing more. ``on_trial`` sees each scored trial with its fitted source (to keep a
    state, say) before the source is dropped.
    """
    names = list(settings.sources if names is None else names)
    if settings.topk_method == "auto":
        # a trial scores a few thousand users: the exact scan costs them less than building an
        # IVF index would (at full scale ~1 s against ~10 s), and it scores the model, not
        # the index
        settings = settings.model_copy(update={"topk_method": "exact"})
    warm_iterations = settings.search_warm_iterations or settings.als_iterations
    started = time.perf_counter()
    choices: dict[str, Choice] = {}
    for name in names:
        trials: list[Trial] = []
        best: dict[str, Any] = {}
        best_state: dict[str, np.ndarray] | None = None
        for step in SOURCES[name].space(settings):
            params = {**best, **step}
            if any(trial.params == params for trial in trials):
                continue  # a step that leads back to a configuration already scored
            if len(trials) >= max(settings.search_trials, 1):
                break
            if trials and time.perf_counter() - started > settings.search_seconds:
                log.info(
                    "search: time budget of %.0f s spent, %s stops after %d trials",
                    settings.search_seconds,
                    name,
                    len(trials),
                )
                break
            t0 = time.perf_counter()
            source = make_source(name, settings, params)
            if best_state is not None and warm_iterations < settings.als_iterations:
                # a step changes one parameter of the best so far: its factors are close
                source.warm(best_state, warm_iterations)
            source = source.fit(data)
            lists = recommend_batched(source, truth.users, 10)
            score = float(ndcg_per_user(lists, truth).mean())
            trials.append(Trial(name, params, score, round(time.perf_counter() - t0, 2)))
            log.info("search %s %s: NDCG@10 %.4f (%.1f s)", name, params, score, trials[-1].seconds)
            if on_trial is not None:
                on_trial(trials[-1], source)
            if len(trials) == 1 or score > max(trial.ndcg for trial in trials[:-1]):
                best = params
                best_state = source.state()
            del source
        best_trial = max(trials, key=lambda trial: trial.ndcg)  # the first of equals
        choices[name] = Choice(name, best_trial.params, best_trial.ndcg, trials)
        log.info(
            "search %s: kept %s (NDCG@10 %.4f of %d trials)",
            name,
            best_trial.params,
            best_trial.ndcg,
            len(trials),
        )
    return choices
