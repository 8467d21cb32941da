"""Degradation: a non-critical dependency is out and a feature runs on local behaviour meanwhile.

Each feature that falls back (circuit state, rate limits, flags...) holds its own
:class:`Degradation` and reports every failure and success of its calls; only
the changes are logged. The outage itself is process-wide per dependency: it
begins when the first feature sees the dependency fail (``bastion_dependency_outages_total``
counts it once, ``bastion_dependency_degraded`` goes to 1) and ends when every
feature that saw it fail has seen it answer again (the gauge goes back to 0).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, Final

import structlog

from bastion.observability._metrics import DEPENDENCY_DEGRADED, DEPENDENCY_OUTAGES

__all__ = ["Degradation"]

logger = structlog.get_logger("bastion.resilience")


class _Outage:
    """The process-wide state of one dependency's outage, shared by its features."""

    __slots__ = ("count", "degraded", "gauge")

    def __init__(self, dependency: str) -> None:
        # Weak: a feature dropped mid-outage (an app torn down in a test) must not
        # keep the outage open for ever.
        self.degraded: weakref.WeakSet[Degradation] = weakref.WeakSet()
        self.count: Any = DEPENDENCY_OUTAGES.labels(dependency)
        self.gauge: Any = DEPENDENCY_DEGRADED.labels(dependency)


_outages: dict[str, _Outage] = {}

SETTLE: Final = 1.0
"""Seconds without a failure before a success ends an outage.

Right after a dependency comes back, connections pooled before the outage fail
one by one as they are reused (a reset on the first write); ending the outage on
the first success logged and counted one outage as two or three."""


class Degradation:
    """Tracks a feature's fallback while a non-critical dependency is out.

    Cheap when nothing changes: :meth:`failed` during an outage and
    :meth:`recovered` outside one are one attribute check, so they can be
    called on every call.

    Example:
        >>> redis_limits = Degradation("redis", feature="rate limits")
        >>> try:
        ...     allowed = await redis_store.hit(key)
        ...     redis_limits.recovered()
        ... except RedisError as exc:
        ...     redis_limits.failed(exc)
        ...     allowed = local_store.hit(key)

    Args:
        dependency: the dependency's name (metric label): ``redis``.
        feature: what falls back to local behaviour, for the log lines.
        settle: seconds without a failure before a success ends the outage.
        clock: a monotonic clock (tests pass a fake one).
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_degraded",
        "_last_failure",
        "_outage",
        "_settle",
        "dependency",
        "feature",
    )

    def __init__(
        self,
        dependency: str,
        *,
        feature: str | None = None,
        settle: float = SETTLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not dependency:
            raise ValueError("a degradation needs the dependency's name")
        self.dependency = dependency
        self.feature = feature
        self._degraded = False
        self._settle = settle
        self._clock = clock
        self._last_failure = 0.0
        outage = _outages.get(dependency)
        if outage is None:
            outage = _outages[dependency] = _Outage(dependency)
        self._outage = outage

    @property
    def degraded(self) -> bool:
        """Whether this feature is running on its fallback now."""
        return self._degraded

    def failed(self, exc: BaseException | None = None) -> None:
        """Report that a call to the dependency failed; logs and counts only the start of an outage.

        Args:
            exc: the failure; only its class name is logged (its text may carry
                addresses or data that logs should not).
        """
        if self._degraded:
            self._last_failure = self._clock()
            return
        self._degraded = True
        self._last_failure = self._clock()
        outage = self._outage
        first = not outage.degraded
        outage.degraded.add(self)
        if first:
            outage.count.inc()
            outage.gauge.set(1)
        logger.warning(
            "dependency unavailable: running degraded",
            dependency=self.dependency,
            feature=self.feature,
            error=type(exc).__name__ if exc is not None else None,
        )

    def recovered(self) -> None:
        """Report that a call to the dependency succeeded; logs only the end of an outage.

        The outage ends on the first success at least ``settle`` seconds after its
        last failure; a success before that leaves the feature degraded.
        """
        if not self._degraded or self._clock() - self._last_failure < self._settle:
            return
        self._leave()
        logger.info("dependency available again", dependency=self.dependency, feature=self.feature)

    def forget(self) -> None:
        """Stop taking part in the outage without claiming recovery (a feature shutting down).

        A stopped feature must not keep the process-wide outage open: the next
        outage would not be counted, and the gauge would stay at 1.
        """
        if self._degraded:
            self._leave()

    def _leave(self) -> None:
        self._degraded = False
        outage = self._outage
        outage.degraded.discard(self)
        if not outage.degraded:
            outage.gauge.set(0)
