"""FastAPI dependencies: the caller's evaluation context, the app's flags, dark routes.

Example:
    >>> from bastion.flags import CurrentFlags, FlagContext, feature_required
    >>>
    >>> @app.get("/v1/editor", dependencies=[Depends(feature_required("new-editor"))])
    ... async def editor() -> dict[str, str]: ...
    >>>
    >>> @app.get("/v1/home")
    ... async def home(flags: CurrentFlags, context: FlagContext) -> dict[str, bool]:
    ...     return {"beta": flags.is_enabled("beta", context)}

An app adds attributes of its own to every request's context (``FlagContext``,
:func:`feature_required` and ``GET /api/features`` alike) with
:func:`add_context_builder`::

    >>> async def plan(connection: HTTPConnection, context: EvaluationContext) -> None:
    ...     context.email = await emails.of(context.user_id)
    ...     context.properties["plan"] = await plans.of(context.tenant_id)
    >>>
    >>> add_context_builder(app, plan)
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeAlias

from fastapi import Depends
from starlette.requests import HTTPConnection

from bastion.context import current_context
from bastion.errors import FieldError, InvalidInput, NotFound
from bastion.flags._build import flags_runtime
from bastion.flags._evaluation import EvaluationContext
from bastion.flags._flags import Flags
from bastion.flags._model import CONTEXT_ALIASES
from bastion.identity import current_principal

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "ContextBuilder",
    "CurrentFlags",
    "FlagContext",
    "add_context_builder",
    "context_from_mapping",
    "current_flags",
    "feature_required",
    "flag_context",
]

_ID_FIELDS: Final = {
    "userId": "user_id",
    "sessionId": "session_id",
    "tenantId": "tenant_id",
    "email": "email",
    "remoteAddress": "ip",
    "environment": "environment",
    "appName": "app_name",
    "appVersion": "app_version",
}
"""Canonical context names held in a string attribute of :class:`EvaluationContext`."""
_TEXT_MAX: Final = 1024
"""Longest context value accepted from a request body: a context is ids and names."""
_BUILDERS: Final = "bastion_flag_context_builders"
"""Where an app's context builders are kept (``app.state``)."""

ContextBuilder: TypeAlias = Callable[[HTTPConnection, EvaluationContext], Awaitable[None] | None]
"""Adds an app's attributes to a request's evaluation context, in place."""


def add_context_builder(app: Starlette, builder: ContextBuilder) -> None:
    """Have ``builder`` add attributes to the evaluation context of every request of ``app``.

    :func:`flag_context` (so ``FlagContext``, :func:`feature_required` and
    ``GET /api/features``) calls the builders, in the order they were added,
    with the request and the context it built (user, session, tenant, roles,
    address, environment, app name), before the client route reads its query.
    A builder sets fields (``email``, ``app_version``...) or adds to
    ``properties``; it may be a coroutine function. What it raises reaches the
    caller as raised (a :class:`~bastion.errors.BastionError` renders as its
    problem), so it should be quick and not fail on a missing attribute.

    Args:
        app: the app (``bastion.install``'s, or the one ``create_app`` made).
        builder: ``(connection, context) -> None``, sync or async.

    Example:
        >>> def plan(connection: HTTPConnection, context: EvaluationContext) -> None:
        ...     context.properties["plan"] = connection.headers.get("x-plan", "free")
        >>>
        >>> add_context_builder(app, plan)
    """
    builders: list[ContextBuilder] | None = getattr(app.state, _BUILDERS, None)
    if builders is None:
        builders = []
        setattr(app.state, _BUILDERS, builders)
    builders.append(builder)


async def current_flags(connection: HTTPConnection) -> Flags:
    """FastAPI dependency: the app's :class:`~bastion.flags.Flags`.

    A coroutine although it awaits nothing: FastAPI runs plain functions in a
    worker thread, which costs more than the lookup.

    Raises:
        ConfigurationError: ``flags.enabled`` is off for the app (a 500: the
            app's mistake, not the caller's).
    """
    return flags_runtime(connection).flags


async def flag_context(connection: HTTPConnection) -> EvaluationContext:
    """FastAPI dependency: the evaluation context of the calling request.

    ``userId`` is the principal's subject (a user id, or an API key's id),
    ``sessionId`` its session, ``tenantId`` the tenant the request acts for,
    ``roles`` the roles its credential carries, ``remoteAddress`` the client
    address (as resolved through trusted proxies), and ``environment`` and
    ``appName`` those of the ``flags`` settings (``environment`` falling back to
    the top-level one). Bastion's credentials carry no e-mail address (a
    :class:`~bastion.identity.Principal` has none): an app that knows it sets
    ``email`` in a context builder (:func:`add_context_builder`), which runs last.

    Returns:
        A new context; anonymous callers get one without ``userId``.
    """
    request_context = current_context()
    principal = current_principal()
    settings = connection.app.state.bastion.settings
    section = settings.flags
    context = EvaluationContext(
        environment=section.environment or settings.environment,
        app_name=section.app_name,
    )
    if request_context is not None:
        context.ip = request_context.client_ip
        context.tenant_id = request_context.tenant_id
        context.user_id = request_context.user_id
    elif connection.client is not None:
        context.ip = connection.client.host
    if principal is not None:
        context.user_id = principal.subject
        context.session_id = principal.session_id
        context.tenant_id = principal.tenant_id or context.tenant_id
        if principal.roles:
            context.roles = tuple(sorted(principal.roles))
    for builder in getattr(connection.app.state, _BUILDERS, ()):
        result = builder(connection, context)
        if inspect.isawaitable(result):
            await result
    return context


CurrentFlags = Annotated[Flags, Depends(current_flags)]
"""Route parameter type: the app's flags (``flags.is_enabled(key, context)``...)."""
FlagContext = Annotated[EvaluationContext, Depends(flag_context)]
"""Route parameter type: the calling request's evaluation context."""


def feature_required(key: str) -> Callable[[HTTPConnection], Awaitable[None]]:
    """Return a dependency that answers 404 unless flag ``key`` is on for the caller.

    404, not 403: a route shipped dark does not exist for those who are not in
    its rollout, so its existence is not revealed. A flag that is missing or
    cannot be evaluated is off (the engine serves its default).

    Example:
        >>> @app.post("/v1/assistant/ask", dependencies=[Depends(feature_required("assistant"))])
        ... async def ask() -> Answer: ...

    Args:
        key: the flag.

    Returns:
        A FastAPI dependency (use it in ``dependencies=[Depends(...)]``).
    """

    async def require_feature(connection: HTTPConnection) -> None:
        flags = flags_runtime(connection).flags
        if not flags.is_enabled(key, await flag_context(connection)):
            raise NotFound

    require_feature.__name__ = f"feature_required[{key}]"
    return require_feature


def context_from_mapping(values: Mapping[str, Any], *, field: str = "context") -> EvaluationContext:
    """Build an evaluation context from a dict in bastion's, Unleash's or snake_case names.

    ``userId``/``user_id``, ``sessionId``, ``tenantId``, ``roles``, ``email``,
    ``remoteAddress``/``ip``, ``environment``, ``appName``, ``appVersion`` and
    ``currentTime`` (ISO 8601; UTC when it names no zone) fill the context's
    fields; Unleash's ``properties`` object and any other name become custom
    properties. Numbers are accepted where an id is expected.

    Args:
        values: the context as JSON gave it.
        field: where the dict sits in the request, for error messages (``body.context``).

    Raises:
        InvalidInput: a value of the wrong kind, one field error per problem.
    """
    errors: list[FieldError] = []
    context = EvaluationContext()
    properties: dict[str, Any] = {}
    for raw_name, value in values.items():
        if value is None:
            continue
        name = CONTEXT_ALIASES.get(raw_name, raw_name)
        problem = _set_field(context, properties, name, value)
        if problem is not None:
            errors.append(FieldError(f"{field}.{raw_name}", "invalid", f"{raw_name} {problem}."))
    if errors:
        raise InvalidInput("The evaluation context is malformed.", errors=errors)
    context.properties = properties
    return context


def _set_field(
    context: EvaluationContext, properties: dict[str, Any], name: str, value: Any
) -> str | None:
    """Put ``value`` where ``name`` belongs; return what is wrong with it, if anything."""
    if name in _ID_FIELDS:
        text = _text(value)
        if text is None:
            return f"must be a string of at most {_TEXT_MAX} characters"
        setattr(context, _ID_FIELDS[name], text)
    elif name == "roles":
        roles = _roles(value)
        if roles is None:
            return "must be a list of strings"
        context.roles = roles
    elif name == "currentTime":
        moment = _moment(value)
        if moment is None:
            return "must be an ISO 8601 date and time"
        context.current_time = moment
    elif name == "properties":
        if not isinstance(value, Mapping):
            return "must be an object"
        properties.update({str(key): item for key, item in value.items()})
    else:
        properties[name] = value
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and len(value) <= _TEXT_MAX:
        return value
    return None


def _roles(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(role, str) for role in value):
        return tuple(value)
    return None


def _moment(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str) and len(value) <= _TEXT_MAX:
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)
