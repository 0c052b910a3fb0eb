"""The command line: help on every command, check-data output, generate through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from musicrec.checkdata import check_data, format_report
from musicrec.cli import build_parser, main
from musicrec.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["generate", "download", "s3", "prepare", "check-data", "run", *STAGES]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    assert "usage: python -m musicrec " + command in capsys.readouterr().out


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
