"""The registry of a service's named dependencies: their pipelines, circuits and shared state.

``bastion.install`` builds one :class:`Resilience` from the ``resilience``
settings and makes it current (:func:`use_resilience`); :func:`pipeline` and
:func:`resilient` find it there, so code can name a dependency without holding
the registry.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final, ParamSpec, TypeVar, get_args

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from bastion.errors import ConfigurationError
from bastion.resilience._breaker import CircuitBreaker, CircuitSnapshot, CircuitState
from bastion.resilience._pipeline import Pipeline, PipelineCall
from bastion.resilience._policy import Policy, resolve_policy
from bastion.resilience._shared import SharedCircuits
from bastion.settings import DependencyKind, ResilienceSettings

__all__ = [
    "CriticalCircuitOpen",
    "Resilience",
    "current_resilience",
    "pipeline",
    "resilient",
    "use_resilience",
]

P = ParamSpec("P")
T = TypeVar("T")

logger = structlog.get_logger("bastion.resilience")

# Names end up as metric labels, Redis hash fields and log fields.
_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_KINDS: Final[frozenset[str]] = frozenset(get_args(DependencyKind))


class CriticalCircuitOpen(Exception):
    """Readiness fails: the circuit of a dependency marked ``critical`` is open."""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(
            f"invalid dependency name {name!r}: 1 to 100 of letters, digits and '_.:-'"
        )


class Resilience:
    """The named dependencies of a service, each with its pipeline, and their circuit breakers.

    Every dependency named in ``settings.dependencies`` is registered at
    construction, so ``/health/circuits`` lists it from the first request.
    Pipelines whose policies name the same ``circuit`` share one breaker (its
    settings are those of the dependency named like the circuit when the
    settings have one, else of the first pipeline registered on it).

    With a Redis client, circuit state is shared across instances (see
    :meth:`start`); without, each process has its own.

    Example:
        >>> resilience = Resilience(settings.resilience, redis=redis_client)
        >>> await resilience.start()
        >>> payments = resilience.register("payments", "http")
        >>> quote = await payments.call(fetch_quote, order_id)

    Args:
        settings: the ``resilience`` settings.
        redis: a ``redis.asyncio.Redis`` client for shared circuit state, or ``None``.
        key_prefix: prefix of the Redis key and channel.
        clock: monotonic seconds, for breakers and pipelines.
        wall: epoch seconds, for what circuits report and share.

    Raises:
        ConfigurationError: a name in ``settings.dependencies`` is not a valid name.
    """

    def __init__(
        self,
        settings: ResilienceSettings,
        *,
        redis: Any | None = None,
        key_prefix: str = "bastion:",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall = wall
        self._pipelines: dict[str, Pipeline] = {}
        # Registered without a kind from code or settings: the first register()
        # that names one rebuilds the pipeline with that kind's defaults.
        self._kindless: set[str] = set()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._shared = (
            SharedCircuits(
                redis,
                self._breakers,
                key_prefix=key_prefix,
                refresh_interval=settings.state_refresh_interval,
                timeout=settings.state_timeout,
            )
            if redis is not None
            else None
        )
        for name in settings.dependencies:
            try:
                _check_name(name)
            except ValueError as exc:
                raise ConfigurationError(f"resilience.dependencies: {exc}") from None
            self.register(name)

    @property
    def shared(self) -> bool:
        """Whether circuit state is shared across instances (a Redis client was given)."""
        return self._shared is not None

    def register(self, name: str, kind: DependencyKind | None = None) -> Pipeline:
        """Return the pipeline of ``name``, creating it on first registration.

        Its policy is ``kind``'s defaults under ``settings.dependencies[name]``;
        a ``kind`` in the settings wins over the code's.

        Args:
            name: the dependency's name (letters, digits, ``_.:-``).
            kind: its class; ``custom`` when neither this nor the settings say.

        Returns:
            The same pipeline for the same name (idempotent).

        Raises:
            ValueError: an invalid name or kind.
            ConfigurationError: ``name`` is already registered with another kind.
        """
        existing = self._pipelines.get(name)
        if existing is not None and kind is None:
            return existing
        _check_name(name)
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"unknown dependency kind {kind!r}; one of {sorted(_KINDS)}")
        override = self.settings.dependencies.get(name)
        configured_kind = override.kind if override is not None else None
        if existing is not None:
            if configured_kind is not None or existing.policy.kind == kind:
                return existing
            if name not in self._kindless:
                raise ConfigurationError(
                    f"dependency {name!r} is already registered as {existing.policy.kind!r}, "
                    f"not {kind!r}; set resilience.dependencies.{name}.kind to choose"
                )
            logger.debug("dependency kind set", dependency=name, kind=kind)
        policy = resolve_policy(name, kind, override)
        if configured_kind is None and kind is None:
            self._kindless.add(name)
        else:
            self._kindless.discard(name)
        built = Pipeline(name, policy, breaker=self._breaker_for(policy), clock=self._clock)
        self._pipelines[name] = built
        if existing is not None:
            self._drop_unused_circuit(existing.policy.circuit)
        return built

    def pipeline(self, name: str) -> Pipeline:
        """Return the pipeline of ``name``, registering it on first use.

        Its kind is the settings' for that name, else ``custom``; register
        dependencies of a known class with :meth:`register` at start-up.
        """
        found = self._pipelines.get(name)
        return found if found is not None else self.register(name)

    def breaker(self, circuit: str) -> CircuitBreaker:
        """Return the breaker of ``circuit``.

        Raises:
            KeyError: no registered pipeline uses that circuit.
        """
        try:
            return self._breakers[circuit]
        except KeyError:
            raise KeyError(f"no circuit named {circuit!r}") from None

    def snapshots(self) -> list[CircuitSnapshot]:
        """Return every circuit as it is now, sorted by name."""
        return [self._breakers[name].snapshot() for name in sorted(self._breakers)]

    async def refresh(self) -> int:
        """Re-read the shared circuit state now (done every ``state_refresh_interval`` anyway).

        Returns:
            How many circuits changed; always 0 without Redis.
        """
        return await self._shared.refresh() if self._shared is not None else 0

    async def start(self) -> None:
        """Read the shared circuit state, then follow it: subscribe and re-read periodically.

        Nothing to do without Redis. Redis being out is not an error: the
        circuits run on local state until it answers.
        """
        if self._shared is not None:
            await self._shared.start()

    async def stop(self) -> None:
        """Stop following the shared state; waits for the background tasks to end."""
        if self._shared is not None:
            await self._shared.stop()

    async def readiness_check(self) -> None:
        """Fail when the circuit of a dependency whose policy is ``critical`` is open.

        A circuit whose open period has passed reads half-open and passes, so the
        instance gets the traffic whose probes can close it.

        Raises:
            CriticalCircuitOpen: naming the open circuits.
        """
        open_circuits = sorted(
            {
                pipe.breaker.name
                for pipe in self._pipelines.values()
                if pipe.policy.critical
                and pipe.breaker is not None
                and pipe.breaker.state is CircuitState.OPEN
            }
        )
        if open_circuits:
            raise CriticalCircuitOpen("circuit open: " + ", ".join(open_circuits))

    async def circuits_endpoint(self, request: Request) -> Response:
        """``GET /health/circuits``: every circuit, sorted by name (200 whatever their state)."""
        body = {"circuits": [_describe(snapshot) for snapshot in self.snapshots()]}
        return Response(
            orjson.dumps(body),
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    def _breaker_for(self, policy: Policy) -> CircuitBreaker | None:
        circuit = policy.circuit
        if not circuit or "circuit_breaker" not in policy.order:
            return None
        breaker = self._breakers.get(circuit)
        if breaker is None:
            override = self.settings.dependencies.get(circuit)
            settings = resolve_policy(circuit, None, override) if override is not None else policy
            breaker = CircuitBreaker(circuit, settings, clock=self._clock, wall=self._wall)
            if self._shared is not None:
                breaker.add_listener(self._shared.publish)
            self._breakers[circuit] = breaker
        return breaker

    def _drop_unused_circuit(self, circuit: str) -> None:
        if all(
            pipe.breaker is None or pipe.breaker.name != circuit
            for pipe in self._pipelines.values()
        ):
            self._breakers.pop(circuit, None)


def _rfc3339(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _describe(snapshot: CircuitSnapshot) -> dict[str, Any]:
    return {
        "name": snapshot.name,
        "state": snapshot.state.value,
        "failure_rate": None if snapshot.failure_rate is None else round(snapshot.failure_rate, 4),
        "calls": snapshot.calls,
        "since": _rfc3339(snapshot.since),
        "next_probe": None if snapshot.next_probe is None else _rfc3339(snapshot.next_probe),
    }


_current: Resilience | None = None


def use_resilience(resilience: Resilience | None) -> None:
    """Make ``resilience`` the registry :func:`pipeline` and :func:`resilient` use.

    ``bastion.install`` calls it at start-up, and with ``None`` at shutdown; call
    it yourself only outside an installed app (a worker, a script, a test).

    Args:
        resilience: the process's registry, or ``None`` to clear it.
    """
    global _current  # noqa: PLW0603 -- one process-wide registry, set at start-up
    _current = resilience


def current_resilience() -> Resilience:
    """Return the registry :func:`use_resilience` set.

    Raises:
        RuntimeError: there is none (bastion not installed, not started yet, or
            ``resilience.enabled`` off).
    """
    if _current is None:
        raise RuntimeError(
            "no resilience registry: bastion.install(app) sets one at start-up (with "
            "resilience.enabled); outside an installed app call "
            "bastion.resilience.use_resilience(Resilience(settings))"
        )
    return _current


def pipeline(name: str) -> Pipeline:
    """Return the current registry's pipeline for ``name`` (registered on first use).

    Example:
        >>> rows = await pipeline("search").call(search_client.query, text)

    Raises:
        RuntimeError: no registry is current (see :func:`current_resilience`).
    """
    return current_resilience().pipeline(name)


def resilient(
    name: str,
    *,
    fallback: Callable[[BaseException], Awaitable[T]] | None = None,
    idempotent: bool = True,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Decorate a coroutine function so that every call goes through the pipeline ``name``.

    The pipeline is looked up at the first call (and again if the current
    registry changes), so the decorator can be applied at import time, before
    ``bastion.install``.

    Example:
        >>> @resilient("payments", fallback=cached_quote)
        ... async def quote(order_id: str) -> Quote: ...

    Args:
        name: the dependency's name.
        fallback: awaited with the failure when the call fails for the
            dependency's sake (open circuit, retries spent, timeout, full
            bulkhead); its result is returned instead.
        idempotent: whether the call is safe to repeat; only then are failures retried.

    Raises:
        ValueError: an invalid name.
        TypeError: the decorated function is not a coroutine function.
    """
    _check_name(name)

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@resilient({name!r}) decorates coroutine functions (async def)")
        resolved: tuple[Resilience, PipelineCall] | None = None

        @functools.wraps(fn)
        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            nonlocal resolved
            registry = current_resilience()
            if resolved is None or resolved[0] is not registry:
                bound = registry.pipeline(name).with_options(
                    fallback=fallback, idempotent=idempotent
                )
                resolved = (registry, bound)
            result: T = await resolved[1].call(fn, *args, **kwargs)
            return result

        return call

    return decorate
