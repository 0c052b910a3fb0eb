"""Helpers for the tests that run the real service: tiny artefacts built once per session with
the real command line, and a uvicorn subprocess that can be stopped, restarted and killed.

Not a test module (no ``test_`` prefix): the reliability and fuzz tests import it, so the
artefacts are built once for all of them (the module-level cache lives for the session).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STARTUP_TIMEOUT = 60.0
_TINY: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "musicrec", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"musicrec {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )


def tiny_artefacts() -> Path:
    """A folder of artefacts of the tiny preset made by generate, prepare and run (once per
    test session; ~8 s). Callers copy it before changing anything in it."""
    global _TINY
    if _TINY is None or not (_TINY / "manifest.json").exists():
        base = Path(tempfile.mkdtemp(prefix="musicrec_tiny_service_"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)  # gone with the session
        data, parquet = base / "data", base / "parquet"
        _cli("generate", "--preset", "tiny", "--out", str(data))
        _cli("prepare", "--data-dir", str(data), "--parquet-dir", str(parquet))
        _cli("run", "--data-dir", str(data), "--parquet-dir", str(parquet))
        _TINY = parquet
    return _TINY


SERVICE_FILES = (
    "items.parquet",
    "top_popular.parquet",
    "similar.parquet",
    "recommendations.parquet",
    "manifest.json",
)


def copy_artefacts(source: Path, target: Path) -> Path:
    """The files the service reads, copied (a private set a test may damage)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SERVICE_FILES:
        shutil.copy2(source / name, target / name)
    return target


class Service:
    """``uvicorn recommendation_service:app`` in its own process group (so SIGKILL reaches
    the workers too), on a free port of 127.0.0.1."""

    def __init__(
        self, parquet_dir: Path, history_db: Path, log_path: Path, workers: int = 1, **env: str
    ) -> None:
        self.parquet_dir = parquet_dir
        self.history_db = history_db
        self.log_path = log_path
        self.workers = workers
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "MUSICREC_PARQUET_DIR": str(self.parquet_dir),
            "MUSICREC_HISTORY_URL": f"sqlite:///{self.history_db}",
            "MUSICREC_RELOAD_POLL_SECONDS": "0",
            **self.env,
        }
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "uvicorn",
                    "recommendation_service:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, workers: int | None = None) -> None:
        """Until /health is 200 (from ``workers`` different worker pids when asked)."""
        pids: set[int] = set()
        want = workers or 1
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self.proc.returncode}:\n" + self.log()[-3000:]
                )
            try:
                with requests.Session() as session:  # new connections: may reach any worker
                    if session.get(self.url + "/health", timeout=2).status_code == 200:
                        pids.add(session.get(self.url + "/stats", timeout=2).json()["pid"])
                        if len(pids) >= want:
                            return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("the service did not become healthy in time:\n" + self.log()[-3000:])

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (graceful shutdown) to the whole group; the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL to the master and every worker at once: no clean-up runs."""
        return self._signal(signal.SIGKILL, 10)

    def _signal(self, sig: int, timeout: float) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        _wait_group_gone(proc.pid)
        return proc.returncode

    def run_until_exit(self, timeout: float = 60) -> tuple[int, str]:
        """Start and wait for the process to end (a service that refuses to start)."""
        self.start(wait=False)
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        finally:
            self._signal(signal.SIGKILL, 5)
        return code, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._signal(signal.SIGKILL, 10)


def _wait_group_gone(pgid: int, timeout: float = 10) -> None:
    """Workers of a killed master may outlive it by a moment; wait until none is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
