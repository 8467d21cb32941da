"""Start-up and shutdown hooks with priorities, readiness state, and request draining.

A :class:`Lifecycle` is created per app by :func:`bastion.install`. Hooks run
in ascending priority at start-up and in descending priority at shutdown, so a
pool opened first is closed last. The request middleware counts requests in
flight here, which is how shutdown knows what it is waiting for and what a
timeout cut off.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

__all__ = ["Hook", "Lifecycle", "Phase"]

logger = structlog.get_logger("bastion.lifecycle")

HookFn = Callable[[], Awaitable[None]]


class Phase(enum.StrEnum):
    """Where the process is in its life; readiness is ``READY`` only."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Hook:
    """A named start-up or shutdown step."""

    name: str
    fn: HookFn
    priority: int


@dataclass(slots=True)
class Lifecycle:
    """The phase, the hooks, and the count of requests in flight.

    Example:
        >>> lifecycle = Lifecycle()
        >>> lifecycle.on_startup("open pool", open_pool, priority=10)
        >>> lifecycle.on_shutdown("close pool", close_pool, priority=10)
    """

    phase: Phase = Phase.STARTING
    in_flight: int = 0
    cut_off: int = 0
    _startup: list[Hook] = field(default_factory=list)
    _shutdown: list[Hook] = field(default_factory=list)

    def on_startup(self, name: str, fn: HookFn, *, priority: int = 100) -> None:
        """Run ``fn`` at start-up; lower priorities run first."""
        self._startup.append(Hook(name, fn, priority))

    def on_shutdown(self, name: str, fn: HookFn, *, priority: int = 100) -> None:
        """Run ``fn`` at shutdown; higher priorities run first, so it mirrors start-up."""
        self._shutdown.append(Hook(name, fn, priority))

    @property
    def accepting(self) -> bool:
        """Whether readiness should report this process as able to take traffic."""
        return self.phase is Phase.READY

    def request_started(self) -> None:
        """Count a request in; called by the request middleware."""
        self.in_flight += 1

    def request_finished(self) -> None:
        """Count a request out."""
        self.in_flight -= 1

    def request_cut_off(self) -> None:
        """Record a request cancelled by the shutdown timeout."""
        self.cut_off += 1

    async def startup(self) -> None:
        """Run every start-up hook in priority order; a failing hook stops start-up.

        Hooks of equal priority run in the order they were registered.
        """
        for hook in sorted(self._startup, key=lambda h: h.priority):
            started = time.perf_counter()
            await hook.fn()
            logger.info("startup step done", step=hook.name, duration_ms=_ms_since(started))
        # A drain that began during start-up (SIGTERM while migrating) must stick.
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY
            logger.info("ready")

    def begin_drain(self) -> None:
        """Turn readiness to 503 while the process still serves what it has."""
        if self.phase is Phase.READY or self.phase is Phase.STARTING:
            self.phase = Phase.DRAINING
            logger.info("draining: readiness now reports 503", in_flight=self.in_flight)

    async def shutdown(self) -> None:
        """Run every shutdown hook, highest priority first.

        Hooks of equal priority run in reverse registration order, mirroring
        start-up the way an exit stack does. A failing hook does not stop the
        others, because a half-closed process is worse than a logged error.
        """
        self.begin_drain()
        if self.in_flight:
            logger.warning("requests still in flight at shutdown", in_flight=self.in_flight)
        # Descending priority and, among equals, the last registered first.
        ordered = sorted(
            enumerate(self._shutdown), key=lambda pair: (pair[1].priority, pair[0]), reverse=True
        )
        for _, hook in ordered:
            started = time.perf_counter()
            try:
                await hook.fn()
            except Exception:
                logger.exception("shutdown step failed", step=hook.name)
            else:
                logger.info("shutdown step done", step=hook.name, duration_ms=_ms_since(started))
        self.phase = Phase.STOPPED
        logger.info("stopped", requests_cut_off=self.cut_off)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
