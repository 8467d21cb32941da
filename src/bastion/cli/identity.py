"""``bastion identity purge``: delete spent single-use tokens and dead refresh families now.

What the periodic purge does every ``identity.purge_interval``, on demand (after
turning the periodic purge off, or to clear a backlog before a migration).
Exit status: 0 purged, 2 the app or its configuration cannot be loaded, or the
database cannot be reached or is not migrated.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.cli import app
from bastion.cli._identity import AppOption, JsonOption, echo_record, run_with_identity
from bastion.identity._purge import DEFAULT_PURGE_BATCH, purge_expired

__all__ = ["identity_app", "purge"]

identity_app = typer.Typer(
    name="identity", help="Maintain the identity tables.", no_args_is_help=True
)
app.add_typer(identity_app)


@identity_app.command()
def purge(
    *,
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="The most rows one statement deletes.")
    ] = DEFAULT_PURGE_BATCH,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete tokens spent more than identity.purge_after ago; print the rows deleted per table."""
    counts = run_with_identity(
        spec,
        lambda identity: purge_expired(
            identity.database, keep=identity.settings.identity.purge_after, batch=batch
        ),
    )
    echo_record(
        counts,
        as_json=as_json,
        text=", ".join(f"{table}: {deleted}" for table, deleted in counts.items()),
    )
