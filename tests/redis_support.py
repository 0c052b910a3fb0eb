"""A real ``redis-server`` for the tests: started on a free port with its data in a temporary
folder, durable settings (``appendonly yes``, ``appendfsync always``), killable with SIGKILL
and restartable on the same folder and port.

Not a test module: test_history.py, test_history_redis.py and bench/redis_latency.py import
it. A missing ``redis-server`` fails the test naming the Debian package (``./run_tests.sh``
installs it when it runs as root); it never skips.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = "redis-server"
MISSING = (
    "redis-server is not installed: install the Debian package redis-server "
    "(apt-get install redis-server; ./run_tests.sh does it when run as root)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process (its own session, so SIGKILL reaches only it)."""

    def __init__(self, folder: Path, fsync: str = "always", **config: str) -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise RuntimeError(MISSING)
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.config = config
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.fsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        for name, value in self.config.items():
            args += [f"--{name.replace('_', '-')}", value]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 20
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.proc.returncode}: " + self.log()[-2000:]
                    )
                try:
                    if client.ping():
                        return
                except (redis.ResponseError, redis.AuthenticationError):  # answers: NOAUTH
                    return
                except redis.RedisError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        self.kill()  # not left running behind a failed test
        raise RuntimeError("redis-server did not answer in time: " + self.log()[-2000:])

    def kill(self) -> int | None:
        """SIGKILL: no shutdown, no final AOF rewrite."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        return proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
