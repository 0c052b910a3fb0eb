"""Load benchmark of the recommendation service on 127.0.0.1, beside a bare FastAPI endpoint.

Starts ``uvicorn recommendation_service:app`` (one worker) on the given artefacts (start-up time
to the first healthy /health), gives some users an online history so the four kinds of user
exist, then measures with ``wrk`` (bounded by duration; localhost only), in each of ``--runs``
rounds:

* ``/recommendations/{user_id}`` for each kind of user alone — offline list only, offline +
  online history (blend), online history only, neither (popular) — at 4 and 16 connections,
  on the service as configured (its read caches answer a user who asks again with the same
  history) and on a second one with both caches off (every request reads the store and
  computes its list: the cost of a user whose history just changed);
* the bare ``async def`` endpoint (``bench/bare_app.py``, same uvicorn settings) before and
  after each connection block, so every ratio is to the bare rate measured in the same round
  on the same (shared, noisy) machine;
* the other read endpoints at 4 connections.

Then memory with ``--memory-workers`` workers (default 2) on the same artefacts after a short
mixed load: per worker RSS, its private part (RssAnon: what an extra worker really costs; the
rest of RSS is the shared page cache of the mapped files) and PSS.

Medians over the rounds go to stdout as Markdown (and ``--json`` as JSON).

    python bench/make_full_artefacts.py /tmp/fullart
    python bench/service_load.py --parquet-dir /tmp/fullart --runs 3 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import requests

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"  # never anything else: the load stays on this machine
N_USERS_PER_KIND = 1_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


MEMORY_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Pss")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon (private), RssFile (mapped files) and Pss (shared
    pages split between the processes mapping them) of a process, in bytes."""
    out = {}
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    if rollup.exists():
        lines += rollup.read_text().splitlines()
    for line in lines:
        key, _, value = line.partition(":")
        if key in MEMORY_KEYS and value.strip():
            out[key] = int(value.split()[0]) * 1024
    return out


def tree_pids(pid: int) -> list[int]:
    """The process and all its descendants (uvicorn master and workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split()
            todo.extend(int(c) for c in children)
    return pids


class Server:
    """A uvicorn process serving ``app`` with the settings every measured server shares."""

    def __init__(self, app: str, env: dict[str, str], workers: int, log: Path) -> None:
        self.app, self.env, self.workers, self.log = app, env, workers, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, ready_path: str, timeout: float = 300) -> float:
        """Start; seconds until ``ready_path`` answers 200."""
        started = time.perf_counter()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "uvicorn",
                    self.app,
                    "--host",
                    HOST,
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                    "--log-level",
                    "warning",
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                ],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.app} exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + ready_path, timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.app} not ready in {timeout} s")

    def memory(self) -> dict[str, int]:
        """RSS now and peak RSS, summed over the process tree."""
        assert self.proc is not None
        total = {"VmRSS": 0, "VmHWM": 0}
        for pid in tree_pids(self.proc.pid):
            for key, value in proc_status(pid).items():
                if key in total:
                    total[key] += value
        return total

    def worker_memory(self) -> list[dict[str, int]]:
        """Memory of each worker process (the uvicorn master of several workers left out)."""
        assert self.proc is not None
        pids = tree_pids(self.proc.pid)
        if self.workers > 1:  # the spawned workers, not multiprocessing's resource tracker
            pids = [
                pid
                for pid in pids[1:]
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
        return [proc_status(pid) for pid in pids]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def user_mix(parquet_dir: Path, service: Server, seed: int) -> dict[str, list[str]]:
    """Request paths per kind of user; posts the online histories the kinds need."""
    rng = random.Random(seed)
    recs = pq.ParquetFile(parquet_dir / "recommendations.parquet")
    users = sorted(set(recs.read_row_group(0, columns=["user_id"]).column(0).to_pylist()))
    rng.shuffle(users)
    n = min(N_USERS_PER_KIND, len(users) // 2)
    offline_only, both = users[:n], users[n : 2 * n]
    items = pq.ParquetFile(parquet_dir / "items.parquet")
    tracks = items.read_row_group(0, columns=["track_id"]).column(0).to_pylist()
    popular = pq.read_table(parquet_dir / "top_popular.parquet", columns=["track_id"])
    tracks = popular.column(0).to_pylist()[:5_000] + tracks[:5_000]  # tracks with neighbours
    top = 2_000_000_000
    new = list(range(top, top + n))
    online_only = list(range(top + n, top + 2 * n))
    with requests.Session() as session:
        for user in online_only + both:
            listened = rng.sample(tracks, rng.randint(1, 20))
            response = session.post(f"{service.url}/history/{user}", json=listened, timeout=30)
            response.raise_for_status()
    return {
        kind: [f"/recommendations/{u}" for u in group]
        for kind, group in (
            ("new", new),
            ("offline", offline_only),
            ("online", online_only),
            ("both", both),
        )
    }


LUA = """
local paths = {%s}
local i = math.random(#paths)
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
"""


def wrk(
    url: str, paths: list[str], connections: int, duration: float, work: Path
) -> dict[str, float]:
    """One wrk run cycling through ``paths``: p50/p99 (ms), requests/s, errors."""
    script = work / f"paths_{abs(hash(tuple(paths)))}.lua"
    if not script.exists():
        script.write_text(LUA % ",".join(json.dumps(p) for p in paths))
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
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    text = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr}")

    def latency(pct: str) -> float:
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not match:
            raise RuntimeError(f"no {pct}% in wrk output:\n{text}")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "rps": rps,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


KIND_NAMES = {
    "offline": "offline list only",
    "both": "offline + online history (blend)",
    "online": "online history only",
    "new": "neither (popular)",
}


def measure_round(
    service: Server,
    uncached: Server,
    bare: Server,
    kinds: dict[str, list[str]],
    others: dict[str, list[str]],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """One round: per connection count the bare endpoint, each kind alone (with the read
    caches, then on the server without them), the bare again."""
    row: dict[str, Any] = {}
    bare_paths = [f"/bare/{i}" for i in range(1000)]
    for connections in (4, 16):
        before = wrk(bare.url, bare_paths, connections, args.duration, work)
        for kind, paths in kinds.items():
            row[f"{kind}_c{connections}"] = wrk(
                service.url, paths, connections, args.duration, work
            )
            row[f"{kind}_uncached_c{connections}"] = wrk(
                uncached.url, paths, connections, args.duration, work
            )
        after = wrk(bare.url, bare_paths, connections, args.duration, work)
        row[f"bare_c{connections}"] = {
            "rps": (before["rps"] + after["rps"]) / 2,
            "p50_ms": (before["p50_ms"] + after["p50_ms"]) / 2,
            "p99_ms": (before["p99_ms"] + after["p99_ms"]) / 2,
            "non_2xx": before["non_2xx"] + after["non_2xx"],
            "before": before,
            "after": after,
        }
    for name, paths in others.items():
        row[f"{name}_c4"] = wrk(service.url, paths, 4, args.kind_duration, work)
    return row


def memory_phase(
    env: dict[str, str], workers: int, mix: list[str], work: Path, seconds: float
) -> dict[str, Any]:
    """Start ``workers`` workers on the same artefacts, load them with the mix for a while,
    and read each worker's memory (the one-worker server is stopped before: one full-size
    server at a time)."""
    server = Server("recommendation_service:app", env, workers, work / "service_multi.log")
    try:
        started = server.start("/health")
        time.sleep(1.0)  # every worker past its lifespan start-up
        at_start = server.worker_memory()
        wrk(server.url, mix, 8, seconds, work)
        return {
            "workers": workers,
            "startup_seconds": round(started, 2),
            "at_start": at_start,
            "after_load": server.worker_memory(),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parquet-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk run")
    parser.add_argument(
        "--kind-duration", type=float, default=3, help="seconds per run of the other endpoints"
    )
    parser.add_argument(
        "--memory-workers", type=int, default=2, help="workers of the memory phase (0: skip it)"
    )
    parser.add_argument(
        "--memory-seconds",
        type=float,
        default=10,
        help="seconds of mixed load before the memory is read",
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="service_load_"))
    env = {
        "MUSICREC_PARQUET_DIR": str(args.parquet_dir.resolve()),
        "MUSICREC_HISTORY_URL": f"sqlite:///{work}/history.db",
        "MUSICREC_RELOAD_POLL_SECONDS": "0",
        "OPENBLAS_NUM_THREADS": "1",
    }
    service = Server("recommendation_service:app", env, 1, work / "service.log")
    # the same service with both read caches off: every request reads the store and computes
    no_caches = {"MUSICREC_ANSWER_CACHE_USERS": "0", "MUSICREC_HISTORY_CACHE_EVENTS": "0"}
    uncached = Server("recommendation_service:app", {**env, **no_caches}, 1, work / "u.log")
    bare = Server("bench.bare_app:app", env, 1, work / "bare.log")
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} cores, {ram:.0f} GiB, Python {sys.version.split()[0]}",
        "loadavg_before": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        results["startup_seconds"] = round(service.start("/health"), 2)
        memory = service.memory()
        results["startup_rss_gib"] = round(memory["VmRSS"] / 2**30, 3)
        results["startup_peak_rss_gib"] = round(memory["VmHWM"] / 2**30, 3)
        root = requests.get(service.url + "/", timeout=10).json()
        results["load_seconds"] = root.get("load_seconds")
        results["mapped"] = root.get("mapped")
        print(
            f"start-up {results['startup_seconds']} s (artefacts {results['load_seconds']} s,"
            f" mapped {results['mapped']}), RSS {results['startup_rss_gib']} GiB, peak "
            f"{results['startup_peak_rss_gib']} GiB",
            flush=True,
        )
        bare.start("/bare/1")
        uncached.start("/health")
        kinds = user_mix(args.parquet_dir, service, seed=0)
        tracks = requests.get(service.url + "/top_popular/100", timeout=10).json()
        others = {
            "top_popular": ["/top_popular"],
            "similar": [f"/similar/25?track_id={t}" for t in tracks],
            "history": [p.replace("/recommendations/", "/history/") for p in kinds["online"]],
        }
        for paths in (*kinds.values(), *others.values()):
            assert requests.get(service.url + paths[0], timeout=10).status_code == 200, paths[0]
        rounds: list[dict[str, Any]] = []
        for run in range(args.runs):
            row = {
                "run": run + 1,
                "loadavg": os.getloadavg(),
                **measure_round(service, uncached, bare, kinds, others, args, work),
            }
            rounds.append(row)
            print(
                json.dumps({k: (v["rps"] if isinstance(v, dict) else v) for k, v in row.items()}),
                flush=True,
            )
        results["rounds"] = rounds
        memory = service.memory()
        results["rss_after_gib"] = round(memory["VmRSS"] / 2**30, 3)
        mix = [p for group in zip(*kinds.values(), strict=True) for p in group]
    finally:
        service.stop()
        uncached.stop()
        bare.stop()
    if args.memory_workers > 0:
        # the history written above stays in the same store: the workers see the same users
        results["memory"] = memory_phase(env, args.memory_workers, mix, work, args.memory_seconds)
    results["loadavg_after"] = os.getloadavg()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, Any]) -> None:
    """Medians over the rounds, as Markdown tables."""
    rounds = results["rounds"]
    loads = ", ".join(f"{r['loadavg'][0]:.1f}" for r in rounds)
    print(
        f"\n{results['date']}, {results['machine']}, load average before "
        f"{results['loadavg_before'][0]:.1f}, per round {loads}, after "
        f"{results['loadavg_after'][0]:.1f}; {len(rounds)} rounds (medians)\n"
    )
    print(
        f"start-up to healthy: {results['startup_seconds']} s (artefacts "
        f"{results['load_seconds']} s, mapped: {results['mapped']}); RSS "
        f"{results['startup_rss_gib']} GiB (peak {results['startup_peak_rss_gib']} GiB); "
        f"after the load {results['rss_after_gib']} GiB\n"
    )
    for suffix, title in (
        ("", "with the read caches (the defaults): a user asking again, history unchanged"),
        ("_uncached", "caches off: every request reads the store and computes its list"),
    ):
        print(f"\n{title}\n")
        print(
            "| kind of user | rps c16 | x bare async (same round) | p99 c4 ms | p99 c16 ms "
            "| errors |"
        )
        print("|---|---|---|---|---|---|")
        for kind in (*KIND_NAMES, "bare"):
            key = kind if kind == "bare" else kind + suffix
            c4 = [r[f"{key}_c4"] for r in rounds]
            c16 = [r[f"{key}_c16"] for r in rounds]
            ratios = [r[f"{key}_c16"]["rps"] / r["bare_c16"]["rps"] for r in rounds]
            errors = sum(x["non_2xx"] for x in c4 + c16)
            name = KIND_NAMES.get(kind, "bare `async def`, 25 ints")
            print(
                f"| {name} | {median_of(c16, 'rps'):.0f} | {statistics.median(ratios):.2f} "
                f"({', '.join(f'{x:.2f}' for x in ratios)}) | {median_of(c4, 'p99_ms'):.2f} | "
                f"{median_of(c16, 'p99_ms'):.2f} | {errors} |"
            )
    others = [
        k[:-3]
        for k in rounds[0]
        if k.endswith("_c4")
        and k[:-3] not in KIND_NAMES
        and k != "bare_c4"
        and not k.endswith("_uncached_c4")
    ]
    if others:
        print("\n| other endpoint | rps c4 | p99 c4 ms |\n|---|---|---|")
        for name in others:
            rows = [r[f"{name}_c4"] for r in rounds]
            print(f"| {name} | {median_of(rows, 'rps'):.0f} | {median_of(rows, 'p99_ms'):.2f} |")
    memory = results.get("memory")
    if memory:
        print(
            f"\nmemory, {memory['workers']} workers (start-up {memory['startup_seconds']} s), "
            "MiB per worker: RSS / private (RssAnon) / PSS"
        )
        print("\n| worker | at start | after mixed load |\n|---|---|---|")
        for i, (start, after) in enumerate(
            zip(memory["at_start"], memory["after_load"], strict=True)
        ):
            cells = [
                " / ".join(f"{m.get(k, 0) / 2**20:.0f}" for k in ("VmRSS", "RssAnon", "Pss"))
                for m in (start, after)
            ]
            print(f"| {i + 1} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
