"""Trace context in message headers: inject on publish, extract on consume, and their spans.

A message carries its producer's W3C ``traceparent`` (and ``tracestate``) in its
headers, so the consumer's span continues the producer's trace across the
broker. The helpers speak the OpenTelemetry API and the globally configured
propagator (W3C Trace Context and Baggage unless ``OTEL_PROPAGATORS`` says
otherwise); without an SDK provider they make no spans and inject nothing.

The span helpers take ``tracer_provider=`` (the global provider when omitted),
so the spans of one app reach its own exporter in a process that holds
several; the tracer of each provider is built once and kept while the
provider lives.

Example, with NATS JetStream (the events component builds on the same calls)::

    headers: dict[str, str] = {}
    with producer_span("orders.created", system="nats", headers=headers):
        await js.publish("orders.created", payload, headers=headers)

    # in the consumer
    with consumer_span(msg.subject, msg.headers or {}, system="nats"):
        await handle(msg)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Final
from weakref import WeakKeyDictionary

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind

__all__ = ["consumer_span", "extract_context", "inject_headers", "producer_span"]

_SCOPE: Final = "bastion.messaging"
_tracer = trace.get_tracer(_SCOPE)
# An SDK provider's get_tracer costs about 12 µs here, more than the span it
# makes: one tracer per provider, dropped with the provider.
_tracers: WeakKeyDictionary[trace.TracerProvider, trace.Tracer] = WeakKeyDictionary()


def _tracer_of(provider: trace.TracerProvider | None) -> trace.Tracer:
    if provider is None:
        return _tracer
    tracer = _tracers.get(provider)
    if tracer is None:
        tracer = _tracers[provider] = provider.get_tracer(_SCOPE)
    return tracer


MESSAGING_SYSTEM: Final = "messaging.system"
DESTINATION: Final = "messaging.destination.name"
OPERATION_NAME: Final = "messaging.operation.name"
OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGE_ID: Final = "messaging.message.id"


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads header names case-insensitively.

    Brokers keep header names as sent (NATS and AMQP are case-sensitive), and
    producers outside bastion write ``Traceparent`` as often as ``traceparent``.
    """

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            # The exact name is the common case; the scan runs only when it misses.
            value = next((v for k, v in carrier.items() if k.lower() == key), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER: Final = _HeaderGetter()


def inject_headers(headers: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write the current trace context into a message's headers.

    Args:
        headers: the message's headers; ``traceparent`` and, when there is one,
            ``tracestate`` are added (or replaced).
        context: the context to propagate; the current one when omitted.

    Example:
        >>> headers: dict[str, str] = {}
        >>> inject_headers(headers)  # inside a span: headers["traceparent"] is set
    """
    propagate.inject(headers, context=context)


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """Read the trace context a producer wrote into a message's headers.

    Args:
        headers: the message's headers (header names in any case); ``None`` or
            headers without a valid ``traceparent`` give a context with no
            parent, so the consumer starts a new trace.

    Returns:
        A context to start the consumer's span in (``context=`` of ``start_span``).
    """
    return propagate.extract(headers or {}, getter=_GETTER)


@contextmanager
def producer_span(
    destination: str,
    *,
    system: str,
    headers: MutableMapping[str, str],
    message_id: str | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Iterator[Span]:
    """Start a PRODUCER span for one publish and inject it into the message's headers.

    The span is current inside the block, so the broker client's own calls are
    its children; it ends, with an error status if the block raised, on exit.

    Args:
        destination: the subject, topic or queue (``messaging.destination.name``);
            the span is named ``publish {destination}``, so pass the template
            (``orders.{tenant}``) rather than a subject with ids in it.
        system: ``messaging.system`` (``nats``, ``rabbitmq``, ``kafka``).
        headers: the headers the message will be published with; receives
            ``traceparent``/``tracestate``.
        message_id: ``messaging.message.id``, when the producer knows it.
        tracer_provider: the provider the span is made with; the global one
            when omitted.

    Yields:
        The span, to add attributes to.
    """
    attributes = _attributes(system, destination, "publish", "send", message_id)
    with _tracer_of(tracer_provider).start_as_current_span(
        f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        inject_headers(headers)
        yield span


@contextmanager
def consumer_span(
    destination: str,
    headers: Mapping[str, str] | None,
    *,
    system: str,
    message_id: str | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Iterator[Span]:
    """Start a CONSUMER span that continues the trace a message's headers carry.

    The span's parent is the producer's span (from ``traceparent``); the span is
    current inside the block, so the handler's logs, queries and calls belong
    to the producer's trace. It ends, with an error status if the block raised,
    on exit.

    Args:
        destination: the subject, topic or queue the message came from; the
            span is named ``process {destination}``.
        headers: the message's headers, or ``None`` (a new trace starts).
        system: ``messaging.system`` (``nats``, ``rabbitmq``, ``kafka``).
        message_id: ``messaging.message.id``, when the broker gives one.
        tracer_provider: the provider the span is made with; the global one
            when omitted.

    Yields:
        The span, to add attributes to.
    """
    attributes = _attributes(system, destination, "process", "process", message_id)
    with _tracer_of(tracer_provider).start_as_current_span(
        f"process {destination}",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


def _attributes(
    system: str, destination: str, operation: str, kind: str, message_id: str | None
) -> dict[str, str]:
    """The messaging semantic-convention attributes of a producer or consumer span."""
    attributes = {
        MESSAGING_SYSTEM: system,
        DESTINATION: destination,
        OPERATION_NAME: operation,
        OPERATION_TYPE: kind,
    }
    if message_id is not None:
        attributes[MESSAGE_ID] = message_id
    return attributes
