"""``recommendations.ipynb``: the committed file and its plain-text twin
(``notebooks/recommendations.py``, jupytext percent format) hold the same cells, the notebook
carries a clean run; executed headless on the ``tiny`` preset it runs every cell without an
error.

The notebook is executed with the ``python3`` kernel of this interpreter's environment
(ipykernel installs that kernel spec into the venv, so a fresh venv made from requirements.txt
has it), from the repository root, with ``MUSICREC_*`` pointing at temporary folders: the empty
data folder makes the notebook generate the preset itself, as it does on a first run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from musicrec.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "recommendations.ipynb"
TWIN = ROOT / "notebooks" / "recommendations.py"
PAIRING = "ipynb,notebooks//py:percent"
CELL_TIMEOUT = 90  # seconds per cell; the whole tiny run takes about 30 s


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int) -> None:
    """Run ``nb`` in place with the ``python3`` kernel from ``cwd`` (``import musicrec`` works
    from the repository root); no per-cell timing nor widget state is recorded."""
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        store_widget_state=False,
        resources={"metadata": {"path": str(cwd)}},
    ).execute()


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, list(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


def _text(cell: nbformat.NotebookNode) -> str:
    """Every text a code cell printed or returned (streams, text/plain, text/html)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.extend(str(output.data.get(kind, "")) for kind in ("text/plain", "text/html"))
    return "\n".join(parts)


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {index}: {output.ename}: {output.evalue}"
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


@pytest.fixture(scope="module")
def committed() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


# The tiny run's settings, passed as the notebook gets them (Settings() reads MUSICREC_*): a
# short search, a small EASE, few bootstrap resamples, and a ranker threshold that the tiny
# preset's few validation listens can reach.
TINY_ENV = {
    "MUSICREC_PRESET": "tiny",
    "MUSICREC_SEARCH_TRIALS": "2",
    "MUSICREC_EASE_MAX_ITEMS": "300",
    "MUSICREC_BOOTSTRAP": "100",
    "MUSICREC_RANKER_MIN_POSITIVES": "20",
}


@pytest.fixture(scope="module")
def executed(
    committed: nbformat.NotebookNode, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nbformat.NotebookNode, Path, float]:
    """The committed notebook, outputs cleared, executed on the tiny preset."""
    root = tmp_path_factory.mktemp("notebook")
    nb = copy.deepcopy(committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MUSICREC_DATA_DIR", str(root / "data"))
        env.setenv("MUSICREC_PARQUET_DIR", str(root / "parquet"))
        for name, value in TINY_ENV.items():
            env.setenv(name, value)
        env.setenv("OPENBLAS_NUM_THREADS", "1")
        env.setenv("MPLBACKEND", "Agg")
        # this environment's kernel spec first, before any user-level "python3" spec
        env.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
        started = time.perf_counter()
        try:
            execute(nb, ROOT, timeout=CELL_TIMEOUT)
        except Exception as exc:  # CellExecutionError carries the failing cell's traceback
            pytest.fail(f"the notebook failed on the tiny preset:\n{exc}"[:4000])
        elapsed = time.perf_counter() - started
    return nb, root, elapsed


def _work(root: Path, name: str) -> dict:
    return json.loads((root / "parquet" / "work" / name).read_text())


def test_the_notebook_and_its_text_twin_hold_the_same_cells() -> None:
    """Either file may be edited; ``jupytext --sync recommendations.ipynb`` brings the other in
    line. Cell types, sources and tags (by which the tests below find cells) must agree."""
    notebook, twin = jupytext.read(NOTEBOOK), jupytext.read(TWIN)
    assert _cells(notebook) == _cells(twin), (
        "recommendations.ipynb and notebooks/recommendations.py differ: "
        "run `jupytext --sync recommendations.ipynb`"
    )
    # both files name the pairing, and so does pyproject.toml (for new notebooks)
    assert notebook.metadata["jupytext"]["formats"] == PAIRING
    assert twin.metadata["jupytext"]["formats"] == PAIRING
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["jupytext"]["formats"] == PAIRING
    assert "format_name: percent" in TWIN.read_text()[:400]
    assert not (ROOT / "notebooks" / "build_notebook.py").exists()


def test_a_twin_edit_reaches_the_notebook_keeping_outputs(tmp_path: Path) -> None:
    """The edit path the pairing promises: change a cell in the .py, sync, and the .ipynb gets
    the change while the other cells keep their outputs."""
    (tmp_path / "notebooks").mkdir()
    nb_path, twin_path = tmp_path / NOTEBOOK.name, tmp_path / "notebooks" / TWIN.name
    nb_path.write_bytes(NOTEBOOK.read_bytes())
    text = TWIN.read_text()
    twin_path.write_text(
        text.replace(
            "# %% [markdown]\n# ### Input data", "# %% [markdown]\n# ### Input data (edited)", 1
        )
    )
    os.utime(nb_path, (time.time() - 60, time.time() - 60))  # the twin is the newer file
    done = subprocess.run(
        [sys.executable, "-m", "jupytext", "--sync", str(nb_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    synced = nbformat.read(nb_path, as_version=4)
    assert any(c.source.startswith("### Input data (edited)") for c in synced.cells)
    outputs = [len(c.outputs) for c in synced.cells if c.cell_type == "code"]
    committed = [
        len(c.outputs) for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"
    ]
    assert outputs == committed


def test_committed_notebook_carries_a_clean_small_run(committed: nbformat.NotebookNode) -> None:
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell was not executed"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert _errors(committed) == []
    # the committed outputs come from the default preset, generated by the notebook itself
    assert "generating the 'small' preset" in _text(_tagged(committed, "input-data"))
    assert "ndcg" in _text(_tagged(committed, "metrics-table"))
    assert "served model:" in _text(_tagged(committed, "selection-table"))
    assert "served vs popular" in _text(_tagged(committed, "ndcg-margins"))
    assert "widgets" not in committed.metadata
    assert NOTEBOOK.stat().st_size < 1_000_000


def test_prose_hard_codes_no_result() -> None:
    """Numbers of a run are printed by code cells; markdown holds none (e.g. 0.123, 12.34)."""
    for cell in jupytext.read(TWIN).cells:
        if cell.cell_type == "markdown":
            assert not re.search(r"\d\.\d\d", cell.source), cell.source[:200]


def test_runs_headless_on_tiny_without_errors(
    executed: tuple[nbformat.NotebookNode, Path, float],
) -> None:
    nb, root, elapsed = executed
    assert _errors(nb) == []
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
    assert elapsed < 110, f"the tiny run took {elapsed:.0f} s"
    # the empty data folder was filled with the tiny preset, then the pipeline wrote its set
    for name in ("tracks.parquet", "catalog_names.parquet", "interactions.parquet"):
        assert (root / "data" / name).stat().st_size > 0, name
    for name in (
        "top_popular.parquet",
        "personal_als.parquet",
        "similar.parquet",
        "recommendations.parquet",
        "metrics.parquet",
        "candidate_recall.parquet",
        "manifest.json",
    ):
        assert (root / "parquet" / name).stat().st_size > 0, name
    # the notebook turns the progress setting off: no bar in any output
    streams = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )
    assert " steps |" not in streams and "batch/s" not in streams and "it/s]" not in streams
    trained = "ranker" in _work(root, "selection.json")["ndcg@10"]
    assert (root / "parquet" / "ranker.cbm").exists() == trained
    assert "generating the 'tiny' preset" in _text(_tagged(nb, "input-data"))


def test_search_shows_every_trial_and_what_validation_chose(
    executed: tuple[nbformat.NotebookNode, Path, float],
) -> None:
    nb, root, _ = executed
    search = _work(root, "search.json")
    assert set(search) == set(SOURCES)  # the default sources: every one
    table = _text(_tagged(nb, "search-trials"))
    n_trials = sum(len(choice["trials"]) for choice in search.values())
    assert f"{n_trials} trials" in table
    assert all(len(choice["trials"]) <= 2 for choice in search.values())  # MUSICREC_SEARCH_TRIALS
    chosen = _text(_tagged(nb, "search-chosen"))
    for name, choice in search.items():
        assert f"{name}: validation chose" in chosen
        assert f"{choice['ndcg']:.4f}" in chosen
    assert "alpha" in chosen and "decay" in chosen  # ALS's choice in words


def test_selection_names_the_winner_and_why(
    executed: tuple[nbformat.NotebookNode, Path, float],
) -> None:
    nb, root, _ = executed
    selection = _work(root, "selection.json")
    text = _text(_tagged(nb, "selection-table"))
    for name, score in selection["ndcg@10"].items():
        assert name in text and f"{score['ndcg']:.4f}" in text
    assert f"served model: {selection['winner']}" in text
    assert selection["reason"] in text
    if selection["winner"] != "ranker":
        assert "the ranker was NOT served" in text


def test_metrics_ratios_and_candidate_recall_are_shown(
    executed: tuple[nbformat.NotebookNode, Path, float],
) -> None:
    nb, root, _ = executed
    metrics = pd.read_parquet(root / "parquet" / "metrics.parquet")
    table = _text(_tagged(nb, "metrics-table"))
    assert "ndcg_low" in table
    for source in ("popular", "als", "served"):
        assert source in table
    at10 = metrics[(metrics["segment"] == "all") & (metrics["k"] == 10)].set_index("source")
    ndcg = at10["ndcg"]
    reference = "als_plain" if "als_plain" in ndcg.index else "als"
    margins = _text(_tagged(nb, "ndcg-margins"))
    assert f"served vs popular: NDCG@10 {ndcg['served']:.4f}" in margins
    assert f"= {ndcg['served'] / ndcg['popular']:.2f}x" in margins
    assert f"served vs {reference}:" in margins
    assert f"= {ndcg['served'] / ndcg[reference]:.2f}x" in margins
    recall = pd.read_parquet(root / "parquet" / "candidate_recall.parquet").set_index("source")
    shown = _text(_tagged(nb, "candidate-recall"))
    assert "union" in shown and f"{recall.loc['union', 'recall']:.1%}" in shown
    assert f"{recall.loc['union', 'ceiling_ndcg']:.3f}" in shown
    findings = _text(_tagged(nb, "findings"))
    assert "won on held-out validation users" in findings and "test period, NDCG@10" in findings


@pytest.mark.parametrize("progress", [True, False])
def test_evaluate_shows_its_stage_counter_unless_silenced(
    executed: tuple[nbformat.NotebookNode, Path, float], tmp_path: Path, progress: bool
) -> None:
    """``musicrec evaluate`` on the notebook's tiny run (a copy): each step counted on the log
    and a bar on stderr; ``--set progress=false`` silences both."""
    _, root, _ = executed
    parquet = tmp_path / "parquet"
    shutil.copytree(root / "parquet", parquet)
    env = {
        **os.environ,
        **TINY_ENV,
        "OPENBLAS_NUM_THREADS": "1",
        "MUSICREC_DATA_DIR": str(root / "data"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "musicrec",
            "evaluate",
            "--parquet-dir",
            str(parquet),
            "--set",
            f"progress={str(progress).lower()}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counted = [f"evaluate {i}/4: " in done.stderr for i in range(1, 5)]
    assert counted == [progress] * 4, done.stderr[-3000:]
    assert ("evaluate: 3/4 steps" in done.stderr) == progress
    assert "stage evaluate: done" in done.stderr  # the log itself is not silenced
