"""``bastion doctor``: is every backend reachable, and is any setting risky?"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Final

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bastion._doctor import DEFAULT_TIMEOUT, Report, Status, diagnose
from bastion.cli import app
from bastion.cli._app import fail
from bastion.errors import ConfigurationError
from bastion.settings import load_settings

__all__ = ["doctor"]

_STYLE: Final = {
    Status.OK: "green",
    Status.NOTE: "cyan",
    Status.WARNING: "yellow",
    Status.FAILURE: "bold red",
}


@app.command()
def doctor(
    *,
    target: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:APP",
            help="The app to load and ask about migrations. [default: server.app]",
            show_default=False,
        ),
    ] = None,
    no_app: Annotated[
        bool, typer.Option("--no-app", help="Check the configuration only; import nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds each reachability check may take.")
    ] = DEFAULT_TIMEOUT,
    app_dir: Annotated[
        Path, typer.Option(help="Directory put first on the import path.", file_okay=False)
    ] = Path(),
) -> None:
    """Check every configured backend and every risky combination of settings.

    Exit status: 0 when nothing failed, 1 on a failure (an unreachable backend,
    an app that does not load) or, with --strict, on a warning; 2 when a setting
    is invalid.
    """
    _import_from(app_dir)
    try:
        settings = load_settings()
        # Importing the app configures logging onto standard output; the report
        # owns standard output, so the app's log lines go to standard error.
        with contextlib.redirect_stdout(sys.stderr):
            report = asyncio.run(diagnose(settings, app=target, load=not no_app, timeout=timeout))
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_table(report)
    raise typer.Exit(report.exit_code(strict=strict))


def _print_table(report: Report) -> None:
    table = Table(title="bastion doctor", title_justify="left", expand=False)
    table.add_column("Check", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    # Folded, never cut with an ellipsis: the end of a URL or a fix is the useful part.
    table.add_column("Detail", overflow="fold")
    for finding in report.findings:
        detail = Text(finding.detail)
        if finding.fix:
            detail.append(f"\nfix: {finding.fix}", style="bold")
        table.add_row(
            finding.check, Text(finding.status.value, style=_STYLE[finding.status]), detail
        )
    console = Console(file=sys.stdout, highlight=False)
    console.print(table)
    failures, warnings = len(report.failures), len(report.warnings)
    if failures or warnings:
        console.print(f"{_count(failures, 'failure')}, {_count(warnings, 'warning')}")
    else:
        console.print("[green]all checks passed[/]")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _import_from(directory: Path) -> None:
    # As uvicorn's --app-dir: `bastion doctor myservice:app` imports from where it runs.
    entry = str(directory.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)
