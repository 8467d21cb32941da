"""Identity middleware: turns a request's credentials into its principal.

Pure ASGI, inside the request middleware (the context, with the client address,
exists) and outside the rate limiter (limits key on the principal). Per request
it scans the headers once and tries, in order:

1. ``Authorization: Bearer <token>``: an API key when the token starts with the
   key prefix, a configured OIDC issuer's token when its (unverified) ``iss``
   names one, else one of bastion's access tokens (with the deny list);
2. the API-key header (``identity.api_keys.header``);
3. the trusted tenant header (``tenancy.trusted_header``), from
   ``tenancy.trusted_networks`` only.

With the deny list (Redis), a token's user has its permissions looked up while
the deny list answers: two round trips in parallel, and the request's
``require()`` awaits that lookup instead of making its own. A request that
checks no permission has paid one Redis read for nothing, and no wait.

It rejects nothing: refused credentials bind no principal and leave the
refusal for :func:`~bastion.identity.authenticated` and
:func:`~bastion.identity.require` to raise, so a public route still answers a
request whose token expired.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Final

from bastion._forwarded import NetworkSet
from bastion._routes import PathSet
from bastion.context import current_context
from bastion.errors import ServiceUnavailable, Unauthenticated
from bastion.identity._api_keys import InvalidApiKey
from bastion.identity._jose import json_segment
from bastion.identity._principal import (
    Principal,
    bind_principal,
    clear_auth_failure,
    record_auth_failure,
    unbind_principal,
)
from bastion.identity._rbac import (
    bind_prefetched_permissions,
    bind_request_authorizer,
    unbind_prefetched_permissions,
    unbind_request_authorizer,
)
from bastion.identity._tokens import MAX_TOKEN_LENGTH, InvalidToken
from bastion.observability._metrics import AUTH_ATTEMPTS

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from bastion.identity._oidc import OidcProvider
    from bastion.identity._runtime import Identity

__all__ = ["IdentityMiddleware"]

_OUTCOMES: Final = ("success", "invalid", "expired", "revoked", "unavailable")
_COUNTERS: Final = {
    (method, outcome): AUTH_ATTEMPTS.labels(method, outcome)
    for method in ("token", "api_key", "trusted")
    for outcome in _OUTCOMES
}
_SERVICE: Final = "internal"
"""Subject of a trusted internal caller."""
_BEARER: Final = b"bearer "

Prefetched = asyncio.Future[frozenset[str]]
"""A user's permissions, looked up while the deny list is asked."""


class IdentityMiddleware:
    """Binds the request's :class:`~bastion.identity.Principal` from its credentials.

    Args:
        app: the wrapped ASGI app.
        identity: the app's identity component.
        skip_prefixes: paths left alone (health probes, metrics, ``/admin``, which
            have access policies of their own: their bearer tokens are not ours).
    """

    def __init__(
        self, app: ASGIApp, *, identity: Identity, skip_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.identity = identity
        settings = identity.settings
        self._skip = PathSet(skip_prefixes)
        self._api_key_header = settings.identity.api_keys.header.lower().encode("latin-1")
        self._api_key_prefix = (identity.api_keys.prefix + "_").encode("ascii")
        tenancy = settings.tenancy
        header = tenancy.trusted_header
        self._trusted_header = (
            header.lower().encode("latin-1")
            if header and tenancy.enabled and tenancy.trusted_networks
            else None
        )
        self._trusted_networks = NetworkSet(tenancy.trusted_networks)
        self._trusted_roles = frozenset(tenancy.trusted_roles)
        self._issuers: dict[str, OidcProvider] = {
            provider.issuer: provider for provider in identity.oidc.values()
        }
        self._store = identity.api_key_store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        authorization: bytes | None = None
        api_key: bytes | None = None
        tenant: bytes | None = None
        api_key_header, trusted_header = self._api_key_header, self._trusted_header
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == api_key_header:
                api_key = value
            elif name == trusted_header:
                tenant = value
        if (authorization is None and api_key is None and tenant is None) or (
            self._skip and self._skip.matches(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        try:
            principal, prefetched = await self._authenticate(authorization, api_key, tenant)
        except (Unauthenticated, ServiceUnavailable) as exc:
            recorded = record_auth_failure(exc)
            try:
                await self.app(scope, receive, send)
            finally:
                clear_auth_failure(recorded)
            return
        if principal is None:
            await self.app(scope, receive, send)
            return
        bound = bind_principal(principal)
        checker = bind_request_authorizer(self.identity.authorizer)
        if prefetched is None:
            try:
                await self.app(scope, receive, send)
            finally:
                unbind_request_authorizer(checker)
                unbind_principal(bound)
            return
        permissions = bind_prefetched_permissions(principal, prefetched)
        try:
            await self.app(scope, receive, send)
        finally:
            unbind_prefetched_permissions(permissions)
            unbind_request_authorizer(checker)
            unbind_principal(bound)
            # A route that checked nothing may have left the lookup running (the
            # answer is out by now).
            await _settle(prefetched)

    async def _authenticate(
        self, authorization: bytes | None, api_key: bytes | None, tenant: bytes | None
    ) -> tuple[Principal | None, Prefetched | None]:
        """Return the principal of the first credential present; ``None`` for none of ours.

        With it, a user's permissions when their lookup was started early.

        Raises:
            Unauthenticated: the credential is refused.
            ServiceUnavailable: it cannot be checked now.
        """
        # Another scheme (Basic...) is not ours to judge: the next credential is.
        if authorization is not None and authorization[:7].lower() == _BEARER:
            credential = authorization[7:].strip()
            if credential.startswith(self._api_key_prefix):
                return await self._api_key(credential), None
            return await self._token(credential)
        if api_key is not None:
            return await self._api_key(api_key.strip()), None
        if tenant is not None:
            return self._trusted(tenant), None
        return None, None

    async def _token(self, credential: bytes) -> tuple[Principal, Prefetched | None]:
        if self._issuers:
            issuer = _unverified_issuer(credential)
            provider = self._issuers.get(issuer) if issuer is not None else None
            if provider is not None:
                # The provider counts its own attempts (method="oidc").
                return await provider.authenticate(credential), None
        tokens = self.identity.tokens
        try:
            claims = tokens.verify(credential)
        except InvalidToken as exc:
            _COUNTERS["token", "expired" if exc.expired else "invalid"].inc()
            raise
        deny_list = tokens.deny_list
        prefetched: Prefetched | None = None
        if deny_list is not None:
            if claims.tenant:
                # Both are a Redis round trip: asked together, they cost about one.
                # Measured on the 2-core VM: the p50 added by a token fell from
                # +681 µs to +510 µs (bench/auth.py, token (redis)).
                prefetched = asyncio.ensure_future(
                    self.identity.permissions.permissions(claims.subject, claims.tenant)
                )
                prefetched.add_done_callback(_retrieved)
            try:
                revoked = await deny_list.is_revoked(
                    claims.token_id, subject=claims.subject, issued_at=claims.issued_at
                )
            except ServiceUnavailable:
                _COUNTERS["token", "unavailable"].inc()
                await _settle(prefetched)
                raise
            if revoked:
                _COUNTERS["token", "revoked"].inc()
                await _settle(prefetched)
                raise InvalidToken
        _COUNTERS["token", "success"].inc()
        session = claims.extra.get("sid")
        principal = Principal(
            claims.subject,
            "user",
            claims.tenant or None,
            frozenset(claims.roles),
            session_id=session if isinstance(session, str) else None,
            token_id=claims.token_id,
        )
        return principal, prefetched

    async def _api_key(self, credential: bytes) -> Principal:
        api_keys, store = self.identity.api_keys, self._store
        if store is None:
            _COUNTERS["api_key", "invalid"].inc()
            raise InvalidApiKey
        try:
            parsed = api_keys.parse(credential.decode("ascii", "replace"))
            # The store answers None for a key revoked on another instance (deny list).
            verified = api_keys.check(parsed, await store.get(parsed.public_id))
        except InvalidApiKey:
            _COUNTERS["api_key", "invalid"].inc()
            raise
        except ServiceUnavailable:
            _COUNTERS["api_key", "unavailable"].inc()
            raise
        _COUNTERS["api_key", "success"].inc()
        record = verified.record
        if verified.rehash:
            # Verified under a previous server secret: store the current one's hash, so
            # the old secret can leave identity.api_keys.previous_secrets.
            await store.rehash(record, verified.new_hash)
        await store.touch(record)
        return Principal(record.id, "api_key", record.tenant, scopes=frozenset(record.scopes))

    def _trusted(self, tenant: bytes) -> Principal | None:
        context = current_context()
        address = context.client_ip if context is not None else None
        if address is None or address not in self._trusted_networks:
            # Anyone can send the header: from elsewhere it means nothing.
            return None
        try:
            tenant_id = str(uuid.UUID(tenant.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            _COUNTERS["trusted", "invalid"].inc()
            raise Unauthenticated("The tenant header does not name a tenant id.") from None
        _COUNTERS["trusted", "success"].inc()
        return Principal(_SERVICE, "service", tenant_id, self._trusted_roles)


def _retrieved(future: Prefetched) -> None:
    """Mark a prefetch's failure as seen: a request that never checked must not log it."""
    if not future.cancelled():
        future.exception()


async def _settle(prefetched: Prefetched | None) -> None:
    """Let an unneeded permission lookup finish.

    Cancelled mid-query it would cost the pool a connection; left running it
    could outlive shutdown holding one.
    """
    if prefetched is not None and not prefetched.done():
        await asyncio.wait((prefetched,))


def _unverified_issuer(token: bytes) -> str | None:
    """The ``iss`` a JWT claims, read without verifying it: only to pick the verifier."""
    parts = token.split(b".")
    if len(token) > MAX_TOKEN_LENGTH or len(parts) != 3:  # noqa: PLR2004 -- a JWS has three parts
        return None
    try:
        claims: Any = json_segment(parts[1])
    except ValueError:
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None
