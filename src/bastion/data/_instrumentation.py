"""Engine instrumentation: the pool's gauges and waits, statement durations and slow queries.

Two halves, both attached by :func:`instrument` when a
:class:`bastion.data.Database` is built:

- :class:`InstrumentedQueuePool` is SQLAlchemy's ``AsyncAdaptedQueuePool`` with
  its ``_do_get`` (where QueuePool hands out or waits for a connection) and
  ``_do_return_conn`` timed and counted by a :class:`PoolMeter`. Gauges are
  set at the moment the pool's counts change rather than read by a collector at
  scrape time: prometheus_client's multiprocess mode aggregates only the values
  written to its files, not a custom collector's.
- :class:`QueryMeter` listens to ``before/after_cursor_execute`` and
  ``handle_error`` on the sync engine: one histogram observation per statement,
  and a warning with the statement's template (never its parameters) when it
  was slower than ``database.slow_query_threshold``.

With ``trace=True``, :class:`StatementTracer` adds a CLIENT span per statement
made inside a sampled trace, through the OpenTelemetry API: listeners of its
own, so an engine that is not traced carries none.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

import structlog
from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event, exc
from sqlalchemy.pool import AsyncAdaptedQueuePool

from bastion.observability.metrics import (
    DB_CONNECTION_COUNT,
    DB_CONNECTION_MAX,
    DB_CONNECTION_OVERFLOW,
    DB_CONNECTION_PENDING_REQUESTS,
    DB_CONNECTION_TIMEOUTS,
    DB_CONNECTION_WAIT_TIME,
    DB_OPERATION_DURATION,
    DB_SLOW_QUERIES,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from prometheus_client.metrics import Histogram
    from sqlalchemy.engine import Connection, ExceptionContext, ExecutionContext
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import ConnectionPoolEntry

    from bastion.settings import DatabaseSettings

__all__ = [
    "WARNING_INTERVAL",
    "InstrumentedQueuePool",
    "PoolMeter",
    "QueryMeter",
    "StatementTracer",
    "instrument",
    "statement_template",
    "statement_verb",
]

logger = structlog.get_logger("bastion.data")

WARNING_INTERVAL: Final = 10.0
"""Seconds between two pool warnings of one pool; the ones in between are counted."""
STATEMENT_MAX: Final = 500
"""Characters of a statement template kept in the slow-query log line."""

# The label values of db_operation_name: a closed set, so a statement can never
# mint a new time series.
_VERBS: Final = frozenset(
    {
        "ALTER", "ANALYZE", "BEGIN", "CALL", "COMMIT", "COPY", "CREATE", "DELETE", "DROP",
        "EXPLAIN", "GRANT", "INSERT", "LOCK", "MERGE", "PRAGMA", "RELEASE", "REVOKE",
        "ROLLBACK", "SAVEPOINT", "SELECT", "SET", "SHOW", "TRUNCATE", "UPDATE", "VACUUM",
        "VALUES", "WITH",
    }
)  # fmt: skip
_LEADING_WORD: Final = re.compile(r"[\s(]*([A-Za-z]+)")
_WHITESPACE: Final = re.compile(r"\s+")
_STARTED: Final = "_bastion_started"
_SPAN: Final = "_bastion_span"
_TRACER_SCOPE: Final = "bastion.data"


# Compiled statements come from SQLAlchemy's cache as the same str objects, whose
# hash is cached too, so a hit costs a dict lookup. Bounded because statements
# built with literals are all different.
@lru_cache(maxsize=512)
def statement_verb(statement: str) -> str:
    """Return the statement's leading SQL verb, upper case, or ``OTHER`` outside the known set.

    Example:
        >>> statement_verb("  select 1")
        'SELECT'
    """
    match = _LEADING_WORD.match(statement)
    if match is None:
        return "OTHER"
    verb = match[1].upper()
    return verb if verb in _VERBS else "OTHER"


def statement_template(statement: str) -> str:
    """Return a statement for a log line: whitespace collapsed, cut to :data:`STATEMENT_MAX`.

    The statement is what SQLAlchemy hands the driver: placeholders, not values.
    """
    collapsed = _WHITESPACE.sub(" ", statement).strip()
    if len(collapsed) <= STATEMENT_MAX:
        return collapsed
    return collapsed[: STATEMENT_MAX - 1] + "…"


class PoolMeter:
    """Publishes one pool's state to the ``db_client_connection_*`` metrics and warns on waits.

    Args:
        name: the ``db_client_connection_pool_name`` label.
        wait_warning: seconds a caller may queue for a connection before a warning.
        clock: monotonic seconds, for the warnings' rate limit (tests inject one).
    """

    def __init__(
        self,
        name: str,
        *,
        wait_warning: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.wait_warning = wait_warning
        self.clock = clock
        self.pool: InstrumentedQueuePool | None = None
        """The pool in use; the engine replaces it on ``dispose()``."""
        self.waiting = 0
        """Callers queued for a connection now."""
        self._used = DB_CONNECTION_COUNT.labels(name, "used")
        self._idle = DB_CONNECTION_COUNT.labels(name, "idle")
        self._overflow = DB_CONNECTION_OVERFLOW.labels(name)
        self._max = DB_CONNECTION_MAX.labels(name)
        self._pending = DB_CONNECTION_PENDING_REQUESTS.labels(name)
        self._wait_time = DB_CONNECTION_WAIT_TIME.labels(name)
        self._timeouts = DB_CONNECTION_TIMEOUTS.labels(name)
        self._last_overflow: int | None = None
        self._next_warning = float("-inf")
        self._suppressed = 0

    def attach(self, pool: InstrumentedQueuePool) -> None:
        """Make ``pool`` the one measured and publish its state."""
        pool.meter = self
        self.pool = pool
        self._max.set(pool.size() + max(pool.max_overflow, 0))
        self._pending.set(self.waiting)
        self.publish()

    def publish(self) -> None:
        """Set the used, idle and overflow gauges from the current pool's counts."""
        pool = self.pool
        if pool is None:
            return
        # Called on every checkout and checkin: the queue is read once, and the
        # overflow gauge written only when it moved (it does not, once the pool is warm).
        idle = pool.checkedin()
        overflow = pool.overflow()
        self._idle.set(idle)
        self._used.set(pool.size() - idle + overflow)
        if overflow != self._last_overflow:
            self._last_overflow = overflow
            self._overflow.set(overflow)

    def acquired(self, waited: float) -> None:
        """Record a connection handed out after ``waited`` seconds."""
        self._wait_time.observe(waited)
        self.publish()

    def queued(self, delta: int) -> None:
        """Count a caller joining (``1``) or leaving (``-1``) the queue."""
        self.waiting += delta
        self._pending.set(self.waiting)

    def waited(self, waited: float) -> None:
        """Warn (rate-limited) when a queued caller waited longer than ``wait_warning``."""
        if waited > self.wait_warning:
            self._warn("database pool wait", waited)

    def timed_out(self, waited: float) -> None:
        """Count and warn (rate-limited) about a caller that gave up after ``pool_timeout``."""
        self._timeouts.inc()
        self._warn("database pool exhausted", waited)

    def _warn(self, message: str, waited: float) -> None:
        now = self.clock()
        if now < self._next_warning:
            self._suppressed += 1
            return
        self._next_warning = now + WARNING_INTERVAL
        suppressed, self._suppressed = self._suppressed, 0
        pool = self.pool
        logger.warning(
            message,
            pool=self.name,
            waited_seconds=round(waited, 4),
            size=pool.size() if pool else None,
            in_use=pool.checkedout() if pool else None,
            overflow=pool.overflow() if pool else None,
            waiters=self.waiting,
            suppressed=suppressed,
        )


class InstrumentedQueuePool(AsyncAdaptedQueuePool):
    """``AsyncAdaptedQueuePool`` that reports to a :class:`PoolMeter`.

    Behaves exactly as its base; the meter is attached after the engine builds
    the pool (``create_engine`` passes a pool class only the arguments it knows)
    and handed on to the pool that replaces this one on ``dispose()``.
    """

    meter: PoolMeter | None = None
    # SQLAlchemy names a pool's logger after its class's module; under ``bastion.``
    # its info lines ("Pool recreating") would pass bastion's INFO level, where
    # SQLAlchemy's own pools stay quiet under ``sqlalchemy.pool``'s WARNING.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"

    @property
    def max_overflow(self) -> int:
        """Connections allowed beyond ``size()``; ``-1`` for no limit."""
        return self._max_overflow

    def _do_get(self) -> ConnectionPoolEntry:
        meter = self.meter
        if meter is None:
            return super()._do_get()
        started = time.perf_counter()
        # QueuePool's own test for blocking: nothing idle and no overflow left. Under
        # asyncio nothing runs between this check and the get, so it is exact; a
        # caller that does not queue costs the clock pair and the gauges only.
        if self.checkedin() or not -1 < self._max_overflow <= self._overflow:
            record = super()._do_get()
            meter.acquired(time.perf_counter() - started)
            return record
        try:
            record = self._queue(meter)
        except exc.TimeoutError:
            meter.timed_out(time.perf_counter() - started)
            raise
        waited = time.perf_counter() - started
        meter.acquired(waited)
        meter.waited(waited)
        return record

    def _queue(self, meter: PoolMeter) -> ConnectionPoolEntry:
        meter.queued(1)
        try:
            return super()._do_get()
        finally:
            meter.queued(-1)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        super()._do_return_conn(record)
        if self.meter is not None:
            self.meter.publish()

    def dispose(self) -> None:
        """Close the idle connections, as the base does, and publish the counts."""
        super().dispose()
        if self.meter is not None:
            self.meter.publish()

    def recreate(self) -> InstrumentedQueuePool:
        """Return a new pool like this one, measured by the same meter."""
        pool = super().recreate()
        assert isinstance(pool, InstrumentedQueuePool)  # noqa: S101 -- built from self.__class__
        if self.meter is not None:
            self.meter.attach(pool)
        return pool


class QueryMeter:
    """Times every statement an engine sends and logs the slow ones.

    Args:
        system: the ``db_system_name`` label (``postgresql``, ``sqlite``).
        slow_threshold: seconds above which a statement is logged and counted.
    """

    def __init__(
        self, system: str, *, slow_threshold: float, tracer: StatementTracer | None = None
    ) -> None:
        self.system = system
        self.slow_threshold = slow_threshold
        # One set of engine listeners serves the metrics and the spans: every
        # listener SQLAlchemy dispatches costs each statement a few microseconds.
        self.tracer = tracer
        self._durations: dict[str, Histogram] = {}

    def listen(self, engine: AsyncEngine) -> None:
        """Attach the listeners to ``engine``'s sync engine."""
        target = engine.sync_engine
        event.listen(target, "before_cursor_execute", self.before_cursor_execute)
        event.listen(target, "after_cursor_execute", self.after_cursor_execute)
        event.listen(target, "handle_error", self.handle_error)

    def before_cursor_execute(  # noqa: PLR0917 -- SQLAlchemy's listener signature
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        """Start the statement's span, if traced, and note when the statement starts."""
        if context is not None:
            if self.tracer is not None:
                self.tracer.start(statement, context)
            setattr(context, _STARTED, time.perf_counter())

    def after_cursor_execute(  # noqa: PLR0917 -- SQLAlchemy's listener signature
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        """Observe the statement's duration, log it when slow, and end its span."""
        started = getattr(context, _STARTED, None)
        if started is not None:
            self._observe(statement, time.perf_counter() - started, failed=False)
        if self.tracer is not None:
            self.tracer.end(context)

    def handle_error(self, exception_context: ExceptionContext) -> None:
        """Observe a failed statement too: one cancelled by a timeout is the slowest of all."""
        context = exception_context.execution_context
        started = getattr(context, _STARTED, None)
        statement = exception_context.statement
        if started is not None and statement is not None:
            self._observe(statement, time.perf_counter() - started, failed=True)
        if self.tracer is not None:
            self.tracer.fail(exception_context)

    def _observe(self, statement: str, duration: float, *, failed: bool) -> None:
        verb = statement_verb(statement)
        histogram = self._durations.get(verb)
        if histogram is None:
            histogram = self._durations[verb] = DB_OPERATION_DURATION.labels(self.system, verb)
        histogram.observe(duration)
        if duration > self.slow_threshold:
            DB_SLOW_QUERIES.labels(self.system, verb).inc()
            logger.warning(
                "slow query",
                db_system=self.system,
                operation=verb,
                duration_seconds=round(duration, 4),
                threshold_seconds=self.slow_threshold,
                failed=failed,
                statement=statement_template(statement),
            )


class StatementTracer:
    """Gives each statement an engine sends inside a sampled trace a CLIENT span.

    The span is named by the SQL verb and carries ``db.system.name``,
    ``db.operation.name``, ``db.query.text`` (the statement as sent to the
    driver: placeholders, never the bound values; whitespace collapsed and cut
    to :data:`STATEMENT_MAX` characters), ``db.namespace`` and ``server.address``
    / ``server.port`` when the database has them. A failed statement's span is
    in error with ``error.type``. Statements outside a sampled trace (pool
    pings, migrations at start-up, readiness probes) make no span: one check.

    Args:
        engine: the engine whose statements are traced.
        tracer_provider: the provider the spans are made with; the global one
            when omitted (``install`` passes the app's).
    """

    def __init__(
        self, engine: AsyncEngine, *, tracer_provider: otel_trace.TracerProvider | None = None
    ) -> None:
        # Resolved once: a proxy tracer until a global provider is set when None.
        self._tracer = otel_trace.get_tracer(_TRACER_SCOPE, tracer_provider=tracer_provider)
        url = engine.url
        self.system = "postgresql" if engine.dialect.name == "postgresql" else engine.dialect.name
        self.attributes: dict[str, str | int] = {"db.system.name": self.system}
        if url.host:
            self.attributes["server.address"] = url.host
            self.attributes["server.port"] = url.port or 5432
        if url.database and engine.dialect.name != "sqlite":
            # SQLite's database is a file path: where it lives says nothing to a trace.
            self.attributes["db.namespace"] = url.database
        self._templates: dict[str, str] = {}

    def start(self, statement: str, context: ExecutionContext) -> None:
        """Start the statement's span when a sampled span is current."""
        # SQLAlchemy runs the sync listeners in a greenlet that shares the
        # caller's contextvars, so the request's span is the current one here.
        if not otel_trace.get_current_span().is_recording():
            return
        verb = statement_verb(statement)
        span = self._tracer.start_span(
            verb,
            kind=SpanKind.CLIENT,
            attributes={
                **self.attributes,
                "db.operation.name": verb,
                "db.query.text": self._template(statement),
            },
        )
        setattr(context, _SPAN, span)

    def end(self, context: ExecutionContext | None) -> None:
        """End the statement's span."""
        span: Span | None = getattr(context, _SPAN, None)
        if span is not None:
            setattr(context, _SPAN, None)
            span.end()

    def fail(self, exception_context: ExceptionContext) -> None:
        """End a failed statement's span in error."""
        context = exception_context.execution_context
        span: Span | None = getattr(context, _SPAN, None)
        if span is None:
            return
        setattr(context, _SPAN, None)
        error = exception_context.original_exception
        span.set_attribute("error.type", type(error).__qualname__)
        # The message may quote the bound values (a unique violation's key): only
        # the class goes into the span.
        span.set_status(Status(StatusCode.ERROR))
        span.end()

    def _template(self, statement: str) -> str:
        # Statements come from SQLAlchemy's compiled cache; collapsing each once
        # keeps the regex off the hot path. Bounded: literal-built SQL differs each time.
        template = self._templates.get(statement)
        if template is None:
            template = statement_template(statement)
            if len(self._templates) < 512:  # noqa: PLR2004 -- cache bound, as statement_verb's
                self._templates[statement] = template
        return template


def instrument(
    engine: AsyncEngine,
    *,
    name: str,
    settings: DatabaseSettings,
    trace: bool = False,
    tracer_provider: otel_trace.TracerProvider | None = None,
) -> PoolMeter | None:
    """Attach bastion's metrics and slow-query log to ``engine``.

    Args:
        engine: a new engine; its pool is measured when it is an
            :class:`InstrumentedQueuePool` (``NullPool`` for SQLite ``:memory:``
            has nothing to measure).
        name: the pool's ``db_client_connection_pool_name``.
        settings: the ``database`` section (``slow_query_threshold``, ``pool_wait_warning``).
        trace: add a span per statement (:class:`StatementTracer`); install passes
            ``tracing.enabled and tracing.trace_database``.
        tracer_provider: the provider of those spans; the global one when
            omitted (install passes the app's).

    Returns:
        The pool's meter, or ``None`` when the pool is not measured.
    """
    tracer = StatementTracer(engine, tracer_provider=tracer_provider) if trace else None
    QueryMeter(
        engine.dialect.name, slow_threshold=settings.slow_query_threshold, tracer=tracer
    ).listen(engine)
    pool = engine.sync_engine.pool
    if not isinstance(pool, InstrumentedQueuePool):
        return None
    meter = PoolMeter(name, wait_warning=settings.pool_wait_warning)
    meter.attach(pool)
    return meter
