"""Structured logging: one renderer for structlog, the standard library and uvicorn.

Every line carries ``timestamp, level, event, logger, request_id, trace_id,
span_id`` and, when known, ``tenant_id`` and ``user_id``. A masking processor
runs before rendering, so secrets never reach the output.

The access log has its own fast path: structlog's full chain costs about 17 µs a
line here, a budget the whole request path cannot afford, so in JSON mode the
access line is one ``orjson.dumps`` of a dict whose fields are known to carry
no secrets (route templates, never raw paths or query strings), written to a
buffer that is flushed once per event-loop turn.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any, Final

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from bastion.context import current_context
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

# Values that are secrets whatever key they sit under.
_SECRET_VALUE: Final = re.compile(
    r"(?P<scheme>\b(?:Bearer|Basic|Digest|Token)\s+)[A-Za-z0-9._~+/=-]+"
    r"|(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)"
    r"|\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|(?P<assignment>\b(?:password|passwd|pwd|secret|token|api_key|apikey)\s*[=:]\s*)[^\s,;&]+",
    re.IGNORECASE,
)
# Cheap pre-check: the regex only runs on strings that contain one of these.
_SECRET_VALUE_HINTS: Final = (
    "earer",
    "asic",
    "igest",
    "oken",
    "://",
    "eyJ",
    "ass",
    "wd",
    "ecret",
    "pi_key",
    "pikey",
)


def _mask_match(match: re.Match[str]) -> str:
    prefix = match.group("scheme") or match.group("userinfo") or match.group("assignment") or ""
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

    def mask_value(self, value: Any) -> Any:
        """Return ``value`` with embedded secrets masked, recursing into containers."""
        if isinstance(value, str):
            if any(hint in value for hint in _SECRET_VALUE_HINTS):
                return _SECRET_VALUE.sub(_mask_match, value)
            return value
        if isinstance(value, dict):
            self._mask_mapping(value)
            return value
        if isinstance(value, list | tuple):
            return [self.mask_value(item) for item in value]
        return value

    def _mask_mapping(self, mapping: MutableMapping[str, Any]) -> None:
        for key, value in mapping.items():
            if isinstance(key, str) and self.is_secret_key(key) and key != "event":
                if value is not None:
                    mapping[key] = MASK
            else:
                mapping[key] = self.mask_value(value)


def _add_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
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
    if record is not None:
        event_dict["logger"] = record.name
    else:
        event_dict.setdefault("logger", getattr(logger, "name", None) or "app")
    return event_dict


class _Sink:
    """The one byte stream every log line goes to, so lines never interleave.

    ``write`` flushes at once; ``write_deferred`` (the access log) flushes once per
    event-loop turn, which turns many small writes into one syscall under load.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self._flush_pending = False

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def write_deferred(self, data: bytes) -> None:
        self.stream.write(data)
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.stream.flush()
            return
        self._flush_pending = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        try:
            self.stream.flush()
        except (OSError, ValueError):
            # stdout closed under us (the reader went away); losing log lines is
            # better than failing the request that wrote them.
            pass


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

    __slots__ = ("_info_enabled", "_json", "_logger", "_sink", "debug_enabled")

    def __init__(self, sink: _Sink, *, json: bool, level: int) -> None:
        self._sink = sink
        self._json = json
        self._info_enabled = level <= logging.INFO
        self.debug_enabled = level <= logging.DEBUG
        self._logger = structlog.get_logger("bastion.access")

    def enabled(self, operational: bool) -> bool:
        """Return whether a line for this kind of request would be written."""
        return self.debug_enabled if operational else self._info_enabled

    def log(
        self,
        *,
        operational: bool,
        method: str,
        route: str | None,
        status: int,
        duration_ms: float,
        client: str | None,
    ) -> None:
        """Write the access line for the request whose context is current."""
        level = "debug" if operational else "info"
        if not self._json:
            getattr(self._logger, level)(
                "request",
                method=method,
                route=route,
                status=status,
                duration_ms=duration_ms,
                client=client,
            )
            return
        context = current_context()
        line: dict[str, Any] = {
            "timestamp": datetime.now(UTC).isoformat(),
            "level": level,
            "event": "request",
            "logger": "bastion.access",
            "request_id": context.request_id if context else None,
            "trace_id": context.trace_id if context else None,
            "span_id": context.span_id if context else None,
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "client": client,
        }
        if context is not None:
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
    atexit.register(_flush_quietly, target)
    level = logging.getLevelNamesMapping()[settings.level]
    console = _uses_console(settings, target)

    shared: list[Processor] = [
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_context,
        structlog.stdlib.ExtraAdder(),
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
        cache_logger_on_first_use=True,
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


def _flush_quietly(stream: IO[bytes]) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):
        pass
