"""Bad artefacts never give wrong recommendations: the service refuses to start with a message
naming the file. Each case damages a private copy of artefacts built by the real pipeline
(tiny preset), so the manifest, page checksums and layout are the production ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from musicrec import io
from musicrec.errors import DataError
from musicrec.settings import Settings
from recommendation_service import create_app, load_artefacts
from tests.service_support import Service, copy_artefacts, tiny_artefacts


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return copy_artefacts(tiny_artefacts(), tmp_path / "parquet")


def settings_for(folder: Path) -> Settings:
    return Settings(
        parquet_dir=folder,
        history_url=f"sqlite:///{folder.parent}/history.db",
        reload_poll_seconds=0,
    )


def refuses(folder: Path, *words: str) -> str:
    """Start the app; it must raise DataError whose message has every one of ``words``."""
    with pytest.raises(DataError) as info, TestClient(create_app(settings_for(folder))):
        pass
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def rewrite(folder: Path, name: str, table: pa.Table, *, same_run: bool = True) -> None:
    """Replace an artefact; with ``same_run`` the manifest is updated to match it, as if the
    pipeline itself had written the bad file (so only the content checks can catch it)."""
    pq.write_table(table, folder / name, compression="zstd", write_page_checksum=True)
    if same_run:
        manifest = json.loads((folder / io.MANIFEST).read_text())
        size = (folder / name).stat().st_size
        if name in manifest["artefacts"]:
            manifest["artefacts"][name] = {"rows": table.num_rows, "bytes": size}
        else:
            manifest["prepared_files"][name] = size
        (folder / io.MANIFEST).write_text(json.dumps(manifest))


def test_the_untouched_set_loads(folder: Path) -> None:
    art = load_artefacts(folder)
    manifest = json.loads((folder / io.MANIFEST).read_text())
    assert art.run_id == manifest["run_id"]
    assert art.offline.n_pairs == manifest["artefacts"][io.RECOMMENDATIONS]["rows"]


@pytest.mark.parametrize("name", [io.ITEMS, io.TOP_POPULAR, io.SIMILAR, io.RECOMMENDATIONS])
def test_missing_file(folder: Path, name: str) -> None:
    (folder / name).unlink()
    refuses(folder, "missing artefact", name)


@pytest.mark.parametrize("name", [io.SIMILAR, io.RECOMMENDATIONS, io.ITEMS])
def test_truncated_file(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    refuses(folder, name, "bytes", "records")  # the manifest's byte count catches it first
    (folder / io.MANIFEST).unlink()  # and without a manifest, the parquet footer is gone
    refuses(folder, name, "not a readable parquet file")


def _corrupt_column(path: Path, column: str) -> None:
    """Flip bytes in the middle of a column's first data page, keeping the file size."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column
    )
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    for i in range(middle, middle + 8):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "column"),
    [
        (io.SIMILAR, "similar_track_id"),
        (io.RECOMMENDATIONS, "track_id"),
        (io.TOP_POPULAR, "track_id"),
        (io.ITEMS, "name"),
    ],
)
def test_corrupted_file_same_size(folder: Path, name: str, column: str) -> None:
    _corrupt_column(folder / name, column)
    refuses(folder, name)


def test_wrong_column(folder: Path) -> None:
    table = pq.read_table(folder / io.RECOMMENDATIONS)
    rewrite(
        folder, io.RECOMMENDATIONS, table.rename_columns(["user_id", "item_id", "score", "rank"])
    )
    refuses(folder, io.RECOMMENDATIONS, "column 'track_id' is missing")


@pytest.mark.parametrize(
    ("name", "column", "dtype", "words"),
    [
        (io.RECOMMENDATIONS, "track_id", pa.float64(), "has type double, expected int32"),
        (io.SIMILAR, "similar_track_id", pa.string(), "has type string, expected int32"),
        (io.TOP_POPULAR, "rank", pa.float32(), "has type float, expected int32"),
        (io.ITEMS, "artists", pa.string(), "has type string, expected list<string>"),
    ],
)
def test_wrong_dtype(folder: Path, name: str, column: str, dtype: pa.DataType, words: str) -> None:
    table = pq.read_table(folder / name)
    index = table.schema.get_field_index(column)
    values = table.column(column)
    values = pc.binary_join(values, ", ") if pa.types.is_list(values.type) else values.cast(dtype)
    table = table.set_column(index, column, values)
    rewrite(folder, name, table)
    refuses(folder, name, words)


def test_int64_ids_that_fit_are_accepted(folder: Path) -> None:
    """A wider integer type is not an error as long as every value fits."""
    table = pq.read_table(folder / io.RECOMMENDATIONS)
    rewrite(
        folder,
        io.RECOMMENDATIONS,
        table.set_column(1, "track_id", table.column("track_id").cast(pa.int64())),
    )
    assert load_artefacts(folder).offline.n_pairs == table.num_rows


def test_files_of_another_run(folder: Path) -> None:
    """A recommendations file of another run (fewer rows) beside this run's manifest."""
    table = pq.read_table(folder / io.RECOMMENDATIONS)
    rewrite(folder, io.RECOMMENDATIONS, table.slice(0, table.num_rows - 100), same_run=False)
    message = refuses(folder, io.RECOMMENDATIONS, "not from one run")
    assert "records" in message


def test_same_size_file_of_another_run_with_fewer_rows(folder: Path) -> None:
    """The row count in the manifest is checked too, not only the byte size."""
    manifest = json.loads((folder / io.MANIFEST).read_text())
    manifest["artefacts"][io.SIMILAR]["rows"] += 1
    (folder / io.MANIFEST).write_text(json.dumps(manifest))
    refuses(folder, io.SIMILAR, "rows", "not from one run")


def test_tracks_not_in_the_catalogue(folder: Path) -> None:
    """Recommendations naming a track that items.parquet lacks (items of another run)."""
    unknown = max(pq.read_table(folder / io.ITEMS).column("track_id").to_pylist()) + 1
    recs = pq.read_table(folder / io.RECOMMENDATIONS)
    tracks = recs.column("track_id").to_pylist()
    tracks[5] = unknown
    rewrite(
        folder, io.RECOMMENDATIONS, recs.set_column(1, "track_id", pa.array(tracks, pa.int32()))
    )
    refuses(folder, io.RECOMMENDATIONS, "not in items.parquet", str(unknown))


def _unsort(table: pa.Table) -> pa.Table:
    return table.take(pa.array(list(range(table.num_rows))[::-1]))


def _nan_score(table: pa.Table) -> pa.Table:
    scores = pc.multiply(table.column("score"), pa.scalar(float("nan"), pa.float32()))
    return table.set_column(table.schema.get_field_index("score"), "score", scores)


@pytest.mark.parametrize(
    ("name", "change", "words"),
    [
        (io.RECOMMENDATIONS, _unsort, "not sorted by user_id, rank"),
        (io.SIMILAR, _nan_score, "not finite"),
    ],
)
def test_content_checks(
    folder: Path, name: str, change: Callable[[pa.Table], pa.Table], words: str
) -> None:
    rewrite(folder, name, change(pq.read_table(folder / name)))
    refuses(folder, name, words)


def test_bad_manifest(folder: Path) -> None:
    (folder / io.MANIFEST).write_text("{not json")
    refuses(folder, io.MANIFEST, "not a readable manifest")


def test_uvicorn_refuses_to_start_and_names_the_file(folder: Path, tmp_path: Path) -> None:
    """The real server: exits with an error naming the file, never serves."""
    _corrupt_column(folder / io.SIMILAR, "similar_track_id")
    service = Service(folder, tmp_path / "history.db", tmp_path / "server.log")
    code, log = service.run_until_exit()
    assert code != 0
    assert "similar.parquet" in log and "page integrity" in log, log[-2000:]
