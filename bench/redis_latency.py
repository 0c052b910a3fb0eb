"""Latency of the service with its history in Redis, beside the same service over SQLite.

Starts a ``redis-server`` (appendonly yes, appendfsync always: the durable setting) in a
temporary folder and, for each backend, ``uvicorn recommendation_service:app`` (one worker) on
the given artefacts; gives users of four kinds their online histories (bench/service_load.py's
``user_mix``), then in each of ``--runs`` rounds measures with ``wrk`` at ``--connections``
connections (localhost only):

* ``/recommendations/{user}`` over the four kinds of user (one history read each);
* ``GET /history/{user}`` of users with a history;
* ``POST /history/{user}`` of one event (one durable write each: an fsync of the AOF / WAL);
* the store alone, without HTTP: as many threads as connections calling ``get`` and
  ``append`` (what the backend itself costs).

Medians over the rounds (p50, p99, requests/s) go to stdout as Markdown, with the load
average before and after (the machine is shared: say so beside the figures).

    python bench/redis_latency.py --parquet-dir /work/small/parquet --runs 3 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from service_load import LUA, Server, user_mix  # noqa: E402

from musicrec.history import open_history_store  # noqa: E402
from tests.redis_support import RedisServer  # noqa: E402

POST_LUA = """
local tracks = {%s}
local i = 0
request = function()
  i = i + 1
  local body = "[" .. tracks[(i %% #tracks) + 1] .. "]"
  return wrk.format("POST", "/history/" .. (2100000000 + (i %% 5000)),
                    {["content-type"] = "application/json"}, body)
end
"""


def run_wrk(
    url: str, script: str, connections: int, duration: float, work: Path
) -> dict[str, float]:
    """One wrk run of a Lua script: p50/p99 (ms), requests/s, non-2xx answers."""
    path = work / "script.lua"
    path.write_text(script)
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(path),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    )
    text = done.stdout

    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not match:
            raise RuntimeError(f"no {pct}% in wrk output:\n{text}")
        return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return {
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "rps": float(rps.group(1)) if rps else 0.0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def get_script(paths: list[str]) -> str:
    return LUA % ",".join(json.dumps(p) for p in paths)


def store_latency(url: str, threads: int, seconds: float) -> dict[str, dict[str, float]]:
    """The store alone (no HTTP): ``threads`` threads reading (``get`` of a 20-event history)
    then appending (one event each), for ``seconds`` each; p50 / p99 in ms."""
    store = open_history_store(url)
    for user in range(200):
        store.add(user, list(range(20)))
    results = {}
    for name, call in (
        ("store_get", lambda u: store.get(u)),
        ("store_append", lambda u: store.append(u, [7])),
    ):
        times: list[list[float]] = [[] for _ in range(threads)]

        def work(
            index: int, call: Callable[[int], object] = call, times: list[list[float]] = times
        ) -> None:
            end = time.perf_counter() + seconds
            user = index
            while time.perf_counter() < end:
                started = time.perf_counter()
                call(user % 200)
                times[index].append((time.perf_counter() - started) * 1000)
                user += threads

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        flat = np.sort(np.concatenate([np.array(t) for t in times]))
        results[name] = {
            "p50_ms": float(np.percentile(flat, 50)),
            "p99_ms": float(np.percentile(flat, 99)),
            "rps": flat.size / seconds,
            "non_2xx": 0,
        }
    store.close()
    return results


def measure(
    backend: str, history_url: str, args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    env = {
        "MUSICREC_PARQUET_DIR": str(args.parquet_dir),
        "MUSICREC_HISTORY_URL": history_url,
        "MUSICREC_RELOAD_POLL_SECONDS": "0",
        "OPENBLAS_NUM_THREADS": "1",
    }
    service = Server("recommendation_service:app", env, 1, work / f"{backend}.log")
    service.start("/health")
    try:
        kinds = user_mix(args.parquet_dir, service, seed=1)
        mix = [p for paths in kinds.values() for p in paths]
        with_history = [
            p.replace("/recommendations/", "/history/") for p in kinds["online"] + kinds["both"]
        ]
        tracks = (
            pq.read_table(args.parquet_dir / "top_popular.parquet", columns=["track_id"])
            .column(0)
            .to_pylist()
        )
        scripts = {
            "recommendations": get_script(mix),
            "history_get": get_script(with_history),
            "history_post": POST_LUA % ",".join(str(t) for t in tracks[:500]),
        }
        rounds = [
            {
                name: run_wrk(service.url, script, args.connections, args.duration, work)
                for name, script in scripts.items()
            }
            for _ in range(args.runs)
        ]
    finally:
        service.stop()
    for row in rounds:  # the store alone, with the service stopped
        row.update(store_latency(history_url, args.connections, args.duration))
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parquet-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="redis_latency_") as tmp:
        work = Path(tmp)
        with RedisServer(work / "redis") as server:
            results["redis"] = measure("redis", server.url, args, work)
        results["sqlite"] = measure("sqlite", f"sqlite:///{work}/history.db", args, work)
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"{args.connections} connections, {args.runs} rounds of {args.duration:g} s, "
        f"median over rounds; load average before {results['load_before'][0]:.2f}, "
        f"after {results['load_after'][0]:.2f} (2 cores, shared)\n"
    )
    print("| backend | endpoint | p50 ms | p99 ms | req/s | non-2xx |")
    print("|---|---|---|---|---|---|")
    for backend in ("redis", "sqlite"):
        for name in ("recommendations", "history_get", "history_post", "store_get", "store_append"):
            rows = [r[name] for r in results[backend]]
            print(
                f"| {backend} | {name} | {statistics.median(r['p50_ms'] for r in rows):.2f} "
                f"| {statistics.median(r['p99_ms'] for r in rows):.2f} "
                f"| {statistics.median(r['rps'] for r in rows):.0f} "
                f"| {sum(r['non_2xx'] for r in rows)} |"
            )


if __name__ == "__main__":
    main()
