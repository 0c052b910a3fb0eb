"""Recommendation quality across data profiles and seeds: the served list beside top popular,
plain ALS, every source and the ranker, NDCG@10 on each data set's own test period with 95 %
bootstrap intervals, plus what validation chose.

    OPENBLAS_NUM_THREADS=1 python bench/quality.py --presets small --seeds 42 7 1 \\
        --out bench/results/quality_small.md [--set search_trials=4 ...]

Each (preset, seed) is generated, prepared and run through ``pipeline.run_all`` in a folder
under ``--work`` exactly as ``python -m musicrec run`` does; the table is read from the run's
metrics.parquet and manifest. Generator profiles are not reality: they check that choices
made by validation hold on shapes unlike the default preset (years of month-granular dates,
a small dense catalogue, weak artist loyalty, repeated listens).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.quality")


def run_one(preset: str, seed: int, work: Path, overrides: dict[str, str]) -> dict:
    """Generate, prepare and run one data set; the headline figures of its report."""
    from musicrec import io, pipeline
    from musicrec.generate import generate
    from musicrec.prepare import prepare_files
    from musicrec.settings import Settings

    root = work / f"{preset}-{seed}"
    if not (root / "data" / io.INTERACTIONS).exists():
        generate(preset, root / "data", seed=seed)
    settings = Settings(
        data_dir=root / "data", parquet_dir=root / "parquet", seed=seed, **overrides
    )
    prepare_files(settings.data_dir, settings.parquet_dir, settings)
    started = time.perf_counter()
    manifest = pipeline.run_all(settings)
    seconds = time.perf_counter() - started
    metrics = pd.read_parquet(settings.parquet_dir / io.METRICS)
    at10 = metrics[(metrics["k"] == 10) & (metrics["segment"] == "all")].set_index("source")
    recall = pd.read_parquet(settings.parquet_dir / io.CANDIDATE_RECALL).set_index("source")
    plain = "als_plain" if "als_plain" in at10.index else "als"
    row = {
        "preset": preset,
        "seed": seed,
        "winner": manifest["selection"]["winner"],
        "minutes": round(seconds / 60, 1),
        "union_recall": recall.loc["union", "recall"],
        "ceiling": recall.loc["union", "ceiling_ndcg"],
    }
    for source in at10.index:
        row[source] = at10.loc[source, "ndcg"]
        row[f"{source}_low"] = at10.loc[source, "ndcg_low"]
        row[f"{source}_high"] = at10.loc[source, "ndcg_high"]
    row["served/popular"] = row["served"] / row["popular"]
    row["served/plain_als"] = row["served"] / row[plain]
    row["chosen"] = {name: choice["params"] for name, choice in manifest["search"].items()}
    return row


def _interval(row: dict, source: str) -> str:
    if source not in row:
        return "–"
    return f"{row[source]:.4f} [{row[source + '_low']:.4f}, {row[source + '_high']:.4f}]"


def report(rows: list[dict], overrides: dict[str, str]) -> str:
    load = os.getloadavg()
    lines = [
        f"# Recommendation quality by profile ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {os.cpu_count()} cores; load average at the end {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f}. Overrides: {overrides or 'none'}.",
        "NDCG@10 on each data set's test period (users with earlier history), 95 % bootstrap "
        "interval over users in brackets. `served` is what recommendations.parquet holds (the "
        "validation winner); plain ALS is implicit's defaults (100 factors, reg 0.01, 0/1 "
        "matrix).",
        "",
        "| preset | seed | served (winner) | top popular | plain ALS | ranker | served / popular "
        "| served / plain ALS | union recall | ceiling | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain = "als_plain" if "als_plain" in r else "als"
        lines.append(
            f"| {r['preset']} | {r['seed']} | {_interval(r, 'served')} ({r['winner']}) | "
            f"{_interval(r, 'popular')} | {_interval(r, plain)} | {_interval(r, 'ranker')} | "
            f"{r['served/popular']:.2f}× | {r['served/plain_als']:.2f}× | "
            f"{r['union_recall']:.1%} | {r['ceiling']:.4f} | {r['minutes']} |"
        )
    lines += [
        "",
        "Each source alone (NDCG@10 on the test period):",
        "",
        "| preset | seed | popular | als | item_knn | ease | artist |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['seed']} | "
            + " | ".join(
                f"{r[s]:.4f}" if s in r else "–"
                for s in ("popular", "als", "item_knn", "ease", "artist")
            )
            + " |"
        )
    lines += ["", "What validation chose:", ""]
    for r in rows:
        lines.append(
            f"- {r['preset']} seed {r['seed']}: "
            + "; ".join(f"{name} {params}" for name, params in r["chosen"].items())
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--work", type=Path, default=Path("/tmp/musicrec-quality"))
    parser.add_argument("--out", type=Path, help="markdown file for the table")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="settings overrides, e.g. search_trials=4",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = dict(item.split("=", 1) for item in args.set)
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            rows.append(run_one(preset, seed, args.work, overrides))
            text = report(rows, overrides)
            if args.out:
                args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
