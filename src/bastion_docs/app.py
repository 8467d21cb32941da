"""The Bastion Docs application factory (``bastion serve``'s default app).

Example:
    >>> from bastion_docs.app import create_app
    >>> app = create_app(
    ...     database={"url": "sqlite+aiosqlite:///./var/docs.db"},
    ...     llm={"url": "http://127.0.0.1:11434", "api": "ollama"},
    ... )

Every document write, and every read of a document marked sensitive, is
recorded in bastion's audit trail (``audit`` settings; ``GET /admin/audit``).

Callers authenticate with bastion's identity component: an access token from
``POST /v1/auth/login`` (``Authorization: Bearer ...``) or an API key of their
tenant. The service adds its document permissions to bastion's roles
(:data:`DOCUMENT_PERMISSIONS`) unless ``identity.roles`` is configured.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

import bastion
from bastion.errors import ConfigurationError
from bastion.resilience import default_policy, http_client
from bastion.settings import RoleSettings, Settings, load_settings
from bastion_docs.assistant import DEPENDENCY, Assistant, LLMSettings
from bastion_docs.conformance import conformance_router
from bastion_docs.routes import v1
from bastion_docs.routes.assistant import AUDIT_ACTIONS as ASSISTANT_ACTIONS
from bastion_docs.routes.documents import AUDIT_ACTIONS, READ, WRITE

__all__ = ["DEFAULT_RATE_LIMIT", "DOCUMENT_PERMISSIONS", "FLAGS_SEED", "MIGRATIONS", "create_app"]

MIGRATIONS: Final = "bastion_docs:migrations"
"""Where the service's Alembic tree lives, as ``package:directory``."""

FLAGS_SEED: Final = Path(str(files("bastion_docs") / "flags.yaml"))
"""The service's feature flags (``assistant``, its kill switch; ``new-editor``, a
client-visible rollout), imported when the database holds no flag yet, unless
``flags.seed_file`` names another file."""

DEFAULT_RATE_LIMIT: Final = "20/second;1000/hour"
"""The service's ``ratelimit.default`` unless configured (``BASTION_RATELIMIT__DEFAULT``,
``bastion.toml`` or ``create_app(ratelimit=...)``): per client, a burst of 20 and 20
a second, and 1000 an hour, on every route. An empty value switches it off."""

DOCUMENT_PERMISSIONS: Final[dict[str, tuple[str, ...]]] = {"viewer": (READ,), "member": (WRITE,)}
"""What the service adds to bastion's roles unless ``identity.roles`` is configured:
viewers read documents and ask the assistant, members also write them; admins and
owners inherit both from member. Configuring ``identity.roles`` (environment,
``bastion.toml`` or ``create_app(identity=...)``) replaces the whole set, so such a
configuration grants ``documents:read`` and ``documents:write`` itself."""

DESCRIPTION: Final = """\
A multi-tenant document workspace: the reference service of Bastion.

Every error is `application/problem+json` (RFC 9457) with a stable `code`;
each operation lists the codes it can return under `x-error-codes`.

**Authentication.** Send `Authorization: Bearer <access token>`: sign up with
`POST /v1/auth/signup`, verify the e-mail address, then `POST /v1/auth/login`
(access tokens are short-lived, 15 minutes by default; `POST /v1/auth/refresh`
gives new ones). Automations use an API key of their tenant (`POST /v1/api-keys`)
with the scopes they need. Every request acts for the tenant its credential
names; another tenant's resources answer 404, as if they did not exist.

**Permissions.** `documents:read` (viewers and up) reads, lists and asks the
assistant; `documents:write` (members and up) creates, changes and deletes.
Tenants, members and API keys are managed by owners and admins under
`/v1/tenants` and `/v1/api-keys`.
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
    tables to the latest revision along with bastion's own. Unless a source
    sets them, the service adds its default rate limit, its document
    permissions to bastion's roles (:data:`DOCUMENT_PERMISSIONS`) and its
    flags' seed file (:data:`FLAGS_SEED`).

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
        ConfigurationError: a setting is invalid, or ``database.enabled`` or
            ``identity.enabled`` is off.
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
    runtime = bastion.install(app, **_with_service_defaults(_with_service_tree(overrides)))
    if runtime.database is None:
        raise ConfigurationError("Bastion Docs stores its data in the database: enable database")
    if runtime.identity is None:
        raise ConfigurationError("Bastion Docs authenticates its callers: enable identity")
    if runtime.audit is not None:
        # Its writes (and sensitive reads) are recorded under actions of its own.
        runtime.audit.log.register_actions({**AUDIT_ACTIONS, **ASSISTANT_ACTIONS})
    app.include_router(v1)
    _document_if_match(app)
    _install_assistant(app, runtime, llm_settings)
    if runtime.settings.tracing.conformance_endpoint:
        if runtime.tracing is None:
            raise ConfigurationError("tracing.conformance_endpoint needs tracing.enabled")
        app.include_router(conformance_router(runtime.tracing.tracer))

    return app


def _with_service_defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    # The service ships a default limit, its roles and its flags, yet any source may set others:
    # the settings are loaded first, and a default goes in only where no source set one.
    settings = overrides.get("settings")
    if isinstance(settings, bastion.Settings):
        rest = {key: value for key, value in overrides.items() if key != "settings"}
    else:
        settings, rest = load_settings(**overrides), {}
    if "default" not in settings.ratelimit.model_fields_set:
        ratelimit = settings.ratelimit.model_copy(update={"default": DEFAULT_RATE_LIMIT})
        settings = settings.model_copy(update={"ratelimit": ratelimit})
    if "roles" not in settings.identity.model_fields_set:
        settings = _with_document_permissions(settings)
    if "seed_file" not in settings.flags.model_fields_set:
        flags = settings.flags.model_copy(update={"seed_file": FLAGS_SEED})
        settings = settings.model_copy(update={"flags": flags})
    # Anything besides settings= is passed on, for install() to refuse the mix as usual.
    return {**rest, "settings": settings}


def _with_document_permissions(settings: Settings) -> Settings:
    roles: dict[str, RoleSettings] = {}
    for name, role in settings.identity.roles.items():
        added = [p for p in DOCUMENT_PERMISSIONS.get(name, ()) if p not in role.permissions]
        roles[name] = role.model_copy(update={"permissions": [*role.permissions, *added]})
    identity = settings.identity.model_copy(update={"roles": roles})
    return settings.model_copy(update={"identity": identity})


def _document_if_match(app: FastAPI) -> None:
    # The If-Match dependency declares the header optional, so that a missing one is
    # 428 PRECONDITION_REQUIRED rather than a validation 422; the document says what
    # the API requires.
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                for parameter in (
                    operation.get("parameters", ()) if isinstance(operation, dict) else ()
                ):
                    if parameter.get("in") == "header" and parameter.get("name") == "If-Match":
                        parameter["required"] = True
                        parameter["schema"] = {"type": "string", "title": "If-Match"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented customisation


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
