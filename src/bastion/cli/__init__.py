"""The ``bastion`` command line: one module per command group, parsing and printing only."""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="bastion",
    help="Run, inspect and maintain a bastion service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Command groups register themselves on `app`; importing them here keeps the
    # import graph one-way (groups import `app`, never each other).
    from bastion.cli import audit as _audit  # noqa: F401, PLC0415 -- registration
    from bastion.cli import config as _config  # noqa: F401, PLC0415 -- registration
    from bastion.cli import doctor as _doctor  # noqa: F401, PLC0415 -- registration
    from bastion.cli import flags as _flags  # noqa: F401, PLC0415 -- registration
    from bastion.cli import identity as _identity  # noqa: F401, PLC0415 -- registration
    from bastion.cli import keys as _keys  # noqa: F401, PLC0415 -- registration
    from bastion.cli import migrate as _migrate  # noqa: F401, PLC0415 -- registration
    from bastion.cli import migrate_lint as _migrate_lint  # noqa: F401, PLC0415 -- registration
    from bastion.cli import secrets as _secrets  # noqa: F401, PLC0415 -- registration
    from bastion.cli import serve as _serve  # noqa: F401, PLC0415 -- registration
    from bastion.cli import tenants as _tenants  # noqa: F401, PLC0415 -- registration
    from bastion.cli import users as _users  # noqa: F401, PLC0415 -- registration


def main() -> None:
    """Run the command line."""
    _register()
    app()
