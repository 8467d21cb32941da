"""API conventions, each implemented once for every route of the app.

Security headers, CORS and CSRF (:class:`SecurityMiddleware`); versions in the
path and their deprecation (:func:`deprecated`, ``Deprecation``/``Sunset``
headers, 410 after sunset); conditional requests (strong ETags from a version
column, ``If-None-Match`` 304, ``If-Match`` required on writes); and
``Idempotency-Key`` on the POST and PATCH routes that opt in (:func:`idempotent`).
:func:`bastion.install` wires the middleware; routes use the marks and the
dependencies.

Example:
    >>> from bastion.http import IfMatchVersion, etag_for, idempotent
    >>> @router.post("/v1/documents", status_code=201)
    ... @idempotent()
    ... async def create(payload: DocumentIn) -> DocumentOut: ...
"""

from bastion.http._conditional import (
    EntityTag,
    EntityTags,
    IfMatchVersion,
    IfNoneMatch,
    MalformedEntityTag,
    NotModified,
    etag_for,
    expected_version,
    if_match_version_of,
    not_modified,
    parse_entity_tags,
    precondition_responses,
    require_if_match,
    weak_etag_for_body,
)
from bastion.http._cors import CorsPolicy
from bastion.http._deprecation_usage import DeprecatedCall, DeprecationUsage
from bastion.http._idempotency import (
    REPLAYED_HEADER,
    IdempotencyKeyReused,
    IdempotencyMiddleware,
    IdempotentRoute,
    idempotent,
)
from bastion.http._idempotency_store import (
    IdempotencyRecord,
    IdempotencyStore,
    IdempotencyStoreError,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    SqlIdempotencyStore,
    StoredResponse,
    build_idempotency_store,
)
from bastion.http._security import CsrfFailed, SecurityMiddleware
from bastion.http._versioning import Deprecation, VersioningMiddleware, VersionSunset, deprecated

__all__ = [
    "REPLAYED_HEADER",
    "CorsPolicy",
    "CsrfFailed",
    "DeprecatedCall",
    "Deprecation",
    "DeprecationUsage",
    "EntityTag",
    "EntityTags",
    "IdempotencyKeyReused",
    "IdempotencyMiddleware",
    "IdempotencyRecord",
    "IdempotencyStore",
    "IdempotencyStoreError",
    "IdempotentRoute",
    "IfMatchVersion",
    "IfNoneMatch",
    "MalformedEntityTag",
    "MemoryIdempotencyStore",
    "NotModified",
    "RedisIdempotencyStore",
    "SecurityMiddleware",
    "SqlIdempotencyStore",
    "StoredResponse",
    "VersionSunset",
    "VersioningMiddleware",
    "build_idempotency_store",
    "deprecated",
    "etag_for",
    "expected_version",
    "idempotent",
    "if_match_version_of",
    "not_modified",
    "parse_entity_tags",
    "precondition_responses",
    "require_if_match",
    "weak_etag_for_body",
]
