"""musicrec.runs: each run kept in runs/<run_id>/ with a current pointer, rollback with the
manifest last, pruning, the manifest's code version and input fingerprint, and runs in a real
S3 server (moto) under their id with the pointer moved last."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from musicrec import io, runs
from musicrec.cli import main
from musicrec.errors import DataError
from musicrec.settings import Settings
from tests.service_support import tiny_artefacts

ROOT = Path(__file__).resolve().parents[1]


def _publish(folder: Path, run_id: str, files: dict[str, str], built_at: str) -> dict:
    """What run_all does: the stages' work files and each artefact replaced (never written in
    place), the manifest last, then the run archived."""
    (folder / "work").mkdir(exist_ok=True)
    for name, text in {
        "selection.json": f"choice of {run_id}",
        "search-als.npz": f"state of {run_id}",
    }.items():
        (folder / "work" / ".tmp").write_text(text)
        os.replace(folder / "work" / ".tmp", folder / "work" / name)
    for name, text in files.items():
        (folder / ".tmp").write_text(text)
        os.replace(folder / ".tmp", folder / name)
    manifest = {
        "run_id": run_id,
        "built_at": built_at,
        "selection": {"winner": "ranker"},
        "metrics": [{"source": "served", "k": 10, "segment": "all", "ndcg": 0.2}],
    }
    io.write_json(manifest, folder / io.MANIFEST)
    runs.archive(folder, manifest)
    return manifest


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "parquet"
    folder.mkdir()
    (folder / io.EVENTS).write_text("the input events")
    (folder / "history.db").write_text("online history")
    _publish(
        folder,
        "r1",
        {"recommendations.parquet": "lists of r1", io.ITEMS: "items"},
        "2026-01-01T00:00:00+00:00",
    )
    _publish(
        folder,
        "r2",
        {"recommendations.parquet": "lists of r2", "ranker.cbm": "trees"},
        "2026-01-02T00:00:00+00:00",
    )
    return folder


def test_each_run_is_kept_with_a_current_pointer(folder: Path) -> None:
    r1, r2 = folder / "runs" / "r1", folder / "runs" / "r2"
    assert sorted(p.name for p in r1.iterdir()) == [
        io.ITEMS,
        io.MANIFEST,
        "recommendations.parquet",
        "work",
    ]  # no events, no history database
    assert (r1 / "work" / "search-als.npz").read_text() == "state of r1"
    assert (r1 / "recommendations.parquet").read_text() == "lists of r1"  # kept its bytes
    assert (r2 / "recommendations.parquet").read_text() == "lists of r2"
    assert os.path.samefile(r2 / "ranker.cbm", folder / "ranker.cbm")  # a link, not a copy
    assert runs.current_run(folder) == "r2"
    assert (folder / "runs" / "current").is_symlink()
    listed = runs.list_runs(folder)
    assert [(r["run_id"], r["current"], r["winner"], r["ndcg@10"]) for r in listed] == [
        ("r1", False, "ranker", 0.2),
        ("r2", True, "ranker", 0.2),
    ]


def test_rollback_serves_a_kept_run_manifest_last(folder: Path) -> None:
    manifest = runs.use_run(folder, "r1")
    assert manifest["run_id"] == "r1"
    assert io.read_json(folder / io.MANIFEST)["run_id"] == "r1"
    assert (folder / "recommendations.parquet").read_text() == "lists of r1"
    assert not (folder / "ranker.cbm").exists()  # r1 had none: no stale file stays
    assert (folder / io.EVENTS).read_text() == "the input events"  # the input is not touched
    assert (folder / "history.db").read_text() == "online history"
    assert runs.current_run(folder) == "r1"
    # the next stage run continues from r1's choices and warm-start states
    assert (folder / "work" / "selection.json").read_text() == "choice of r1"
    assert (folder / "work" / "search-als.npz").read_text() == "state of r1"
    assert (folder / "runs" / "r2" / "ranker.cbm").read_text() == "trees"  # r2 still kept
    assert not list(folder.glob(".staging*"))
    runs.use_run(folder, "r2")
    assert (folder / "ranker.cbm").read_text() == "trees"
    assert (folder / "work" / "search-als.npz").read_text() == "state of r2"
    assert not list((folder / "work").glob(".*"))


def test_rollback_refuses_an_unknown_or_damaged_run(folder: Path) -> None:
    with pytest.raises(DataError, match=r"no such run \(kept runs: r1, r2\)"):
        runs.use_run(folder, "r9")
    with pytest.raises(DataError, match="no such run"):
        runs.use_run(folder, "../r1")
    manifest = io.read_json(folder / "runs" / "r1" / io.MANIFEST)
    manifest["artefacts"] = {"served_items.arrow": {"bytes": 5, "crc32": 1}}
    io.write_json(manifest, folder / "runs" / "r1" / io.MANIFEST)
    with pytest.raises(DataError, match="missing artefact"):
        runs.use_run(folder, "r1")
    assert io.read_json(folder / io.MANIFEST)["run_id"] == "r2"  # nothing moved


def test_prune_keeps_the_newest_and_the_current(folder: Path) -> None:
    _publish(folder, "r3", {"recommendations.parquet": "lists of r3"}, "2026-01-03T00:00:00+00:00")
    runs.use_run(folder, "r1")  # current: the oldest
    assert runs.prune(folder, keep=1) == ["r2"]
    assert [r["run_id"] for r in runs.list_runs(folder)] == ["r1", "r3"]
    with pytest.raises(ValueError, match="at least 1"):
        runs.prune(folder, keep=0)


def test_the_cli_lists_uses_and_prunes(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "list", "--parquet-dir", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  r1  2026-01-01") and lines[1].startswith("* r2")
    assert "NDCG@10 0.2000" in lines[1]
    assert main(["runs", "use", "r1", "--parquet-dir", str(folder)]) == 0
    assert "serving run r1" in capsys.readouterr().out
    assert main(["runs", "use", "r2", "--parquet-dir", str(folder)]) == 0
    capsys.readouterr()
    assert main(["runs", "prune", "--keep", "1", "--parquet-dir", str(folder)]) == 0
    assert capsys.readouterr().out == "removed r1\n"
    assert main(["runs", "use", "r1", "--parquet-dir", str(folder)]) == 2
    assert "no such run (kept runs: r2)" in capsys.readouterr().err


def test_a_pipeline_run_records_code_and_input_and_is_kept(tmp_path: Path) -> None:
    """The tiny run of the service tests (made by `musicrec run`), copied."""
    folder = tmp_path / "parquet"
    shutil.copytree(tiny_artefacts(), folder, symlinks=True)
    manifest = io.read_json(folder / io.MANIFEST)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert manifest["code"]["git_commit"] == commit
    assert manifest["code"]["package_version"]
    for name in (io.EVENTS, io.ITEMS):
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert manifest["input"][name] == {
            "sha256": digest,
            "bytes": (folder / name).stat().st_size,
        }
    run_id = manifest["run_id"]
    assert runs.current_run(folder) == run_id
    kept = folder / "runs" / run_id
    assert not (kept / io.EVENTS).exists()
    assert io.read_json(kept / io.MANIFEST) == manifest
    # rollback onto itself re-checks the real served files' checksums and changes nothing
    assert runs.use_run(folder, run_id)["run_id"] == run_id


def test_runs_travel_through_s3_under_their_id_pointer_last(
    folder: Path, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith(("MUSICREC_", "AWS_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="runs-bucket")
    settings = Settings(
        parquet_dir=folder, s3_bucket="runs-bucket", s3_endpoint_url=endpoint, s3_prefix="team"
    )
    keys = runs.push_run(settings)
    assert keys[-2:] == ["team/runs/r2/manifest.json", "team/runs/current"]  # pointer last
    assert set(keys[:-2]) == {
        "team/runs/r2/recommendations.parquet",
        "team/runs/r2/ranker.cbm",
        "team/runs/r2/items.parquet",
    }
    assert not any(io.EVENTS in key for key in keys)
    runs.push_run(settings, "r1")  # an older run; the pointer follows the last push
    assert runs.remote_current(settings) == "r1"

    fresh = tmp_path / "fresh"
    pulled = Settings(
        parquet_dir=fresh, s3_bucket="runs-bucket", s3_endpoint_url=endpoint, s3_prefix="team"
    )
    runs.pull_run(pulled, "r2")  # a given run
    assert io.read_json(fresh / io.MANIFEST)["run_id"] == "r2"
    assert (fresh / "ranker.cbm").read_text() == "trees"
    assert runs.current_run(fresh) == "r2"
    assert (
        main(
            [
                "s3",
                "pull",
                "--parquet-dir",
                str(fresh),
                "--set",
                "s3_bucket=runs-bucket",
                "--set",
                f"s3_endpoint_url={endpoint}",
                "--set",
                "s3_prefix=team",
            ]
        )
        == 0
    )
    assert json.loads((fresh / io.MANIFEST).read_text())["run_id"] == "r1"  # the pointer's
    assert not (fresh / "ranker.cbm").exists()
    assert [r["run_id"] for r in runs.list_runs(fresh)] == ["r1", "r2"]


def test_a_copied_pointer_folder_is_replaced_by_a_link(tmp_path: Path) -> None:
    """A copy that followed the ``current`` link (shutil.copytree) made it a folder; the next
    run points it again instead of failing."""
    from musicrec.runs import CURRENT, RUNS_DIR, _point_current, current_run

    runs = tmp_path / RUNS_DIR
    (runs / "20260101T000000-aaaaaa").mkdir(parents=True)
    (runs / CURRENT).mkdir()
    (runs / CURRENT / "manifest.json").write_text("{}")
    _point_current(runs, "20260101T000000-aaaaaa")
    assert (runs / CURRENT).is_symlink()
    assert current_run(tmp_path) == "20260101T000000-aaaaaa"
