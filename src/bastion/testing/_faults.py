"""Fault injection for tests: a TCP proxy that adds latency, throttles, hangs, resets and refuses.

Modelled on Shopify's toxiproxy (its "toxics"), in user space and in Python, so
it runs wherever the tests run: toxiproxy and ``tc netem`` are not available on
the machines bastion targets, and a proxy that ships with the library needs no
daemon, no privileges and no network namespace. Put it between the service and
one dependency (PostgreSQL, Redis, an HTTP API) and break that dependency at
run time, from any thread:

    ┌────────┐      ┌────────────────────────────┐      ┌──────────┐
    │ client │ ───▶ │ FaultProxy 127.0.0.1:PORT  │ ───▶ │ upstream │
    └────────┘      │  upstream toxics  ────▶    │      └──────────┘
                    │  ◀────  downstream toxics  │
                    └────────────────────────────┘
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import socket
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyStats"]

_T = TypeVar("_T")
# SO_LINGER on with a zero timeout: close() sends an RST instead of a FIN.
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


Direction = Literal["upstream", "downstream", "both"]
_Side = Literal["upstream", "downstream"]
_SIDES: Final[tuple[_Side, _Side]] = ("upstream", "downstream")

# Chunks read ahead of the writer per direction: enough to keep a pipe full under
# added latency, bounded so a slow or hung peer costs at most ~2 MiB per direction.
_QUEUE_CHUNKS: Final = 32
_READ_SIZE: Final = 64 * 1024
# Like toxiproxy's bandwidth toxic, a throttled chunk is sent in slices of 100 ms
# worth of bytes, so a slow pipe trickles instead of stalling then bursting.
_SLICE_SECONDS: Final = 0.1
_DEFAULT_PORTS: Final = {
    "http": 80,
    "https": 443,
    "ws": 80,
    "wss": 443,
    "redis": 6379,
    "rediss": 6379,
    "postgresql": 5432,
    "postgres": 5432,
    "nats": 4222,
    "amqp": 5672,
    "amqps": 5671,
    "mysql": 3306,
}


class ServedInBackground(ABC):
    """A server on its own thread: ``with`` and ``async with`` start and stop it.

    ``async with`` starts and stops it from a worker thread, so the caller's
    event loop keeps running while the server's loop comes up or winds down.
    """

    @abstractmethod
    def start(self) -> Self:
        """Start serving; return ``self``."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """What went through a :class:`FaultProxy` since it was made.

    Attributes:
        connections_accepted: client connections accepted.
        connections_open: client connections open now.
        connections_reset: connections the proxy closed with a reset (``reset_peer``,
            ``disconnect_all``, ``outage``, or an upstream that refused).
        bytes_up: bytes forwarded from clients to the upstream.
        bytes_down: bytes forwarded from the upstream to clients.
    """

    connections_accepted: int
    connections_open: int
    connections_reset: int
    bytes_up: int
    bytes_down: int


@dataclass(slots=True)
class _Toxic:
    id: str
    kind: Literal["latency", "bandwidth", "hang", "reset_peer"]
    sides: tuple[_Side, ...]
    latency: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class _Flow:
    """The toxics in force on one direction, folded into what the forwarder needs."""

    latency: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0  # bytes per second; 0 is unlimited
    hang: bool = False


_CLEAN: Final = _Flow()


@dataclass(eq=False, slots=True)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: tuple[asyncio.Task[None], ...] = ()
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    closed: bool = False


class FaultProxy(ServedInBackground):
    """A TCP proxy whose faults ("toxics", as in toxiproxy) are switched at run time.

    It listens on 127.0.0.1 (a free port by default) and forwards every
    connection to ``upstream``, on a thread and event loop of its own, so sync
    tests, async tests and server subprocesses can all go through it. Every
    control method can be called from any thread and returns once the change is
    in force: a test that calls :meth:`outage` and then connects is refused.

    Toxics apply to the connections already open and to new ones; each returns
    an id for :meth:`remove`, and :meth:`clear` removes them all. Directions
    follow toxiproxy: ``"downstream"`` is upstream to client (the responses),
    ``"upstream"`` is client to upstream (the requests), ``"both"`` is both.

    Example:
        >>> with FaultProxy(("127.0.0.1", 5432)) as proxy:
        ...     engine = create_async_engine(proxy.url_for(postgres_url))
        ...     slow = proxy.latency(200)  # every answer 200 ms late
        ...     proxy.remove(slow)
        ...     proxy.hang()               # connections open, nothing answers
        ...     proxy.outage()             # refused, and open connections reset
        ...     proxy.restore()            # a clean pipe again, same port

    Args:
        upstream: where to forward: ``(host, port)``, ``"host:port"``, or a URL
            whose host and port (or its scheme's default port) are used.
        listen: the address to listen on; port 0 picks a free port, kept across
            :meth:`refuse` / :meth:`restore`.
        name: a name for the thread and for messages.
    """

    def __init__(
        self,
        upstream: tuple[str, int] | str,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        name: str = "proxy",
    ) -> None:
        self.upstream = _parse_upstream(upstream)
        self.name = name
        self.host, self.port = listen
        self._loop = BackgroundLoop(f"fault-proxy:{name}")
        self._listener = TcpListener(self._handle)
        self._toxics: dict[str, _Toxic] = {}
        self._flows: dict[_Side, _Flow] = dict.fromkeys(_SIDES, _CLEAN)
        self._changed: asyncio.Future[None] | None = None
        self._links: set[_Link] = set()
        self._ids = itertools.count(1)
        self._accepted = self._reset = self._bytes_up = self._bytes_down = 0

    def __repr__(self) -> str:
        toxics = ", ".join(self._toxics) or "clean"
        upstream = f"{self.upstream[0]}:{self.upstream[1]}"
        return f"<FaultProxy {self.name} {self.host}:{self.port} -> {upstream} ({toxics})>"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start listening and forwarding.

        Returns:
            The proxy itself, so ``proxy = FaultProxy(...).start()`` reads well.

        Raises:
            RuntimeError: it is already running.
            OSError: the listening address cannot be bound.
        """
        self._loop.start()
        try:
            self._loop.run(self._start())
        except BaseException:
            self._loop.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop listening and reset every connection, hung ones included.

        Toxics are kept (a later :meth:`start` has them). Does nothing when the
        proxy is not running.
        """
        if not self._loop.running:
            return
        self._loop.run(self._stop())
        self._loop.stop()

    @property
    def address(self) -> str:
        """``host:port`` of the proxy, such as ``127.0.0.1:40123``.

        Raises:
            RuntimeError: the port is not known yet (free port, never started).
        """
        if self.port == 0:
            raise RuntimeError(f"FaultProxy {self.name} has no port yet: call start() first")
        return f"{self.host}:{self.port}"

    def url_for(self, url: str) -> str:
        """Rewrite a service URL so that it goes through the proxy.

        The user, password, path and query are kept; the host and port become the
        proxy's. ``postgresql+asyncpg://app@db:5432/app`` becomes
        ``postgresql+asyncpg://app@127.0.0.1:PORT/app``.

        Args:
            url: a URL pointing at the upstream (its explicit port or its scheme's
                default port must be the upstream's port).

        Raises:
            ValueError: the URL has no host, or points at another port.
            RuntimeError: the proxy's port is not known yet.
        """
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"not a URL with a host: {url!r}")
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.partition("+")[0].lower())
        if port != self.upstream[1]:
            raise ValueError(
                f"{url!r} points at port {port}, but proxy {self.name} forwards to "
                f"{self.upstream[0]}:{self.upstream[1]}"
            )
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{self.address}"))

    # -- toxics --------------------------------------------------------------------

    def latency(
        self, ms: float, *, jitter_ms: float = 0.0, direction: Direction = "downstream"
    ) -> str:
        """Delay data by ``ms`` milliseconds (± ``jitter_ms``), without reordering it.

        Each chunk is held until its arrival time plus the delay, so a stream keeps
        its throughput and its order, and one connection's delay never holds up
        another's. Several latency toxics add up; on ``"both"`` a round trip pays twice.

        Args:
            ms: the added delay in milliseconds.
            jitter_ms: a uniformly random extra in ``[-jitter_ms, +jitter_ms]`` per chunk.
            direction: ``"downstream"`` (default), ``"upstream"`` or ``"both"``.

        Returns:
            The toxic's id, for :meth:`remove`.

        Raises:
            ValueError: a negative or non-finite delay, or an unknown direction.
        """
        _check_non_negative("ms", ms)
        _check_non_negative("jitter_ms", jitter_ms)
        return self._add("latency", direction, latency=ms / 1000, jitter=jitter_ms / 1000)

    def bandwidth(self, kbytes_per_second: float, *, direction: Direction = "downstream") -> str:
        """Limit throughput to ``kbytes_per_second`` (1 KB = 1000 bytes, as in toxiproxy).

        A token bucket paces the bytes in slices of 100 ms worth; the slowest of
        several bandwidth toxics wins.

        Args:
            kbytes_per_second: the rate, above 0.
            direction: ``"downstream"`` (default), ``"upstream"`` or ``"both"``.

        Returns:
            The toxic's id, for :meth:`remove`.

        Raises:
            ValueError: a rate that is not above 0, or an unknown direction.
        """
        if not kbytes_per_second > 0 or not math.isfinite(kbytes_per_second):
            raise ValueError(f"kbytes_per_second must be above 0, not {kbytes_per_second!r}")
        return self._add("bandwidth", direction, rate=kbytes_per_second * 1000)

    def hang(self, *, direction: Direction = "both") -> str:
        """Swallow data: connections open and stay open, but nothing gets through.

        toxiproxy's ``timeout`` toxic with ``timeout=0``. Data is dropped, not
        buffered, so a hung connection costs no memory; a peer's close is held too.
        Once removed, new data flows again (what was swallowed is lost, so the
        protocol on connections that were hung is usually broken: reconnect).

        Args:
            direction: ``"both"`` (default), ``"upstream"`` or ``"downstream"``.

        Returns:
            The toxic's id, for :meth:`remove`.
        """
        return self._add("hang", direction)

    def reset_peer(self, *, after_ms: float = 0.0) -> str:
        """Reset connections (TCP RST, not FIN) ``after_ms`` after this call or after they open.

        While the toxic is in force, each open connection and each new one is
        reset ``after_ms`` milliseconds later (at once for 0): the client sees
        ``ConnectionResetError``, the upstream sees its connection reset too.

        Args:
            after_ms: the delay in milliseconds.

        Returns:
            The toxic's id, for :meth:`remove` (which spares connections not yet reset).

        Raises:
            ValueError: a negative or non-finite delay.
        """
        _check_non_negative("after_ms", after_ms)
        return self._add("reset_peer", "both", after=after_ms / 1000)

    def remove(self, toxic_id: str) -> None:
        """Remove one toxic; the connections it affected carry on without it.

        Raises:
            KeyError: no toxic has this id (it was removed already, or cleared).
        """
        if toxic_id not in self._toxics:
            raise KeyError(f"proxy {self.name} has no toxic {toxic_id!r}")
        self._control(lambda: self._remove(toxic_id))

    def clear(self) -> None:
        """Remove every toxic: a clean pipe again (listening state unchanged)."""
        self._control(self._clear)

    @property
    def toxics(self) -> dict[str, str]:
        """The toxics in force: id to kind."""
        return {toxic_id: toxic.kind for toxic_id, toxic in dict(self._toxics).items()}

    # -- connections ---------------------------------------------------------------

    def refuse(self) -> None:
        """Stop listening: new connections are refused (ECONNREFUSED); open ones carry on.

        Raises:
            RuntimeError: the proxy is not running.
        """
        self._control(self._listener.close, needs_loop=True)

    def disconnect_all(self) -> None:
        """Reset (TCP RST) every open connection; new ones are still accepted.

        Raises:
            RuntimeError: the proxy is not running.
        """
        self._control(self._disconnect_all, needs_loop=True)

    def outage(self) -> None:
        """A full outage: refuse new connections and reset the open ones.

        Raises:
            RuntimeError: the proxy is not running.
        """

        def apply() -> None:
            self._listener.close()
            self._disconnect_all()

        self._control(apply, needs_loop=True)

    def restore(self) -> None:
        """End an outage: listen again on the same port and remove every toxic.

        Raises:
            RuntimeError: the proxy is not running.
            OSError: the port was taken meanwhile.
        """

        def apply() -> None:
            self._clear()
            if not self._listener.is_open:
                self._listen()

        self._control(apply, needs_loop=True)

    @property
    def connection_count(self) -> int:
        """Client connections open now."""
        return len(self._links)

    @property
    def stats(self) -> ProxyStats:
        """Counters of what went through the proxy, for assertions."""
        return ProxyStats(
            connections_accepted=self._accepted,
            connections_open=len(self._links),
            connections_reset=self._reset,
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
        )

    # -- on the proxy's loop ---------------------------------------------------------

    def _add(self, kind: Any, direction: Direction, **settings: float) -> str:
        if direction not in get_args(Direction):
            raise ValueError(f"direction must be one of {get_args(Direction)}, not {direction!r}")
        sides = _SIDES if direction == "both" else (direction,)
        toxic = _Toxic(f"{kind}-{next(self._ids)}", kind, sides, **settings)

        def apply() -> None:
            self._toxics[toxic.id] = toxic
            self._changed_toxics()
            if toxic.kind == "reset_peer":
                for link in list(self._links):
                    self._arm_reset(link, toxic)

        self._control(apply)
        return toxic.id

    def _control(self, change: Callable[[], None], *, needs_loop: bool = False) -> None:
        """Apply a change on the proxy's loop and wait until it is in force.

        Raises:
            RuntimeError: ``needs_loop`` and the proxy is not running.
        """
        if not self._loop.running and not needs_loop:
            # Nothing is connected: a toxic is simply state for start().
            change()
            return

        async def apply() -> None:
            change()

        self._loop.run(self._settle(apply))

    @staticmethod
    async def _settle(change: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # Takes the function, not a coroutine: when the loop is not running, run()
        # refuses before anything is created that would then never be awaited.
        await change()
        # Aborted transports close their sockets on the loop's next turn; returning
        # after it makes "outage() then connect" deterministic for the caller.
        await asyncio.sleep(0)

    async def _start(self) -> None:
        self._changed = asyncio.get_running_loop().create_future()
        self._changed_toxics()
        self._listen()

    async def _stop(self) -> None:
        self._changed = None
        self._listener.shutdown()
        for link in list(self._links):
            self._close_link(link, reset=True, counted=False)
        await asyncio.sleep(0)

    def _listen(self) -> None:
        self.port = self._listener.open(self.host, self.port)

    def _disconnect_all(self) -> None:
        # Accepted a moment ago but not yet served: open to the client all the same.
        self._reset += self._listener.reset_pending()
        for link in list(self._links):
            self._close_link(link, reset=True)

    def _remove(self, toxic_id: str) -> None:
        if self._toxics.pop(toxic_id, None) is None:
            return
        for link in self._links:
            timer = link.timers.pop(toxic_id, None)
            if timer is not None:
                timer.cancel()
        self._changed_toxics()

    def _clear(self) -> None:
        for toxic_id in list(self._toxics):
            self._remove(toxic_id)

    def _changed_toxics(self) -> None:
        """Fold the toxics into each direction's flow and wake the waiting forwarders."""
        for side in _SIDES:
            toxics = [t for t in self._toxics.values() if side in t.sides]
            rates = [t.rate for t in toxics if t.kind == "bandwidth"]
            flow = _Flow(
                latency=sum(t.latency for t in toxics),
                jitter=sum(t.jitter for t in toxics),
                rate=min(rates, default=0.0),
                hang=any(t.kind == "hang" for t in toxics),
            )
            # The forwarders test `is _CLEAN` per chunk: one identity check on a clean pipe.
            self._flows[side] = _CLEAN if flow == _CLEAN else flow
        if self._changed is not None:
            self._changed.set_result(None)
            self._changed = self._changed.get_loop().create_future()

    async def _wait_for_change(self, at_most: float | None) -> None:
        if self._changed is not None:
            await asyncio.wait((self._changed,), timeout=at_most)

    def _arm_reset(self, link: _Link, toxic: _Toxic) -> None:
        if toxic.after <= 0:
            self._close_link(link, reset=True)
            return
        loop = asyncio.get_running_loop()
        link.timers[toxic.id] = loop.call_later(
            toxic.after, lambda: self._close_link(link, reset=True)
        )

    def _close_link(self, link: _Link, *, reset: bool, counted: bool = True) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        if reset and counted:
            self._reset += 1
        for timer in link.timers.values():
            timer.cancel()
        for task in link.tasks:
            task.cancel()
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            if reset:
                _abort_with_rst(writer)
            else:
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        self._accepted += 1
        try:
            await self._forward_link(link, reader)
        finally:
            # Cancelled by stop(), or failed: no transport is left open either way.
            self._close_link(link, reset=True, counted=False)

    async def _forward_link(self, link: _Link, reader: asyncio.StreamReader) -> None:
        for toxic in list(self._toxics.values()):
            if toxic.kind == "reset_peer":
                self._arm_reset(link, toxic)
        if link.closed:
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            # A dead upstream looks like one to the client: its connection is reset.
            self._close_link(link, reset=True)
            return
        if link not in self._links:  # reset while connecting
            _abort_with_rst(upstream)
            return
        link.upstream = upstream
        link.tasks = (
            asyncio.create_task(self._pump(reader, upstream, "upstream")),
            asyncio.create_task(self._pump(upstream_reader, link.client, "downstream")),
        )
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_EXCEPTION)
        if link not in self._links:  # reset meanwhile
            return
        failed = any(
            task.done() and not task.cancelled() and task.exception() for task in link.tasks
        )
        # A reset on one side is passed on as a reset; two clean half-closes end cleanly.
        self._close_link(link, reset=failed)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, side: _Side
    ) -> None:
        """Forward one direction: a reader task fills a bounded queue, this drains it."""
        queue: asyncio.Queue[tuple[float, bytes | BaseException]] = asyncio.Queue(_QUEUE_CHUNKS)
        reading = asyncio.create_task(_read_into(source, queue))
        try:
            await self._drain_queue(queue, sink, side)
        finally:
            reading.cancel()

    async def _drain_queue(
        self,
        queue: asyncio.Queue[tuple[float, bytes | BaseException]],
        sink: asyncio.StreamWriter,
        side: _Side,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_slot = 0.0  # the bandwidth bucket: when the next slice may leave
        while True:
            arrived, item = await queue.get()
            if not await self._hold(arrived, item, side, loop):
                continue  # swallowed by a hang
            if isinstance(item, BaseException):
                raise item
            if not item:
                if sink.can_write_eof():
                    sink.write_eof()
                return
            next_slot = await self._send(item, sink, side, next_slot, loop)

    async def _hold(
        self,
        arrived: float,
        item: bytes | BaseException,
        side: _Side,
        loop: asyncio.AbstractEventLoop,
    ) -> bool:
        """Wait until ``item`` may leave (latency, hang); False when a hang swallows it."""
        draw: float | None = None
        while True:
            flow = self._flows[side]
            if flow.hang:
                if isinstance(item, bytes) and item:
                    return False
                # A close or a reset is held, as a black hole would hold it.
                await self._wait_for_change(None)
                continue
            if flow is _CLEAN:
                return True
            if draw is None:
                # One draw per chunk: a toxic changing mid-wait moves the deadline,
                # not the dice.
                draw = random.uniform(-1.0, 1.0)  # noqa: S311 -- jitter, not cryptography
            remaining = arrived + max(0.0, flow.latency + draw * flow.jitter) - loop.time()
            if remaining <= 0:
                return True
            await self._wait_for_change(remaining)

    async def _send(
        self,
        data: bytes,
        sink: asyncio.StreamWriter,
        side: _Side,
        next_slot: float,
        loop: asyncio.AbstractEventLoop,
    ) -> float:
        view = memoryview(data)
        while view:
            rate = self._flows[side].rate
            if rate <= 0:
                piece, view = view, view[len(view) :]
                next_slot = 0.0
            else:
                size = max(1, int(rate * _SLICE_SECONDS))
                piece, view = view[:size], view[size:]
                now = loop.time()
                start = max(now, next_slot)
                if start > now:
                    await self._wait_for_change(start - now)
                next_slot = start + len(piece) / rate
            sink.write(bytes(piece))
            await sink.drain()
            if side == "upstream":
                self._bytes_up += len(piece)
            else:
                self._bytes_down += len(piece)
        return next_slot


async def _read_into(
    source: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes | BaseException]]
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await source.read(_READ_SIZE)
        except OSError as exc:
            await queue.put((loop.time(), exc))
            return
        await queue.put((loop.time(), data))
        if not data:
            return


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST: SO_LINGER on with a zero timeout, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


def _parse_upstream(upstream: tuple[str, int] | str) -> tuple[str, int]:
    if isinstance(upstream, tuple):
        host, port = upstream
    elif "://" in upstream:
        parts = urlsplit(upstream)
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.partition("+")[0].lower(), 0)
    else:
        raw_host, _, raw_port = upstream.rpartition(":")
        host = raw_host.strip("[]")
        port = int(raw_port) if raw_port.isdigit() else 0
    if not host or not 0 < port < 65536:  # noqa: PLR2004 -- the TCP port range
        raise ValueError(f"upstream must be (host, port), 'host:port' or a URL, not {upstream!r}")
    return host, port


class BackgroundLoop:
    """An asyncio event loop on a daemon thread of its own, driven from any other thread.

    The test servers (:class:`FaultProxy`, :class:`~bastion.testing.FakeLLMProvider`)
    run here, so a sync test, an async test whose own loop is busy in a blocking
    call, and another process all see a live server.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the loop's thread is running."""
        return self._thread is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop.

        Raises:
            RuntimeError: the loop is not running.
        """
        if self._loop is None:
            raise RuntimeError(f"{self.name} is not running: call start() first")
        return self._loop

    def start(self) -> None:
        """Start the loop on a new daemon thread.

        Raises:
            RuntimeError: it is already running.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name=self.name, daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        """Run ``coro`` on the loop and wait for its result.

        Args:
            coro: the coroutine to run.
            timeout: seconds to wait at most.

        Returns:
            What ``coro`` returned.

        Raises:
            RuntimeError: the loop is not running, or this is the loop's own thread
                (waiting there would deadlock).
            TimeoutError: ``coro`` did not finish in time (it is cancelled).
        """
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running: call start() first")
        if threading.current_thread() is thread:
            coro.close()
            raise RuntimeError(f"{self.name}: a control method was called from its own loop")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, cancel what still runs on it, and join its thread.

        Does nothing when the loop is not running.

        Raises:
            RuntimeError: called from the loop's own thread.
        """
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError(f"{self.name}: stop() was called from its own loop")
        self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)


class TcpListener:
    """A listening socket whose accepts run in a reader callback, for the test servers.

    Not ``asyncio.Server``: closing one while an accepted connection is still
    being wrapped fails an assertion in Python 3.11 and leaks the socket (a
    client connecting during ``refuse()`` hits it), and from 3.12 its
    ``wait_closed()`` waits for every open connection, which a hung one never
    ends. Nor an accept task: cancelling it can drop a connection the kernel
    already handed over. Accepting in a reader callback makes :meth:`close`
    synchronous: once it returns, every accepted socket has an owner.
    """

    def __init__(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
        *,
        limit: int = 64 * 1024,
    ) -> None:
        self._handler = handler
        self._limit = limit
        self._sock: socket.socket | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # Accepted but not yet handed to a transport: only these are ours to close.
        self._unwrapped: set[socket.socket] = set()

    @property
    def is_open(self) -> bool:
        """Whether it is listening."""
        return self._sock is not None

    def open(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for a free port) and return the port; on the loop.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            # The port comes back after close() although connections accepted on it
            # are still open or in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, loop, sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        bound: int = sock.getsockname()[1]
        return bound

    def close(self) -> None:
        """Stop listening: connecting is refused from now on; accepted connections stay."""
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def shutdown(self) -> None:
        """Stop listening and reset the connections accepted but not yet served.

        The handlers own the connections they serve and close them themselves.
        """
        self.close()
        self.reset_pending()

    def reset_pending(self) -> int:
        """Reset (TCP RST) the connections accepted but not yet handed to the handler.

        Returns:
            How many there were.
        """
        pending = list(self._unwrapped)
        self._unwrapped.clear()
        for conn in pending:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            conn.close()
        return len(pending)

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError:
                # Out of descriptors: pause instead of spinning on a readable socket.
                loop.remove_reader(sock.fileno())
                loop.call_later(0.1, self._resume, loop, sock)
                return
            conn.setblocking(False)
            self._unwrapped.add(conn)
            task = loop.create_task(self._serve(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _resume(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if self._sock is sock:
            loop.add_reader(sock.fileno(), self._accept, loop, sock)

    async def _serve(self, conn: socket.socket) -> None:
        if conn not in self._unwrapped:
            return  # shutdown() closed it before this task's first turn
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=self._limit)
        except BaseException:
            conn.close()
            raise
        finally:
            self._unwrapped.discard(conn)
        await self._handler(reader, writer)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Whatever still runs (a request the server was told to hang on, a pump
        # waiting on a hung peer) is cancelled here, so stop() never waits on it.
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
