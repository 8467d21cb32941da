"""Failure classification: what a pipeline retries and counts, on errors raised by real clients."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from bastion.resilience import (
    BulkheadFullError,
    CircuitOpenError,
    DependencyError,
    DependencyTimeoutError,
    is_transient,
)
from bastion.resilience._classify import is_timeout, never_reached
from bastion.resilience._timeout import OutOfTime


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


class TestBuiltins:
    @pytest.mark.parametrize(
        "exc",
        [
            ConnectionResetError(),
            ConnectionRefusedError(),
            BrokenPipeError(),
            TimeoutError(),
            OSError(113, "No route to host"),
            socket.gaierror(-2, "Name or service not known"),
            DependencyTimeoutError("inner"),
        ],
        ids=lambda exc: type(exc).__name__,
    )
    def test_network_and_timeouts_are_transient(self, exc):
        """Network failures and timeouts are the dependency's: retried and counted."""
        assert is_transient(exc)

    @pytest.mark.parametrize(
        "exc",
        [
            ValueError(),
            KeyError("id"),
            TypeError(),
            RuntimeError(),
            FileNotFoundError(),
            PermissionError(),
            IsADirectoryError(),
            ssl.SSLCertVerificationError(),
            DependencyError("inner"),
            CircuitOpenError("inner", 5.0),
            BulkheadFullError("inner"),
            asyncio.CancelledError(),
            KeyboardInterrupt(),
        ],
        ids=lambda exc: type(exc).__name__,
    )
    def test_application_errors_are_not_transient(self, exc):
        """Bugs, local file errors and another pipeline's verdicts pass through unchanged."""
        assert not is_transient(exc)

    def test_pipeline_deadlines(self):
        """A deadline that passed before the call proves the dependency was not reached."""
        assert never_reached(OutOfTime(called=False, final=False))
        assert not never_reached(OutOfTime(called=True, final=False))
        assert is_transient(OutOfTime(called=True, final=True))
        assert is_timeout(OutOfTime(called=True, final=True))

    def test_a_reset_connection_may_have_reached_the_dependency(self):
        """Only a refused connection or an unknown host proves the request was not sent."""
        assert never_reached(ConnectionRefusedError())
        assert never_reached(socket.gaierror(-2, "unknown"))
        assert not never_reached(ConnectionResetError())
        assert not never_reached(TimeoutError())


class TestPostgres:
    async def test_refused_connection(self):
        """Nobody listening: transient, and the statement was never sent."""
        engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/x")
        try:
            with pytest.raises(Exception) as caught:  # noqa: PT011 -- the driver's own type is the subject
                async with engine.connect():
                    pass
        finally:
            await engine.dispose()
        assert is_transient(caught.value)
        assert never_reached(caught.value)

    async def test_terminated_backend(self, postgres_url):
        """A connection killed mid-statement is transient, but the statement may have run."""
        engine = create_async_engine(postgres_url, pool_pre_ping=False)
        try:
            async with engine.connect() as victim:
                pid = (await victim.execute(text("SELECT pg_backend_pid()"))).scalar()
                running = asyncio.create_task(victim.execute(text("SELECT pg_sleep(10)")))
                await asyncio.sleep(0.1)
                async with engine.connect() as killer:
                    await killer.execute(text(f"SELECT pg_terminate_backend({pid})"))
                with pytest.raises(DBAPIError) as caught:
                    await running
        finally:
            await engine.dispose()
        assert is_transient(caught.value)
        assert not never_reached(caught.value)

    async def test_sql_errors_are_not_transient(self, postgres_url):
        """A failing statement is the caller's problem: never retried, never counted."""
        engine = create_async_engine(postgres_url)
        try:
            async with engine.connect() as connection:
                with pytest.raises(DBAPIError) as caught:
                    await connection.execute(text("SELECT 1 / 0"))
        finally:
            await engine.dispose()
        assert not is_transient(caught.value)

    async def test_asyncpg_lost_connection(self, postgres_url):
        """asyncpg's own error for a connection lost mid-statement is transient."""
        dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
        victim = await asyncpg.connect(dsn)
        killer = await asyncpg.connect(dsn)
        try:
            running = asyncio.create_task(victim.execute("SELECT pg_sleep(10)"))
            await asyncio.sleep(0.1)
            await killer.execute("SELECT pg_terminate_backend($1)", victim.get_server_pid())
            with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError) as caught:
                await running
        finally:
            await killer.close()
            victim.terminate()
        assert is_transient(caught.value)
        assert not never_reached(caught.value)

    def test_server_refusing_connections(self):
        """A server starting up or full refuses before any statement: safe to retry."""
        for exc in (
            asyncpg.exceptions.CannotConnectNowError("starting up"),
            asyncpg.exceptions.TooManyConnectionsError("too many"),
        ):
            assert is_transient(exc)
            assert never_reached(exc)


class TestRedis:
    async def test_refused_connection(self):
        """Redis down: transient, and the command was never sent."""
        # redis-py retries a failed connect by itself unless told not to.
        client = aioredis.Redis(
            port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            with pytest.raises(redis.exceptions.ConnectionError) as caught:
                await client.ping()
        finally:
            await client.aclose()
        assert is_transient(caught.value)
        assert never_reached(caught.value)

    async def test_command_errors_are_not_transient(self, redis_url, redis_prefix):
        """A wrong command against a live Redis is the caller's error."""
        client = aioredis.Redis.from_url(redis_url)
        key = f"{redis_prefix}classify"
        try:
            await client.set(key, "text")
            with pytest.raises(redis.exceptions.ResponseError) as caught:
                await client.lpush(key, "item")
        finally:
            await client.delete(key)
            await client.aclose()
        assert not is_transient(caught.value)

    def test_authentication_is_not_transient(self):
        """A wrong password will not get better by retrying."""
        assert not is_transient(redis.exceptions.AuthenticationError("invalid password"))
        assert is_transient(redis.exceptions.TimeoutError("Timeout reading from socket"))
        assert is_timeout(redis.exceptions.TimeoutError("Timeout reading from socket"))


class TestHttpx:
    async def test_refused_connection(self):
        """No server: transient, and the request was never sent (safe even for a POST)."""
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ConnectError) as caught:
                await client.post(f"http://127.0.0.1:{closed_port()}/", content=b"x")
        assert is_transient(caught.value)
        assert never_reached(caught.value)

    async def test_read_timeout(self, silent_server):
        """A server that took the request and went quiet: a transient timeout, maybe processed."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(0.2)) as client:
            with pytest.raises(httpx.ReadTimeout) as caught:
                await client.get(f"http://127.0.0.1:{silent_server}/")
        assert is_transient(caught.value)
        assert is_timeout(caught.value)
        assert not never_reached(caught.value)

    async def test_caller_mistakes_are_not_transient(self):
        """An unsupported URL scheme is the caller's bug."""
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.UnsupportedProtocol) as caught:
                await client.get("ftp://127.0.0.1/")
        assert not is_transient(caught.value)

    async def test_error_statuses_are_not_exceptions_of_the_transport(self):
        """raise_for_status() errors are HTTP semantics, decided by the caller (is_failure)."""
        request = httpx.Request("GET", "http://example.invalid/")
        response = httpx.Response(503, request=request)
        with pytest.raises(httpx.HTTPStatusError) as caught:
            response.raise_for_status()
        assert not is_transient(caught.value)
