"""The resilient HTTP client against a real local HTTP server (bastion.testing.FakeLLMProvider)."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

import bastion
from bastion.context import RequestContext, bind, current_context, unbind
from bastion.resilience import (
    CircuitOpenError,
    DependencyError,
    DependencyTimeoutError,
    Resilience,
    http_client,
    use_resilience,
)
from bastion.resilience._http import parse_retry_after, use_client_tracing
from bastion.settings import ResilienceSettings
from bastion.testing import FakeLLMProvider, lifespan_client

# Fast backoff, no retry budget in the way, a circuit that only opens when a test wants it.
FAST = {
    "timeout": 2.0,
    "total_timeout": 5.0,
    "retries": 2,
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "retry_budget_min_per_second": 1000.0,
    "consecutive_failures": 0,
    "minimum_calls": 1000,
}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello?"}]}
MARGIN = 0.7


def calls(name: str, outcome: str) -> float:
    labels = {"dependency": name, "outcome": outcome}
    return REGISTRY.get_sample_value("bastion_resilience_calls_total", labels) or 0.0


def retries(name: str) -> float:
    return REGISTRY.get_sample_value("bastion_retries_total", {"dependency": name}) or 0.0


@pytest.fixture
def provider():
    with FakeLLMProvider() as server:
        yield server


@pytest.fixture
def name() -> str:
    """A dependency name of this test's own, so metric deltas are this test's."""
    return f"api-{secrets.token_hex(3)}"


@pytest.fixture
def policy() -> dict:
    """Changes to ``FAST`` for this test; a test parametrizes ``policy`` to set some."""
    return {}


@pytest.fixture
def registry(name, policy):
    """A current registry whose ``name`` dependency has ``FAST`` under the test's ``policy``."""
    resilience = Resilience(ResilienceSettings(dependencies={name: {**FAST, **policy}}))
    use_resilience(resilience)
    yield resilience
    use_resilience(None)


@pytest.fixture
async def client(provider, registry, name):
    async with http_client(name, base_url=provider.url) as c:
        yield c


class TestRetries:
    async def test_get_is_retried_until_it_succeeds(self, client, provider, name):
        """A GET answered 503 twice is retried and its third answer returned."""
        provider.fail_next(2)
        before = retries(name)
        response = await client.get("/v1/models")
        assert 200 == response.status_code
        assert 3 == provider.request_count
        assert 2.0 == retries(name) - before

    async def test_post_is_not_retried(self, client, provider, name):
        """A POST is not safe to repeat: its 503 is returned after one attempt."""
        provider.fail_next(1)
        before = calls(name, "failure")
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert 503 == response.status_code
        assert 1 == provider.request_count
        assert 1.0 == calls(name, "failure") - before

    @pytest.mark.parametrize(
        "how",
        [
            {"headers": {"Idempotency-Key": "order-7"}},
            {"extensions": {"bastion.idempotent": True}},
        ],
        ids=["idempotency-key", "extension"],
    )
    async def test_post_marked_safe_is_retried(self, client, provider, how):
        """An Idempotency-Key or the bastion.idempotent extension makes a POST retryable."""
        provider.fail_next(1)
        response = await client.post("/v1/chat/completions", json=CHAT, **how)
        assert 200 == response.status_code
        assert 2 == provider.request_count

    async def test_extension_can_forbid_retrying_a_get(self, client, provider):
        """extensions={"bastion.idempotent": False} makes even a GET single-shot."""
        provider.fail_next(1)
        response = await client.get("/v1/models", extensions={"bastion.idempotent": False})
        assert 503 == response.status_code
        assert 1 == provider.request_count

    async def test_spent_retries_return_the_last_failure(self, client, provider, name):
        """When every attempt failed, the last response is returned and counted as a failure."""
        provider.behave("fail", status=502)
        before = calls(name, "failure")
        response = await client.get("/v1/models")
        assert 502 == response.status_code
        assert "error" in response.json()
        assert 3 == provider.request_count
        assert 1.0 == calls(name, "failure") - before

    async def test_client_errors_are_not_retried(self, client, provider):
        """A 4xx other than 408/425/429 is the caller's problem, not a failure: no retry."""
        provider.fail_next(1, status=404)
        response = await client.get("/v1/models")
        assert 404 == response.status_code
        assert 1 == provider.request_count

    async def test_refused_connections_fail_after_retries(self, provider, registry, name):
        """A server that refuses connections: retried (even a POST), then DependencyError."""
        url = provider.url
        provider.stop()
        async with http_client(name, base_url=url) as c:
            with pytest.raises(DependencyError) as raised:
                await c.post("/v1/chat/completions", json=CHAT)
        assert isinstance(raised.value.__cause__, httpx.ConnectError)
        assert 502 == raised.value.status

    async def test_retried_bodies_release_their_connection(self, provider, registry, name):
        """Failed attempts give their pooled connection back: one connection serves all three."""
        provider.fail_next(2)
        async with http_client(
            name,
            base_url=provider.url,
            limits=httpx.Limits(max_connections=1),
            timeout=httpx.Timeout(None, pool=0.5),
        ) as c:
            response = await c.get("/v1/models")
        assert 200 == response.status_code
        assert 3 == provider.request_count


class TestRetryAfter:
    @pytest.mark.parametrize("policy", [{"backoff_max": 2.0}])
    async def test_retry_after_is_waited_for(self, client, provider):
        """A 503 with Retry-After: 1 is retried after about a second, not after the backoff."""
        provider.behave("fail", status=503, retry_after=1)
        started = time.monotonic()
        task = asyncio.create_task(client.get("/v1/models"))
        await asyncio.to_thread(provider.wait_for_requests, 1)
        provider.behave("ok")
        response = await task
        assert 200 == response.status_code
        [first, second] = provider.received
        assert 0.9 <= time.monotonic() - started < 1 + MARGIN
        assert first.path == second.path

    async def test_retry_after_past_backoff_max_is_not_waited_for(self, client, provider):
        """Asked to wait longer than backoff_max, the client returns the 429 at once."""
        provider.behave("fail", status=429, retry_after=30)
        started = time.monotonic()
        response = await client.get("/v1/models")
        assert 429 == response.status_code
        assert "30" == response.headers["retry-after"]
        assert 1 == provider.request_count
        assert time.monotonic() - started < MARGIN

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("3", 3.0), ("0", 0.0), (" 12 ", 12.0), ("soon", None), ("-1", None), ("", None)],
    )
    def test_delay_seconds(self, value, expected):
        """Retry-After in delay-seconds form; anything unreadable is ignored."""
        assert expected == parse_retry_after(httpx.Response(503, headers={"Retry-After": value}))

    @given(seconds=st.integers(min_value=0, max_value=10**9))
    def test_any_delay_seconds_reads_back(self, seconds):
        """Every delay-seconds value reads back as itself, never negative."""
        response = httpx.Response(503, headers={"Retry-After": str(seconds)})
        assert float(seconds) == parse_retry_after(response)

    @given(value=st.text(alphabet=st.characters(codec="latin-1"), max_size=40))
    def test_any_header_value_is_a_delay_or_nothing(self, value):
        """Whatever a server sends, the answer is a delay >= 0 or None, never an error."""
        response = httpx.Response(503, headers=[(b"retry-after", value.encode("latin-1"))])
        result = parse_retry_after(response)
        assert result is None or result >= 0

    def test_http_date(self):
        """Retry-After as an HTTP date is the time until then; a past date is 0."""
        soon = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
        past = format_datetime(datetime.now(UTC) - timedelta(seconds=20), usegmt=True)
        assert 18 < parse_retry_after(httpx.Response(503, headers={"Retry-After": soon})) <= 20
        assert 0.0 == parse_retry_after(httpx.Response(503, headers={"Retry-After": past}))
        assert parse_retry_after(httpx.Response(503)) is None


class TestTimeouts:
    @pytest.mark.parametrize("policy", [{"timeout": 0.3, "total_timeout": 0.8, "retries": 5}])
    async def test_total_timeout_bounds_a_hanging_server(self, client, provider, name):
        """A server that never answers: attempts time out, and the call ends by its total."""
        provider.behave("hang")
        before = calls(name, "timeout")
        started = time.monotonic()
        with pytest.raises(DependencyTimeoutError):
            await client.get("/v1/models")
        elapsed = time.monotonic() - started
        assert 0.6 <= elapsed < 0.8 + MARGIN
        assert provider.request_count >= 2
        assert 1.0 == calls(name, "timeout") - before

    @pytest.mark.parametrize("policy", [{"timeout": 10.0, "total_timeout": 30.0}])
    async def test_request_budget_caps_the_timeout(self, client, provider):
        """Inside a request with 0.4 s left, a hanging call ends then, not after 10 s."""
        provider.behave("hang")
        context = RequestContext("req-1", deadline=asyncio.get_running_loop().time() + 0.4)
        token = bind(context)
        try:
            started = time.monotonic()
            with pytest.raises(DependencyTimeoutError):
                await client.get("/v1/models")
            elapsed = time.monotonic() - started
        finally:
            unbind(token)
        assert 0.3 <= elapsed < 0.4 + MARGIN

    @pytest.mark.parametrize("policy", [{"timeout": 0.3, "total_timeout": 5.0, "retries": 0}])
    async def test_socket_timeouts_follow_the_attempt(self, provider, registry, name):
        """The attempt's time is set on the request's socket timeouts too."""
        seen: list[dict] = []

        class Recording(httpx.AsyncBaseTransport):
            def __init__(self):
                self.inner = httpx.AsyncHTTPTransport()

            async def handle_async_request(self, request):
                seen.append(dict(request.extensions["timeout"]))
                return await self.inner.handle_async_request(request)

            async def aclose(self):
                await self.inner.aclose()

        async with http_client(
            name, base_url=provider.url, transport=Recording(), timeout=httpx.Timeout(5, read=0.1)
        ) as c:
            assert 200 == (await c.get("/v1/models")).status_code
        [phases] = seen
        assert 0.1 == phases["read"]
        assert 0.25 < phases["connect"] <= 0.3
        assert phases["connect"] == phases["write"] == phases["pool"]


class TestCircuit:
    @pytest.mark.parametrize(
        "policy", [{"retries": 0, "consecutive_failures": 3, "open_duration": 60}]
    )
    async def test_open_circuit_stops_requests_reaching_the_server(self, client, provider, name):
        """After three failures the circuit opens; the next request never reaches the server."""
        provider.behave("fail", status=500)
        for _ in range(3):
            assert 500 == (await client.get("/v1/models")).status_code
        before = calls(name, "circuit_open")
        started = time.monotonic()
        with pytest.raises(CircuitOpenError) as raised:
            await client.get("/v1/models")
        assert time.monotonic() - started < 0.1
        assert 3 == provider.request_count
        assert 503 == raised.value.status
        assert 59 < raised.value.retry_after <= 60
        assert 1.0 == calls(name, "circuit_open") - before


class TestTracing:
    async def test_each_attempt_is_a_span_with_its_own_traceparent(self, provider, registry, name):
        """Two attempts: two CLIENT spans under the caller's span, each sent as traceparent."""
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        use_client_tracing(registry, enabled=True, tracer_provider=tracer_provider)
        provider.fail_next(1)
        async with http_client(name, base_url=provider.url) as c:
            with tracer_provider.get_tracer("test").start_as_current_span("caller") as caller:
                assert 200 == (await c.get("/v1/models")).status_code
        attempts = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
        assert 2 == len(attempts)
        caller_id = caller.get_span_context().span_id
        assert [caller_id, caller_id] == [span.parent.span_id for span in attempts]
        sent = [request.headers["traceparent"] for request in provider.received]
        expected = [
            f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}-{int(s.context.trace_flags):02x}"
            for s in attempts
        ]
        assert expected == sent
        assert [503, 200] == [s.attributes["http.response.status_code"] for s in attempts]
        tracer_provider.shutdown()

    async def test_tracing_off_sends_no_span(self, provider, registry, name):
        """With the app's client tracing off, requests carry no traceparent."""
        use_client_tracing(registry, enabled=False, tracer_provider=None)
        async with http_client(name, base_url=provider.url) as c:
            assert 200 == (await c.get("/v1/models")).status_code
        assert "traceparent" not in provider.received[0].headers


class TestClient:
    async def test_streams_without_buffering(self, client, provider):
        """A successful streamed response is handed over unread."""
        async with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            assert 200 == response.status_code
            assert not response.is_stream_consumed
            body = await response.aread()
        assert b"fake provider" in body

    async def test_created_before_a_registry_exists(self, provider, name):
        """The client can be made at import time; the pipeline is found at the first request."""
        c = http_client(name, base_url=provider.url)
        try:
            with pytest.raises(RuntimeError, match="install"):
                await c.get("/v1/models")
            resilience = Resilience(ResilienceSettings())
            use_resilience(resilience)
            assert 200 == (await c.get("/v1/models")).status_code
            assert "http" == resilience.pipeline(name).policy.kind
        finally:
            use_resilience(None)
            await c.aclose()

    async def test_follows_the_current_registry(self, provider, name):
        """A new current registry (another app started) gets its own pipeline and circuit."""
        first = Resilience(ResilienceSettings(dependencies={name: {**FAST, "retries": 0}}))
        second = Resilience(ResilienceSettings(dependencies={name: FAST}))
        async with http_client(name, base_url=provider.url) as c:
            try:
                use_resilience(first)
                provider.fail_next(1)
                assert 503 == (await c.get("/v1/models")).status_code
                use_resilience(second)
                provider.fail_next(1)
                assert 200 == (await c.get("/v1/models")).status_code
            finally:
                use_resilience(None)

    def test_name_is_required(self):
        """An empty name is refused when the client is made."""
        with pytest.raises(ValueError, match="dependency name"):
            http_client("")


class TestInstalled:
    async def test_request_in_an_installed_app(self, provider, sqlite_url):
        """In an app, the client finds the app's registry and carries the request's trace."""
        app = FastAPI()
        runtime = bastion.install(app, database={"url": sqlite_url}, logging={"level": "ERROR"})
        llm = http_client("llm", base_url=provider.url)
        seen: list[str | None] = []

        @app.get("/ask")
        async def ask() -> dict[str, int]:
            seen.append(current_context().trace_id)
            return {"status": (await llm.get("/v1/models")).status_code}

        try:
            async with lifespan_client(app) as client:
                assert {"status": 200} == (await client.get("/ask")).json()
                circuits = (await client.get("/health/circuits")).json()["circuits"]
        finally:
            await llm.aclose()
        [trace_id] = seen
        assert trace_id == provider.received[0].headers["traceparent"].split("-")[1]
        assert "http" == runtime.resilience.pipeline("llm").policy.kind
        assert "llm" in [circuit["name"] for circuit in circuits]

    async def test_hanging_dependency_cannot_outlast_the_request(self, provider, sqlite_url):
        """A request with 0.5 s to live calling a hanging server ends in time (503 or 504)."""
        app = FastAPI()
        bastion.install(
            app,
            database={"url": sqlite_url},
            logging={"level": "CRITICAL"},
            resilience={"route_deadlines": {"/ask": 0.5}},
        )
        llm = http_client("llm", base_url=provider.url)

        @app.get("/ask")
        async def ask() -> dict[str, int]:
            return {"status": (await llm.get("/v1/models")).status_code}

        provider.behave("hang")
        try:
            async with lifespan_client(app) as client:
                started = time.monotonic()
                response = await client.get("/ask")
                elapsed = time.monotonic() - started
        finally:
            await llm.aclose()
        assert response.status_code in {503, 504}
        assert response.json()["code"] in {"DEPENDENCY_FAILURE", "REQUEST_TIMEOUT"}
        assert 0.4 <= elapsed < 0.5 + MARGIN
