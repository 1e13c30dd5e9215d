"""Blueprint: the monitoring timer, alerts, health and the OpenAPI document."""

from __future__ import annotations

import logging

import azure.functions as func

from ferry import __version__
from functions import web
from functions.core import context, defaults, monitoring, openapi

bp = func.Blueprint()
log = logging.getLogger("ferry.functions.monitoring")


@bp.timer_trigger(schedule=defaults.TIMER_SCHEDULE, arg_name="timer", run_on_startup=False)
def monitor(timer: func.TimerRequest) -> None:
    """Every minute: mark lost components, raise and clear alerts."""
    totals = monitoring.sweep(context.current())
    # One line a sweep (a minute in Azure), also when nothing changed: the proof it ran.
    log.info("monitoring: %(lost)d lost, %(raised)d raised, %(cleared)d cleared", totals)


@bp.route(route="tenants/{tenant}/alerts", methods=["GET"])
def list_alerts(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: alerts, newest first (``?open=true`` for open ones only)."""
    tenant = web.route_param(req, "tenant")
    return web.handle(
        req, lambda ctx, caller, _: monitoring.list_alerts(ctx, caller, tenant, req.params)
    )


@bp.route(route="tenants/{tenant}/alerts/{alert_id}/acknowledge", methods=["POST"])
def acknowledge_alert(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: record that an alert was seen."""
    tenant, alert_id = web.route_param(req, "tenant"), web.route_param(req, "alert_id")
    return web.handle(
        req,
        lambda ctx, caller, body: monitoring.acknowledge(ctx, caller, tenant, alert_id, body),
        body=True,
    )


@bp.route(route="health", methods=["GET"])
def health(req: func.HttpRequest) -> func.HttpResponse:
    """Anyone: the server answers (and is configured)."""
    problem = context.settings_problem_now()
    if problem:
        return web.json_response(503, {"ok": False, "version": __version__, "error": problem})
    return web.json_response(200, {"ok": True, "version": __version__})


@bp.route(route="openapi.json", methods=["GET"])
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """Anyone: the API contract as OpenAPI 3."""
    return web.json_response(200, openapi.document(__version__))
