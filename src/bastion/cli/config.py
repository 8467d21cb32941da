"""``bastion config``: the effective configuration, with secrets redacted."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import typer

from bastion.cli import app
from bastion.cli._app import fail
from bastion.errors import ConfigurationError
from bastion.settings import load_settings

__all__ = ["config_app", "render_toml", "show"]

config_app = typer.Typer(
    name="config", help="Inspect the effective configuration.", no_args_is_help=True
)
app.add_typer(config_app)


@config_app.command()
def show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Print the effective configuration: defaults, bastion.toml and BASTION_* merged.

    Secrets are masked; URLs keep everything but their password.
    """
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    tree = settings.redacted()
    if as_json:
        typer.echo(json.dumps(tree, indent=2))
        return
    typer.echo("# The effective configuration; secrets are masked.")
    typer.echo("# Environment variables: BASTION_<SECTION>__<KEY>.")
    typer.echo(render_toml(tree), nl=False)


def render_toml(tree: Mapping[str, Any]) -> str:
    """Render a JSON-ready tree as TOML; unset values become comments.

    Example:
        >>> print(render_toml({"server": {"port": 8000, "app": None}}), end="")
        <BLANKLINE>
        [server]
        port = 8000
        # app is unset
    """
    return "".join(line + "\n" for line in _table((), tree))


def _table(path: tuple[str, ...], table: Mapping[str, Any]) -> Iterator[str]:
    scalars = {key: value for key, value in table.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in table.items() if isinstance(value, dict)}
    if path and (scalars or not tables):
        yield ""
        yield f"[{'.'.join(path)}]"
    for key, value in scalars.items():
        if value is None:
            yield f"# {key} is unset"
        else:
            yield f"{key} = {_value(value)}"
    for key, value in tables.items():
        yield from _table((*path, key), value)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    # A JSON string is a valid TOML basic string for everything settings hold.
    return json.dumps(str(value), ensure_ascii=False)
