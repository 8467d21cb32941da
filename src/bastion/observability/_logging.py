"""Structured logging: one renderer for structlog, the standard library and uvicorn.

Every line carries ``timestamp, level, event, logger, request_id, trace_id,
span_id`` and, when known, ``tenant_id`` and ``user_id``; ``trace_id`` and
``span_id`` are those of the span current where the line is written (the
access line: the request's server span), null outside any span. A masking processor
runs before rendering, so secrets never reach the output.

The access log has its own fast path: structlog's full chain costs about 17 µs a
line here, a budget the whole request path cannot afford, so in JSON mode the
access line is one ``orjson.dumps`` of a dict whose fields are known to carry
no secrets (route templates, never raw paths or query strings), queued and
written once per event-loop turn. ``bench/request_path.py`` measures it.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import io
import logging
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterable, MutableMapping
from typing import IO, Any, Final

import orjson
import structlog
from opentelemetry import trace
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from bastion.context import RequestContext, current_context
from bastion.settings import LoggingSettings

__all__ = ["AccessLogger", "LogMasker", "configure_logging"]

MASK: Final = "***"

# Any key containing one of these fragments is masked whatever its value.
_SECRET_KEY_FRAGMENTS: Final = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "authorization",
    "cookie",
    "private_key",
    "credential",
    "session",
)

# Values that are secrets whatever key they sit under. The assignment form catches
# any key containing a secret word, quoted or not (access_token=, client_secret:,
# "password": "...", X-Api-Key: ...), and its value keeps an auth scheme inside the
# match, so "Authorization: Bearer abc" masks abc rather than the word Bearer.
_SECRET_WORD: Final = r"(?:password|passwd|pwd|secret|token|api[_-]?key|authorization|cookie)"  # noqa: S105 -- a pattern of key names, not a password
_SECRET_VALUE: Final = re.compile(
    r"(?P<assignment>[\w.-]*" + _SECRET_WORD + r"[\w.-]*[\"']?\s*[=:]\s*[\"']?"
    r"(?:(?:Bearer|Basic|Digest|Token)\s+)?)[^\s,;&\"'}]+"
    r"|(?P<scheme>\b(?:Bearer|Basic|Digest|Token)\s+)[A-Za-z0-9._~+/=-]+"
    r"|(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)"
    r"|\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
    re.IGNORECASE,
)
# Cheap pre-check on the lower-cased string: the regex only runs when one is present.
# One alternation of literals, searched once, rather than a test per hint.
_SECRET_VALUE_HINTS: Final = (
    "earer",
    "asic",
    "igest",
    "oken",
    "://",
    "eyj",
    "ass",
    "wd",
    "ecret",
    "pi_key",
    "pi-key",
    "pikey",
    "uthoriz",
    "ookie",
)
_SECRET_VALUE_HINT: Final = re.compile("|".join(map(re.escape, _SECRET_VALUE_HINTS)))


def _mask_match(match: re.Match[str]) -> str:
    prefix = match.group("assignment") or match.group("scheme") or match.group("userinfo") or ""
    return prefix + MASK


class LogMasker:
    """A structlog processor that masks secrets by key and by value shape.

    Args:
        extra_keys: more key fragments to mask, from ``logging.mask_keys``.
    """

    __slots__ = ("_fragments",)

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        self._fragments = _SECRET_KEY_FRAGMENTS + tuple(key.lower() for key in extra_keys)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        """Mask the event dict in place and return it."""
        self._mask_mapping(event_dict)
        return event_dict

    def is_secret_key(self, key: str) -> bool:
        """Return whether values under ``key`` are always masked."""
        lowered = key.lower()
        return any(fragment in lowered for fragment in self._fragments)

    def mask_value(self, value: Any) -> Any:  # noqa: PLR0911 -- one return per kind of value
        """Return ``value`` with embedded secrets masked, recursing into containers."""
        if isinstance(value, str):
            if _SECRET_VALUE_HINT.search(value.lower()) is not None:
                return _SECRET_VALUE.sub(_mask_match, value)
            return value
        if isinstance(value, bytes | bytearray):
            text = bytes(value).decode("utf-8", "replace")
            masked = self.mask_value(text)
            return value if masked == text else masked
        if isinstance(value, dict):
            self._mask_mapping(value)
            return value
        if isinstance(value, list | tuple):
            if len(value) == 2 and self._is_secret_name(value[0]):  # noqa: PLR2004 -- a pair
                # A (name, value) header pair, as ASGI scopes and httpx carry headers.
                return [value[0], MASK]
            return [self.mask_value(item) for item in value]
        return value

    def _is_secret_name(self, name: Any) -> bool:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        return isinstance(name, str) and self.is_secret_key(name)

    def _mask_mapping(self, mapping: MutableMapping[str, Any]) -> None:
        for key, value in mapping.items():
            if isinstance(key, str) and self.is_secret_key(key) and key != "event":
                if value is not None:
                    mapping[key] = MASK
            else:
                mapping[key] = self.mask_value(value)


def _add_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # The current span, not the request's: a line written inside a child span
    # (a statement, an outbound call, a consumed message) names that span. Unsampled
    # spans have ids too, so their lines still join up with the request's.
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    context = current_context()
    if context is None:
        event_dict.setdefault("request_id", None)
        event_dict.setdefault("trace_id", None)
        event_dict.setdefault("span_id", None)
        return event_dict
    event_dict.setdefault("request_id", context.request_id)
    event_dict.setdefault("trace_id", context.trace_id)
    event_dict.setdefault("span_id", context.span_id)
    if context.tenant_id is not None:
        event_dict.setdefault("tenant_id", context.tenant_id)
    if context.user_id is not None:
        event_dict.setdefault("user_id", context.user_id)
    return event_dict


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    # uvicorn adds an ANSI-coloured copy of its message as an extra; it is noise in JSON.
    event_dict.pop("color_message", None)
    if record is not None:
        event_dict["logger"] = record.name
    else:
        event_dict.setdefault("logger", getattr(logger, "name", None) or "app")
    return event_dict


class _Sink:
    """The one byte stream every log line goes to, so lines never interleave.

    ``write`` writes and flushes at once. ``write_deferred`` (the access log) only
    queues its line; the queue is written and flushed once per event-loop turn,
    which turns the access lines of every request finished in a turn into one
    ``write`` syscall under load (~45 lines a turn at 64 connections here).
    ``write`` first empties the queue, so lines keep the order they were made in.
    """

    __slots__ = ("__weakref__", "_flush_pending", "_lock", "_pending", "stream")

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = _buffered(stream)
        # A deque because its append and popleft are atomic: a line queued by the
        # loop thread is never lost to a drain running on another thread. Appending
        # costs ~0.04 µs a line against ~0.4 µs for BufferedWriter.write
        # (bench/choices.py).
        self._pending: collections.deque[bytes] = collections.deque()
        # Re-entrant: a signal handler that logs may interrupt a flush on this thread.
        self._lock = threading.RLock()
        self._flush_pending = False
        _SINKS.add(self)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._drain()
            self.stream.write(data)
            self.stream.flush()

    def write_deferred(self, data: bytes) -> None:
        self._pending.append(data)
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        # stdout closed under us (the reader went away): losing log lines is better
        # than failing the request that wrote them.
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._drain()
            self.stream.flush()

    def _drain(self) -> None:
        """Write every queued line; the caller holds the lock."""
        pending = self._pending
        if not pending:
            return
        lines = []
        with contextlib.suppress(IndexError):  # empty: done
            while True:
                lines.append(pending.popleft())
        self.stream.write(b"".join(lines))


# Every live sink, so one exit hook flushes them all, however often logging is configured.
_SINKS: Final[weakref.WeakSet[_Sink]] = weakref.WeakSet()
_SINK_BUFFER_SIZE: Final = 64 * 1024


def _buffered(stream: IO[bytes]) -> IO[bytes]:
    """Return ``stream``, or a buffered writer over its descriptor when it is unbuffered.

    With ``PYTHONUNBUFFERED=1`` (set by most container images) ``sys.stdout.buffer``
    is a raw ``FileIO``, and each line would be its own ``write`` syscall (~0.65 µs
    to a file here) in spite of the once-per-turn flush. The writer gets its own
    ``FileIO`` on the same descriptor, so closing it never closes ``sys.stdout``.
    """
    if not isinstance(stream, io.RawIOBase):
        return stream
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return stream
    raw = io.FileIO(fd, "wb", closefd=False)
    return io.BufferedWriter(raw, buffer_size=_SINK_BUFFER_SIZE)


@atexit.register
def _flush_sinks() -> None:
    for sink in list(_SINKS):
        sink.flush()


class _BytesLogger:
    """A structlog logger that hands rendered bytes to the sink."""

    def __init__(self, sink: _Sink, name: str | None) -> None:
        self._sink = sink
        self.name = name

    def msg(self, message: bytes | str) -> None:
        data = message if isinstance(message, bytes) else message.encode()
        self._sink.write(data + b"\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _SinkHandler(logging.Handler):
    """Routes standard-library records (uvicorn, SQLAlchemy, user code) to the sink."""

    def __init__(self, sink: _Sink, formatter: logging.Formatter) -> None:
        super().__init__()
        self._sink = sink
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record).encode() + b"\n")
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)


class AccessLogger:
    """Writes one line per request, on a fast path in JSON mode.

    Args:
        sink: where lines go.
        json: render JSON directly (fast path) rather than through structlog.
        level: the configured level; operational endpoints log at debug only.
    """

    __slots__ = ("_json", "_logger", "_prefix", "_second", "_sink", "debug_enabled", "info_enabled")

    def __init__(self, sink: _Sink, *, json: bool, level: int) -> None:
        self._sink = sink
        self._json = json
        self.info_enabled = level <= logging.INFO
        self.debug_enabled = level <= logging.DEBUG
        self._logger = structlog.get_logger("bastion.access")
        self._second = -1
        self._prefix = ""

    def enabled(self, operational: bool) -> bool:
        """Return whether a line for this kind of request would be written."""
        return self.debug_enabled if operational else self.info_enabled

    def log(
        self, context: RequestContext, status: int, duration_ms: float, operational: bool = False
    ) -> None:
        """Write the access line of the request ``context`` describes.

        Method, route and client are read from ``context``, so the once-per-request
        call passes four arguments, not seven.

        Args:
            context: the request's context, with ``route`` already filled in.
            status: the status sent, or 500 when none was.
            duration_ms: time from the first byte of the request to the last of the response.
            operational: a probe or metrics request, logged at debug level.
        """
        level = "debug" if operational else "info"
        if not self._json:
            getattr(self._logger, level)(
                "request",
                method=context.method,
                route=context.route,
                status=status,
                duration_ms=duration_ms,
                client=context.client_ip,
            )
            return
        # The timestamp's date and time are formatted once per second and only the
        # microseconds per line: datetime.now(UTC).isoformat() costs ~1.7 µs a line,
        # this ~0.5 µs (bench/choices.py). Same shape as structlog's TimeStamper
        # (ISO 8601, UTC, "Z") on every other line.
        second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        # One dict literal and one orjson.dumps (~0.9-1.5 µs): a bytes template with
        # each field escaped by orjson measured slower (~1.5-2.3 µs), and orjson
        # escapes the route and method whatever they hold.
        line = {
            "timestamp": self._prefix + str(nanoseconds // 1000).zfill(6) + "Z",
            "level": level,
            "event": "request",
            "logger": "bastion.access",
            "request_id": context.request_id,
            "trace_id": context.trace_id,
            "span_id": context.span_id,
            "method": context.method,
            "route": context.route,
            "status": status,
            "duration_ms": duration_ms,
            "client": context.client_ip,
        }
        if context.tenant_id is not None:
            line["tenant_id"] = context.tenant_id
        if context.user_id is not None:
            line["user_id"] = context.user_id
        self._sink.write_deferred(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))


def _orjson_text(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


def _uses_console(settings: LoggingSettings, stream: IO[Any]) -> bool:
    if settings.format == "auto":
        return stream.isatty()
    return settings.format == "console"


def configure_logging(settings: LoggingSettings, stream: IO[bytes] | None = None) -> AccessLogger:
    """Configure structlog and the standard library to share one renderer.

    Args:
        settings: the ``logging`` section.
        stream: a byte stream to write to; standard output by default.

    Returns:
        The access logger the request middleware writes through.
    """
    target = stream if stream is not None else sys.stdout.buffer
    sink = _Sink(target)
    level = logging.getLevelNamesMapping()[settings.level]
    console = _uses_console(settings, target)

    shared: list[Processor] = [
        structlog.processors.add_log_level,
        # Before _add_logger_name, which drops the extras that are only noise.
        structlog.stdlib.ExtraAdder(),
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_context,
    ]
    renderer: Processor
    exception_formatter: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        exception_formatter = structlog.processors.format_exc_info
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text)
        # Never render frame locals: they hold request bodies, secrets and personal data.
        exception_formatter = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
    # The masker runs last before rendering, after exceptions became data, so an
    # exception message carrying a secret is masked like any other value.
    masker = LogMasker(settings.mask_keys)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.StackInfoRenderer(),
            exception_formatter,
            masker,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: _BytesLogger(sink, args[0] if args else None),
        # Not cached: a cached logger keeps the sink and level of the configuration
        # it first saw, so module-level loggers would ignore a later configure_logging
        # (the CLI configures stderr, then the app stdout). Only the access line is on
        # the hot path, and it does not go through structlog.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exception_formatter,
            masker,
            renderer,
        ],
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _SinkHandler):
            root.removeHandler(handler)
    root.addHandler(_SinkHandler(sink, formatter))
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    # bastion writes its own access line; uvicorn's would be a second, slower one.
    logging.getLogger("uvicorn.access").disabled = True
    return AccessLogger(sink, json=not console, level=level)
