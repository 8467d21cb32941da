"""Append-only guards: the grants and triggers that keep the database from changing audit rows.

The guards are SQL, kept in resource files beside this module
(``sql/guards.postgresql.sql``, ``sql/guards.sqlite.sql``; statements end with a
line holding only ``;``, so psql runs them as they are). What they do:

- PostgreSQL: ``UPDATE``, ``DELETE`` and ``TRUNCATE`` on every table of
  :data:`~bastion.audit._tables.APPEND_ONLY_TABLES` are revoked from ``PUBLIC``
  and from the owner that runs the migration, and a statement-level trigger on
  each table raises (SQLSTATE :data:`GUARD_SQLSTATE`) even for a superuser, whom
  grants do not stop. The one exception is pruning: ``DELETE`` on the entries by
  a *direct* member of :data:`MAINTENANCE_ROLE` (``pg_auth_members``, so a
  superuser's bypass does not count) whose transaction ran
  ``SET LOCAL bastion.audit_prune = 'on'``; a row trigger then refuses any entry
  whose leaf hash is not already in ``bastion_audit_pruned`` under a segment
  (``bastion_audit_segments``) of its log whose ``[first_seq, last_seq]`` covers
  it, so a pruned leaf always survives its entry, named by a segment.
  ``INSERT .. ON CONFLICT DO UPDATE`` and ``MERGE`` fire the same statement
  triggers, so they are refused as well.
- SQLite: triggers ``RAISE(ABORT)`` on every ``UPDATE`` and ``DELETE``, and
  ``RAISE(FAIL)`` on an ``INSERT`` whose primary key, unique column or rowid is
  taken (``INSERT OR REPLACE`` deletes the row it replaces without firing
  ``DELETE`` triggers; FAIL keeps an ``INSERT OR FAIL`` free of a statement
  journal); an entry may be deleted only while a row of
  ``bastion_audit_prune_grants`` names its log and its leaf is in
  ``bastion_audit_pruned`` under a covering segment, as on PostgreSQL.

What they do not stop: the owner may grant itself the privileges back, disable
or drop the triggers, or drop the tables; so may a superuser, and anyone who can
write a SQLite file. A PostgreSQL session whose ``session_replication_role``
is ``replica`` (a superuser's, or a role granted ``SET`` on it) fires no
trigger: :func:`check_guards` reports that setting and those grants. The guards
turn accidents and application bugs into errors; tampering by such a user is
what the Merkle tree and the checkpoints kept out of the database's reach
detect.

Migrations are frozen, so revision ``0003_audit`` does not apply these files: it
applies its own copies (``versions/0003_audit_guards.<dialect>.sql``), which a
test keeps equal to them. A change to the guards is a new resource version and a
new revision that installs it; :func:`install_guards` applies the current
version (for tables made by ``create_all``), :func:`check_guards` reports what is
missing (``bastion doctor``, readiness).
"""

from __future__ import annotations

import importlib.resources
import re
from typing import Final

from sqlalchemy import column, delete, insert, table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.audit._tables import APPEND_ONLY_TABLES

__all__ = [
    "GUARD_SQLSTATE",
    "MAINTENANCE_ROLE",
    "PRUNE_GRANTS_TABLE",
    "PRUNE_SETTING",
    "check_guards",
    "enter_prune_path",
    "guard_statements",
    "install_guards",
    "leave_prune_path",
]

GUARD_SQLSTATE: Final = "BA001"
"""SQLSTATE of the PostgreSQL guard triggers' errors."""
MAINTENANCE_ROLE: Final = "bastion_audit_maintenance"
"""The PostgreSQL role whose direct members may prune."""
PRUNE_SETTING: Final = "bastion.audit_prune"
"""The PostgreSQL setting a prune transaction sets to ``on`` (``SET LOCAL``)."""
PRUNE_GRANTS_TABLE: Final = "bastion_audit_prune_grants"
"""The SQLite table whose row for a log lets the prune path delete its entries."""

_STATEMENT_END = re.compile(r"^;[ \t]*$", re.MULTILINE)
_TRIGGER = "bastion_audit_append_only"
_PRUNED_TRIGGER = "bastion_audit_pruned_only"

_SQLITE_TRIGGERS: Final = (
    ("UPDATE", "no_update"),
    ("DELETE", "no_delete"),
    ("INSERT OR REPLACE", "no_replace"),
)
"""Each statement the SQLite guards refuse, and the suffix of its trigger's name."""
_TRIGGER_STATES: Final = {
    "D": "is disabled",
    "R": "fires only in replica mode (ENABLE REPLICA TRIGGER), not in ordinary sessions",
}
"""``pg_trigger.tgenabled`` values under which a trigger does not guard ordinary sessions."""
_PARAMETER_GRANTS: Final = (15,)
"""The first PostgreSQL version with ``GRANT SET ON PARAMETER`` (for roles not superusers)."""

_prune_grants = table(PRUNE_GRANTS_TABLE, column("log_id"))


def guard_statements(dialect: str) -> list[str]:
    """The current guard SQL of a dialect, one statement per item.

    Args:
        dialect: ``"postgresql"`` or ``"sqlite"`` (SQLAlchemy's dialect name).

    Returns:
        The statements, in the order they must run.

    Raises:
        ValueError: no guards exist for this dialect.
    """
    if dialect not in ("postgresql", "sqlite"):
        raise ValueError(f"no audit guards for the {dialect!r} dialect")
    resource = importlib.resources.files(__package__ or "bastion.audit") / "sql"
    source = (resource / f"guards.{dialect}.sql").read_text(encoding="utf-8")
    return [part.strip() for part in _STATEMENT_END.split(source) if _has_sql(part)]


def _has_sql(part: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in part.splitlines())


async def install_guards(connection: AsyncConnection) -> None:
    """Install the current guards on audit tables made without the migrations (``create_all``).

    Runs in the connection's transaction; it must be the tables' owner.

    Args:
        connection: a connection to the database holding the audit tables.
    """
    for statement in guard_statements(connection.dialect.name):
        await connection.execute(text(statement))


async def check_guards(connection: AsyncConnection) -> list[str]:
    """Report what is missing of the append-only guards.

    Args:
        connection: a connection to the database holding the audit tables.

    Returns:
        One sentence per missing or weakened guard (a trigger absent or disabled,
        a role holding ``UPDATE``, ``DELETE`` or ``TRUNCATE`` through a grant, the
        maintenance role absent; on PostgreSQL also ``session_replication_role``
        other than ``origin`` in this session or as a database or role default,
        and roles granted ``SET`` on it, since triggers do not fire in replica
        mode); empty when every guard is in place.
    """
    if connection.dialect.name == "sqlite":
        return await _check_sqlite(connection)
    return await _check_postgresql(connection)


async def _check_sqlite(connection: AsyncConnection) -> list[str]:
    rows = await connection.execute(
        text("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'trigger')")
    )
    present = {(kind, name) for kind, name in rows}
    problems = [
        f"trigger {guarded}_{suffix} is missing: {statement} on {guarded} is not refused"
        for guarded in APPEND_ONLY_TABLES
        for statement, suffix in _SQLITE_TRIGGERS
        if ("trigger", f"{guarded}_{suffix}") not in present
    ]
    if ("table", PRUNE_GRANTS_TABLE) not in present:
        problems.append(f"table {PRUNE_GRANTS_TABLE} is missing: pruning cannot run")
    return problems


async def _check_postgresql(connection: AsyncConnection) -> list[str]:
    problems: list[str] = []
    triggers = await connection.execute(
        text(
            "SELECT c.relname, t.tgname, CAST(t.tgenabled AS text) FROM pg_trigger AS t "
            "JOIN pg_class AS c ON c.oid = t.tgrelid "
            "WHERE c.oid = ANY(CAST(:tables AS regclass[])) AND NOT t.tgisinternal"
        ),
        {"tables": list(APPEND_ONLY_TABLES)},
    )
    states = {(relation, name): state for relation, name, state in triggers}
    expected = [(guarded, _TRIGGER) for guarded in APPEND_ONLY_TABLES]
    expected.append(("bastion_audit_entries", _PRUNED_TRIGGER))
    for guarded, name in expected:
        state = states.get((guarded, name))
        if state is None:
            problems.append(f"trigger {name} on {guarded} is missing")
        elif state in _TRIGGER_STATES:
            problems.append(f"trigger {name} on {guarded} {_TRIGGER_STATES[state]}")
    grants = await connection.execute(
        text(
            "SELECT c.relname, COALESCE(r.rolname, 'PUBLIC'), a.privilege_type "
            "FROM pg_class AS c "
            "CROSS JOIN LATERAL aclexplode(COALESCE(c.relacl, acldefault('r', c.relowner))) AS a "
            "LEFT JOIN pg_roles AS r ON r.oid = a.grantee "
            "WHERE c.oid = ANY(CAST(:tables AS regclass[])) "
            "AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE') "
            "ORDER BY 1, 2, 3"
        ),
        {"tables": list(APPEND_ONLY_TABLES)},
    )
    problems += [
        f"role {grantee} holds {privilege} on {guarded}"
        for guarded, grantee, privilege in grants
        if (guarded, grantee, privilege) != ("bastion_audit_entries", MAINTENANCE_ROLE, "DELETE")
    ]
    role = await connection.scalar(
        text("SELECT count(*) FROM pg_roles WHERE rolname = :role"), {"role": MAINTENANCE_ROLE}
    )
    if not role:
        problems.append(f"role {MAINTENANCE_ROLE} is missing: pruning cannot run")
    return problems + await _replication_role_problems(connection)


async def _replication_role_problems(connection: AsyncConnection) -> list[str]:
    """Where ``session_replication_role`` would let a session skip the guard triggers."""
    problems: list[str] = []
    replication = await connection.execute(
        text("SELECT setting, reset_val FROM pg_settings WHERE name = 'session_replication_role'")
    )
    setting, default = replication.one()
    if setting != "origin":
        problems.append(
            f"session_replication_role is {setting!r} in this session: "
            "the guard triggers do not fire in it"
        )
    # ALTER DATABASE / ALTER ROLE .. SET defaults, for this database or every one.
    defaults = await connection.execute(
        text(
            "SELECT COALESCE(r.rolname, 'every role'), COALESCE(d.datname, 'every database'), "
            "split_part(setting, '=', 2) "
            "FROM pg_db_role_setting AS s "
            "CROSS JOIN LATERAL unnest(s.setconfig) AS setting "
            "LEFT JOIN pg_roles AS r ON r.oid = s.setrole "
            "LEFT JOIN pg_database AS d ON d.oid = s.setdatabase "
            "WHERE (d.datname IS NULL OR d.datname = current_database()) "
            "AND split_part(setting, '=', 1) = 'session_replication_role' "
            "AND split_part(setting, '=', 2) <> 'origin' "
            "ORDER BY 1, 2"
        )
    )
    scoped = [
        f"session_replication_role defaults to {value!r} for {role} in {database}: "
        "the guard triggers do not fire in those sessions"
        for role, database, value in defaults
    ]
    problems += scoped
    if default != "origin" and not scoped:
        problems.append(
            f"session_replication_role defaults to {default!r} in the server's configuration: "
            "the guard triggers do not fire"
        )
    if (connection.dialect.server_version_info or (0,)) >= _PARAMETER_GRANTS:
        grantees = await connection.execute(
            text(
                "SELECT COALESCE(r.rolname, 'PUBLIC') FROM pg_parameter_acl AS p "
                "CROSS JOIN LATERAL aclexplode(p.paracl) AS a "
                "LEFT JOIN pg_roles AS r ON r.oid = a.grantee "
                "WHERE p.parname = 'session_replication_role' AND a.privilege_type = 'SET' "
                # Superusers set it anyway; the ACL lists the bootstrap one too.
                "AND NOT COALESCE(r.rolsuper, false) "
                "ORDER BY 1"
            )
        )
        problems += [
            f"role {grantee} may SET session_replication_role: "
            "it can turn the guard triggers off in its sessions"
            for (grantee,) in grantees
        ]
    return problems


async def enter_prune_path(connection: AsyncConnection, log_id: str) -> None:
    """Open the maintenance path in the connection's transaction: its deletes of ``log_id`` pass.

    On PostgreSQL this sets :data:`PRUNE_SETTING` for the transaction only; the
    connection's role must still be a direct member of :data:`MAINTENANCE_ROLE`.
    On SQLite it inserts the log's grant row, which :func:`leave_prune_path`
    removes before the transaction commits.

    Args:
        connection: a connection in a transaction (the maintenance role's on PostgreSQL).
        log_id: the log whose entries the transaction prunes.
    """
    if connection.dialect.name == "sqlite":
        await connection.execute(insert(_prune_grants).values(log_id=log_id))
    else:
        await connection.execute(text(f"SET LOCAL {PRUNE_SETTING} = 'on'"))


async def leave_prune_path(connection: AsyncConnection, log_id: str) -> None:
    """Close what :func:`enter_prune_path` opened, before the transaction commits.

    Args:
        connection: the connection :func:`enter_prune_path` was given.
        log_id: the log it was given.
    """
    if connection.dialect.name == "sqlite":
        await connection.execute(delete(_prune_grants).where(column("log_id") == log_id))
    else:
        await connection.execute(text(f"SET LOCAL {PRUNE_SETTING} = 'off'"))
