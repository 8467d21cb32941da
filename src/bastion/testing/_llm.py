"""A fake LLM provider: a real HTTP server speaking OpenAI's and Ollama's chat APIs.

Tests point an application at :attr:`FakeLLMProvider.url` exactly as they would
at a real provider, then make it slow, failing or silent at run time, so the
application's client, timeouts, retries and circuit breaker are exercised over
real sockets.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from bastion.testing._faults import BackgroundLoop, ServedInBackground, TcpListener

__all__ = ["FakeLLMProvider", "ProviderRequest"]

Mode = Literal["ok", "slow", "fail", "hang"]
Reply = str | Callable[[list[dict[str, Any]]], str]

DEFAULT_REPLY: Final = "This is the fake provider's answer."
DEFAULT_MODEL: Final = "fake-model"
_OPENAI_CHAT: Final = "/v1/chat/completions"
_OPENAI_MODELS: Final = "/v1/models"
_OLLAMA_CHAT: Final = "/api/chat"
_OLLAMA_TAGS: Final = "/api/tags"
_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 16 * 1024 * 1024
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One HTTP request as the fake provider received it.

    Attributes:
        method: ``POST``, ``GET``...
        path: the request target without its query string.
        headers: header names in lower case (the last value wins when repeated).
        body: the decoded JSON body, or ``None`` when there was none or it was not JSON.
    """

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass(frozen=True, slots=True)
class _Behaviour:
    mode: Mode = "ok"
    delay: float = 0.0
    status: int = 503
    retry_after: float | None = None


class _BadRequest(Exception):
    """The bytes on the connection are not an HTTP/1.1 request this server reads."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class FakeLLMProvider(ServedInBackground):
    """A local HTTP server that answers like an OpenAI-compatible or an Ollama provider.

    It serves ``POST /v1/chat/completions`` (OpenAI), ``POST /api/chat`` (Ollama),
    and the model listings ``GET /v1/models`` and ``GET /api/tags``, on its own
    thread and event loop, so sync tests, async tests and server subprocesses can
    all call it. Streaming requests (``"stream": true``, Ollama's default) get the
    whole reply as one chunk, in server-sent events (OpenAI) or NDJSON (Ollama).

    Its behaviour is switched at run time from any thread with :meth:`behave` and
    :meth:`fail_next`; a change applies to the next request, and a request hung by
    ``"hang"`` is answered under the new behaviour.

    For "provider down" (connection refused) use :meth:`stop` then :meth:`start`:
    the server comes back on the same port. To also break connections that are
    already open, put a :class:`~bastion.testing.FaultProxy` in front and use its
    ``outage()``.

    Example:
        >>> with FakeLLMProvider(reply="Paris.") as llm:
        ...     response = httpx.post(
        ...         f"{llm.url}/v1/chat/completions",
        ...         json={"model": "m", "messages": [{"role": "user", "content": "Capital?"}]},
        ...     )
        ...     llm.behave("fail", status=503, retry_after=1)
        ...     llm.behave("hang")  # the next requests never get an answer

    Args:
        reply: the assistant's answer, or a function of the request's messages returning it.
        host: the address to listen on.
        port: the port to listen on; 0 picks a free one (kept across stop/start).
    """

    def __init__(
        self, *, reply: Reply = DEFAULT_REPLY, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.reply = reply
        self.host = host
        self._port = port
        self._loop = BackgroundLoop("fake-llm-provider")
        self._lock = threading.Condition()
        self._behaviour = _Behaviour()
        self._fail_next = 0
        self._fail_next_status = 503
        self._received: list[ProviderRequest] = []
        self._listener = TcpListener(self._serve, limit=_MAX_HEAD)
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed: asyncio.Event | None = None

    def __repr__(self) -> str:
        state = self.url if self._loop.running else "stopped"
        return f"<FakeLLMProvider {state} mode={self._behaviour.mode}>"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> FakeLLMProvider:
        """Start serving; after a :meth:`stop` the server comes back on the same port.

        Returns:
            The provider itself, so ``provider = FakeLLMProvider().start()`` reads well.

        Raises:
            RuntimeError: it is already running.
            OSError: the port cannot be bound.
        """
        self._loop.start()
        try:
            self._port = self._loop.run(self._listen())
        except BaseException:
            self._loop.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, including requests left hanging.

        Does nothing when the provider is not running.
        """
        if not self._loop.running:
            return
        self._loop.run(self._close())
        self._loop.stop()

    @property
    def port(self) -> int:
        """The port served on (0 until the first :meth:`start` when it was chosen freely)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, such as ``http://127.0.0.1:PORT`` (no trailing slash).

        Raises:
            RuntimeError: the port is not known yet (free port, never started).
        """
        if self._port == 0:
            raise RuntimeError("FakeLLMProvider has no port yet: call start() first")
        return f"http://{self.host}:{self._port}"

    # -- behaviour -----------------------------------------------------------------

    def behave(
        self,
        mode: Mode,
        *,
        delay: float = 0.0,
        status: int = 503,
        retry_after: float | None = None,
    ) -> None:
        """Change how the provider answers from the next request on.

        Args:
            mode: ``"ok"`` answers at once; ``"slow"`` answers after ``delay``;
                ``"fail"`` answers ``status`` with a JSON error body (after ``delay``
                when given); ``"hang"`` reads the request and never answers, until
                the mode changes (then it is answered under the new mode) or the
                provider stops.
            delay: seconds before answering, for ``"slow"`` and ``"fail"``.
            status: the HTTP status of a failure, 400 to 599.
            retry_after: seconds sent as ``Retry-After`` with a failure (an integer
                when whole, else a decimal such as ``0.5``).

        Raises:
            ValueError: an unknown mode or an argument that does not fit it.
        """
        if mode not in get_args(Mode):
            raise ValueError(f"mode must be one of {get_args(Mode)}, not {mode!r}")
        if delay < 0 or not math.isfinite(delay):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        if mode == "slow" and delay == 0:
            raise ValueError('mode "slow" needs a delay > 0')
        if mode in ("ok", "hang") and delay != 0:
            raise ValueError(f'mode "{mode}" takes no delay; use "slow" to delay answers')
        _check_status(status)
        if retry_after is not None and (retry_after < 0 or not math.isfinite(retry_after)):
            raise ValueError(f"retry_after must be seconds >= 0, not {retry_after!r}")
        with self._lock:
            self._behaviour = _Behaviour(mode, delay, status, retry_after)
        self._wake()

    def fail_next(self, count: int, *, status: int = 503) -> None:
        """Fail the next ``count`` requests with ``status``, then go back to the current mode.

        They fail at once, whatever the mode (a hung provider fails them too).

        Args:
            count: how many requests to fail (replaces a previous count).
            status: the HTTP status of the failures, 400 to 599.

        Raises:
            ValueError: ``count`` is negative or ``status`` is not an error status.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        _check_status(status)
        with self._lock:
            self._fail_next, self._fail_next_status = count, status
        self._wake()

    # -- what was received ---------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every JSON object body received (chat requests), in arrival order; a copy."""
        with self._lock:
            return [r.body for r in self._received if isinstance(r.body, dict)]

    @property
    def received(self) -> list[ProviderRequest]:
        """Every HTTP request received, with its method, path and headers; a copy."""
        with self._lock:
            return list(self._received)

    @property
    def request_count(self) -> int:
        """How many HTTP requests arrived (on any path, answered or not)."""
        with self._lock:
            return len(self._received)

    def wait_for_requests(self, count: int, within: float = 5.0) -> list[ProviderRequest]:
        """Block until at least ``count`` requests arrived, then return them all.

        Args:
            count: how many requests to wait for.
            within: seconds to wait at most.

        Raises:
            TimeoutError: fewer arrived in time.
        """
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._received) >= count, within):
                raise TimeoutError(f"{len(self._received)} request(s) received, expected {count}")
            return list(self._received)

    def clear(self) -> None:
        """Forget the requests received so far."""
        with self._lock:
            self._received.clear()

    # -- the server ----------------------------------------------------------------

    async def _listen(self) -> int:
        self._changed = asyncio.Event()
        return self._listener.open(self.host, self._port)

    async def _close(self) -> None:
        self._listener.shutdown()
        for writer in list(self._writers):
            writer.transport.abort()
        # One turn of the loop lets the aborted transports close their sockets.
        await asyncio.sleep(0)

    def _wake(self) -> None:
        """Release requests waiting in ``"hang"`` so they look at the new behaviour."""
        if not self._loop.running:
            return
        try:
            self._loop.loop.call_soon_threadsafe(self._set_changed)
        except RuntimeError:  # the loop closed between the check and the call
            return

    def _set_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as exc:
                    await _write(writer, _error_answer("/", 400, str(exc)), keep_alive=False)
                    return
                if request is None:
                    return
                with self._lock:
                    self._received.append(request)
                    self._lock.notify_all()
                answer = await self._answer(request)
                keep_alive = request.headers.get("connection", "").lower() != "close"
                await _write(writer, answer, keep_alive=keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, request: ProviderRequest) -> _Answer:
        while True:
            with self._lock:
                if self._fail_next:
                    self._fail_next -= 1
                    return _error_answer(
                        request.path, self._fail_next_status, "failing on purpose (fail_next)"
                    )
                behaviour = self._behaviour
            if behaviour.mode != "hang":
                break
            if self._changed is not None:  # always: _listen sets it before any request
                await self._changed.wait()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.mode == "fail":
            headers: tuple[tuple[str, str], ...] = ()
            if behaviour.retry_after is not None:
                headers = (("Retry-After", _seconds(behaviour.retry_after)),)
            return _error_answer(
                request.path, behaviour.status, "failing on purpose (mode fail)", headers
            )
        return self._route(request)

    def _route(self, request: ProviderRequest) -> _Answer:
        endpoints: dict[str, tuple[str, Callable[[ProviderRequest], _Answer]]] = {
            _OPENAI_CHAT: ("POST", self._openai_chat),
            _OLLAMA_CHAT: ("POST", self._ollama_chat),
            _OPENAI_MODELS: ("GET", _openai_models),
            _OLLAMA_TAGS: ("GET", _ollama_tags),
        }
        if request.path not in endpoints:
            return _error_answer(request.path, 404, f"no endpoint {request.path}")
        method, handler = endpoints[request.path]
        if request.method != method:
            return _error_answer(request.path, 405, f"{request.path} takes {method}")
        return handler(request)

    def _chat(self, request: ProviderRequest) -> tuple[str, str] | _Answer:
        """The model and the reply for a chat request, or the 400 answer for a bad one."""
        body = request.body
        if not isinstance(body, dict):
            return _error_answer(request.path, 400, "the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            return _error_answer(
                request.path, 400, '"messages" must be a list of objects with a "role"'
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = DEFAULT_MODEL
        try:
            text = self.reply(messages) if callable(self.reply) else self.reply
        except Exception as exc:  # noqa: BLE001 -- a broken reply function is the test's bug; answer 500 and say so
            return _error_answer(request.path, 500, f"the reply function raised {exc!r}")
        return model, str(text)

    def _openai_chat(self, request: ProviderRequest) -> _Answer:
        chat = self._chat(request)
        if isinstance(chat, _Answer):
            return chat
        model, text = chat
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = _tokens(request.body["messages"])
        if request.body.get("stream") is True:
            chunks = [
                {"role": "assistant", "content": text},
                {},
            ]
            events = [
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": "stop" if not delta else None}
                    ],
                }
                for delta in chunks
            ]
            lines = [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]
            return _Answer(200, "".join(lines).encode(), "text/event-stream")
        completion_tokens = len(text.split())
        return _json_answer(
            200,
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _ollama_chat(self, request: ProviderRequest) -> _Answer:
        chat = self._chat(request)
        if isinstance(chat, _Answer):
            return chat
        model, text = chat
        created_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        final = {
            "model": model,
            "created_at": created_at,
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": _tokens(request.body["messages"]),
            "eval_count": len(text.split()),
        }
        # Ollama streams unless told not to.
        if request.body.get("stream", True) is not False:
            first = {
                "model": model,
                "created_at": created_at,
                "message": {"role": "assistant", "content": text},
                "done": False,
            }
            final["message"] = {"role": "assistant", "content": ""}
            lines = [json.dumps(first), json.dumps(final)]
            return _Answer(200, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
        return _json_answer(200, final)


def _openai_models(request: ProviderRequest) -> _Answer:
    model = {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "bastion"}
    return _json_answer(200, {"object": "list", "data": [model]})


def _ollama_tags(request: ProviderRequest) -> _Answer:
    return _json_answer(200, {"models": [{"name": DEFAULT_MODEL, "model": DEFAULT_MODEL}]})


def _tokens(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages)


def _check_status(status: int) -> None:
    if not 400 <= status <= 599:  # noqa: PLR2004 -- the HTTP error range
        raise ValueError(f"status must be an HTTP error status (400-599), not {status}")


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _json_answer(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Answer:
    return _Answer(status, json.dumps(payload).encode(), "application/json", headers)


def _error_answer(
    path: str, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> _Answer:
    """An error in the shape the path's API uses (Ollama: a string; OpenAI: an object)."""
    if path.startswith("/api/"):
        return _json_answer(status, {"error": message}, headers)
    kind = "server_error" if status >= 500 else "invalid_request_error"  # noqa: PLR2004 -- 5xx
    error = {"message": message, "type": kind, "param": None, "code": None}
    return _json_answer(status, {"error": error}, headers)


async def _read_request(reader: asyncio.StreamReader) -> ProviderRequest | None:
    """Read one HTTP/1.1 request; ``None`` when the client closed between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("the request head ended early") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("the request head is too large") from exc
    request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):  # noqa: PLR2004 -- method, target, version
        raise _BadRequest(f"not an HTTP/1.1 request line: {request_line[:100]!r}")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest(f"malformed header line: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    raw = await _read_body(reader, headers)
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
    return ProviderRequest(method, target.partition("?")[0], headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                length = int(line.split(b";")[0], 16)
            except ValueError as exc:
                raise _BadRequest("malformed chunk size") from exc
            size += length
            if size > _MAX_BODY:
                raise _BadRequest("the body is too large")
            if length == 0:
                # Trailers, if any, end with an empty line.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(length))
            await reader.readexactly(2)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequest("malformed Content-Length") from exc
    if not 0 <= length <= _MAX_BODY:
        raise _BadRequest("the body is too large")
    return await reader.readexactly(length) if length else b""


async def _write(writer: asyncio.StreamWriter, answer: _Answer, *, keep_alive: bool) -> None:
    lines = [
        f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Error')}",
        f"Content-Type: {answer.content_type}",
        f"Content-Length: {len(answer.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in answer.headers),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + answer.body)
    await writer.drain()
