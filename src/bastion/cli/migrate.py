"""``bastion migrate``: status, upgrade, downgrade and history of the migration trees.

Each verb loads the app (so its trees and settings are the app's own), calls one
method of :class:`bastion.data.Migrator`, and prints: a table for people, JSON
with ``--json``. Logs go to standard error, so standard output carries only
the table, the JSON or the SQL.
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
from bastion.cli import app
from bastion.cli._app import fail, load_runtime
from bastion.data import AppliedRevision, Migrator, RevisionInfo, TreeStatus
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
    tree: Annotated[
        str | None, typer.Option("--tree", help="Only this tree (bastion, app...).")
    ] = None,
    sql: SqlOption = False,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Apply pending revisions: bastion's tree first, then the app's."""
    if sql:
        text = _run(spec, lambda migrator: migrator.sql(revision, tree=tree))
        _print_sql(text, as_json=as_json)
        return
    applied = _run(spec, lambda migrator: migrator.upgrade(revision, tree=tree))
    _print_applied(applied, as_json=as_json, nothing="Nothing to apply: every tree is up to date.")


@migrate_app.command()
def downgrade(
    tree: Annotated[
        str, typer.Argument(metavar="TREE", help="The tree to downgrade (bastion, app...).")
    ],
    revision: Annotated[
        str, typer.Argument(metavar="REVISION", help="The revision to end at, base, or -1.")
    ],
    sql: SqlOption = False,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revert one tree to an earlier revision."""
    if sql:
        text = _run(spec, lambda migrator: migrator.sql(revision, tree=tree, downgrade=True))
        _print_sql(text, as_json=as_json)
        return
    applied = _run(spec, lambda migrator: migrator.downgrade(tree, revision))
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
    """List revisions, oldest first, as the script files declare them."""

    async def read(migrator: Migrator) -> list[tuple[str, list[RevisionInfo]]]:
        names = [tree] if tree is not None else [t.name for t in migrator.trees]
        return [(name, migrator.history(name)) for name in names]

    trees = _run(spec, read)
    if as_json:
        _echo_json(
            {
                "revisions": [
                    {"tree": name, **dataclasses.asdict(revision)}
                    for name, revisions in trees
                    for revision in revisions
                ]
            }
        )
        return
    table = Table("Tree", "Revision", "Revises", "Message")
    for name, revisions in trees:
        for revision in revisions:
            label = f"{revision.id} (head)" if revision.is_head else revision.id
            table.add_row(name, label, _joined(revision.down_revision, "base"), revision.message)
    _console().print(table)


def _run(spec: str | None, action: Callable[[Migrator], Awaitable[T]]) -> T:
    """Load the app, run ``action`` on its migrator, and close the pool it opened."""
    try:
        runtime = load_runtime(spec or load_settings().server.app)
        if runtime.settings.logging.enabled:
            configure_logging(runtime.settings.logging, stream=sys.stderr.buffer)
        migrator = _migrator_of(runtime)

        async def call() -> T:
            try:
                return await action(migrator)
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


def _print_sql(text: str, *, as_json: bool) -> None:
    if as_json:
        _echo_json({"sql": text})
    else:
        typer.echo(text, nl=False)
