"""Command line: ``musicrec <command>`` (or ``python -m musicrec``); every command has ``--help``.

Every setting of :class:`musicrec.settings.Settings` can be given on any command as
``--set name=value``; options and ``--set`` override ``MUSICREC_`` environment variables, which
override a ``.env`` file, which overrides the defaults. ``musicrec config`` shows every setting,
its value and which of these it came from.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr, ValidationError
from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

from musicrec import __version__
from musicrec.settings import Preset, Settings
from musicrec.stages import STAGE_HELP

log = logging.getLogger("musicrec")

# the options that name a setting directly; every other setting goes through --set
FLAG_SETTINGS = ("data_dir", "parquet_dir", "seed", "preset", "engine")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _parse_set(text: str) -> tuple[str, str]:
    """``name=value`` of ``--set``: the name must be a field of Settings (checked here so that
    a typo is an error, not an ignored extra)."""
    name, sep, value = text.partition("=")
    name = name.strip().lower().removeprefix("musicrec_")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    if name not in Settings.model_fields:
        close = difflib.get_close_matches(name, Settings.model_fields, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise argparse.ArgumentTypeError(
            f"unknown setting {name!r}{hint} (`musicrec config` lists them all)"
        )
    return name, value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="input folder (MUSICREC_DATA_DIR)")
    parser.add_argument("--parquet-dir", type=Path, help="artefacts folder (MUSICREC_PARQUET_DIR)")
    parser.add_argument(
        "--set",
        dest="set",
        action="append",
        type=_parse_set,
        default=[],
        metavar="NAME=VALUE",
        help="override any setting (repeatable); lists as JSON, e.g. sources='[\"als\"]', "
        "none/null for an unset optional value; `musicrec config` lists every setting",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _engine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=["local", "spark"],
        help="local (this process) or spark: "
        "preparation, split, top popular and ALS on a Spark session, the ALS lists served "
        "(MUSICREC_ENGINE; MUSICREC_SPARK_MASTER picks the cluster, default local[*])",
    )


def _allows_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, UnionType) and NoneType in get_args(annotation)


def _set_value(name: str, text: str) -> Any:
    """A ``--set`` value as the environment source would read it: JSON for lists, ``none`` /
    ``null`` for None where the field allows it, the string otherwise (pydantic converts)."""
    field = Settings.model_fields[name]
    if text.strip().lower() in ("none", "null") and _allows_none(field.annotation):
        return None
    source = EnvSettingsSource(Settings)
    try:
        return source.prepare_field_value(name, field, text, source.field_is_complex(field))
    except ValueError as exc:
        raise CommandError(f"--set {name}={text}: not valid JSON for a list ({exc})") from exc


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line: the named options, then ``--set`` (later wins)."""
    given = {
        key: getattr(args, key) for key in FLAG_SETTINGS if getattr(args, key, None) is not None
    }
    for name, text in getattr(args, "set", []):
        given[name] = _set_value(name, text)
    return given


def _validation_message(exc: ValidationError, given: dict[str, Any]) -> str:
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        origin = "--set/option" if name in given else f"MUSICREC_{name.upper()} or .env"
        parts.append(f"setting {name} = {error.get('input')!r} (from {origin}): {error['msg']}")
    return "invalid " + "; ".join(parts)


def _settings(args: argparse.Namespace) -> Settings:
    given = overrides(args)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise CommandError(_validation_message(exc, given)) from None


def setting_sources(given: dict[str, Any]) -> dict[str, str]:
    """Where each setting's value comes from: ``flag`` (option or ``--set``), ``environment``
    (``MUSICREC_*``), ``.env`` or ``default`` — the precedence pydantic-settings applies."""
    environment = EnvSettingsSource(Settings)()
    dotenv = DotEnvSettingsSource(Settings)()
    sources = {}
    for name in Settings.model_fields:
        if name in given:
            sources[name] = "flag"
        elif name in environment:
            sources[name] = "environment"
        elif name in dotenv:
            sources[name] = ".env"
        else:
            sources[name] = "default"
    return sources


def _shown(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


# --- commands ----------------------------------------------------------------------------------


SETTINGS_DOC_HEADER = """# Settings

Every setting of `musicrec.settings.Settings`, the one settings object of the pipeline, the
command line, the notebook and the service. Give a setting as an environment variable
(`MUSICREC_<NAME>`), in a `.env` file in the folder you run from, or on any command as
`--set name=value` (lists as JSON, `none` for an unset optional value); the command line wins
over the environment, which wins over `.env`. `musicrec config` shows the value in force and
where it came from.

Generated from `musicrec/settings.py` by `musicrec config --doc > docs/SETTINGS.md`;
`tests/test_docs.py` fails when this file is stale."""


def _type_name(annotation: Any) -> str:
    """A short readable type: ``int | None``, ``one of tiny, small``, ``list of str``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if annotation is NoneType:
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return ", ".join(
        f"{words[key]} {getattr(m, key)}"
        for m in metadata
        for key in words
        if getattr(m, key, None) is not None
    )


def _sections() -> dict[str, str]:
    """Each field's section, from the ``# --- name ---`` comments of settings.py."""
    import inspect
    import re

    section, found = "", {}
    for line in inspect.getsource(Settings).splitlines():
        heading = re.match(r"\s*# --- (.+?) -+$", line)
        if heading:
            section = heading.group(1)
        field = re.match(r"    (\w+):", line)
        if field and field.group(1) in Settings.model_fields:
            found[field.group(1)] = section
    return found


def settings_markdown() -> str:
    """docs/SETTINGS.md: every setting with its variable, type, default and description."""
    sections = _sections()
    parts, current = [SETTINGS_DOC_HEADER], None
    for name, field in Settings.model_fields.items():
        section = sections.get(name, "other")
        if section != current:
            current = section
            parts.append(
                f"\n## {section[:1].upper()}{section[1:]}\n\n"
                "| setting | type | default | what |\n|---|---|---|---|"
            )
        default = "unset" if field.default is None else _shown(field.default)
        kind = _type_name(field.annotation)
        if _bounds(field.metadata):
            kind += f" ({_bounds(field.metadata)})"
        text = (field.description or "").replace("|", "\\|")
        kind = kind.replace("|", "\\|")
        parts.append(f"| `{name}` (`MUSICREC_{name.upper()}`) | {kind} | `{default}` | {text} |")
    return "\n".join(parts) + "\n"


def cmd_config(args: argparse.Namespace) -> None:
    """Print every setting, its value and where it came from (secrets masked)."""
    if args.doc:
        print(settings_markdown(), end="")
        return
    settings = _settings(args)
    sources = setting_sources(overrides(args))
    rows = [
        (name, _shown(getattr(settings, name)), sources[name]) for name in Settings.model_fields
    ]
    if args.json:
        print(json.dumps([{"name": n, "value": v, "source": s} for n, v, s in rows], indent=1))
        return
    width = max(len(name) for name, _, _ in rows)
    value_width = min(40, max(len(value) for _, value, _ in rows))
    print(f"{'setting':<{width}}  {'value':<{value_width}}  source")
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {source}")


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
    """Versioned runs travel under ``runs/<run_id>/`` with the ``runs/current`` pointer moved
    last; a folder (or bucket) without kept runs uses the flat layout of before."""
    from musicrec import runs
    from musicrec.s3 import pull_artefacts, push_artefacts

    settings = _settings(args)
    if args.action == "push":
        if args.run is None and runs.current_run(settings.parquet_dir) is None:
            log.warning(
                "%s has no kept run (runs/current): pushing the flat layout", settings.parquet_dir
            )
            keys = push_artefacts(settings)
        else:
            keys = runs.push_run(settings, args.run)
    elif args.run is None and runs.remote_current(settings) is None:
        log.warning("the bucket has no runs/current: pulling the flat layout")
        keys = pull_artefacts(settings)
    else:
        keys = runs.pull_run(settings, args.run)
    for key in keys:
        print(key)


def cmd_runs(args: argparse.Namespace) -> None:
    """``runs list``, ``runs use RUN_ID`` (rollback), ``runs prune --keep N``."""
    from musicrec import runs

    folder = _settings(args).parquet_dir
    if args.action == "list":
        kept = runs.list_runs(folder)
        if not kept:
            print(f"{folder}: no kept runs")
        for run in kept:
            ndcg = "" if run["ndcg@10"] is None else f"NDCG@10 {run['ndcg@10']:.4f}"
            commit = (run["git_commit"] or "")[:10]
            print(
                f"{'*' if run['current'] else ' '} {run['run_id']}  {run['built_at'] or ''}  "
                f"{run['winner'] or ''}  {ndcg}  {commit}".rstrip()
            )
    elif args.action == "use":
        if not args.run_id:
            raise CommandError("runs use needs a RUN_ID (see `musicrec runs list`)")
        manifest = runs.use_run(folder, args.run_id)
        print(
            f"serving run {manifest['run_id']} (built {manifest.get('built_at')}) from "
            f"{folder}; a running service switches at its next manifest poll"
        )
    else:
        for run_id in runs.prune(folder, args.keep):
            print(f"removed {run_id}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from musicrec.prepare import prepare_files

    settings = _settings(args)
    if settings.engine == "spark":
        from musicrec.spark_engine import prepare_spark, spark_session

        summary = prepare_spark(
            spark_session(settings), settings.data_dir, settings.parquet_dir, settings
        )
    else:
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
    settings = _settings(args)
    if settings.engine == "spark":
        from musicrec.spark_engine import run_spark

        run_spark(settings)
        return
    from musicrec.pipeline import run_all

    run_all(settings)


def cmd_publish(args: argparse.Namespace) -> None:
    from musicrec.served import publish

    folder = _settings(args).parquet_dir
    manifest = publish(folder)
    print(
        f"wrote the served (memory-mapped) form of {folder} (run {manifest.get('run_id')}) "
        f"and recorded it in its manifest"
    )


def cmd_replay(args: argparse.Namespace) -> None:
    from musicrec.online import replay

    table = replay(_settings(args), users=args.users, bootstrap=args.bootstrap).round(4)
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in row) + " |")


EXAMPLES = {
    "config": "musicrec config --set als_factors=128\n  MUSICREC_SEED=7 musicrec config --json",
    "generate": "musicrec generate --preset tiny --out /tmp/tiny --seed 3",
    "download": "musicrec download --out data",
    "s3": "musicrec s3 push --set s3_bucket=my-bucket --parquet-dir parquet",
    "runs": "musicrec runs list --parquet-dir parquet\n  musicrec runs use 20261128T154453-194b90"
    "\n  musicrec runs prune --keep 3",
    "prepare": "musicrec prepare --data-dir data --parquet-dir parquet",
    "check-data": "musicrec check-data --data-dir data",
    "run": "musicrec run --set als_factors=128 --set search_trials=2",
    "publish": "musicrec publish --parquet-dir parquet",
    "replay": "musicrec replay --parquet-dir parquet --users 3000",
    "split": "musicrec split --set test_start=2022-12-01",
    "search": "musicrec search --set search_trials=2 --set search_seconds=600",
    "rank": "musicrec rank --set ranker_iterations=200",
    "evaluate": "musicrec evaluate --set bootstrap=200 --set report_users=null",
    "serve": "musicrec serve --set n_recommendations=50",
}


def _add(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand with the common options and an example at the end of its --help."""
    return sub.add_parser(
        name,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def build_parser(prog: str = "python -m musicrec") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Music recommendations: data, offline pipeline and artefacts. Any setting "
        "can be given on any command with --set name=value; `config` lists them all.",
        epilog="example:\n  musicrec generate --preset tiny && musicrec prepare && musicrec run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"musicrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(
        sub,
        "config",
        help="every setting, its value and where it came from",
        description="Print every setting with its value and source: flag (an option or "
        "--set), environment (MUSICREC_<NAME>), .env (in the current folder) or default. "
        "Secrets are masked.",
    )
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.add_argument(
        "--doc",
        action="store_true",
        help="the settings reference (docs/SETTINGS.md): defaults, not values in force",
    )
    _common(p)
    p.set_defaults(func=cmd_config)

    p = _add(
        sub,
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

    p = _add(sub, "download", help="download the real data set from its public bucket")
    p.add_argument("--out", type=Path, help="output folder (default: the data folder)")
    p.add_argument("--force", action="store_true", help="download even files already complete")
    _common(p)
    p.set_defaults(func=cmd_download)

    p = _add(sub, "s3", help="push artefacts to / pull them from your own bucket")
    p.add_argument("action", choices=["push", "pull"])
    p.add_argument(
        "--run", metavar="RUN_ID", help="push / pull this kept run (default: the current one)"
    )
    _common(p)
    p.set_defaults(func=cmd_s3)

    p = _add(
        sub,
        "runs",
        help="kept runs: list, use (rollback), prune",
        description="Every successful run is kept in <parquet-dir>/runs/<run_id>/ (hard "
        "links, no extra disk) and runs/current points at the one served. `list` shows "
        "them (* = current), `use RUN_ID` serves a kept run again (its files checked, "
        "then linked in with manifest.json last: a running service switches by itself), "
        "`prune --keep N` deletes all but the N newest (never the current one).",
    )
    p.add_argument("action", choices=["list", "use", "prune"])
    p.add_argument("run_id", nargs="?", help="the run to serve (runs use)")
    p.add_argument("--keep", type=int, default=5, help="runs kept by prune (default 5)")
    _common(p)
    p.set_defaults(func=cmd_runs)

    p = _add(sub, "prepare", help="validate the input files, write items and events")
    _engine(p)
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = _add(sub, "check-data", help="shape figures of a data folder beside the real data's")
    _common(p)
    p.set_defaults(func=cmd_check_data)

    p = _add(sub, "run", help="every pipeline stage, from prepared data to metrics")
    _engine(p)
    _common(p)
    p.set_defaults(func=cmd_run)

    p = _add(
        sub,
        "publish",
        help="write the served (memory-mapped) form of a folder's artefacts",
        description="Read the four tables the service serves (items, top_popular, similar, "
        "recommendations) with every check and write them as .npy / Arrow files the service "
        "workers map and share, recording sizes and CRC-32 checksums in manifest.json. "
        "`run` does this itself; use it for a folder made before, or after rerunning a stage.",
    )
    _common(p)
    p.set_defaults(func=cmd_publish)

    p = _add(
        sub,
        "replay",
        help="NDCG@10 of each online method and artist cap, test period replayed",
        description="Fit ALS and item-kNN on the events before the test period, post the first "
        "half of each sampled test user's test events as online history and score the rest: "
        "NDCG@10 with 95 %% bootstrap intervals (also paired against no cap and against the "
        "'similar' method), artist diversity and top-artist share of each online method "
        "(similar, foldin, blend; offline = no online events) for artist caps 0-3. Reads the "
        "prepared events of --parquet-dir, writes nothing.",
    )
    p.add_argument("--users", type=int, default=3000, help="test users sampled (default 3000)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    _common(p)
    p.set_defaults(func=cmd_replay)

    for stage, text in STAGE_HELP.items():
        p = _add(sub, stage, help=text)
        _common(p)
        p.set_defaults(func=_stage_command(stage))
    return parser


def _missing_module_message(exc: ModuleNotFoundError, command: str) -> str:
    """Name the extra that brings a missing module (from the installed metadata when musicrec
    is installed; a source checkout is told to install requirements.txt)."""
    module = (exc.name or "").split(".")[0]
    try:
        requires = importlib.metadata.requires("musicrec") or []
        providers = importlib.metadata.packages_distributions().get(module, [module])
    except importlib.metadata.PackageNotFoundError:
        requires, providers = [], [module]
    wanted = {p.lower().replace("_", "-") for p in providers}
    for line in requires:
        name = line.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()
        if name in wanted and "extra ==" in line:
            extra = line.split("extra ==")[1].strip().strip("'\"")
            return f"`{command}` needs the module {module!r}: pip install 'musicrec[{extra}]'"
    return f"`{command}` needs the module {module!r}: pip install -r requirements.txt"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``musicrec`` and ``python -m musicrec``; returns the exit code."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "musicrec" if invoked == "musicrec" else "python -m musicrec"
    args = build_parser(prog).parse_args(argv)
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
    except BrokenPipeError:  # `musicrec config | head`: the reader has gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "musicrec":
            raise
        print(f"error: {_missing_module_message(exc, args.command)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command != "config":
        log.info("%s done in %.1f s", args.command, time.perf_counter() - started)
    return 0
