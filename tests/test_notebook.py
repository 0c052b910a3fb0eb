"""``recommendations.ipynb``: the committed file matches its build script and carries a clean
run; executed headless on the ``tiny`` preset it runs every cell without an error.

The notebook is executed with the ``python3`` kernel of this interpreter's environment
(ipykernel installs that kernel spec into the venv, so a fresh venv made from requirements.txt
has it), from the repository root, with ``MUSICREC_*`` pointing at temporary folders: the empty
data folder makes the notebook generate the preset itself, as it does on a first run.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import nbformat
import pandas as pd
import pytest

from musicrec.sources import SOURCES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "recommendations.ipynb"
CELL_TIMEOUT = 90  # seconds per cell; the whole tiny run takes about 30 s


def _builder() -> ModuleType:
    path = ROOT / "notebooks" / "build_notebook.py"
    spec = importlib.util.spec_from_file_location("build_notebook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
def builder() -> ModuleType:
    return _builder()


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
    builder: ModuleType, committed: nbformat.NotebookNode, tmp_path_factory: pytest.TempPathFactory
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
            builder.execute(nb, ROOT, timeout=CELL_TIMEOUT)
        except Exception as exc:  # CellExecutionError carries the failing cell's traceback
            pytest.fail(f"the notebook failed on the tiny preset:\n{exc}"[:4000])
        elapsed = time.perf_counter() - started
    return nb, root, elapsed


def _work(root: Path, name: str) -> dict:
    return json.loads((root / "parquet" / "work" / name).read_text())


def test_committed_cells_are_the_build_scripts(
    builder: ModuleType, committed: nbformat.NotebookNode
) -> None:
    built = builder.build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in built.cells
    ], "recommendations.ipynb differs from notebooks/build_notebook.py: rebuild it"


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


def test_prose_hard_codes_no_result(builder: ModuleType) -> None:
    """Numbers of a run are printed by code cells; markdown holds none (e.g. 0.123, 12.34)."""
    for cell in builder.build().cells:
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
    for name in ("top_popular.parquet", "personal_als.parquet", "similar.parquet",
                 "recommendations.parquet", "metrics.parquet", "candidate_recall.parquet",
                 "manifest.json"):
        assert (root / "parquet" / name).stat().st_size > 0, name
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
