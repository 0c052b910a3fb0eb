"""Soak test: N minutes of mixed load against the service on 127.0.0.1, with bounds on errors,
latency and memory growth that fail the run.

Starts ``uvicorn recommendation_service:app`` on the given artefacts with a fresh history
file, then runs ``--threads`` clients at a bounded total rate (``--rps``) for ``--minutes``
minutes: GET /recommendations for the four kinds of user, POST /history (1-3 events), the
same POST retried with an ``Idempotency-Key`` (the retry must be replayed, not stored), GET
/history pages, oversized bodies (must be 413) and GET /similar. Every ``--interval`` seconds
it prints requests, errors, p50/p99 and the RSS of the server (master and workers summed);
at the end a summary, and the run fails (exit 1, or ``SoakFailed`` from ``run_soak``) when
any bound is passed: errors above ``--max-errors``, p99 after the first interval above
``--max-p99-ms``, RSS growth from the end of the first interval to the end above
``--max-rss-growth-mib``. ``tests/test_soak.py`` runs a 12-second version.

    python bench/soak.py --parquet-dir /tmp/fullart --minutes 10
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.service_load import Server  # noqa: E402

N_USERS = 2_000  # per kind
OVERSIZED = 300 * 1024  # bytes: above the default max_body_bytes (256 KiB)
log = logging.getLogger("soak")


class SoakFailed(AssertionError):
    """A bound of the soak was passed; the message lists every one."""


@dataclass(frozen=True)
class Bounds:
    """What a soak must stay within (after the first interval, the warm-up)."""

    max_errors: int = 0
    max_p99_ms: float = 250.0
    max_rss_growth_mib: float = 50.0


@dataclass
class Window:
    """Counters of one reporting interval."""

    requests: int = 0
    errors: int = 0
    writes: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


class Soak:
    def __init__(
        self, url: str, paths: dict[str, list], tracks: list[int], rps: float, seed: int
    ) -> None:
        self.url = url
        self.paths = paths
        self.tracks = tracks
        self.interval = 1.0 / rps  # the whole client side together
        self.next_at = time.monotonic()
        self.lock = threading.Lock()
        self.window = Window()
        self.stop = threading.Event()
        self.seed = seed
        self.oversized = b"[" + b"1234567," * (OVERSIZED // 8) + b"1]"

    def _slot(self) -> None:
        """Wait for this thread's turn: a shared schedule keeps the total rate bounded."""
        with self.lock:
            self.next_at = max(self.next_at + self.interval, time.monotonic() - 1.0)
            due = self.next_at
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def request(self, rng: random.Random, session: requests.Session) -> tuple[bool, bool, str]:
        """One request of the mix; (ok, was a write, what it was and what came back)."""
        draw = rng.random()
        if draw < 0.70:
            kind = rng.choice(("new", "offline", "online", "both"))
            response = session.get(self.url + rng.choice(self.paths[kind]), timeout=30)
            ok = response.status_code == 200 and len(response.json()) == 25
            return ok, False, f"recommendations ({kind}) -> {response.status_code}"
        user = rng.choice(self.paths["writers"])
        if draw < 0.82:
            events = rng.sample(self.tracks, rng.randint(1, 3))
            response = session.post(f"{self.url}/history/{user}", json=events, timeout=30)
            return response.status_code == 200, True, f"add -> {response.status_code}"
        if draw < 0.85:  # a retry with the same Idempotency-Key: the first answer, no new row
            events = rng.sample(self.tracks, rng.randint(1, 3))
            key = {"Idempotency-Key": str(uuid.UUID(int=rng.getrandbits(128)))}
            first = session.post(f"{self.url}/history/{user}", json=events, headers=key, timeout=30)
            again = session.post(f"{self.url}/history/{user}", json=events, headers=key, timeout=30)
            ok = (
                first.status_code == again.status_code == 200
                and again.json() == first.json()
                and again.headers.get("Idempotent-Replayed") == "true"
            )
            return ok, True, f"retry -> {first.status_code}, {again.status_code}"
        if draw < 0.94:
            response = session.get(f"{self.url}/history/{user}", params={"limit": 50}, timeout=30)
            ok = response.status_code == 200 and len(response.json()) <= 50
            return ok, False, f"history page -> {response.status_code}"
        if draw < 0.95:  # an oversized body: refused with 413 before it is parsed
            response = session.post(
                f"{self.url}/history/{user}",
                data=self.oversized,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            return response.status_code == 413, False, f"oversized -> {response.status_code}"
        track = rng.choice(self.tracks)
        response = session.get(f"{self.url}/similar/10?track_id={track}", timeout=30)
        return response.status_code == 200, False, f"similar -> {response.status_code}"

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with requests.Session() as session:
            while not self.stop.is_set():
                self._slot()
                started = time.perf_counter()
                try:
                    ok, write, problem = self.request(rng, session)
                except (requests.RequestException, ValueError) as exc:
                    ok, write, problem = False, False, repr(exc)[:200]
                elapsed = time.perf_counter() - started
                with self.lock:
                    w = self.window
                    w.requests += 1
                    w.writes += write
                    w.latencies.append(elapsed)
                    if not ok:
                        w.errors += 1
                        if len(w.samples) < 3:
                            w.samples.append(problem)

    def take_window(self) -> Window:
        with self.lock:
            window, self.window = self.window, Window()
        return window


def prepare(
    url: str, parquet_dir: Path, seed: int, users_per_kind: int = N_USERS
) -> tuple[dict[str, list], list[int]]:
    """Paths per kind of user; gives the online and both users a history first."""
    rng = random.Random(seed)
    recs = pq.ParquetFile(parquet_dir / "recommendations.parquet")
    users = sorted(set(recs.read_row_group(0, columns=["user_id"]).column(0).to_pylist()))
    rng.shuffle(users)
    n = min(users_per_kind, len(users) // 2)
    popular = pq.read_table(parquet_dir / "top_popular.parquet", columns=["track_id"])
    tracks = popular.column(0).to_pylist()[:5_000]
    top = 2_000_000_000
    groups = {
        "new": list(range(top, top + n)),
        "offline": users[:n],
        "online": list(range(top + n, top + 2 * n)),
        "both": users[n : 2 * n],
    }
    with requests.Session() as session:
        for user in groups["online"] + groups["both"]:
            session.post(
                f"{url}/history/{user}", json=rng.sample(tracks, 5), timeout=30
            ).raise_for_status()
    paths: dict[str, list] = {k: [f"/recommendations/{u}" for u in v] for k, v in groups.items()}
    paths["writers"] = groups["online"] + list(range(top + 2 * n, top + 3 * n))
    return paths, tracks


def _p99_ms(latencies: list[float]) -> float:
    ordered = sorted(latencies) or [0.0]
    return round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2)


def summarize(rows: list[dict[str, Any]], latencies: list[float]) -> dict[str, Any]:
    """Totals of a run: errors, p99 after the warm-up, RSS growth after the warm-up."""
    first = rows[min(1, len(rows) - 1)]["rss_mib"] if rows else 0.0
    last = rows[-1]["rss_mib"] if rows else 0.0
    return {
        "requests": sum(r["requests"] for r in rows),
        "writes": sum(r["writes"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "p99_ms": _p99_ms(latencies),
        "rss_first_mib": first,
        "rss_last_mib": last,
        "rss_growth_mib": round(last - first, 1),
        "rss_max_mib": max((r["rss_mib"] for r in rows), default=0.0),
        "samples": [s for r in rows for s in r["samples"]][:5],
    }


def check(summary: dict[str, Any], bounds: Bounds) -> list[str]:
    """Every bound the run passed, in words (empty: the run is within bounds)."""
    problems = []
    if summary["requests"] == 0:
        problems.append("no request was made")
    if summary["errors"] > bounds.max_errors:
        problems.append(
            f"{summary['errors']} failed requests (at most {bounds.max_errors}; "
            f"e.g. {summary['samples']})"
        )
    if summary["p99_ms"] > bounds.max_p99_ms:
        problems.append(f"p99 {summary['p99_ms']} ms above {bounds.max_p99_ms} ms")
    if summary["rss_growth_mib"] > bounds.max_rss_growth_mib:
        problems.append(
            f"RSS grew {summary['rss_growth_mib']} MiB after the warm-up "
            f"(at most {bounds.max_rss_growth_mib} MiB)"
        )
    return problems


def run_soak(
    parquet_dir: Path,
    seconds: float,
    *,
    rps: float = 400.0,
    threads: int = 8,
    interval: float = 30.0,
    workers: int = 1,
    seed: int = 0,
    bounds: Bounds | None = None,
    report: Callable[[str], None] = print,
    users_per_kind: int = N_USERS,
) -> dict[str, Any]:
    """Start the service, run the mixed load for ``seconds``, stop it; the summary, or
    SoakFailed naming every bound passed (the server log is then kept)."""
    bounds = bounds or Bounds()
    work = Path(tempfile.mkdtemp(prefix="soak_"))
    env = {
        "MUSICREC_PARQUET_DIR": str(Path(parquet_dir).resolve()),
        "MUSICREC_HISTORY_URL": f"sqlite:///{work}/history.db",
        "MUSICREC_RELOAD_POLL_SECONDS": "0",
        "OPENBLAS_NUM_THREADS": "1",
    }
    server = Server("recommendation_service:app", env, workers, work / "server.log")
    startup = server.start("/health")
    assert urlsplit(server.url).hostname == "127.0.0.1"
    report(
        f"service up in {startup:.1f} s; RSS {server.memory()['VmRSS'] / 2**20:.0f} MiB; "
        f"log {work / 'server.log'}"
    )
    rows: list[dict[str, Any]] = []
    latencies: list[float] = []
    warm_up: list[float] = []
    try:
        paths, tracks = prepare(server.url, Path(parquet_dir), seed, users_per_kind)
        soak = Soak(server.url, paths, tracks, rps, seed)
        clients = [
            threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(threads)
        ]
        started = time.monotonic()
        for thread in clients:
            thread.start()
        end = started + seconds
        report("| minute | requests | writes | errors | req/s | p50 ms | p99 ms | RSS MiB |")
        report("|---|---|---|---|---|---|---|---|")
        while time.monotonic() < end:
            time.sleep(min(interval, max(end - time.monotonic(), 0.1)))
            window = soak.take_window()
            (latencies if rows else warm_up).extend(window.latencies)  # p99 after warm-up
            lat = sorted(window.latencies) or [0.0]
            row = {
                "minute": round((time.monotonic() - started) / 60, 2),
                "requests": window.requests,
                "writes": window.writes,
                "errors": window.errors,
                "rps": round(window.requests / interval, 1),
                "p50_ms": round(statistics.median(lat) * 1000, 2),
                "p99_ms": _p99_ms(lat),
                "rss_mib": round(server.memory()["VmRSS"] / 2**20, 1),
                "samples": window.samples,
            }
            rows.append(row)
            report(
                f"| {row['minute']} | {row['requests']} | {row['writes']} | "
                f"{row['errors']} | {row['rps']} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{row['rss_mib']} |" + (f" {window.samples}" if window.samples else "")
            )
        soak.stop.set()
        for thread in clients:
            thread.join(60)
    finally:
        server.stop()
    summary = {
        **summarize(rows, latencies or warm_up),
        "startup_seconds": round(startup, 2),
        "rows": rows,
        "bounds": vars(bounds),
    }
    report(
        f"{summary['requests']} requests ({summary['writes']} writes) in {seconds:.0f} s, "
        f"{summary['errors']} errors, p99 {summary['p99_ms']} ms after the warm-up; RSS "
        f"{summary['rss_first_mib']} -> {summary['rss_last_mib']} MiB "
        f"({summary['rss_growth_mib']:+.1f}), max {summary['rss_max_mib']} MiB"
    )
    problems = check(summary, bounds)
    if problems:
        raise SoakFailed(
            f"soak out of bounds (server log kept: {work / 'server.log'}): " + "; ".join(problems)
        )
    shutil.rmtree(work, ignore_errors=True)  # kept (server.log) only when something failed
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parquet-dir", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rps", type=float, default=400.0, help="total request rate cap")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per report line")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users-per-kind", type=int, default=N_USERS)
    parser.add_argument("--max-errors", type=int, default=Bounds.max_errors)
    parser.add_argument("--max-p99-ms", type=float, default=Bounds.max_p99_ms)
    parser.add_argument("--max-rss-growth-mib", type=float, default=Bounds.max_rss_growth_mib)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bounds = Bounds(args.max_errors, args.max_p99_ms, args.max_rss_growth_mib)
    try:
        summary = run_soak(
            args.parquet_dir,
            args.minutes * 60,
            rps=args.rps,
            threads=args.threads,
            interval=args.interval,
            workers=args.workers,
            seed=args.seed,
            bounds=bounds,
            report=log.info,
            users_per_kind=args.users_per_kind,
        )
    except SoakFailed as exc:
        log.error("%s", exc)
        sys.exit(1)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **summary}, indent=2)
        )


if __name__ == "__main__":
    main()
