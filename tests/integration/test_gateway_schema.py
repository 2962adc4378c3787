"""docs/openapi.yaml against a real gateway and worker pool, with
schemathesis: for every documented operation, generated requests (valid and
invalid) get no 5xx and no response that breaks the document (status, content
type, headers, body schema). Auth is on, so the 401s are exercised as well."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.config import SchemathesisConfig

from tests.conftest import ROOT
from tests.gateway_stack import GatewayStack, gateway_process

pytest_plugins = ["tests.gateway_fixtures"]

OPENAPI = ROOT / "docs" / "openapi.yaml"
TOKEN = "schema-test-token"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.ignored_auth,
]


@pytest.fixture(scope="module")
def live_gateway(gw_stack: GatewayStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("schema") / "gateway.log"
    with gateway_process(gw_stack, log, env={"TQ_GATEWAY_TOKENS": TOKEN}) as gateway:
        yield gateway.url


@pytest.fixture(scope="module")
def openapi(live_gateway: str) -> schemathesis.BaseSchema:
    config = SchemathesisConfig.from_dict({"base-url": live_gateway, "seed": 4})
    return schemathesis.openapi.from_path(OPENAPI, config=config)


schema = schemathesis.pytest.from_fixture("openapi")


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_openapi_document(
    case: schemathesis.Case, live_gateway: str
) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
