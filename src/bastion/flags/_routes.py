"""The flag routes: front ends' ``GET /api/features``, operators' ``/admin/features``.

For front ends (``flags.client_route``, anonymous callers allowed):

* ``GET /api/features``: ``{"flags": {key: {"enabled", "variant", "value"}}}``,
  the client-visible flags evaluated for the caller. ``ETag`` over the body,
  ``304`` on a matching ``If-None-Match``, ``Cache-Control: private, no-cache``
  and ``Vary`` on the credentials' headers, so caches revalidate per caller.
  ``?sessionId=`` gives an anonymous visitor stable buckets in partial rollouts
  (as Unleash's frontend API does) and ``?appVersion=`` the front end's version
  (semver rules); nothing else comes from the query: the user, roles and tenant
  come from authentication, or a caller could claim them and unlock flags
  targeted at others. An app adds attributes of its own with
  :func:`~bastion.flags.add_context_builder`.

For operators (behind the admin access policy, like every ``/admin`` route;
``flags.admin_routes``):

* ``GET /admin/features``: every flag, with its version and ETag.
* ``POST /admin/features``: create (201, ``ETag``, ``Location``); 409 when taken.
* ``GET /admin/features/{key}``: one flag, with its ``ETag``.
* ``PUT /admin/features/{key}``: replace it whole; ``DELETE`` it (204);
  ``POST /admin/features/{key}/toggle`` ``{"enabled": bool}``. These three
  need ``If-Match`` with the ETag read: without it 428 ``PRECONDITION_REQUIRED``,
  with a stale one 412 ``PRECONDITION_FAILED`` carrying the current ``ETag`` and
  ``current_version``, so two operators never silently overwrite each other.
* ``POST /admin/features/{key}/evaluate`` ``{"context": {...}}``: what the flag
  serves that context, and why, rule by rule (the context in bastion's,
  snake_case or Unleash's names, Unleash's ``properties`` included).
* ``GET /admin/features/{key}/history?limit=50``: its changes, newest first
  (who, when, before, after).
* ``GET /admin/features/export?format=bastion|unleash``: the whole set, with
  ``ETag: "r<revision>"``; ``POST /admin/features/import?mode=merge|replace``:
  an Unleash state or a bastion document (at most 8 MiB, 10,000 flags and
  10,000 segments). An optional ``If-Match: "r<revision>"`` makes the import
  conditional: 412 when the set changed since that export. Merging an Unleash
  state changes only what Unleash describes; bastion's own fields of an
  existing flag (type, default, tags, visibility...) are kept. ``export`` is
  reserved for ``GET``: a flag keyed ``export`` is read in the list; every
  other method on its path reaches the flag.
* ``GET /admin/segments``, ``GET|PUT|DELETE /admin/segments/{name}``: segments;
  ``PUT`` creates one that does not exist, and needs ``If-Match`` to change or
  delete one that does.

Every write is one transaction of the store (the row, its change record and
its audit event) and reaches every instance within a second. The actor is the
identity principal the request authenticates (an API key in identity's API-key
header beside the admin token), else ``system:operator``; with the shared admin
token an operator may name themself in ``X-Operator`` (1 to 128 printable
characters, one line; 422 otherwise), recorded as claimed, not authenticated.
Bad bodies are 422 ``INVALID_INPUT`` with one field error per problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

import orjson
import structlog
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bastion._admin import query_limit
from bastion.audit import Actor, ActorType
from bastion.errors import (
    BastionError,
    ErrorCode,
    FieldError,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
)
from bastion.flags._build import flags_environment
from bastion.flags._dependencies import context_from_mapping, flag_context
from bastion.flags._document import (
    dump_document,
    import_fields,
    parse_document,
    validation_errors,
)
from bastion.flags._errors import FlagVersionMismatch
from bastion.flags._evaluation import EvaluationContext
from bastion.flags._model import Flag, Segment
from bastion.flags._store import check_operator
from bastion.guard import limits
from bastion.identity import InvalidApiKey, Principal, current_principal

if TYPE_CHECKING:
    from bastion._access import AccessPolicy
    from bastion.flags._build import FlagsRuntime
    from bastion.flags._store import FlagChange, FlagStore, StoredFlag, StoredSegment
    from bastion.identity import Identity
    from bastion.settings import Settings

__all__ = [
    "FEATURES_PREFIX",
    "OPERATOR",
    "OPERATOR_HEADER",
    "SEGMENTS_PREFIX",
    "admin_flag_routes",
    "client_flag_routes",
    "flag_routes",
]

logger = structlog.get_logger("bastion.flags")

FEATURES_PREFIX: Final = "/admin/features"
SEGMENTS_PREFIX: Final = "/admin/segments"
OPERATOR: Final = Actor(ActorType.SYSTEM, "operator")
"""Who the audit trail says acted when an operator (admin token or network) called."""
OPERATOR_HEADER: Final = "X-Operator"
"""The name an operator with the shared admin token claims: recorded as claimed."""

BODY_MAX: Final = 1 << 20
"""Largest flag or segment document accepted (1 MiB): far beyond any real flag."""
IMPORT_MAX: Final = 8 << 20
"""Largest import accepted (8 MiB): thousands of flags."""
# The document's own nesting (flags, rules, constraints, variants) around a JSON value's 32.
_DOCUMENT_DEPTH: Final = 64
HISTORY_DEFAULT: Final = 50
HISTORY_MAX: Final = 500
_REALM: Final = "bastion-admin"

Endpoint = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)


def flag_routes(runtime: FlagsRuntime, settings: Settings, access: AccessPolicy) -> list[BaseRoute]:
    """Return the client route and the operators' routes the settings ask for.

    Mount the two kinds apart when identity is on: the client route must get
    the caller's principal, while ``/admin`` routes take the operators' token.
    :func:`client_flag_routes` and :func:`admin_flag_routes` return each.
    """
    return [*client_flag_routes(runtime, settings), *admin_flag_routes(runtime, settings, access)]


def client_flag_routes(runtime: FlagsRuntime, settings: Settings) -> list[BaseRoute]:
    """Return ``GET {flags.client_route}`` (documented in OpenAPI), or nothing when unset."""
    path = settings.flags.client_route
    if path is None:
        return []
    vary = "Authorization"
    identity = getattr(settings, "identity", None)
    if identity is not None and identity.enabled:
        vary = f"Authorization, {identity.api_keys.header}"

    async def client_features(request: Request) -> Response:
        """The calling user's client-visible flags, evaluated for it.

        ``{"flags": {"<key>": {"enabled": bool, "variant": str | null, "value": ...}}}``.
        Revalidate with ``If-None-Match``: 304 while nothing the caller sees changed.
        ``sessionId`` (query) keeps an anonymous visitor in the same buckets of
        partial rollouts; ``appVersion`` (query) is the front end's version, for
        rules with semver operators; the user, roles and tenant come from the
        credentials only.
        """
        context = _with_app_version(_with_session(await flag_context(request), request), request)
        evaluations = runtime.flags.client_flags(context)
        body = orjson.dumps(
            {
                "flags": {
                    key: {
                        "enabled": evaluation.enabled,
                        "variant": evaluation.variant,
                        "value": evaluation.value,
                    }
                    for key, evaluation in evaluations.items()
                }
            },
            option=orjson.OPT_SORT_KEYS,
        )
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        headers = {"etag": etag, "cache-control": "private, no-cache", "vary": vary}
        if _none_match(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    return [
        APIRoute(
            path,
            client_features,
            methods=["GET"],
            response_class=Response,
            summary="The caller's client-visible feature flags",
            description=(
                "The client-visible flags, evaluated for the authenticated caller "
                "(user, roles and tenant from the credentials, never from the query). "
                "`sessionId` gives an anonymous visitor stable buckets in partial rollouts, "
                "as Unleash's frontend API does; `appVersion` is the front end's version, "
                "matched by rules on `appVersion` (semver operators)."
            ),
            tags=["features"],
            openapi_extra={"parameters": [_SESSION_PARAMETER, _APP_VERSION_PARAMETER]},
            responses={
                200: {
                    "description": "The flags, by key.",
                    "content": {"application/json": {"schema": _CLIENT_SCHEMA}},
                },
                304: {"description": "Unchanged since the ETag sent in If-None-Match."},
            },
        )
    ]


_SESSION_MAX: Final = 256
"""Longest ``sessionId`` accepted: a session id, not a document."""
_SESSION_PARAMETER: Final[dict[str, Any]] = {
    "name": "sessionId",
    "in": "query",
    "required": False,
    "description": (
        "The visitor's session id: the bucket of partial rollouts when the caller is "
        "anonymous (an authenticated caller's own session wins)."
    ),
    "schema": {"type": "string", "maxLength": _SESSION_MAX},
}


def _with_session(context: EvaluationContext, request: Request) -> EvaluationContext:
    """``context`` with the query's ``sessionId`` when the credentials gave none."""
    raw = request.query_params.get("sessionId")
    if raw is None or context.session_id is not None:
        return context
    if not raw or len(raw) > _SESSION_MAX:
        raise InvalidInput(
            errors=[
                FieldError(
                    "query.sessionId",
                    "invalid",
                    f"sessionId must be 1 to {_SESSION_MAX} characters.",
                )
            ]
        )
    context.session_id = raw
    return context


_APP_VERSION_MAX: Final = 64
"""Longest ``appVersion`` accepted: a version, not a document."""
_APP_VERSION: Final = re.compile(
    # A semantic version (pre-release and build included), or a plain one
    # ("v2", "2024.12", "2024.01.05", "1.2.3.4"): what front ends put in their builds.
    r"[vV]?\d+(?:\.\d+){0,3}"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
_APP_VERSION_PARAMETER: Final[dict[str, Any]] = {
    "name": "appVersion",
    "in": "query",
    "required": False,
    "description": (
        "The front end's version (`1.4.2`, `2.0.0-beta.1`, `v3`): matched by rules on "
        "`appVersion`, with the semver operators. A version set by the app's own "
        "context builder wins."
    ),
    "schema": {"type": "string", "maxLength": _APP_VERSION_MAX},
}


def _with_app_version(context: EvaluationContext, request: Request) -> EvaluationContext:
    """``context`` with the query's ``appVersion`` when the app set none.

    It is the caller's claim, like ``sessionId``: it selects what a front end
    build is shown, never who the caller is.
    """
    raw = request.query_params.get("appVersion")
    if raw is None:
        return context
    # Checked even when the app's builder set a version: bad input is never dropped.
    if len(raw) > _APP_VERSION_MAX or _APP_VERSION.fullmatch(raw) is None:
        raise InvalidInput(
            errors=[
                FieldError(
                    "query.appVersion",
                    "invalid",
                    f"appVersion must be a version (1.4.2, 2.0.0-beta.1, v3) of at most "
                    f"{_APP_VERSION_MAX} characters.",
                )
            ]
        )
    if context.app_version is None:
        context.app_version = raw
    return context


_CLIENT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["flags"],
    "properties": {
        "flags": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["enabled", "variant", "value"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    "variant": {"type": ["string", "null"]},
                    "value": {},
                },
            },
        }
    },
}


def admin_flag_routes(
    runtime: FlagsRuntime, settings: Settings, access: AccessPolicy
) -> list[BaseRoute]:
    """Return the ``/admin/features`` and ``/admin/segments`` routes.

    Nothing when ``flags.admin_routes`` is off or the flags have no store (no database).
    """
    store = runtime.store
    if not settings.flags.admin_routes or store is None:
        return []
    return FlagAdmin(runtime, store, access).routes()


class FlagAdmin:
    """The operators' endpoints over one runtime's store.

    Args:
        runtime: the flags runtime (its ``flags`` answer ``evaluate``).
        store: where flags are read and written.
        access: the admin access policy operators pass.
    """

    def __init__(self, runtime: FlagsRuntime, store: FlagStore, access: AccessPolicy) -> None:
        self._runtime = runtime
        self._store = store
        self._access = access

    def routes(self) -> list[BaseRoute]:
        """Return the routes; the fixed paths come before ``{key}`` so they win."""
        features, segments = FEATURES_PREFIX, SEGMENTS_PREFIX
        return [
            self._route(features, self.list_flags),
            self._route(features, self.create_flag, "POST", body=BODY_MAX),
            self._route(f"{features}/export", self.export),
            self._route(f"{features}/import", self.import_flags, "POST", body=IMPORT_MAX),
            self._route(f"{features}/{{key}}", self.get_flag),
            self._route(f"{features}/{{key}}", self.replace_flag, "PUT", body=BODY_MAX),
            self._route(f"{features}/{{key}}", self.delete_flag, "DELETE"),
            self._route(f"{features}/{{key}}/toggle", self.toggle, "POST"),
            self._route(f"{features}/{{key}}/evaluate", self.evaluate, "POST"),
            self._route(f"{features}/{{key}}/history", self.history),
            self._route(segments, self.list_segments),
            self._route(f"{segments}/{{name}}", self.get_segment),
            self._route(f"{segments}/{{name}}", self.put_segment, "PUT", body=BODY_MAX),
            self._route(f"{segments}/{{name}}", self.delete_segment, "DELETE"),
        ]

    async def list_flags(self, request: Request) -> Response:
        """``GET /admin/features``: every flag, by key."""
        stored = await self._store.list()
        return _json({"flags": [_flag_item(item) for item in stored]})

    async def create_flag(self, request: Request) -> Response:
        """``POST /admin/features``: a new flag (201); 409 when the key is taken."""
        actor, operator = await _who(request)
        flag = _flag(await _body(request))
        stored = await self._store.create(flag, actor=actor, operator=operator)
        location = f"{FEATURES_PREFIX}/{quote(stored.flag.key, safe='')}"
        return _json(_flag_item(stored), status=201, etag=stored.etag, location=location)

    async def get_flag(self, request: Request) -> Response:
        """``GET /admin/features/{key}``: the flag, its version and ``ETag``."""
        stored = await self._store.get(request.path_params["key"])
        if _none_match(request.headers.get("if-none-match"), stored.etag):
            return Response(status_code=304, headers={"etag": stored.etag})
        return _json(_flag_item(stored), etag=stored.etag)

    async def replace_flag(self, request: Request) -> Response:
        """``PUT /admin/features/{key}``: replace the flag whole (``If-Match`` required)."""
        actor, operator = await _who(request)
        key = request.path_params["key"]
        body = await _body(request)
        if isinstance(body, dict) and isinstance(body.get("flag"), dict):
            # GET's envelope sent back as it came.
            body = body["flag"]
        if isinstance(body, dict):
            named = body.setdefault("key", key)
            if named != key:
                raise InvalidInput(
                    errors=[FieldError("body.key", "mismatch", "key differs from the path's.")]
                )
        flag = _flag(body)
        version, etag = await self._precondition(request, await self._store.get(key))
        stored = await self._flag_write(
            key,
            self._store.update(
                flag, expected_version=version, expected_etag=etag, actor=actor, operator=operator
            ),
        )
        return _json(_flag_item(stored), etag=stored.etag)

    async def delete_flag(self, request: Request) -> Response:
        """``DELETE /admin/features/{key}`` (``If-Match`` required): 204."""
        actor, operator = await _who(request)
        key = request.path_params["key"]
        version, etag = await self._precondition(request, await self._store.get(key))
        await self._flag_write(
            key,
            self._store.delete(
                key, expected_version=version, expected_etag=etag, actor=actor, operator=operator
            ),
        )
        return Response(status_code=204, headers={"cache-control": "no-store"})

    async def toggle(self, request: Request) -> Response:
        """``POST /admin/features/{key}/toggle`` ``{"enabled": bool}`` (``If-Match`` required)."""
        actor, operator = await _who(request)
        key = request.path_params["key"]
        body = await _body(request)
        enabled = body.get("enabled") if isinstance(body, dict) else None
        if not isinstance(enabled, bool):
            raise InvalidInput(
                errors=[FieldError("body.enabled", "invalid", "enabled must be true or false.")]
            )
        version, etag = await self._precondition(request, await self._store.get(key))
        stored = await self._flag_write(
            key,
            self._store.toggle(
                key,
                enabled,
                expected_version=version,
                expected_etag=etag,
                actor=actor,
                operator=operator,
            ),
        )
        return _json(_flag_item(stored), etag=stored.etag)

    async def evaluate(self, request: Request) -> Response:
        """``POST /admin/features/{key}/evaluate`` ``{"context": {...}}``: value and why."""
        key = request.path_params["key"]
        body = await _body(request, allow_empty=True)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidInput(errors=[FieldError("body", "invalid", "must be a JSON object.")])
        raw = body.get("context") or {}
        if not isinstance(raw, dict):
            raise InvalidInput(
                errors=[FieldError("body.context", "invalid", "context must be an object.")]
            )
        context = context_from_mapping(raw, field="body.context")
        flags = self._runtime.flags
        if key not in flags.flag_set:
            # Stored but not compiled yet happens only between a write elsewhere and the
            # notification; the store decides whether the flag exists at all.
            await self._store.get(key)
            await self._runtime.refresh(trigger="admin")
        return _json(flags.explain(key, context))

    async def history(self, request: Request) -> Response:
        """``GET /admin/features/{key}/history?limit=50``: changes, newest first."""
        key = request.path_params["key"]
        limit = query_limit(
            request.query_params.get("limit"), default=HISTORY_DEFAULT, maximum=HISTORY_MAX
        )
        changes = await self._store.history(key, limit=limit)
        if not changes:
            await self._store.get(key)  # 404 for a key that never existed
        return _json({"key": key, "items": [_change_item(change) for change in changes]})

    async def export(self, request: Request) -> Response:
        """``GET /admin/features/export?format=bastion|unleash``: the whole set."""
        kind = request.query_params.get("format", "bastion")
        if kind not in ("bastion", "unleash"):
            raise InvalidInput(
                errors=[FieldError("query.format", "invalid", "format must be bastion or unleash.")]
            )
        revision, flags, segments = await self._store.snapshot()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        return _json(
            dump_document(flags, segments, kind),
            etag=_revision_etag(revision),
            disposition=f'attachment; filename="flags-{kind}-{stamp}.json"',
        )

    async def import_flags(self, request: Request) -> Response:
        """``POST /admin/features/import?mode=merge|replace``: a whole set, one transaction."""
        actor, operator = await _who(request)
        mode = request.query_params.get("mode", "merge")
        if mode not in ("merge", "replace"):
            raise InvalidInput(
                errors=[FieldError("query.mode", "invalid", "mode must be merge or replace.")]
            )
        expected_revision = _if_revision(request.headers.get("if-match"))
        raw = await _raw_body(request, limit=IMPORT_MAX)
        # Thousands of flags take a while to validate: off the event loop, so the
        # instance keeps answering meanwhile.
        flags, segments, fields = await asyncio.to_thread(
            _parse_import, raw, flags_environment(self._runtime.settings)
        )
        try:
            report = await self._store.import_flags(
                flags,
                segments,
                actor=actor,
                operator=operator,
                replace=mode == "replace",
                fields=fields,
                expected_revision=expected_revision,
            )
        except FlagVersionMismatch as exc:
            raise PreconditionFailed(
                "The flags changed since the export named in If-Match: export them again.",
                headers={"etag": _revision_etag(exc.current_version)},
                extra={"current_revision": exc.current_version},
            ) from None
        return _json(_jsonable(report))

    async def list_segments(self, request: Request) -> Response:
        """``GET /admin/segments``: every segment."""
        stored = await self._store.segments()
        return _json({"segments": [_segment_item(item) for item in stored]})

    async def get_segment(self, request: Request) -> Response:
        """``GET /admin/segments/{name}``: one segment and its ``ETag``."""
        stored = await self._store.get_segment(request.path_params["name"])
        etag = stored.etag
        if _none_match(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers={"etag": etag})
        return _json(_segment_item(stored), etag=etag)

    async def put_segment(self, request: Request) -> Response:
        """``PUT /admin/segments/{name}``: create it (201), or replace it (``If-Match``)."""
        actor, operator = await _who(request)
        name = request.path_params["name"]
        body = await _body(request)
        if isinstance(body, dict) and isinstance(body.get("segment"), dict):
            body = body["segment"]
        if isinstance(body, dict):
            named = body.setdefault("name", name)
            if named != name:
                raise InvalidInput(
                    errors=[FieldError("body.name", "mismatch", "name differs from the path's.")]
                )
        segment = _model(Segment, body)
        try:
            current: StoredSegment | None = await self._store.get_segment(name)
        except NotFound:
            current = None
        etag: str | None = None
        if current is None:
            if request.headers.get("if-match") is not None:
                raise PreconditionFailed(f"No segment {name!r} to match.")
            # Version 0: create only; a concurrent create of the name is 412, not overwritten.
            version = 0
        else:
            version, etag = await self._precondition(request, current)
        try:
            stored = await self._store.put_segment(
                segment,
                expected_version=version,
                expected_etag=etag,
                actor=actor,
                operator=operator,
            )
        except FlagVersionMismatch as exc:
            raise await self._stale_segment(name, exc) from None
        status = 201 if current is None else 200
        location = f"{SEGMENTS_PREFIX}/{quote(name, safe='')}" if current is None else None
        return _json(_segment_item(stored), status=status, etag=stored.etag, location=location)

    async def delete_segment(self, request: Request) -> Response:
        """``DELETE /admin/segments/{name}`` (``If-Match`` required): 204; 409 while in use."""
        actor, operator = await _who(request)
        name = request.path_params["name"]
        current = await self._store.get_segment(name)
        version, etag = await self._precondition(request, current)
        try:
            await self._store.delete_segment(
                name, expected_version=version, expected_etag=etag, actor=actor, operator=operator
            )
        except FlagVersionMismatch as exc:
            raise await self._stale_segment(name, exc) from None
        return Response(status_code=204, headers={"cache-control": "no-store"})

    async def _precondition(
        self, request: Request, current: StoredFlag | StoredSegment
    ) -> tuple[int, str]:
        """The version and ETag a write may replace (``If-Match``): 428 without it, 412 if stale.

        Both go to the store, which compares them with the row it locks: the
        version alone would match a flag deleted and created again since this read.
        """
        etag = current.etag
        raw = request.headers.get("if-match")
        if raw is None:
            raise PreconditionRequired(
                "This change needs If-Match with the ETag of the version it replaces: "
                "read it first, so a concurrent change is not silently overwritten.",
                headers={"etag": etag},
            )
        tags = [tag.strip() for tag in raw.split(",") if tag.strip()]
        # If-Match compares strongly (RFC 9110 13.1.1): a weak tag never matches.
        if "*" in tags or etag in tags:
            version: int = current.version
            return version, etag
        raise PreconditionFailed(
            "The resource changed since the ETag sent in If-Match: "
            "re-read it and apply the change again.",
            headers={"etag": etag},
            extra={"current_version": current.version},
        )

    async def _flag_write(self, key: str, write: Awaitable[Any]) -> Any:
        """Await ``write``; a race lost inside the store's transaction is 412 with the ETag."""
        try:
            return await write
        except FlagVersionMismatch as exc:
            etag = exc.current_etag
            if etag is None:
                try:
                    etag = (await self._store.get(key)).etag
                except NotFound:
                    raise exc from None
            raise PreconditionFailed(
                exc.detail, headers={"etag": etag}, extra={"current_version": exc.current_version}
            ) from None

    async def _stale_segment(self, name: str, exc: FlagVersionMismatch) -> BastionError:
        etag = exc.current_etag
        if etag is None:
            try:
                etag = (await self._store.get_segment(name)).etag
            except NotFound:
                return exc
        return PreconditionFailed(
            exc.detail, headers={"etag": etag}, extra={"current_version": exc.current_version}
        )

    def _route(
        self, path: str, endpoint: Endpoint, method: str = "GET", *, body: int | None = None
    ) -> Route:
        access = self._access
        route: Route

        async def serve(request: Request) -> Response:
            # FastAPI's router records scope["route"] (the access log's and metrics'
            # template) only for its own APIRoutes.
            request.scope.setdefault("route", route)
            access.require(request, subject="/admin", realm=_REALM)
            return await endpoint(request)

        if body is not None:
            # A flag document is bounded by its own limits (bytes, flags, rules, values),
            # which say more than the request guards' defaults: a legitimate import of
            # thousands of flags holds far more than 10,000 JSON values, and a flag's JSON
            # value may itself nest 32 levels inside the document's own.
            limits(body=body, json_max_depth=_DOCUMENT_DEPTH, json_max_elements=body)(serve)
        route = Route(path, serve, methods=[method], include_in_schema=False)
        return route


async def _who(request: Request) -> tuple[Actor, str | None]:
    """Who writes: ``(actor, claimed operator name)``.

    The actor is the identity principal the request authenticates (bound by
    identity, or an API key in identity's API-key header beside the admin token),
    else :data:`OPERATOR`, with the name ``X-Operator`` claims, if any: the shared
    admin token says nothing of who holds it, so the name is recorded as claimed.

    Raises:
        InvalidInput: ``X-Operator`` is not a name (422).
        Unauthenticated: the API key sent does not authenticate (401): a write
            that names a key must not pass for the anonymous operator's.
    """
    claimed = _claimed_operator(request.headers.get(OPERATOR_HEADER))
    principal = current_principal() or await _api_key_principal(request)
    if principal is not None:
        # Authenticated: a claim beside it adds nothing the principal does not say.
        return _actor_of(principal), None
    return OPERATOR, claimed


def _claimed_operator(raw: str | None) -> str | None:
    """``X-Operator``'s name; headers arrive as latin-1, so UTF-8 is decoded again."""
    if raw is None:
        return None
    try:
        text = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        text = "\x00"  # not UTF-8: refused by the check below, as any unprintable name
    return check_operator(text, field=f"header.{OPERATOR_HEADER}")


async def _api_key_principal(request: Request) -> Principal | None:
    """The principal of an API key in identity's API-key header, if one is sent.

    Identity leaves ``/admin`` alone (its bearer token is the operators'), so
    the key an operator sends beside the admin token is checked here.
    """
    runtime = getattr(request.app.state, "bastion", None)
    identity: Identity | None = getattr(runtime, "identity", None)
    if identity is None:
        return None
    raw = request.headers.get(identity.settings.identity.api_keys.header)
    if raw is None:
        return None
    store = identity.api_key_store
    if store is None:
        raise InvalidApiKey
    verified = await identity.api_keys.authenticate(raw.strip(), store.get)
    record = verified.record
    return Principal(record.id, "api_key", record.tenant, scopes=frozenset(record.scopes))


def _actor_of(principal: Principal) -> Actor:
    kinds = {"user": ActorType.USER, "api_key": ActorType.API_KEY, "service": ActorType.SERVICE}
    return Actor(kinds[principal.kind], principal.subject)


def _revision_etag(revision: int) -> str:
    """The ETag of the whole set at ``revision`` (export's; import's ``If-Match``)."""
    return f'"r{revision}"'


def _if_revision(raw: str | None) -> int | None:
    """The revision an import's ``If-Match`` names; ``None`` without one (or ``*``)."""
    if raw is None or raw.strip() == "*":
        return None
    tag = raw.strip()
    digits = tag.removeprefix('"r').removesuffix('"')
    if tag.startswith('"r') and tag.endswith('"') and digits.isascii() and digits.isdigit():
        return int(digits)
    raise PreconditionFailed(
        'An import\'s If-Match names the ETag of an export ("r<revision>"): '
        "export the flags again and send its ETag."
    )


def _parse_import(
    raw: bytes, environment: str
) -> tuple[list[Flag], list[Segment], frozenset[str] | None]:
    """Parse and validate an import (run in a worker thread: it may take a while)."""
    document = _loads(raw, allow_empty=False)
    flags, segments = parse_document(document, field="body", environment=environment)
    return flags, segments, import_fields(document)


async def _body(request: Request, *, limit: int = BODY_MAX, allow_empty: bool = False) -> Any:
    """The request's JSON body; 413 beyond ``limit``, 422 when it is not JSON."""
    return _loads(await _raw_body(request, limit=limit), allow_empty=allow_empty)


async def _raw_body(request: Request, *, limit: int) -> bytes:
    """The request's body, read no further than ``limit`` bytes (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _loads(raw: bytes, *, allow_empty: bool) -> Any:
    """``raw`` as JSON; 422 when it is empty (unless allowed) or not JSON."""
    if not raw.strip():
        if allow_empty:
            return None
        raise InvalidInput(errors=[FieldError("body", "missing", "a JSON body is required.")])
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput(
            "The body is not JSON.", errors=[FieldError("body", "invalid_json", "not valid JSON.")]
        ) from None


def _too_large(limit: int) -> BastionError:
    return BastionError(f"The body exceeds {limit} bytes.", code=ErrorCode.PAYLOAD_TOO_LARGE)


def _flag(body: Any) -> Flag:
    return _model(Flag, body)


def _model(model: type[M], body: Any, field: str = "body") -> M:
    """Validate ``body`` as ``model``; 422 with one field error per problem."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput(errors=validation_errors(exc, field)) from None


def _none_match(raw: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if raw is None:
        return False
    for tag in raw.split(","):
        tag = tag.strip()  # noqa: PLW2901 -- the header's own list item, trimmed
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _flag_item(stored: StoredFlag) -> dict[str, Any]:
    return {
        "flag": stored.flag.model_dump(mode="json"),
        "version": stored.version,
        "etag": stored.etag,
        "created_at": stored.created_at,
        "updated_at": stored.updated_at,
        "updated_by": stored.updated_by,
    }


def _segment_item(stored: StoredSegment) -> dict[str, Any]:
    return {
        "segment": stored.segment.model_dump(mode="json"),
        "version": stored.version,
        "etag": stored.etag,
        "updated_at": stored.updated_at,
        "updated_by": stored.updated_by,
    }


def _change_item(change: FlagChange) -> dict[str, Any]:
    return {
        "id": change.id,
        "kind": change.kind,
        "key": change.key,
        "action": change.action,
        "version": change.version,
        "actor": change.actor,
        "at": change.at,
        "before": change.before,
        "after": change.after,
    }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _json(
    body: Any,
    *,
    status: int = 200,
    etag: str | None = None,
    location: str | None = None,
    disposition: str | None = None,
) -> Response:
    headers = {"cache-control": "no-store"}
    if etag is not None:
        headers["etag"] = etag
    if location is not None:
        headers["location"] = location
    if disposition is not None:
        headers["content-disposition"] = disposition
    return Response(
        orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
