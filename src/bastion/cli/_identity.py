"""What the identity commands share: loading the app's identity, running, printing."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer

from bastion.audit import Actor, ActorType
from bastion.cli._app import fail, load_runtime
from bastion.errors import BastionError, ConfigurationError, InvalidInput
from bastion.observability import configure_logging
from bastion.settings import load_settings

if TYPE_CHECKING:
    from bastion.identity._runtime import Identity

__all__ = [
    "CLI_ACTOR",
    "AppOption",
    "JsonOption",
    "echo_record",
    "run_database_command",
    "run_with_identity",
]

CLI_ACTOR: Final = Actor(ActorType.SYSTEM, "cli")
"""Who the audit trail (and the flag history) says acted when an operator ran a command."""

T = TypeVar("T")

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="The app (or app factory) whose identity settings to use; default: server.app.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a line.")]


def run_with_identity(spec: str | None, action: Callable[[Identity], Awaitable[T]]) -> T:
    """Load the app, run ``action`` with its identity component, and close its pools.

    Raises:
        typer.Exit: 2 when the app cannot be loaded or has no identity; 1 when
            ``action`` refuses (its error's detail, and each field error, on stderr).
    """
    try:
        runtime = load_runtime(spec or load_settings().server.app)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    if runtime.settings.logging.enabled:
        configure_logging(runtime.settings.logging, stream=sys.stderr.buffer)
    identity = runtime.identity
    if identity is None:
        raise fail("identity is off for this app (identity.enabled or database.enabled is false)")

    async def call() -> T:
        try:
            return await action(identity)
        finally:
            await identity.hasher.aclose()
            await identity.database.aclose()

    return run_database_command(call)


def run_database_command(
    call: Callable[[], Coroutine[Any, Any, T]],
    *,
    refused: tuple[type[Exception], ...] = (),
) -> T:
    """Run a command's coroutine; turn what it raises into one line on stderr and an exit.

    Args:
        call: the command's work.
        refused: further exceptions that mean the command was refused (exit 1 with
            their message), such as an unreadable file.

    Raises:
        typer.Exit: 1 when the command is refused (the error's detail, and each field
            error); 2 for a configuration problem or a database that is unusable.
    """
    try:
        return asyncio.run(call())
    except InvalidInput as exc:
        details = "; ".join(f"{error.field}: {error.message}" for error in exc.errors)
        raise fail(f"{exc.detail} {details}".strip(), 1) from None
    except BastionError as exc:
        raise fail(exc.detail, 1) from None
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    except refused as exc:
        raise fail(f"{type(exc).__name__}: {exc}", 1) from None
    except Exception as exc:  # noqa: BLE001 -- a missing table or a database that is down
        raise fail(
            f"{type(exc).__name__}: is the database migrated (bastion migrate upgrade)?"
        ) from None


def echo_record(record: dict[str, Any], *, as_json: bool, text: str) -> None:
    """Print ``record`` as JSON, or ``text`` for people."""
    typer.echo(json.dumps(record) if as_json else text)
