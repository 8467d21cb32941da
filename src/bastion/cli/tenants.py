"""``bastion tenants create``: make a tenant from the command line (bootstrap, scripts).

Exit status: 0 created, 1 refused (the slug is taken, a bad name), 2 the app or
its configuration cannot be loaded.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.cli import app
from bastion.cli._identity import AppOption, JsonOption, echo_record, run_with_identity
from bastion.tenancy._bootstrap import bootstrap_tenant

__all__ = ["create", "tenants_app"]

tenants_app = typer.Typer(
    name="tenants", help="Create tenants without the HTTP API.", no_args_is_help=True
)
app.add_typer(tenants_app)


@tenants_app.command()
def create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The tenant's display name.")],
    slug: Annotated[
        str | None,
        typer.Option("--slug", help="Unique short name (a-z, 0-9, inner '-'); default: from NAME."),
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a tenant with no members; add its owner with ``bastion users create``."""
    record = run_with_identity(spec, lambda identity: bootstrap_tenant(identity, name, slug))
    echo_record(
        {"id": str(record.id), "slug": record.slug, "name": record.name},
        as_json=as_json,
        text=f"tenant {record.slug} created: {record.id}",
    )
