"""Apps whose start-up fails, for the one-line error of `bastion serve`."""

from __future__ import annotations

from starlette.applications import Starlette

import bastion
from bastion.errors import ConfigurationError

REFUSAL = "pending migrations (migrations.mode=check): bastion:0002; run `bastion migrate upgrade`"


def create_misconfigured_app() -> Starlette:
    """Start-up raises a ConfigurationError, as a pending migration under mode=check does."""
    app = Starlette()
    runtime = bastion.install(app)

    async def refuse() -> None:
        raise ConfigurationError(REFUSAL)

    runtime.lifecycle.on_startup("refuse", refuse, priority=50)
    return app


def create_broken_app() -> Starlette:
    """Start-up raises an ordinary bug."""
    app = Starlette()
    runtime = bastion.install(app)

    async def crash() -> None:
        raise RuntimeError("bug in a start-up hook")

    runtime.lifecycle.on_startup("crash", crash, priority=50)
    return app
