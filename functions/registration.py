"""Blueprint: tenants, passphrases, registration, and a component's view of itself."""

from __future__ import annotations

import azure.functions as func

from functions import web
from functions.core import commands, components, tenants

bp = func.Blueprint()


@bp.route(route="tenants", methods=["POST"])
def create_tenant(req: func.HttpRequest) -> func.HttpResponse:
    """Admin: create a tenant; answers its operator token once."""
    return web.handle(req, tenants.create_tenant, status=201, body=True)


@bp.route(route="tenants/{tenant}/passphrases", methods=["POST"])
def create_passphrase(req: func.HttpRequest) -> func.HttpResponse:
    """Operator: a single-use registration passphrase."""
    tenant = web.route_param(req, "tenant")
    return web.handle(
        req, lambda ctx, caller, body: tenants.create_passphrase(ctx, caller, tenant, body),
        status=201, body=True,
    )  # fmt: skip


@bp.route(route="tenants/{tenant}/operator-token", methods=["POST"])
def rotate_operator_token(req: func.HttpRequest) -> func.HttpResponse:
    """Operator (or admin): a new operator token; the old one dies at once."""
    tenant = web.route_param(req, "tenant")
    return web.handle(
        req, lambda ctx, caller, body: tenants.rotate_operator_token(ctx, caller, tenant, body),
        status=201,
    )  # fmt: skip


@bp.route(route="register", methods=["POST"])
def register(req: func.HttpRequest) -> func.HttpResponse:
    """Passphrase holder: register a component; answers its credential once."""
    return web.handle(
        req, lambda ctx, _caller, body: tenants.register(ctx, body),
        status=201, public=True, body=True,
    )  # fmt: skip


@bp.route(route="components/self", methods=["GET"])
def component_self(req: func.HttpRequest) -> func.HttpResponse:
    """Component: its own record."""
    return web.handle(req, components.self_record)


@bp.route(route="components/self/settings", methods=["GET"])
def component_settings(req: func.HttpRequest) -> func.HttpResponse:
    """Component: its daemon's settings, with storage grants."""
    return web.handle(req, components.settings)


@bp.route(route="components/self/storage", methods=["GET"])
def component_storage(req: func.HttpRequest) -> func.HttpResponse:
    """Component: SAS tokens for exactly what it needs."""
    return web.handle(req, components.storage)


@bp.route(route="components/self/heartbeat", methods=["POST"])
def component_heartbeat(req: func.HttpRequest) -> func.HttpResponse:
    """Component: I am alive (with my status)."""
    return web.handle(req, components.heartbeat, body=True)


@bp.route(route="components/self/credentials", methods=["POST"])
def component_credentials(req: func.HttpRequest) -> func.HttpResponse:
    """Component: a new token, fetched with the current one (rotation; never through a queue)."""
    return web.handle(req, commands.new_token, status=201)
