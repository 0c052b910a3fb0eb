"""What an operator watches: Prometheus metrics shared by all uvicorn workers, a request id on
every request, and the log format (plain text or one JSON object per line).

Metrics use ``prometheus_client`` in multiprocess mode: each worker writes its counters into
memory-mapped files of one folder, and ``GET /metrics`` (answered by any worker) adds up the
files of every worker, so the counts are the server's, not one worker's. The folder is made
and cleaned by the service itself (``metrics_directory``): one folder per server, named by
the uvicorn master's pid and start time, under ``settings.metrics_dir``; folders of servers
that are gone are removed at the next start. ``PROMETHEUS_MULTIPROC_DIR``, when the operator
sets it, is used as it is and never emptied (prometheus_client's own convention: empty it
before each start).

The request id comes from the ``X-Request-ID`` header when it is plain visible ASCII of at most
128 characters, else it is made here (a random per-process prefix and a counter); it is sent
back in the ``X-Request-ID`` response header and is in every log line written while the
request runs (``request_id`` of the JSON format).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str | None] = ContextVar("musicrec_request_id", default=None)
REQUEST_ID_HEADER = b"x-request-id"
PLAIN_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
UNMATCHED = "unmatched"  # route label of a path no route matched (no ids in labels)
# seconds; a plain list is served in ~0.1-1 ms, the history write waits for an fsync
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
FOLDER_PREFIX = "server-"

_ids = itertools.count(1)
_id_prefix = secrets.token_hex(4)
_apps = itertools.count(1)
_dirs_set_here: set[str] = set()  # PROMETHEUS_MULTIPROC_DIR values this module set


def new_request_id() -> str:
    """A request id unique across workers and restarts: random per process, then a counter."""
    return f"{_id_prefix}-{next(_ids):x}"


# --- logging ------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, or None) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id,
    and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", REQUEST_ID.get()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


LOGGERS_WITH_HANDLERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


def configure_logging(log_format: str, text_format: str) -> None:
    """Give the root logger a handler when it has none and, for ``json``, put the JSON
    formatter and the request-id filter on every handler of the root and uvicorn loggers (so
    uvicorn's own lines are JSON too). ``text`` keeps ``text_format`` and uvicorn's formats."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=text_format)
    if log_format != "json":
        return
    formatter = JsonFormatter()
    for name in LOGGERS_WITH_HANDLERS:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())


# --- the metrics folder -------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), None when it is gone:
    with the pid it names one process even when pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _server_pid() -> int:
    """The pid shared by the workers of one server: the uvicorn master that spawned this
    worker, or this process when it serves alone."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getpid()


def metrics_directory(base: Path | None) -> tuple[Path, bool]:
    """The folder of this server's metric files and whether the service owns it (may remove
    it). ``PROMETHEUS_MULTIPROC_DIR`` set by the operator wins and is not owned. Otherwise:
    ``base`` (default ``<tmp>/musicrec-metrics``, made private, 0700) gets one folder per
    server, ``server-<pid>-<start time>`` of the uvicorn master (or of this process when it
    runs alone); under a lock, folders of servers no longer running are removed first."""
    given = os.environ.get(ENV_DIR)
    if given and given not in _dirs_set_here:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        return folder, False
    base = Path(base) if base is not None else Path(tempfile.gettempdir()) / "musicrec-metrics"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if base.is_symlink() or base.stat().st_uid != os.getuid():
        raise PermissionError(f"{base}: not a folder of this user; set metrics_dir")
    pid = _server_pid()
    folder = base / f"{FOLDER_PREFIX}{pid}-{_start_time(pid)}"
    if pid == os.getpid():  # alone: one folder per app (tests make several in a process)
        folder = folder.with_name(f"{folder.name}-{next(_apps)}")
    with open(base / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in base.glob(FOLDER_PREFIX + "*"):
            if old == folder:
                continue
            other, started = ([*old.name[len(FOLDER_PREFIX) :].split("-"), ""])[:2]
            if not other.isdigit() or _start_time(int(other)) != started:
                shutil.rmtree(old, ignore_errors=True)  # its server is gone
        folder.mkdir(mode=0o700, exist_ok=True)
    return folder, True


# --- the metrics --------------------------------------------------------------------------


class ServiceMetrics:
    """The service's Prometheus metrics, written to the multiprocess folder ``directory``.

    Created in each worker's lifespan. prometheus_client chooses its value class when it is
    imported, from ``PROMETHEUS_MULTIPROC_DIR``; the variable is set here and the class is
    made anew, so metrics of an app made after another in the same process (tests) go to this
    app's folder.

    What every request counts (route, status, latency; lists served) is added to plain Python
    counters first — a dict lookup and two list increments, well under a microsecond, where a
    write through prometheus_client's memory-mapped values costs ~1 µs per value and a
    histogram observation ~3 µs — and written to the files by ``flush``: every
    ``flush_seconds`` from a thread, and before this worker renders /metrics. Other workers'
    counts therefore reach /metrics within ``flush_seconds``. Rare events (history writes,
    reloads, the run id) are written at once."""

    def __init__(self, directory: Path, owned: bool, flush_seconds: float = 1.0) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        self.directory = directory
        self.owned = owned
        os.environ[ENV_DIR] = str(directory)
        _dirs_set_here.add(str(directory))
        values.ValueClass = values.MultiProcessValue()
        # the new class's own file closer (close_all_multiprocess_files would close every
        # app's files in this process)
        cleanups = getattr(values, "_multi_process_cleanups", [])
        self._close_files = cleanups[-1] if cleanups else None
        self.requests = Counter(
            "musicrec_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=None,
        )
        self.latency = Histogram(
            "musicrec_http_request_duration_seconds",
            "time from the request's arrival in the app to the end of the answer",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.lists = Counter(
            "musicrec_lists_served",
            "recommendation lists served, by the kind /stats counts "
            "(a blend counts once for each kind in it)",
            ["source"],
            registry=None,
        )
        self.history_writes = Counter(
            "musicrec_history_writes",
            "POST /history requests stored (or replayed)",
            ["result"],
            registry=None,
        )
        self.history_events = Counter(
            "musicrec_history_events",
            "listening events stored in the online history",
            registry=None,
        )
        self.reloads = Counter(
            "musicrec_reloads",
            "artefact reloads by result: reloaded, skipped (already "
            "served), refused (a bad set), failed (any other error)",
            ["result"],
            registry=None,
        )
        self.run = Gauge(
            "musicrec_artefacts_run",
            "1 for the artefact run a worker serves",
            ["run_id"],
            multiprocess_mode="liveall",
            registry=None,
        )
        self._run_id: str | None = None
        # per (method, route, status): requests per latency bucket (the last: +Inf), then
        # the sum of seconds; cumulative since start, and what was flushed of it
        self._cells: dict[tuple[str, str, int], list[float]] = {}
        self._flushed_cells: dict[tuple[str, str, int], list[float]] = {}
        self._lists: dict[str, int] = {}
        self._flushed_lists: dict[str, int] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if flush_seconds > 0:
            self._flusher = threading.Thread(
                target=self._flush_every, args=(flush_seconds,), name="metrics-flush", daemon=True
            )
            self._flusher.start()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request (route is the path template, never the raw path)."""
        key = (method, route, status)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        cell[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: first bound >= seconds
        cell[-1] += seconds

    def served(self, kinds: tuple[str, ...]) -> None:
        """One list served, counted once per kind in it (as /stats counts)."""
        lists = self._lists
        for kind in kinds:
            lists[kind] = lists.get(kind, 0) + 1

    def flush(self) -> None:
        """Write what the requests counted since the last flush into the metric files."""
        with self._flush_lock:
            for key, cell in list(self._cells.items()):
                now = cell[:]  # the event loop may count on meanwhile: the rest comes next time
                done = self._flushed_cells.get(key) or [0] * (len(now) - 1) + [0.0]
                if now == done:
                    continue
                labels = (key[0], key[1], str(key[2]))
                histogram = self.latency.labels(*labels)
                added = 0.0
                # prometheus_client keeps a histogram child's values in _buckets and _sum
                for bucket, new, old in zip(histogram._buckets, now[:-1], done[:-1], strict=True):
                    if new != old:
                        bucket.inc(new - old)
                        added += new - old
                histogram._sum.inc(now[-1] - done[-1])
                if added:
                    self.requests.labels(*labels).inc(added)
                self._flushed_cells[key] = now
            for kind, count in list(self._lists.items()):
                old = self._flushed_lists.get(kind, 0)
                if count != old:
                    self.lists.labels(kind).inc(count - old)
                    self._flushed_lists[kind] = count

    def _flush_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - metrics must never take the worker down
                log.exception("metrics: flushing the counters failed")

    def history_written(self, events: int, replayed: bool) -> None:
        self.history_writes.labels("replayed" if replayed else "stored").inc()
        if not replayed:
            self.history_events.inc(events)

    def reloaded(self, result: dict[str, Any]) -> None:
        """Counts the outcome of ``Recommendations.reload`` and follows its run id."""
        if result.get("error") is not None:
            outcome = "failed" if result.get("transient") else "refused"
        else:
            outcome = "skipped" if result.get("skipped") else "reloaded"
        self.reloads.labels(outcome).inc()
        self.set_run(result.get("run_id"))

    def set_run(self, run_id: str | None) -> None:
        """The run this worker serves: its series 1, the previous one's 0."""
        run = str(run_id) if run_id is not None else "none"
        if run == self._run_id:
            return
        if self._run_id is not None:
            self.run.labels(self._run_id).set(0)
        self.run.labels(run).set(1)
        self._run_id = run

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every worker's files, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.flush()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """At the worker's end: the last counts written, its live gauges gone, its counters
        kept (they add up); a folder the service owns and only this process used is
        removed."""
        from prometheus_client import multiprocess, values

        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
        self.flush()
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(os.getpid(), str(self.directory))
        if self._close_files is not None:
            self._close_files()
            with contextlib.suppress(ValueError):
                values._multi_process_cleanups.remove(self._close_files)
        if os.environ.get(ENV_DIR) == str(self.directory):
            del os.environ[ENV_DIR]
        if self.owned and _server_pid() == os.getpid():
            shutil.rmtree(self.directory, ignore_errors=True)


# --- the middleware -----------------------------------------------------------------------


class RequestTelemetry:
    """ASGI middleware, outermost: gives each request its id (``X-Request-ID`` in and out,
    the log's ``request_id``) and records its route template, status and time in
    ``state.metrics`` (when set). One closure per request wraps ``send`` to learn the status
    and add the header; nothing else is awaited."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                if PLAIN_REQUEST_ID.fullmatch(value):
                    request_id = value.decode("ascii")
                break
        if request_id is None:
            request_id = new_request_id()
        # uvicorn runs each request in a task of its own: the value stays with this request,
        # also for the 500 handler outside this middleware, which logs the traceback
        REQUEST_ID.set(request_id)
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500  # when the app fails before it answers

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics = self.state.metrics
            if metrics is not None:
                route = scope.get("route")
                metrics.observe_request(
                    scope["method"],
                    getattr(route, "path", UNMATCHED),
                    status,
                    time.perf_counter() - started,
                )
