"""Benchmark of the offline pipeline: each stage's wall time and peak memory, the bare ALS fit
beside it, a markdown table.

    OPENBLAS_NUM_THREADS=1 python bench/pipeline_bench.py --parquet-dir /work/fullrun \\
        --label full --out bench/results/pipeline_full.md [--set als_iterations=8 ...]

The pipeline runs in this process exactly as ``python -m musicrec run`` does (``run_all``);
a stage's peak memory is the process's peak resident set while the stage runs (the kernel's
high-water mark is reset at each stage start). The bare fit is implicit ALS with the run's
factors, iterations and threads on the matrix of every event before the test period (the
matrix the final model is trained on), in a child process so its memory is its own; only
``model.fit`` is timed (with the ALS configuration the run's search chose).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")

# log lines of the stages worth quoting under the table (sub-step timings)
DETAIL = re.compile(
    r"read \d+ events|fitted |search \w+: kept|IVF index|short ANN|"
    r"CatBoostRanker:|ranker pairs:|served model|stage \w+: done|metrics@"
)


def _status(field: str) -> int:
    """A VmHWM / VmRSS figure of this process in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class StageWatch(logging.Handler):
    """Turns the runner's 'stage X: started/done' lines into per-stage wall time and peak."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stages: dict[str, dict[str, float]] = {}
        self.details: list[str] = []
        self._current: str | None = None
        self._t0 = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match = re.match(r"stage (\w+): (started|done)", message)
        if match and record.name == "musicrec.pipeline":
            stage, what = match.groups()
            if what == "started":
                _reset_peak()
                self._current = stage
                self.stages[stage] = {"start": time.perf_counter(), "cpu_start": _cpu()}
            else:
                entry = self.stages[stage]
                entry["seconds"] = time.perf_counter() - entry["start"]
                entry["cpu_seconds"] = _cpu() - entry["cpu_start"]
                entry["peak_bytes"] = _status("VmHWM")
                entry["load"] = os.getloadavg()[0]
        if DETAIL.search(message):
            elapsed = time.perf_counter() - self._t0
            self.details.append(f"{elapsed:7.0f} s  {record.name}: {message.splitlines()[0]}")


def _settings(args: argparse.Namespace):
    from musicrec.settings import Settings

    overrides = dict(item.split("=", 1) for item in args.set)
    for key, value in overrides.items():
        os.environ["MUSICREC_" + key.upper()] = value
    os.environ["MUSICREC_PARQUET_DIR"] = str(args.parquet_dir)
    if args.data_dir:
        os.environ["MUSICREC_DATA_DIR"] = str(args.data_dir)
    return Settings()


def run_pipeline(args: argparse.Namespace) -> dict:
    from musicrec import pipeline

    settings = _settings(args)
    watch = StageWatch()
    root = logging.getLogger("musicrec")
    root.addHandler(watch)
    started = time.perf_counter()
    manifest = pipeline.run_all(settings)
    wall = time.perf_counter() - started
    root.removeHandler(watch)
    # resetting the high-water mark per stage also resets ru_maxrss: the run's peak is the
    # largest stage peak
    stage_peaks = [v.get("peak_bytes", 0) for v in watch.stages.values()]
    return {
        "settings": settings.model_dump(mode="json"),
        "wall_seconds": wall,
        "peak_bytes": max(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, *stage_peaks]
        ),
        "stages": {
            k: {key: v[key] for key in ("seconds", "cpu_seconds", "peak_bytes", "load")}
            for k, v in watch.stages.items()
        },
        "details": watch.details,
        "metrics": manifest["metrics"],
        "artefacts": manifest["artefacts"],
        "split": manifest["split"],
    }


def bare_als(args: argparse.Namespace) -> dict:
    """(child process) implicit ALS with the run's chosen ALS configuration (or the plain one),
    its iterations and threads, on the matrix of every event before the test period."""
    import implicit.cpu.als
    from threadpoolctl import threadpool_limits

    from musicrec import io
    from musicrec.listens import build_listens
    from musicrec.pipeline import SEARCH_JSON, SPLIT_JSON, WORK_DIR
    from musicrec.sources import AlsSource
    from musicrec.split import SplitDates, events_before

    settings = _settings(args)
    work = Path(args.parquet_dir) / WORK_DIR
    dates = SplitDates.from_dict(io.read_json(work / SPLIT_JSON))
    chosen = io.read_json(work / SEARCH_JSON).get("als") if (work / SEARCH_JSON).exists() else None
    params = chosen["params"] if chosen else AlsSource.space(settings)[0]
    started = time.perf_counter()
    events = io.read_events(Path(args.parquet_dir) / io.EVENTS)
    history = build_listens(events_before(events, dates.test_start), dates.test_start)
    del events
    matrix = history.matrix()
    matrix.data = (1.0 + params["alpha"] * matrix.data).astype(np.float32)
    prepare = time.perf_counter() - started
    iterations = args.bare_iterations or settings.als_iterations
    model = implicit.cpu.als.AlternatingLeastSquares(
        factors=params["factors"],
        regularization=params["regularization"],
        alpha=1.0,
        iterations=iterations,
        random_state=settings.seed,
        num_threads=settings.threads,
    )
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(matrix, show_progress=False)
    fit = time.perf_counter() - started
    return {
        "fit_seconds": fit,
        "prepare_seconds": prepare,
        "iterations": iterations,
        "factors": params["factors"],
        "threads": settings.threads,
        "users": history.n_users,
        "tracks": history.n_tracks,
        "events": history.n_events,
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's at fork
        "peak_bytes": _status("VmHWM"),
    }


def prepare_preset(args: argparse.Namespace) -> None:
    """Generate ``args.preset`` (seed 42) and prepare it: the pipeline's input."""
    from musicrec.generate import generate
    from musicrec.prepare import prepare_files

    data = args.data_dir or args.parquet_dir.parent / f"{args.preset}_data"
    if not (data / "interactions.parquet").exists():
        started = time.perf_counter()
        generate(args.preset, data, seed=42)
        log.info("generated %s into %s in %.0f s", args.preset, data, time.perf_counter() - started)
    started = time.perf_counter()
    prepare_files(data, args.parquet_dir, _settings(args))
    log.info("prepared %s in %.0f s", args.parquet_dir, time.perf_counter() - started)
    args.data_dir = data


def _use(cpu_seconds: float | None, wall_seconds: float) -> str:
    return "?" if not cpu_seconds else f"{cpu_seconds / max(wall_seconds, 1e-9):.2f}"


def _gb(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as fh:
        cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    return f"{os.cpu_count()} cores ({cpu}), {_gb(mem)} GB RAM, {platform.platform()}"


def markdown(label: str, command: str, result: dict) -> str:
    run, bare = result["pipeline"], result.get("bare_als")
    s = run["settings"]
    lines = [
        f"## Pipeline benchmark: `{label}`",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']}; load average at start {result['load_at_start']}",
        f"- command: `{command}`",
        f"- parameters: sources {', '.join(s['sources'])}, {s['search_trials']} search trials "
        f"each, {s['als_iterations']} ALS iterations per fit, top-k `{s['topk_method']}` (ann "
        f"from {s['ann_min_tracks']:,} tracks, nprobe {s['ann_nprobe']}), threads "
        f"{s['threads']}, validation users {s['validation_users']:,}",
        f"- split: {run['split']}",
        "",
        "CPU use: the process's user + system CPU time over the stage's wall time (2.0 = both "
        "cores busy throughout); load: the 1-minute load average at the stage's end.",
        "",
        "| stage | wall time | CPU use | load | peak memory (GB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, v in run["stages"].items():
        lines.append(
            f"| {stage} | {v['seconds']:.0f} s | {_use(v.get('cpu_seconds'), v['seconds'])} | "
            f"{v.get('load', float('nan')):.1f} | {_gb(v['peak_bytes'])} |"
        )
    cpu = sum(v.get("cpu_seconds", 0.0) for v in run["stages"].values())
    lines.append(
        f"| **whole pipeline** | **{run['wall_seconds']:.0f} s "
        f"({run['wall_seconds'] / 60:.1f} min)** | {_use(cpu, run['wall_seconds'])} | | "
        f"**{_gb(run['peak_bytes'])}** |"
    )
    if bare:
        ratio = run["wall_seconds"] / bare["fit_seconds"]
        lines += [
            f"| bare implicit ALS fit ({bare['factors']} factors, {bare['iterations']} "
            f"iterations, {bare['threads']} threads; {bare['users']:,} x {bare['tracks']:,}, "
            f"{bare['events']:,} events) | {bare['fit_seconds']:.0f} s "
            f"(+{bare['prepare_seconds']:.0f} s to read events and build the matrix) | | | "
            f"{_gb(bare['peak_bytes']) if bare.get('peak_bytes') else 'not measured'} |",
            "",
            f"**Ratio whole pipeline / bare ALS fit: {ratio:.2f}** "
            f"(everything but the fits: {run['wall_seconds'] - bare['fit_seconds']:.0f} s).",
        ]
    metrics = [m for m in run["metrics"] or [] if m["k"] == 10 and m.get("segment", "all") == "all"]
    if metrics:
        lines += [
            "",
            "| source | NDCG@10 | precision@10 | recall@10 | coverage@10 |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in metrics:
            lines.append(
                f"| {m['source']} | {m['ndcg']:.4f} | {m['precision']:.4f} | "
                f"{m['recall']:.4f} | {m['coverage']:.4f} |"
            )
    lines += [
        "",
        "Artefacts: "
        + ", ".join(
            f"{name} {v['rows']:,} rows / {v['bytes'] / 2**20:.0f} MB"
            if v["rows"] is not None
            else f"{name} {v['bytes'] / 2**20:.1f} MB"
            for name, v in run["artefacts"].items()
        ),
        "",
        "<details><summary>timed steps inside the stages</summary>",
        "",
        "```",
    ]
    lines += run["details"] + ["```", "", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    from musicrec.settings import Preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parquet-dir",
        type=Path,
        required=True,
        help="folder with items.parquet and events.parquet; artefacts go here",
    )
    parser.add_argument("--data-dir", type=Path, help="input folder (the three input files)")
    parser.add_argument(
        "--preset",
        choices=get_args(Preset),
        help="generate this preset into --data-dir and prepare it into "
        "--parquet-dir first, unless events.parquet is already there",
    )
    parser.add_argument("--label", default="run", help="name of the run in the report")
    parser.add_argument("--out", type=Path, help="markdown report (printed when missing)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a Settings field for this run, e.g. als_iterations=8",
    )
    parser.add_argument("--skip-bare", action="store_true", help="no bare ALS fit")
    parser.add_argument(
        "--bare-iterations",
        type=int,
        help="iterations of the bare fit (default: the run's als_iterations)",
    )
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.bare_only:
        print("BARE " + json.dumps(bare_als(args)), flush=True)
        return
    if args.preset and not (args.parquet_dir / "events.parquet").exists():
        prepare_preset(args)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    result["pipeline"] = run_pipeline(args)
    log.info(
        "pipeline: %.0f s, peak %s GB",
        result["pipeline"]["wall_seconds"],
        _gb(result["pipeline"]["peak_bytes"]),
    )
    if not args.skip_bare:
        child = subprocess.run(
            [sys.executable, __file__, "--bare-only", *sys.argv[1:]],
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(x for x in child.stdout.splitlines() if x.startswith("BARE "))
        result["bare_als"] = json.loads(line[5:])
        log.info("bare ALS: %s", result["bare_als"])
    command = "OPENBLAS_NUM_THREADS=1 python bench/pipeline_bench.py " + " ".join(sys.argv[1:])
    text = markdown(args.label, command, result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        log.info("wrote %s", args.out)
    print(text)


if __name__ == "__main__":
    main()
