"""How many iterations a warm ALS fit needs, and which learning rate the ranker wants, on the
artefacts of a finished run (its `work/` states).

    OPENBLAS_NUM_THREADS=1 python bench/warm_fits.py iterations --parquet-dir /work/full/parquet \\
        --steps 3,2,3,4
    OPENBLAS_NUM_THREADS=1 python bench/warm_fits.py ranker --parquet-dir /work/full/parquet \\
        --rate 0.03 --rate 0.1 --rate 0.2

`iterations`: the chosen ALS and the plain baseline, each started from the search's sample fit
on every event before the test period (as the rank stage and the report's baseline start),
run a few iterations at a time; after each step, NDCG@10 with a 95 % interval on the report's
test users (exact top-k). The curve shows where more iterations stop paying.

`ranker`: the rank stage's candidates and labels (sources fitted before the validation period,
the ALS from the rank stage's factors), then one CatBoost ranker per learning rate, each
early-stopped on the early-stopping users as the pipeline does; NDCG@10 of its ranking
(``ranker.rank``) on the choosing users, and its paired difference to the first rate with a
95 % interval.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from musicrec.metrics import bootstrap_interval, evaluate  # noqa: E402
from musicrec.pipeline import (  # noqa: E402
    RunContext,
    _fit_sources,
    _frame,
    _validation,
    report_users,
    train_pairs,
)
from musicrec.ranker import rank, train_ranker, training_set  # noqa: E402
from musicrec.selection import ndcg_per_user, recommend_batched  # noqa: E402
from musicrec.settings import Settings  # noqa: E402
from musicrec.sources import AlsSource  # noqa: E402

log = logging.getLogger("bench")


def iterations(run: RunContext, steps: list[int]) -> None:
    s = run.settings
    data = run.train_data(run.dates().test_start)
    h = data.listens
    users, test = report_users(run, h)
    train = train_pairs(h)
    run.release_events()
    exact = s.model_copy(update={"topk_method": "exact"})
    plain = AlsSource.space(s)[0]
    for kind, params, state_name in (
        ("chosen", run.choices()["als"].params, "als"),
        ("plain", plain, "als_plain"),
    ):
        state = run.load_state("search", state_name, params)
        if state is None:
            print(f"{kind}: no search state in {run.work}", flush=True)
            continue
        done = 0
        for step in steps:
            started = time.perf_counter()
            # each step continues from the factors the last one left
            source = AlsSource(exact, **params).warm(state, step).fit(data)
            state = source.state()
            done += step
            lists = _frame(recommend_batched(source, users, 10), h, users)
            m = evaluate({kind: lists}, test, train, h.n_tracks, ks=(10,), bootstrap=200, seed=0)
            row = m.iloc[0]
            print(
                f"{kind} {params}: {done} iterations ({time.perf_counter() - started:.0f} s): "
                f"NDCG@10 {row['ndcg']:.4f} [{row['ndcg_low']:.4f}, {row['ndcg_high']:.4f}] "
                f"on {users.size:,} test users",
                flush=True,
            )


def ranker(run: RunContext, rates: list[float]) -> None:
    # the rank stage's ALS factors need no more than one iteration to be installed again
    run.settings = s = run.settings.model_copy(update={"als_refit_iterations": 1})
    data, truth, (fit_rows, stop_rows, valid_rows) = _validation(run)
    run.release_events()
    sources = _fit_sources(run, data, start_from="rank")
    fit, stop = (
        training_set(data, sources, truth.subset(rows), s) for rows in (fit_rows, stop_rows)
    )
    valid = truth.subset(valid_rows)
    first = None
    for rate in rates:
        started = time.perf_counter()
        model = train_ranker(fit, stop, s.model_copy(update={"ranker_learning_rate": rate}))
        seconds = time.perf_counter() - started
        if model is None:
            print(f"learning rate {rate}: too few positives for a ranker", flush=True)
            continue
        lists = rank(model, data, sources, valid.users, 10, s.n_candidates, threads=s.threads)
        values = ndcg_per_user(lists, valid)
        first = values if first is None else first
        low, high = bootstrap_interval(values - first, 1000, 0)
        print(
            f"learning rate {rate}: {seconds:.0f} s, best tree {model.get_best_iteration()} of "
            f"{s.ranker_iterations}, NDCG@10 {values.mean():.4f} on {valid.users.size:,} "
            f"choosing users, against the first rate {np.mean(values - first):+.4f} "
            f"[{low:+.4f}, {high:+.4f}]",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("iterations", "ranker"))
    parser.add_argument("--parquet-dir", type=Path, required=True)
    parser.add_argument("--steps", default="3,2,3", help="iterations per step (iterations)")
    parser.add_argument("--rate", type=float, action="append", help="learning rates (ranker)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings(parquet_dir=args.parquet_dir)
    run = RunContext(settings, args.parquet_dir, keep_events=True)
    if args.what == "iterations":
        iterations(run, [int(x) for x in args.steps.split(",")])
    else:
        ranker(run, args.rate or [0.03, 0.1, 0.2])


if __name__ == "__main__":
    main()
