"""The app around the routes: OpenAPI, error envelope, settings, schema and start-up."""

from __future__ import annotations

import json
import uuid
from datetime import UTC

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from bastion._routes import route_entries
from bastion.errors import ConfigurationError
from bastion_docs.app import create_app
from bastion_docs.models import Document, metadata

PROBLEM = "application/problem+json"

# Every code each operation can answer with. INTERNAL (500), SERVICE_UNAVAILABLE (503),
# REQUEST_TIMEOUT (504) and the request guards' codes are bastion's additions to every
# operation: URI_TOO_LONG (414), HEADERS_TOO_LARGE (431), PAYLOAD_TOO_LARGE (413) and
# UNSUPPORTED_MEDIA_TYPE (415) (a body is checked even where none is declared), and
# INVALID_INPUT / INPUT_TOO_LONG (422, malformed or oversized input).
EVERY = {
    "UNAUTHENTICATED",
    "FORBIDDEN",
    "INVALID_INPUT",
    "INPUT_TOO_LONG",
    "INTERNAL",
    "SERVICE_UNAVAILABLE",
    "REQUEST_TIMEOUT",
    "URI_TOO_LONG",
    "HEADERS_TOO_LARGE",
    "PAYLOAD_TOO_LARGE",
    "UNSUPPORTED_MEDIA_TYPE",
}
PRECONDITIONS = {"PRECONDITION_REQUIRED", "PRECONDITION_FAILED"}
EXPECTED_CODES = {
    ("post", "/v1/assistant/ask"): EVERY | {"PROMPT_INJECTION_DETECTED"},
    # Idempotency-Key: a retry while the first runs (409), the key with another body (422).
    ("post", "/v1/documents"): EVERY | {"CONFLICT", "IDEMPOTENCY_KEY_REUSED"},
    ("get", "/v1/documents"): EVERY,
    ("get", "/v1/documents/{document_id}"): EVERY | {"NOT_FOUND"},
    ("patch", "/v1/documents/{document_id}"): EVERY | PRECONDITIONS | {"NOT_FOUND"},
    ("delete", "/v1/documents/{document_id}"): EVERY | PRECONDITIONS | {"NOT_FOUND"},
}


def service_operations(app) -> set[tuple[str, str]]:
    """``(method, path)`` of the service's own routes (bastion's identity routes are not)."""
    return {
        (method.lower(), entry.template)
        for entry in route_entries(app.router.routes)
        if getattr(entry.endpoint, "__module__", "").startswith("bastion_docs.")
        for method in entry.methods or ()
    }


class TestOpenApi:
    async def test_every_operation_lists_its_error_codes(self, app, client):
        """Each of the service's operations declares, under x-error-codes, every code it returns."""
        document = (await client.get("/api/openapi.json")).json()
        actual = {
            (method, path): {
                code
                for response in operation["responses"].values()
                for code in response.get("x-error-codes", [])
            }
            for path, item in document["paths"].items()
            for method, operation in item.items()
            if (method, path) in service_operations(app)
        }
        # Every operation is rate limited by the service's default policy.
        assert {key: {*codes, "RATE_LIMITED"} for key, codes in EXPECTED_CODES.items()} == actual

    async def test_error_responses_are_problem_documents(self, client):
        """Every declared 4xx/5xx response of /v1 is application/problem+json."""
        document = (await client.get("/api/openapi.json")).json()
        media = {
            media_type
            for path, item in document["paths"].items()
            if path.startswith("/v1/")
            for operation in item.values()
            for status, response in operation["responses"].items()
            if status >= "400"
            for media_type in response["content"]
        }
        assert {PROBLEM} == media

    async def test_the_document_describes_real_authentication(self, client):
        """The description explains bearer tokens and API keys; no stand-in header is left."""
        document = (await client.get("/api/openapi.json")).json()
        description = document["info"]["description"]
        assert "Authorization: Bearer" in description
        assert "documents:write" in description
        assert "x-debug-user" not in json.dumps(document).lower()
        assert "Bastion Docs" == document["info"]["title"]

    async def test_swagger_ui_is_served_and_redoc_is_off(self, client):
        """Swagger UI lives at /api/docs; there is no ReDoc page."""
        docs = await client.get("/api/docs")
        redoc = await client.get("/redoc")
        assert (200, True) == (docs.status_code, "/api/openapi.json" in docs.text)
        assert 404 == redoc.status_code


class TestErrorEnvelope:
    async def test_unknown_path_is_problem_with_correlation_id(self, client):
        """GET /nope is 404 problem+json whose correlation_id is the X-Request-Id header."""
        response = await client.get("/nope")
        body = response.json()
        assert (404, PROBLEM, "NOT_FOUND") == (
            response.status_code,
            response.headers["content-type"],
            body["code"],
        )
        assert response.headers["x-request-id"] == body["correlation_id"]

    async def test_inbound_request_id_is_the_correlation_id(self, client):
        """A valid inbound X-Request-Id is echoed and used in the error body."""
        response = await client.get("/v1/documents", headers={"X-Request-Id": "req-42.a:b"})
        assert ("req-42.a:b", "req-42.a:b") == (
            response.headers["x-request-id"],
            response.json()["correlation_id"],
        )

    async def test_wrong_method_is_problem(self, client):
        """PUT on a document is 405 problem+json, not a bare framework answer."""
        response = await client.put("/v1/documents/x", json={})
        assert (405, PROBLEM, "METHOD_NOT_ALLOWED") == (
            response.status_code,
            response.headers["content-type"],
            response.json()["code"],
        )


class TestCreateApp:
    def test_migrations_override_is_merged_not_replaced(self, sqlite_url):
        """A caller's migrations settings keep the service's tree beside them."""
        app = create_app(database={"url": sqlite_url}, migrations={"mode": "check"})
        migrations = app.state.bastion.settings.migrations
        assert ("bastion_docs:migrations", "check") == (migrations.app_tree, migrations.mode)

    def test_settings_tree_gets_the_service_tree(self, sqlite_url):
        """A whole settings tree passed in gains the service's migrations."""
        import bastion

        settings = bastion.Settings(database={"url": sqlite_url}, migrations={"mode": "off"})
        app = create_app(settings=settings)
        migrations = app.state.bastion.settings.migrations
        assert ("bastion_docs:migrations", "off") == (migrations.app_tree, migrations.mode)

    def test_database_is_required(self, sqlite_url):
        """The service refuses to start without the shared database."""
        with pytest.raises(ConfigurationError, match="database"):
            create_app(database={"url": sqlite_url, "enabled": False})

    def test_identity_is_required(self, sqlite_url):
        """The service refuses to start without the identity component."""
        with pytest.raises(ConfigurationError, match="identity"):
            create_app(database={"url": sqlite_url}, identity={"enabled": False})


class TestSchema:
    async def test_migrations_match_the_models(self, app, client):
        """After start-up migrations the database has exactly the models' tables."""
        database = app.state.bastion.database

        def only_the_services_tables(name, type_, parent_names):
            # Bastion's own tables and the version tables are not the service's business.
            return type_ != "table" or name in metadata.tables

        def differences(connection):
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_name": only_the_services_tables,
                },
            )
            return compare_metadata(context, metadata)

        async with database.engine.connect() as connection:
            assert [] == await connection.run_sync(differences)

    async def test_downgrade_and_upgrade_round_trip(self, app, client):
        """The tree reverts to an empty schema and comes back to the models' tables."""
        migrator = app.state.bastion.migrator
        engine = app.state.bastion.database.engine

        async def service_tables():
            async with engine.connect() as connection:
                names = await connection.run_sync(lambda c: inspect(c).get_table_names())
            return sorted(set(names) & set(metadata.tables))

        reverted = await migrator.downgrade("app", "base", allow_destructive=True)
        assert (["0004", "0003", "0002", "0001"], []) == (
            [r.revision for r in reverted],
            await service_tables(),
        )
        reapplied = await migrator.upgrade()
        assert (["0001", "0002", "0003", "0004"], ["documents"]) == (
            [r.revision for r in reapplied],
            await service_tables(),
        )

    async def test_timestamps_read_back_aware_in_utc(self, app, new_workspace, create_document):
        """Stored timestamps come back timezone-aware in UTC, on SQLite as on PostgreSQL."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        key = uuid.UUID(created["id"])
        async with app.state.bastion.database.session() as session:
            document = await session.scalar(select(Document).where(Document.id == key))
        assert (UTC, UTC) == (document.created_at.tzinfo, document.updated_at.tzinfo)
