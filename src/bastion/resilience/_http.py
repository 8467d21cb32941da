"""The resilient HTTP client: an httpx client whose every request goes through a named pipeline.

:func:`http_client` returns a plain ``httpx.AsyncClient`` whose transports are
wrapped by :class:`ResilientTransport`. Per request it:

- finds the pipeline by name in the current registry at the first request (so
  the client can be created at import time, before ``bastion.install``);
- decides whether the request is safe to repeat: its method is idempotent
  (``GET HEAD OPTIONS PUT DELETE TRACE``), it carries an ``Idempotency-Key``,
  or ``extensions={"bastion.idempotent": True}`` says so; a body that cannot be
  replayed (a streamed upload) makes it unsafe whatever the rest says;
- treats the statuses 408, 425, 429, 500, 502, 503 and 504 as failures, which
  are retried like errors and honour ``Retry-After`` (seconds or an HTTP date);
  when the retries are spent, the last such response is returned as it is
  (httpx semantics: the caller decides), counted as a failure;
- bounds each attempt by the policy's attempt timeout, also set as the socket
  timeouts of the request, and the whole call by the smaller of the policy's
  total timeout and what remains of the current request's deadline;
- traces each attempt as its own CLIENT span, a child of the caller's span,
  with ``traceparent`` injected (:class:`~bastion.observability.TracingTransport`).

The body of a failed attempt is read and released before the next attempt, so
retries never leak pooled connections; a successful response is handed over
unread, so ``client.stream(...)`` streams.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import httpx

from bastion.observability._client_spans import TracingTransport
from bastion.resilience._deadline import remaining_time
from bastion.resilience._registry import Resilience, current_resilience

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from opentelemetry.trace import TracerProvider

    from bastion.resilience._pipeline import Pipeline, PipelineCall

__all__ = [
    "FAILURE_STATUSES",
    "IDEMPOTENT_EXTENSION",
    "ResilientTransport",
    "forget_client_tracing",
    "http_client",
    "is_failure_response",
    "parse_retry_after",
    "use_client_tracing",
]

IDEMPOTENT_EXTENSION: Final = "bastion.idempotent"
"""The request extension that says whether a request is safe to repeat (``True``/``False``)."""

FAILURE_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Response statuses counted as failures of the dependency, and retried when safe."""

_IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_TIMEOUT_PHASES: Final = ("connect", "read", "write", "pool")

# How each installed app traces its clients, by registry: install sets it at
# start-up, so a client made at import time traces with the app's provider.
_tracing: dict[int, tuple[bool, TracerProvider | None]] = {}


def use_client_tracing(
    resilience: Resilience, *, enabled: bool, tracer_provider: TracerProvider | None
) -> None:
    """Say how the clients resolved through ``resilience`` trace their requests.

    ``install`` calls it at start-up with the app's tracing settings; a registry
    it was never called for traces with the global provider.
    """
    _tracing[id(resilience)] = (enabled, tracer_provider)


def forget_client_tracing(resilience: Resilience) -> None:
    """Drop what :func:`use_client_tracing` recorded for ``resilience`` (at shutdown)."""
    _tracing.pop(id(resilience), None)


def http_client(name: str, **httpx_kwargs: Any) -> httpx.AsyncClient:
    """Return an ``httpx.AsyncClient`` whose every request goes through the pipeline ``name``.

    The pipeline is registered as an ``http`` dependency (10 s per attempt, 30 s
    in all, 3 retries, a circuit breaker and a bulkhead by default; see
    ``resilience.dependencies``) in the current registry when the first request
    is sent, so the client may be created at import time. Everything else is
    httpx: pass its keyword arguments, use the client as usual, close it.

    A request that fails through the dependency raises
    :class:`~bastion.resilience.CircuitOpenError` (503, not sent at all),
    :class:`~bastion.resilience.DependencyTimeoutError` (503) or
    :class:`~bastion.resilience.DependencyError` (502, the last failure as
    ``__cause__``); unhandled, each renders as a problem that carries none of
    the dependency's own text. A failure status the retries did not cure is
    returned as the response.

    Example:
        >>> llm = http_client("llm", base_url="http://127.0.0.1:11434")
        >>> response = await llm.post(
        ...     "/api/chat", json=payload, extensions={"bastion.idempotent": True}
        ... )

    Args:
        name: the dependency's name: its pipeline, circuit and metric label.
        httpx_kwargs: passed to ``httpx.AsyncClient``. Without ``timeout`` the
            policy alone times the requests (httpx's default would cut every
            phase at 5 s); with one, each phase gets the smaller of the two.

    Returns:
        The client; close it with ``await client.aclose()`` or ``async with``.

    Raises:
        ValueError: ``name`` is not a valid dependency name.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"http_client needs a dependency name, not {name!r}")
    httpx_kwargs.setdefault("timeout", None)
    client = httpx.AsyncClient(**httpx_kwargs)
    # httpx has no public setter for the transports it built from the client's own
    # options (TLS, limits, proxies); wrapping them in place keeps those options.
    client._transport = ResilientTransport(name, client._transport)
    mounts = client._mounts
    for pattern, transport in mounts.items():
        if transport is not None:
            mounts[pattern] = ResilientTransport(name, transport)
    return client


@dataclass(frozen=True, slots=True)
class _Binding:
    """What a transport resolved from one registry: reused until the registry changes."""

    resilience: Resilience
    pipeline: Pipeline
    send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    safe: PipelineCall
    unsafe: PipelineCall


class ResilientTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request through the pipeline ``name``.

    Args:
        name: the dependency's name.
        transport: the transport that does the I/O.
    """

    def __init__(self, name: str, transport: httpx.AsyncBaseTransport) -> None:
        self.name = name
        self.transport = transport
        self._binding: _Binding | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pipeline: retried, timed, guarded by the circuit."""
        resilience = current_resilience()
        binding = self._binding
        if binding is None or binding.resilience is not resilience:
            binding = self._binding = self._bind(resilience)
        idempotent = request.extensions.get(IDEMPOTENT_EXTENSION)
        if idempotent is None:
            idempotent = (
                request.method in _IDEMPOTENT_METHODS or "idempotency-key" in request.headers
            )
        if not isinstance(request.stream, httpx.ByteStream):
            # A streamed upload is consumed by the first attempt; it cannot be re-sent.
            idempotent = False
        policy = binding.pipeline.policy
        budget = policy.total_timeout or math.inf
        remaining = remaining_time()
        if remaining is not None:
            budget = min(budget, remaining)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        phases = request.extensions.get("timeout") or {}
        call = binding.safe if idempotent else binding.unsafe
        response: httpx.Response = await call.call(
            _attempt,
            request,
            send=binding.send,
            phases=phases,
            deadline=deadline,
            attempt_timeout=policy.timeout,
            loop=loop,
        )
        return response

    def _bind(self, resilience: Resilience) -> _Binding:
        pipeline = resilience.register(self.name, "http")
        enabled, provider = _tracing.get(id(resilience), (True, None))
        inner = self.transport
        send = (
            TracingTransport(inner, tracer_provider=provider).handle_async_request
            if enabled
            else inner.handle_async_request
        )
        return _Binding(
            resilience,
            pipeline,
            send,
            safe=pipeline.with_options(
                idempotent=True, is_failure=is_failure_response, retry_after=parse_retry_after
            ),
            unsafe=pipeline.with_options(
                idempotent=False, is_failure=is_failure_response, retry_after=parse_retry_after
            ),
        )

    async def __aenter__(self) -> ResilientTransport:
        await self.transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.transport.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()


async def _attempt(
    request: httpx.Request,
    *,
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    phases: dict[str, float | None],
    deadline: float,
    attempt_timeout: float,
    loop: asyncio.AbstractEventLoop,
) -> httpx.Response:
    """Send one attempt with socket timeouts no longer than what the attempt may take."""
    left = deadline - loop.time()
    if attempt_timeout:
        left = min(left, attempt_timeout)
    if left != math.inf:
        left = max(left, 0.001)
        request.extensions["timeout"] = {
            phase: left if (own := phases.get(phase)) is None else min(own, left)
            for phase in _TIMEOUT_PHASES
        }
    response = await send(request)
    if response.status_code in FAILURE_STATUSES:
        # Read and release now: if the pipeline retries, this response is dropped,
        # and an unread one would hold its pooled connection.
        try:
            await response.aread()
        finally:
            await response.aclose()
    return response


def is_failure_response(result: object) -> bool:
    """Return whether ``result`` is a response whose status counts as the dependency failing."""
    return isinstance(result, httpx.Response) and result.status_code in FAILURE_STATUSES


def parse_retry_after(result: object) -> float | None:
    """Return the seconds a response's ``Retry-After`` asks to wait, or ``None``.

    Both forms of RFC 9110 are read: delay seconds (``120``) and an HTTP date
    (``Wed, 21 Oct 2015 07:28:00 GMT``, counted from now; a past date is 0).

    Example:
        >>> parse_retry_after(httpx.Response(503, headers={"Retry-After": "2"}))
        2.0
    """
    if not isinstance(result, httpx.Response):
        return None
    value = result.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    # isdigit() alone admits digits of other scripts ("²"), which float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
