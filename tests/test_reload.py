"""Reloading artefacts without downtime: POST /admin/reload (bearer token) and the manifest
watch switch to a new set atomically; answers in flight come whole from one set, new requests
see the new set, and a broken new set is refused while the old one keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import requests
from fastapi.testclient import TestClient

from musicrec import io
from musicrec.settings import Settings
from recommendation_service import create_app
from tests.service_support import SERVICE_FILES, Service, copy_artefacts, tiny_artefacts

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)


def make_set_b(source: Path, target: Path, run_id: str) -> Path:
    """Another run: every user's offline list reversed, every track renamed 'B ...'."""
    copy_artefacts(source, target)
    recs = pq.read_table(target / io.RECOMMENDATIONS).to_pandas()
    recs = recs.sort_values(["user_id", "rank"], ascending=[True, False], kind="stable")
    recs["rank"] = recs.groupby("user_id").cumcount().astype("int16") + 1
    _write(
        pa.Table.from_pandas(recs, schema=io.RECS_SCHEMA, preserve_index=False),
        target / io.RECOMMENDATIONS,
    )
    items = pq.read_table(target / io.ITEMS)
    renamed = pc.binary_join_element_wise("B ", items.column("name"), "")
    _write(
        items.set_column(items.schema.get_field_index("name"), "name", renamed), target / io.ITEMS
    )
    manifest = json.loads((target / io.MANIFEST).read_text())
    manifest["run_id"] = run_id
    for name in (io.RECOMMENDATIONS, io.TOP_POPULAR, io.SIMILAR):
        manifest["artefacts"][name] = {
            "rows": pq.read_metadata(target / name).num_rows,
            "bytes": (target / name).stat().st_size,
        }
    manifest["prepared_files"][io.ITEMS] = (target / io.ITEMS).stat().st_size
    (target / io.MANIFEST).write_text(json.dumps(manifest))
    return target


def make_broken(source: Path, target: Path, run_id: str) -> Path:
    """A new run whose similar.parquet is cut short (its manifest records the full file)."""
    copy_artefacts(source, target)
    data = (target / io.SIMILAR).read_bytes()
    (target / io.SIMILAR).write_bytes(data[: len(data) // 3])
    manifest = json.loads((target / io.MANIFEST).read_text())
    manifest["run_id"] = run_id
    (target / io.MANIFEST).write_text(json.dumps(manifest))
    return target


def publish(source: Path, live: Path) -> None:
    """As the pipeline does: each file moved in atomically, the manifest last."""
    for name in SERVICE_FILES:  # manifest.json is the last of them
        tmp = live / f".{name}.new"
        shutil.copy2(source / name, tmp)
        os.replace(tmp, live / name)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sets")
    a = copy_artefacts(tiny_artefacts(), base / "a")
    return {
        "a": a,
        "b": make_set_b(a, base / "b", "run-b"),
        "broken": make_broken(a, base / "broken", "run-broken"),
    }


def offline_user(folder: Path) -> int:
    return pq.read_table(folder / io.RECOMMENDATIONS, columns=["user_id"]).column(0)[0].as_py()


def test_admin_reload_in_process(sets: dict[str, Path], tmp_path: Path) -> None:
    live = copy_artefacts(sets["a"], tmp_path / "live")
    settings = Settings(
        parquet_dir=live,
        history_url=f"sqlite:///{tmp_path}/h.db",
        admin_token=TOKEN,
        reload_poll_seconds=0,
    )
    user = offline_user(live)
    run_a = json.loads((live / io.MANIFEST).read_text())["run_id"]
    with TestClient(create_app(settings)) as client:
        before = client.get(f"/recommendations/{user}?k=5&details=true").json()
        assert not before[0]["name"].startswith("B ")
        assert client.post("/admin/reload").status_code == 401
        wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "Bearer" in wrong.json()["message"]
        assert wrong.headers["WWW-Authenticate"] == "Bearer"

        publish(sets["b"], live)
        assert client.get(f"/recommendations/{user}?k=5&details=true").json() == before
        done = client.post("/admin/reload", headers=AUTH)
        assert done.status_code == 200, done.text
        assert done.json()["run_id"] == "run-b" and done.json()["previous_run_id"] == run_a
        after = client.get(f"/recommendations/{user}?k=5&details=true").json()
        assert all(x["name"].startswith("B ") for x in after)
        assert [x["track_id"] for x in after] != [x["track_id"] for x in before]
        assert client.get("/").json()["run_id"] == "run-b"

        publish(sets["broken"], live)
        refused = client.post("/admin/reload", headers=AUTH)
        assert refused.status_code == 409
        assert refused.json()["reloaded"] is False and refused.json()["run_id"] == "run-b"
        assert "similar.parquet" in refused.json()["error"]
        health = client.get("/health")
        assert health.status_code == 200  # the old set still serves
        assert health.json()["run_id"] == "run-b"
        assert "similar.parquet" in health.json()["reload_error"]
        assert client.get(f"/recommendations/{user}?k=5&details=true").json() == after


def test_admin_endpoint_is_off_without_a_token(sets: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(
        parquet_dir=sets["a"], history_url=f"sqlite:///{tmp_path}/h.db", reload_poll_seconds=0
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/admin/reload", headers=AUTH)
        assert response.status_code == 403
        assert "MUSICREC_ADMIN_TOKEN" in response.json()["message"]


def test_reload_under_load_never_mixes_sets(sets: dict[str, Path], tmp_path: Path) -> None:
    """4 threads read recommendations with names while the set flips A -> B -> A ... six
    times: no request fails, each answer is wholly A's or wholly B's, and a request made
    after a reload answered sees the new set."""
    live = copy_artefacts(sets["a"], tmp_path / "live")
    user = offline_user(live)
    url_path = f"/recommendations/{user}?k=20&details=true"
    with Service(
        live, tmp_path / "h.db", tmp_path / "server.log", MUSICREC_ADMIN_TOKEN=TOKEN
    ) as service:
        service.start()
        answer_a = requests.get(service.url + url_path, timeout=10).json()
        stop = threading.Event()
        seen: Counter[str] = Counter()
        bad: list[str] = []

        def reader() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        response = session.get(service.url + url_path, timeout=30)
                    except requests.RequestException as exc:
                        bad.append(repr(exc))
                        continue
                    if response.status_code != 200:
                        bad.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        seen[json.dumps(response.json())] += 1

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        answers = {}
        for i in range(6):
            name = "b" if i % 2 == 0 else "a"
            publish(sets[name], live)
            done = requests.post(service.url + "/admin/reload", headers=AUTH, timeout=60)
            assert done.status_code == 200, done.text
            now = requests.get(service.url + url_path, timeout=10).json()
            if name == "a":
                assert now == answer_a
            answers[name] = now
            assert all(x["name"].startswith("B ") == (name == "b") for x in now)
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not bad, bad[:5]
        assert answers["a"] != answers["b"]
        assert set(seen) == {json.dumps(answers["a"]), json.dumps(answers["b"])}, len(seen)


def test_manifest_watch_with_two_workers(sets: dict[str, Path], tmp_path: Path) -> None:
    """Both workers follow a new manifest; a broken new run is refused by both, which keep
    serving the last good one."""
    live = copy_artefacts(sets["a"], tmp_path / "live")
    with Service(
        live,
        tmp_path / "h.db",
        tmp_path / "server.log",
        workers=2,
        MUSICREC_RELOAD_POLL_SECONDS="0.2",
    ) as service:
        service.start()
        service.wait_healthy(workers=2)

        def health_by_worker() -> dict[int, dict]:
            found: dict[int, dict] = {}
            for _ in range(60):
                with requests.Session() as session:  # a new connection: any worker
                    health = session.get(service.url + "/health", timeout=10)
                    pid = session.get(service.url + "/stats", timeout=10).json()["pid"]
                found[pid] = {**health.json(), "code": health.status_code}
                if len(found) == 2:
                    break
            return found

        publish(sets["b"], live)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            runs = {h["run_id"] for h in health_by_worker().values()}
            if runs == {"run-b"}:
                break
            time.sleep(0.2)
        assert runs == {"run-b"}

        publish(sets["broken"], live)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = health_by_worker()
            if all(h["reload_error"] for h in states.values()):
                break
            time.sleep(0.2)
        assert all(
            h["code"] == 200 and h["run_id"] == "run-b" and "similar.parquet" in h["reload_error"]
            for h in states.values()
        ), states
        user = offline_user(live)
        detailed = requests.get(
            f"{service.url}/recommendations/{user}?details=true", timeout=10
        ).json()
        assert all(x["name"].startswith("B ") for x in detailed)
