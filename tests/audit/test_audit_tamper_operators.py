"""A table owner's own operators and search path cannot make verify() accept a changed entry."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from audit_log_support import add_checkpoints, build_log
from sqlalchemy import text, update

from bastion.audit._encoding import ENCODED_COLUMNS, encode_entry
from bastion.audit._note import NoteSigner
from bastion.audit._tables import entries
from bastion.audit._verify import verify
from bastion.data import Database

SIGNER = NoteSigner.generate("bastion")
BACKDATED = dt.timedelta(days=30)


def _encoding(row: dict[str, object]) -> bytes:
    return encode_entry([row[name] for name in ENCODED_COLUMNS])


@pytest.fixture
async def planted(database: Database) -> AsyncIterator[Database]:
    """A checkpointed log with entry 10's action and entry 12's time changed, then hidden.

    ``public.||(bytea, bytea)`` maps entry 10's forged encoding back to the
    original (through a shadow table), ``public.*(numeric, integer)`` maps entry
    12's backdated epoch back to the original, and the database's search path
    puts ``public`` first, as the owner of a database may do (CVE-2018-1058).
    """
    if database.kind.value != "postgres":
        pytest.skip("operators and search paths are PostgreSQL's")
    rows = await build_log(database, "global", 50)
    await add_checkpoints(database, SIGNER, "global", rows, [20, 50])
    forged = rows[10] | {"action": "user.delete"}
    original_time = rows[12]["occurred_at"]
    moved = original_time - BACKDATED
    async with database.engine.begin() as connection:
        await connection.execute(
            update(entries).where(entries.c.seq == 10).values(action="user.delete")
        )
        await connection.execute(
            update(entries).where(entries.c.seq == 12).values(occurred_at=moved)
        )
        await connection.execute(text("CREATE TABLE public.shadow (fake bytea, real bytea)"))
        await connection.execute(
            text("INSERT INTO public.shadow VALUES (:fake, :real)"),
            {"fake": _encoding(forged), "real": _encoding(rows[10])},
        )
        await connection.execute(
            text(
                "CREATE FUNCTION public.cat(a bytea, b bytea) RETURNS bytea LANGUAGE sql STABLE "
                "AS $$ SELECT coalesce((SELECT real FROM public.shadow "
                "WHERE fake = pg_catalog.byteacat(a, b)), pg_catalog.byteacat(a, b)) $$"
            )
        )
        await connection.execute(
            text(
                "CREATE OPERATOR public.|| "
                "(LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = public.cat)"
            )
        )
        await connection.execute(
            text(
                "CREATE FUNCTION public.mul(a numeric, b integer) RETURNS numeric "
                "LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN a = "
                f"pg_catalog.extract('epoch', timestamptz '{moved.isoformat()}') "
                f"THEN pg_catalog.numeric_mul(pg_catalog.extract('epoch', timestamptz "
                f"'{original_time.isoformat()}'), b::numeric) "
                "ELSE pg_catalog.numeric_mul(a, b::numeric) END $$"
            )
        )
        await connection.execute(
            text(
                "CREATE OPERATOR public.* "
                "(LEFTARG = numeric, RIGHTARG = integer, FUNCTION = public.mul)"
            )
        )
        await connection.execute(
            text(
                "DO $$ BEGIN EXECUTE pg_catalog.format("
                "'ALTER DATABASE %I SET search_path = public, pg_catalog', "
                "pg_catalog.current_database()); END $$"
            )
        )
    # New connections get the database's search path.
    fresh = Database(database.settings)
    try:
        yield fresh
    finally:
        await fresh.aclose()
        async with database.engine.begin() as connection:
            await connection.execute(
                text(
                    "DO $$ BEGIN EXECUTE pg_catalog.format('ALTER DATABASE %I RESET search_path', "
                    "pg_catalog.current_database()); END $$"
                )
            )
            await connection.execute(text("DROP OPERATOR public.|| (bytea, bytea)"))
            await connection.execute(text("DROP OPERATOR public.* (numeric, integer)"))
            await connection.execute(text("DROP FUNCTION public.cat(bytea, bytea)"))
            await connection.execute(text("DROP FUNCTION public.mul(numeric, integer)"))
            await connection.execute(text("DROP TABLE public.shadow"))


class TestPlantedOperators:
    async def test_the_planted_operators_are_live(self, planted):
        """The attack works on plain SQL: || and * answer with the original values."""
        async with planted.engine.connect() as connection:
            forged = (
                await connection.execute(
                    text(
                        "SELECT (SELECT fake FROM public.shadow) || '\\x'::bytea "
                        "= (SELECT real FROM public.shadow)"
                    )
                )
            ).scalar_one()
        assert forged is True

    async def test_verify_still_reports_both_changes(self, planted):
        """verify() calls pg_catalog functions only, search path pinned: both entries are found."""
        report = await verify(planted, verifiers=[SIGNER.verifier()], origin_prefix="bastion")
        found = {(problem.kind, problem.position) for problem in report.problems}
        assert {("modified", 10), ("modified", 12)} <= found
