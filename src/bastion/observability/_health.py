"""Liveness and readiness probes, and the registry components add their checks to.

``/health/live`` answers 200 while the event loop turns. ``/health/ready`` runs
every registered check concurrently, each bounded by its timeout, and answers
200 only when every critical check passes and the process is not shutting down.
Each run also sets ``bastion_ready`` and ``bastion_health_check_up{check}``, so
a dashboard shows what the last probe saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion._access import AccessPolicy
from bastion.context import current_context
from bastion.errors import ErrorCode, problem_body
from bastion.lifecycle import Lifecycle
from bastion.observability._handlers import problem_response
from bastion.observability._logging import LogMasker
from bastion.observability._metrics import HEALTH_CHECK_UP, READY

__all__ = ["HealthCheck", "HealthRegistry", "operational_route"]

CheckFn = Callable[[], Awaitable[object]]
_ERROR_LIMIT = 200
_masker = LogMasker()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One dependency check.

    Attributes:
        name: the dependency, as shown in the readiness body (``database``).
        check: a coroutine function that raises when the dependency is unusable.
        critical: whether a failure makes the process not ready.
        timeout: seconds the check may take; ``None`` uses ``health.check_timeout``.
    """

    name: str
    check: CheckFn
    critical: bool = True
    timeout: float | None = None


class HealthRegistry:
    """The checks readiness runs; components add theirs with :meth:`register`.

    Example:
        >>> registry.register("search", search_client.ping, critical=False)
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        *,
        default_timeout: float = 1.0,
        allowed_networks: Sequence[str] = (),
        token: str | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._checks: dict[str, HealthCheck] = {}
        self._default_timeout = default_timeout
        self._access = AccessPolicy(allowed_networks, token)

    def register(
        self, name: str, check: CheckFn, *, critical: bool = True, timeout: float | None = None
    ) -> None:
        """Add (or replace) the check named ``name``."""
        self._checks[name] = HealthCheck(name, check, critical, timeout)

    @property
    def checks(self) -> tuple[HealthCheck, ...]:
        """The registered checks, in registration order."""
        return tuple(self._checks.values())

    async def run(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Run every check concurrently; set ``bastion_health_check_up`` for each.

        Returns:
            Whether every critical check passed, and each check's result.
        """
        checks = list(self._checks.values())
        results = await asyncio.gather(*(self._run_one(check) for check in checks))
        report = dict(zip((check.name for check in checks), results, strict=True))
        for name, result in report.items():
            HEALTH_CHECK_UP.labels(name).set(1 if result["status"] == "ok" else 0)
        healthy = all(
            result["status"] == "ok"
            for check, result in zip(checks, results, strict=True)
            if check.critical
        )
        return healthy, report

    async def _run_one(self, check: HealthCheck) -> dict[str, Any]:
        timeout = check.timeout if check.timeout is not None else self._default_timeout
        started = time.perf_counter()
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                await check.check()
        except TimeoutError:
            error = f"timed out after {timeout:g}s"
        except Exception as exc:  # noqa: BLE001 -- any failure is a failed check, not a 500
            error = _describe(exc)
        result: dict[str, Any] = {
            "status": "ok" if error is None else "fail",
            "critical": check.critical,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if error is not None:
            result["error"] = error
        return result

    def allowed(self, request: Request) -> bool:
        """Return whether the caller may read the probes (allow-list and token)."""
        return self._access.allows(request)

    async def live(self, request: Request) -> Response:
        """``GET /health/live``."""
        if not self.allowed(request):
            return _forbidden()
        return _json({"status": "ok", "phase": self._lifecycle.phase.value}, 200)

    async def ready(self, request: Request) -> Response:
        """``GET /health/ready``."""
        if not self.allowed(request):
            return _forbidden()
        if not self._lifecycle.accepting:
            READY.set(0)
            phase = self._lifecycle.phase.value
            return _json({"status": phase, "phase": phase, "checks": {}}, 503)
        healthy, report = await self.run()
        READY.set(1 if healthy else 0)
        body = {"status": "ok" if healthy else "fail", "phase": "ready", "checks": report}
        return _json(body, 200 if healthy else 503)

    def routes(self, prefix: str) -> list[Route]:
        """Return the probe routes, mounted under ``prefix``."""
        prefix = prefix.rstrip("/")
        return [
            operational_route(f"{prefix}/live", self.live),
            operational_route(f"{prefix}/ready", self.ready),
        ]


def operational_route(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Route:
    """Return a GET route for an operational endpoint, kept out of the OpenAPI schema."""
    # FastAPI's router records scope["route"] (which the access log and metrics read
    # for the route template) only for its own APIRoutes, not for a Starlette Route.
    route: Route

    async def operational(request: Request) -> Response:
        request.scope.setdefault("route", route)
        return await endpoint(request)

    route = Route(path, operational, methods=["GET"], include_in_schema=False)
    return route


def _forbidden() -> Response:
    context = current_context()
    body = problem_body(
        ErrorCode.FORBIDDEN,
        "The health probes are restricted to allowed networks or a token.",
        context.request_id if context else None,
    )
    return problem_response(body, ErrorCode.FORBIDDEN.status)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    masked = _masker.mask_value(text)
    return str(masked)[:_ERROR_LIMIT]


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )
