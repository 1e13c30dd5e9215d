"""Blueprint: replication state (reports, recovery points, status) and commands."""

from __future__ import annotations

import azure.functions as func

from functions import web
from functions.core import replication, verify

bp = func.Blueprint()


@bp.route(route="components/self/disks/{disk}/report", methods=["POST"])
def disk_report(req: func.HttpRequest) -> func.HttpResponse:
    """Agent or master target: the state and metrics of one of its disks."""
    disk = web.route_param(req, "disk")
    return web.handle(
        req, lambda ctx, caller, body: replication.disk_report(ctx, caller, disk, body), body=True
    )


@bp.route(route="components/self/recovery-points", methods=["POST"])
def recovery_point(req: func.HttpRequest) -> func.HttpResponse:
    """Master target: a recovery point it reached."""
    return web.handle(req, replication.record_recovery_point, body=True)


@bp.route(route="components/self/commands/{command_id}", methods=["POST"])
def command_result(req: func.HttpRequest) -> func.HttpResponse:
    """Component: the outcome of one of its commands."""
    command_id = web.route_param(req, "command_id")
    return web.handle(
        req, lambda ctx, caller, body: replication.command_report(ctx, caller, command_id, body),
        body=True,
    )  # fmt: skip


@bp.route(route="tenants/{tenant}/components/{component}/commands", methods=["POST"])
def component_command(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: stop one component or rotate its credentials."""
    tenant, component = web.route_param(req, "tenant"), web.route_param(req, "component")
    return web.handle(
        req,
        lambda ctx, caller, body: replication.component_command(
            ctx, caller, tenant, component, body
        ),
        body=True,
    )


@bp.route(route="tenants/{tenant}/commands/{command_id}", methods=["GET"])
def get_command(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: one command and each target's outcome."""
    tenant, command_id = web.route_param(req, "tenant"), web.route_param(req, "command_id")
    return web.handle(
        req, lambda ctx, caller, _: replication.get_command(ctx, caller, tenant, command_id)
    )


@bp.route(route="tenants/{tenant}/status", methods=["GET"])
def tenant_status(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: machines, disks and components with their health."""
    tenant = web.route_param(req, "tenant")
    return web.handle(req, lambda ctx, caller, _: replication.status(ctx, caller, tenant))


@bp.route(route="tenants/{tenant}/machines", methods=["GET"])
def list_machines(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: every machine of the tenant."""
    tenant = web.route_param(req, "tenant")
    return web.handle(req, lambda ctx, caller, _: replication.machines(ctx, caller, tenant))


@bp.route(route="tenants/{tenant}/machines/{machine}/commands", methods=["POST"])
def machine_command(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: pause, resume, resync, tag, drain, stop or rotate credentials."""
    tenant, machine = web.route_param(req, "tenant"), web.route_param(req, "machine")
    return web.handle(
        req,
        lambda ctx, caller, body: replication.machine_command(ctx, caller, tenant, machine, body),
        body=True,
    )


@bp.route(route="tenants/{tenant}/machines/{machine}/schedule", methods=["POST"])
def machine_schedule(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: how often the machine's agent takes app-consistent points and verifies."""
    tenant, machine = web.route_param(req, "tenant"), web.route_param(req, "machine")
    return web.handle(
        req,
        lambda ctx, caller, body: verify.set_schedule(ctx, caller, tenant, machine, body),
        body=True,
    )


@bp.route(route="tenants/{tenant}/machines/{machine}/resume-replication", methods=["POST"])
def resume_replication(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: resume replicating a machine whose cutover was not committed."""
    tenant, machine = web.route_param(req, "tenant"), web.route_param(req, "machine")
    return web.handle(
        req,
        lambda ctx, caller, body: replication.resume_replication(
            ctx, caller, tenant, machine, body
        ),
        body=True,
    )


@bp.route(route="tenants/{tenant}/recovery-points", methods=["GET"])
def list_recovery_points(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: recovery points, newest first."""
    tenant = web.route_param(req, "tenant")
    return web.handle(
        req,
        lambda ctx, caller, _: replication.list_recovery_points(ctx, caller, tenant, req.params),
    )
