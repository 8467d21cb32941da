"""The request's recorded SERVER span: bastion's own, a lighter stand-in for the SDK's.

A recorded span made by the SDK's ``Tracer.start_span`` costs the request path
more than everything else bastion does for tracing: the sampler (whose
decision :meth:`Tracing.start_server_span` has already made), ``Span.__init__``
with a ``BoundedAttributes`` (a dict, a lock, every value cleaned), two
``BoundedList``s (a deque and a lock each), a lock taken by every call, and
the ``ReadableSpan`` copy ``end`` hands to the processors: eleven objects the
garbage collector tracks while the batch processor holds the span.
:class:`ServerSpan` is that span's data in slots, a plain dict of attributes
(untracked: its values are atomic), no lock, the events and links lists made
only when something is added, and itself handed to the processors: two tracked
objects (itself and its context). In-process, start and end with the request's
attributes through the batch processor cost the serving thread ~6 µs instead
of ~30 µs (an unsampled span ~2.4 µs), and the process as a whole, export
thread included, ~19 µs instead of ~55 µs (docs/observability.md).

It is an :class:`opentelemetry.trace.Span` (user code's
``trace.get_current_span().set_attribute(...)``, and the SDK's child spans,
which read its context as their parent) and an SDK ``ReadableSpan`` (processors
and exporters, bastion's OTLP/HTTP one and the SDK's gRPC one). What stays the
SDK's: attribute values set through the API are cleaned by the SDK's own
function when they are not a plain str, int, float or bool (or a str longer
than a configured length limit), and the provider's ``SpanLimits`` hold (the
oldest attribute, event or link is dropped and counted past a limit); events
and links keep the SDK's bounded containers, being rare.

Processors: a span processor the SDK ships whose ``on_start`` and
``_on_ending`` do nothing (``BatchSpanProcessor``, ``SimpleSpanProcessor``)
gets only ``on_end``. As soon as one registered processor does something in
either (a baggage-copying processor, say) every processor gets the SDK's whole
protocol, ``on_start`` with the parent context, ``_on_ending`` and ``on_end``,
with this span: it implements the API such processors use, so they keep
working without bringing back the SDK span's cost for everyone else.

No lock: a span is written by its request (its task, or a thread the task
awaits, as a sync endpoint's), one dict operation at a time under the GIL. A
write that races ``end()`` from another thread may land after the span was
handed over; the exporter therefore reads a snapshot of the attributes.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from time import time_ns
from types import TracebackType
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.attributes import (  # the SDK's own cleaning, as its spans use
    BoundedAttributes,
    _clean_attribute_value,
)
from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED
from opentelemetry.sdk.environment_variables._internal import (
    parse_boolean_environment_variable,
)
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    Tracer,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_ESCAPED,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util import types

__all__ = ["ServerSpan", "ServerSpans"]

# The SDK's logger: the warnings below are the SDK span's, word for word, so a
# filter an operator set on them keeps applying.
_logger = logging.getLogger("opentelemetry.sdk.trace")

_PLAIN: Final = frozenset({str, int, float, bool})
_UNSET: Final = Status(StatusCode.UNSET)
_ENDED: Final = "Tried calling %s on an ended span."
# Processors whose on_start and _on_ending do nothing: the SDK's base class and its
# two exporting processors (a subclass that overrides either is not among them).
_NO_OP_STARTS: Final = frozenset(
    {SpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start}
)
_NO_OP_ENDINGS: Final = frozenset(
    {SpanProcessor._on_ending, BatchSpanProcessor._on_ending, SimpleSpanProcessor._on_ending}
)

_Plan = tuple[tuple[SpanProcessor, ...], bool, tuple[Callable[[ReadableSpan], None], ...]]


class ServerSpans:
    """Makes an app's recorded server spans, and hands the ended ones to its processors.

    One per app, built with the provider by ``build_tracing`` (see :meth:`of`).

    Attributes:
        tracer: the tracer whose resource, scope and limits the spans get.
        max_attributes: the provider's span attribute count limit (``None``: none).
        max_length: the provider's span attribute value length limit (``None``: none).
        limits: the provider's ``SpanLimits``, for events and links.
        scope: the tracer's instrumentation scope, the spans'.
        info: the tracer's (deprecated) instrumentation info, the spans'.
    """

    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self.tracer = tracer
        # The provider's multi-processor keeps its processors in a tuple it replaces
        # on every add_span_processor: one identity check tells whether they changed.
        self._multi = provider._active_span_processor  # no public accessor
        limits: SpanLimits = tracer._span_limits  # the provider's, as its spans get them
        self.limits = limits
        self.max_attributes = limits.max_span_attributes
        self.max_length = limits.max_span_attribute_length
        self.scope: InstrumentationScope = tracer._instrumentation_scope
        self.info: InstrumentationInfo = tracer.instrumentation_info
        self._plan: _Plan = self._planned(())

    @classmethod
    def of(cls, provider: TracerProvider, tracer: trace.Tracer) -> ServerSpans | None:
        """Return the lean spans for ``tracer``, or ``None`` where only the SDK's will do.

        ``None`` (every recorded server span then goes through ``tracer.start_span``)
        when the SDK is disabled (``OTEL_SDK_DISABLED``: the tracer is a no-op one),
        when the SDK's own span metrics are on
        (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``: the SDK counts live spans
        from its ``Span.end``), and when the provider is not laid out as this SDK
        version lays it out.
        """
        if not isinstance(tracer, Tracer):
            return None
        if parse_boolean_environment_variable(OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED):
            return None
        multi = getattr(provider, "_active_span_processor", None)
        if not isinstance(getattr(multi, "_span_processors", None), tuple):
            return None
        if not isinstance(getattr(tracer, "_span_limits", None), SpanLimits):
            return None
        if not isinstance(getattr(tracer, "_instrumentation_scope", None), InstrumentationScope):
            return None
        return cls(provider, tracer)

    def enabled(self) -> bool:
        """Whether the tracer records at all (a tracer configurator may switch it off)."""
        return self.tracer._is_enabled()  # the SDK's own check in start_span

    def start(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, types.AnyValue] | None,
    ) -> ServerSpan:
        """Start a recorded SERVER span whose ids and flags the caller decided.

        Args:
            name: the span's name.
            context: the span's own context (sampled flag set).
            parent: the remote parent's context, or ``None`` for a root.
            attributes: start attributes bastion built (not validated, but bounded
                as the provider's limits say); the span keeps the dict.
        """
        span = ServerSpan(self, name, context, parent, attributes)
        plan = self._plan
        if plan[0] is not self._multi._span_processors:
            plan = self._replan()
        if plan[1]:
            parent_context = (
                Context()
                if parent is None
                else trace.set_span_in_context(NonRecordingSpan(parent), Context())
            )
            # Typed for the SDK's Span; what a processor uses of it is the API's Span
            # and ReadableSpan, which this span is.
            self._multi.on_start(span, parent_context=parent_context)  # type: ignore[arg-type]  # see above
        return span

    def ended(self, span: ServerSpan) -> None:
        """Hand an ended span to the processors registered now (as the SDK's end does)."""
        plan = self._plan
        if plan[0] is not self._multi._span_processors:
            plan = self._replan()
        if plan[1]:
            self._multi._on_ending(span)  # type: ignore[arg-type]  # as on_start in start()
        for on_end in plan[2]:
            on_end(span)

    def _replan(self) -> _Plan:
        plan = self._planned(self._multi._span_processors)
        # One tuple, swapped whole: a thread reading it meanwhile sees the old or the new.
        self._plan = plan
        return plan

    @staticmethod
    def _planned(processors: tuple[SpanProcessor, ...]) -> _Plan:
        full = any(
            type(p).on_start not in _NO_OP_STARTS or type(p)._on_ending not in _NO_OP_ENDINGS
            for p in processors
        )
        return processors, full, tuple(p.on_end for p in processors)


class ServerSpan(trace.Span, ReadableSpan):
    """A request's recorded SERVER span: the API's ``Span`` and the SDK's ``ReadableSpan``.

    Made by :meth:`ServerSpans.start`, never directly. Once ended it refuses
    changes (with the SDK's warnings) and is what the processors and exporters
    read.
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_dropped",
        "_end_time",
        "_events",
        "_instrumentation_info",
        "_instrumentation_scope",
        "_links",
        "_name",
        "_parent",
        "_resource",
        "_spans",
        "_start_time",
        "_status",
    )

    _kind = SpanKind.SERVER
    # Narrower than ReadableSpan's: always a dict, always a context.
    _attributes: dict[str, types.AnyValue]
    _context: SpanContext

    def __init__(
        self,
        spans: ServerSpans,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, types.AnyValue] | None,
    ) -> None:
        # ReadableSpan.__init__ is not called: it would make a Resource when given
        # none, and every slot it fills is filled here.
        self._spans = spans
        self._name = name
        self._context = context
        self._parent = parent
        self._resource = spans.tracer.resource  # the tracer's, updated after a fork
        self._instrumentation_scope = spans.scope
        self._instrumentation_info = spans.info
        self._status = _UNSET
        self._events: Any = ()
        self._links: Any = ()
        self._dropped = 0
        self._end_time: int | None = None
        self._start_time: int | None = time_ns()
        if attributes is None:
            self._attributes = {}
        elif spans.max_length is None and (
            spans.max_attributes is None or len(attributes) <= spans.max_attributes
        ):
            self._attributes = attributes
        else:
            # A limit an operator configured: the start attributes are bounded as the
            # SDK bounds them (values truncated, oldest dropped past the count).
            self._attributes = {}
            self._set(attributes)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    # ReadableSpan's reading side, where the SDK's containers are not used.

    @property
    def dropped_attributes(self) -> int:
        """Attributes dropped by the count limit or for an invalid key."""
        return self._dropped

    # The opentelemetry.trace.Span API.

    def get_span_context(self) -> SpanContext:
        """Return the span's context (ids, flags, trace state)."""
        return self._context

    def is_recording(self) -> bool:
        """Return whether the span still takes changes: until it ends."""
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        """Set one attribute, validated as the SDK validates it."""
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        spans = self._spans
        limit = spans.max_attributes
        if limit == 0:
            self._dropped += 1
            return
        if not key or not isinstance(key, str):
            _logger.warning(
                "invalid key `%s`. must be non-empty string. Dropping key from attributes.", key
            )
            self._dropped += 1
            return
        max_length = spans.max_length
        if value.__class__ not in _PLAIN or (
            max_length is not None and isinstance(value, str) and len(value) > max_length
        ):
            value = _clean_attribute_value(value, max_length)
        self._put(key, value, limit)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Set several attributes, validated as the SDK validates them."""
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        self._set(attributes)

    def set_trusted_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Set attributes bastion built itself (valid keys, plain values), unvalidated.

        The count and length limits still hold when the provider sets them.
        """
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        spans = self._spans
        limit = spans.max_attributes
        own = self._attributes
        if spans.max_length is None and (limit is None or len(own) + len(attributes) <= limit):
            for key, value in attributes.items():
                if key in own:
                    # Re-set keys move to the end, as the SDK's BoundedAttributes does.
                    del own[key]
                own[key] = value
        else:
            self._set(attributes)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        """Add an event, bounded by the provider's event limits as the SDK bounds it."""
        if self._end_time is not None:
            _logger.warning(_ENDED, "_add_event")
            return
        limits = self._spans.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        events = self._events
        if not isinstance(events, BoundedList):
            events = self._events = BoundedList(limits.max_events)
        events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Add a link, bounded by the provider's link limits as the SDK bounds it."""
        if not (context and (context.is_valid or attributes or context.trace_state)):
            return
        if self._end_time is not None:
            _logger.warning(_ENDED, "_add_link")
            return
        limits = self._spans.limits
        bounded = BoundedAttributes(
            limits.max_link_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        links = self._links
        if not isinstance(links, BoundedList):
            links = self._links = BoundedList(limits.max_links)
        links.append(Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        """Rename the span (the middleware names it by route template at the end)."""
        if self._end_time is not None:
            _logger.warning(_ENDED, "update_name")
            return
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status; OK is final and UNSET is ignored, as in the SDK."""
        if self._end_time is not None:
            _logger.warning(_ENDED, "set_status")
            return
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Record an exception as an ``exception`` event, as the SDK does."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: MutableMapping[str, types.AnyValue] = {
            EXCEPTION_TYPE: f"{module}.{qualname}" if module and module != "builtins" else qualname,
            EXCEPTION_MESSAGE: str(exception),
            EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
            EXCEPTION_ESCAPED: str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event(name="exception", attributes=event, timestamp=timestamp)

    def end(self, end_time: int | None = None) -> None:
        """End the span and hand it to the provider's span processors."""
        if self._end_time is not None:
            _logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._spans.ended(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """End the span; an exception leaving the block is recorded and sets ERROR (as the SDK)."""
        if exc_val is not None and self._end_time is None:
            self.record_exception(exception=exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def _set(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Set validated attributes: plain ones as they are, the rest cleaned by the SDK."""
        spans = self._spans
        limit = spans.max_attributes
        if limit == 0:
            self._dropped += len(attributes)
            return
        max_length = spans.max_length
        for key, value in attributes.items():
            if (
                key.__class__ is not str
                or not key
                or value.__class__ not in _PLAIN
                or (max_length is not None and isinstance(value, str) and len(value) > max_length)
            ):
                cleaned = _clean_attribute_value(attributes, max_length)
                self._dropped += len(attributes) - len(cleaned)
                break
        else:
            cleaned = attributes
        for key, value in cleaned.items():
            self._put(key, value, limit)

    def _put(self, key: str, value: types.AnyValue, limit: int | None) -> None:
        """Store one clean attribute; past the count limit the oldest goes (the SDK's rule)."""
        attributes = self._attributes
        if key in attributes:
            # Re-set keys move to the end, as the SDK's BoundedAttributes does.
            del attributes[key]
        elif limit is not None and len(attributes) >= limit:
            _logger.warning(
                "Attributes dict is full. Dropping the oldest key-value pair from attributes "
                "to make space for the new key-value pair."
            )
            del attributes[next(iter(attributes))]
            self._dropped += 1
        attributes[key] = value


def sampled_flags(parent: SpanContext | None) -> TraceFlags:
    """The flags of a recorded span: sampled, and the level-2 random flag as the SDK sets it.

    A root's trace id is 128 random bits (the flag is set); a child keeps its
    parent's.
    """
    if parent is None or parent.trace_flags & TraceFlags.RANDOM_TRACE_ID:
        return _SAMPLED_RANDOM
    return _SAMPLED


_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM: Final = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
