"""Turning configuration errors into one line on stderr."""

from __future__ import annotations

import typer

from bastion._loading import load_app, load_runtime

__all__ = ["fail", "load_app", "load_runtime"]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``bastion: <message>`` on stderr and return the exit to raise."""
    typer.echo(f"bastion: {message}", err=True)
    return typer.Exit(code)
