"""The Bastion Docs application factory (``bastion serve``'s default app).

Example:
    >>> from bastion_docs.app import create_app
    >>> app = create_app(
    ...     database={"url": "sqlite+aiosqlite:///./var/docs.db"},
    ...     llm={"url": "http://127.0.0.1:11434", "api": "ollama"},
    ... )

Identity is a DEVELOPMENT STAND-IN (the ``X-Debug-User`` header, see
:mod:`bastion_docs.identity`) until bastion's identity component lands.
"""

from __future__ import annotations

from typing import Any, Final

import httpx
import structlog
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

import bastion
from bastion.errors import ConfigurationError
from bastion.resilience import default_policy, http_client
from bastion.settings import load_settings
from bastion_docs.assistant import DEPENDENCY, Assistant, LLMSettings
from bastion_docs.conformance import conformance_router
from bastion_docs.identity import DEBUG_USER_HEADER
from bastion_docs.routes import v1

__all__ = ["DEFAULT_RATE_LIMIT", "MIGRATIONS", "create_app"]

MIGRATIONS: Final = "bastion_docs:migrations"
"""Where the service's Alembic tree lives, as ``package:directory``."""

DEFAULT_RATE_LIMIT: Final = "20/second;1000/hour"
"""The service's ``ratelimit.default`` unless configured (``BASTION_RATELIMIT__DEFAULT``,
``bastion.toml`` or ``create_app(ratelimit=...)``): per client, a burst of 20 and 20
a second, and 1000 an hour, on every route. An empty value switches it off."""

DESCRIPTION: Final = f"""\
A multi-tenant document workspace: the reference service of Bastion.

Every error is `application/problem+json` (RFC 9457) with a stable `code`;
each operation lists the codes it can return under `x-error-codes`.

**Identity is a development stand-in.** The `{DEBUG_USER_HEADER}` header names
the calling user by id; anyone who knows an id can act as that user. Do not
expose this service to untrusted networks until the identity component
replaces it.
"""


def _with_service_tree(overrides: dict[str, Any]) -> dict[str, Any]:
    # The caller may choose the mode or the version table; the tree is the service's own.
    settings = overrides.get("settings")
    if isinstance(settings, bastion.Settings):
        migrations = settings.migrations.model_copy(update={"app_tree": MIGRATIONS})
        return {**overrides, "settings": settings.model_copy(update={"migrations": migrations})}
    supplied = overrides.get("migrations") or {}
    if isinstance(supplied, BaseModel):
        supplied = supplied.model_dump(exclude_unset=True)
    return {**overrides, "migrations": {**supplied, "app_tree": MIGRATIONS}}


def create_app(*, llm: dict[str, Any] | LLMSettings | None = None, **overrides: Any) -> FastAPI:
    """Build the Bastion Docs app with bastion installed.

    The service's migration tree is added to the ``migrations`` section, so
    start-up (in ``auto`` mode) or ``bastion migrate upgrade`` brings its
    tables to the latest revision along with bastion's own.

    Args:
        llm: the assistant's LLM provider, over the ``BASTION_DOCS_LLM_*``
            environment (see :class:`~bastion_docs.assistant.LLMSettings`).
        overrides: settings by section, passed to :func:`bastion.install`
            (or ``settings=`` a whole tree); a ``migrations`` override is merged
            with the service's tree, not replaced by it.

    Returns:
        The app; its bastion runtime is at ``app.state.bastion``, its assistant
        at ``app.state.assistant``.

    Raises:
        ConfigurationError: a setting is invalid, or ``database.enabled`` is off.
    """
    llm_settings = _llm_settings(llm)
    app = FastAPI(
        title="Bastion Docs",
        description=DESCRIPTION,
        version=bastion.__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    runtime = bastion.install(app, **_with_rate_limit_default(_with_service_tree(overrides)))
    if runtime.database is None:
        raise ConfigurationError("Bastion Docs stores its data in the database: enable database")
    app.include_router(v1)
    _install_assistant(app, runtime, llm_settings)
    if runtime.settings.tracing.conformance_endpoint:
        if runtime.tracing is None:
            raise ConfigurationError("tracing.conformance_endpoint needs tracing.enabled")
        app.include_router(conformance_router(runtime.tracing.tracer))

    if runtime.settings.environment == "production":

        async def warn_stand_in() -> None:
            # Looked up when start-up runs, not at import, so the line goes through the
            # logging configuration in force then (structlog caches bound loggers).
            structlog.get_logger("bastion_docs").warning(
                "identity is a development stand-in: any caller can act as any user "
                f"by sending {DEBUG_USER_HEADER}; do not expose this service",
                header=DEBUG_USER_HEADER,
            )

        runtime.lifecycle.on_startup("identity stand-in warning", warn_stand_in)
    return app


def _with_rate_limit_default(overrides: dict[str, Any]) -> dict[str, Any]:
    # The service ships a default limit, yet any source may set another or none: the
    # settings are loaded first, and the default goes in only where no source set one.
    settings = overrides.get("settings")
    if isinstance(settings, bastion.Settings):
        rest = {key: value for key, value in overrides.items() if key != "settings"}
    else:
        settings, rest = load_settings(**overrides), {}
    if "default" not in settings.ratelimit.model_fields_set:
        ratelimit = settings.ratelimit.model_copy(update={"default": DEFAULT_RATE_LIMIT})
        settings = settings.model_copy(update={"ratelimit": ratelimit})
    # Anything besides settings= is passed on, for install() to refuse the mix as usual.
    return {**rest, "settings": settings}


def _llm_settings(llm: dict[str, Any] | LLMSettings | None) -> LLMSettings:
    if isinstance(llm, LLMSettings):
        return llm
    try:
        return LLMSettings(**(llm or {}))
    except ValidationError as exc:
        raise ConfigurationError(f"invalid llm settings: {exc}") from exc


def _install_assistant(app: FastAPI, runtime: bastion.Bastion, settings: LLMSettings) -> None:
    resilience = runtime.resilience
    if resilience is not None:
        # Registered now, with or without a provider, so /health/circuits lists
        # ``llm`` from the first request.
        resilience.register(DEPENDENCY, "http")
    client: httpx.AsyncClient | None = None
    if settings.endpoint is not None:
        headers = {}
        if settings.api == "openai" and settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        if resilience is not None:
            # The pipeline times each attempt and the whole call.
            client = http_client(DEPENDENCY, headers=headers)
        else:
            # Resilience switched off: the http class's attempt timeout is the only bound.
            timeout = default_policy(DEPENDENCY, "http").timeout
            client = httpx.AsyncClient(headers=headers, timeout=timeout)
    assistant = Assistant(settings, client)
    app.state.assistant = assistant
    runtime.lifecycle.on_shutdown("assistant client", assistant.aclose)
