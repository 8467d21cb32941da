"""Structured logs: the JSON line, the access line, stdlib and uvicorn routing, masking."""

import copy
import io
import json
import logging
import re
import string

import pytest
import structlog
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st

import bastion
from bastion.context import RequestContext, bind, unbind
from bastion.observability import LogMasker, configure_logging
from bastion.settings import LoggingSettings
from bastion.testing import lifespan_client

BASE_FIELDS = {"timestamp", "level", "event", "logger", "request_id", "trace_id", "span_id"}
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")


def json_lines(capsysbinary) -> list[dict]:
    """Every line written to standard output so far, each parsed as one JSON object."""
    return [json.loads(line) for line in capsysbinary.readouterr().out.decode().splitlines()]


def make_app(**logging_settings) -> FastAPI:
    app = FastAPI()
    bastion.install(
        app, database={"enabled": False}, logging={"format": "json", **logging_settings}
    )

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict:
        structlog.get_logger("app.items").info("reading item", item_id=item_id)
        logging.getLogger("app.stdlib").warning("stdlib says %s", "hello")
        return {"id": item_id}

    return app


def fail(exc: Exception):
    """Raise ``exc``: the test then logs it from an except block."""
    raise exc


def access_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["logger"] == "bastion.access"]


class TestJsonLines:
    async def test_every_line_has_the_base_fields(self, capsysbinary):
        """Lines from structlog, the stdlib and the access log all carry the base fields."""
        async with lifespan_client(make_app()) as client:
            await client.get("/items/7", headers={"X-Request-Id": "req-7"})
        lines = json_lines(capsysbinary)
        assert lines
        assert [] == [line for line in lines if not BASE_FIELDS <= set(line)]
        assert all(ISO_UTC.fullmatch(line["timestamp"]) for line in lines)

    async def test_lines_in_a_request_carry_its_request_id(self, capsysbinary):
        """Logs written while serving a request, structlog or stdlib, name that request."""
        async with lifespan_client(make_app()) as client:
            await client.get("/items/7", headers={"X-Request-Id": "req-7"})
        lines = {line["event"]: line for line in json_lines(capsysbinary)}
        item = lines["reading item"]
        assert ("info", "app.items", "req-7", 7) == (
            item["level"],
            item["logger"],
            item["request_id"],
            item["item_id"],
        )
        stdlib = lines["stdlib says hello"]
        assert ("warning", "app.stdlib", "req-7") == (
            stdlib["level"],
            stdlib["logger"],
            stdlib["request_id"],
        )

    async def test_trace_tenant_and_user_come_from_the_context(self, capsysbinary):
        """trace_id, span_id, tenant_id and user_id are read from the request context."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "json"})
        context = RequestContext(
            "r1", trace_id="a" * 32, span_id="b" * 16, tenant_id="t1", user_id="u1"
        )
        token = bind(context)
        try:
            structlog.get_logger("app").info("inside")
        finally:
            unbind(token)
        [line] = json_lines(capsysbinary)
        assert ("r1", "a" * 32, "b" * 16, "t1", "u1") == tuple(
            line[key] for key in ("request_id", "trace_id", "span_id", "tenant_id", "user_id")
        )

    def test_outside_a_request_ids_are_null(self, capsysbinary):
        """Outside a request the id fields are present and null."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "json"})
        structlog.get_logger("app").info("outside")
        [line] = json_lines(capsysbinary)
        assert (None, None, None) == (line["request_id"], line["trace_id"], line["span_id"])

    def test_level_filters_lines(self, capsysbinary):
        """Lines below logging.level are not written, from structlog or the stdlib."""
        bastion.install(
            FastAPI(), database={"enabled": False}, logging={"format": "json", "level": "WARNING"}
        )
        structlog.get_logger("app").info("quiet")
        logging.getLogger("app").info("quiet too")
        structlog.get_logger("app").warning("loud")
        assert ["loud"] == [line["event"] for line in json_lines(capsysbinary)]

    def test_console_format_is_not_json(self, capsysbinary):
        """logging.format=console writes readable lines, not JSON."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "console"})
        structlog.get_logger("app").info("hello console", answer=42)
        output = capsysbinary.readouterr().out.decode()
        assert "hello console" in output
        assert "answer=42" in output
        assert not output.lstrip().startswith("{")

    def test_auto_format_is_json_when_not_a_tty(self, capsysbinary):
        """With format=auto and output that is not a terminal, lines are JSON."""
        bastion.install(FastAPI(), database={"enabled": False})
        structlog.get_logger("app").info("auto")
        assert ["auto"] == [line["event"] for line in json_lines(capsysbinary)]


class TestAccessLine:
    async def test_access_line_fields(self, capsysbinary):
        """One line per request: method, route template, status, duration_ms, client, id."""
        async with lifespan_client(make_app()) as client:
            await client.get("/items/42?secret=1", headers={"X-Request-Id": "acc-1"})
        [line] = access_lines(json_lines(capsysbinary))
        assert BASE_FIELDS <= set(line)
        assert ("info", "request", "GET", "/items/{item_id}", 200, "127.0.0.1", "acc-1") == (
            line["level"],
            line["event"],
            line["method"],
            line["route"],
            line["status"],
            line["client"],
            line["request_id"],
        )
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0
        assert "/items/42" not in json.dumps(line)
        assert "secret" not in json.dumps(line)

    async def test_error_statuses_are_logged(self, capsysbinary):
        """404, 405 and 422 have their access line with the status sent."""
        async with lifespan_client(make_app()) as client:
            await client.get("/nope")
            await client.post("/items/1")
            await client.get("/items/abc")
        assert [404, 405, 422] == [
            line["status"] for line in access_lines(json_lines(capsysbinary))
        ]

    async def test_health_lines_only_at_debug(self, capsysbinary):
        """At INFO, /health/* writes no access line; at DEBUG it writes one at debug level."""
        async with lifespan_client(make_app(level="INFO")) as client:
            await client.get("/health/live")
            await client.get("/health/ready")
        assert [] == access_lines(json_lines(capsysbinary))

        async with lifespan_client(make_app(level="DEBUG")) as client:
            await client.get("/health/live")
        lines = access_lines(json_lines(capsysbinary))
        assert [("debug", "/health/live", 200)] == [
            (line["level"], line["route"], line["status"]) for line in lines
        ]

    async def test_access_log_can_be_switched_off(self, capsysbinary):
        """logging.access_log=false writes no access line."""
        async with lifespan_client(make_app(access_log=False)) as client:
            await client.get("/items/1")
        assert [] == access_lines(json_lines(capsysbinary))

    async def test_console_access_line(self, capsysbinary):
        """In console format the access line goes through structlog with the same fields."""
        async with lifespan_client(make_app(format="console")) as client:
            await client.get("/items/5")
        output = capsysbinary.readouterr().out.decode()
        [line] = [
            line for line in output.splitlines() if "bastion.access" in line or "route=" in line
        ]
        assert "route=/items/{item_id}" in line
        assert "status=200" in line


class TestStdlibAndUvicorn:
    def test_stdlib_and_uvicorn_share_the_renderer(self, capsysbinary):
        """Records of the stdlib and of uvicorn's loggers become the same JSON lines."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "json"})
        logging.getLogger("uvicorn.error").info("Started server process")
        logging.getLogger("sqlalchemy.engine").warning("pool %s", "exhausted")
        lines = json_lines(capsysbinary)
        assert [
            ("uvicorn.error", "info", "Started server process"),
            ("sqlalchemy.engine", "warning", "pool exhausted"),
        ] == [(line["logger"], line["level"], line["event"]) for line in lines]
        assert all(BASE_FIELDS <= set(line) for line in lines)

    def test_uvicorn_access_log_is_off(self, capsysbinary):
        """uvicorn's own access log is disabled: bastion writes the access line."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "json"})
        logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
        assert [] == json_lines(capsysbinary)

    def test_stdlib_exception_is_masked(self, capsysbinary):
        """A stdlib logger.exception carrying a secret in its message is masked."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "json"})
        try:
            fail(ConnectionError("login failed for redis://:Pa55word9@cache:6379/0"))
        except ConnectionError:
            logging.getLogger("app").exception("cannot connect")
        output = capsysbinary.readouterr().out.decode()
        assert "redis://:***@cache:6379/0" in output
        assert "Pa55word9" not in output

    def test_structlog_exception_is_masked(self, capsysbinary):
        """A structlog exception line has the exception type and a masked message."""
        bastion.install(FastAPI(), database={"enabled": False}, logging={"format": "json"})
        try:
            fail(PermissionError("Authorization: Bearer abcDEF123456 rejected"))
        except PermissionError:
            structlog.get_logger("app").exception("denied", password="hunter2hunter2")
        output = capsysbinary.readouterr().out.decode()
        assert "PermissionError" in output
        assert "abcDEF123456" not in output
        assert "hunter2hunter2" not in output

    def test_configured_mask_keys_are_masked(self, capsysbinary):
        """logging.mask_keys adds field names whose values are always masked."""
        bastion.install(
            FastAPI(), database={"enabled": False}, logging={"format": "json", "mask_keys": ["SSN"]}
        )
        structlog.get_logger("app").info("person", ssn="123-45-6789", customer_ssn="987-65-4321")
        [line] = json_lines(capsysbinary)
        assert ("***", "***") == (line["ssn"], line["customer_ssn"])


# --- The masker ---------------------------------------------------------------------------

# RFC 6750 b64token characters, less "=": what bearer tokens, API keys and passwords in
# URLs are made of. Every generated secret has a digit, and no fixed text below has one,
# so a secret found in the output can only have leaked.
TOKEN_ALPHABET = string.ascii_letters + string.digits + "-._~+"
secrets_ = st.text(alphabet=TOKEN_ALPHABET, min_size=8, max_size=40).filter(
    lambda s: any(c.isdigit() for c in s)
)
words = st.text(alphabet=string.ascii_lowercase + " ", max_size=20)


KEY_SHAPES = [
    lambda s, pre, post: {"password": s},
    lambda s, pre, post: {"Password": s},
    lambda s, pre, post: {"db_password": s},
    lambda s, pre, post: {"token": s},
    lambda s, pre, post: {"refresh_token": s},
    lambda s, pre, post: {"api_key": s},
    lambda s, pre, post: {"apiKey": s},
    lambda s, pre, post: {"X-Api-Key": s},
    lambda s, pre, post: {"client_secret": s},
    lambda s, pre, post: {"cookie": f"session={s}"},
    lambda s, pre, post: {"headers": {"Authorization": s}},
    lambda s, pre, post: {"headers": {"authorization": f"Bearer {s}"}},
]
TEXT_SHAPES = [
    lambda s, pre, post: f"{pre} Authorization: Bearer {s} {post}",
    lambda s, pre, post: f"{pre} authorization: basic {s} {post}",
    lambda s, pre, post: f"{pre} postgresql://app:{s}@db/app {post}",
    lambda s, pre, post: f"{pre} redis://:{s}@cache/ {post}",
    lambda s, pre, post: f"{pre} password={s} {post}",
    lambda s, pre, post: f"{pre} password: {s}, {post}",
    lambda s, pre, post: f"{pre} token={s}&next=x {post}",
    lambda s, pre, post: f"{pre} api_key={s}; {post}",
    lambda s, pre, post: f"{pre} secret={s} {post}",
]
# Where a secret can sit in an event: under a secret key, or in secret-shaped text.
shapes = st.sampled_from(
    [*KEY_SHAPES, *(lambda s, pre, post, t=t: {"text": t(s, pre, post)} for t in TEXT_SHAPES)]
)
text_shapes = st.sampled_from(TEXT_SHAPES)


def _nest(fragment: dict, path: list[tuple[str, str]]) -> dict:
    """Wrap ``fragment`` in dicts and lists along ``path``, innermost last."""
    value: object = fragment
    for kind, key in reversed(path):
        value = [value] if kind == "list" else (value,) if kind == "tuple" else {key: value}
    return {"event": "something happened", "payload": value}


nesting = st.lists(
    st.tuples(
        st.sampled_from(["dict", "list", "tuple"]),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
    ),
    max_size=5,
)


class TestMasker:
    @given(secret=secrets_, shape=shapes, pre=words, post=words, path=nesting)
    @settings(max_examples=300, deadline=None)
    def test_secret_never_survives(self, secret, shape, pre, post, path):
        """A secret at any depth, under a secret key or in a secret-shaped text, is masked."""
        event = _nest(shape(secret, pre, post), path)
        masked = LogMasker()(None, "info", copy.deepcopy(event))
        assert secret not in json.dumps(masked)

    @given(secret=secrets_, shape=text_shapes, pre=words, post=words)
    @settings(max_examples=200, deadline=None)
    def test_secret_in_an_exception_message_never_survives(self, secret, shape, pre, post):
        """Secret-shaped text in an exception's message is masked in the rendered line."""
        stream = io.BytesIO()
        configure_logging(LoggingSettings(format="json"), stream=stream)
        try:
            fail(RuntimeError(shape(secret, pre, post)))
        except RuntimeError:
            structlog.get_logger("app").exception("failed")
        output = stream.getvalue().decode()
        assert "RuntimeError" in output
        assert secret not in output

    @pytest.mark.parametrize(
        "value",
        [
            "GET /v1/documents?page=2 200",
            "user alice created document 42",
            {"route": "/v1/documents/{id}", "status": 200},
            ["plain", "values", 3, None, 2.5],
        ],
    )
    def test_ordinary_values_pass_unchanged(self, value):
        """Values with nothing secret in them are left as they are."""
        assert {"event": "x", "value": value} == LogMasker()(
            None, "info", {"event": "x", "value": copy.deepcopy(value)}
        )

    def test_event_name_is_never_masked(self):
        """The event itself stays readable even when it mentions a secret word."""
        assert (
            "password reset requested"
            == LogMasker()(None, "info", {"event": "password reset requested"})["event"]
        )

    def test_none_under_a_secret_key_stays_none(self):
        """A missing secret is shown as null, which tells an operator it is unset."""
        assert {"event": "x", "token": None} == LogMasker()(
            None, "info", {"event": "x", "token": None}
        )

    def test_header_pairs_are_masked(self):
        """Headers as (name, value) pairs, str or bytes, have secret values masked."""
        event = {
            "event": "x",
            "headers": [("authorization", "abcDEF123456"), (b"x-api-key", b"abcDEF123456")],
        }
        assert "abcDEF123456" not in repr(LogMasker()(None, "info", event))

    @pytest.mark.parametrize(
        "text",
        [
            "callback?access_token=abcDEF123456",
            "client_secret=abcDEF123456",
            "X-Api-Key: abcDEF123456",
            '{"password": "abcDEF123456"}',
        ],
    )
    def test_secret_assignments_in_text(self, text):
        """access_token=, client_secret=, X-Api-Key: and JSON "password": values are masked."""
        assert "abcDEF123456" not in LogMasker().mask_value(text)


class TestUvicornExtras:
    def test_color_message_is_dropped(self, capsysbinary):
        """uvicorn's ANSI-coloured copy of a message never reaches the JSON line."""
        import json
        import logging

        from bastion.observability import configure_logging
        from bastion.settings import LoggingSettings

        configure_logging(LoggingSettings(format="json"))
        logging.getLogger("uvicorn.error").info(
            "Finished server process [%d]", 1, extra={"color_message": "\x1b[1mFinished\x1b[0m"}
        )
        line = json.loads(capsysbinary.readouterr().out.splitlines()[-1])
        assert "Finished server process [1]" == line["event"]
        assert "color_message" not in line
