"""``/admin/audit``: query, export, proofs and checkpoints, for operators and tenant admins."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from starlette.applications import Starlette
from starlette.middleware import Middleware

from bastion._access import AccessPolicy
from bastion.audit._bundle import verify_bundle
from bastion.audit._checkpoint import Checkpointer, parse_checkpoint
from bastion.audit._event import Actor, ActorType, AuditEvent, Outcome, Resource
from bastion.audit._note import NoteSigner
from bastion.audit._proof import verify_consistency
from bastion.audit._query import AuditQuery, encode_cursor, parse_query, select_entries
from bastion.audit._routes import EXPORT_COLUMNS, FORMULA_STARTS, AuditRoutes, csv_cell
from bastion.audit._subjects import SubjectKeys
from bastion.audit._tables import checkpoints
from bastion.audit._writer import AuditLog
from bastion.errors import InvalidInput
from bastion.identity._principal import Principal, bind_principal, unbind_principal
from bastion.identity._rbac import (
    Authorizer,
    Roles,
    bind_request_authorizer,
    unbind_request_authorizer,
)
from bastion.observability._handlers import install_exception_handlers
from bastion.settings import AuditSettings

TOKEN = "operator-token-for-tests"
MASTER_KEY = b"m" * 32
TENANT_A = uuid.UUID("0190f1c2-7d4e-7a3b-8c5d-00000000000a")
TENANT_B = uuid.UUID("0190f1c2-7d4e-7a3b-8c5d-00000000000b")
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
APP_ACTIONS = {
    "document.update": "A document was changed.",
    "document.read": "A document was read.",
    "authx.check": "Not an auth action: shares the first letters only.",
    "apixkey.use": "Not an api_key action: '_' must not match any character.",
}
AUTHORIZER = Authorizer(Roles({"auditor": {"audit:read"}, "member": {"documents:read"}}))
PRINCIPAL_HEADER = "x-test-principal"


class PrincipalFromHeader:
    """Binds the principal a test names (``subject|tenant|role``), as identity's middleware would.

    The routes read the principal and the authorizer from the request's context,
    whoever bound them; this stands in for token verification, which is identity's.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        raw = dict(scope.get("headers", ())).get(PRINCIPAL_HEADER.encode())
        principal = None
        if raw is not None:
            subject, tenant, role = raw.decode().split("|")
            principal = Principal(subject, tenant_id=tenant or None, roles=frozenset({role}))
        token = bind_principal(principal)
        authorizer = bind_request_authorizer(AUTHORIZER)
        try:
            await self.app(scope, receive, send)
        finally:
            unbind_request_authorizer(authorizer)
            unbind_principal(token)


OPERATOR = {"authorization": f"Bearer {TOKEN}"}


def tenant_admin(tenant: uuid.UUID, role: str = "auditor") -> dict[str, str]:
    """Headers of a tenant's user holding ``role`` (with a token that is not the admin's)."""
    return {
        PRINCIPAL_HEADER: f"user-{tenant.hex[-1]}|{tenant}|{role}",
        "authorization": "Bearer jwt",
    }


@dataclass
class Stack:
    client: httpx.AsyncClient
    log: AuditLog
    keys: SubjectKeys
    checkpointer: Checkpointer
    signer: NoteSigner
    settings: AuditSettings

    async def record(self, action: str = "document.update", **fields) -> uuid.UUID:
        """Record one event (sync mode: committed on return) and return its id."""
        fields.setdefault("actor", Actor.user("u-1", email="ada@example.com"))
        fields.setdefault("ip", "203.0.113.7")
        fields.setdefault("user_agent", "curl/8.5")
        return await self.log.record(AuditEvent(action=action, **fields))

    async def get(self, path: str, headers=OPERATOR, **params) -> httpx.Response:
        return await self.client.get(f"/admin/audit{path}", params=params, headers=headers)

    async def ids(self, headers=OPERATOR, **params) -> list[uuid.UUID]:
        response = await self.get("", headers, **params)
        assert 200 == response.status_code, response.text
        return [uuid.UUID(item["id"]) for item in response.json()["items"]]


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(database) -> AsyncIterator[MakeStack]:
    """Build the routes on the test database: a sync-mode log, subject keys, a checkpointer."""
    opened: list[Stack] = []

    async def make(
        partition: str = "global",
        networks: tuple[str, ...] = ("127.0.0.0/8",),
        export_page=1000,
        token: str | None = TOKEN,
        **audit,
    ) -> Stack:
        settings = AuditSettings(mode="sync", partition=partition, **audit)
        keys = SubjectKeys(database=database, master_key=MASTER_KEY, cache_ttl=60)
        log = AuditLog(settings, database=database, subject_keys=keys)
        log.register_actions(APP_ACTIONS)
        await log.start()
        signer = NoteSigner.generate("bastion-test")
        checkpointer = Checkpointer(database=database, signer=signer, origin_prefix="bastion")
        routes = AuditRoutes(
            settings=settings,
            access=AccessPolicy(networks, token=token),
            database=database,
            subject_keys=keys,
            checkpointer=checkpointer,
            log=log,
            export_page=export_page,
        )
        app = Starlette(routes=routes.routes(), middleware=[Middleware(PrincipalFromHeader)])
        install_exception_handlers(app)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        stack = Stack(client, log, keys, checkpointer, signer, settings)
        opened.append(stack)
        return stack

    yield make
    for stack in opened:
        await stack.client.aclose()
        await stack.log.stop()


@pytest.fixture
async def stack(make_stack) -> Stack:
    return await make_stack()


class TestQuery:
    """``GET /admin/audit``: filters, order and pages."""

    async def test_each_filter_selects_its_entries(self, stack):
        """Every filter narrows the result to the entries that match it, newest first."""
        a = await stack.record(tenant_id=TENANT_A, resource=Resource("document", "d1"))
        b = await stack.record(
            "document.read",
            tenant_id=TENANT_B,
            actor=Actor.user("u-2"),
            resource=Resource("document", "d2"),
        )
        c = await stack.record(
            "auth.login.failure",
            outcome=Outcome.FAILURE,
            actor=Actor(ActorType.ANONYMOUS),
        )
        d = await stack.record("api_key.create", actor=Actor(ActorType.API_KEY, "k-1"))

        assert [d, c, b, a] == await stack.ids()
        assert [b] == await stack.ids(actor="u-2")
        assert [d] == await stack.ids(actor_type="api_key")
        assert [b] == await stack.ids(action="document.read")
        assert [c] == await stack.ids(outcome="failure")
        assert [b, a] == await stack.ids(resource_type="document")
        assert [a] == await stack.ids(resource_type="document", resource_id="d1")
        assert [a] == await stack.ids(tenant=str(TENANT_A))
        assert [] == await stack.ids(tenant=str(uuid.uuid4()))

    async def test_action_prefix_matches_whole_segments(self, stack):
        """``auth.*`` matches auth actions only; ``_`` in a prefix is not a wildcard."""
        login = await stack.record("auth.login.success")
        logout = await stack.record("auth.logout")
        await stack.record("authx.check")
        key = await stack.record("api_key.create")
        await stack.record("apixkey.use")

        assert [logout, login] == await stack.ids(action="auth.*")
        assert [login] == await stack.ids(action="auth.login.*")
        assert [key] == await stack.ids(action="api_key.*")

    async def test_since_and_until_bound_the_time(self, stack):
        """``since`` is inclusive and ``until`` exclusive, with any UTC offset."""
        ids = [await stack.record(occurred_at=T0 + dt.timedelta(hours=hour)) for hour in range(4)]

        assert [ids[2], ids[1]] == await stack.ids(
            since=(T0 + dt.timedelta(hours=1)).isoformat(),
            until="2026-03-01T17:00:00+02:00",  # 15:00 UTC
        )
        assert [ids[3]] == await stack.ids(since="2026-03-01T15:00:00Z")

    async def test_pages_walk_every_entry_once(self, stack):
        """With ``limit``, pages follow newest first and the last has no cursor."""
        ids = [await stack.record(details={"n": n}) for n in range(12)]

        walked, pages, cursor = [], 0, None
        while True:
            params = {"limit": "5"} | ({"cursor": cursor} if cursor else {})
            body = (await stack.get("", **params)).json()
            walked += [uuid.UUID(item["id"]) for item in body["items"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break

        assert 3 == pages
        assert ids[::-1] == walked

    async def test_pages_ignore_entries_appended_during_the_walk(self, stack):
        """Entries appended between pages neither repeat nor push out an entry of the walk."""
        before = [await stack.record(details={"n": n}) for n in range(9)]

        walked, cursor = [], None
        while True:
            params = {"limit": "4"} | ({"cursor": cursor} if cursor else {})
            body = (await stack.get("", **params)).json()
            walked += [uuid.UUID(item["id"]) for item in body["items"]]
            for n in range(3):
                await stack.record(details={"late": n})
            cursor = body["next_cursor"]
            if cursor is None:
                break

        assert before[::-1] == walked

    async def test_tenant_filter_reads_an_index(self, database, stack):
        """On PostgreSQL the tenant filter is an index scan of (tenant_id, id), newest first."""
        if database.kind.value != "postgres":
            pytest.skip("EXPLAIN output is PostgreSQL's")
        for n in range(200):
            await stack.record(tenant_id=uuid.UUID(int=n + 1), details={"n": n})
        statement = select_entries(AuditQuery(tenant_id=uuid.UUID(int=7)))
        compiled = statement.compile(database.engine, compile_kwargs={"literal_binds": True})
        async with database.engine.connect() as connection:
            await connection.execute(text("ANALYZE bastion_audit_entries"))
            plan = (await connection.execute(text(f"EXPLAIN {compiled}"))).scalars().all()

        assert "ix_bastion_audit_entries_tenant_id_id" in "\n".join(plan)


class TestBadInput:
    """Malformed parameters are 422 problems naming the parameter, never a 500."""

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"limit": "0"}, "query.limit"),
            ({"limit": "1001"}, "query.limit"),
            ({"limit": "ten"}, "query.limit"),
            ({"tenant": "acme"}, "query.tenant"),
            ({"since": "2026-03-01T12:00:00"}, "query.since"),
            ({"until": "yesterday"}, "query.until"),
            ({"outcome": "maybe"}, "query.outcome"),
            ({"actor_type": "robot"}, "query.actor_type"),
            ({"action": "Auth.Login"}, "query.action"),
            ({"action": "auth."}, "query.action"),
            ({"action": "au*"}, "query.action"),
            ({"actor": "x" * 256}, "query.actor"),
            ({"cursor": "not-a-cursor"}, "query.cursor"),
            ({"format": "xml"}, "query.format"),
            ({"limit": "9" * 5000}, "query.limit"),
            ({"since": "0001-01-01T00:00:00+01:00"}, "query.since"),
            ({"until": "9999-12-31T23:59:59-01:00"}, "query.until"),
            ({"actor": "a\x00b"}, "query.actor"),
            ({"resource_type": "document\x00"}, "query.resource_type"),
            ({"resource_id": "\x00"}, "query.resource_id"),
            ({"action": "auth.login\x00"}, "query.action"),
        ],
    )
    async def test_bad_parameter_is_422(self, stack, params, field):
        """Each bad parameter is reported under ``query.<name>`` with INVALID_INPUT."""
        response = await stack.get("", **params)

        assert 422 == response.status_code
        assert "application/problem+json" == response.headers["content-type"]
        body = response.json()
        assert "INVALID_INPUT" == body["code"]
        assert [field] == [error["field"] for error in body["errors"]]

    async def test_every_bad_parameter_is_reported_at_once(self, stack):
        """Several bad parameters give one problem listing each."""
        response = await stack.get("", limit="0", outcome="maybe", format="xml")

        assert {"query.limit", "query.outcome", "query.format"} == {
            error["field"] for error in response.json()["errors"]
        }

    async def test_tampered_cursor_is_422(self, stack):
        """A cursor changed by the client, or naming a non-UUIDv7, is refused."""
        for n in range(3):
            await stack.record(details={"n": n})
        cursor = (await stack.get("", limit="1")).json()["next_cursor"]
        flipped = cursor[:5] + ("A" if cursor[5] != "A" else "B") + cursor[6:]

        for bad in (flipped, cursor + "A", encode_cursor(uuid.uuid4()), cursor[:-1]):
            response = await stack.get("", cursor=bad)
            assert 422 == response.status_code, bad
            assert ["query.cursor"] == [e["field"] for e in response.json()["errors"]]

    async def test_malformed_entry_id_is_404(self, stack):
        """An entry id that is not a UUID is simply not found."""
        assert 404 == (await stack.get("/entries/not-a-uuid")).status_code

    async def test_extreme_instants_in_range_are_served(self, stack):
        """The first and last UTC instants a datetime holds are valid bounds, not errors."""
        entry = await stack.record()

        assert [entry] == await stack.ids(
            since="0001-01-01T00:00:00+00:00", until="9999-12-31T23:59:59.999999Z"
        )

    async def test_huge_sizes_are_422(self, stack):
        """Sizes of thousands of digits are out of range, not an int() failure."""
        entry = await stack.record()
        huge = "9" * 5000

        proof = await stack.get(f"/entries/{entry}/proof", tree_size=huge)
        consistency = await stack.get("/consistency", first="1", second=huge)

        assert (422, 422) == (proof.status_code, consistency.status_code)
        assert ["query.second"] == [e["field"] for e in consistency.json()["errors"]]


PARAMETERS = (
    "actor",
    "actor_type",
    "action",
    "outcome",
    "resource_type",
    "resource_id",
    "tenant",
    "since",
    "until",
    "limit",
    "cursor",
    "format",
)
# Any character, lone surrogates and NUL included; and the shapes parameters usually have,
# so that examples also reach the database rather than all stopping at validation.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
LIKELY_TEXT = st.one_of(
    ANY_TEXT,
    st.datetimes(timezones=st.timezones()).map(lambda value: value.isoformat()),
    st.sampled_from(["auth.*", "document.update", "success", "user", "5", "csv", "jsonl"]),
    st.uuids().map(str),
    # Edges found before: NUL, instants with no UTC equivalent, more digits than int() takes.
    st.sampled_from(
        ["a\x00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9" * 5000, "\ud800"]
    ),
)
PARAMS = st.dictionaries(st.sampled_from(PARAMETERS) | ANY_TEXT, LIKELY_TEXT, max_size=5)
# Raw query strings: those values as UTF-8 (lone surrogates make it invalid) or any bytes,
# percent-encoded, under any parameter name.
QUERY_STRINGS = st.lists(
    st.tuples(
        st.sampled_from(PARAMETERS) | st.text(max_size=8),
        LIKELY_TEXT.map(lambda value: value.encode("utf-8", "surrogatepass"))
        | st.binary(max_size=30),
    ),
    max_size=5,
).map(
    lambda pairs: "&".join(
        f"{urllib.parse.quote(name)}={urllib.parse.quote_from_bytes(value)}"
        for name, value in pairs
    )
)
EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class TestAnyInput:
    """Property: whatever the query string, the answer is a result or a 4xx, never a 500."""

    def test_parser_accepts_or_reports(self):
        """parse_query returns a query whose values every database can bind, or InvalidInput."""

        @EXAMPLES
        @given(PARAMS)
        def parse(params):
            query, errors = None, ()
            try:
                query = parse_query(params)
            except InvalidInput as exc:
                errors = exc.errors
            if query is None:
                assert errors
                assert all(error.field.startswith("query.") for error in errors)
                return
            for value in (query.actor_id, query.resource_type, query.resource_id, query.action):
                if value is not None:
                    assert "\x00" not in value
                    value.encode()
            for instant in (query.since, query.until):
                if instant is not None:
                    assert dt.timedelta(0) == instant.utcoffset()

        parse()

    async def test_routes_never_answer_500(self, stack):
        """Hypothesis' query strings, sent to the listing and the proof routes, get no 5xx."""
        entry = await stack.record(resource=Resource("document", "d1"))
        await stack.checkpointer.checkpoint("global")
        examples: list[str] = []

        @EXAMPLES
        @given(QUERY_STRINGS)
        def collect(query_string):
            examples.append(query_string)

        collect()
        for query_string in examples:
            for path in ("", "/consistency", f"/entries/{entry}/proof"):
                response = await stack.client.get(
                    f"/admin/audit{path}?{query_string}", headers=OPERATOR
                )
                assert response.status_code < 500, (path, query_string, response.text)


class TestItems:
    """Each item: every column, personal fields decrypted, hashes in hex, details parsed."""

    async def test_item_carries_every_column(self, database, stack):
        """The item shows the decrypted personal fields, the leaf hash and the details object."""
        entry_id = await stack.record(
            tenant_id=TENANT_A,
            resource=Resource("document", "d1"),
            request_id="req-1",
            details={"fields": ["title"], "version": 3},
        )

        item = (await stack.get(f"/entries/{entry_id}")).json()

        async with database.engine.connect() as connection:
            leaf = (
                await connection.execute(
                    text("SELECT leaf_hash FROM bastion_audit_entries WHERE seq = 0")
                )
            ).scalar_one()
        assert set(EXPORT_COLUMNS) == set(item)
        assert str(entry_id) == item["id"]
        assert "global" == item["log_id"]
        assert 0 == item["seq"]
        assert str(TENANT_A) == item["tenant_id"]
        assert "ada@example.com" == item["email"]
        assert "203.0.113.7" == item["ip"]
        assert "curl/8.5" == item["user_agent"]
        assert item["erased"] is False
        assert {"fields": ["title"], "version": 3} == item["details"]
        assert leaf.hex() == item["leaf_hash"]
        assert "req-1" == item["request_id"]
        assert "document" == item["resource_type"]

    async def test_erased_subject_shows_null_and_erased(self, stack):
        """After crypto-shredding, the personal fields are null and the item says erased."""
        entry_id = await stack.record(actor=Actor.user("u-9", email="gone@example.com"))
        subject = (await stack.get(f"/entries/{entry_id}")).json()["subject"]

        assert await stack.keys.erase(subject)
        item = (await stack.get(f"/entries/{entry_id}")).json()

        assert (None, None, None) == (item["email"], item["ip"], item["user_agent"])
        assert item["erased"] is True
        assert "u-9" == item["actor_id"]

    async def test_unknown_entry_is_404(self, stack):
        """An id no entry has answers NOT_FOUND."""
        response = await stack.get(f"/entries/{uuid.uuid4()}")

        assert 404 == response.status_code
        assert "NOT_FOUND" == response.json()["code"]


class TestExport:
    """``format=csv|jsonl``: the whole filtered result as a download, recorded as an export."""

    async def test_csv_export_streams_every_page(self, make_stack):
        """The CSV has a header and one row per matching entry across pages."""
        stack = await make_stack(export_page=3)
        ids = [await stack.record(tenant_id=TENANT_A, details={"n": n}) for n in range(7)]
        await stack.record(tenant_id=TENANT_B)

        response = await stack.get("", format="csv", tenant=str(TENANT_A))

        assert 200 == response.status_code
        assert "text/csv; charset=utf-8" == response.headers["content-type"]
        disposition = response.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="audit-')
        assert disposition.endswith('.csv"')
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert list(EXPORT_COLUMNS) == list(rows[0])
        assert [str(entry_id) for entry_id in ids[::-1]] == [row["id"] for row in rows]
        assert {"ada@example.com"} == {row["email"] for row in rows}
        assert '{"n":6}' == rows[0]["details"]
        assert "false" == rows[0]["erased"]

    async def test_csv_cells_cannot_run_as_formulas(self, stack):
        """A value a spreadsheet would run as a formula is exported with a leading quote."""
        await stack.record(actor=Actor.user("=HYPERLINK(1)"))

        response = await stack.get("", format="csv", action="document.update")

        (row,) = list(csv.DictReader(io.StringIO(response.text)))
        assert "'=HYPERLINK(1)" == row["actor_id"]

    @pytest.mark.parametrize(
        "start", ["=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20"]
    )
    def test_every_formula_start_is_quoted(self, start):
        """Each first character a spreadsheet evaluates, full-width forms included, is quoted."""
        assert start in FORMULA_STARTS
        assert f"'{start}SUM(A1)" == csv_cell(f"{start}SUM(A1)")

    def test_other_cells_are_kept(self):
        """Plain text, numbers, booleans, dicts and datetimes have one spelling each."""
        assert ["abc", "", "7", "true", '{"n":1}', "2026-03-01T12:00:00+00:00"] == [
            csv_cell(value) for value in ("abc", None, 7, True, {"n": 1}, T0)
        ]

    async def test_jsonl_export_matches_the_items(self, make_stack):
        """Each JSON line is the item the JSON listing shows."""
        stack = await make_stack(export_page=2)
        for n in range(5):
            await stack.record(details={"n": n})
        items = (await stack.get("", action="document.update")).json()["items"]

        response = await stack.get("", format="jsonl", action="document.update")

        assert "application/x-ndjson" == response.headers["content-type"]
        assert response.headers["content-disposition"].endswith('.jsonl"')
        assert items == [orjson.loads(line) for line in response.text.splitlines()]

    async def test_export_is_recorded(self, stack):
        """Each export adds an ``audit.export`` entry naming its format and filters."""
        await stack.record()

        await stack.get("", format="jsonl", outcome="success")
        (item,) = (await stack.get("", action="audit.export")).json()["items"]

        assert {"format": "jsonl", "filters": {"outcome": "success"}} == item["details"]
        assert ("system", "operator") == (item["actor_type"], item["actor_id"])


class TestAccess:
    """Operators read everything; a tenant's auditor reads its tenant only."""

    async def test_operator_needs_the_token(self, stack):
        """From an allowed network, no token is 401 and a wrong one too."""
        assert 401 == (await stack.get("", headers={})).status_code
        response = await stack.get("", headers={"authorization": "Bearer nope"})
        assert 401 == response.status_code
        assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_outside_the_networks_is_403(self, make_stack):
        """Outside the admin networks even the token is refused."""
        stack = await make_stack(networks=("10.0.0.0/8",))

        assert 403 == (await stack.get("")).status_code

    async def test_tenant_auditor_is_forced_to_its_tenant(self, stack):
        """A tenant auditor's query lists its tenant's entries only; the operator's lists all."""
        a = await stack.record(tenant_id=TENANT_A)
        b = await stack.record(tenant_id=TENANT_B)
        system = await stack.record()

        assert [a] == await stack.ids(tenant_admin(TENANT_A))
        assert [b] == await stack.ids(tenant_admin(TENANT_B))
        assert [system, b, a] == await stack.ids()

    async def test_tenant_auditor_cannot_read_another_tenant(self, stack):
        """Naming another tenant is 403; its entry and proof are 404; its export is refused."""
        b = await stack.record(tenant_id=TENANT_B)
        as_a = tenant_admin(TENANT_A)

        assert 403 == (await stack.get("", as_a, tenant=str(TENANT_B))).status_code
        assert 403 == (await stack.get("", as_a, tenant=str(TENANT_B), format="csv")).status_code
        assert 404 == (await stack.get(f"/entries/{b}", as_a)).status_code
        assert 404 == (await stack.get(f"/entries/{b}/proof", as_a)).status_code
        exported = await stack.get("", as_a, format="jsonl")
        assert [] == [line for line in exported.text.splitlines() if str(b) in line]
        assert 200 == (await stack.get(f"/entries/{b}", tenant_admin(TENANT_B))).status_code

    async def test_without_audit_read_is_403(self, stack):
        """A tenant member lacking ``audit:read`` is refused."""
        response = await stack.get("", tenant_admin(TENANT_A, role="member"))

        assert 403 == response.status_code
        assert "FORBIDDEN" == response.json()["code"]

    async def test_principal_without_tenant_is_403(self, make_stack):
        """A principal acting for no tenant is refused, even from an operators' network."""
        headers = {PRINCIPAL_HEADER: "u-1||auditor", "authorization": "Bearer jwt"}
        for token in (TOKEN, None):
            stack = await make_stack(token=token)

            response = await stack.get("", headers)

            assert 403 == response.status_code
            assert "FORBIDDEN" == response.json()["code"]

    async def test_network_alone_never_makes_a_principal_an_operator(self, make_stack):
        """With no admin token, a tenant auditor from an allowed network stays in its tenant."""
        stack = await make_stack(token=None)
        a = await stack.record(tenant_id=TENANT_A)
        b = await stack.record(tenant_id=TENANT_B)
        as_a = tenant_admin(TENANT_A)

        assert [a] == await stack.ids(as_a)
        assert 403 == (await stack.get("", as_a, tenant=str(TENANT_B))).status_code
        assert 404 == (await stack.get(f"/entries/{b}", as_a)).status_code
        post = await stack.client.post("/admin/audit/checkpoints", headers=as_a)
        assert 403 == post.status_code
        member = await stack.get("", tenant_admin(TENANT_A, role="member"))
        assert 403 == member.status_code
        assert [b, a] == await stack.ids(headers={})

    async def test_tenant_logs_are_private_to_their_tenant(self, make_stack):
        """With per-tenant logs, an auditor reads its log's checkpoints and proofs only."""
        stack = await make_stack(partition="tenant")
        await stack.record(tenant_id=TENANT_A)
        await stack.record(tenant_id=TENANT_B)
        await stack.checkpointer.checkpoint_all()
        as_a = tenant_admin(TENANT_A)

        own = await stack.get("/checkpoints", as_a)
        assert f"tenant/{TENANT_A}" == own.json()["log_id"]
        other = f"tenant/{TENANT_B}"
        assert 403 == (await stack.get("/checkpoints", as_a, log_id=other)).status_code
        assert 403 == (await stack.get("/checkpoints", as_a, log_id="system")).status_code
        response = await stack.get("/consistency", as_a, log_id=other, first="1")
        assert 403 == response.status_code
        assert (
            403 == (await stack.client.post("/admin/audit/checkpoints", headers=as_a)).status_code
        )


class TestProof:
    """``GET /admin/audit/entries/{id}/proof``: a bundle that verifies offline."""

    @pytest.mark.parametrize("partition", ["global", "tenant"])
    async def test_tenant_auditor_proves_its_own_entries(self, make_stack, partition):
        """A tenant's auditor gets verifiable proofs of its entries, in either partition."""
        stack = await make_stack(partition=partition)
        await stack.record(tenant_id=TENANT_B)
        own = await stack.record(tenant_id=TENANT_A)
        await stack.checkpointer.checkpoint_all()

        response = await stack.get(f"/entries/{own}/proof", tenant_admin(TENANT_A))

        assert 200 == response.status_code
        bundle = response.json()
        verify_bundle(bundle, [stack.signer.verifier()])
        expected_log = "global" if partition == "global" else f"tenant/{TENANT_A}"
        assert expected_log == bundle["log_id"]

    @pytest.mark.parametrize(("interval", "retry_after"), [(60.0, "60"), (2.5, "3"), (0.0, None)])
    async def test_tenant_cannot_make_a_checkpoint(
        self, database, make_stack, interval, retry_after
    ):
        """A tenant's proof of an unsigned entry is 409 with Retry-After; nothing is signed."""
        stack = await make_stack(checkpoint_interval=interval)
        first = await stack.record(tenant_id=TENANT_A)
        await stack.checkpointer.checkpoint("global")
        second = await stack.record(tenant_id=TENANT_A)

        covered = await stack.get(f"/entries/{first}/proof", tenant_admin(TENANT_A))
        response = await stack.get(f"/entries/{second}/proof", tenant_admin(TENANT_A))

        async with database.engine.connect() as connection:
            stored = await connection.execute(select(func.count()).select_from(checkpoints))
        assert 200 == covered.status_code
        assert 409 == response.status_code
        assert "CONFLICT" == response.json()["code"]
        assert retry_after == response.headers.get("retry-after")
        assert 1 == stored.scalar_one()

    async def test_bundle_verifies_against_an_on_demand_checkpoint(self, stack):
        """With no checkpoint yet, one is made, and the bundle verifies with the signer's key."""
        ids = [await stack.record(details={"n": n}) for n in range(5)]

        response = await stack.get(f"/entries/{ids[2]}/proof")

        assert 200 == response.status_code
        bundle = response.json()
        checkpoint = verify_bundle(bundle, [stack.signer.verifier()])
        assert (2, 5) == (bundle["leaf_index"], bundle["tree_size"])
        assert 5 == checkpoint.size

    async def test_tree_size_picks_that_checkpoint(self, stack):
        """``tree_size`` asks for the proof against the checkpoint of that size."""
        ids = [await stack.record(details={"n": n}) for n in range(3)]
        await stack.checkpointer.checkpoint("global")
        for n in range(4):
            await stack.record(details={"later": n})
        await stack.checkpointer.checkpoint("global")

        bundle = (await stack.get(f"/entries/{ids[1]}/proof", tree_size="3")).json()
        latest = (await stack.get(f"/entries/{ids[1]}/proof")).json()

        assert 3 == verify_bundle(bundle, [stack.signer.verifier()]).size
        assert 7 == verify_bundle(latest, [stack.signer.verifier()]).size

    async def test_tree_size_without_checkpoint_is_404_and_too_small_is_422(self, stack):
        """A size no checkpoint has is not found; a size not covering the entry is refused."""
        ids = [await stack.record(details={"n": n}) for n in range(3)]
        await stack.checkpointer.checkpoint("global")

        assert 404 == (await stack.get(f"/entries/{ids[0]}/proof", tree_size="2")).status_code
        response = await stack.get(f"/entries/{ids[2]}/proof", tree_size="2")
        assert 422 == response.status_code
        assert ["query.tree_size"] == [e["field"] for e in response.json()["errors"]]


class TestConsistency:
    """``GET /admin/audit/consistency``: the log only grew between two sizes."""

    async def test_proof_verifies_between_two_checkpoints(self, stack):
        """The proof links both checkpoints' roots, and their notes are returned."""
        for n in range(5):
            await stack.record(details={"n": n})
        first = await stack.checkpointer.checkpoint("global")
        for n in range(6):
            await stack.record(details={"later": n})
        second = await stack.checkpointer.checkpoint("global")

        body = (await stack.get("/consistency", log_id="global", first="5")).json()

        assert (5, 11) == (body["first"], body["second"])
        proof = [base64.b64decode(node) for node in body["proof"]]
        verify_consistency(5, 11, first.root_hash, second.root_hash, proof)
        verifiers = [stack.signer.verifier()]
        assert first == parse_checkpoint(body["first_checkpoint"], verifiers)
        assert second == parse_checkpoint(body["second_checkpoint"], verifiers)

    async def test_sizes_without_checkpoints_have_no_notes(self, stack):
        """Any two sizes of the log get a proof; notes are null where none was signed."""
        for n in range(4):
            await stack.record(details={"n": n})

        body = (await stack.get("/consistency", first="2", second="3")).json()

        assert "global" == body["log_id"]
        assert (None, None) == (body["first_checkpoint"], body["second_checkpoint"])

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"first": "0", "second": "2"}, "query.first"),
            ({"first": "3", "second": "2"}, "query.first"),
            ({"first": "1", "second": "9"}, "query.second"),
            ({"second": "2"}, "query.first"),
            ({"log_id": "tenant/acme", "first": "1", "second": "2"}, "query.log_id"),
        ],
    )
    async def test_bad_sizes_are_422(self, stack, params, field):
        """Sizes outside ``0 < first <= second <= size`` and bad log ids are refused."""
        for n in range(4):
            await stack.record(details={"n": n})

        response = await stack.get("/consistency", **params)

        assert 422 == response.status_code
        assert [field] == [error["field"] for error in response.json()["errors"]]


class TestCheckpoints:
    """``GET`` and ``POST /admin/audit/checkpoints``."""

    async def test_post_signs_and_get_returns_the_latest(self, stack):
        """An on-demand checkpoint is recorded as ``audit.checkpoint`` and served by GET."""
        for n in range(3):
            await stack.record(details={"n": n})

        made = await stack.client.post("/admin/audit/checkpoints", headers=OPERATOR)
        latest = (await stack.get("/checkpoints")).json()

        (checkpoint,) = made.json()["checkpoints"]
        assert ("global", 3) == (checkpoint["log_id"], checkpoint["tree_size"])
        assert checkpoint == latest
        parsed = parse_checkpoint(latest["note"], [stack.signer.verifier()])
        assert base64.b64decode(latest["root_hash"]) == parsed.root_hash
        (recorded,) = (await stack.get("", action="audit.checkpoint")).json()["items"]
        assert {"log_id": "global", "tree_size": 3} == recorded["details"]

    async def test_no_checkpoint_is_404(self, stack):
        """A log never signed has no latest checkpoint."""
        assert 404 == (await stack.get("/checkpoints")).status_code

    async def test_post_for_an_unknown_log_is_404(self, stack):
        """Checkpointing a log with no entries is not found."""
        response = await stack.client.post(
            "/admin/audit/checkpoints", params={"log_id": "system"}, headers=OPERATOR
        )

        assert 404 == response.status_code
