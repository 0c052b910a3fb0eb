"""The docs in ``docs/`` are current: the settings reference is what ``Settings`` generates,
the HTTP contract names every route, header and error code of the app, the data tables match
what the generator and ``prepare`` write, and the full-size recipe's commands parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq

from musicrec import io
from musicrec.cli import build_parser, settings_markdown
from musicrec.history import HistoryStoreError
from musicrec.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_settings_reference_is_generated_from_settings() -> None:
    assert (DOCS / "SETTINGS.md").read_text() == settings_markdown(), (
        "docs/SETTINGS.md is stale: run `python -m musicrec config --doc > docs/SETTINGS.md`"
    )
    text = (DOCS / "SETTINGS.md").read_text()
    for name in Settings.model_fields:
        assert f"`MUSICREC_{name.upper()}`" in text


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def test_the_api_doc_names_every_route_header_and_code() -> None:
    import recommendation_service as service

    text = (DOCS / "API.md").read_text()
    app = service.create_app(Settings(reload_poll_seconds=0))
    documented = {p.split("?")[0] for p in re.findall(r"`(/[^`\s]*)`", text)}
    # the schema lists every declared route (routers are included lazily: app.routes holds
    # the routers, not their routes)
    paths = app.openapi()["paths"]
    assert {"/recommendations/{user_id}", "/history/{user_id}", "/health", "/metrics"} <= set(paths)
    for path in paths:
        assert path in documented, f"{path} is not in docs/API.md"
    for header in (
        service.SOURCE_HEADER,
        "X-History-First-Position",
        "X-History-Total",
        "X-History-Length",
        "Idempotency-Key",
        "Idempotent-Replayed",
        "Retry-After",
    ):
        assert f"`{header}`" in text, header
    for status in {*service.ERROR_STATUS.values(), 413, 401, 403, 409}:
        assert re.search(rf"^\| (\d+, )?{status}\b", text, re.MULTILINE), status
    for cls in _subclasses(HistoryStoreError):
        assert f"`{cls.code}`" in text, cls.code
    assert "`body_too_large`" in text
    for model in (service.Health, service.ManifestWatch):
        for field in model.model_fields:
            assert f'"{field}"' in text, f"{model.__name__}.{field}"
    for kind in service.KINDS:
        assert f"`{kind}`" in text, kind


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The rows of the first markdown table after ``heading``, cells stripped."""
    section = text.split(heading, 1)[1]
    rows, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            separator = all(cell and set(cell) <= {"-", ":"} for cell in cells)
            if not separator and cells[0] not in ("file", "column"):
                rows.append(cells)
        elif started:
            break
    return rows


def _dtype(text: str) -> str:
    return (
        text.replace("<element: ", "<")
        .replace("<item: ", "<")
        .replace(" not null", "")
        .replace("date32[day]", "date32")
    )


def test_the_data_doc_matches_the_generated_and_prepared_files(
    tiny_data: Path, tiny_prepared: Path
) -> None:
    text = (DOCS / "DATA.md").read_text()
    documented, current = {}, ""
    for cells in _table_rows(text, "## Input schema"):
        current = cells[0] or current
        documented[(current, cells[1])] = cells[2]
    written = {
        (name, field.name): _dtype(str(field.type))
        for name in io.INPUT_FILES
        for field in pq.read_schema(tiny_data / name)
    }
    assert set(documented) == set(written)
    for key, dtype in written.items():
        shown = documented[key].split(" ")[0]
        assert shown == dtype or (shown == "datetime64" and dtype.startswith("timestamp")), (
            key,
            shown,
            dtype,
        )
    for name, heading in (
        (io.ITEMS, "### Output: `items.parquet`"),
        (io.EVENTS, "### Output: `events.parquet`"),
    ):
        rows = {cells[0]: cells[1] for cells in _table_rows(text, heading)}
        schema = {f.name: _dtype(str(f.type)) for f in pq.read_schema(tiny_prepared / name)}
        assert rows == schema, name


def test_the_full_scale_recipe_commands_parse() -> None:
    text = (DOCS / "FULL_SCALE.md").read_text()
    recipe = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [
        line.split("#")[0].split(">")[0].strip().removeprefix("nohup ")
        for line in recipe.splitlines()
    ]
    commands = [c for c in commands if c.startswith("musicrec ")]
    assert len(commands) >= 5
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.command == shlex.split(command)[1]
