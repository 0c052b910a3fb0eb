"""Pipeline faults: a run that fails or is killed at any stage leaves the previous artefact set
intact and usable by the service, and re-running finishes the job."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musicrec import io, pipeline
from musicrec.settings import Settings
from recommendation_service import check_manifest, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODELS = {
    "als_factors": 16,
    "als_iterations": 5,
    "ranker_iterations": 30,
    "n_similar": 20,
    "threads": 2,
    "seed": 5,
}


def _snapshot(parquet: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in parquet.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def first_run(
    tiny_data: Path, tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, dict[str, bytes]]:
    parquet = tmp_path_factory.mktemp("faults") / "parquet"
    shutil.copytree(tiny_prepared, parquet)
    settings = Settings(data_dir=tiny_data, parquet_dir=parquet, **SMALL_MODELS)
    pipeline.run_all(settings)
    return settings, _snapshot(parquet)


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_a_failure_in_any_stage_keeps_the_previous_set(
    stage: str, first_run: tuple[Settings, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, before = first_run
    parquet = Path(settings.parquet_dir)

    def broken(run: pipeline.RunContext) -> None:
        raise RuntimeError(f"{stage} failed")

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, broken)
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        pipeline.run_all(settings)
    after = _snapshot(parquet)
    assert {name: after[name] for name in before} == before
    check_manifest(parquet, read_manifest(parquet))  # the service would load this set


def test_a_killed_run_keeps_the_previous_set_and_a_rerun_finishes(
    first_run: tuple[Settings, dict[str, bytes]], tmp_path: Path
) -> None:
    settings, _ = first_run
    parquet = tmp_path / "parquet"
    shutil.copytree(settings.parquet_dir, parquet)
    before = _snapshot(parquet)
    old_run = read_manifest(parquet)["run_id"]
    env = {
        **os.environ,
        "MUSICREC_DATA_DIR": str(settings.data_dir),
        "MUSICREC_PARQUET_DIR": str(parquet),
        "OPENBLAS_NUM_THREADS": "1",
        **{f"MUSICREC_{key.upper()}": str(value) for key, value in SMALL_MODELS.items()},
    }
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "musicrec", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while "stage rank: started" not in log.read_text() and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the rank stage: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list(parquet.glob(".staging-*")), "the killed run should have left its staging folder"
    after = _snapshot(parquet)
    assert {name: after[name] for name in before} == before
    check_manifest(parquet, read_manifest(parquet))

    done = subprocess.run(
        [sys.executable, "-m", "musicrec", "run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = read_manifest(parquet)
    assert manifest["run_id"] != old_run
    check_manifest(parquet, manifest)
    assert (parquet / io.RECOMMENDATIONS).stat().st_size > 0
    assert not list(parquet.glob(".staging-*")), "the rerun sweeps what the killed run left"
