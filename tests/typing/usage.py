"""The advertised usage of bastion, type-checked by ``make lint`` (mypy --strict).

Nothing here runs under pytest: it is checked, not executed. A change that breaks
a user's type-checked code shows up here as a mypy error.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, assert_type

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette

import bastion
from bastion.context import RequestContext
from bastion.data import Database, run_transaction, transaction
from bastion.errors import (
    PROBLEM_CONTENT_TYPE,
    BastionError,
    ConfigurationError,
    ErrorCode,
    FieldError,
    InvalidInput,
    NotFound,
    problem_responses,
)
from bastion.lifecycle import Lifecycle, Phase
from bastion.observability import HealthRegistry
from bastion.settings import Settings, load_settings
from bastion.testing import QueryCounter, count_queries, lifespan_client


def install_on_fastapi() -> FastAPI:
    app = FastAPI()
    runtime = bastion.install(app, logging={"level": "DEBUG"}, health={"check_timeout": 0.5})
    assert_type(runtime, bastion.Bastion)
    assert_type(runtime.settings, Settings)
    assert_type(runtime.lifecycle, Lifecycle)
    assert_type(runtime.health, HealthRegistry)
    assert_type(runtime.database, Database | None)
    return app


def install_on_starlette() -> Starlette:
    app = Starlette()
    bastion.install(app, settings=load_settings(database={"url": "sqlite+aiosqlite:///app.db"}))
    return app


def factory() -> Starlette:
    return bastion.create_app(health={"check_timeout": timedelta(milliseconds=500)})


def settings_tree() -> None:
    settings = bastion.Settings()
    assert_type(settings.database.pool_size, int)
    assert_type(settings.health.check_timeout, float)
    assert_type(settings.migration_mode, Literal["auto", "check", "off"])
    url: str = settings.database.url.get_secret_value()
    show: dict[str, object] = settings.redacted()
    del url, show


async def register_checks_and_hooks(runtime: bastion.Bastion) -> None:
    async def ping_search() -> None:
        return None

    async def open_pool() -> None:
        return None

    runtime.health.register("search", ping_search, critical=False, timeout=0.2)
    runtime.lifecycle.on_startup("open pool", open_pool, priority=10)
    runtime.lifecycle.on_shutdown("close pool", open_pool, priority=10)
    healthy, report = await runtime.health.run()
    assert_type(healthy, bool)
    assert runtime.lifecycle.phase is Phase.READY or report


def read_context() -> str | None:
    context = bastion.current_context()
    assert_type(context, RequestContext | None)
    if context is None:
        return None
    assert_type(context.request_id, str)
    return context.tenant_id


def raise_errors(document_id: str) -> None:
    if not document_id:
        raise InvalidInput(errors=[FieldError("path.id", "missing", "An id is required.")])
    if document_id == "gone":
        raise BastionError("Gone for good.", code=ErrorCode.VERSION_SUNSET, headers={"Sunset": "x"})
    raise NotFound(f"No document {document_id}.")


def describe_errors() -> None:
    app = FastAPI()

    @app.get("/v1/documents/{document_id}", responses=problem_responses(ErrorCode.NOT_FOUND))
    async def read(document_id: str) -> dict[str, str]:
        raise_errors(document_id)
        return {"id": document_id}

    code: ErrorCode = ErrorCode.NOT_FOUND
    status: int = code.status
    title: str = code.title
    assert PROBLEM_CONTENT_TYPE.endswith("+json")
    assert status
    assert title
    del read


async def use_database(database: Database) -> None:
    async with database.session() as session:
        assert_type(session, AsyncSession)
        await session.execute(text("SELECT 1"))
    await database.ping()
    await database.aclose()


async def use_test_client(app: FastAPI) -> int:
    async with lifespan_client(app) as client:
        response = await client.get("/health/live")
    return response.status_code


def configuration_error() -> str:
    try:
        load_settings(database={"pool_size": 0})
    except ConfigurationError as exc:
        return str(exc)
    return ""


async def transactions(database: Database) -> int:
    async with transaction("SERIALIZABLE", database=database) as session:
        assert_type(session, AsyncSession)

    async def transfer(session: AsyncSession, amount: int) -> int:
        await session.execute(text("SELECT 1"))
        return amount

    moved = await run_transaction(transfer, 5, isolation="SERIALIZABLE", attempts=5)
    assert_type(moved, int)
    return moved


def queries_counted(database: Database) -> int:
    with count_queries(database) as queries:
        pass
    assert_type(queries, QueryCounter)
    return queries.count
