"""``bastion keys``: generate and rotate access-token signing keys."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bastion.cli import app
from bastion.cli._app import fail
from bastion.errors import ConfigurationError
from bastion.identity._keys import Algorithm, KeySet, generate_jwks, rotate_jwks

__all__ = ["generate", "keys_app", "rotate"]

keys_app = typer.Typer(
    name="keys", help="Generate and rotate access-token signing keys.", no_args_is_help=True
)
app.add_typer(keys_app)

_STORAGE_NOTE = (
    "bastion: the JWKS on stdout holds a private key: store it as a secret "
    "(BASTION_IDENTITY__TOKENS__SIGNING_KEYS, a secrets file or OpenBao), never in the repository"
)

AlgorithmOption = Annotated[
    str, typer.Option("--alg", help="EdDSA (Ed25519, default), ES256, RS256 or HS256.")
]


def _algorithm(name: str) -> Algorithm:
    if name not in ("EdDSA", "ES256", "RS256", "HS256"):
        raise fail(f"unsupported algorithm {name!r}: use EdDSA, ES256, RS256 or HS256")
    return name  # type: ignore[return-value]  # narrowed by the membership test above


@keys_app.command()
def generate(
    alg: AlgorithmOption = "EdDSA",
    kid: Annotated[str | None, typer.Option(help="Key id; default: date and random.")] = None,
) -> None:
    """Print a new one-key JWKS for identity.tokens.signing_keys."""
    typer.echo(generate_jwks(_algorithm(alg), kid=kid))
    typer.echo(_STORAGE_NOTE, err=True)


@keys_app.command()
def rotate(
    alg: AlgorithmOption = "EdDSA",
    keep: Annotated[int, typer.Option(min=0, help="Older keys kept to verify.")] = 1,
) -> None:
    """Read the current JWKS on stdin; print it with a new signing key first.

    The old keys stay after it (``--keep`` of them) so tokens they signed verify
    until they expire; remove them once ``access_ttl`` has passed.
    """
    current = sys.stdin.read()
    try:
        KeySet.from_jwks(current)
        rotated = rotate_jwks(current, _algorithm(alg), keep=keep)
    except ConfigurationError as exc:
        raise fail(f"the JWKS on stdin is not usable: {exc}") from None
    typer.echo(rotated)
    typer.echo(_STORAGE_NOTE, err=True)
