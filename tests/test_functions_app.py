"""The Functions app as the host indexes it, handlers called directly, and local routing."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import azure.functions as func
import pytest
from azure.functions.timer import TimerRequest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from support.api import ADMIN_KEY

from functions import local, monitoring, package, registration
from functions.core import defaults, openapi
from functions.function_app import app

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"


def _http_bindings():
    found = {}
    for function in local.indexed_functions(app):
        binding = function.get_trigger().get_dict_repr()
        if binding["type"] == "httpTrigger":
            for method in binding["methods"]:
                found[(str(method.value), "/" + binding["route"])] = binding
    return found


def test_every_route_of_the_contract_is_bound_with_its_method():
    bound = _http_bindings()
    documented = {(method.upper(), path) for path, ops in openapi.PATHS.items() for method in ops}
    assert set(bound) == documented
    for binding in bound.values():
        assert str(binding["authLevel"].value) == "anonymous"  # Ferry checks its own tokens


def test_the_monitoring_timer_is_bound_every_minute():
    timers = [
        f
        for f in local.indexed_functions(app)
        if f.get_trigger().get_binding_name() == "timerTrigger"
    ]
    assert [t.get_function_name() for t in timers] == ["monitor"]
    binding = timers[0].get_trigger().get_dict_repr()
    assert binding["schedule"] == defaults.TIMER_SCHEDULE == "0 */1 * * * *"
    assert binding["name"] == "timer"


def test_function_app_only_creates_the_app_and_registers_blueprints():
    tree = ast.parse((FUNCTIONS / "function_app.py").read_text())
    code = [
        n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    ]
    assert [type(n).__name__ for n in code[:3]] == ["Import", "ImportFrom", "Assign"]
    assert (
        ast.unparse(code[2]) == "app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)"
    )
    calls = [ast.unparse(n) for n in code[3:]]
    assert calls == [f"app.register_functions({m}.bp)" for m in
                     ("registration", "replication", "jobs", "monitoring")]  # fmt: skip


def test_the_deployment_folder_indexes_on_its_own(tmp_path):
    out = package.assemble(tmp_path / "app")
    assert sorted(p.name for p in out.iterdir()) == [
        "ferry", "function_app.py", "functions", "host.json", "requirements.txt",
    ]  # fmt: skip
    assert not (out / "functions" / "local.py").exists()
    script = (
        "import sys; sys.path[0] = '.'\n"
        "import json, ferry, function_app, functions\n"
        "print(json.dumps({'functions': len(function_app.app.get_functions()),\n"
        "                  'files': [m.__file__ for m in (function_app, functions, ferry)]}))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=out, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    indexed = json.loads(done.stdout)
    assert indexed["functions"] == len(openapi.PATHS) + 1  # every route, and the timer
    # Imported from the folder itself, never from this checkout (installed editable here).
    for file in indexed["files"]:
        assert Path(file).resolve().is_relative_to(out.resolve()), file


def test_host_json_has_no_route_prefix_and_the_deployment_is_pinned():
    host = json.loads((FUNCTIONS / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == ""
    requirements = (FUNCTIONS / "requirements.txt").read_text().split()
    assert "azure-functions==1.26.0" in requirements
    for dependency in (
        "azure-data-tables",
        "azure-storage-blob",
        "azure-storage-queue",
        "azure-identity",
    ):
        assert any(r.startswith(f"{dependency}==") for r in requirements), dependency
    example = json.loads((FUNCTIONS / "local.settings.json.example").read_text())
    assert example["Values"]["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert "FERRY_STORAGE" in example["Values"] and "FERRY_ADMIN_KEY" in example["Values"]


# -- handlers called directly --------------------------------------------------------------


def _request(method, route, body=None, token=None, route_params=None, params=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    raw = (
        body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    )
    return func.HttpRequest(
        method, f"http://localhost/{route}", headers=headers, params=params or {},
        route_params=route_params or {}, body=raw,
    )  # fmt: skip


def test_handlers_answer_directly(api):
    health = monitoring.health(_request("GET", "health"))
    assert health.status_code == 200 and json.loads(health.get_body())["ok"] is True
    created = registration.create_tenant(
        _request("POST", "tenants", {"tenant": "direct-" + api.tenant()[0]}, ADMIN_KEY)
    )
    assert created.status_code == 201, created.get_body()
    answer = json.loads(created.get_body())
    assert answer["operator_token"].startswith(f"op.{answer['tenant']}.")
    passphrase = registration.create_passphrase(_request(
        "POST", f"tenants/{answer['tenant']}/passphrases", {"ttl_seconds": 120},
        answer["operator_token"], {"tenant": answer["tenant"]},
    ))  # fmt: skip
    assert passphrase.status_code == 201
    assert 119 <= json.loads(passphrase.get_body())["expires_at"] - api.clock() <= 120


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"tenant": NaN}', "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"tenant": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32"),
        (json.dumps({"tenant": "Bad Id"}).encode(), "not a valid id"),
        (json.dumps({"tenant": "ok", "extra": 1}).encode(), "unknown field 'extra'"),
        (json.dumps({}).encode(), "missing required field 'tenant'"),
        (json.dumps({"tenant": 5}).encode(), "tenant must be a string"),
    ],
)
def test_malformed_bodies_get_400_naming_the_problem(api, body, message):
    answer = registration.create_tenant(_request("POST", "tenants", body, ADMIN_KEY))
    assert answer.status_code == 400, answer.get_body()
    assert message in json.loads(answer.get_body())["error"]


def test_the_timer_runs_directly_and_marks_silent_components_lost(api):
    estate = api.estate()
    assert api.post("/components/self/heartbeat", estate.agent, {}).status_code == 204
    api.clock.advance(defaults.HEARTBEAT_TTL + 1)
    monitoring.monitor(TimerRequest(past_due=False))
    alerts = api.get(f"/tenants/{estate.tenant}/alerts", estate.operator).json()["alerts"]
    assert [(a["kind"], a["subject"]) for a in alerts] == [("heartbeat-lost", "ag-web01")]
    components = api.get(f"/tenants/{estate.tenant}/status", estate.operator).json()["components"]
    assert {c["component_id"]: c["state"] for c in components}["ag-web01"] == "lost"


# -- local routing -------------------------------------------------------------------------


def test_route_templates_match_as_azure_does():
    route = local.Route.build("tenants/{tenant}/jobs/{job_id}", None, None, "x")
    assert route.match(["tenants", "a", "jobs", "b"]) == {"tenant": "a", "job_id": "b"}
    assert route.match(["tenants", "a", "jobs"]) is None
    assert route.match(["tenants", "a", "jobs", "b", "c"]) is None
    assert route.match(["TENANTS", "a", "jobs", "b"]) == {"tenant": "a", "job_id": "b"}
    optional = local.Route.build("items/{id:int?}", None, None, "x")
    assert optional.match(["items"]) == {}
    assert optional.match(["items", "3"]) == {"id": "3"}
    rest = local.Route.build("files/{*path}", None, None, "x")
    assert rest.match(["files", "a", "b"]) == {"path": "a/b"}


def test_unknown_routes_and_methods_get_json_4xx(api):
    missing = api.get("/nowhere")
    assert missing.status_code == 404 and "no such route" in missing.json()["error"]
    wrong = api.request("DELETE", "/tenants")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    empty_segment = api.get("/tenants//status")
    assert empty_segment.status_code == 404
    large = api.request("POST", "/register", raw=b" " * (defaults.MAX_BODY + 1))
    assert large.status_code == 413


def test_openapi_document_is_served_and_valid(api):
    answer = api.get("/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    validate(document)  # raises, naming the first problem, if the document breaks the spec
    assert set(document["paths"]) == set(openapi.PATHS)
    # The validator is real: the same document with one operation broken is refused.
    broken = copy.deepcopy(document)
    broken["paths"]["/register"]["post"]["responses"] = {"201": {"content": {}}}
    with pytest.raises(OpenAPIValidationError, match="not valid"):
        validate(broken)
