"""Start-up benchmark of the recommendation service: seconds to the first healthy /health.

Four cases per round, on the given (published) artefacts, one uvicorn worker each:

* page cache warm or cold: cold means every file of the folder was dropped from the page
  cache first (``posix_fadvise(DONTNEED)``: no root needed; what a reboot or other work
  that pushed the files out leaves). Python's own modules stay cached in both cases;
* with or without the verified record (``.served_verified.json``): without it the worker
  computes the CRC-32 of every served file before it answers; with it, files unchanged since
  a verified start are mapped at once and checked in a background thread.

For each start: seconds to healthy, the artefact load the service reports (``GET /``), and
the seconds its background check took (from its log). Medians over ``--runs`` rounds go to
stdout as Markdown. The record is restored as found at the end.

    python bench/startup.py --parquet-dir /work/full/parquet --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.service_load import Server  # noqa: E402
from musicrec.served import VERIFIED  # noqa: E402

CASES = (
    ("cold", False),
    ("cold", True),
    ("warm", False),
    ("warm", True),
)
BACKGROUND = re.compile(r"match their CRC-32 \(([0-9.]+) s in the background\)")


def evict(folder: Path) -> None:
    """Drop every file of ``folder`` from the page cache."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(folder: Path) -> None:
    """Read every file of ``folder`` once (into the page cache)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as file:
                while file.read(1 << 22):
                    pass


def one_start(folder: Path, work: Path, cache: str, record: bytes | None) -> dict[str, Any]:
    """Start one worker with the page cache ``cache`` and the verified record ``record``
    (None: none); its figures."""
    path = folder / VERIFIED
    path.unlink(missing_ok=True)
    if record is not None:
        path.write_bytes(record)
    (warm if cache == "warm" else evict)(folder)
    log = work / f"service-{time.monotonic_ns()}.log"
    env = {
        "MUSICREC_PARQUET_DIR": str(folder),
        "MUSICREC_HISTORY_URL": f"sqlite:///{work}/history.db",
        "MUSICREC_RELOAD_POLL_SECONDS": "0",
        "OPENBLAS_NUM_THREADS": "1",
    }
    server = Server("recommendation_service:app", env, 1, log)
    try:
        seconds = server.start("/health")
        load = requests.get(server.url + "/", timeout=5).json().get("load_seconds")
        background = None
        deadline = time.monotonic() + 120
        while record is not None and time.monotonic() < deadline:
            found = BACKGROUND.search(log.read_text(errors="replace"))
            if found:
                background = float(found.group(1))
                break
            time.sleep(0.2)
    finally:
        server.stop()
    return {"seconds": seconds, "load": load, "background": background}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parquet-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = args.parquet_dir.resolve()
    work = Path(tempfile.mkdtemp(prefix="startup_"))
    path = folder / VERIFIED
    found = path.read_bytes() if path.exists() else None
    try:
        # a verified start writes the record (files must be older than a second)
        one_start(folder, work, "warm", None)
        if not path.exists():
            sys.exit(f"{path} was not written: is the folder writable, are the files settled?")
        record = path.read_bytes()
        print(f"load average before: {os.getloadavg()}", file=sys.stderr)
        rows: dict[tuple[str, bool], list[dict[str, Any]]] = {case: [] for case in CASES}
        for round_ in range(args.runs):
            for cache, with_record in CASES:
                got = one_start(folder, work, cache, record if with_record else None)
                rows[(cache, with_record)].append(got)
                print(f"round {round_ + 1} {cache} record={with_record}: {got}", file=sys.stderr)
        print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    finally:
        path.unlink(missing_ok=True)
        if found is not None:
            path.write_bytes(found)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nstart-up to healthy, one worker, medians of {args.runs} rounds (each round)\n")
    print("| page cache | verified record | to healthy | artefact load | background check |")
    print("|---|---|---:|---:|---:|")
    for (cache, with_record), got in rows.items():
        secs = [g["seconds"] for g in got]
        loads = [g["load"] for g in got if g["load"] is not None]
        backs = [g["background"] for g in got if g["background"] is not None]
        print(
            f"| {cache} | {'yes' if with_record else 'no'} | "
            f"**{statistics.median(secs):.2f} s** ({', '.join(f'{s:.2f}' for s in secs)}) | "
            f"{statistics.median(loads):.2f} s | "
            + (f"{statistics.median(backs):.1f} s |" if backs else "– |")
        )


if __name__ == "__main__":
    main()
