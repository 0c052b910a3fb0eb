"""Soak test: N minutes of mixed load against the service on 127.0.0.1, reporting errors,
latency and memory over time.

Starts ``uvicorn recommendation_service:app`` on the given artefacts with a fresh history
file (or targets ``--url`` of a running one, which must be on this machine), then runs
``--threads`` clients at a bounded total rate (``--rps``) for ``--minutes`` minutes: GET
/recommendations for the four kinds of user, POST /history (1-3 events), GET /history and
GET /similar. Every ``--interval`` seconds it prints requests, errors, p50/p99 and the RSS of
the server (master and workers summed); at the end a Markdown table, the memory growth and
whether any request failed.

    python bench/soak.py --parquet-dir /tmp/fullart --minutes 10
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.service_load import Server  # noqa: E402

N_USERS = 2_000  # per kind


@dataclass
class Window:
    """Counters of one reporting interval."""

    requests: int = 0
    errors: int = 0
    writes: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, url: str, paths: dict[str, list], tracks: list[int], rps: float,
                 seed: int) -> None:
        self.url = url
        self.paths = paths
        self.tracks = tracks
        self.interval = 1.0 / rps  # the whole client side together
        self.next_at = time.monotonic()
        self.lock = threading.Lock()
        self.window = Window()
        self.stop = threading.Event()
        self.seed = seed

    def _slot(self) -> None:
        """Wait for this thread's turn: a shared schedule keeps the total rate bounded."""
        with self.lock:
            self.next_at = max(self.next_at + self.interval, time.monotonic() - 1.0)
            due = self.next_at
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def request(self, rng: random.Random, session: requests.Session) -> tuple[bool, bool]:
        """One request of the mix; (ok, was a write)."""
        draw = rng.random()
        if draw < 0.70:
            kind = rng.choice(("new", "offline", "online", "both"))
            response = session.get(self.url + rng.choice(self.paths[kind]), timeout=30)
            ok = response.status_code == 200 and len(response.json()) == 25
            return ok, False
        if draw < 0.85:
            user = rng.choice(self.paths["writers"])
            events = rng.sample(self.tracks, rng.randint(1, 3))
            response = session.post(f"{self.url}/history/{user}", json=events, timeout=30)
            return response.status_code == 200, True
        if draw < 0.95:
            user = rng.choice(self.paths["writers"])
            response = session.get(f"{self.url}/history/{user}", timeout=30)
            return response.status_code == 200, False
        track = rng.choice(self.tracks)
        response = session.get(f"{self.url}/similar/10?track_id={track}", timeout=30)
        return response.status_code == 200, False

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with requests.Session() as session:
            while not self.stop.is_set():
                self._slot()
                started = time.perf_counter()
                try:
                    ok, write = self.request(rng, session)
                    problem = "" if ok else "bad answer"
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


def prepare(url: str, parquet_dir: Path, seed: int) -> tuple[dict[str, list], list[int]]:
    """Paths per kind of user; gives the online and both users a history first."""
    rng = random.Random(seed)
    recs = pq.ParquetFile(parquet_dir / "recommendations.parquet")
    users = sorted(set(recs.read_row_group(0, columns=["user_id"]).column(0).to_pylist()))
    rng.shuffle(users)
    n = min(N_USERS, len(users) // 2)
    popular = pq.read_table(parquet_dir / "top_popular.parquet", columns=["track_id"])
    tracks = popular.column(0).to_pylist()[:5_000]
    top = 2_000_000_000
    groups = {"new": list(range(top, top + n)), "offline": users[:n],
              "online": list(range(top + n, top + 2 * n)), "both": users[n:2 * n]}
    with requests.Session() as session:
        for user in groups["online"] + groups["both"]:
            session.post(f"{url}/history/{user}", json=rng.sample(tracks, 5),
                         timeout=30).raise_for_status()
    paths: dict[str, list] = {k: [f"/recommendations/{u}" for u in v] for k, v in groups.items()}
    paths["writers"] = groups["online"] + list(range(top + 2 * n, top + 3 * n))
    return paths, tracks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parquet-dir", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rps", type=float, default=400.0, help="total request rate cap")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per report line")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak_"))
    env = {"MUSICREC_PARQUET_DIR": str(args.parquet_dir.resolve()),
           "MUSICREC_HISTORY_URL": f"sqlite:///{work}/history.db",
           "OPENBLAS_NUM_THREADS": "1"}
    server = Server("recommendation_service:app", env, args.workers, work / "server.log")
    startup = server.start("/health")
    assert urlsplit(server.url).hostname == "127.0.0.1"
    print(f"service up in {startup:.1f} s; RSS {server.memory()['VmRSS'] / 2**20:.0f} MiB; "
          f"log {work / 'server.log'}", flush=True)
    rows: list[dict] = []
    try:
        paths, tracks = prepare(server.url, args.parquet_dir, args.seed)
        soak = Soak(server.url, paths, tracks, args.rps, args.seed)
        threads = [threading.Thread(target=soak.client, args=(i,), daemon=True)
                   for i in range(args.threads)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        end = started + args.minutes * 60
        print("| minute | requests | writes | errors | req/s | p50 ms | p99 ms | RSS MiB |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(end - time.monotonic(), 0.1)))
            window = soak.take_window()
            lat = sorted(window.latencies) or [0.0]
            row = {
                "minute": round((time.monotonic() - started) / 60, 2),
                "requests": window.requests, "writes": window.writes, "errors": window.errors,
                "rps": round(window.requests / args.interval, 1),
                "p50_ms": round(statistics.median(lat) * 1000, 2),
                "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2),
                "rss_mib": round(server.memory()["VmRSS"] / 2**20, 1),
                "samples": window.samples,
            }
            rows.append(row)
            print(f"| {row['minute']} | {row['requests']} | {row['writes']} | {row['errors']} | "
                  f"{row['rps']} | {row['p50_ms']} | {row['p99_ms']} | {row['rss_mib']} |"
                  + (f" {window.samples}" if window.samples else ""), flush=True)
        soak.stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        server.stop()
    total = sum(r["requests"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    first, last = rows[min(1, len(rows) - 1)]["rss_mib"], rows[-1]["rss_mib"]
    print(f"\n{total} requests ({sum(r['writes'] for r in rows)} history writes) in "
          f"{args.minutes} min, {errors} errors; RSS {first} MiB after the first interval -> "
          f"{last} MiB at the end ({last - first:+.1f} MiB); max "
          f"{max(r['rss_mib'] for r in rows)} MiB")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "startup_seconds": startup, "rows": rows}, indent=2))
    if not errors:
        shutil.rmtree(work, ignore_errors=True)  # kept (server.log) only when something failed
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
