"""Schemathesis against the running service's OpenAPI schema: every endpoint and method, valid
and invalid input, a bounded number of examples each. No answer may be a server error, and
every answer must match the schema (status code, content type, body, headers); invalid input
must be refused with a 4xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
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
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("fuzz")
    folder = copy_artefacts(tiny_artefacts(), work / "parquet")
    with Service(folder, work / "history.db", work / "server.log",
                 MUSICREC_ADMIN_TOKEN="fuzz-token") as svc:
        svc.start()
        yield svc


@pytest.fixture(scope="module")
def api_schema(service: Service) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(service.url + "/openapi.json")


OPERATIONS = [("GET", "/"), ("GET", "/top_popular"), ("GET", "/top_popular/{k}"),
              ("GET", "/similar/{k}"), ("POST", "/similar/{k}"), ("GET", "/history/{user_id}"),
              ("POST", "/history/{user_id}"), ("GET", "/recommendations/{user_id}"),
              ("POST", "/recommendations"), ("GET", "/stats"), ("GET", "/health"),
              ("POST", "/admin/reload")]


WITHOUT_INPUT = {("GET", "/"), ("GET", "/stats"), ("GET", "/health"), ("POST", "/admin/reload")}
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if (m, p) not in WITHOUT_INPUT
]  # nothing invalid can be made for an operation without input (any header is a string)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz(api_schema: schemathesis.BaseSchema, method: str, path: str,
              mode: GenerationMode) -> None:
    """Bounded examples of one operation; any failed check fails the test with the curl
    command that reproduces it."""
    operation = api_schema[path][method]

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
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


