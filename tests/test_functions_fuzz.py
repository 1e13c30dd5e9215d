"""Property-based fuzzing of the API against its own OpenAPI document: no request gets a 5xx.

Schemathesis generates requests from ``/openapi.json`` (valid ones, and
invalid ones in negative mode) and sends them through the ASGI app to a real
Azurite.  Each request carries the credential its route expects, and the
tenant, disk and job ids of a real protected machine, so the fuzzer reaches
the handlers' logic instead of stopping at 401/403.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from support.api import ADMIN_KEY, Api

from functions.core import context, openapi

EXAMPLES = 12
"""Examples per operation and generation mode (2 modes x 24 operations)."""

OPERATIONS = sorted((method.upper(), path) for path, ops in openapi.PATHS.items() for method in ops)


@pytest.fixture(scope="module")
def fuzz(server_context):  # noqa: F811
    ctx, clock = server_context
    clock.offset = 0.0
    context.use(ctx)
    api = Api(ctx, clock)
    estate = api.estate(machine="fz01")
    job = api.protect(estate)
    api.reach_recovery_points(estate)
    cutover = api.post(f"/tenants/{estate.tenant}/machines/fz01/cutover", estate.operator,
                       {"idempotency_key": "fuzz-cut"})  # fmt: skip
    ids = {"tenant": estate.tenant, "machine": "fz01", "disk": estate.disks[0],
           "job_id": cutover.json()["job"]["job_id"], "command_id": job["command_id"]}  # fmt: skip
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    return schema, estate, ids


def _token(method: str, path: str, estate, pick: int) -> str | None:
    if path in ("/health", "/openapi.json", "/register"):
        return None
    if path == "/tenants":
        return ADMIN_KEY
    if path.startswith("/tenants/"):
        return estate.operator
    if path.endswith("/report"):
        return (estate.agent, estate.mt)[pick % 2]
    if path.endswith("/recovery-points"):
        return estate.mt
    return (estate.agent, estate.ps, estate.mt)[pick % 3]


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_request_gets_a_server_error(fuzz, method, path):
    schema, estate, ids = fuzz
    operation = schema[path][method]
    strategy = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @given(case=strategy, real_ids=st.booleans(), pick=st.integers(0, 5))
    @settings(max_examples=EXAMPLES * 2, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case, real_ids, pick):
        if case.path_parameters:
            case.path_parameters["tenant"] = ids["tenant"]
            if real_ids:
                for name in case.path_parameters:
                    case.path_parameters[name] = ids.get(name, case.path_parameters[name])
        token = _token(method, path, estate, pick)
        headers = dict(case.headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        case.headers = headers
        response = case.call()
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.body!r:.300} -> "
            f"{response.status_code} {response.text[:300]}"
        )
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}

    check()
