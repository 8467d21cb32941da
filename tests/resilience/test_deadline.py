"""Request deadlines: a request past its deadline is stopped and answered 504 REQUEST_TIMEOUT."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from structlog.testing import capture_logs

import bastion
from bastion.errors import ConfigurationError
from bastion.resilience import remaining_time, request_deadline
from bastion.resilience._deadline import GRACE
from bastion.testing import lifespan_client

# A deadline, and how late its 504 may come: the sweep interval (a tenth of the
# deadline here) plus a generous margin for a machine shared with other suites.
SHORT = 0.3
LATE = 0.5


def exceeded(route: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "bastion_http_request_deadline_exceeded_total", {"http_route": route}
        )
        or 0.0
    )


class Order(BaseModel):
    quantity: int


def fastapi_app(sqlite_url: str, **resilience) -> tuple[FastAPI, bastion.Bastion]:
    app = FastAPI()
    runtime = bastion.install(
        app,
        database={"url": sqlite_url},
        logging={"level": "WARNING", "format": "json"},
        resilience=resilience,
    )
    return app, runtime


def assert_timeout_problem(response) -> None:
    assert 504 == response.status_code
    assert "application/problem+json" == response.headers["content-type"]
    body = response.json()
    assert "REQUEST_TIMEOUT" == body["code"]
    assert 504 == body["status"]
    assert response.headers["x-request-id"] == body["correlation_id"]


class TestRouteDeadlines:
    async def test_slow_route_is_answered_504_in_time(self, sqlite_url):
        """A request past its route deadline gets a 504 problem soon after, counted by route."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/slow/{n}": SHORT})

        @app.get("/slow/{n}")
        async def slow(n: int) -> dict[str, int]:
            await asyncio.sleep(30)
            return {"n": n}

        before = exceeded("/slow/{n}")
        async with lifespan_client(app) as client:
            started = time.monotonic()
            response = await client.get("/slow/1", headers={"X-Request-Id": "req-deadline-1"})
            elapsed = time.monotonic() - started
        assert_timeout_problem(response)
        assert "req-deadline-1" == response.json()["correlation_id"]
        assert SHORT <= elapsed < SHORT + LATE
        assert 1.0 == exceeded("/slow/{n}") - before

    async def test_other_routes_keep_the_default(self, sqlite_url):
        """Only the named route gets the short deadline; another one outlasts it."""
        app, _ = fastapi_app(sqlite_url, request_deadline=20, route_deadlines={"/slow": SHORT})
        seen: list[float | None] = []

        @app.get("/slow")
        async def slow() -> dict[str, str]:
            await asyncio.sleep(30)
            return {}

        @app.get("/steady")
        async def steady() -> dict[str, str]:
            await asyncio.sleep(SHORT + 0.2)
            seen.append(remaining_time())
            return {"ok": "yes"}

        async with lifespan_client(app) as client:
            response = await client.get("/steady")
        assert 200 == response.status_code
        [left] = seen
        assert left is not None
        assert 18.5 < left < 20

    async def test_method_key_applies_to_that_method_only(self, sqlite_url):
        """A 'METHOD template' key gives that method its deadline; other methods keep theirs."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"POST /items": SHORT})

        @app.get("/items")
        @app.post("/items")
        async def items() -> dict[str, float | None]:
            left = remaining_time()
            await asyncio.sleep(SHORT + 0.2)
            return {"left": left}

        async with lifespan_client(app) as client:
            post = await client.post("/items")
            get = await client.get("/items")
        assert_timeout_problem(post)
        assert 200 == get.status_code
        assert get.json()["left"] > 29

    async def test_route_of_an_included_router_by_its_full_template(self, sqlite_url):
        """A route of a router included with a prefix is named by its full template."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/v1/reports/{id}": SHORT})
        router = APIRouter()

        @router.get("/reports/{id}")
        async def report(id: str) -> dict[str, str]:
            await asyncio.sleep(30)
            return {"id": id}

        app.include_router(router, prefix="/v1")
        before = exceeded("/v1/reports/{id}")
        async with lifespan_client(app) as client:
            response = await client.get("/v1/reports/7")
        assert_timeout_problem(response)
        assert 1.0 == exceeded("/v1/reports/{id}") - before

    async def test_route_longer_than_the_default_gets_its_budget(self, sqlite_url):
        """A route allowed longer than the default sees the longer budget from its start."""
        app, _ = fastapi_app(sqlite_url, request_deadline=SHORT, route_deadlines={"/report": 60})

        @app.get("/report")
        async def report() -> dict[str, float | None]:
            left = remaining_time()
            await asyncio.sleep(SHORT + 0.3)
            return {"left": left}

        async with lifespan_client(app) as client:
            response = await client.get("/report")
        assert 200 == response.status_code
        assert 59 < response.json()["left"] <= 60

    async def test_unknown_route_is_warned_about(self, sqlite_url):
        """A route_deadlines entry that names no route is logged at start-up."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/nowhere": 1, "GET /items": 2})

        @app.get("/items")
        async def items() -> dict[str, str]:
            return {}

        with capture_logs() as logs:
            async with lifespan_client(app):
                pass
        [warning] = [log for log in logs if log["event"] == "route deadlines name no route"]
        assert ["/nowhere"] == warning["routes"]

    @pytest.mark.parametrize("key", ["slow", "FETCH /slow", "GET slow"])
    def test_malformed_key_stops_install(self, sqlite_url, key):
        """A key that is neither a template nor 'METHOD template' is a configuration error."""
        with pytest.raises(ConfigurationError, match="route_deadlines"):
            fastapi_app(sqlite_url, route_deadlines={key: 1})


class TestDecorator:
    async def test_fastapi_endpoint_keeps_its_signature(self, sqlite_url):
        """@request_deadline leaves FastAPI's parameters and validation intact."""
        app, _ = fastapi_app(sqlite_url)

        @app.post("/orders/{shop}")
        @request_deadline(SHORT)
        async def order(shop: str, body: Order, wait: float = 0) -> dict[str, object]:
            await asyncio.sleep(wait)
            return {"shop": shop, "quantity": body.quantity}

        async with lifespan_client(app) as client:
            fast = await client.post("/orders/north", json={"quantity": 2})
            invalid = await client.post("/orders/north", json={"quantity": "many"})
            slow = await client.post("/orders/north?wait=30", json={"quantity": 2})
        assert {"shop": "north", "quantity": 2} == fast.json()
        assert "INVALID_INPUT" == invalid.json()["code"]
        assert_timeout_problem(slow)

    async def test_decorator_above_the_route_decorator(self, sqlite_url):
        """The deadline is found on the endpoint at start-up, whichever decorator is outermost."""
        app, _ = fastapi_app(sqlite_url)

        @request_deadline(timedelta(seconds=SHORT))
        @app.get("/slow")
        async def slow() -> dict[str, str]:
            await asyncio.sleep(30)
            return {}

        async with lifespan_client(app) as client:
            assert_timeout_problem(await client.get("/slow"))

    async def test_settings_win_over_the_decorator(self, sqlite_url):
        """An operator's route_deadlines entry overrides the endpoint's decorator."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/slow": 5})

        @app.get("/slow")
        @request_deadline(SHORT)
        async def slow() -> dict[str, float | None]:
            await asyncio.sleep(SHORT + 0.2)
            return {"left": remaining_time()}

        async with lifespan_client(app) as client:
            response = await client.get("/slow")
        assert 200 == response.status_code
        assert 4 < response.json()["left"] < 5

    async def test_starlette_function_and_class_endpoints(self, sqlite_url):
        """Starlette function endpoints and HTTPEndpoint classes, mounted or not, take it too."""

        @request_deadline(SHORT)
        async def slow(request: Request) -> JSONResponse:
            await asyncio.sleep(30)
            return JSONResponse({})

        @request_deadline(SHORT)
        class Slow(HTTPEndpoint):
            async def get(self, request: Request) -> JSONResponse:
                await asyncio.sleep(30)
                return JSONResponse({})

        app = Starlette(routes=[Route("/slow", slow), Mount("/api", routes=[Route("/slow", Slow)])])
        bastion.install(app, database={"url": sqlite_url}, logging={"level": "WARNING"})
        before = exceeded("/api/slow")
        async with lifespan_client(app) as client:
            assert_timeout_problem(await client.get("/slow"))
            assert_timeout_problem(await client.get("/api/slow"))
        assert 1.0 == exceeded("/api/slow") - before

    @pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf")])
    def test_bad_seconds_are_refused(self, seconds):
        """A negative or infinite deadline is a ValueError at decoration time."""
        with pytest.raises(ValueError, match="seconds"):
            request_deadline(seconds)

    def test_bound_method_is_refused(self):
        """Something that cannot carry the deadline is a TypeError naming it."""

        class Handler:
            async def run(self) -> None: ...

        with pytest.raises(TypeError, match="endpoint functions or classes"):
            request_deadline(1)(Handler().run)


class TestRemainingTime:
    async def test_counts_down_from_the_default(self, sqlite_url):
        """Inside a request remaining_time() is what is left of the default deadline."""
        app, _ = fastapi_app(sqlite_url, request_deadline=10)

        @app.get("/left")
        async def left() -> dict[str, float | None]:
            first = remaining_time()
            await asyncio.sleep(0.2)
            return {"first": first, "second": remaining_time()}

        async with lifespan_client(app) as client:
            body = (await client.get("/left")).json()
        assert 9.5 < body["first"] <= 10
        assert 0.15 < body["first"] - body["second"] < 0.2 + LATE

    @pytest.mark.parametrize(
        "resilience", [{"request_deadline": 0}, {"enabled": False}], ids=["zero", "off"]
    )
    async def test_none_without_a_deadline(self, sqlite_url, resilience):
        """A zero deadline or resilience off: remaining_time() is None in a request."""
        app, _ = fastapi_app(sqlite_url, **resilience)
        seen: list[float | None] = []

        @app.get("/left")
        async def left() -> dict[str, str]:
            seen.append(remaining_time())
            return {}

        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/left")).status_code
        assert [None] == seen

    def test_none_outside_a_request(self):
        """Outside a request there is no budget to report."""
        assert remaining_time() is None

    async def test_operational_routes_have_no_deadline(self, sqlite_url):
        """Health checks run without a request deadline."""
        app, runtime = fastapi_app(sqlite_url)
        seen: list[float | None] = []

        async def check() -> None:
            seen.append(remaining_time())

        runtime.health.register("probe", check)
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/health/ready")).status_code
        assert [None] == seen


class TestWorkStops:
    async def test_transaction_is_rolled_back(self, database_url):
        """The cancelled request's transaction is rolled back: its write is not kept."""
        app = FastAPI()
        runtime = bastion.install(
            app,
            database={"url": database_url},
            migrations={"mode": "off"},
            logging={"level": "WARNING"},
            resilience={"route_deadlines": {"/write": SHORT}},
        )
        sleep = "SELECT pg_sleep(30)" if database_url.startswith("postgresql") else None

        @app.post("/write")
        async def write() -> dict[str, str]:
            async with runtime.database.session() as session:
                await session.execute(text("INSERT INTO marks (label) VALUES ('cancelled')"))
                if sleep is not None:
                    await session.execute(text(sleep))
                else:
                    await asyncio.sleep(30)
            return {}

        async with lifespan_client(app) as client:
            async with runtime.database.session() as session:
                await session.execute(text("DROP TABLE IF EXISTS marks"))
                await session.execute(text("CREATE TABLE marks (label TEXT)"))
            started = time.monotonic()
            response = await client.post("/write")
            elapsed = time.monotonic() - started
            async with runtime.database.session() as session:
                count = (await session.execute(text("SELECT count(*) FROM marks"))).scalar()
                await session.execute(text("DROP TABLE marks"))
        assert_timeout_problem(response)
        assert elapsed < SHORT + LATE
        assert 0 == count

    async def test_code_after_the_deadline_does_not_run(self, sqlite_url):
        """The endpoint's task is cancelled: nothing after its await runs."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/slow": SHORT})
        reached: list[str] = []

        @app.get("/slow")
        async def slow() -> dict[str, str]:
            await asyncio.sleep(SHORT * 3)
            reached.append("after")
            return {}

        async with lifespan_client(app) as client:
            assert_timeout_problem(await client.get("/slow"))
            await asyncio.sleep(SHORT * 3)
        assert [] == reached

    async def test_cleanup_that_waits_does_not_hold_the_504(self, sqlite_url):
        """Cleanup still waiting a grace period after the deadline is cancelled again."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/slow": SHORT})
        cleaned: list[str] = []

        @app.get("/slow")
        async def slow() -> dict[str, str]:
            try:
                await asyncio.sleep(30)
            finally:
                # As SQLAlchemy closes an invalidated connection: shielded, up to 2 s.
                await asyncio.shield(asyncio.sleep(5))
                cleaned.append("never")
            return {}

        async with lifespan_client(app) as client:
            started = time.monotonic()
            response = await client.get("/slow")
            elapsed = time.monotonic() - started
        assert_timeout_problem(response)
        assert elapsed < SHORT + GRACE + LATE
        assert [] == cleaned
        assert 0 == asyncio.current_task().cancelling()

    async def test_cancellation_turned_into_an_error_is_still_a_504(self, sqlite_url):
        """Code that turns the deadline's cancellation into an error still gets a 504, not a 500."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/slow": SHORT})

        @app.get("/slow")
        async def slow() -> dict[str, str]:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise RuntimeError("interrupted") from None
            return {}

        async with lifespan_client(app) as client:
            assert_timeout_problem(await client.get("/slow"))
        assert 0 == asyncio.current_task().cancelling()

    async def test_swallowed_cancellation_is_taken_back(self, sqlite_url):
        """Code that swallows the cancellation answers itself; the task is left uncancelled."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/stubborn": SHORT})

        @app.get("/stubborn")
        async def stubborn() -> dict[str, str]:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                return {"finished": "anyway"}
            return {}

        async with lifespan_client(app) as client:
            response = await client.get("/stubborn")
        assert {"finished": "anyway"} == response.json()
        # httpx's ASGI transport runs the app in this very task.
        assert 0 == asyncio.current_task().cancelling()


async def call_asgi(app, path: str, receive=None, spec_version: str = "2.4"):
    """Drive one GET through the app's ASGI interface; return the messages it sent."""
    sent: list[dict] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }

    async def default_receive():
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive or default_receive, send)
    return sent


class TestOtherCancellations:
    async def test_shutdown_cancellation_is_not_a_504(self, sqlite_url):
        """A request the server cancels (shutdown) is answered 503 and not counted as a deadline."""
        app, runtime = fastapi_app(sqlite_url, route_deadlines={"/slow": 10})
        started = asyncio.Event()

        @app.get("/slow")
        async def slow() -> dict[str, str]:
            started.set()
            await asyncio.sleep(30)
            return {}

        before = exceeded("/slow")
        async with lifespan_client(app):
            task = asyncio.create_task(call_asgi(app, "/slow"))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert 1 == runtime.lifecycle.cut_off
        assert before == exceeded("/slow")

    async def test_client_disconnect_is_not_a_504(self, sqlite_url):
        """A client leaving a stream ends it quietly: no 504, nothing counted."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/stream": 5})

        @app.get("/stream")
        async def stream() -> StreamingResponse:
            async def chunks():
                while True:
                    yield b"tick\n"
                    await asyncio.sleep(0.01)

            return StreamingResponse(chunks())

        async def leaves():
            await asyncio.sleep(0.1)
            return {"type": "http.disconnect"}

        before = exceeded("/stream")
        async with lifespan_client(app):
            # Spec 2.3: Starlette watches receive() for the disconnect while streaming.
            sent = await asyncio.wait_for(call_asgi(app, "/stream", leaves, "2.3"), 5)
        assert 200 == sent[0]["status"]
        assert before == exceeded("/stream")

    async def test_deadline_after_the_response_started_aborts_it(self, sqlite_url):
        """Past the deadline mid-stream there is no 504 to send: the response is cut short."""
        app, _ = fastapi_app(sqlite_url, route_deadlines={"/stream": SHORT})

        @app.get("/stream")
        async def stream() -> StreamingResponse:
            async def chunks():
                yield b"first\n"
                await asyncio.sleep(30)
                yield b"never\n"

            return StreamingResponse(chunks())

        before = exceeded("/stream")
        async with lifespan_client(app):
            with pytest.raises(bastion.BastionError) as raised:
                await asyncio.wait_for(call_asgi(app, "/stream"), 5)
        assert "REQUEST_TIMEOUT" == raised.value.code
        assert 1.0 == exceeded("/stream") - before


class TestOpenApi:
    def test_operations_list_504_when_deadlines_are_on(self, sqlite_url):
        """With a default deadline every operation documents 504 REQUEST_TIMEOUT."""
        app, _ = fastapi_app(sqlite_url)

        @app.get("/items")
        async def items() -> dict[str, str]:
            return {}

        responses = app.openapi()["paths"]["/items"]["get"]["responses"]
        assert ["REQUEST_TIMEOUT"] == responses["504"]["x-error-codes"]

    @pytest.mark.parametrize(
        "resilience", [{"enabled": False}, {"request_deadline": 0}], ids=["off", "zero"]
    )
    def test_no_504_without_a_default_deadline(self, sqlite_url, resilience):
        """Without a default deadline the document does not promise a 504."""
        app, _ = fastapi_app(sqlite_url, **resilience)

        @app.get("/items")
        async def items() -> dict[str, str]:
            return {}

        assert "504" not in app.openapi()["paths"]["/items"]["get"]["responses"]
