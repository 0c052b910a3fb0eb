"""ALS on Spark (MLlib, implicitPrefs) beside implicit's ALS on the same log: time, peak
memory and NDCG@10 on the test period.

Both fit the configured ALS (musicrec's settings: factors, regularisation, alpha, half-life,
iterations) on the events before the test period (the split of musicrec.split), then list 10
unheard tracks for a seeded sample of the test users; NDCG@10 counts the test-period tracks
each user had not heard before. Each engine runs in its own process (``--engine``), so its
peak memory is its own: the sum of VmRSS over the process tree (Spark: the Python driver and
the JVM, local mode), sampled every 0.2 s.

    python bench/spark_vs_implicit.py --parquet-dir /work/small/parquet --users 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from service_load import proc_status, tree_pids  # noqa: E402

from musicrec import io  # noqa: E402
from musicrec.columns import Columns as C  # noqa: E402
from musicrec.settings import Settings  # noqa: E402


class PeakMemory:
    """Largest sum of VmRSS over this process and its descendants, sampled in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(OSError):  # a process may end while it is read
                for pid in tree_pids(os.getpid()):
                    total += proc_status(pid).get("VmRSS", 0)
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_truth(
    events: pd.DataFrame, test_start: int, users: int, seed: int
) -> tuple[np.ndarray, dict[int, set[int]]]:
    """A seeded sample of test users with history, and each one's new test-period tracks."""
    days = events[C.day].to_numpy()
    before, after = events[days < test_start], events[days >= test_start]
    heard = set(
        zip(before[C.user].to_numpy().tolist(), before[C.track].to_numpy().tolist(), strict=True)
    )
    known = set(before[C.user].unique().tolist())
    truth: dict[int, set[int]] = {}
    for user, track in zip(
        after[C.user].to_numpy().tolist(), after[C.track].to_numpy().tolist(), strict=True
    ):
        if user in known and (user, track) not in heard:
            truth.setdefault(user, set()).add(track)
    ids = np.array(sorted(truth), dtype=np.int32)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(ids, min(users, ids.size), replace=False))
    return sample, {int(u): truth[int(u)] for u in sample}


def ndcg_at_10(lists: pd.DataFrame, truth: dict[int, set[int]]) -> float:
    """Mean binary NDCG@10 over the truth's users (a user without a list scores 0)."""
    gains = 1 / np.log2(np.arange(2, 12))
    got: dict[int, float] = {}
    for user, group in lists[lists[C.rank] <= 10].groupby(C.user):
        relevant = truth.get(int(user))
        if relevant is None:
            continue
        tracks = group.sort_values(C.rank)[C.track].tolist()
        dcg = sum(gains[i] for i, t in enumerate(tracks) if t in relevant)
        got[int(user)] = dcg / gains[: min(10, len(relevant))].sum()
    return float(np.mean([got.get(u, 0.0) for u in truth]))


def run_engine(engine: str, parquet: Path, users: int) -> dict[str, Any]:
    from musicrec.sources import AlsSource
    from musicrec.split import split_dates

    settings = Settings(parquet_dir=parquet, threads=2)
    memory = PeakMemory()
    events = io.read_events(parquet / io.EVENTS)
    dates = split_dates(events, settings)
    sample, truth = test_truth(events, dates.test_start, users, settings.seed)
    params = AlsSource.space(settings)[1]
    result: dict[str, Any] = {"engine": engine, "params": params, "users": int(sample.size)}
    if engine == "implicit":
        from musicrec.listens import build_listens
        from musicrec.pipeline import _frame
        from musicrec.selection import recommend_batched
        from musicrec.sources import TrainData
        from musicrec.split import events_before

        started = time.perf_counter()
        data = TrainData.build(
            build_listens(events_before(events, dates.test_start), dates.test_start), None
        )
        source = AlsSource(settings, **params).fit(data)
        result["fit_seconds"] = time.perf_counter() - started
        codes = data.listens.users.codes(sample)
        codes = np.sort(codes[codes >= 0]).astype(np.int64)
        started = time.perf_counter()
        lists = _frame(recommend_batched(source, codes, 10), data.listens, codes)
        result["score_seconds"] = time.perf_counter() - started
    else:
        from musicrec.spark_engine import (
            _granularity,
            fit_als,
            read_log,
            score_users,
            spark_session,
            strength_matrix,
            window_days,
        )

        del events
        started = time.perf_counter()
        spark = spark_session(settings)
        result["session_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        log_frame = read_log(spark, parquet).persist()
        days = np.sort(np.array([r[0] for r in log_frame.select("day").distinct().collect()]))
        half_life = window_days(
            params["half_life"], dates.first_day, dates.test_start, _granularity(days)
        )
        model = fit_als(strength_matrix(log_frame, dates.test_start, half_life), params, settings)
        result["fit_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        wanted = spark.createDataFrame(pd.DataFrame({C.user: sample}))
        lists = score_users(model, log_frame, dates.test_start, 10, users=wanted).toPandas()
        result["score_seconds"] = time.perf_counter() - started
        result["master"] = spark.sparkContext.master
        spark.stop()
    result["ndcg@10"] = ndcg_at_10(lists, truth)
    result["peak_rss_mb"] = memory.stop() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parquet-dir",
        type=Path,
        required=True,
        help="a folder with the prepared events.parquet (read only)",
    )
    parser.add_argument("--users", type=int, default=5000, help="test users sampled")
    parser.add_argument(
        "--engine",
        choices=["implicit", "spark"],
        help="run one engine here (the script runs each in a subprocess)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.parquet_dir, args.users)))
        return
    load = os.getloadavg()
    results = []
    for engine in ("implicit", "spark"):
        done = subprocess.run(
            [
                sys.executable,
                "-W",
                "ignore::FutureWarning",
                __file__,
                "--engine",
                engine,
                "--parquet-dir",
                str(args.parquet_dir),
                "--users",
                str(args.users),
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,  # stderr: the engine's log
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"load average before: {load[0]:.2f} (2 cores, shared); after: {os.getloadavg()[0]:.2f}\n"
    )
    print("| engine | fit s | score s | session start s | peak RSS MB | NDCG@10 | users |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['engine']} | {r['fit_seconds']:.1f} | {r['score_seconds']:.1f} | "
            f"{r.get('session_seconds', 0):.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['ndcg@10']:.4f} | {r['users']} |"
        )


if __name__ == "__main__":
    main()
