"""``bastion secrets``: are the effective secrets fit for use? Values are never printed."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from bastion._secrets import SecretProblem, check_secrets
from bastion.cli import app
from bastion.cli._app import fail
from bastion.errors import ConfigurationError
from bastion.settings import load_settings

__all__ = ["check", "secrets_app"]

secrets_app = typer.Typer(
    name="secrets", help="Check the secrets of the effective configuration.", no_args_is_help=True
)
app.add_typer(secrets_app)


@secrets_app.command()
def check(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Check every secret from every source (environment, files, OpenBao).

    A secret fails when it is required and missing (production), a known
    placeholder, too weak for its use, or malformed. One line per problem, naming
    the variable, never the value.

    Exit status: 0 when every secret is fit, 1 on any problem (a weak value is a
    problem here even in development, where start-up only warns), 2 when the
    configuration cannot be loaded (an unreachable OpenBao, say).
    """
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    problems = check_secrets(settings)
    if as_json:
        document = {
            "environment": settings.environment,
            "ok": not problems,
            "problems": [problem.as_dict() for problem in problems],
        }
        typer.echo(json.dumps(document, indent=2))
    else:
        _print(problems, settings.environment)
    raise typer.Exit(1 if problems else 0)


def _print(problems: list[SecretProblem], environment: str) -> None:
    # highlight=False: rich would colour numbers inside the message at random.
    console = Console(highlight=False, soft_wrap=True)
    if not problems:
        console.print(f"[green]ok[/green] every secret is fit for {environment}")
        return
    for problem in problems:
        label = "[bold red]error[/bold red]" if problem.fatal else "[yellow]warning[/yellow]"
        console.print(f"{label} {problem.problem}: {problem.message}", markup=True)
