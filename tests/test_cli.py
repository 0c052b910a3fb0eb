"""The command line: help (with an example) on every command, --version, config and --set
reaching every setting, check-data output, generate through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import musicrec
from musicrec.checkdata import check_data, format_report
from musicrec.cli import build_parser, main
from musicrec.settings import Settings
from musicrec.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "config",
    "generate",
    "download",
    "s3",
    "prepare",
    "check-data",
    "run",
    "publish",
    "replay",
    "runs",
    *STAGES,
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m musicrec " + command in out
    assert "--set NAME=VALUE" in out
    example = out.split("example:\n", 1)[1]
    assert example.strip().startswith("musicrec ")
    # the example parses: every --set in it names a real setting with a valid value
    line = example.strip().splitlines()[0].removeprefix("musicrec ")
    args = build_parser().parse_args(line.split())
    assert args.command == command


def test_every_command_is_in_the_parser() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"musicrec {musicrec.__version__}"


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert missing == [], f"settings without a description: {missing}"


def _config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert main(["config", "--json", *argv]) == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)}


def test_config_shows_every_setting_value_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("MUSICREC_"):
            monkeypatch.delenv(name)
    (tmp_path / ".env").write_text("MUSICREC_SEED=5\nMUSICREC_THREADS=7\nMUSICREC_PORT=9000\n")
    monkeypatch.setenv("MUSICREC_THREADS", "3")  # the environment wins over .env
    monkeypatch.setenv("MUSICREC_ADMIN_TOKEN", "s3cret")
    rows = _config(
        [
            "--set",
            "port=9100",
            "--data-dir",
            "/tmp/in",
            "--set",
            "als_factors=128",
            "--set",
            'sources=["als", "ease"]',
            "--set",
            "report_users=null",
        ],
        capsys,
    )
    assert list(rows) == list(Settings.model_fields)
    expected = {
        "seed": ("5", ".env"),
        "threads": ("3", "environment"),
        "port": ("9100", "flag"),  # the flag wins over .env
        "data_dir": ("/tmp/in", "flag"),
        "als_factors": ("128", "flag"),
        "sources": ('["als", "ease"]', "flag"),
        "report_users": ("None", "flag"),
        "admin_token": ("**********", "environment"),
        "n_candidates": (str(Settings.model_fields["n_candidates"].default), "default"),
    }
    for name, (value, source) in expected.items():
        assert (rows[name]["value"], rows[name]["source"]) == (value, source), name
    # the table form lists every setting too, the secret masked
    assert main(["config"]) == 0
    table = capsys.readouterr().out
    assert "s3cret" not in table
    for name in Settings.model_fields:
        assert f"\n{name} " in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "als_factor=3"], "unknown setting 'als_factor'; did you mean als_factors?"),
        (["--set", "no_such_thing=3"], "unknown setting 'no_such_thing'"),
        (["--set", "als_factors"], "expected name=value"),
    ],
)
def test_set_refuses_an_unknown_name(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", *argv])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_set_refuses_an_invalid_value_naming_the_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["config", "--set", "als_factors=many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid setting als_factors = 'many' (from --set")
    assert "valid integer" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("MUSICREC_PORT", "0")
    assert main(["config"]) == 2
    assert "setting port = '0' (from MUSICREC_PORT or .env)" in capsys.readouterr().err


def test_null_in_the_environment_unsets_an_optional_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``MUSICREC_X=null`` is None where the setting allows it, as ``--set x=null`` is; a
    setting that needs a value refuses it, naming the setting."""
    monkeypatch.setenv("MUSICREC_REPORT_USERS", "null")
    assert Settings().report_users is None
    monkeypatch.setenv("MUSICREC_SEED", "null")
    assert main(["config"]) == 2
    assert "setting seed = None (from MUSICREC_SEED or .env)" in capsys.readouterr().err


def test_set_reaches_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``generate`` with the preset and seed given only through --set."""
    assert (
        main(["generate", "--set", "preset=tiny", "--set", "seed=3", "--out", str(tmp_path)]) == 0
    )
    assert "1,200 users, 3,000 tracks" in capsys.readouterr().out


def test_generate_through_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "musicrec",
            "generate",
            "--preset",
            "tiny",
            "--seed",
            "3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1,200 users, 3,000 tracks" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "catalog_names.parquet",
        "interactions.parquet",
        "tracks.parquet",
    ]


def test_check_data_counts(tiny_data: Path) -> None:
    import pyarrow.parquet as pq

    events = pq.read_table(tiny_data / "interactions.parquet").to_pandas()
    figures = check_data(tiny_data)
    assert figures["events"] == len(events)
    assert figures["users"] == events["user_id"].nunique()
    assert figures["events per user, max"] == events.groupby("user_id").size().max()
    assert figures["events per user, median"] == events.groupby("user_id").size().median()
    assert sum(figures["months"].values()) == len(events)
    report = format_report(figures)
    assert "users" in report and "1,373,221" in report  # the real figure beside ours


def test_check_data_missing_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-data", "--data-dir", str(tmp_path / "none")]) == 2
    assert "file not found" in capsys.readouterr().err
