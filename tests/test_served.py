"""The served (memory-mapped) form of the artefacts: written with checksums at publish time,
verified and mapped by the service, shared between processes, released on reload; and the
raw-ASGI fast path of GET /recommendations answers exactly as the declared route."""

from __future__ import annotations

import gc
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from musicrec import io, served
from musicrec.cli import main as cli_main
from musicrec.errors import DataError
from recommendation_service import FastRecommendations, Recommendations, create_app, load_artefacts
from tests.service_support import tiny_artefacts
from tests.test_service_app import make_settings, write_artefacts

ROOT = Path(__file__).resolve().parents[1]


def published(folder: Path) -> Path:
    write_artefacts(folder)
    served.publish(folder)
    return folder


def _mapped(array: np.ndarray) -> bool:
    """Whether the array's memory is a file mapping (walks the chain of bases)."""
    base = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return False


def test_publish_records_checksums_and_the_service_maps_the_files(tmp_path: Path) -> None:
    folder = published(tmp_path)
    manifest = json.loads((folder / io.MANIFEST).read_text())
    for name in served.SERVED_FILES:
        entry = manifest["artefacts"][name]
        assert entry["bytes"] == (folder / name).stat().st_size
        assert entry["crc32"] == served.file_crc32(folder / name)
    assert (
        manifest[served.SERVED_FROM][io.RECOMMENDATIONS]
        == (folder / io.RECOMMENDATIONS).stat().st_size
    )
    art = load_artefacts(folder)
    assert art.mapped
    for array in (
        art.offline.values,
        art.offline.keys,
        art.similar.values,
        art.similar.scores,
        art.popular,
    ):
        assert _mapped(array) and not array.flags.writeable
    # the mapped set is the same as the one read from parquet
    for name in served.SERVED_FILES:
        (folder / name).unlink()
    read = load_artefacts(folder)
    assert not read.mapped
    for part in ("keys", "offsets", "values"):
        assert np.array_equal(getattr(art.offline, part), getattr(read.offline, part))
        assert np.array_equal(getattr(art.similar, part), getattr(read.similar, part))
    assert np.array_equal(art.similar.scores, read.similar.scores)
    assert np.array_equal(art.popular, read.popular)
    assert np.array_equal(art.item_ids, read.item_ids)
    assert art.items.equals(read.items)


@pytest.mark.parametrize("name", [served.OFFLINE_VALUES, served.SIMILAR_SCORES, served.ITEMS])
def test_a_damaged_served_file_is_refused(tmp_path: Path, name: str) -> None:
    folder = published(tmp_path)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x5A  # same size, one flipped byte in the data
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{name}: CRC-32 .* the served file is damaged"):
        load_artefacts(folder)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with (
        pytest.raises(DataError, match=f"{name}: .* bytes, but manifest.json records"),
        TestClient(create_app(make_settings(folder))),
    ):
        pass


def test_a_served_file_with_another_shape_is_refused(tmp_path: Path) -> None:
    folder = published(tmp_path)
    manifest = json.loads((folder / io.MANIFEST).read_text())
    manifest["artefacts"][served.POPULAR]["shape"] = [3]
    (folder / io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="served_popular.npy: array .* records"):
        load_artefacts(folder)


def test_an_older_folder_is_read_with_a_warning_naming_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_artefacts(tmp_path)
    with caplog.at_level(logging.WARNING, logger="recommendation_service"):
        art = load_artefacts(folder)
    assert not art.mapped
    assert f"python -m musicrec publish --parquet-dir {folder}" in caplog.text
    assert cli_main(["publish", "--parquet-dir", str(folder)]) == 0
    assert load_artefacts(folder).mapped
    # a parquet file changed after publishing: the served form is stale, parquet wins
    recs = pd.read_parquet(folder / io.RECOMMENDATIONS)
    io.write_table(recs[recs.user_id == 1], folder / io.RECOMMENDATIONS, io.RECS_SCHEMA)
    manifest = json.loads((folder / io.MANIFEST).read_text())
    manifest["artefacts"].pop(io.RECOMMENDATIONS, None)
    (folder / io.MANIFEST).write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recommendation_service"):
        art = load_artefacts(folder)
    assert not art.mapped and len(art.offline) == 1
    assert "made from another recommendations.parquet" in caplog.text


def _flip_under_the_record(folder: Path, name: str) -> None:
    """Flip a byte of ``name`` and record its new identity as verified: bit rot that no
    timestamp shows (the record still vouches for the file)."""
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x5A
    path.write_bytes(bytes(data))
    record = served.read_verified(folder)
    stat = path.stat()
    record[name]["identity"] = [
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    ]
    (folder / served.VERIFIED).write_text(json.dumps(record))


def test_a_verified_file_is_mapped_at_once_and_checked_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start checks every file in full and records it; a later start maps an unchanged
    file at once and leaves its CRC-32 to the pending checks; a file written, copied or
    renamed since is checked in full again; bit rot under the record is found by the
    pending check, which drops the file from the record, so the next start refuses it."""
    monkeypatch.setattr(served, "SETTLED_NS", 0)  # the test's files are seconds old
    folder = published(tmp_path)
    names = {*served.SERVED_FILES}
    first = load_artefacts(folder)
    assert first.pending is None  # nothing recorded yet: every file checked now
    assert set(served.read_verified(folder)) == names

    second = load_artefacts(folder)
    assert second.pending is not None
    assert {name for name, _, _ in second.pending.files} == names
    assert second.pending.run() == len(names) and second.pending.files == []

    # replaced by a copy of the same bytes: another inode, so no longer vouched for
    copy = folder / "copy.tmp"
    shutil.copyfile(folder / served.POPULAR, copy)
    os.replace(copy, folder / served.POPULAR)
    third = load_artefacts(folder)
    assert third.pending is not None
    assert served.POPULAR not in {name for name, _, _ in third.pending.files}
    third.pending.close()

    # bit rot under the record: mapped on its word, found by the pending check
    _flip_under_the_record(folder, served.OFFLINE_VALUES)
    rotten = load_artefacts(folder)
    assert rotten.pending is not None
    with pytest.raises(DataError, match="served_offline_values.npy: CRC-32 .* damaged after"):
        rotten.pending.run()
    assert served.OFFLINE_VALUES not in served.read_verified(folder)
    with pytest.raises(DataError, match="served_offline_values.npy: CRC-32 .* file is damaged"):
        load_artefacts(folder)


def test_a_file_found_damaged_in_the_background_stops_the_worker_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's background check: a damaged file ends the serving of its set (503 for
    lists and /health, naming the file); a set that passes serves on."""
    monkeypatch.setattr(served, "SETTLED_NS", 0)
    folder = published(tmp_path)
    load_artefacts(folder)  # records every file
    with TestClient(create_app(make_settings(folder))) as client:
        recs = client.app.state.recs  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while recs._artefacts.pending.files and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/health").status_code == 200
        assert client.get("/recommendations/1").status_code == 200

    _flip_under_the_record(folder, served.SIMILAR_SCORES)
    with TestClient(create_app(make_settings(folder))) as client:
        recs = client.app.state.recs  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while recs.damaged is None and time.monotonic() < deadline:
            time.sleep(0.01)
        health = client.get("/health")
        assert health.status_code == 503
        assert "served_similar_scores.npy: CRC-32" in health.json()["artefacts_damaged"]
        assert str(folder) not in health.json()["artefacts_damaged"]
        answer = client.get("/recommendations/1")
        assert answer.status_code == 503
        assert "damaged after it was verified" in answer.text


def test_the_pipeline_publishes_the_served_form() -> None:
    """``musicrec run`` (tiny preset) writes the served files and their checksums."""
    folder = tiny_artefacts()
    manifest = json.loads((folder / io.MANIFEST).read_text())
    assert all("crc32" in manifest["artefacts"][name] for name in served.SERVED_FILES)
    assert served.verify_files(folder, manifest) == [*served.SERVED_FILES, *served.ALS_NAMES]
    assert load_artefacts(folder).mapped


@pytest.mark.parametrize(
    "name",
    [
        served.ALS_FILES["item_factors"],
        served.ALS_FILES["user_factors"],
        served.ALS_FILES["heard_rows"],
    ],
)
def test_the_als_factor_files_are_checksummed_and_mapped(tmp_path: Path, name: str) -> None:
    """The pipeline's ALS files are in the manifest with CRC-32, mapped by the service, and a
    damaged one is refused like any served file."""
    folder = tmp_path / "parquet"
    shutil.copytree(tiny_artefacts(), folder)
    manifest = json.loads((folder / io.MANIFEST).read_text())
    entry = manifest["artefacts"][name]
    assert entry["crc32"] == served.file_crc32(folder / name)
    art = load_artefacts(folder)
    assert art.foldin is not None and _mapped(art.foldin.item_factors)
    assert art.foldin.item_factors.shape[0] == art.foldin.track_ids.size
    del art
    data = bytearray((folder / name).read_bytes())
    data[-5] ^= 0x41
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{name}: CRC-32 .* the served file is damaged"):
        load_artefacts(folder)
    # a manifest that records only some of the ALS files is refused, not half-used
    (folder / name).write_bytes(bytes(data[:-5] + bytes([data[-5] ^ 0x41]) + data[-4:]))
    manifest["artefacts"].pop(served.ALS_FILES["gram"])
    (folder / io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="records only some ALS served files"):
        load_artefacts(folder)


def test_a_reload_releases_the_old_mapping(tmp_path: Path) -> None:
    folder = published(tmp_path)
    recs = Recommendations(make_settings(folder))
    first = recs.load()
    old = weakref.ref(first)
    del first
    served.publish(folder)  # a new run: every served file replaced by rename
    assert recs.load().mapped
    gc.collect()
    assert old() is None, "the old set is still referenced"
    maps = Path("/proc/self/maps").read_text().splitlines()
    ours = [line for line in maps if str(folder) in line and "served_" in line]
    assert ours, "the new set should be mapped"
    assert not [line for line in ours if "(deleted)" in line], "old files still mapped"


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from recommendation_service import load_artefacts

def memory():
    out = {{}}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

before = memory()
art = load_artefacts({folder!r})
total = int(art.offline.values.sum(dtype="int64")) + int(art.similar.values.sum(dtype="int64"))
after = memory()
print(json.dumps({{"mapped": art.mapped, "anon": after["RssAnon"] - before["RssAnon"],
                  "file": after["RssFile"] - before["RssFile"], "total": total}}))
"""


def _child_memory(folder: Path) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), folder=str(folder))],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_processes_share_the_mapped_arrays(tmp_path: Path) -> None:
    """Two processes that load the same set and read every offline and similar value hold
    them as file pages (the shared page cache), not as private memory each."""
    folder = write_artefacts(tmp_path)
    rng = np.random.default_rng(0)
    tracks = np.arange(10, 130, 10, dtype=np.int32)
    users = np.arange(1, 60_001, dtype=np.int32)
    rank = np.tile(np.arange(1, 101, dtype=np.int16), users.size)
    io.write_table(
        pa.table(
            {
                "user_id": np.repeat(users, 100),
                "track_id": rng.choice(tracks, users.size * 100),
                "score": (1.0 / rank).astype(np.float32),
                "rank": rank,
            }
        ),
        folder / io.RECOMMENDATIONS,
        io.RECS_SCHEMA,
    )
    served.publish(folder)
    values_bytes = users.size * 100 * 4  # 24 MB of offline recommendations
    first, second = _child_memory(folder), _child_memory(folder)
    for child in (first, second):
        assert child["mapped"]
        assert child["file"] >= 0.9 * values_bytes, child  # read through the mapping
        assert child["anon"] <= 0.5 * values_bytes, child  # and not copied privately
    assert first["total"] == second["total"]


def test_fast_path_answers_as_the_declared_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = published(tmp_path)
    app = create_app(make_settings(folder))
    fast = app.router.routes[0].endpoint
    assert isinstance(fast, FastRecommendations)
    declared_calls: list[str] = []
    original = FastRecommendations._declared

    async def counting(self: FastRecommendations, scope: dict, receive, send) -> None:
        declared_calls.append(scope["query_string"].decode())
        await original(self, scope, receive, send)

    monkeypatch.setattr(FastRecommendations, "_declared", counting)
    with TestClient(app) as client:
        client.post("/history/1", json=[20, 30])  # offline + online: blend
        client.post("/history/5", json=[10])  # online only
        for user in (1, 2, 5, 77):  # blend, offline only, online only, neither
            for query in ("", "k=4", "k=3&blend=probability&p=0.3", "blend=strict&p=1"):
                plain = client.get(f"/recommendations/{user}?{query}")
                # an unknown parameter sends the request down the declared route
                declared = client.get(f"/recommendations/{user}?{query}&via=declared")
                assert plain.status_code == declared.status_code == 200
                assert plain.content == declared.content, (user, query)
                assert (
                    plain.headers["x-recommendation-source"]
                    == declared.headers["x-recommendation-source"]
                )
                assert plain.headers["content-type"] == declared.headers["content-type"]
        assert all("via=declared" in q for q in declared_calls), declared_calls
        declared_calls.clear()
        # anything not plainly valid is the declared route's: same 422s as before
        for query in ("k=0", "k=011", "p=nan", "p=1.5", "blend=x", "k=4&k=5"):
            response = client.get(f"/recommendations/1?{query}")
            assert response.status_code in (200, 422), query
        assert client.get("/recommendations/1?k=0").status_code == 422
        assert "k" in client.get("/recommendations/1?k=0").json()["message"]
        assert (
            client.get("/recommendations/007").content == client.get("/recommendations/7").content
        )
        assert len(declared_calls) >= 7
