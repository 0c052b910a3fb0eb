"""Versioned runs: every successful run kept in ``<parquet_dir>/runs/<run_id>/``, a ``current``
pointer, rollback, pruning, and the runs in the artefact bucket.

The artefact folder's top level stays the set the service serves (nothing in the service
changes). After a run has moved its files there, :func:`archive` hard-links them (no copy, no
extra disk) into ``runs/<run_id>/`` and points ``runs/current`` (a symlink, swapped
atomically) at it. Files are only ever replaced, never written in place, so an archived link
keeps its run's bytes. :func:`use_run` (rollback) links a kept run's files back into the top
level the way a run publishes — every file first, ``manifest.json`` last — so a running
service sees the new manifest and switches by itself.

In the bucket: ``<prefix>/runs/<run_id>/<file>`` per run and ``<prefix>/runs/current`` (the
served run id), written last by :func:`push_run`, so whoever reads the pointer finds the
whole run. The prepared events (the pipeline's input) are never archived nor pushed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from musicrec import __version__, io
from musicrec.errors import DataError

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
CURRENT = "current"
WORK_DIR = "work"  # the pipeline's work folder (musicrec.pipeline.WORK_DIR)


def _kept(name: str) -> bool:
    """Top-level files that belong to a run: artefacts, not the input events, temporary
    files (``.name``, ``*.tmp``) nor the online-history database."""
    return (
        name != io.EVENTS
        and not name.startswith(".")
        and ".db" not in name
        and not name.endswith(".tmp")
    )


def code_version(where: Path | None = None) -> dict[str, Any]:
    """The code that made a run: the package version and, in a git checkout, the commit and
    whether the work tree had changes (None when git or the checkout is not there)."""
    folder = where or Path(__file__).resolve().parent
    found: dict[str, Any] = {"package_version": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            found["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired) as exc:  # no git on this machine
        log.debug("no git commit recorded: %s", exc)
    return found


def input_fingerprint(parquet_dir: Path) -> dict[str, dict[str, Any]]:
    """SHA-256 and size of the prepared input (``items.parquet``, ``events.parquet``): two
    runs with the same fingerprint learnt from the same data (~2 s per GB)."""
    found = {}
    for name in (io.ITEMS, io.EVENTS):
        path = Path(parquet_dir) / name
        if path.exists():
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            found[name] = {"sha256": digest, "bytes": path.stat().st_size}
    return found


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _point_current(runs: Path, run_id: str) -> None:
    """Swap ``runs/current`` to ``run_id`` atomically (a new symlink renamed over the old)."""
    temporary = runs / f".{CURRENT}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(run_id, temporary)
    pointer = runs / CURRENT
    if pointer.is_dir() and not pointer.is_symlink():
        # a copy of the folder that followed the link (shutil.copytree, cp -L): the runs
        # themselves are kept under their ids, so the copied pointer is dropped
        log.warning("%s is a folder, not a link (a copied folder?): replaced by a link", pointer)
        shutil.rmtree(pointer)
    os.replace(temporary, pointer)


def current_run(parquet_dir: Path) -> str | None:
    """The run id ``runs/current`` points at, or None."""
    pointer = Path(parquet_dir) / RUNS_DIR / CURRENT
    return os.readlink(pointer) if pointer.is_symlink() else None


def archive(parquet_dir: Path, manifest: dict[str, Any]) -> Path:
    """Keep the run now at the top level of ``parquet_dir`` as ``runs/<run_id>/`` (hard links,
    the manifest last) and point ``runs/current`` at it."""
    parquet = Path(parquet_dir)
    run_id = str(manifest["run_id"])
    runs = parquet / RUNS_DIR
    folder = runs / run_id
    staging = runs / f".{run_id}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    names = sorted(p.name for p in parquet.iterdir() if p.is_file() and _kept(p.name))
    for name in sorted(names, key=lambda n: n == io.MANIFEST):
        _link_or_copy(parquet / name, staging / name)
    work = parquet / WORK_DIR  # the stages' choices and model states, for a later rollback
    if work.is_dir():
        (staging / WORK_DIR).mkdir()
        for path in work.iterdir():
            if path.is_file() and _kept(path.name):
                _link_or_copy(path, staging / WORK_DIR / path.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    _point_current(runs, run_id)
    log.info("run %s kept in %s (%d files)", run_id, folder, len(names))
    return folder


def list_runs(parquet_dir: Path) -> list[dict[str, Any]]:
    """The kept runs, oldest first: id, when built, current or not, the served model and its
    NDCG@10 on the test period, the commit."""
    runs = Path(parquet_dir) / RUNS_DIR
    current = current_run(parquet_dir)
    found: list[dict[str, Any]] = []
    if not runs.is_dir():
        return found
    for folder in sorted(
        p
        for p in runs.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    ):
        manifest_path = folder / io.MANIFEST
        manifest = io.read_json(manifest_path) if manifest_path.exists() else {}
        served: dict[str, Any] = next(
            (
                row
                for row in manifest.get("metrics") or []
                if row.get("source") == "served"
                and row.get("k") == 10
                and row.get("segment", "all") == "all"
            ),
            {},
        )
        found.append(
            {
                "run_id": folder.name,
                "built_at": manifest.get("built_at"),
                "current": folder.name == current,
                "winner": (manifest.get("selection") or {}).get("winner"),
                "ndcg@10": served.get("ndcg"),
                "git_commit": (manifest.get("code") or {}).get("git_commit"),
                "files": sum(1 for p in folder.iterdir() if p.is_file()),
            }
        )
    return found


def _run_folder(parquet_dir: Path, run_id: str) -> Path:
    folder = Path(parquet_dir) / RUNS_DIR / run_id
    if run_id.startswith(".") or "/" in run_id or not (folder / io.MANIFEST).exists():
        kept = ", ".join(r["run_id"] for r in list_runs(parquet_dir)) or "none"
        raise DataError(f"{folder}: no such run (kept runs: {kept})")
    return folder


def use_run(parquet_dir: Path, run_id: str) -> dict[str, Any]:
    """Serve a kept run again (rollback): its served files are checked against its manifest,
    then linked into the top level, files first and ``manifest.json`` last; top-level
    artefacts the run does not have are removed before the manifest moves. Returns the
    manifest now in force."""
    from musicrec.served import verify_files

    parquet = Path(parquet_dir)
    folder = _run_folder(parquet, run_id)
    manifest = io.read_json(folder / io.MANIFEST)
    verify_files(folder, manifest)  # a damaged kept run is refused before anything moves
    staging = parquet / f".staging-use-{run_id}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        for name in names:
            _link_or_copy(folder / name, staging / name)
        for name in names:
            if name != io.MANIFEST:
                os.replace(staging / name, parquet / name)
        for path in parquet.iterdir():  # stale artefacts of the run being replaced
            if (
                path.is_file()
                and _kept(path.name)
                and path.name not in names
                and path.name not in (io.ITEMS,)
            ):
                path.unlink()
        os.replace(staging / io.MANIFEST, parquet / io.MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _restore_work(folder / WORK_DIR, parquet / WORK_DIR)
    _point_current(parquet / RUNS_DIR, run_id)
    log.info("now serving run %s from %s", run_id, parquet)
    return manifest


def _restore_work(kept: Path, work: Path) -> None:
    """Put a kept run's work files (split, search and selection choices, the ALS states the
    next run warm-starts from) back in place of the current ones, so a stage run after a
    rollback continues from the run being served. A run kept without them leaves ``work``
    as it is."""
    if not kept.is_dir():
        log.warning("%s: the run kept no work files; %s is left as it is", kept.parent, work)
        return
    work.mkdir(exist_ok=True)
    names = {p.name for p in kept.iterdir() if p.is_file()}
    for name in sorted(names):
        temporary = work / f".{name}.restore.tmp"
        temporary.unlink(missing_ok=True)
        _link_or_copy(kept / name, temporary)
        os.replace(temporary, work / name)
    for path in work.iterdir():
        if path.is_file() and _kept(path.name) and path.name not in names:
            path.unlink()


def prune(parquet_dir: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest runs; the current run is always kept. Returns the
    removed run ids."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1, got {keep}")
    runs = list_runs(parquet_dir)
    newest = {
        r["run_id"] for r in sorted(runs, key=lambda r: (r["built_at"] or "", r["run_id"]))[-keep:]
    }
    removed = []
    for run in runs:
        if run["run_id"] not in newest and not run["current"]:
            shutil.rmtree(Path(parquet_dir) / RUNS_DIR / run["run_id"])
            removed.append(run["run_id"])
    return removed


# --- the bucket -------------------------------------------------------------------------------


def push_run(settings: Any, run_id: str | None = None) -> list[str]:
    """Upload a kept run (default: the current one) to ``<prefix>/runs/<run_id>/`` with its
    manifest last, then move ``<prefix>/runs/current`` to it. Returns the keys written."""
    from musicrec import s3

    parquet = Path(settings.parquet_dir)
    run_id = run_id or current_run(parquet)
    if run_id is None:
        raise DataError(f"{parquet}: no kept run to push; run the pipeline first")
    folder = _run_folder(parquet, run_id)
    names = [p.name for p in folder.iterdir() if p.is_file()]
    keys = s3.upload_files(settings, folder, names, f"{RUNS_DIR}/{run_id}/")
    keys.append(s3.put_text(settings, f"{RUNS_DIR}/{CURRENT}", run_id))
    return keys


def remote_current(settings: Any) -> str | None:
    """The run id ``<prefix>/runs/current`` names in the bucket; None when there is none (a
    bucket pushed before runs were versioned holds the flat layout only)."""
    from musicrec import s3

    return s3.get_text(settings, f"{RUNS_DIR}/{CURRENT}")


def pull_run(settings: Any, run_id: str | None = None) -> list[str]:
    """Download a run from the bucket (default: the one ``<prefix>/runs/current`` names) into
    ``runs/<run_id>/`` of the artefact folder, then serve it (:func:`use_run`). Returns the
    local paths written."""
    from musicrec import s3

    if run_id is None:
        run_id = remote_current(settings)
        if run_id is None:
            raise DataError(
                f"{s3.location(settings, f'{RUNS_DIR}/{CURRENT}')}: no current run; push one first"
            )
    prefix = f"{RUNS_DIR}/{run_id}/"
    sizes = s3.list_files(settings, prefix)
    if io.MANIFEST not in sizes:
        raise DataError(f"{s3.location(settings, prefix)}: no such run (no {io.MANIFEST})")
    parquet = Path(settings.parquet_dir)
    paths = s3.download_files(settings, prefix, sizes, parquet / RUNS_DIR / run_id)
    use_run(parquet, run_id)
    return paths
