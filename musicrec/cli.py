"""Command line: ``python -m musicrec <command>``; every command has ``--help``.

Options given on the command line override ``MUSICREC_`` environment settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

from musicrec.settings import Preset, Settings

log = logging.getLogger("musicrec")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="input folder (MUSICREC_DATA_DIR)")
    parser.add_argument("--parquet-dir", type=Path, help="artefacts folder (MUSICREC_PARQUET_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key)
        for key in ("data_dir", "parquet_dir", "seed", "preset")
        if getattr(args, key, None) is not None
    }
    return Settings(**overrides)


# --- commands ----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    from musicrec.generate import generate

    settings = _settings(args)
    out = args.out or settings.data_dir
    stats = generate(settings.preset, out, seed=settings.seed)
    print(
        f"wrote {out}: {stats['users']:,} users, {stats['tracks']:,} tracks, "
        f"{stats['events']:,} events"
    )


def cmd_download(args: argparse.Namespace) -> None:
    from musicrec.s3 import download_real_data

    settings = _settings(args)
    out = args.out or settings.data_dir
    for path in download_real_data(settings, out, force=args.force):
        print(path)


def cmd_s3(args: argparse.Namespace) -> None:
    from musicrec.s3 import pull_artefacts, push_artefacts

    settings = _settings(args)
    action = push_artefacts if args.action == "push" else pull_artefacts
    for key in action(settings):
        print(key)


def cmd_prepare(args: argparse.Namespace) -> None:
    from musicrec.prepare import prepare_files

    settings = _settings(args)
    summary = prepare_files(settings.data_dir, settings.parquet_dir, settings)
    print(
        f"wrote {settings.parquet_dir}: {summary['tracks']:,} items, "
        f"{summary['events']:,} events of {summary['users']:,} users"
    )


def cmd_check_data(args: argparse.Namespace) -> None:
    from musicrec.checkdata import check_data, format_report

    settings = _settings(args)
    print(format_report(check_data(settings.data_dir)))


def _stage_command(stage: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from musicrec.pipeline import run_stage

        run_stage(stage, _settings(args))

    return run


def cmd_run(args: argparse.Namespace) -> None:
    from musicrec.pipeline import run_all

    run_all(_settings(args))


def cmd_publish(args: argparse.Namespace) -> None:
    from musicrec.served import publish

    folder = _settings(args).parquet_dir
    manifest = publish(folder)
    print(f"wrote the served (memory-mapped) form of {folder} (run {manifest.get('run_id')}) "
          f"and recorded it in its manifest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m musicrec",
        description="Music recommendations: data, offline pipeline and artefacts.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="write a synthetic data set with the real schema and shape",
        description="Write tracks, catalog_names and interactions parquet files with the real "
        "data's exact schema. Presets tiny, small and full are sizes of the real log's shape "
        "(one year, day dates, strong artist/genre loyalty); the profiles are small logs of "
        "other shapes, each a few seconds to generate: multi_year (2017-2022, month dates, "
        "users come and go, tastes drift), small_dense (2 k tracks, 3 k users, 7 months, "
        "many listens per user), weak_loyalty (one year, popularity and fresh releases "
        "dominate, co-listening clusters instead of artist/genre loyalty), repeat_listens "
        "(one year, 30 % of the rows listen again to a heard track).",
    )
    p.add_argument(
        "--preset", choices=get_args(Preset), help="size or profile, see above (MUSICREC_PRESET)"
    )
    p.add_argument("--out", type=Path, help="output folder (default: the data folder)")
    p.add_argument("--seed", type=int, help="random seed (MUSICREC_SEED)")
    _common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("download", help="download the real data set from its public bucket")
    p.add_argument("--out", type=Path, help="output folder (default: the data folder)")
    p.add_argument("--force", action="store_true", help="download even files already complete")
    _common(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("s3", help="push artefacts to / pull them from your own bucket")
    p.add_argument("action", choices=["push", "pull"])
    _common(p)
    p.set_defaults(func=cmd_s3)

    p = sub.add_parser("prepare", help="validate the input files, write items and events")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("check-data", help="shape figures of a data folder beside the real data's")
    _common(p)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("run", help="every pipeline stage, from prepared data to metrics")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "publish", help="write the served (memory-mapped) form of a folder's artefacts",
        description="Read the four tables the service serves (items, top_popular, similar, "
        "recommendations) with every check and write them as .npy / Arrow files the service "
        "workers map and share, recording sizes and CRC-32 checksums in manifest.json. "
        "`run` does this itself; use it for a folder made before, or after rerunning a stage.",
    )
    _common(p)
    p.set_defaults(func=cmd_publish)

    from musicrec.pipeline import STAGE_HELP

    for stage, text in STAGE_HELP.items():
        p = sub.add_parser(stage, help=text)
        _common(p)
        p.set_defaults(func=_stage_command(stage))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    started = time.perf_counter()
    try:
        args.func(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("%s done in %.1f s", args.command, time.perf_counter() - started)
    return 0
