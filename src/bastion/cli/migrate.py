"""``bastion migrate``: status, upgrade, downgrade, history and verify of the migration trees.

Each verb loads the app (so its trees and settings are the app's own), calls one
method of :class:`bastion.data.Migrator`, and prints: a table for people, JSON
with ``--json``. Logs go to standard error, so standard output carries only
the table, the JSON or the SQL. Exit status: 0 done, 1 the answer is "no"
(pending revisions, modified revisions), 2 a configuration or database error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bastion._stack import Bastion
from bastion.audit._build import record_migration_run
from bastion.cli import app
from bastion.cli._app import fail, load_runtime
from bastion.data import (
    AppliedRevision,
    HistoryRecord,
    Migrator,
    RevisionCheck,
    RevisionInfo,
    TreeStatus,
    VerificationReport,
)
from bastion.errors import ConfigurationError
from bastion.observability import configure_logging
from bastion.settings import load_settings

__all__ = ["migrate_app"]

migrate_app = typer.Typer(
    name="migrate",
    help="Inspect and run the schema migrations of bastion and of the app.",
    no_args_is_help=True,
)
app.add_typer(migrate_app, name="migrate")

T = TypeVar("T")

_PIPE_WIDTH = 240

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="The app (or app factory) whose trees to use; default: server.app.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SqlOption = Annotated[
    bool,
    typer.Option("--sql", help="Print the SQL instead of running it; the database is only read."),
]
AllowDestructiveOption = Annotated[
    bool,
    typer.Option(
        "--allow-destructive",
        help="Consent to revisions that drop or rename tables or columns, for this run.",
    ),
]


@migrate_app.command()
def status(spec: AppOption = None, as_json: JsonOption = False) -> None:
    """Show each tree's current revision, head and pending revisions.

    Exits 0 when every tree is at its head, 1 when revisions are pending (so a
    deploy script can gate on it), 2 on a configuration or database error.
    """
    statuses = _run(spec, lambda migrator: migrator.status())
    pending = [revision for tree in statuses for revision in tree.pending]
    if as_json:
        _echo_json(
            {
                "up_to_date": not pending,
                "trees": [_status_json(tree) for tree in statuses],
            }
        )
    else:
        _print_status(statuses, len(pending))
    if pending:
        raise typer.Exit(1)


@migrate_app.command()
def upgrade(
    revision: Annotated[
        str,
        typer.Argument(
            metavar="REVISION", help="head, heads, or a revision id (with --tree for +1 and such)."
        ),
    ] = "head",
    *,
    tree: Annotated[
        str | None, typer.Option("--tree", help="Only this tree (bastion, app...).")
    ] = None,
    sql: SqlOption = False,
    allow_destructive: AllowDestructiveOption = False,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Apply pending revisions: bastion's tree first, then the app's.

    Holds the database's migration lock for the whole run: a second upgrade
    started meanwhile waits (up to migrations.lock_timeout), then finds nothing
    to do. Refuses to run when an applied revision was modified (see verify).
    """
    if sql:
        text = _run(spec, lambda migrator: migrator.sql(revision, tree=tree))
        _print_sql(text, as_json=as_json)
        return
    applied = _run(
        spec,
        lambda migrator: migrator.upgrade(
            revision, tree=tree, allow_destructive=_consent(allow_destructive)
        ),
        tool="bastion migrate upgrade",
        audited=True,
    )
    _print_applied(applied, as_json=as_json, nothing="Nothing to apply: every tree is up to date.")


# Relative targets such as -1 look like options to click; with unknown options
# left as arguments, `bastion migrate downgrade app -1` works without a `--`.
@migrate_app.command(context_settings={"ignore_unknown_options": True})
def downgrade(
    tree: Annotated[
        str, typer.Argument(metavar="TREE", help="The tree to downgrade (bastion, app...).")
    ],
    revision: Annotated[
        str, typer.Argument(metavar="REVISION", help="The revision to end at, base, or -1.")
    ],
    *,
    sql: SqlOption = False,
    allow_destructive: AllowDestructiveOption = False,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revert one tree to an earlier revision (a downgrade that drops needs --allow-destructive)."""
    if sql:
        text = _run(spec, lambda migrator: migrator.sql(revision, tree=tree, downgrade=True))
        _print_sql(text, as_json=as_json)
        return
    applied = _run(
        spec,
        lambda migrator: migrator.downgrade(
            tree, revision, allow_destructive=_consent(allow_destructive)
        ),
        tool="bastion migrate downgrade",
        audited=True,
    )
    _print_applied(applied, as_json=as_json, nothing="Nothing to revert.")


@migrate_app.command()
def history(
    tree: Annotated[
        str | None,
        typer.Argument(
            metavar="TREE", help="Only this tree; default: every tree.", show_default=False
        ),
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """List revisions, oldest first: when, by whom and how fast each was applied, and its checksum.

    Checksum: ok (the file is as applied), modified (edited since), unrecorded
    (applied with no history row), pending (not applied).
    """

    async def read(migrator: Migrator) -> tuple[list[tuple[str, list[RevisionInfo]]], Checks]:
        names = [tree] if tree is not None else [t.name for t in migrator.trees]
        report = await migrator.verify(tree=tree)
        return [(name, migrator.history(name)) for name in names], _by_name(report)

    trees, checks = _run(spec, read)
    if as_json:
        _echo_json(
            {
                "revisions": [
                    {
                        "tree": name,
                        **dataclasses.asdict(revision),
                        **_applied_json(checks.get((name, revision.id))),
                    }
                    for name, revisions in trees
                    for revision in revisions
                ]
            }
        )
        return
    table = Table(
        "Tree", "Revision", "Revises", "Message", "Applied at", "By", "Tool", "ms", "Checksum"
    )
    for name, revisions in trees:
        for revision in revisions:
            label = f"{revision.id} (head)" if revision.is_head else revision.id
            check = checks.get((name, revision.id))
            record = check.record if check else None
            table.add_row(
                name,
                label,
                _joined(revision.down_revision, "base"),
                revision.message,
                *_record_cells(record),
                check.state if check else "pending",
            )
    _console().print(table)


@migrate_app.command()
def verify(
    accept: Annotated[
        list[str] | None,
        typer.Option(
            "--accept",
            metavar="[TREE:]REVISION",
            help="Record the current checksum of this edited revision after review (repeatable).",
            show_default=False,
        ),
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check that no applied revision file changed since it was applied.

    Exits 1 naming each modified revision, 0 otherwise (unrecorded revisions,
    applied with no history row, are listed but do not fail), 2 on a
    configuration or database error. --accept REV records the file's current
    checksum after the edit was reviewed, then verifies.
    """
    accepted_names = accept or []

    async def check(migrator: Migrator) -> tuple[list[HistoryRecord], VerificationReport]:
        accepted: list[HistoryRecord] = []
        for tree_name, revisions in _accept_targets(migrator, accepted_names).items():
            accepted += await migrator.accept(tree_name, revisions)
        return accepted, await migrator.verify()

    accepted, report = _run(spec, check, tool="bastion migrate verify --accept")
    if as_json:
        _echo_json(
            {
                "ok": report.ok,
                "accepted": [_record_json(record) for record in accepted],
                "revisions": [_check_json(check) for check in report.checks],
            }
        )
    else:
        _print_verification(report, accepted)
    if not report.ok:
        raise typer.Exit(1)


def _run(
    spec: str | None,
    action: Callable[[Migrator], Awaitable[T]],
    *,
    tool: str | None = None,
    audited: bool = False,
) -> T:
    """Load the app, run ``action`` on its migrator, and close the pool it opened.

    ``tool`` is what the migration history records as having made the change.
    With ``audited``, the revisions ``action`` returned are recorded in the app's
    audit trail (``admin.migration.apply``) before the pool closes.
    """
    try:
        runtime = load_runtime(spec or load_settings().server.app)
        if runtime.settings.logging.enabled:
            configure_logging(runtime.settings.logging, stream=sys.stderr.buffer)
        migrator = _migrator_of(runtime)
        if tool is not None:
            migrator.tool = tool

        async def call() -> T:
            try:
                result = await action(migrator)
                if audited and runtime.audit is not None and isinstance(result, list):
                    await record_migration_run(runtime.audit, result, tool=migrator.tool)
                return result
            finally:
                await migrator.database.aclose()

        return asyncio.run(call())
    except ConfigurationError as exc:
        raise fail(str(exc)) from None


def _migrator_of(runtime: Bastion) -> Migrator:
    if runtime.migrator is None:
        raise ConfigurationError(
            "migrations are off for this app (database.enabled or migrations.enabled is false)"
        )
    return runtime.migrator


def _consent(flag: bool) -> bool | None:
    # Without the flag, the migrator's own setting (migrations.allow_destructive) stands.
    return True if flag else None


Checks = dict[tuple[str, str], RevisionCheck]


def _by_name(report: VerificationReport) -> Checks:
    return {(check.tree, check.revision): check for check in report.checks}


def _accept_targets(migrator: Migrator, names: list[str]) -> dict[str, list[str]]:
    """Group ``[TREE:]REVISION`` arguments by tree; a bare revision names the tree holding it."""
    targets: dict[str, list[str]] = {}
    for name in names:
        tree, separator, revision = name.rpartition(":")
        owner = migrator.tree(tree).name if separator else migrator.tree_of(revision).name
        targets.setdefault(owner, []).append(revision)
    return targets


def _console() -> Console:
    # Created per call: standard output may have been replaced since import (tests,
    # pipes). Off a terminal the width is unknown; rich would assume 80 columns and
    # fold revision ids, which scripts then cannot grep.
    console = Console()
    return console if console.is_terminal else Console(width=_PIPE_WIDTH)


def _echo_json(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(payload, indent=2))


def _joined(values: Sequence[str], empty: str) -> str:
    return ", ".join(values) if values else empty


def _status_json(tree: TreeStatus) -> dict[str, Any]:
    return {**dataclasses.asdict(tree), "up_to_date": tree.up_to_date}


def _print_status(statuses: list[TreeStatus], pending: int) -> None:
    table = Table("Tree", "Version table", "Current", "Head", "Pending")
    for tree in statuses:
        table.add_row(
            tree.name,
            tree.version_table,
            _joined(tree.current, "(none)"),
            _joined(tree.heads, "(none)"),
            _joined(tree.pending, "-"),
        )
    console = _console()
    console.print(table)
    if pending:
        console.print(f"{pending} revision(s) pending: run `bastion migrate upgrade`.")
    else:
        console.print("Up to date.")


def _print_applied(applied: list[AppliedRevision], *, as_json: bool, nothing: str) -> None:
    if as_json:
        _echo_json({"applied": [dataclasses.asdict(step) for step in applied]})
        return
    console = _console()
    if not applied:
        console.print(nothing)
        return
    table = Table("Tree", "Revision", "Direction", "Duration (ms)")
    for step in applied:
        table.add_row(step.tree, step.revision, step.direction, f"{step.duration_ms:.1f}")
    console.print(table)


def _record_cells(record: HistoryRecord | None) -> tuple[str, str, str, str]:
    if record is None:
        return ("-", "-", "-", "-")
    return (
        record.applied_at.isoformat(timespec="seconds"),
        record.applied_by,
        record.tool,
        f"{record.duration_ms:.1f}",
    )


def _record_json(record: HistoryRecord) -> dict[str, Any]:
    return {**dataclasses.asdict(record), "applied_at": record.applied_at.isoformat()}


def _applied_json(check: RevisionCheck | None) -> dict[str, Any]:
    record = check.record if check else None
    return {
        "state": check.state if check else "pending",
        "checksum": check.checksum if check else None,
        "applied": _record_json(record) if record else None,
    }


def _check_json(check: RevisionCheck) -> dict[str, Any]:
    return {
        "tree": check.tree,
        "revision": check.revision,
        "state": check.state,
        "checksum": check.checksum,
        "recorded_checksum": check.record.checksum if check.record else None,
    }


def _print_verification(report: VerificationReport, accepted: list[HistoryRecord]) -> None:
    console = _console()
    for record in accepted:
        console.print(f"Accepted the current checksum of {record.tree}:{record.revision}.")
    table = Table("Tree", "Revision", "State")
    for check in report.checks:
        table.add_row(check.tree, check.revision, check.state)
    console.print(table)
    if report.modified:
        names = ", ".join(check.name for check in report.modified)
        console.print(
            f"Modified since applied: {names}. Restore the file and write a new revision, "
            "or review the edit and run `bastion migrate verify --accept REVISION`."
        )
    if report.unrecorded:
        console.print(
            f"{len(report.unrecorded)} revision(s) applied with no history row "
            "(before checksums were kept, or by a tool that bypassed env.py); "
            "`--accept` records their current checksum."
        )
    if report.ok:
        console.print("No applied revision was modified.")


def _print_sql(text: str, *, as_json: bool) -> None:
    if as_json:
        _echo_json({"sql": text})
    else:
        typer.echo(text, nl=False)
