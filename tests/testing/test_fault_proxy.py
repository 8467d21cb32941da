"""FaultProxy: a TCP proxy whose toxics (latency, bandwidth, hang, resets, outage) switch live.

Against real sockets: an echo server started here, then real PostgreSQL, Redis
and the fake LLM provider behind the proxy.
"""

import asyncio
import contextlib
import socket
import socketserver
import threading
import time

import httpx
import pytest

from bastion.testing import FakeLLMProvider, FaultProxy, ProxyStats


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture
def echo():
    """A threaded TCP echo server on a free port; yields its (host, port)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    # A short poll so shutdown() at teardown does not wait the default 0.5 s.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo):
    with FaultProxy(echo, name="echo") as running:
        yield running


@contextlib.contextmanager
def connect(proxy: FaultProxy, timeout: float = 5.0):
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


def round_trip(proxy: FaultProxy, payload: bytes = b"ping", timeout: float = 5.0) -> float:
    """Seconds for one echo of `payload` through a new connection."""
    with connect(proxy, timeout) as sock:
        started = time.perf_counter()
        assert payload == exchange(sock, payload)
        return time.perf_counter() - started


def open_and_read(proxy: FaultProxy) -> bytes:
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        return sock.recv(10)


def assert_new_connection_reset(proxy: FaultProxy) -> None:
    """A new connection is reset: at connect (an RST can beat connect()'s return) or first read."""
    with pytest.raises(ConnectionResetError):
        open_and_read(proxy)


def wait_until(condition, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class TestForwarding:
    def test_clean_pipe_forwards_both_ways_and_counts(self, proxy):
        """Without toxics bytes go through unchanged, and stats count them and the connection."""
        payload = bytes(range(256)) * 400
        with connect(proxy) as sock:
            assert payload == exchange(sock, payload)
        wait_until(lambda: proxy.connection_count == 0)
        assert (
            ProxyStats(
                connections_accepted=1,
                connections_open=0,
                connections_reset=0,
                bytes_up=len(payload),
                bytes_down=len(payload),
            )
            == proxy.stats
        )

    def test_connection_count_follows_open_connections(self, proxy):
        """connection_count counts open client connections and drops when they close."""
        with connect(proxy) as first, connect(proxy) as second:
            exchange(first, b"a")
            exchange(second, b"b")
            assert 2 == proxy.connection_count
        wait_until(lambda: proxy.connection_count == 0)

    def test_dead_upstream_resets_the_client(self):
        """When the upstream refuses, the client's connection is reset, as a dead server looks."""
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            closed_port = spare.getsockname()[1]
        with FaultProxy(("127.0.0.1", closed_port)) as dead:
            assert_new_connection_reset(dead)
            assert 1 == dead.stats.connections_reset

    async def test_async_context_manager_and_asyncio_clients(self, echo):
        """`async with` runs it without blocking the test's loop; asyncio streams go through."""
        async with FaultProxy(echo) as running:
            reader, writer = await asyncio.open_connection(running.host, running.port)
            writer.write(b"hello")
            assert b"hello" == await asyncio.wait_for(reader.readexactly(5), 3)
            writer.close()
            await writer.wait_closed()

    def test_toxics_set_before_start_apply_once_started(self, echo):
        """A toxic added before start() is in force from the first connection."""
        proxy = FaultProxy(echo)
        proxy.latency(150)
        with proxy:
            assert round_trip(proxy) >= 0.15


class TestAddresses:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            (
                "postgresql+asyncpg://app:secret@db.internal:5432/app?ssl=disable",
                "postgresql+asyncpg://app:secret@{address}/app?ssl=disable",
            ),
            ("redis://db.internal:5432/0", "redis://{address}/0"),
            ("http://db.internal:5432/v1/chat", "http://{address}/v1/chat"),
        ],
    )
    def test_url_for_keeps_everything_but_host_and_port(self, url, expected):
        """url_for points a service URL at the proxy, keeping credentials, path and query."""
        with FaultProxy(("db.internal", 5432)) as proxy:
            assert expected.format(address=proxy.address) == proxy.url_for(url)

    def test_url_for_uses_the_schemes_default_port(self):
        """A URL without a port matches an upstream on its scheme's default port."""
        with FaultProxy("redis://127.0.0.1/0") as proxy:
            assert f"redis://{proxy.address}/0" == proxy.url_for("redis://127.0.0.1/0")

    def test_url_for_refuses_a_url_for_another_port(self):
        """A URL for another port than the upstream's is a mistake, reported clearly."""
        with FaultProxy(("127.0.0.1", 6379)) as proxy, pytest.raises(ValueError, match="6380"):
            proxy.url_for("redis://127.0.0.1:6380/0")

    @pytest.mark.parametrize(
        ("upstream", "expected"),
        [
            (("127.0.0.1", 5432), ("127.0.0.1", 5432)),
            ("127.0.0.1:6379", ("127.0.0.1", 6379)),
            ("[::1]:6379", ("::1", 6379)),
            ("postgresql+asyncpg://u@db:5433/x", ("db", 5433)),
            ("http://llm.local", ("llm.local", 80)),
        ],
    )
    def test_upstream_forms(self, upstream, expected):
        """The upstream is a (host, port), a 'host:port', or a URL (default port by scheme)."""
        assert expected == FaultProxy(upstream).upstream

    @pytest.mark.parametrize("upstream", ["localhost", "db:http", "ftp://files", ("h", 0)])
    def test_bad_upstream_is_rejected(self, upstream):
        """An upstream without a usable port raises ValueError."""
        with pytest.raises(ValueError, match="upstream"):
            FaultProxy(upstream)

    def test_address_before_start_is_a_clear_error(self):
        """address before start() (free port) raises, naming start()."""
        with pytest.raises(RuntimeError, match="start"):
            _ = FaultProxy(("127.0.0.1", 1)).address


class TestLatency:
    def test_latency_delays_the_answer_and_removal_restores(self, proxy):
        """latency(200) makes a round trip take >= 200 ms; remove() makes it fast again."""
        toxic = proxy.latency(200)
        assert round_trip(proxy) >= 0.2
        proxy.remove(toxic)
        assert round_trip(proxy) < 0.15

    def test_latency_applies_to_open_connections(self, proxy):
        """A toxic added while a connection is open applies to its next bytes."""
        with connect(proxy) as sock:
            exchange(sock, b"warm")
            proxy.latency(200)
            started = time.perf_counter()
            exchange(sock, b"late")
            assert time.perf_counter() - started >= 0.2

    def test_both_directions_add_up(self, proxy):
        """latency on "both" delays requests and answers: a round trip pays it twice."""
        proxy.latency(120, direction="both")
        assert round_trip(proxy) >= 0.24

    def test_upstream_direction_delays_requests(self, proxy):
        """latency on "upstream" alone delays the client's bytes on their way in."""
        proxy.latency(150, direction="upstream")
        assert round_trip(proxy) >= 0.15

    def test_latency_keeps_order_and_pipelines(self, proxy):
        """With jitter chunks keep their order; 10 chunks sent together take ~one delay, not ten."""
        proxy.latency(200, jitter_ms=50)
        chunks = [f"chunk-{i:02d};".encode() for i in range(10)]
        with connect(proxy) as sock:
            started = time.perf_counter()
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(0.005)
            received = b""
            while len(received) < sum(map(len, chunks)):
                received += sock.recv(65536)
            elapsed = time.perf_counter() - started
        assert b"".join(chunks) == received
        assert 0.15 <= elapsed < 1.0

    def test_latency_does_not_serialise_connections(self, proxy):
        """Eight connections under 300 ms latency finish in about 300 ms together."""
        proxy.latency(300)
        times: list[float] = []
        threads = [
            threading.Thread(target=lambda: times.append(round_trip(proxy))) for _ in range(8)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 8 == len(times)
        assert time.perf_counter() - started < 1.5

    def test_clear_ends_a_long_wait_at_once(self, proxy):
        """Data held by a 10 s latency is released as soon as clear() removes the toxic."""
        proxy.latency(10_000)
        with connect(proxy) as sock:
            sock.sendall(b"held")
            time.sleep(0.1)
            started = time.perf_counter()
            proxy.clear()
            assert b"held" == sock.recv(10)
            assert time.perf_counter() - started < 1.0


class TestBandwidth:
    def test_bandwidth_limits_the_rate(self, proxy):
        """100 KB/s downstream: 60 KB take about 0.5 s (100 ms slices); removal makes it fast."""
        payload = b"x" * 60_000
        toxic = proxy.bandwidth(100)
        elapsed = round_trip(proxy, payload)
        assert 0.4 <= elapsed < 3.0
        proxy.remove(toxic)
        assert round_trip(proxy, payload) < 0.3

    def test_upstream_bandwidth_limits_the_client(self, proxy):
        """A limit on "upstream" throttles what the client sends."""
        proxy.bandwidth(50, direction="upstream")
        assert round_trip(proxy, b"y" * 20_000) >= 0.25


class TestHang:
    def test_hang_keeps_connections_open_and_answers_nothing(self, proxy):
        """hang(): connecting works, nothing comes back, the connection stays open."""
        proxy.hang()
        with connect(proxy, timeout=0.3) as sock:
            sock.sendall(b"anyone?")
            with pytest.raises(TimeoutError):
                sock.recv(10)
            assert 1 == proxy.connection_count

    def test_hang_swallows_instead_of_buffering(self, proxy):
        """A hung proxy reads and drops what it gets: 32 MB go in, nothing reaches the upstream.

        32 MB is more than the kernel's socket buffers and the proxy's queue hold,
        so a proxy that held the data instead would block this sendall.
        """
        proxy.hang()
        with connect(proxy, timeout=3) as sock:
            sock.sendall(b"z" * 32_000_000)
        assert 0 == proxy.stats.bytes_up

    def test_after_removal_new_connections_work(self, proxy):
        """Removing hang gives a clean pipe to new connections."""
        toxic = proxy.hang()
        with connect(proxy, timeout=0.2) as sock:
            sock.sendall(b"lost")
            with pytest.raises(TimeoutError):
                sock.recv(10)
        proxy.remove(toxic)
        assert round_trip(proxy) < 0.5

    def test_downstream_hang_lets_requests_through(self, proxy):
        """hang on "downstream" delivers the client's bytes but swallows every answer."""
        proxy.hang(direction="downstream")
        with connect(proxy, timeout=0.3) as sock:
            sock.sendall(b"request")
            with pytest.raises(TimeoutError):
                sock.recv(10)
        assert (len(b"request"), 0) == (proxy.stats.bytes_up, proxy.stats.bytes_down)

    def test_stop_returns_quickly_with_hung_connections(self, echo):
        """stop() with hung connections returns at once and resets them."""
        proxy = FaultProxy(echo).start()
        proxy.hang()
        sockets = [socket.create_connection((proxy.host, proxy.port), timeout=3) for _ in range(5)]
        try:
            for sock in sockets:
                sock.sendall(b"x")
            wait_until(lambda: proxy.connection_count == 5)
            started = time.perf_counter()
            proxy.stop()
            assert time.perf_counter() - started < 1.0
            with pytest.raises(ConnectionResetError):
                sockets[0].recv(10)
        finally:
            for sock in sockets:
                sock.close()


class TestResetPeer:
    def test_reset_peer_resets_open_and_new_connections(self, proxy):
        """reset_peer(): open connections get an RST at once, and so does each new one."""
        with connect(proxy) as sock:
            exchange(sock, b"fine")
            toxic = proxy.reset_peer()
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
        assert_new_connection_reset(proxy)
        proxy.remove(toxic)
        assert round_trip(proxy) < 0.5
        assert 2 == proxy.stats.connections_reset

    def test_reset_after_a_delay(self, proxy):
        """reset_peer(after_ms=300): the connection works, then is reset ~300 ms later."""
        proxy.reset_peer(after_ms=300)
        with connect(proxy) as sock:
            started = time.perf_counter()
            assert b"early" == exchange(sock, b"early")
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
            assert time.perf_counter() - started >= 0.25

    def test_removing_spares_connections_not_yet_reset(self, proxy):
        """A delayed reset removed before it fires never happens."""
        toxic = proxy.reset_peer(after_ms=200)
        with connect(proxy) as sock:
            exchange(sock, b"a")
            proxy.remove(toxic)
            time.sleep(0.3)
            assert b"still here" == exchange(sock, b"still here")


class TestOutage:
    def test_refuse_refuses_new_and_keeps_open_connections(self, proxy):
        """refuse(): connecting gets ECONNREFUSED; a connection already open keeps working."""
        with connect(proxy) as sock:
            exchange(sock, b"a")
            proxy.refuse()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((proxy.host, proxy.port), timeout=1)
            assert b"still" == exchange(sock, b"still")

    def test_disconnect_all_resets_open_connections_only(self, proxy):
        """disconnect_all() resets what is open; a new connection is accepted."""
        with connect(proxy) as sock:
            exchange(sock, b"a")
            proxy.disconnect_all()
            assert 0 == proxy.connection_count
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
        assert round_trip(proxy) < 0.5

    def test_outage_then_restore_on_the_same_port(self, proxy):
        """outage() refuses and resets; restore() listens again on the same port with no toxics."""
        port = proxy.port
        proxy.latency(500)
        with connect(proxy) as sock:
            proxy.outage()
            with pytest.raises(ConnectionResetError):
                exchange(sock, b"a")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=1)
        proxy.restore()
        assert port == proxy.port
        assert {} == proxy.toxics
        assert round_trip(proxy) < 0.4

    def test_restore_while_connections_accepted_on_the_port_live(self, proxy):
        """The port is bound again although connections accepted on it are still open."""
        with connect(proxy) as sock:
            exchange(sock, b"a")
            proxy.refuse()
            proxy.restore()
            assert b"b" == exchange(sock, b"b")
            assert round_trip(proxy) < 0.4

    def test_connection_control_needs_a_running_proxy(self, echo):
        """refuse/outage/restore/disconnect_all before start() raise, naming start()."""
        proxy = FaultProxy(echo)
        for control in (proxy.refuse, proxy.outage, proxy.restore, proxy.disconnect_all):
            with pytest.raises(RuntimeError, match="start"):
                control()


class TestControl:
    def test_control_from_many_threads(self, proxy):
        """Toxics added and removed from eight threads at once leave a consistent, clean proxy."""

        def churn() -> None:
            for _ in range(25):
                proxy.remove(proxy.latency(1))

        threads = [threading.Thread(target=churn) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {} == proxy.toxics
        assert round_trip(proxy) < 0.4

    def test_toxic_ids_and_listing(self, proxy):
        """Each toxic gets its own id; toxics lists them by kind; clear() empties it."""
        ids = [
            proxy.latency(1),
            proxy.bandwidth(1000),
            proxy.hang(),
            proxy.reset_peer(after_ms=1e6),
        ]
        assert 4 == len(set(ids))
        assert ["latency", "bandwidth", "hang", "reset_peer"] == [proxy.toxics[i] for i in ids]
        proxy.clear()
        assert {} == proxy.toxics

    def test_removing_an_unknown_toxic_is_a_key_error(self, proxy):
        """remove() of an id that is not in force raises KeyError naming it."""
        toxic = proxy.latency(1)
        proxy.remove(toxic)
        with pytest.raises(KeyError, match=toxic):
            proxy.remove(toxic)

    @pytest.mark.parametrize(
        "add",
        [
            lambda p: p.latency(-1),
            lambda p: p.latency(float("nan")),
            lambda p: p.latency(10, jitter_ms=-1),
            lambda p: p.latency(10, direction="sideways"),
            lambda p: p.bandwidth(0),
            lambda p: p.reset_peer(after_ms=-5),
        ],
    )
    def test_bad_toxic_arguments_are_rejected(self, add):
        """Negative or non-finite amounts and unknown directions raise ValueError."""
        with pytest.raises(ValueError, match=r"ms|direction|kbytes"):
            add(FaultProxy(("127.0.0.1", 1)))


class TestRealServices:
    async def test_postgres_through_the_proxy(self, postgres_url):
        """asyncpg: queries work; hang times out; reset breaks; outage refuses; restore heals."""
        import asyncpg

        async with FaultProxy(postgres_url, name="postgres") as proxy:
            dsn = proxy.url_for(postgres_url).replace("postgresql+asyncpg://", "postgresql://")
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                assert 1 == await conn.fetchval("SELECT 1")
                await asyncio.to_thread(proxy.hang)
                started = time.perf_counter()
                with pytest.raises(TimeoutError):
                    await conn.fetchval("SELECT 2", timeout=0.5)
                assert time.perf_counter() - started < 2.0
            finally:
                conn.terminate()
            await asyncio.to_thread(proxy.clear)

            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                await asyncio.to_thread(proxy.reset_peer)
                # asyncpg reports a reset it already saw as InterfaceError, one it
                # meets mid-query as ConnectionDoesNotExistError.
                with pytest.raises(
                    (
                        ConnectionError,
                        asyncpg.exceptions.ConnectionDoesNotExistError,
                        asyncpg.exceptions.InterfaceError,
                    )
                ):
                    await conn.fetchval("SELECT 3", timeout=3)
                assert conn.is_closed()
            finally:
                conn.terminate()
            await asyncio.to_thread(proxy.clear)

            await asyncio.to_thread(proxy.outage)
            with pytest.raises(ConnectionRefusedError):
                await asyncpg.connect(dsn, timeout=3)
            await asyncio.to_thread(proxy.restore)
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                assert 4 == await conn.fetchval("SELECT 4")
            finally:
                await conn.close()

    async def test_redis_through_the_proxy(self, redis_url, redis_prefix):
        """redis-py: latency is measured; hang times out; outage fails; restore heals."""
        import redis.asyncio as aioredis
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        async with FaultProxy(redis_url, name="redis") as proxy:
            client = aioredis.Redis.from_url(
                proxy.url_for(redis_url), socket_timeout=0.5, socket_connect_timeout=0.5
            )
            try:
                await client.set(f"{redis_prefix}k", "v")
                await asyncio.to_thread(proxy.latency, 150)
                started = time.perf_counter()
                assert b"v" == await client.get(f"{redis_prefix}k")
                assert time.perf_counter() - started >= 0.15
                await asyncio.to_thread(proxy.clear)

                await asyncio.to_thread(proxy.hang)
                with pytest.raises(RedisTimeoutError):
                    await client.ping()
                await asyncio.to_thread(proxy.clear)

                await asyncio.to_thread(proxy.outage)
                with pytest.raises(RedisConnectionError):
                    await client.ping()
                await asyncio.to_thread(proxy.restore)
                assert await client.ping()
            finally:
                await client.aclose()

    def test_fake_provider_outage_through_the_proxy(self):
        """The fake LLM provider behind the proxy: outage() refuses, restore() heals."""
        with FakeLLMProvider() as llm, FaultProxy(llm.url) as proxy:
            url = f"{proxy.url_for(llm.url)}/v1/chat/completions"
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            assert 200 == httpx.post(url, json=body, timeout=3).status_code
            proxy.outage()
            with pytest.raises(httpx.ConnectError):
                httpx.post(url, json=body, timeout=3)
            proxy.restore()
            assert 200 == httpx.post(url, json=body, timeout=3).status_code
