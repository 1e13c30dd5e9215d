"""Blueprint: jobs (protect, cutover, test failover) and their progress."""

from __future__ import annotations

import azure.functions as func

from functions import web
from functions.core import drive, jobs

bp = func.Blueprint()


@bp.route(route="tenants/{tenant}/machines/{machine}/protect", methods=["POST"])
def protect(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: protect every disk of a machine."""
    tenant, machine = web.route_param(req, "tenant"), web.route_param(req, "machine")
    return web.handle(
        req, lambda ctx, caller, body: jobs.protect(ctx, caller, tenant, machine, body), body=True
    )


@bp.route(route="tenants/{tenant}/machines/{machine}/cutover", methods=["POST"])
def cutover(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: open a cutover job."""
    tenant, machine = web.route_param(req, "tenant"), web.route_param(req, "machine")
    return web.handle(
        req,
        lambda ctx, caller, body: drive.open_job(ctx, caller, tenant, machine, body, "cutover"),
        body=True,
    )


@bp.route(route="tenants/{tenant}/machines/{machine}/test-failover", methods=["POST"])
def test_failover(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: open a test-failover job."""
    tenant, machine = web.route_param(req, "tenant"), web.route_param(req, "machine")
    return web.handle(
        req,
        lambda ctx, caller, body: drive.open_job(
            ctx, caller, tenant, machine, body, "test-failover"
        ),
        body=True,
    )


@bp.route(route="tenants/{tenant}/jobs", methods=["GET"])
def list_jobs(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: every job, newest first."""
    tenant = web.route_param(req, "tenant")
    return web.handle(req, lambda ctx, caller, _: jobs.list_jobs(ctx, caller, tenant, req.params))


@bp.route(route="tenants/{tenant}/jobs/{job_id}", methods=["GET"])
def get_job(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: one job with its history."""
    tenant, job_id = web.route_param(req, "tenant"), web.route_param(req, "job_id")
    return web.handle(req, lambda ctx, caller, _: jobs.get_job(ctx, caller, tenant, job_id))


@bp.route(route="tenants/{tenant}/jobs/{job_id}/progress", methods=["POST"])
def job_progress(req: func.HttpRequest) -> func.HttpResponse:
    """Operator (playbooks): record a step of a job."""
    tenant, job_id = web.route_param(req, "tenant"), web.route_param(req, "job_id")
    return web.handle(
        req, lambda ctx, caller, body: jobs.progress(ctx, caller, tenant, job_id, body), body=True
    )


@bp.route(route="tenants/{tenant}/jobs/{job_id}/cleanup", methods=["POST"])
def job_cleanup(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: clean up a test failover run by the configuration server."""
    tenant, job_id = web.route_param(req, "tenant"), web.route_param(req, "job_id")
    return web.handle(req, lambda ctx, caller, _: drive.cleanup(ctx, caller, tenant, job_id))
