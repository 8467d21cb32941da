"""Client spans for outbound calls: HTTP requests made with httpx, and Redis commands.

Both are lean wrappers on the OpenTelemetry API rather than the
``opentelemetry-instrumentation-httpx``/``-redis`` packages: per call they cost
a third to a half of what those do (measured in docs/observability.md,
"Traces across boundaries"), and they attach to one client instead of patching
the library for the whole process.

- :class:`TracingTransport` wraps any ``httpx.AsyncBaseTransport``: a CLIENT span
  named by the method per request, W3C ``traceparent``/``tracestate`` injected
  into the request's headers, and the response status (or the exception)
  recorded. :func:`instrument_httpx` puts it under an existing client.
- :func:`instrument_redis` wraps one ``redis.asyncio.Redis`` client's commands
  and pipelines; a span is made only inside a sampled trace, never with the
  command's arguments.

Each takes ``tracer_provider=``, as OpenTelemetry's own instrumentations do,
defaulting to the global provider. ``install`` passes the app's own, so the
boundary spans of an app reach its exporter even when another app (or the
application itself) owns the global provider. The tracer is resolved once,
when the client is instrumented, never per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from bastion.settings import TracingSettings

__all__ = ["TracingTransport", "instrument_httpx", "instrument_redis", "redacted_url"]

_HTTP_SCOPE: Final = "bastion.http_client"
_REDIS_SCOPE: Final = "bastion.redis"

# Semantic conventions: methods outside this set are reported as ``_OTHER``, so a
# caller's made-up method can never mint a new span name.
_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
REDACTED: Final = "REDACTED"
"""What stands in for a query value or a password in ``url.full``."""


def redacted_url(url: httpx.URL) -> str:
    """Return ``url`` as ``url.full``: no credentials, and every query value replaced.

    Query strings carry tokens, signatures and codes as often as harmless
    filters, and a span is exported to a third party: the names stay, so the
    span still says what was asked, the values do not.

    Example:
        >>> redacted_url(httpx.URL("https://u:p@api.example/v1?token=abc&page=2"))
        'https://api.example/v1?token=REDACTED&page=REDACTED'
    """
    # Built from the parts rather than with URL.copy_with(params=...), which cost
    # 32 µs per request; this costs about 1 µs. ``netloc`` holds no userinfo.
    path, _, query = url.raw_path.decode("ascii").partition("?")
    full = f"{url.scheme}://{url.netloc.decode('ascii')}{path}"
    if not query:
        return full
    names = (part.partition("=")[0] for part in query.split("&") if part)
    return full + "?" + "&".join(f"{name}={REDACTED}" for name in names)


class TracingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that traces each request it sends through ``transport``.

    Each request gets a CLIENT span named by its method, with
    ``http.request.method``, ``url.full`` (see :func:`redacted_url`),
    ``server.address``, ``server.port`` and ``http.response.status_code``; the
    span is in error on a 5xx answer (``error.type`` the status) or when the
    request raises (``error.type`` the exception's class). The span ends when
    the response's headers arrive, before its body is read. ``traceparent`` and
    ``tracestate`` of the span are set on the request, so the server's span is
    its child. bastion's resilient client composes this transport.

    Args:
        transport: the transport that does the I/O; a new
            ``httpx.AsyncHTTPTransport()`` when omitted.
        tracer_provider: the provider the spans are made with; the global one
            when omitted (``app.state.bastion.tracing.provider`` is the app's).

    Example:
        >>> client = httpx.AsyncClient(transport=TracingTransport())
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        # With no provider this is a proxy tracer until a global provider is set,
        # then that provider's: the same as a module-level get_tracer.
        self._tracer = trace.get_tracer(_HTTP_SCOPE, tracer_provider=tracer_provider)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` inside a CLIENT span, with the span's context in its headers."""
        method = request.method
        url = request.url
        attributes: dict[str, str | int] = {
            "http.request.method": method if method in _METHODS else "_OTHER",
            "url.full": redacted_url(url),
            "server.address": url.host,
            "server.port": url.port or _DEFAULT_PORTS.get(url.scheme, 0),
        }
        if method not in _METHODS:
            attributes["http.request.method_original"] = method
        # The span is made current only for the injection and the inner transport,
        # so nothing the caller does after the headers arrive lands inside it.
        with self._tracer.start_as_current_span(
            method if method in _METHODS else "HTTP",
            kind=SpanKind.CLIENT,
            attributes=attributes,
        ) as span:
            propagate.inject(request.headers)
            try:
                response = await self.transport.handle_async_request(request)
            except Exception as exc:
                span.set_attribute("error.type", type(exc).__qualname__)
                raise
            status = response.status_code
            span.set_attribute("http.response.status_code", status)
            if status >= 500:  # noqa: PLR2004 -- the semantic conventions' server-error class
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()


def instrument_httpx(
    client: httpx.AsyncClient,
    *,
    settings: TracingSettings | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> httpx.AsyncClient:
    """Trace every request ``client`` sends: wrap its transports in :class:`TracingTransport`.

    The client keeps everything it was built with (TLS, limits, HTTP/2, proxies
    and mounts); each of its transports is wrapped once. Calling it again on the
    same client does nothing.

    Args:
        client: the client to instrument, in place.
        settings: the ``tracing`` section; when given and ``enabled`` or
            ``trace_http_client`` is off, the client is left as it is and costs
            nothing more.
        tracer_provider: the provider the spans are made with; the global one
            when omitted. Pass the app's so its calls reach its exporter.

    Returns:
        ``client``, for chaining.

    Example:
        >>> runtime = app.state.bastion
        >>> client = instrument_httpx(
        ...     httpx.AsyncClient(),
        ...     settings=runtime.settings.tracing,
        ...     tracer_provider=runtime.tracing.provider,
        ... )
    """
    if settings is not None and not (settings.enabled and settings.trace_http_client):
        return client
    # httpx has no public setter for the transports it built from the client's
    # own options (TLS, limits, proxies); wrapping them in place keeps those
    # options, as opentelemetry-instrumentation-httpx's instrument_client does.
    if not isinstance(client._transport, TracingTransport):
        client._transport = TracingTransport(client._transport, tracer_provider=tracer_provider)
    mounts = client._mounts
    for pattern, transport in mounts.items():
        if transport is not None and not isinstance(transport, TracingTransport):
            mounts[pattern] = TracingTransport(transport, tracer_provider=tracer_provider)
    return client


_Execute = Callable[..., Coroutine[Any, Any, Any]]
_INSTRUMENTED: Final = "_bastion_traced"


def instrument_redis(client: Any, tracer_provider: trace.TracerProvider | None = None) -> Any:
    """Give each command and pipeline of one ``redis.asyncio.Redis`` client a CLIENT span.

    A command's span is named by the command (``GET``, ``HSET``) and carries
    ``db.system.name=redis``, ``db.operation.name``, ``db.namespace`` (the
    database index), ``server.address`` and ``server.port``; never the keys or
    values. A pipeline is one span, ``PIPELINE`` or ``MULTI`` (a transaction),
    with ``db.operation.batch.size``. Spans are made only inside a sampled
    trace: a command outside one (a probe's ``PING``, a background refresh)
    costs one check. Calling it again on the same client does nothing.

    Args:
        client: a ``redis.asyncio.Redis`` client, instrumented in place.
        tracer_provider: the provider the spans are made with; the global one
            when omitted (``install`` passes the app's).

    Returns:
        ``client``, for chaining.

    Example:
        >>> redis = instrument_redis(redis.asyncio.from_url("redis://localhost:6379/0"))
    """
    if getattr(client, _INSTRUMENTED, False):
        return client
    kwargs = client.connection_pool.connection_kwargs
    base: dict[str, str | int] = {
        "db.system.name": "redis",
        "db.namespace": str(kwargs.get("db", 0)),
    }
    if "host" in kwargs:
        base["server.address"] = kwargs["host"]
        base["server.port"] = kwargs.get("port", 6379)
    elif "path" in kwargs:
        base["server.address"] = kwargs["path"]

    tracer = trace.get_tracer(_REDIS_SCOPE, tracer_provider=tracer_provider)
    execute: _Execute = client.execute_command

    @functools.wraps(execute)
    async def execute_command(*args: Any, **options: Any) -> Any:
        if not trace.get_current_span().is_recording():
            return await execute(*args, **options)
        name = _command_name(args[0]) if args else "UNKNOWN"
        with tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes={**base, "db.operation.name": name}
        ):
            return await execute(*args, **options)

    make_pipeline: Callable[..., Any] = client.pipeline

    @functools.wraps(make_pipeline)
    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        pipe.execute = _traced_pipeline(pipe, base, tracer)
        return pipe

    client.execute_command = execute_command
    client.pipeline = pipeline
    setattr(client, _INSTRUMENTED, True)
    return client


def _traced_pipeline(pipe: Any, base: dict[str, str | int], tracer: trace.Tracer) -> _Execute:
    execute: _Execute = pipe.execute

    @functools.wraps(execute)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        if not trace.get_current_span().is_recording():
            return await execute(*args, **kwargs)
        name = "MULTI" if pipe.is_transaction else "PIPELINE"
        attributes = {
            **base,
            "db.operation.name": name,
            "db.operation.batch.size": len(pipe.command_stack),
        }
        with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
            return await execute(*args, **kwargs)

    return traced


@functools.lru_cache(maxsize=256)
def _command_name(command: str | bytes) -> str:
    # redis-py passes the command as written by its own methods ("GET", "CLIENT
    # SETNAME"); a caller's raw execute_command could pass anything, so the name
    # is cut short to keep span names a small set.
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    return text.upper()[:32]
