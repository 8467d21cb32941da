"""``bastion migrate lint``: revisions that would lock a large PostgreSQL table or break readers.

A verb of the ``migrate`` group, in a module of its own: it loads the app for
its trees like the other verbs, and calls :func:`bastion.data.lint_tree` on
each. Nothing connects to a database: each revision is rendered offline.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from bastion.cli.migrate import AppOption, JsonOption, _console, _echo_json, _run, migrate_app
from bastion.data import LintFinding, Migrator, lint_tree

__all__ = ["lint"]


@migrate_app.command()
def lint(
    tree: Annotated[
        str | None, typer.Option("--tree", help="Only this tree (bastion, app...).")
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore", metavar="RULE", help="Leave this rule out; repeat for several rules."
        ),
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Flag revisions that would lock a large PostgreSQL table or break the running version.

    Every revision is rendered offline with the PostgreSQL dialect, whatever the
    configured database; nothing connects. Exits 0 when clean, 1 with findings
    (so CI can gate on it), 2 on a configuration error. A revision silences a
    rule for itself with ``lint_ignore = ["rule-id"]``.
    """

    async def run(migrator: Migrator) -> list[LintFinding]:
        # The pool _run opens is never used: lint_tree reads files only.
        trees = [migrator.tree(tree)] if tree is not None else migrator.trees
        return [finding for t in trees for finding in lint_tree(t, ignore=ignore or ())]

    findings = _run(spec, run)
    if as_json:
        _echo_json(
            {
                "clean": not findings,
                "findings": [dataclasses.asdict(finding) for finding in findings],
            }
        )
    else:
        _print_findings(findings)
    if findings:
        raise typer.Exit(1)


def _print_findings(findings: list[LintFinding]) -> None:
    console = _console()
    if not findings:
        console.print("No findings.")
        return
    table = Table("Tree", "Revision", "Rule", "Statement", "Safer form")
    for finding in findings:
        table.add_row(
            finding.tree, finding.revision, finding.rule, finding.statement, finding.safer
        )
    console.print(table)
    console.print(
        f"{len(findings)} finding(s). `--json` says why each is dangerous; silence a rule "
        'for one revision with lint_ignore = ["rule-id"] in it, or for all with --ignore.'
    )
