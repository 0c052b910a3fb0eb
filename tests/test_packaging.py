"""Packaging: pyproject.toml declares every dependency once, requirements.txt pins exactly the
same names at versions pyproject accepts, each extra holds what its code imports (the service
extra only what the service imports), and the wheel holds the package, the service module and
the console scripts.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Imported directly but versioned by the distribution that requires them (fastapi fixes its
# starlette range, boto3 its botocore version): declaring them again would be a second place to
# keep in step.
PROVIDED_BY = {"starlette": "fastapi", "botocore": "boto3", "ipython": "ipykernel"}
# Declared and pinned although no module imports them: a front end, commands, a test client.
NOT_IMPORTED = {
    "jupyter": "the notebook's front end",
    "ruff": "the linter, run as a command",
    "py-spy": "a profiler, run as a command",
    "httpx": "the HTTP client fastapi.testclient uses",
    "ipykernel": "the notebook's kernel",
    "wheel": "bdist_wheel for the venv's setuptools 65.5 (the wheel test builds without isolation)",
    "mypy": "the type checker, run as a command",
    "pandas-stubs": "pandas' types, read by mypy",
    "scipy-stubs": "scipy's types, read by mypy",
    "codespell": "the spelling check, run as a command",
    "pre-commit": "runs the checks before each commit, a command",
    "pytest-xdist": "a pytest plugin: run_tests.sh spreads the files over two workers",
}


def _declared(extra: str | None) -> dict[str, Requirement]:
    """The requirements of the core (extra None) or of one extra, self-references left out."""
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != "musicrec"}


def _all_declared() -> dict[str, Requirement]:
    every = dict(_declared(None))
    for extra in PROJECT["optional-dependencies"]:
        for name, req in _declared(extra).items():
            assert name not in every, f"{name} is declared twice in pyproject.toml"
            every[name] = req
    return every


def _pins() -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name not in pins, f"{name} is pinned twice in requirements.txt"
            pins[name] = req
    return pins


def _third_party_imports(paths: list[Path]) -> set[str]:
    """Distribution names (canonical) of the non-local top-level modules the files import."""
    dists = importlib.metadata.packages_distributions()
    local = {
        "musicrec",
        "recommendation_service",
        "tests",
        "bench",
        "test_service",
        *(p.stem for p in ROOT.glob("bench/*.py")),
        *(p.stem for p in ROOT.glob("tests/*.py")),
    }
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in local or top in sys.stdlib_module_names or top == "__future__":
                    continue
                assert top in dists, f"{path.name} imports {top}, which no distribution provides"
                found.add(canonicalize_name(dists[top][0]))
    return found


def _service_modules() -> list[Path]:
    """recommendation_service.py and the musicrec modules it reaches through imports."""
    todo, seen = [ROOT / "recommendation_service.py"], []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "musicrec":
                todo += [ROOT / "musicrec" / f"{a.name}.py" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("musicrec."):
                todo.append(ROOT / "musicrec" / f"{node.module.split('.')[1]}.py")
    return seen


def _resolve(names: set[str]) -> set[str]:
    return {PROVIDED_BY.get(name, name) for name in names}


def test_requirements_pin_exactly_the_declared_names_at_accepted_versions() -> None:
    declared, pins = _all_declared(), _pins()
    assert sorted(pins) == sorted(declared), (
        f"only in requirements.txt: {sorted(set(pins) - set(declared))}; "
        f"only in pyproject.toml: {sorted(set(declared) - set(pins))}"
    )
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name} is not pinned exactly in requirements.txt"
        assert declared[name].specifier.contains(spec.version), (
            f"requirements.txt pins {name}=={spec.version}, pyproject.toml asks "
            f"{declared[name].specifier}"
        )
        assert pin.extras == declared[name].extras, f"{name}: extras differ"


def test_every_service_dependency_is_imported_by_the_service() -> None:
    """The service extra holds nothing the service does not import (lazily included: the
    redis client only when the history URL says so, prometheus_client when metrics are on)."""
    imported = _resolve(_third_party_imports(_service_modules()))
    core_and_service = set(_declared(None)) | set(_declared("service"))
    assert core_and_service <= imported, (
        f"declared for the service but not imported by it: {sorted(core_and_service - imported)}"
    )


def _closure(names: dict[str, Requirement]) -> set[str]:
    """The installed distributions that ``names`` bring in, with their extras."""
    found: set[str] = set()
    todo = [(name, set(req.extras)) for name, req in names.items()]
    while todo:
        name, extras = todo.pop()
        if name in found:
            continue
        found.add(name)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in (extras or {""})
            )
            if wanted:
                todo.append((canonicalize_name(req.name), set(req.extras)))
    return found


# Run in a fresh interpreter: any import of a distribution outside the core + service extra
# (and what they require) fails, as it would after `pip install musicrec[service]`.
BLOCKER = """
import importlib.abc, importlib.metadata, json, sys
ALLOWED = set(json.loads(sys.argv[1]))
DISTS = importlib.metadata.packages_distributions()
LOCAL = {"musicrec", "recommendation_service"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in LOCAL or top in sys.stdlib_module_names or top not in DISTS:
            return None
        dists = {d.lower().replace("_", "-") for d in DISTS[top]}
        if dists & ALLOWED:
            return None
        raise ModuleNotFoundError(f"blocked: {name} ({sorted(dists)}) is not in musicrec[service]",
                                  name=name)

sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[:1]
from recommendation_service import main
main()
"""


def test_the_service_runs_with_only_the_service_extra(tmp_path: Path) -> None:
    """A real uvicorn process that can import only the core and the service extra (and their
    requirements) loads artefacts, answers /health, lists, history writes and /metrics."""
    import requests

    from tests.service_support import free_port
    from tests.test_service_app import write_artefacts

    folder = write_artefacts(tmp_path)
    allowed = _closure({**_declared(None), **_declared("service")})
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MUSICREC_PARQUET_DIR": str(folder),
        "MUSICREC_PORT": str(port),
        "MUSICREC_HISTORY_URL": f"sqlite:///{folder}/history.db",
        "MUSICREC_RELOAD_POLL_SECONDS": "0",
        "MUSICREC_METRICS_DIR": str(tmp_path / "m"),
    }
    log = (tmp_path / "service.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, json.dumps(sorted(allowed))],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "service.log").read_text()[-3000:]
            time.sleep(0.2)
        assert requests.get(f"{url}/recommendations/1?k=3", timeout=5).json() == [100, 90, 80]
        added = requests.post(f"{url}/history/7", json=[10], timeout=5)
        assert added.status_code == 200, added.text
        assert requests.get(f"{url}/similar/2?track_id=10", timeout=5).json() == [20, 30]
        metrics = requests.get(f"{url}/metrics", timeout=5)
        assert metrics.status_code in (200, 404), metrics.text  # 404: metrics turned off
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
    assert "blocked:" not in (tmp_path / "service.log").read_text()


def test_the_runtime_extras_cover_the_package_and_are_all_used() -> None:
    imported = _resolve(
        _third_party_imports(
            [*(ROOT / "musicrec").glob("*.py"), ROOT / "recommendation_service.py"]
        )
    )
    runtime = ("service", "pipeline", "spark")
    allowed = set(_declared(None)).union(*(set(_declared(extra)) for extra in runtime))
    assert imported <= allowed, f"musicrec imports undeclared {sorted(imported - allowed)}"
    for extra in runtime:
        unused = set(_declared(extra)) - imported
        assert not unused, f"the {extra} extra declares {sorted(unused)}, which nothing imports"


def test_tests_benchmarks_and_notebook_import_only_declared_names() -> None:
    files = [
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("bench/*.py"),
        ROOT / "test_service.py",
        *ROOT.glob("notebooks/*.py"),
    ]
    imported = _resolve(_third_party_imports(files))
    declared = set(_all_declared())
    assert imported <= declared, f"undeclared: {sorted(imported - declared)}"
    unused = (
        declared
        - imported
        - _resolve(
            _third_party_imports([*ROOT.glob("musicrec/*.py"), ROOT / "recommendation_service.py"])
        )
    )
    assert unused <= set(NOT_IMPORTED), (
        f"declared, imported by nothing: {sorted(unused - set(NOT_IMPORTED))}"
    )


def test_the_wheel_holds_the_package_the_service_and_the_scripts(tmp_path: Path) -> None:
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "musicrec", source / "musicrec", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "recommendation_service.py"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("musicrec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {name.split("/")[0] for name in names if ".dist-info" not in name}
        assert top == {"musicrec", "recommendation_service.py"}
        assert "musicrec/cli.py" in names
        assert "musicrec/ui/index.html" in names  # package data: the service's /ui page
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        scripts = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    import musicrec

    assert f"Version: {musicrec.__version__}" in metadata
    for extra in ("service", "pipeline", "notebook", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    assert re.search(r"Requires-Dist: faiss-cpu.*extra == .pipeline.", metadata)
    assert "musicrec = musicrec.cli:main" in scripts
    assert "musicrec-service = recommendation_service:main" in scripts


@pytest.mark.parametrize("name", sorted(NOT_IMPORTED))
def test_every_unimported_pin_is_declared(name: str) -> None:
    assert name in _all_declared(), f"NOT_IMPORTED names {name}, which pyproject does not declare"
