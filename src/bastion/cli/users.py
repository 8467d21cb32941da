"""``bastion users create``: make a verified user in a tenant, for the first admin and scripts.

The password is read from standard input (``--password-stdin``), never from the
command line, where it would be seen in the process list and the shell history.
Exit status: 0 created, 1 refused (policy, unknown tenant or role, address
taken), 2 the app or its configuration cannot be loaded.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bastion.cli import app
from bastion.cli._app import fail
from bastion.cli._identity import AppOption, JsonOption, echo_record, run_with_identity
from bastion.tenancy._bootstrap import bootstrap_user

__all__ = ["create", "users_app"]

users_app = typer.Typer(
    name="users", help="Create users without the HTTP API.", no_args_is_help=True
)
app.add_typer(users_app)


@users_app.command()
def create(
    *,
    email: Annotated[str, typer.Option("--email", help="The user's e-mail address.")],
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant's id, slug or name.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    role: Annotated[str, typer.Option("--role", help="The role in the tenant.")] = "owner",
    display_name: Annotated[
        str | None, typer.Option("--display-name", help="Shown to other members.")
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a verified user with a password and make it a member of a tenant."""
    if not password_stdin:
        raise fail("the password is read from standard input: pass --password-stdin")
    # One line: a trailing newline from `echo` or a here-string is not part of it.
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise fail("no password on standard input")
    user, record = run_with_identity(
        spec,
        lambda identity: bootstrap_user(
            identity, email, password, tenant=tenant, role=role, display_name=display_name
        ),
    )
    echo_record(
        {"id": str(user.id), "tenant_id": str(record.id), "role": role},
        as_json=as_json,
        text=f"user {user.id} created in tenant {record.slug} as {role}",
    )
