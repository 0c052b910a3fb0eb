"""Shared fixtures: generated data sets, made once per test session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server (server mode: real HTTP) on a free localhost port for the module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
