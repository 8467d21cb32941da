"""Admin endpoints under ``/admin``: the migration state, for operators and dashboards.

Until the identity component exists, the endpoints admit callers by the
``http.admin_allowed_networks`` allow-list (loopback by default) and the
``http.admin_token`` bearer token; once it does, they also need the admin role.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion._access import AccessPolicy
from bastion.data import MigrationError, Migrator
from bastion.errors import FieldError, InvalidInput, ServiceUnavailable
from bastion.observability._health import operational_route

__all__ = ["ADMIN_PREFIX", "AdminRoutes", "query_count", "query_limit"]

logger = structlog.get_logger("bastion.admin")

ADMIN_PREFIX: Final = "/admin"
DEFAULT_HISTORY_LIMIT: Final = 100
MAX_HISTORY_LIMIT: Final = 1000

Endpoint = Callable[[Request], Awaitable[Response]]


class AdminRoutes:
    """The ``/admin`` endpoints of one app.

    Args:
        access: who may call them.
        migrator: the app's migrator; ``None`` leaves ``/admin/migrations`` out.
    """

    def __init__(self, *, access: AccessPolicy, migrator: Migrator | None) -> None:
        self._access = access
        self._migrator = migrator

    def routes(self) -> list[Route]:
        """Return the routes to append to the app's router."""
        if self._migrator is None:
            return []
        return [operational_route(f"{ADMIN_PREFIX}/migrations", self._guarded(self.migrations))]

    async def migrations(self, request: Request) -> Response:
        """``GET /admin/migrations``: each tree's state, edited applied revisions, and history.

        ``?limit=N`` (1-1000, default 100) bounds the history, newest first.
        """
        assert self._migrator is not None  # noqa: S101 -- routes() mounts it only with one
        limit = query_limit(
            request.query_params.get("limit"),
            default=DEFAULT_HISTORY_LIMIT,
            maximum=MAX_HISTORY_LIMIT,
        )
        try:
            statuses = await self._migrator.status()
            verification = await self._migrator.verify()
            history = await self._migrator.applied_history(limit=limit)
        except MigrationError as exc:
            # The message can name the database host; the operator finds it in the log.
            logger.warning("migration state unreadable", error=str(exc))
            raise ServiceUnavailable(
                "The migration state cannot be read from the database now.",
                headers={"Retry-After": "5"},
            ) from exc
        body: dict[str, Any] = {
            "up_to_date": all(status.up_to_date for status in statuses),
            "trees": [
                {
                    "name": status.name,
                    "version_table": status.version_table,
                    "current": status.current,
                    "heads": status.heads,
                    "pending": status.pending,
                    "up_to_date": status.up_to_date,
                }
                for status in statuses
            ],
            # Applied revisions whose file changed since: start-up refuses while any is.
            "modified": [check.name for check in verification.modified],
            "history": history,
        }
        return Response(
            orjson.dumps(body),
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    def _guarded(self, endpoint: Endpoint) -> Endpoint:
        access = self._access

        async def guarded(request: Request) -> Response:
            access.require(request, subject="/admin", realm="bastion-admin")
            return await endpoint(request)

        return guarded


def query_limit(raw: str | None, *, default: int, maximum: int) -> int:
    """The ``limit`` query parameter of an admin list: 1 to ``maximum``, ``default`` when absent.

    Raises:
        InvalidInput: not a whole number in range (422 ``out_of_range``).
    """
    return query_count(raw, name="limit", default=default, maximum=maximum)


def query_count(raw: str | None, *, name: str, default: int, maximum: int) -> int:
    """Query parameter ``name`` of an admin route: 1 to ``maximum``, ``default`` when absent.

    Raises:
        InvalidInput: not a whole number in range (422 ``out_of_range`` at ``query.<name>``).
    """
    if raw is None:
        return default
    # The length check first: int() of a long digit string is quadratic.
    if len(raw) <= len(str(maximum)) and raw.isascii() and raw.isdigit():
        value = int(raw)
        if 1 <= value <= maximum:
            return value
    raise InvalidInput(
        errors=[
            FieldError(
                f"query.{name}",
                "out_of_range",
                f"{name} must be a whole number from 1 to {maximum}.",
            )
        ]
    )
