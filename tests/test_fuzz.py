"""Schemathesis against the running service's OpenAPI schema: every endpoint and method, valid
and invalid input, a bounded number of examples each. No answer may be a server error, and
every answer must match the schema (status code, content type, body, headers); invalid input
must be refused with a 4xx.

Random ids are almost never in the catalogue, so the core logic would only ever answer 422:
a second pass replaces the generated ids (tracks, users, k, limits) by known ones and must get
mostly 200s; the admin endpoint is called with the valid token; every POST also gets an
oversized body (413, by Content-Length and chunked)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_support import Service, copy_artefacts, tiny_artefacts

MAX_EXAMPLES = 40
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("fuzz")
    folder = copy_artefacts(tiny_artefacts(), work / "parquet")
    with Service(
        folder, work / "history.db", work / "server.log", MUSICREC_ADMIN_TOKEN=TOKEN
    ) as svc:
        svc.start()
        yield svc


@pytest.fixture(scope="module")
def api_schema(service: Service) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(service.url + "/openapi.json")


OPERATIONS = [
    ("GET", "/"),
    ("GET", "/top_popular"),
    ("GET", "/top_popular/{k}"),
    ("GET", "/similar/{k}"),
    ("POST", "/similar/{k}"),
    ("GET", "/history/{user_id}"),
    ("POST", "/history/{user_id}"),
    ("GET", "/recommendations/{user_id}"),
    ("POST", "/recommendations"),
    ("GET", "/stats"),
    ("GET", "/health"),
    ("POST", "/admin/reload"),
    ("GET", "/metrics"),
    ("GET", "/ui"),
    ("GET", "/users"),
    ("GET", "/users/{user_id}"),
    ("GET", "/tracks"),
]


WITHOUT_INPUT = {
    ("GET", "/"),
    ("GET", "/stats"),
    ("GET", "/health"),
    ("POST", "/admin/reload"),
    ("GET", "/metrics"),
    ("GET", "/ui"),
}
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if (m, p) not in WITHOUT_INPUT
]  # nothing invalid can be made for an operation without input (any header is a string)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    """Bounded examples of one operation; any failed check fails the test with the curl
    command that reproduces it."""
    operation = api_schema[path][method]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    run()


def test_every_operation_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    """The schema the fuzzer walks has every endpoint of API.md and the admin one."""
    operations = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert operations == set(OPERATIONS)


def test_service_log_has_no_traceback(service: Service) -> None:
    assert "Traceback" not in service.log(), service.log()[-3000:]


@pytest.fixture(scope="module")
def known() -> dict[str, list[int]]:
    """Ids the service knows: catalogue tracks and users with offline lists."""
    folder = tiny_artefacts()
    tracks = pq.read_table(folder / "items.parquet", columns=["track_id"]).column(0)
    users = pq.read_table(folder / "recommendations.parquet", columns=["user_id"]).column(0)
    return {
        "tracks": sorted(set(tracks.to_pylist()))[:500],
        "users": sorted(set(users.to_pylist()))[:200],
    }


def _with_known_ids(
    case: schemathesis.Case, data: st.DataObject, known: dict[str, list[int]]
) -> None:
    """Put known ids and in-range numbers where the generator put random ones."""
    track = st.sampled_from(known["tracks"])
    user = st.one_of(st.sampled_from(known["users"]), st.integers(0, 2**31 - 1))
    path = case.path_parameters or {}
    if "k" in path:
        path["k"] = data.draw(st.integers(1, 100))
    if "user_id" in path:
        path["user_id"] = data.draw(user)
    query = case.query or {}
    if "track_id" in query:
        query["track_id"] = data.draw(st.lists(track, min_size=1, max_size=20))
    if "k" in query:
        query["k"] = data.draw(st.integers(1, 100))
    if "limit" in query:
        query["limit"] = data.draw(st.integers(1, 1000))
    if isinstance(case.body, list):
        case.body = data.draw(st.lists(track, min_size=1, max_size=50))
    elif isinstance(case.body, dict):
        case.body["user_id"] = data.draw(user)
        if "k" in case.body:
            case.body["k"] = data.draw(st.integers(1, 100))
    case.headers = {
        k: v for k, v in (case.headers or {}).items() if k.lower() != "idempotency-key"
    } or None  # random keys: no replays


WITH_IDS = [
    ("POST", "/history/{user_id}"),
    ("GET", "/history/{user_id}"),
    ("GET", "/similar/{k}"),
    ("POST", "/similar/{k}"),
    ("GET", "/recommendations/{user_id}"),
    ("POST", "/recommendations"),
]


@pytest.mark.parametrize(("method", "path"), WITH_IDS)
def test_fuzz_with_known_ids_reaches_the_core(
    api_schema: schemathesis.BaseSchema, known: dict[str, list[int]], method: str, path: str
) -> None:
    """Valid input with known ids: the same checks, and most answers must be 200 (the core
    logic ran), not 422."""
    operation = api_schema[path][method]
    codes: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE), data=st.data())
    def run(case: schemathesis.Case, data: st.DataObject) -> None:
        _with_known_ids(case, data, known)
        codes.append(case.call_and_validate(checks=CHECKS, timeout=30).status_code)

    run()
    assert codes.count(200) >= 0.6 * len(codes), codes


def test_fuzz_admin_with_the_valid_token(api_schema: schemathesis.BaseSchema) -> None:
    """With the token the reload logic runs (the folder's run is the served one: skipped)."""
    operation = api_schema["/admin/reload"]["POST"]
    codes: list[int] = []

    @settings(
        max_examples=5,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def run(case: schemathesis.Case) -> None:
        case.headers = {**(case.headers or {}), **AUTH}
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        codes.append(response.status_code)
        assert response.json()["skipped"] is True

    run()
    assert codes and set(codes) == {200}


POSTS = [
    ("/history/{user_id}", {"user_id": 3}),
    ("/similar/{k}", {"k": 5}),
    ("/recommendations", {}),
    ("/admin/reload", {}),
]


@pytest.mark.parametrize(("path", "path_parameters"), POSTS)
def test_fuzz_oversized_bodies(
    api_schema: schemathesis.BaseSchema,
    service: Service,
    known: dict[str, list[int]],
    path: str,
    path_parameters: dict[str, Any],
) -> None:
    """Bodies over the limit (256 KiB): 413 as documented, whether the size is announced
    (Content-Length) or streamed (chunked), for valid and for garbage content."""
    operation = api_schema[path]["POST"]
    big_ids = [known["tracks"][i % len(known["tracks"])] for i in range(40_000)]
    case = operation.Case(
        path_parameters=path_parameters or None,
        body=big_ids,
        media_type="application/json",
        headers=AUTH if path == "/admin/reload" else None,
    )
    response = case.call_and_validate(checks=CHECKS, timeout=30)
    assert response.status_code == 413, response.text
    url = service.url + path.format(**path_parameters)
    garbage = b"\xff" * 300_000

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(garbage), 16_384):
            yield garbage[start : start + 16_384]

    streamed = requests.post(
        url, data=chunks(), timeout=30, headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and streamed.json()["code"] == "body_too_large"
