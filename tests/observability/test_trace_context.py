"""W3C Trace Context level 2: the harness endpoint and the rules its outbound calls obey."""

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi import FastAPI

import bastion
from bastion.errors import ConfigurationError
from bastion.testing import lifespan_client
from bastion_docs.app import create_app
from bastion_docs.conformance import CONFORMANCE_PATH, conformance_router

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@pytest.fixture
def recorder():
    """A real HTTP server on 127.0.0.1 keeping the header list of every POST it gets."""
    calls: list[list[tuple[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            calls.append([(name.lower(), value) for name, value in self.headers.items()])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.calls = calls
    server.url = f"http://127.0.0.1:{server.server_address[1]}/callback"
    yield server
    server.shutdown()
    server.server_close()


async def drive(recorder, headers, calls: int = 1) -> list[dict[str, list[str]]]:
    """POST the harness body with ``headers``; return each outbound call's trace headers."""
    app = FastAPI(telemetry={"tracing": False})
    runtime = bastion.install(app, database={"enabled": False}, logging={"enabled": False})
    app.include_router(conformance_router(runtime.tracing.tracer))
    body = [{"url": recorder.url, "arguments": []} for _ in range(calls)]
    async with lifespan_client(app) as client:
        response = await client.post(CONFORMANCE_PATH, json=body, headers=headers)
    assert 200 == response.status_code
    return [
        {
            name: [value for key, value in call if key == name]
            for name in ("traceparent", "tracestate")
        }
        for call in recorder.calls
    ]


def parts(traceparent: str) -> tuple[str, str, str]:
    _, trace_id, parent_id, flags = traceparent.split("-")
    return trace_id, parent_id, flags


class TestEndpoint:
    async def test_reference_service_serves_it_only_when_on(self, sqlite_url, recorder):
        """The endpoint exists only with tracing.conformance_endpoint on, and calls the URL."""
        settings = {"database": {"url": sqlite_url}, "logging": {"enabled": False}}
        async with lifespan_client(create_app(**settings)) as client:
            off = await client.post(CONFORMANCE_PATH, json=[])
        app = create_app(**settings, tracing={"conformance_endpoint": True})
        async with lifespan_client(app) as client:
            on = await client.post(CONFORMANCE_PATH, json=[{"url": recorder.url, "arguments": []}])
        assert (404, 200, 1) == (off.status_code, on.status_code, len(recorder.calls))

    def test_needs_tracing_enabled(self, sqlite_url):
        """Switching the endpoint on with tracing off is a configuration error."""
        with pytest.raises(ConfigurationError, match=r"needs tracing\.enabled"):
            create_app(
                database={"url": sqlite_url},
                tracing={"enabled": False, "conformance_endpoint": True},
            )


class TestTraceparent:
    async def test_valid_parent_keeps_trace_id_and_flags_with_new_parent_per_call(self, recorder):
        """A valid traceparent keeps trace id and flags; each outbound call has its own parent."""
        calls = await drive(recorder, {"traceparent": VALID}, calls=2)
        (first,), (second,) = (call["traceparent"] for call in calls)
        assert (TRACE_ID, "01") == parts(first)[::2] == parts(second)[::2]
        assert len({PARENT_ID, parts(first)[1], parts(second)[1]}) == 3

    async def test_exactly_one_lowercase_traceparent(self, recorder):
        """Each outbound call carries exactly one well-formed, lowercase traceparent."""
        (call,) = await drive(recorder, {})
        assert (1, True) == (
            len(call["traceparent"]),
            bool(TRACEPARENT.fullmatch(call["traceparent"][0])),
        )

    @pytest.mark.parametrize(
        "headers",
        [
            [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-0")],
            [("traceparent", f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01")],
            [("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01")],
            [("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01")],
            [("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01")],
            [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01-what")],
            [("traceparent", VALID), ("traceparent", f"00-{'1' * 32}-{PARENT_ID}-01")],
            [("trace-parent", VALID)],
        ],
        ids=["length", "hex", "zero-trace", "zero-parent", "ff", "00-extra", "dup", "name"],
    )
    async def test_invalid_parent_starts_new_trace_and_drops_tracestate(self, recorder, headers):
        """A missing or invalid traceparent starts a new random trace; tracestate is dropped."""
        (call,) = await drive(recorder, [*headers, ("tracestate", "foo=1")])
        trace_id = parts(call["traceparent"][0])[0]
        assert (True, []) == (trace_id != TRACE_ID, call["tracestate"])

    async def test_header_names_match_case_insensitively(self, recorder):
        """TraceParent and TRACESTATE are read like their lowercase names."""
        (call,) = await drive(recorder, [("TraceParent", VALID), ("TRACESTATE", "foo=1")])
        assert (TRACE_ID, ["foo=1"]) == (parts(call["traceparent"][0])[0], call["tracestate"])

    async def test_higher_version_is_parsed_by_its_version_00_prefix(self, recorder):
        """A future version with extra fields keeps its trace id when its prefix is valid."""
        (call,) = await drive(recorder, {"traceparent": f"cc-{TRACE_ID}-{PARENT_ID}-01-future"})
        assert TRACE_ID == parts(call["traceparent"][0])[0]

    @pytest.mark.parametrize(("flags", "expected"), [("03", "03"), ("02", "02"), ("00", "00")])
    async def test_random_flag_is_propagated(self, recorder, flags, expected):
        """The level-2 random flag (0x02) survives, sampled or not (an unsampled caller's
        trace takes the middleware's own path, not the SDK's)."""
        (call,) = await drive(recorder, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-{flags}"})
        assert expected == parts(call["traceparent"][0])[2]

    async def test_a_new_trace_carries_the_random_flag(self, recorder):
        """bastion's trace ids are 128 random bits, so a new trace says so (0x02)."""
        (call,) = await drive(recorder, {})
        assert int(parts(call["traceparent"][0])[2], 16) & 0x02


class TestTracestate:
    @pytest.mark.parametrize(
        ("values", "expected"),
        [
            (["a=1", "b=2"], "a=1,b=2"),
            (["a=1,,", " b=2 , c=3 "], "a=1,b=2,c=3"),
            (["a=1,B=2"], None),
            (["a=1,b=x\x7f"], None),
            ([",".join(f"k{i}=v" for i in range(33))], None),
            (["a=" + "v" * 257], None),
        ],
        ids=["combined", "empty-and-spaces", "bad-key", "bad-value", "33-members", "long"],
    )
    async def test_tracestate_rules(self, recorder, values, expected):
        """tracestate lists combine in order; an invalid or oversized list is dropped whole."""
        headers = [("traceparent", VALID), *(("tracestate", value) for value in values)]
        (call,) = await drive(recorder, headers)
        assert ([expected] if expected else []) == call["tracestate"]
