"""Operator endpoints for tenants: every tenant's usage, and setting a tenant's overrides.

Behind the admin access policy (``http.admin_allowed_networks`` and
``http.admin_token``), like the other ``/admin`` endpoints:

* ``GET /admin/tenants/usage?limit=50&offset=0``: tenants oldest first, each
  with its quotas' limits and current use (``limit`` 1-100);
* ``PATCH /admin/tenants/{id}/settings`` with the overrides document
  (``{"quotas": {...}, "ratelimit": {"default": "..."}}``): replaces the
  tenant's overrides after validating them; this instance applies them at once,
  the others within ``tenancy.overrides_ttl``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Final

import orjson
from sqlalchemy import func, select, update
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bastion.errors import FieldError, InvalidInput, NotFound
from bastion.tenancy._quotas import tenant_usage, validate_overrides

if TYPE_CHECKING:
    from bastion._access import AccessPolicy
    from bastion.identity._runtime import Identity

__all__ = ["TENANT_USAGE_PAGE_MAX", "tenant_admin_routes"]

TENANT_USAGE_PAGE_MAX: Final = 100
_DEFAULT_PAGE: Final = 50
_BODY_MAX: Final = 16_384


def _json(body: Any) -> Response:
    return Response(
        orjson.dumps(body, default=str),
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


def _number(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.isascii() and raw.isdigit() and low <= int(raw) <= high:
        return int(raw)
    raise InvalidInput(
        errors=[
            FieldError(
                f"query.{name}",
                "out_of_range",
                f"{name} must be a whole number from {low} to {high}.",
            )
        ]
    )


def _identity(request: Request) -> Identity:
    identity: Identity = request.app.state.bastion.identity
    return identity


def tenant_admin_routes(access: AccessPolicy) -> list[BaseRoute]:
    """Return the operator routes for tenants, guarded by ``access``.

    Args:
        access: the admin access policy (``_admin_routes`` builds it).

    Returns:
        ``GET /admin/tenants/usage`` and ``PATCH /admin/tenants/{tenant_id}/settings``.
    """
    from bastion.identity._directory import TenantRecord  # noqa: PLC0415 -- identity imports tenancy
    from bastion.identity._tables import memberships, tenants  # noqa: PLC0415 -- as above

    usage_route: Route
    settings_route: Route

    async def usage(request: Request) -> Response:
        request.scope.setdefault("route", usage_route)
        access.require(request, subject="/admin", realm="bastion-admin")
        identity = _identity(request)
        limit = _number(request, "limit", _DEFAULT_PAGE, 1, TENANT_USAGE_PAGE_MAX)
        offset = _number(request, "offset", 0, 0, 10**9)
        async with identity.database.sessions() as session:
            total = await session.scalar(select(func.count()).select_from(tenants)) or 0
            rows = (
                await session.execute(
                    select(tenants)
                    .order_by(tenants.c.created_at, tenants.c.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            grouped = await session.execute(
                select(memberships.c.tenant_id, func.count())
                .where(memberships.c.tenant_id.in_([row.id for row in rows]))
                .group_by(memberships.c.tenant_id)
            )
            counts: dict[uuid.UUID, int] = {row[0]: row[1] for row in grouped}
        records = [
            TenantRecord(row.id, row.slug, row.name, dict(row.settings or {}), row.created_at)
            for row in rows
        ]
        # Concurrent: the quota reads are pipelined into few round trips.
        usages = await asyncio.gather(
            *(tenant_usage(identity, record, counts.get(record.id, 0)) for record in records)
        )
        return _json(
            {
                "total": total,
                "limit": limit,
                "offset": offset,
                "tenants": [
                    {
                        "id": str(record.id),
                        "slug": record.slug,
                        "name": record.name,
                        "overrides": record.settings,
                        "quotas": quotas,
                    }
                    for record, quotas in zip(records, usages, strict=True)
                ],
            }
        )

    async def set_settings(request: Request) -> Response:
        request.scope.setdefault("route", settings_route)
        access.require(request, subject="/admin", realm="bastion-admin")
        identity = _identity(request)
        try:
            tenant_id = uuid.UUID(request.path_params["tenant_id"])
        except ValueError:
            raise NotFound("No such tenant.") from None
        raw = await request.body()
        if len(raw) > _BODY_MAX:
            raise InvalidInput(
                errors=[FieldError("body", "too_long", f"at most {_BODY_MAX} bytes.")]
            )
        try:
            overrides = validate_overrides(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValueError) as exc:
            raise InvalidInput(errors=[FieldError("body", "invalid", str(exc))]) from None
        async with identity.database.session() as session:
            result = await session.execute(
                update(tenants).where(tenants.c.id == tenant_id).values(settings=overrides)
            )
            if not getattr(result, "rowcount", 0):
                raise NotFound("No such tenant.")
        if identity.tenant_quotas is not None:
            identity.tenant_quotas.forget(tenant_id)
        from bastion.identity._events import (  # noqa: PLC0415 -- identity imports tenancy
            SecurityEventKind,
            emit_security_event,
        )

        await emit_security_event(
            SecurityEventKind.TENANT_SETTINGS_CHANGED,
            subject=str(tenant_id),
            tenant=str(tenant_id),
            details={"by": "operator"},
        )
        return _json({"id": str(tenant_id), "overrides": overrides})

    usage_route = Route("/admin/tenants/usage", usage, methods=["GET"], include_in_schema=False)
    settings_route = Route(
        "/admin/tenants/{tenant_id}/settings",
        set_settings,
        methods=["PATCH"],
        include_in_schema=False,
    )
    return [usage_route, settings_route]
