"""The API contract (docs/api.md) as an OpenAPI 3 document, served at ``/openapi.json``.

Written out by hand, as data: it is the contract clients are built against,
so it changes only with docs/api.md.  Times are seconds since the epoch.
"""

from __future__ import annotations

from typing import Any

from ferry.naming import ID_RE, KIND_PREFIX
from functions.core import defaults, jobs
from functions.core.commands import TYPES
from functions.core.replication import COMPONENT_COMMANDS, MACHINE_COMMANDS

ID = {"type": "string", "pattern": ID_RE.pattern, "minLength": 1, "maxLength": 40}
COMPONENT_ID = {
    "type": "string",
    # A kind's prefix, then an id: ``ag-web01`` (ferry.naming owns both).
    "pattern": "^(" + "|".join(sorted(KIND_PREFIX.values())) + ")-" + ID_RE.pattern[1:],
    "maxLength": 40,  # the whole id is an id too (tokens carry it)
}
KEY = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}
TIME = {"type": "number", "description": "seconds since the epoch"}
COUNT = {"type": "integer", "minimum": 0}
INTERVAL = {
    "type": "integer",
    "minimum": 0,
    "maximum": 604800,
    "default": 0,
    "description": "seconds between scheduled runs; 0: none",
}
NULLABLE_COUNT = {"type": "integer", "minimum": 0, "nullable": True}
ANY_OBJECT = {"type": "object", "additionalProperties": True}
STATES = sorted({s for kind in jobs.TRANSITIONS.values() for steps in kind.values() for s in steps})


def _obj(properties: dict[str, Any], required: list[str] | None = None, extra: bool = False):
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": extra,
    }
    if required:
        schema["required"] = required
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _param(name: str, schema: dict[str, Any], where: str = "path") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": {"type": "string"}}, ["error"]),
    "CreateTenant": _obj({"tenant": ID, "display_name": {"type": "string", "maxLength": 200}},
                         ["tenant"]),
    "TenantCreated": _obj({"tenant": ID, "operator_token": {"type": "string"}},
                          ["tenant", "operator_token"]),
    "PassphraseRequest": _obj({"ttl_seconds": {
        "type": "integer", "minimum": defaults.PASSPHRASE_TTL_MIN,
        "maximum": defaults.PASSPHRASE_TTL_MAX, "default": defaults.PASSPHRASE_TTL},
        "kind": {"type": "string", "enum": ["agent", "process-server", "master-target"]},
        "name": ID}),
    "Passphrase": _obj({"passphrase": {"type": "string"}, "expires_at": TIME,
                        "for_component": {"type": "string"}},
                       ["passphrase", "expires_at"]),
    "Register": _obj({
        "tenant": ID,
        "passphrase": {"type": "string", "minLength": 1, "maxLength": 200},
        "kind": {"type": "string", "enum": ["agent", "process-server", "master-target"]},
        "name": ID,
        "host": {"oneOf": [{"type": "string", "maxLength": 255}, ANY_OBJECT]},
        "disks": {"type": "array", "maxItems": 64, "description": "agents only",
                  "items": _obj({"id": ID, "device": {"type": "string", "minLength": 1,
                                                      "maxLength": 255},
                                 "size": COUNT}, ["id", "device"])},
        "target_dir": {"type": "string", "maxLength": 255,
                       "description": "master targets only: where target images live "
                                      f"(default {defaults.TARGET_DIR})"},
        "listen": {"type": "string", "maxLength": 255,
                   "description": "process servers only: host:port agents connect to"},
    }, ["tenant", "passphrase", "kind", "name"]),
    "Registered": _obj({"component_id": {"type": "string"}, "token": {"type": "string"},
                        "command_queue": {"type": "string"}},
                       ["component_id", "token", "command_queue"]),
    "NewToken": _obj({"component_id": {"type": "string"}, "token": {"type": "string"}},
                     ["component_id", "token"]),
    "Component": _obj({"component_id": {"type": "string"}, "kind": {"type": "string"},
                       "state": {"type": "string"}}, ["component_id", "kind"], extra=True),
    "Storage": _obj({
        "blob_endpoint": {"type": "string"}, "queue_endpoint": {"type": "string"},
        "expires_at": TIME,
        "containers": {"type": "object", "additionalProperties": {"type": "string"}},
        "queues": {"type": "object", "additionalProperties": {"type": "string"}},
    }, ["blob_endpoint", "queue_endpoint", "expires_at", "containers", "queues"]),
    "Settings": _obj({"storage": _ref("Storage")}, ["storage"], extra=True),
    "Heartbeat": _obj({"status": ANY_OBJECT}),
    "DiskReport": _obj({
        "phase": {"type": "string", "maxLength": 40}, "gen": COUNT, "applied_seq": COUNT,
        "bytes_to_go": COUNT, "backlog": COUNT, "throughput": {"type": "number", "minimum": 0},
        "rpo_s": {"type": "number", "minimum": 0},
        "last_tag": {"nullable": True, "oneOf": [ANY_OBJECT, {"type": "string"}]},
        "resync_required_gen": NULLABLE_COUNT,
        "reason": {"type": "string", "maxLength": 200, "nullable": True},
        "held": {"type": "boolean"},
        "fenced": {"nullable": True, **ANY_OBJECT},
        "verify": {"nullable": True, **ANY_OBJECT},
    }, extra=True),
    "Tag": _obj({"id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
                 "kind": {"type": "string", "maxLength": 20}, "t0_wall": TIME},
                ["id"], extra=True),
    "RecoveryPoint": _obj({"disk": ID, "tag": _ref("Tag"), "gen": COUNT, "seq": COUNT},
                          ["disk", "tag", "gen", "seq"]),
    "CommandResult": _obj({"state": {"type": "string", "enum": ["done", "failed"]},
                           "detail": {"type": "string", "maxLength": defaults.MAX_TEXT}},
                          ["state"]),
    "Protect": _obj({"idempotency_key": KEY, "process_server": ID, "master_target": ID,
                     "rpo_threshold_s": {"type": "integer", "minimum": 1, "maximum": 86400,
                                         "default": defaults.RPO_THRESHOLD},
                     "app_consistent_interval_s": INTERVAL, "verify_interval_s": INTERVAL,
                     "targets": {"type": "object", "description": "disk id -> its target on the "
                                 "master target (default: an image file in its target_dir)",
                                 "additionalProperties": _obj({
                                     "kind": {"type": "string", "enum": list(jobs.TARGET_KINDS)},
                                     "path": {"type": "string", "maxLength": 255,
                                              "pattern": "^/"}}, ["kind", "path"])}},
                    ["idempotency_key"]),
    "MachineCommand": _obj({
        "command": {"type": "string", "enum": list(MACHINE_COMMANDS)},
        "args": _obj({"kind": {"type": "string", "enum": ["crash", "app"]},
                      "disks": {"type": "array", "items": ID}, "final": {"type": "boolean"},
                      "repair": {"type": "boolean"}, "disk": ID,
                      "blocks": {"type": "array", "items": {"type": "array", "items": COUNT}}}),
        "idempotency_key": KEY,
    }, ["command"]),
    "CommandAccepted": _obj({"command_id": {"type": "string"}, "verify_id": {"type": "string"}},
                            ["command_id"]),
    "ComponentCommand": _obj({
        "command": {"type": "string", "enum": list(COMPONENT_COMMANDS)},
        "idempotency_key": KEY,
    }, ["command"]),
    "Command": _obj({"command": _obj({
        "command_id": {"type": "string"}, "type": {"type": "string"}, "args": ANY_OBJECT,
        "machine": {"type": "string", "nullable": True},
        "job_id": {"type": "string", "nullable": True}, "created_at": TIME,
        "targets": {"type": "object", "additionalProperties": _obj({
            "state": {"type": "string", "enum": ["queued", "done", "failed"]},
            "detail": {"type": "string", "nullable": True}, "at": TIME})}},
        ["command_id", "type", "targets"], extra=True)}, ["command"]),
    "ResumeReplication": _obj({"idempotency_key": KEY}),
    "Failover": _obj({"idempotency_key": KEY, "drive": {"type": "boolean"}}, ["idempotency_key"]),
    "TestFailover": _obj({"idempotency_key": KEY, "drive": {"type": "boolean"},
                          "point": {"type": "string", "description": "a retained tag id"},
                          "point_time": {"type": "number", "description":
                                         "the newest retained point at or before (Unix s)"}},
                         ["idempotency_key"]),
    "Progress": _obj({"state": {"type": "string", "enum": STATES},
                      "detail": {"type": "string", "maxLength": defaults.MAX_TEXT}}, ["state"]),
    "Job": _obj({"job_id": {"type": "string"}, "kind": {"type": "string"},
                 "machine": {"type": "string"}, "state": {"type": "string"},
                 "history": {"type": "array", "items": _obj(
                     {"state": {"type": "string"}, "at": TIME,
                      "detail": {"type": "string", "nullable": True}})}},
                ["job_id", "kind", "machine", "state"], extra=True),
    "JobAnswer": _obj({"job": _ref("Job")}, ["job"]),
    "Jobs": _obj({"jobs": {"type": "array", "items": ANY_OBJECT}}, ["jobs"]),
    "Status": _obj({"machines": {"type": "array", "items": ANY_OBJECT},
                    "components": {"type": "array", "items": ANY_OBJECT}},
                   ["machines", "components"]),
    "Schedule": _obj({"app_consistent_interval_s": INTERVAL, "verify_interval_s": INTERVAL}),
    "ScheduleAnswer": _obj({"schedule": ANY_OBJECT, "command_id": {"type": "string",
                                                                  "nullable": True}},
                           ["schedule"]),
    "Machines": _obj({"machines": {"type": "array", "items": ANY_OBJECT}}, ["machines"]),
    "RecoveryPoints": _obj({
        "recovery_points": {"type": "array", "items": ANY_OBJECT},
        "points": {"type": "array", "items": _obj({
            "machine": {"type": "string"}, "tag_id": {"type": "string"},
            "kind": {"type": "string", "nullable": True}, "t0_wall": {"type": "number", "nullable": True},
            "disks": {"type": "array", "items": {"type": "string"}},
            "restorable_on": {"type": "array", "items": {"type": "string"}},
            "restorable": {"type": "boolean"}})},
        "earlier": {"type": "array", "items": ANY_OBJECT,
                    "description": "with since: each disk's newest point reported before it"}},
        ["recovery_points", "points"]),
    "Alerts": _obj({"alerts": {"type": "array", "items": _obj({
        "id": {"type": "string"}, "kind": {"type": "string"},
        "severity": {"type": "string", "enum": ["warning", "critical"]},
        "subject": {"type": "string"}, "message": {"type": "string"}, "raised_at": TIME,
        "cleared_at": {"type": "number", "nullable": True},
        "acknowledged_at": {"type": "number", "nullable": True},
        "acknowledged_by": {"type": "string", "nullable": True}})}}, ["alerts"]),
    "Acknowledge": _obj({"by": {"type": "string", "maxLength": 200}}),
    "Health": _obj({"ok": {"type": "boolean"}, "version": {"type": "string"},
                    "error": {"type": "string"}}, ["ok", "version"]),
}  # fmt: skip

TENANT = _param("tenant", ID)
MACHINE = _param("machine", ID)


def _op(
    summary: str,
    answer: tuple[int, str | None],
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    status, schema = answer
    responses: dict[str, Any] = {
        str(status): {"description": summary, **(_json(_ref(schema)) if schema else {})},
        "4XX": {"description": "refused; the message names the problem", **_json(_ref("Error"))},
    }
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    op["security"] = [] if public else [{"bearer": []}]
    return op


PATHS: dict[str, Any] = {
    "/health": {"get": _op("the server answers", (200, "Health"), public=True)},
    "/openapi.json": {"get": _op("this document", (200, None), public=True)},
    "/tenants": {"post": _op("create a tenant (admin)", (201, "TenantCreated"), "CreateTenant")},
    "/tenants/{tenant}/passphrases": {"post": _op(
        "a single-use registration passphrase (operator)", (201, "Passphrase"),
        "PassphraseRequest", [TENANT])},
    "/tenants/{tenant}/operator-token": {"post": _op(
        "a new operator token; the old one stops working at once (operator or admin)",
        (201, "TenantCreated"), params=[TENANT])},
    "/tenants/{tenant}/segment-keys": {"post": _op(
        "a new segment key for the tenant: answers its id and the ids kept (operator)",
        (201, None), params=[TENANT])},
    "/register": {"post": _op("register a component with a passphrase", (201, "Registered"),
                              "Register", public=True)},
    "/components/self": {"get": _op("the component's record", (200, "Component"))},
    "/components/self/credentials": {"post": _op(
        "a new token, asked for with the current one; the old one dies at its first use",
        (201, "NewToken"))},
    "/components/self/settings": {"get": _op("the daemon's settings", (200, "Settings"))},
    "/components/self/storage": {"get": _op("SAS tokens for what it needs", (200, "Storage"))},
    "/components/self/heartbeat": {"post": _op("alive, with status", (204, None), "Heartbeat")},
    "/components/self/disks/{disk}/report": {"post": _op(
        "state and metrics of a disk (agent, master target)", (204, None), "DiskReport",
        [_param("disk", ID)])},
    "/components/self/recovery-points": {"post": _op(
        "a recovery point reached (master target)", (204, None), "RecoveryPoint")},
    "/components/self/commands/{command_id}": {"post": _op(
        "the outcome of a command", (204, None), "CommandResult",
        [_param("command_id", {"type": "string", "pattern": "^cmd-[a-z0-9]{1,60}$"})])},
    "/tenants/{tenant}/components/{component}/commands": {"post": _op(
        "stop one component or rotate its credentials", (202, "CommandAccepted"),
        "ComponentCommand", [TENANT, _param("component", COMPONENT_ID)])},
    "/tenants/{tenant}/commands/{command_id}": {"get": _op(
        "one command and each target's outcome", (200, "Command"),
        params=[TENANT, _param("command_id", {"type": "string", "pattern": "^cmd-[a-z0-9]{1,60}$"})])},
    "/tenants/{tenant}/status": {"get": _op("machines, disks, components, health",
                                            (200, "Status"), params=[TENANT])},
    "/tenants/{tenant}/machines": {"get": _op("machines", (200, "Machines"), params=[TENANT])},
    "/tenants/{tenant}/machines/{machine}/protect": {"post": _op(
        "protect a machine", (202, "JobAnswer"), "Protect", [TENANT, MACHINE])},
    "/tenants/{tenant}/machines/{machine}/commands": {"post": _op(
        f"send a command ({', '.join(TYPES[1:])})", (202, "CommandAccepted"), "MachineCommand",
        [TENANT, MACHINE])},
    "/tenants/{tenant}/machines/{machine}/schedule": {"post": _op(
        "how often the agent takes app-consistent points and verifies", (200, "ScheduleAnswer"),
        "Schedule", [TENANT, MACHINE])},
    "/tenants/{tenant}/machines/{machine}/resume-replication": {"post": _op(
        "resume replicating a machine whose cutover was not committed (409 once cut over)",
        (202, "CommandAccepted"), "ResumeReplication", [TENANT, MACHINE])},
    "/tenants/{tenant}/machines/{machine}/cutover": {"post": _op(
        "open a cutover job", (202, "JobAnswer"), "TestFailover", [TENANT, MACHINE])},
    "/tenants/{tenant}/machines/{machine}/test-failover": {"post": _op(
        "open a test-failover job", (202, "JobAnswer"), "TestFailover", [TENANT, MACHINE])},
    "/tenants/{tenant}/recovery-points": {"get": _op(
        "recovery points, newest first, per disk and per machine", (200, "RecoveryPoints"), params=[
            TENANT, _param("machine", ID, "query"), _param("disk", ID, "query"),
            _param("restorable", {"type": "boolean"}, "query"),
            _param("limit", {"type": "integer", "minimum": 1,
                             "maximum": defaults.RECOVERY_POINTS_MAX}, "query"),
            _param("since", {"type": "number", "minimum": 0, "maximum": 1e11,
                             "description": "only points reported at or after this "
                             "(seconds since the epoch); adds earlier"}, "query"),
            _param("every", {"type": "integer", "minimum": 1,
                             "maximum": defaults.RECOVERY_POINTS_EVERY_MAX,
                             "description": "per disk, only the newest point of each slice "
                             "of this many seconds of source time"}, "query")])},
    "/tenants/{tenant}/alerts": {"get": _op(
        "alerts, newest first", (200, "Alerts"),
        params=[TENANT, _param("open", {"type": "boolean"}, "query")])},
    "/tenants/{tenant}/jobs": {"get": _op("jobs, newest first", (200, "Jobs"), params=[
        TENANT, _param("machine", ID, "query")])},
    "/tenants/{tenant}/jobs/{job_id}": {"get": _op(
        "one job with its history", (200, "Job"),
        params=[TENANT, _param("job_id", {"type": "string", "pattern": "^job-[a-z0-9]{1,60}$"})])},
    "/tenants/{tenant}/jobs/{job_id}/cleanup": {"post": _op(
        "clean up a test failover run by the server", (202, "JobAnswer"),
        params=[TENANT, _param("job_id", {"type": "string", "pattern": "^job-[a-z0-9]{1,60}$"})])},
    "/tenants/{tenant}/alerts/{alert_id}/acknowledge": {"post": _op(
        "record that an alert was seen", (200, None), "Acknowledge",
        [TENANT, _param("alert_id", {"type": "string", "maxLength": 160})])},
    "/tenants/{tenant}/jobs/{job_id}/progress": {"post": _op(
        "record a step of a job", (200, "JobAnswer"), "Progress",
        [TENANT, _param("job_id", {"type": "string", "pattern": "^job-[a-z0-9]{1,60}$"})])},
}  # fmt: skip


def document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of the configuration server's API."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Ferry configuration server",
            "version": version,
            "description": 'Contract: docs/api.md. Errors are 4xx with {"error": "..."}.',
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
