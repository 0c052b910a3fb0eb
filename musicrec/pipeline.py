"""The pipeline runner: reads the prepared data, calls each stage, writes every artefact.

``run_all`` writes the artefacts of a run into a staging folder beside the artefacts and moves
them in only when every stage has succeeded (the manifest last), so a failed run leaves the
previous set untouched. A single stage (``run_stage``) writes its artefacts in place, each file
atomically. Intermediate data (split dates, model factors, candidate tables) lives in
``<parquet_dir>/work/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import SecretStr

from musicrec import io, runs, served
from musicrec.als import recs_frame
from musicrec.arrays import distinct
from musicrec.columns import Columns as C
from musicrec.errors import DataError
from musicrec.listens import Listens, build_listens
from musicrec.online import first_codes, fold_in_arrays
from musicrec.progress import Steps
from musicrec.selection import (
    Choice,
    ListsSettled,
    NdcgPlateau,
    Trial,
    Truth,
    ndcg_per_user,
    recommend_batched,
    search,
)
from musicrec.settings import Settings
from musicrec.sources import (
    SOURCES,
    AlsSource,
    Lists,
    PopularSource,
    Source,
    TrainData,
    make_source,
)
from musicrec.split import SplitDates, events_before, split_dates
from musicrec.stages import STAGE_HELP, STAGES  # noqa: F401  (one list, shared with the CLI)

if TYPE_CHECKING:
    from catboost import CatBoostRanker

log = logging.getLogger(__name__)

WORK_DIR = runs.WORK_DIR
SPLIT_JSON = "split.json"
SEARCH_JSON = "search.json"
SELECTION_JSON = "selection.json"
RANKER = "ranker"  # the name of the ranked union among the sources' names

# Files of one run, in the order they are published (the manifest is written after them).
ARTEFACTS = (
    io.TOP_POPULAR,
    io.PERSONAL_ALS,
    io.SIMILAR,
    io.RANKER_MODEL,
    io.RECOMMENDATIONS,
    io.METRICS,
    io.CANDIDATE_RECALL,
    io.METRICS_PNG,
)


@dataclass
class RunContext:
    """Where a run reads and writes: ``out`` is the staging folder or the artefacts folder."""

    settings: Settings
    out: Path
    keep_events: bool = False  # run_all reads events.parquet once for every stage
    _events: pd.DataFrame | None = None

    @property
    def parquet(self) -> Path:
        return Path(self.settings.parquet_dir)

    @property
    def work(self) -> Path:
        path = self.parquet / WORK_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def events(self) -> pd.DataFrame:
        if self._events is not None:
            return self._events
        path = self.parquet / io.EVENTS
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `python -m musicrec prepare` first")
        started = time.perf_counter()
        events = io.read_events(path)
        log.info("read %d events in %.1f s", len(events), time.perf_counter() - started)
        if self.keep_events:
            self._events = events
        return events

    def release_events(self) -> None:
        """Drop the kept event log once a stage has taken what it needs from it."""
        self._events = None

    def items(self) -> pa.Table:
        return pq.read_table(self.parquet / io.ITEMS, columns=[C.track, C.genre_ids, C.artist_ids])

    def dates(self) -> SplitDates:
        return SplitDates.from_dict(self._work_json(SPLIT_JSON, "split"))

    def choices(self) -> dict[str, Choice]:
        return {
            name: Choice(name, c["params"], c["ndcg"])
            for name, c in self._work_json(SEARCH_JSON, "search").items()
        }

    def selection(self) -> dict:
        return self._work_json(SELECTION_JSON, "rank")

    def ranker(self) -> CatBoostRanker | None:
        """The ranker this run trained (None when it trained none)."""
        from catboost import CatBoostRanker

        path = self.out / io.RANKER_MODEL
        if not path.exists():
            return None
        model = CatBoostRanker()
        model.load_model(str(path))
        return model

    def save_state(
        self, stage: str, source: str, params: dict, state: dict[str, np.ndarray] | None
    ) -> None:
        """A fitted source's state for the refits of later stages (``work/<stage>-<source>``)."""
        path = self.work / f"{stage}-{source}.npz"
        if state is None:
            path.unlink(missing_ok=True)
            return
        with io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            arrays: dict[str, Any] = {"params": np.array(json.dumps(params, sort_keys=True))}
            arrays.update(state)
            np.savez(fh, **arrays)

    def load_state(self, stage: str, source: str, params: dict) -> dict[str, np.ndarray] | None:
        """The state a stage saved for this source, if it was fitted with the same params."""
        path = self.work / f"{stage}-{source}.npz"
        if not path.exists():
            return None
        with np.load(path) as saved:
            if str(saved["params"]) != json.dumps(params, sort_keys=True):
                log.info(
                    "%s: state of the %s stage has other parameters, fitted cold", source, stage
                )
                return None
            return {key: saved[key] for key in saved.files if key != "params"}

    def _work_json(self, name: str, stage: str) -> dict:
        path = self.work / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the {stage} stage first")
        return io.read_json(path)

    def train_data(self, cutoff: int | None) -> TrainData:
        """The listening log before ``cutoff`` (None = every event) and the catalogue."""
        events = self.events()
        if cutoff is None:
            cutoff = int(events[C.day].max()) + 1
        else:
            events = events_before(events, cutoff)
        return TrainData.build(build_listens(events, cutoff), self.items())

    def later(self, start: int, stop: int | None = None) -> pd.DataFrame:
        """Events on or after ``start`` (and before ``stop``)."""
        events = self.events()
        days = events[C.day].to_numpy()
        mask = days >= start if stop is None else (days >= start) & (days < stop)
        return events[mask].reset_index(drop=True)


def _fit_sources(
    run: RunContext,
    data: TrainData,
    start_from: str | None = None,
    save_as: str | None = None,
    judge: Truth | None = None,
) -> dict[str, Source]:
    """The chosen sources fitted on ``data``; those with a state (ALS factors) start from the
    state saved under ``start_from`` by an earlier stage, and save theirs as ``save_as``.
    With ``judge`` (validation listens after ``data``'s cut-off), a warm ALS fit stops once
    its NDCG@10 on those users stops improving (``NdcgPlateau``); without, a refit from an
    earlier cut-off's factors stops once its lists settle (``ListsSettled``)."""
    s = run.settings
    sources = {}
    for name, choice in run.choices().items():
        started = time.perf_counter()
        source = make_source(name, s, choice.params)
        state = run.load_state(start_from, name, choice.params) if start_from else None
        # a search trial learnt from a user sample: further from the full fit than a refit
        iterations = s.als_sample_start_iterations if start_from == "search" else None
        if isinstance(source, AlsSource):
            source.stop_when(
                NdcgPlateau(judge, s.als_stop_gain)
                if judge is not None
                else ListsSettled.watching(data.listens.n_users, s)
            )
        sources[name] = fitted = source.warm(state, iterations).fit(data)
        how = ""
        if state:
            ran = (
                f", {fitted.iterations_run} iteration{'s' * (fitted.iterations_run != 1)}"
                if isinstance(fitted, AlsSource)
                else ""
            )
            how = f" (warm start{ran})"
        log.info("fitted %s%s in %.1f s", fitted, how, time.perf_counter() - started)
        if save_as:
            run.save_state(save_as, name, choice.params, sources[name].state())
    return sources


def validation_split(truth: Truth, settings: Settings) -> tuple[np.ndarray, ...]:
    """Rows of ``truth``'s users for (ranker training, early stopping, choosing the served
    model): a seeded sample of ``settings.validation_users``, split 60 / 20 / 20."""
    rng = np.random.default_rng(settings.seed)
    rows = rng.permutation(truth.users.size)[: settings.validation_users]
    n_fit = int(rows.size * 0.6)
    n_stop = int(rows.size * 0.2)  # the rest, about 20 % and never empty, chooses
    return (
        np.sort(rows[:n_fit]),
        np.sort(rows[n_fit : n_fit + n_stop]),
        np.sort(rows[n_fit + n_stop :]),
    )


def _validation(run: RunContext) -> tuple[TrainData, Truth, tuple[np.ndarray, ...]]:
    dates = run.dates()
    data = run.train_data(dates.label_start)
    truth = Truth.build(data.listens, run.later(dates.label_start, dates.test_start))
    if truth.users.size < 3:
        raise DataError(
            f"only {truth.users.size} users listen to new tracks in the validation "
            "period: too few to choose models; widen it (MUSICREC_LABEL_START)"
        )
    return data, truth, validation_split(truth, run.settings)


def _write_lists(
    lists: Lists, listens: Listens, users: np.ndarray, path: Path, batch_users: int = 100_000
) -> None:
    """``_frame`` of ``lists`` written to ``path`` a batch of users at a time: the lists of
    every user as one frame cost several GB at full scale."""
    batches = (
        _frame(
            lists.rows(start, min(start + batch_users, lists.n_users)),
            listens,
            users[start : start + batch_users],
        )
        for start in range(0, lists.n_users, batch_users)
    )
    io.write_batches(batches, path, io.RECS_SCHEMA)


def _frame(lists: Lists, listens: Listens, users: np.ndarray) -> pd.DataFrame:
    """A recs table (input ids) of ``lists`` for the user codes ``users``."""
    return recs_frame(
        listens.users.ids[users[lists.local()]], listens.tracks.ids[lists.tracks], lists.scores
    )


# --- stages ---------------------------------------------------------------------------------


def stage_split(run: RunContext) -> None:
    dates = split_dates(run.events(), run.settings)
    io.write_json(dates.as_dict(), run.work / SPLIT_JSON)


def stage_search(run: RunContext) -> None:
    """Each source's configuration by NDCG@10 on validation users (models fitted on P1)."""
    data, truth, (fit_rows, _, _) = _validation(run)
    s = run.settings
    rng = np.random.default_rng(s.seed)
    truth = truth.subset(np.sort(rng.permutation(fit_rows)[: s.search_users]))
    if s.search_train_users is not None and data.listens.n_users > s.search_train_users:
        # trials learn from a sample of users (the scored ones among them): at full scale a
        # trial then costs a fraction of a fit on everyone
        n_users = data.listens.n_users
        others = np.setdiff1d(np.arange(n_users), truth.users)
        extra = max(s.search_train_users - truth.users.size, 0)
        sample = np.union1d(truth.users, rng.choice(others, min(extra, others.size), replace=False))
        listens, kept = data.listens.subset(sample).compact()
        data = TrainData.build(listens, run.items()).keep_knn_window_of(data, s.knn_max_pairs)
        truth = Truth(
            np.searchsorted(sample, truth.users), truth.keys, truth.counts, truth.n_tracks
        ).on_tracks(kept)
        log.info(
            "search: trials learn from %d of %d users and the %d tracks they heard",
            sample.size,
            n_users,
            kept.size,
        )
    # each source's first (plain) and best trials keep their states: the first full fits
    # start from them (``als_sample_start_iterations``) instead of from scratch
    plain: dict[str, Trial] = {}
    best: dict[str, Trial] = {}
    states: dict[int, dict[str, np.ndarray]] = {}

    def keep_state(trial: Trial, source: Source) -> None:
        state = source.state()
        if state is None:
            return
        if trial.source not in plain:
            plain[trial.source] = trial
        if trial.source not in best or trial.ndcg > best[trial.source].ndcg:
            best[trial.source] = trial
        states[id(trial)] = state
        kept = {id(t) for t in (*plain.values(), *best.values())}
        for key in [key for key in states if key not in kept]:
            del states[key]

    choices = search(data, truth, s, on_trial=keep_state)
    io.write_json(
        {name: choice.as_dict() for name, choice in choices.items()}, run.work / SEARCH_JSON
    )
    for name, trial in best.items():
        run.save_state("search", name, trial.params, states[id(trial)])
        first = plain[name]
        run.save_state("search", f"{name}_plain", first.params, states[id(first)])


def stage_rank(run: RunContext) -> None:
    """Train the ranker on P1 candidates labelled by P2, then compare it with every source on
    held-out users and record the winner: the ranker is served only where it wins."""
    from musicrec.metrics import bootstrap_interval
    from musicrec.ranker import rank, train_ranker, training_set

    s = run.settings
    data, truth, (fit_rows, stop_rows, valid_rows) = _validation(run)
    # the ALS fit stops on the ranker's early-stopping users: they judge fits, the
    # choosing users only the final comparison
    stop = truth.subset(stop_rows)
    sources = _fit_sources(run, data, start_from="search", save_as="rank", judge=stop)
    model = train_ranker(
        training_set(data, sources, truth.subset(fit_rows), s),
        training_set(data, sources, stop, s),
        s,
    )
    valid = truth.subset(valid_rows)
    per_user = {
        name: ndcg_per_user(recommend_batched(src, valid.users, 10), valid)
        for name, src in sources.items()
    }
    (run.out / io.RANKER_MODEL).unlink(missing_ok=True)
    if model is not None:
        per_user[RANKER] = ndcg_per_user(
            rank(model, data, sources, valid.users, 10, s.n_candidates), valid
        )
        with io.atomic_path(run.out / io.RANKER_MODEL) as tmp:
            model.save_model(str(tmp))
    scores = {}
    for name, values in per_user.items():
        low, high = bootstrap_interval(values, max(s.bootstrap, 1), s.seed)
        scores[name] = {"ndcg": float(values.mean()), "low": low, "high": high}
    winner = max(scores, key=lambda name: scores[name]["ndcg"])
    best_source = max((n for n in scores if n != RANKER), key=lambda n: scores[n]["ndcg"])
    reason = (
        f"{winner} has the best NDCG@10 on {valid.users.size} held-out validation users "
        f"({scores[winner]['ndcg']:.4f}; best single source {best_source} "
        f"{scores[best_source]['ndcg']:.4f}, popular {scores['popular']['ndcg']:.4f})"
        if "popular" in scores
        else f"{winner} has the best NDCG@10"
    )
    if model is None:
        reason += "; no ranker: too few positives to train one"
    log.info("served model: %s", reason)
    io.write_json(
        {"winner": winner, "reason": reason, "users": int(valid.users.size), "ndcg@10": scores},
        run.work / SELECTION_JSON,
    )


def report_users(run: RunContext, h: Listens) -> tuple[np.ndarray, pd.DataFrame]:
    """The test period's users the report scores (codes of ``h``, the log before the test
    period; a seeded sample of ``report_users``), and their test events."""
    s = run.settings
    test = run.later(run.dates().test_start)
    codes = h.users.codes(distinct(test[C.user].to_numpy()))
    users = np.sort(codes[codes >= 0]).astype(np.int64)
    if s.report_users is not None and users.size > s.report_users:
        rng = np.random.default_rng(s.seed)
        users = np.sort(rng.choice(users, s.report_users, replace=False))
        test = test[np.isin(test[C.user].to_numpy(), h.users.ids[users])]
    return users, test


def train_pairs(h: Listens) -> pd.DataFrame:
    """Every (user, track) event of ``h`` in input ids: what ``metrics.evaluate`` checks
    heard tracks against."""
    return pd.DataFrame(
        {
            C.user: h.users.ids[np.repeat(np.arange(h.n_users), h.counts())],
            C.track: h.tracks.ids[h.track_codes],
        }
    )


def stage_evaluate(run: RunContext) -> None:
    """Refit the chosen sources before the test period and score every list on it, with
    bootstrap intervals, by user activity, and the candidates' recall."""
    from musicrec.metrics import activity_segments, artist_variety, candidate_recall, evaluate
    from musicrec.plots import plot_metrics
    from musicrec.ranker import rank_with_lists

    s, dates = run.settings, run.dates()
    data = run.train_data(dates.test_start)
    h = data.listens
    users, test = report_users(run, h)
    log.info("test period: %d users with history are evaluated", users.size)
    run.release_events()  # ~3 GB at full scale; the serve stage reads them again (~15 s)
    steps = Steps("evaluate", 4, s.progress)
    steps.step("refit the sources before the test period")
    choices = run.choices()
    n = max(s.eval_k)
    recs: dict[str, pd.DataFrame] = {}
    plain = AlsSource.space(s)[0]
    if "als" in choices and choices["als"].params != plain:
        # first, and dropped before the chosen sources are fitted: one ALS matrix at a time
        started = time.perf_counter()
        state = run.load_state("search", "als_plain", plain)
        # exact top-k: weakly regularised factors spread their norms so far that an IVF index
        # serves almost no list whole, and the norm-pruned exact scan is cheap on them
        exact = s.model_copy(update={"topk_method": "exact"})
        # no validation period follows this cut-off: the fit stops once its lists settle,
        # watched on a random sample of users (not the test users: their lists only score)
        baseline = AlsSource(exact, **plain).stop_when(ListsSettled.watching(h.n_users, s))
        baseline.warm(state, s.als_sample_start_iterations).fit(data)
        log.info(
            "fitted the plain ALS baseline %s %s in %.1f s",
            baseline,
            f"from the search's sample fit, {baseline.iterations_run} iterations"
            if state
            else "from scratch",
            time.perf_counter() - started,
        )
        recs["als_plain"] = _frame(recommend_batched(baseline, users, n), h, users)
        del baseline
    sources = _fit_sources(run, data, start_from="rank", save_as="evaluate")
    model = run.ranker()
    steps.step(
        f"lists of {len(sources)} sources{' and the ranker' if model else ''} for "
        f"{users.size:,} users"
    )
    # the sources' lists are the ranker's candidates too: one pass makes both
    keep = {name: max(n, s.n_candidates) for name in sources}
    if model is not None:
        ranked, lists = rank_with_lists(
            model, data, sources, users, n, s.n_candidates, keep, threads=s.threads
        )
        recs[RANKER] = _frame(ranked, h, users)
    else:
        lists = {name: recommend_batched(src, users, keep[name]) for name, src in sources.items()}
    recs.update({name: _frame(lst, h, users) for name, lst in lists.items()})
    del lists
    selection = run.selection()
    recs["served"] = recs[selection["winner"]]
    train = train_pairs(h)
    candidates = {name: recs[name] for name in sources}
    steps.step("candidate recall")
    recall = candidate_recall(candidates, test, train, users=h.users.ids[users])
    io.write_table(recall, run.out / io.CANDIDATE_RECALL)
    heads = {name: table[table[C.rank].to_numpy() <= n] for name, table in recs.items()}
    n_items = pq.ParquetFile(run.parquet / io.ITEMS).metadata.num_rows
    steps.step(f"metrics with {s.bootstrap} bootstrap resamples")
    metrics = evaluate(
        heads,
        test,
        train,
        n_items,
        ks=tuple(s.eval_k),
        bootstrap=s.bootstrap,
        seed=s.seed,
        segments=activity_segments(train, h.users.ids[users]),
    )
    # intra-list artist variety of every list, on the rows of all users
    items = run.items()
    variety = artist_variety(
        heads,
        items.column(C.track).to_numpy(),
        first_codes(items.column(C.artist_ids)),
        ks=tuple(s.eval_k),
    )
    metrics = metrics.merge(
        variety.drop(columns="users").assign(segment="all"),
        on=["source", "k", "segment"],
        how="left",
    )
    io.write_table(metrics, run.out / io.METRICS)
    steps.close()
    io.write_figure(plot_metrics(metrics[metrics["segment"] == "all"]), run.out / io.METRICS_PNG)
    k = 10 if 10 in s.eval_k else max(s.eval_k)
    table = metrics[(metrics["k"] == k) & (metrics["segment"] == "all")].set_index("source")
    shown = [
        c
        for c in ("ndcg", "ndcg_low", "ndcg_high", "precision", "recall", "coverage")
        if c in table
    ]
    log.info(
        "metrics@%d on the test period (served = %s):\n%s",
        k,
        selection["winner"],
        table[shown].to_string(),
    )
    log.info("candidate recall on the test period:\n%s", recall.to_string())


def _popular_table(source: PopularSource) -> pd.DataFrame:
    """The top_popular artefact from a fitted popular source: every heard track, best first."""
    h = source.data.listens
    order = source.order
    return pd.DataFrame(
        {
            C.track: h.tracks.ids[order].astype(np.int32),
            C.listeners: source.data.listeners(None)[order].astype(np.int64),
            C.score: source.scores[order].astype(np.float32),
            C.rank: np.arange(1, order.size + 1, dtype=np.int32),
        }
    )


def stage_serve(run: RunContext) -> None:
    """Refit the chosen sources on the whole log and write what the service serves."""
    from musicrec.ranker import rank_with_lists

    s = run.settings
    data = run.train_data(None)
    run.release_events()
    h = data.listens
    sources = _fit_sources(run, data, start_from="evaluate")
    users = np.arange(h.n_users, dtype=np.int64)

    def chosen_or_plain(name: str) -> Source:
        """The fitted source, or its plain default when the run does not use it (kept out of
        ``sources``: the ranker knows only the sources it was trained on)."""
        return sources.get(name) or make_source(name, s, SOURCES[name].space(s)[0]).fit(data)

    popular = chosen_or_plain("popular")
    assert isinstance(popular, PopularSource)
    io.write_table(_popular_table(popular), run.out / io.TOP_POPULAR, io.POPULAR_SCHEMA)
    als = chosen_or_plain("als")
    assert isinstance(als, AlsSource)
    winner = run.selection()["winner"]
    n = s.n_recommendations
    if winner == RANKER:
        # personal_als is the head of the ranker's ALS candidates: one top-k pass, not two
        lists, kept = rank_with_lists(
            run.ranker(),
            data,
            sources,
            users,
            n,
            s.n_candidates,
            {"als": n} if "als" in sources else {},
            progress=s.progress,
            threads=s.threads,
        )
        personal = kept.get("als")
    else:
        lists = recommend_batched(sources[winner], users, n)
        personal = lists if winner == "als" else None
    if personal is None:
        personal = recommend_batched(als, users, n)
    _write_lists(personal, h, users, run.out / io.PERSONAL_ALS)
    del personal
    _write_lists(lists, h, users, run.out / io.RECOMMENDATIONS)
    del lists
    log.info("served lists (%s) for %d users", winner, h.n_users)
    # the ALS model for the service's fold-in of online events (musicrec.online)
    served.write_factors(
        fold_in_arrays(
            als.model, data.listeners(None), als.params["regularization"], als.params["alpha"]
        ),
        run.out,
    )
    item_to_item = sources.get("item_knn") or als
    query, similar, score = item_to_item.similar_pairs(s.n_similar)
    # each track's neighbours scaled to its best one: the service sums the lists of several
    # recent tracks, and BM25 similarities of a popular track would outweigh every other
    best = np.zeros(item_to_item.data.listens.n_tracks, dtype=np.float32)
    np.maximum.at(best, query, score)
    score = score / np.maximum(best[query], 1e-12)
    io.write_table(
        recs_frame(h.tracks.ids[query], h.tracks.ids[similar], score).rename(
            columns={C.user: C.track, C.track: C.similar}
        ),
        run.out / io.SIMILAR,
        io.SIMILAR_SCHEMA,
    )


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "split": stage_split,
    "search": stage_search,
    "rank": stage_rank,
    "evaluate": stage_evaluate,
    "serve": stage_serve,
}


# --- runner -----------------------------------------------------------------------------------


def _timed(stage: str, run: RunContext) -> float:
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    started = time.perf_counter()
    log.info("stage %s: started", stage)
    STAGE_FUNCTIONS[stage](run)
    elapsed = time.perf_counter() - started
    log.info("stage %s: done in %.1f s", stage, elapsed)
    return elapsed


def _file_stats(folder: Path) -> dict[str, dict[str, int | None]]:
    stats: dict[str, dict[str, int | None]] = {}
    for name in ARTEFACTS:
        path = folder / name
        if not path.exists():
            continue
        rows = pq.ParquetFile(path).metadata.num_rows if name.endswith(".parquet") else None
        stats[name] = {"rows": rows, "bytes": path.stat().st_size}
    return stats


def _read_json_if(path: Path) -> dict | None:
    return io.read_json(path) if path.exists() else None


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_is_secret(a) for a in get_args(annotation))


def public_parameters(settings: Settings) -> dict[str, Any]:
    """The settings as JSON without secret fields (the manifest is world-readable and
    pushed to S3): a SecretStr field is left out entirely, not even masked."""
    secret = {
        name for name, info in type(settings).model_fields.items() if _is_secret(info.annotation)
    }
    return settings.model_dump(mode="json", exclude=secret)


def _write_served(parquet: Path, staging: Path) -> dict[str, dict]:
    """The served (memory-mapped) form of this run's service tables, written into the
    staging folder so it is published with them; items.parquet is the prepared one."""
    started = time.perf_counter()
    sources = {name: staging / name for name in served.SOURCE_FILES}
    sources[io.ITEMS] = parquet / io.ITEMS
    entries = served.write_served(sources, staging)
    log.info("served form written in %.1f s", time.perf_counter() - started)
    return entries


def build_manifest(
    settings: Settings,
    run_id: str,
    timings: dict[str, float],
    served_entries: dict[str, dict] | None = None,
) -> dict:
    """The manifest of the artefacts now in the parquet folder; ``served_entries`` (from
    ``served.write_served``) records the served files with their checksums."""
    parquet = Path(settings.parquet_dir)
    data = Path(settings.data_dir)
    split_path = parquet / WORK_DIR / SPLIT_JSON
    metrics_path = parquet / io.METRICS
    manifest = {
        "run_id": run_id,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_dir": str(data.resolve()),
        "input_files": {
            name: (data / name).stat().st_size for name in io.INPUT_FILES if (data / name).exists()
        },
        "prepared_files": {
            name: (parquet / name).stat().st_size
            for name in (io.ITEMS, io.EVENTS)
            if (parquet / name).exists()
        },
        "parameters": public_parameters(settings),
        "split": io.read_json(split_path) if split_path.exists() else None,
        "search": _read_json_if(parquet / WORK_DIR / SEARCH_JSON),
        "selection": _read_json_if(parquet / WORK_DIR / SELECTION_JSON),
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "metrics": (
            pd.read_parquet(metrics_path).to_dict(orient="records")
            if metrics_path.exists()
            else None
        ),
        "artefacts": _file_stats(parquet),
    }
    if served_entries is not None:
        served.add_to_manifest(manifest, served_entries)
    return manifest


def run_stage(stage: str, settings: Settings) -> None:
    """Run one stage, writing its artefacts in place (each file atomically), then refresh the
    manifest; after ``serve``, the served (memory-mapped) form of the new lists too."""
    run = RunContext(settings, Path(settings.parquet_dir))
    elapsed = _timed(stage, run)
    io.write_json(
        build_manifest(settings, f"stage-{stage}-{uuid.uuid4().hex[:8]}", {stage: elapsed}),
        run.parquet / io.MANIFEST,
    )
    if stage == "serve":
        served.publish(run.parquet)


def new_staging(parquet: Path, run_id: str) -> Path:
    """An empty staging folder ``.staging-<run_id>`` for a run's files, beside the artefacts
    (same file system: moving a file in is a rename); folders left by killed runs are removed."""
    for stale in parquet.glob(".staging-*"):  # left by a run that was killed
        log.warning("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    staging = parquet / f".staging-{run_id}"
    staging.mkdir(parents=True)
    return staging


def publish_staged(
    settings: Settings,
    staging: Path,
    run_id: str,
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> dict:
    """Publish the run staged in ``staging`` once all its stages succeeded (``run_all`` and
    the Spark engine): the served form written beside its tables, every artefact moved in
    (one this run did not make is removed: no stale copy stays), the work files it staged in
    ``staging/work`` moved into ``work/``, then the manifest (with ``extra``) written last and
    the run archived (``runs/<run_id>/``, ``runs/current``). The caller removes ``staging``."""
    parquet = Path(settings.parquet_dir)
    served_entries = _write_served(parquet, staging)
    for name in (*ARTEFACTS, *served.SERVED_FILES, *served.ALS_NAMES):
        if (staging / name).exists():
            os.replace(staging / name, parquet / name)
        else:  # not made by this run (e.g. no ranker was trained): no stale copy stays
            (parquet / name).unlink(missing_ok=True)
    staged_work = staging / WORK_DIR
    if staged_work.is_dir():
        (parquet / WORK_DIR).mkdir(exist_ok=True)
        for path in sorted(p for p in staged_work.iterdir() if p.is_file()):
            os.replace(path, parquet / WORK_DIR / path.name)
    manifest = build_manifest(settings, run_id, timings, served_entries)
    manifest.update(extra or {})
    manifest["code"] = runs.code_version()  # versioned runs (musicrec.runs)
    manifest["input"] = runs.input_fingerprint(parquet)
    io.write_json(manifest, parquet / io.MANIFEST)
    runs.archive(parquet, manifest)  # runs/<run_id>/ (hard links) and runs/current
    return manifest


def run_all(settings: Settings) -> dict:
    """Every stage from prepared data to metrics; the new artefact set replaces the old one
    only when all stages succeeded. Returns the manifest."""
    parquet = Path(settings.parquet_dir)
    if not (parquet / io.EVENTS).exists():
        raise DataError(f"{parquet / io.EVENTS} not found: run `python -m musicrec prepare`")
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    staging = new_staging(parquet, run_id)
    run = RunContext(settings, staging, keep_events=True)
    timings: dict[str, float] = {}
    try:
        with Steps("run", len(STAGES), settings.progress) as steps:  # the stage counter
            for stage in STAGES:
                steps.step(f"stage {stage}")
                timings[stage] = _timed(stage, run)
        del run  # frees the event log before the served form is decoded
        manifest = publish_staged(settings, staging, run_id, timings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "run %s: %s",
        run_id,
        ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items()),
    )
    return manifest
