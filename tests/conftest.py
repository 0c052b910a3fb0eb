"""Shared fixtures: generated data sets, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from musicrec.generate import generate
from musicrec.prepare import prepare_files


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three input files of the tiny preset (seed 7)."""
    out = tmp_path_factory.mktemp("tiny_data")
    generate("tiny", out, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parquet folder holding items.parquet and events.parquet of the tiny preset."""
    out = tmp_path_factory.mktemp("tiny_parquet")
    prepare_files(tiny_data, out)
    return out
