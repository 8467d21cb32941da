"""``bastion serve``: run an app under uvicorn with graceful shutdown."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import _server
from bastion._doctor import Finding
from bastion.cli import app
from bastion.cli._app import fail
from bastion.errors import ConfigurationError
from bastion.settings import load_settings

__all__ = ["serve"]


@app.command()
def serve(
    *,
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODULE:APP]",
            help="The ASGI app or a factory returning it. [default: server.app]",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to bind. [default: server.host]")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port to bind. [default: server.port]")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=512, help="Worker processes. [default: server.workers]"),
    ] = None,
    drain_delay: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds readiness reports 503 before the listener closes, so load "
            "balancers stop sending. [default: server.drain_delay]",
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds in-flight requests get to finish once the listener is closed. "
            "[default: server.shutdown_timeout]",
        ),
    ] = None,
    app_dir: Annotated[
        Path, typer.Option(help="Directory put first on the import path.", file_okay=False)
    ] = Path(),
) -> None:
    """Serve the app until SIGTERM or SIGINT, then shut down gracefully.

    On the signal, readiness reports 503, the drain delay passes while requests
    are still served, the listener closes, in-flight requests finish (up to the
    shutdown timeout) and the app's shutdown hooks close its pools. The exit
    status is 0 after a graceful shutdown; a second signal forces the exit.
    Options default to the server section: BASTION_SERVER__* or bastion.toml.
    """
    given: dict[str, Any] = {
        "app": target,
        "host": host,
        "port": port,
        "workers": workers,
        "drain_delay": drain_delay,
        "shutdown_timeout": shutdown_timeout,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    _import_from(app_dir)
    try:
        settings = load_settings(server=overrides) if overrides else load_settings()
        _print_warnings(settings.server.workers, _server.startup_warnings(settings))
        status = _server.serve(settings)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(status)


def _print_warnings(workers: int, findings: list[Finding]) -> None:
    if not findings:
        return
    lines = [
        f"bastion: WARNING: {workers} worker processes, and this configuration is "
        "only safe with one:"
    ]
    for finding in findings:
        lines.append(f"  - {finding.detail}")
        if finding.fix:
            lines.append(f"    fix: {finding.fix}")
    typer.secho("\n".join(lines), err=True, fg=typer.colors.YELLOW, bold=True)


def _import_from(directory: Path) -> None:
    # As uvicorn's --app-dir: `bastion serve myservice:app` imports from where it runs.
    entry = str(directory.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)
