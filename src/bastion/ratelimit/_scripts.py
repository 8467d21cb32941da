"""Lua scripts kept as resource files, run by hash, reloaded after NOSCRIPT, pipelined.

:class:`ScriptRunner` is an auto-pipelining client for the request path, built
on redis-py's connection level (its ``Connection`` does the handshake, AUTH,
TLS and database; its hiredis reader parses) rather than on ``Redis.evalsha``:
a call checks out no pool connection, arms no timer of its own (one watchdog
serves all deadlines) and is packed by hiredis in C. It runs on one event loop.

How a call travels::

    run() ──▶ an idle connection? ──yes──▶ written at once (a lone caller: one EVALSHA)
                    │ no
                    ▼
              the queue ──▶ written as one pipelined batch when a connection's
                            batch in flight has been answered in full

Each connection keeps the calls it has written in a FIFO; one reader task per
connection reads every reply in order and resolves the FIFO's head. A caller
that is cancelled or times out only abandons its future: its reply is still
read and dropped, so the replies of a pipelined connection never shift. A
connection whose state is in doubt (an error while writing or reading; no
answer to a call that timed out an interval ago) is dropped with every call in
flight on it. Measured (bench/ratelimit.py): a lone decision costs this
process about 60% of the CPU time of redis-py's ``client.evalsha``; per-call
timers, redis-py's argument encoding and its per-reply ``read_response()``,
all cut, cost about half of a pipelined decision.

Atomicity is not weakened: a batch is a pipeline, not a transaction, and each
EVALSHA in it runs alone on Redis, as it would sent by itself.

Failures (connection refused or reset, no answer within ``timeout``, a Redis
that answers LOADING, BUSY, OOM, READONLY...) raise :class:`StoreUnavailable`
and are never retried here ("Retries live in one layer"). After one, the runner
fails fast: calls raise at once for ``retry_interval`` seconds, then one call
probes; its success closes the gap, its failure doubles the interval (up to
``max_retry_interval``). Any answer from Redis also closes it, so a stall just
past the timeout costs about its own length. A Redis that is down costs a
request nothing; one that hangs costs one request per interval the timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, Final

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from bastion.observability.metrics import RATELIMIT_STORE_ERRORS
from bastion.ratelimit._store import StoreUnavailable

__all__ = ["LuaScript", "ScriptError", "ScriptRunner", "StoreUnavailable"]

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover -- hiredis comes with bastion's redis extra
    _pack = None

# Error codes of a Redis that cannot decide now, whatever the script: the store
# is unavailable (the policy's failure rule applies), not the script wrong.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        "ASK",
        "BUSY",
        "CLUSTERDOWN",
        "LOADING",
        "MASTERDOWN",
        "MISCONF",
        "MOVED",
        "NOAUTH",
        "NOPERM",
        "NOREPLICAS",
        "OOM",
        "READONLY",
        "TRYAGAIN",
        "UNBLOCKED",
        "WRONGPASS",
    }
)


# Calls answered StoreUnavailable, by reason; children made once, off the hot path.
_ERRORS: Final = {
    reason: RATELIMIT_STORE_ERRORS.labels(reason=reason)
    for reason in ("timeout", "connection", "server", "fast")
}


class LuaScript:
    """A script from a ``.lua`` file of this package, with its SHA-1 for EVALSHA.

    Args:
        resource: the file name beside this module, such as ``decide.lua``.
    """

    __slots__ = ("name", "sha", "source")

    def __init__(self, resource: str) -> None:
        self.name = resource
        self.source = resources.files(__package__).joinpath(resource).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    @classmethod
    def from_source(cls, name: str, source: str) -> LuaScript:
        """Return a script from text rather than a resource file (tests, third-party code)."""
        script = cls.__new__(cls)
        script.name = name
        script.source = source
        script.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        return script

    def __repr__(self) -> str:
        return f"LuaScript({self.name!r})"


class ScriptError(StoreUnavailable):
    """Redis ran the script and it failed: a bug or a key of another type, not an outage.

    A kind of :class:`StoreUnavailable` all the same: the store could not decide, so
    the caller's failure policy applies rather than a 500 on every request.
    """


class _Call:
    """One command on its way: what to send, its deadline, and the future its reply resolves.

    A script reload is a call whose future is cancelled from the start: its reply
    is read and dropped (a failed load shows as a second NOSCRIPT of the call it
    was for).
    """

    __slots__ = ("command", "deadline", "expired", "future", "reloaded", "script", "seq")

    def __init__(
        self,
        future: asyncio.Future[Any],
        command: tuple[Any, ...],
        script: LuaScript | None,
        deadline: float,
    ) -> None:
        self.future = future
        self.command = command
        self.script = script
        self.deadline = deadline
        self.expired = False
        self.reloaded = False
        self.seq = 0


class _Channel:
    """One connection: the calls written to it, in order, and the task reading their replies."""

    __slots__ = (
        "conn",
        "inflight",
        "loads",
        "opened",
        "ready",
        "sending",
        "task",
        "transport",
        "written",
    )

    def __init__(self, conn: Any, opened: asyncio.Future[bool]) -> None:
        self.conn = conn
        self.inflight: collections.deque[_Call] = collections.deque()
        self.ready = False
        self.opened = opened  # True once connected, False if that failed
        self.sending = False  # a write waits for room in the socket's buffer
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        # Commands written so far, and for each script the count when its last
        # SCRIPT LOAD was written: a NOSCRIPT needs a new load only if none was
        # written after the call itself.
        self.written = 0
        self.loads: dict[str, int] = {}


def _unavailable(message: str, cause: BaseException) -> StoreUnavailable:
    """A new error per caller (each raise writes its own traceback), chained to ``cause``."""
    if isinstance(cause, StoreUnavailable):
        error = StoreUnavailable(str(cause))
        error.__cause__ = cause.__cause__
        return error
    error = StoreUnavailable(f"{message}: {type(cause).__name__}: {cause}")
    error.__cause__ = cause
    return error


def _fail(call: _Call, cause: BaseException, reason: str | None) -> None:
    """Fail ``call`` with StoreUnavailable (unless its caller left), counted under ``reason``."""
    if not call.future.done():
        call.future.set_exception(_unavailable("Redis connection failed", cause))
        if reason is not None:
            _ERRORS[reason].inc()


def _reply_reader(conn: Any) -> Callable[[], Awaitable[list[Any]]]:
    """Return a coroutine function giving the replies that have arrived (at least one).

    Error replies come as exception instances, not raised. With hiredis the
    replies are taken from redis-py's own hiredis reader and stream (set up by
    its handshake, with its decoding and error classes): one await per socket
    read, where ``read_response()`` costs four calls per reply, a fifth of a
    pipelined decision. Without hiredis, ``read_response()`` it is.
    """
    parser = getattr(conn, "_parser", None)
    reader: Any = getattr(parser, "_reader", None)
    stream = getattr(parser, "_stream", None)
    if (
        isinstance(stream, asyncio.StreamReader)
        and hasattr(reader, "gets")
        and hasattr(reader, "has_data")
        and not reader.has_data()
    ):
        gets, feed, read = reader.gets, reader.feed, stream.read
        # What gets() returns while a reply is incomplete (a sentinel of redis-py's,
        # False in older ones), asked of the reader itself while it holds nothing.
        pending = gets()

        async def arrived() -> list[Any]:
            replies: list[Any] = []
            while True:
                reply = gets()
                if reply is not pending:
                    replies.append(reply)
                elif replies:
                    return replies
                else:
                    data = await read(65536)
                    if not data:
                        raise ConnectionError("Redis closed the connection")
                    feed(data)

        return arrived

    async def one() -> list[Any]:
        try:
            return [await conn.read_response()]
        except ResponseError as error:  # an error reply, read in full
            return [error]

    return one


def _classify(error: Exception) -> Exception:
    """Return what a caller gets for an error reply."""
    code = getattr(error, "status_code", None) or str(error).partition(" ")[0]
    if code in _UNAVAILABLE_CODES or not isinstance(error, ResponseError):
        unavailable = StoreUnavailable(f"Redis cannot run scripts now ({code})")
        unavailable.__cause__ = error
        return unavailable
    script_error = ScriptError(str(error))
    script_error.__cause__ = error
    return script_error


class ScriptRunner:
    """Runs scripts on one Redis with a timeout, loading them on NOSCRIPT, pipelining callers.

    Concurrent calls are coalesced: while a connection has a batch in flight, new
    calls queue, and the queue goes out as one pipelined write when the batch is
    answered. A lone caller finds a connection idle and pays one EVALSHA.

    Args:
        client: a ``redis.asyncio.Redis``; the runner opens connections of its own
            with the client's settings (address, credentials, TLS, database), so it
            takes nothing from the client's pool. Not a cluster client.
        timeout: seconds a call may take, queueing and round trip included; past
            it :class:`StoreUnavailable`.
        connections: most connections with a batch in flight at once.
        retry_interval: seconds calls fail fast after a failure before one probes.
        max_retry_interval: the longest such interval while probes keep failing.
        connect_timeout: seconds opening a connection (TCP, TLS, AUTH) may take;
            default the larger of one second and ``timeout``. It runs in the
            background: callers still give up after ``timeout``.

    Example:
        >>> runner = ScriptRunner(redis.asyncio.Redis(), timeout=0.05)
        >>> await runner.run(LuaScript("decide.lua"), keys, args)
    """

    def __init__(
        self,
        client: Any,
        *,
        timeout: float,
        connections: int = 2,
        retry_interval: float = 0.1,
        max_retry_interval: float = 2.0,
        connect_timeout: float | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        # No retries, no health checks, no socket timeout of redis-py's: the
        # runner bounds every call itself, and a retry would break the one-try rule.
        self._connection_kwargs = {
            **pool.connection_kwargs,
            "socket_timeout": None,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
            "retry_on_error": [],
            "health_check_interval": 0,
        }
        self._timeout = timeout
        self._max_channels = connections
        self._base_interval = retry_interval
        self._max_interval = max(max_retry_interval, retry_interval)
        self._connect_timeout = connect_timeout if connect_timeout else max(1.0, timeout)
        self._channels: list[_Channel] = []
        self._queue: list[_Call] = []
        self._closed = False
        # Fail-fast state: 0.0 while Redis answers; else the loop time before
        # which calls fail at once (during a probe: the probe's deadline).
        self._open_until = 0.0
        self._interval = retry_interval
        self._probing = False
        # One timer for all deadlines: calls are queued and written in the order they
        # were made, so the earliest deadline is always at the head of the queue or
        # of a connection's FIFO; a timer per call cost 10% of a pipelined decision.
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def timeout(self) -> float:
        """Seconds a call may take."""
        return self._timeout

    def run(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]
    ) -> Coroutine[Any, Any, Any]:
        """Run ``script`` with ``keys`` and ``args``; await it for what the script returns.

        A plain function returning the call's coroutine (one frame less per call
        than an ``async def`` awaiting it); await it as any coroutine.

        Raises:
            StoreUnavailable: Redis was unreachable, slower than the timeout, or
                cannot run scripts now (loading, busy, out of memory, read only).
            ScriptError: the script raised an error.
        """
        return self._call(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    async def execute(self, *command: Any) -> Any:
        """Send one plain command (``DEL``, ``PING``) the same way; return its reply.

        Raises:
            StoreUnavailable: as :meth:`run`.
            ScriptError: Redis answered the command with an error.
        """
        return await self._call(command, None)

    async def connect(self) -> None:
        """Open a connection now rather than on the first call (a warm-up at start-up).

        Waits up to ``connect_timeout``, so a slow first handshake (TLS, AUTH) is
        not paid by the first request within its much shorter ``timeout``.

        Raises:
            StoreUnavailable: no connection could be opened.
        """
        if self._closed:
            raise StoreUnavailable("the script runner is closed")
        if any(channel.ready for channel in self._channels):
            return
        loop = asyncio.get_running_loop()
        channel = self._channels[0] if self._channels else self._open_channel(loop)
        if not await asyncio.shield(channel.opened):
            raise StoreUnavailable("could not connect to Redis")

    async def close(self) -> None:
        """Stop sending; pending calls fail with :class:`StoreUnavailable`."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        closed = StoreUnavailable("the script runner is closed")
        self._fail_queue(closed, None)
        tasks = [channel.task for channel in self._channels if channel.task is not None]
        for channel in list(self._channels):
            self._drop(channel, closed, None)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the call path -----------------------------------------------------------------

    async def _call(self, command: tuple[Any, ...], script: LuaScript | None) -> Any:
        if self._closed:
            raise StoreUnavailable("the script runner is closed")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._open_until:
            if now < self._open_until:
                _ERRORS["fast"].inc()
                raise StoreUnavailable("Redis failed recently; not asked until the next probe")
            # The interval has passed: this call probes. Others fail fast until
            # it is answered, or until its own deadline (it may be cancelled).
            self._probing = True
            self._open_until = now + self._timeout
            for channel in list(self._channels):
                if channel.inflight and channel.inflight[0].expired:
                    # Still no answer to a call that timed out an interval ago: the
                    # connection is in doubt (a dead peer, a blackhole), the probe
                    # gets a new one.
                    stuck = StoreUnavailable("no answer on this Redis connection")
                    self._drop(channel, stuck, "timeout")
        call = _Call(loop.create_future(), command, script, now + self._timeout)
        if self._watchdog is None:
            self._watchdog = loop.call_at(call.deadline, self._watch)
        for channel in self._channels:
            if channel.ready and not channel.inflight:
                try:
                    await self._write(channel, [call])
                except BaseException:
                    # Cancelled while the write waited for room: nobody reads the outcome.
                    if not call.future.cancel() and not call.future.cancelled():
                        call.future.exception()  # retrieved: no "never retrieved" warning
                    raise
                break
        else:
            self._queue.append(call)
            if len(self._channels) < self._max_channels:
                self._open_channel(loop)
        return await call.future

    def _watch(self) -> None:
        """Fail the calls whose deadline has passed; wake again at the next deadline."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired: list[_Call] = []
        upcoming = math.inf
        for calls in (self._queue, *(channel.inflight for channel in self._channels)):
            for call in calls:
                if call.deadline > now:
                    upcoming = min(upcoming, call.deadline)
                elif not call.expired:
                    call.expired = True
                    expired.append(call)
        if expired:
            self._queue = [call for call in self._queue if not call.expired]
            timeout = StoreUnavailable(f"Redis did not answer within {self._timeout:g} s")
            for call in expired:
                _fail(call, timeout, "timeout")
            for channel in list(self._channels):
                if channel.sending and channel.inflight and channel.inflight[0].expired:
                    # Redis neither answers nor reads: a writer waits for room in
                    # the socket's buffer, and only closing the socket ends that.
                    self._drop(channel, timeout, "timeout")
            self._failed(timeout, "timeout")
        if upcoming < math.inf:
            self._watchdog = loop.call_at(upcoming, self._watch)

    # -- connections ---------------------------------------------------------------------

    def _open_channel(self, loop: asyncio.AbstractEventLoop) -> _Channel:
        channel = _Channel(self._connection_class(**self._connection_kwargs), loop.create_future())
        self._channels.append(channel)
        channel.task = loop.create_task(self._serve(channel), name="bastion ratelimit redis reader")
        return channel

    async def _serve(self, channel: _Channel) -> None:
        """Connect, send what queued meanwhile, then read replies until the connection ends."""
        conn = channel.conn
        try:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await conn.connect()
            except Exception as exc:  # noqa: BLE001 -- any failure to connect is an outage
                channel.opened.set_result(False)
                self._drop(channel, exc, "connection")
                self._failed(exc, "connection")
                return
            # redis-py keeps the transport in its stream writer: closing the stream
            # waits to flush what a stopped Redis never reads, only abort() ends it.
            channel.transport = getattr(getattr(conn, "_writer", None), "transport", None)
            channel.ready = True
            channel.opened.set_result(True)
            if self._queue:
                await self._write(channel, self._take_queue())
            await self._read(channel)
        finally:
            # However the connection ends (dropped, failed, cancelled), its socket closes.
            if not channel.opened.done():
                channel.opened.set_result(False)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _read(self, channel: _Channel) -> None:
        inflight = channel.inflight
        next_replies = _reply_reader(channel.conn)
        while True:
            try:
                replies = await next_replies()
            except asyncio.CancelledError:
                return  # dropped by the runner
            except Exception as exc:  # noqa: BLE001 -- any failure to read leaves the connection in doubt
                self._drop(channel, exc, "connection")
                self._failed(exc, "connection")
                return
            for reply in replies:
                if not inflight:
                    # A reply nobody asked for: the stream is out of step.
                    unexpected = StoreUnavailable("Redis sent a reply nobody asked for")
                    self._drop(channel, unexpected, "connection")
                    self._failed(unexpected, "connection")
                    return
                call = inflight.popleft()
                if isinstance(reply, Exception):
                    await self._refused(channel, call, reply)
                    if not channel.ready:
                        return  # dropped: the reply tripped the fail-fast
                else:
                    if not call.future.done():
                        call.future.set_result(reply)
                    if self._open_until:
                        self._answered()
            if not inflight and self._queue:
                await self._write(channel, self._take_queue())

    async def _refused(self, channel: _Channel, call: _Call, error: Exception) -> None:
        """Deliver an error reply, or answer a NOSCRIPT by loading the script and resending.

        Error replies redis-py classes as connection errors (LOADING, a failed
        AUTH) were still read in full: the connection stays in step.
        """
        if isinstance(error, NoScriptError) and call.script is not None and not call.reloaded:
            # Redis restarted or its scripts were flushed. NOSCRIPT means the script
            # did not run, so sending it again cannot apply it twice.
            call.reloaded = True
            if not call.future.done():
                await self._reload(channel, call)
            return
        outcome = _classify(error)
        # A script error is Redis answering: no outage, no fail-fast.
        if not isinstance(outcome, ScriptError):
            _fail(call, outcome, "server")
            self._failed(outcome, "server")
            return
        if not call.future.done():
            call.future.set_exception(outcome)
        self._answered()

    async def _write(self, channel: _Channel, calls: list[_Call]) -> None:
        """Write ``calls`` as one pipelined batch; on failure drop the connection."""
        # Into the FIFO before the bytes go out, and no await in between: the
        # FIFO's order is the order of the replies.
        for call in calls:
            call.seq = channel.written
            channel.written += 1
        channel.inflight.extend(calls)
        await self._send(channel, [call.command for call in calls])

    async def _reload(self, channel: _Channel, call: _Call) -> None:
        """Load ``call``'s script (unless a load was already written after it) and resend it."""
        assert call.script is not None  # noqa: S101 -- only script calls are reloaded
        sha = call.script.sha
        commands: list[tuple[Any, ...]] = []
        if channel.loads.get(sha, -1) < call.seq:
            load = _Call(
                asyncio.get_running_loop().create_future(),
                ("SCRIPT", "LOAD", call.script.source),
                None,
                call.deadline,
            )
            load.future.cancel()  # nobody waits for it: its reply is dropped
            load.seq = channel.loads[sha] = channel.written
            channel.written += 1
            channel.inflight.append(load)
            commands.append(load.command)
        call.seq = channel.written
        channel.written += 1
        channel.inflight.append(call)
        commands.append(call.command)
        await self._send(channel, commands)

    async def _send(self, channel: _Channel, commands: list[tuple[Any, ...]]) -> None:
        conn = channel.conn
        if not conn.is_connected:
            # Closed under us (its reader has not run yet): redis-py would reconnect
            # inline, with no bound on the handshake. The connection is over.
            closed = StoreUnavailable("the Redis connection closed")
            self._drop(channel, closed, "connection")
            self._failed(closed, "connection")
            return
        # hiredis packs a command in C; redis-py's packer encodes argument by
        # argument in Python first, which cost a fifth of a pipelined decision.
        if _pack is not None:
            packed = [b"".join(map(_pack, commands))]
        else:  # pragma: no cover -- hiredis comes with bastion's redis extra
            packed = conn.pack_commands(commands)
        channel.sending = True
        try:
            # Without a socket timeout this writes at once and awaits only when
            # the socket's buffer is full; if Redis stops reading, the watchdog
            # drops the connection at the first deadline, which ends the wait.
            await conn.send_packed_command(packed, check_health=False)
        except Exception as exc:  # noqa: BLE001 -- any failure to write leaves the connection in doubt
            self._drop(channel, exc, "connection")
            self._failed(exc, "connection")
        finally:
            channel.sending = False

    def _take_queue(self) -> list[_Call]:
        queue, self._queue = self._queue, []
        return [call for call in queue if not call.future.done()]

    def _drop(self, channel: _Channel, cause: BaseException, reason: str | None) -> None:
        """Forget a connection: fail the calls in flight on it and stop its reader."""
        if channel in self._channels:
            self._channels.remove(channel)
        channel.ready = False
        for call in channel.inflight:
            _fail(call, cause, reason)
        channel.inflight.clear()
        if channel.transport is not None:
            channel.transport.abort()  # a writer waiting for room is released at once
        task = channel.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()  # its reader ends, and redis-py forgets the connection
        if not self._channels:
            # Nothing left to send the queue: its calls would only wait out their deadlines.
            self._fail_queue(cause, reason)

    def _fail_queue(self, cause: BaseException, reason: str | None) -> None:
        queue, self._queue = self._queue, []
        for call in queue:
            _fail(call, cause, reason)

    # -- fail fast -----------------------------------------------------------------------

    def _answered(self) -> None:
        """Redis answered: calls go through again."""
        self._open_until = 0.0
        self._probing = False
        self._interval = self._base_interval

    def _failed(self, cause: BaseException, reason: str) -> None:
        """Redis failed: fail fast for a while.

        After a connection error the connections with calls in flight are in
        doubt and dropped. After a timeout they are kept: a late answer shows that
        Redis was only slow, and closes the gap at once (a stall costs its own
        length, not a whole interval); the probe drops them if they stay silent.
        """
        if self._open_until and not self._probing:
            return  # already failing fast: a straggler of the same outage
        self._interval = (
            min(self._interval * 2, self._max_interval) if self._probing else self._base_interval
        )
        self._probing = False
        self._open_until = asyncio.get_running_loop().time() + self._interval
        self._fail_queue(cause, reason)
        if reason == "connection":
            for channel in list(self._channels):
                if channel.inflight:
                    self._drop(channel, cause, reason)
