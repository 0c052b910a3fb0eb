"""GET /metrics, request ids and JSON logs.

Against a real uvicorn with two workers (tiny artefacts): the counts of /metrics add up what
both workers served (checked against each worker's own /stats), history writes and reloads
(skipped, reloaded, refused) are counted, the run id is a label; every log line is one JSON
object and carries the request id given in ``X-Request-ID``, which comes back in the answer.
In process: the folder of the metric files (stale ones removed, the operator's left alone),
metrics turned off, the JSON formatter.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from musicrec import io
from musicrec.settings import Settings
from musicrec.telemetry import (
    FOLDER_PREFIX,
    JsonFormatter,
    RequestIdFilter,
    metrics_directory,
)
from recommendation_service import create_app
from tests.service_support import Service, copy_artefacts, tiny_artefacts

TOKEN = "metrics-test-token"
ROUTE = "/recommendations/{user_id}"


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample, read by prometheus_client's own parser of the
    text format (which fails on a malformed exposition)."""
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("metrics")
    parquet = copy_artefacts(tiny_artefacts(), base / "parquet")
    with Service(
        parquet,
        base / "history.db",
        base / "service.log",
        workers=2,
        MUSICREC_METRICS_DIR=str(base / "metrics"),
        MUSICREC_LOG_FORMAT="json",
        MUSICREC_METRICS_FLUSH_SECONDS="0.2",
        MUSICREC_ADMIN_TOKEN=TOKEN,
        PROMETHEUS_MULTIPROC_DIR="",
    ) as svc:
        svc.start(wait=False)
        svc.wait_healthy(workers=2)
        yield svc


def _per_worker_stats(url: str, want: int = 2) -> dict[int, dict]:
    """/stats of each worker (new connections until ``want`` pids answered)."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 20
    while len(seen) < want and time.monotonic() < deadline:
        stats = requests.get(url + "/stats", timeout=5).json()  # a new connection each
        seen[stats["pid"]] = stats
    assert len(seen) == want, f"only workers {sorted(seen)} answered"
    return seen


def _metrics_until(url: str, ok, seconds: float = 10):  # noqa: ANN001, ANN202
    """/metrics, asked again until ``ok(samples)`` (other workers flush every 0.2 s)."""
    deadline = time.monotonic() + seconds
    while True:
        answer = requests.get(url + "/metrics", timeout=5)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        samples = parse(answer.text)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_counts_add_up_across_two_workers(server: Service) -> None:
    users = requests.get(server.url + "/users?limit=5", timeout=5).json()["users"]
    before = {pid: s["personal"] for pid, s in _per_worker_stats(server.url).items()}
    sent = 0
    while sent < 400:  # new connections land on either worker; stop once both served some
        for _ in range(20):
            answer = requests.get(f"{server.url}/recommendations/{users[sent % 5]}?k=5", timeout=5)
            assert answer.status_code == 200
            sent += 1
        after = _per_worker_stats(server.url)
        served = {pid: after[pid]["personal"] - before.get(pid, 0) for pid in after}
        if all(n > 0 for n in served.values()):
            break
    assert all(n > 0 for n in served.values()), f"one worker served all: {served}"
    assert sum(served.values()) == sent

    samples = _metrics_until(
        server.url,
        lambda s: value(s, "musicrec_http_requests_total", route=ROUTE, status="200") >= sent,
    )
    # the metrics are the sum over both workers, not the answering worker's share
    assert (
        value(samples, "musicrec_http_requests_total", method="GET", route=ROUTE, status="200")
        == sent
    )
    assert (
        value(samples, "musicrec_http_request_duration_seconds_count", route=ROUTE, status="200")
        == sent
    )
    assert (
        value(
            samples,
            "musicrec_http_request_duration_seconds_bucket",
            route=ROUTE,
            status="200",
            le="+Inf",
        )
        == sent
    )
    assert 0 < value(samples, "musicrec_http_request_duration_seconds_sum", route=ROUTE) < sent
    personal = sum(s["personal"] for s in _per_worker_stats(server.url).values())
    assert value(samples, "musicrec_lists_served_total", source="personal") == personal
    # routes are templates: no user id in any label
    assert not any(str(u) in lab.get("route", "") for _, lab, _ in samples for u in users)
    # the run id is a label, one series per live worker
    run_id = requests.get(server.url + "/", timeout=5).json()["run_id"]
    runs = [
        (lab["pid"], v)
        for n, lab, v in samples
        if n == "musicrec_artefacts_run" and lab["run_id"] == run_id
    ]
    assert len(runs) == 2 and all(v == 1 for _, v in runs)


def test_history_writes_reloads_and_errors_are_counted(server: Service) -> None:
    url = server.url
    tracks = requests.get(url + "/top_popular/2", timeout=5).json()
    added = requests.post(url + "/history/3", json=tracks, timeout=5)
    assert added.status_code == 200, added.text
    headers = {"Idempotency-Key": "metrics-key-1"}
    for _ in range(2):  # the second is a replay: counted as such, no events stored
        assert (
            requests.post(
                url + "/history/4", json=tracks[:1], headers=headers, timeout=5
            ).status_code
            == 200
        )
    assert requests.get(url + "/recommendations/abc", timeout=5).status_code == 422
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(url + "/admin/reload", headers=auth, timeout=30).json()["skipped"]

    manifest = server.parquet_dir / io.MANIFEST
    info = json.loads(manifest.read_text())
    info["run_id"] = "metrics-run-2"
    manifest.write_text(json.dumps(info))
    answer = requests.post(url + "/admin/reload", headers=auth, timeout=30)
    assert answer.status_code == 200 and answer.json()["run_id"] == "metrics-run-2"
    served_by = answer.json()
    with open(server.parquet_dir / io.RECOMMENDATIONS, "ab") as damaged:
        damaged.write(b"not parquet")
    info["run_id"] = "metrics-run-3"
    manifest.write_text(json.dumps(info))
    assert requests.post(url + "/admin/reload", headers=auth, timeout=30).status_code == 409

    # the other worker's request counts arrive with its next flush (every 0.2 s)
    samples = _metrics_until(
        url,
        lambda s: (
            value(s, "musicrec_http_requests_total", route=ROUTE, status="422") >= 1
            and value(s, "musicrec_http_requests_total", route="/history/{user_id}", status="200")
            >= 3
        ),
    )
    assert value(samples, "musicrec_history_writes_total", result="stored") == 2
    assert value(samples, "musicrec_history_writes_total", result="replayed") == 1
    assert value(samples, "musicrec_history_events_total") == 3
    assert (
        value(samples, "musicrec_http_requests_total", route="/history/{user_id}", status="200")
        == 3
    )
    assert value(samples, "musicrec_http_requests_total", route=ROUTE, status="422") == 1
    assert value(samples, "musicrec_reloads_total", result="skipped") == 1
    assert value(samples, "musicrec_reloads_total", result="reloaded") == 1
    assert value(samples, "musicrec_reloads_total", result="refused") == 1
    assert value(samples, "musicrec_artefacts_run", run_id="metrics-run-2") == 1
    assert served_by["previous_run_id"] != "metrics-run-2"


def test_request_ids_and_json_log_lines(server: Service) -> None:
    given = requests.get(
        server.url + "/health", headers={"X-Request-ID": "trace-abc-123"}, timeout=5
    )
    assert given.headers["x-request-id"] == "trace-abc-123"
    made = {
        requests.get(server.url + "/health", timeout=5).headers["x-request-id"] for _ in range(4)
    }
    assert len(made) == 4 and all(made), "each request gets its own id"
    bad = requests.get(server.url + "/health", headers={"X-Request-ID": "x" * 500}, timeout=5)
    assert bad.headers["x-request-id"] != "x" * 500  # too long: replaced, not echoed

    # a request that logs: the admin reload (in the thread pool) writes its INFO line
    answer = requests.post(
        server.url + "/admin/reload",
        timeout=30,
        headers={"Authorization": f"Bearer {TOKEN}", "X-Request-ID": "reload-req-77"},
    )
    assert answer.headers["x-request-id"] == "reload-req-77"
    deadline = time.monotonic() + 5
    while "reload-req-77" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry), entry
    ours = [e for e in entries if e["request_id"] == "reload-req-77"]
    assert ours and any("reload (POST /admin/reload)" in e["message"] for e in ours), ours
    assert all(e["logger"] == "recommendation_service" for e in ours)
    assert any(e["message"].startswith("ready: run") and e["request_id"] is None for e in entries)


# --- in process ---------------------------------------------------------------------------


def test_metrics_folder_cleans_only_gone_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"{FOLDER_PREFIX}{int(gone.stdout)}-123"
    started = Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22
    alive = tmp_path / f"{FOLDER_PREFIX}1-{started}"
    reused = tmp_path / f"{FOLDER_PREFIX}1-999999999"  # pid 1, but not that process
    for folder in (stale, alive, reused):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    folder, owned = metrics_directory(tmp_path)
    assert owned and folder.is_dir() and folder.parent == tmp_path
    assert folder.name.startswith(f"{FOLDER_PREFIX}{os.getpid()}-")
    assert not stale.exists() and not reused.exists()
    assert alive.exists()

    operator = tmp_path / "operator"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(operator))
    assert metrics_directory(tmp_path / "unused") == (operator, False)


def _tiny_settings(tmp_path: Path, **extra: object) -> Settings:
    parquet = copy_artefacts(tiny_artefacts(), tmp_path / "parquet")
    return Settings(
        parquet_dir=parquet,
        history_url=f"sqlite:///{tmp_path}/h.db",
        reload_poll_seconds=0,
        metrics_dir=tmp_path / "metrics",
        **extra,
    )


def test_in_process_metrics_and_their_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with TestClient(create_app(_tiny_settings(tmp_path))) as client:
        user = client.get("/users?limit=1").json()["users"][0]
        for _ in range(3):
            assert client.get(f"/recommendations/{user}").status_code == 200
        assert client.get("/no/such/path/123").status_code == 404
        samples = parse(client.get("/metrics").text)
        assert value(samples, "musicrec_http_requests_total", route=ROUTE) == 3
        assert value(samples, "musicrec_http_requests_total", route="unmatched", status="404") == 1
        folders = list((tmp_path / "metrics").glob(FOLDER_PREFIX + "*"))
        assert len(folders) == 1 and any(folders[0].iterdir())
    # alone in its process, the app removes its folder when it stops
    assert list((tmp_path / "metrics").glob(FOLDER_PREFIX + "*")) == []
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_metrics_off(tmp_path: Path) -> None:
    with TestClient(create_app(_tiny_settings(tmp_path, metrics_enabled=False))) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/health").headers["x-request-id"]
    assert not (tmp_path / "metrics").exists()


def test_json_formatter_line() -> None:
    record = logging.LogRecord(
        "recommendation_service", logging.ERROR, __file__, 1, "failed %s", ("x",), None
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    RequestIdFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["message"] == "failed x"
    assert entry["logger"] == "recommendation_service" and entry["request_id"] is None
    assert "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("+00:00")
