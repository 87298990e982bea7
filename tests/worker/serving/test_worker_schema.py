"""Schemathesis against the OpenAPI schema a real light worker serves: no server errors.

A 503 is part of the contract (a request whose budget header cannot be met is dropped, see
the schema), so the check is: no 5xx other than a documented 503 in the error envelope, and
every response conforms to the schema (status code, content type, body).
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from diffcascade_worker.protocol import PATH_CONFIG
from hypothesis import HealthCheck, Phase
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from worker_testing import AUTH, Cascade

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 12
ALLOWED_503_CODES = {"deadline_exceeded", "not_ready"}


def _fuzz(cascade: Cascade, *, paths: set[str] | None, headers: dict[str, str]) -> int:
    base_url = cascade.light.url
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    calls = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        if paths is not None and operation.path not in paths:
            continue

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            nonlocal calls
            response = case.call(base_url=base_url, headers=headers, timeout=60)
            calls += 1
            status = response.status_code
            if status >= 500:
                code = response.json().get("error", {}).get("code")
                assert status == 503 and code in ALLOWED_503_CODES, (
                    f"{case.method} {case.path} -> {status}: {response.text[:300]}"
                )
            case.validate_response(
                response,
                checks=[
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        run()
    return calls


def test_served_schema_yields_no_server_errors(cascade: Cascade) -> None:
    """Every operation, without the config token (config calls must answer 401)."""
    assert _fuzz(cascade, paths=None, headers={}) > 0


def test_config_api_with_token_yields_no_server_errors(cascade: Cascade) -> None:
    """Random configs pushed with the token are accepted or refused with 400, never 5xx."""
    try:
        assert _fuzz(cascade, paths={PATH_CONFIG}, headers=AUTH) > 0
    finally:
        cascade.reset()
