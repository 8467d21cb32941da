"""External identity providers: verifying an OIDC issuer's access tokens.

An :class:`OidcProvider` trusts one issuer. It reads the issuer's discovery
document (``/.well-known/openid-configuration``) and its JWKS through the
resilience pipeline ``oidc`` (:func:`bastion.resilience.http_client`), keeps
both in process memory for the ``max-age`` the issuer sends (bounded), and
verifies tokens with the rules of bastion's own verifier: length bound, strict
base64url, a header that may not bring or point at its own key, the algorithm
pinned by the key (never taken from the token), then ``iss`` (the discovery
document's issuer), ``aud``, ``exp``/``nbf``/``iat`` with leeway. ``typ`` is not
required, since issuers vary. The verified claims are mapped to a
:class:`~bastion.identity._principal.Principal` by a :class:`ClaimMapping`.

Keys and the issuer's outages::

    fresh (max-age) ──▶ stale: used, refreshed in the background
                        └──▶ past max_stale with no successful refresh: dropped
    no keys ──▶ fetched inline; the issuer unreachable ──▶ 503 SERVICE_UNAVAILABLE

A token whose ``kid`` is unknown makes the provider fetch the JWKS again (the
issuer rotated its keys), at most once per ``refresh_interval``, and one fetch
serves every request waiting for it, so a flood of made-up ``kid`` values costs
the issuer one request per interval. A failed fetch is not retried before
``retry_interval``: requests in between are answered from what is cached, or
503 when nothing is.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bastion.errors import BastionError, ConfigurationError, ServiceUnavailable
from bastion.identity._jose import B64URL, b64decode, json_segment, number, split_compact
from bastion.identity._keys import MIN_RSA_BITS, SigningKey
from bastion.identity._principal import Principal
from bastion.identity._tokens import InvalidToken
from bastion.observability._metrics import AUTH_ATTEMPTS, IDENTITY_OIDC_FETCHES
from bastion.resilience import http_client

__all__ = [
    "DEFAULT_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "ClaimMapping",
    "OidcClaims",
    "OidcProvider",
    "OidcUnavailable",
]

logger = structlog.get_logger("bastion.identity")

SUPPORTED_ALGORITHMS: Final = frozenset(
    {"EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
"""Algorithms an external token may be signed with; never ``none`` nor an HMAC."""
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
"""Accepted unless configured otherwise: one RSA algorithm, so an RSA key published
without ``alg`` (Microsoft Entra does) is unambiguous."""

MAX_TOKEN_LENGTH: Final = 16384
"""Longest token looked at. An issuer's tokens grow with groups (Entra, Keycloak)."""
MAX_DOCUMENT_BYTES: Final = 512 * 1024
"""Largest discovery document or JWKS read; a larger body is a failed fetch."""

_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
# A token may not tell us where to find its key (jku, x5u), bring its own (jwk,
# x5c) or demand extensions we do not implement (crit). ``x5t`` is allowed, unlike
# in bastion's own tokens: Entra puts it beside ``kid``, and it is never used.
_FORBIDDEN_HEADER: Final = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
# ``typ`` is optional; when present it must name a JWT or an access token, so an
# issuer's logout or event tokens (``logout+jwt``, ``secevent+jwt``) are refused.
_ACCEPTED_TYP: Final = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
_RSA_FAMILY: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_ES384_COORD: Final = 48
_PUBLIC_MEMBERS: Final = ("kty", "crv", "x", "y", "n", "e")


class OidcUnavailable(ServiceUnavailable):
    """The issuer's keys are not known and cannot be fetched now (503, ``Retry-After``).

    Attributes:
        provider: the provider's name.
    """

    def __init__(self, provider: str, retry_after: float) -> None:
        super().__init__(
            "The identity provider that issued this token cannot be reached; try again later.",
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
        )
        self.provider = provider


class _BadDocument(Exception):
    """A discovery document or JWKS that cannot be used (the message is for the log)."""


class _Key(Protocol):
    """A verification key with its algorithm pinned (``SigningKey`` or :class:`_ExtraKey`)."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    def verify(self, signature: bytes, signing_input: bytes) -> bool: ...


@dataclass(frozen=True, slots=True, eq=False)
class _ExtraKey:
    """RS384/RS512/PS256/PS384/PS512 and ES384: what bastion's own key set does not sign with."""

    kid: str
    alg: str
    _public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = field(repr=False)

    def verify(self, signature: bytes, signing_input: bytes) -> bool:
        digest = _HASHES[self.alg[2:]]()
        public = self._public
        try:
            if isinstance(public, ec.EllipticCurvePublicKey):
                if len(signature) != 2 * _ES384_COORD:
                    return False
                der = encode_dss_signature(
                    int.from_bytes(signature[:_ES384_COORD], "big"),
                    int.from_bytes(signature[_ES384_COORD:], "big"),
                )
                public.verify(der, signing_input, ec.ECDSA(digest))
            elif self.alg.startswith("PS"):
                # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash.
                pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
                public.verify(signature, signing_input, pss, digest)
            else:
                public.verify(signature, signing_input, padding.PKCS1v15(), digest)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Which claims of an issuer's token name the principal, the tenant and the roles.

    A claim is named by its key; when no claim has that exact key and the name has
    dots, it is read as a path into nested objects (``realm_access.roles`` in
    Keycloak). Exact keys win, so Auth0's ``https://example.com/roles`` works.

    Example:
        >>> ClaimMapping(tenant_claim="org_id", roles_claim="groups",
        ...              role_map={"docs-admins": ("admin",), "staff": ("member",)})

    Args:
        subject_claim: the principal's id; a non-empty string, else the token is refused.
        tenant_claim: the tenant's id; a token without it is refused unless
            ``tenant`` gives a default. ``None``: the tenant is ``tenant``.
        tenant: a fixed tenant (an issuer per tenant), or the default for ``tenant_claim``.
        roles_claim: a list of strings, or one space-separated string (``scope``,
            ``scp``); missing means no roles. ``None``: never any roles.
        role_map: issuer values to bastion roles; with it, unmapped values are
            dropped. Without it, the values are the roles.
        subject_prefix: put before the subject (``"okta:"``), so an issuer's ids can
            never equal those of bastion's own users.
    """

    subject_claim: str = "sub"
    tenant_claim: str | None = None
    tenant: str | None = None
    roles_claim: str | None = "roles"
    role_map: Mapping[str, Sequence[str]] | None = None
    subject_prefix: str = ""

    def subject(self, claims: Mapping[str, Any]) -> str:
        """Return the mapped subject.

        Raises:
            InvalidToken: the claim is missing, empty or not a string.
        """
        value = _claim(claims, self.subject_claim)
        if not isinstance(value, str) or not value:
            raise InvalidToken
        return self.subject_prefix + value

    def tenant_of(self, claims: Mapping[str, Any]) -> str | None:
        """Return the mapped tenant, or ``None`` when the mapping names none.

        Raises:
            InvalidToken: ``tenant_claim`` is set, the token lacks it and there is no default.
        """
        if self.tenant_claim is None:
            return self.tenant
        value = _claim(claims, self.tenant_claim)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value:
            return value
        if self.tenant is not None:
            return self.tenant
        raise InvalidToken

    def roles(self, claims: Mapping[str, Any]) -> frozenset[str]:
        """Return the mapped roles (never raises: odd values are ignored)."""
        if self.roles_claim is None:
            return frozenset()
        value = _claim(claims, self.roles_claim)
        if isinstance(value, str):
            raw = value.split()
        elif isinstance(value, list):
            raw = [item for item in value if isinstance(item, str)]
        else:
            return frozenset()
        if self.role_map is None:
            return frozenset(raw)
        return frozenset(role for item in raw for role in self.role_map.get(item, ()))


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


@dataclass(frozen=True, slots=True)
class OidcClaims:
    """A verified external token, mapped.

    Attributes:
        principal: who the request acts as (``kind="user"``).
        issuer: ``iss``, equal to the discovery document's issuer.
        subject: the raw ``sub`` (the mapped one is ``principal.subject``).
        audience: ``aud`` as sent.
        expires_at: ``exp``, epoch seconds.
        issued_at: ``iat``, if the token had one.
        claims: every claim as sent, unvalidated beyond the above.
    """

    principal: Principal
    issuer: str
    subject: str | None
    audience: str | tuple[str, ...]
    expires_at: float
    issued_at: float | None
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Cached:
    """A fetched document: used while ``now < usable_until``, refreshed after ``fresh_until``."""

    fresh_until: float
    usable_until: float


@dataclass(frozen=True, slots=True)
class _Discovery(_Cached):
    issuer: str
    jwks_uri: str


@dataclass(frozen=True, slots=True)
class _Jwks(_Cached):
    keys: Mapping[str, _Key]
    only: _Key | None  # the one key, for a token without ``kid``


class OidcProvider:
    """Verifies access tokens from one external OIDC issuer and maps them to a principal.

    Example:
        >>> okta = OidcProvider(
        ...     "https://example.okta.com/oauth2/default",
        ...     audience="api://docs",
        ...     mapping=ClaimMapping(tenant_claim="org", roles_claim="groups"),
        ... )
        >>> principal = await okta.authenticate(bearer_token)
        >>> await okta.aclose()

    Durations are seconds (a ``float``) or a ``timedelta``.

    Args:
        issuer: the issuer URL; ``https``, or ``http`` on a loopback address. The
            discovery document must name exactly this issuer.
        audience: the ``aud`` a token must carry (one of, when it lists several).
        mapping: claims to principal, tenant and roles.
        algorithms: accepted algorithms (of :data:`SUPPORTED_ALGORITHMS`). A key
            without ``alg`` takes its algorithm from ``kty``/``crv`` when only one
            accepted algorithm fits (Ed25519, P-256, P-384; RSA when one RSA
            algorithm is accepted); otherwise it is skipped.
        name: the provider's name in logs, metrics and the error.
        dependency: the resilience pipeline the fetches go through.
        client: an httpx client to fetch with (default: ``http_client(dependency)``,
            closed by :meth:`aclose`; a given one is the caller's to close).
        jwks_uri: fetch the JWKS from here and skip discovery (``iss`` must then
            equal ``issuer``).
        leeway: clock skew tolerated on ``exp``, ``nbf`` and ``iat``, seconds.
        default_max_age: how long documents stay fresh when the issuer sends no
            ``max-age``, seconds.
        min_max_age: lower bound of freshness (``no-cache`` counts as 0), seconds.
        max_max_age: upper bound of freshness, seconds.
        max_stale: how long past freshness documents stay usable while the issuer
            cannot be reached, seconds (then tokens are answered 503).
        refresh_interval: least time between two fetches caused by unknown ``kid``s.
        retry_interval: least time between a failed fetch and the next attempt.
        fetch_timeout: time allowed for one refresh (discovery and JWKS), seconds.
        clock: monotonic seconds (cache ages); injected by tests.
        wall: epoch seconds (token times); injected by tests.

    Raises:
        ConfigurationError: the issuer URL, an algorithm or a bound is invalid.
    """

    def __init__(
        self,
        issuer: str,
        *,
        audience: str,
        mapping: ClaimMapping | None = None,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        name: str = "oidc",
        dependency: str = "oidc",
        client: httpx.AsyncClient | None = None,
        jwks_uri: str | None = None,
        leeway: float | timedelta = 30.0,
        default_max_age: float | timedelta = 300.0,
        min_max_age: float | timedelta = 60.0,
        max_max_age: float | timedelta = 86400.0,
        max_stale: float | timedelta = 3600.0,
        refresh_interval: float | timedelta = 60.0,
        retry_interval: float | timedelta = 5.0,
        fetch_timeout: float | timedelta = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        leeway, default_max_age, min_max_age, max_max_age = map(
            _seconds, (leeway, default_max_age, min_max_age, max_max_age)
        )
        max_stale, refresh_interval, retry_interval, fetch_timeout = map(
            _seconds, (max_stale, refresh_interval, retry_interval, fetch_timeout)
        )
        _check_url(issuer, "issuer")
        if jwks_uri is not None:
            _check_url(jwks_uri, "jwks_uri")
        if not audience:
            raise ConfigurationError(f"OIDC provider {name!r}: an audience is required")
        unknown = set(algorithms) - SUPPORTED_ALGORITHMS
        if unknown or not algorithms:
            raise ConfigurationError(
                f"OIDC provider {name!r}: algorithms must be some of"
                f" {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )
        if not 0 <= min_max_age <= default_max_age <= max_max_age:
            raise ConfigurationError(
                f"OIDC provider {name!r}: need 0 <= min_max_age <= default_max_age <= max_max_age"
            )
        self.issuer = issuer
        self.audience = audience
        self.mapping = mapping or ClaimMapping()
        self.algorithms = frozenset(algorithms)
        self.name = name
        self.leeway = leeway
        self.default_max_age = default_max_age
        self.min_max_age = min_max_age
        self.max_max_age = max_max_age
        self.max_stale = max_stale
        self.refresh_interval = refresh_interval
        self.retry_interval = retry_interval
        self.fetch_timeout = fetch_timeout
        self._jwks_uri = jwks_uri
        self._own_client = client is None
        if client is None:
            client = http_client(dependency, follow_redirects=False)
        self._client = client
        self._clock = clock
        self._wall = wall
        self._discovery: _Discovery | None = None
        self._jwks: _Jwks | None = None
        self._inflight: asyncio.Task[_Jwks] | None = None
        self._last_fetch = -math.inf  # start of the last fetch, successful or not
        self._failed_at = -math.inf  # end of the last failed fetch

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> OidcProvider:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel a refresh in progress and close the HTTP client if it is the provider's own."""
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._own_client:
            await self._client.aclose()

    async def ping(self) -> bool:
        """Return whether usable keys are held, fetching them if allowed (never raises).

        Not a readiness check to make critical: an issuer outage would then take
        down every instance, also for the requests that do not use it.
        """
        try:
            await self._current_keys()
        except OidcUnavailable:
            return False
        return True

    # -- verification ------------------------------------------------------------

    async def authenticate(self, token: str | bytes) -> Principal:
        """Verify ``token`` and return its principal.

        Raises:
            InvalidToken: the token is not a valid token of this issuer for this
                audience (401; ``expired`` set for a genuine expired one).
            OidcUnavailable: no usable keys and the issuer cannot be reached (503).
        """
        return (await self.verify(token)).principal

    async def verify(self, token: str | bytes) -> OidcClaims:
        """Verify ``token`` and return its mapped claims.

        Raises:
            InvalidToken: as :meth:`authenticate`.
            OidcUnavailable: as :meth:`authenticate`.
        """
        try:
            claims = await self._verify(token)
        except InvalidToken as exc:
            AUTH_ATTEMPTS.labels("oidc", "expired" if exc.expired else "invalid").inc()
            raise
        except OidcUnavailable:
            AUTH_ATTEMPTS.labels("oidc", "unavailable").inc()
            raise
        AUTH_ATTEMPTS.labels("oidc", "success").inc()
        return claims

    async def _verify(self, token: str | bytes) -> OidcClaims:
        # Everything that needs no key is checked before the keys are looked at, so
        # garbage never makes the provider fetch anything.
        try:
            header, signing_input, body, signature = split_compact(token, MAX_TOKEN_LENGTH)
        except ValueError:
            raise InvalidToken from None
        if not _FORBIDDEN_HEADER.isdisjoint(header):
            raise InvalidToken
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            raise InvalidToken
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms or not (kid is None or (isinstance(kid, str) and kid)):
            raise InvalidToken
        key = await self._key_for(kid)
        # The algorithm comes from the key, never from the token: ``none``, HS256
        # keyed with an RSA public key, or RS256 against an EC key stop here.
        if key is None or key.alg != alg:
            raise InvalidToken
        if not key.verify(signature, signing_input):
            raise InvalidToken
        try:
            claims = json_segment(body)
        except ValueError:
            raise InvalidToken from None
        if not isinstance(claims, dict):
            raise InvalidToken
        return self._check_claims(claims)

    def _check_claims(self, claims: dict[str, Any]) -> OidcClaims:
        aud = claims.get("aud")
        exp = number(claims.get("exp"))
        if (
            # The discovery document was checked to name exactly this issuer.
            claims.get("iss") != self.issuer
            or not (aud == self.audience or (isinstance(aud, list) and self.audience in aud))
            or exp is None
        ):
            raise InvalidToken
        iat = nbf = None
        if "iat" in claims and (iat := number(claims["iat"])) is None:
            raise InvalidToken
        if "nbf" in claims and (nbf := number(claims["nbf"])) is None:
            raise InvalidToken
        now = self._wall()
        if (iat is not None and iat > now + self.leeway) or (
            nbf is not None and nbf > now + self.leeway
        ):
            raise InvalidToken
        if exp <= now - self.leeway:
            raise InvalidToken(expired=True)
        mapping = self.mapping
        principal = Principal(
            mapping.subject(claims),
            kind="user",
            tenant_id=mapping.tenant_of(claims),
            roles=mapping.roles(claims),
            issuer=self.issuer,
        )
        sub = claims.get("sub")
        return OidcClaims(
            principal=principal,
            issuer=self.issuer,
            subject=sub if isinstance(sub, str) else None,
            audience=tuple(aud) if isinstance(aud, list) else aud,
            expires_at=exp,
            issued_at=iat,
            claims=claims,
        )

    # -- keys --------------------------------------------------------------------

    async def _key_for(self, kid: str | None) -> _Key | None:
        """Return the key for ``kid`` (a token without one: the set's only key), or ``None``."""
        jwks = await self._current_keys()
        key = jwks.only if kid is None else jwks.keys.get(kid)
        if key is None and kid is not None:
            # Perhaps the issuer rotated: look again, but at most once per interval.
            now = self._clock()
            if now - self._last_fetch >= self.refresh_interval or self._inflight is not None:
                logger.info("identity.oidc_unknown_kid", provider=self.name, kid=kid[:64])
                with contextlib.suppress(OidcUnavailable):
                    jwks = await self._refresh()
                key = jwks.keys.get(kid)
        return key

    async def _current_keys(self) -> _Jwks:
        now = self._clock()
        jwks = self._jwks
        if jwks is not None and now >= jwks.usable_until:
            logger.warning("identity.oidc_keys_expired", provider=self.name)
            self._jwks = jwks = None
        if jwks is None:
            return await self._refresh()
        if now >= jwks.fresh_until and self._inflight is None and self._may_fetch(now):
            # Stale but usable: answer now, refresh for the next requests.
            _ = self._start_refresh()  # not awaited: its failure is logged by _fetch
        return jwks

    def _may_fetch(self, now: float) -> bool:
        return now - self._failed_at >= self.retry_interval

    def _start_refresh(self) -> asyncio.Task[_Jwks]:
        task = self._inflight
        if task is None:
            # An empty context: the fetch serves every waiting request, so it must
            # not inherit the deadline (or the trace) of the one that started it.
            task = asyncio.get_running_loop().create_task(
                self._fetch(), context=contextvars.Context()
            )
            self._inflight = task
            task.add_done_callback(self._fetched)
        return task

    def _fetched(self, task: asyncio.Task[_Jwks]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: a failed background refresh is logged, not raised

    async def _refresh(self) -> _Jwks:
        """Fetch the keys (joining a fetch in progress) and return them.

        Raises:
            OidcUnavailable: the fetch failed (or failed less than ``retry_interval``
                ago) and no usable keys are left.
        """
        now = self._clock()
        if self._inflight is None and not self._may_fetch(now):
            return self._fallback(self.retry_interval - (now - self._failed_at))
        try:
            # Shielded: a caller cancelled (its request timed out) leaves the fetch to the others.
            return await asyncio.shield(self._start_refresh())
        except _FETCH_ERRORS:
            return self._fallback(self.retry_interval)

    def _fallback(self, retry_after: float) -> _Jwks:
        jwks = self._jwks
        if jwks is not None and self._clock() < jwks.usable_until:
            return jwks
        raise OidcUnavailable(self.name, retry_after)

    async def _fetch(self) -> _Jwks:
        self._last_fetch = self._clock()
        try:
            async with asyncio.timeout(self.fetch_timeout):
                discovery = await self._fetch_discovery()
                jwks = await self._fetch_jwks(discovery)
        except _FETCH_ERRORS as exc:
            self._failed_at = self._clock()
            logger.warning(
                "identity.oidc_fetch_failed",
                provider=self.name,
                error=type(exc).__name__,
                reason=str(exc) if isinstance(exc, _BadDocument) else None,
                keys_held=self._jwks is not None,
            )
            raise
        self._jwks = jwks
        self._failed_at = -math.inf
        return jwks

    async def _fetch_discovery(self) -> _Discovery:
        now = self._clock()
        cached = self._discovery
        if self._jwks_uri is not None:
            return _Discovery(math.inf, math.inf, self.issuer, self._jwks_uri)
        if cached is not None and now < cached.fresh_until:
            return cached
        url = self.issuer.rstrip("/") + _DISCOVERY_PATH
        try:
            document, max_age = await self._get_json(url, "discovery")
            if not isinstance(document, dict):
                raise _BadDocument("the discovery document is not a JSON object")
            # OpenID Connect Discovery §4.3: the issuer must be exactly the one configured.
            if document.get("issuer") != self.issuer:
                raise _BadDocument("the discovery document names another issuer")
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise _BadDocument("the discovery document has no jwks_uri")
            try:
                _check_url(jwks_uri, "jwks_uri")
            except ConfigurationError as exc:
                raise _BadDocument(str(exc)) from None
        except _FETCH_ERRORS:
            if cached is not None and now < cached.usable_until:
                return cached  # the JWKS may still be reachable where discovery was not
            raise
        fresh = self._clock() + max_age
        self._discovery = discovery = _Discovery(
            fresh, fresh + self.max_stale, self.issuer, jwks_uri
        )
        return discovery

    async def _fetch_jwks(self, discovery: _Discovery) -> _Jwks:
        document, max_age = await self._get_json(discovery.jwks_uri, "jwks")
        keys = self._parse_jwks(document)
        fresh = self._clock() + max_age
        only = next(iter(keys.values())) if len(keys) == 1 else None
        return _Jwks(fresh, fresh + self.max_stale, keys, only)

    async def _get_json(self, url: str, document: str) -> tuple[Any, float]:
        """GET a JSON document, bounded in size; return it and its freshness in seconds."""
        outcome = "error"
        try:
            async with self._client.stream(
                "GET", url, headers={"accept": "application/json"}
            ) as response:
                if response.status_code != 200:  # noqa: PLR2004 - the one answer that carries the document
                    raise _BadDocument(f"{document} answered HTTP {response.status_code}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_DOCUMENT_BYTES:
                        raise _BadDocument(f"{document} is larger than {MAX_DOCUMENT_BYTES} bytes")
                    chunks.append(chunk)
                try:
                    parsed = orjson.loads(b"".join(chunks))
                except orjson.JSONDecodeError:
                    raise _BadDocument(f"{document} is not JSON") from None
                max_age = self._max_age(response.headers.get("cache-control"))
            outcome = "ok"
        finally:
            IDENTITY_OIDC_FETCHES.labels(self.name, document, outcome).inc()
        return parsed, max_age

    def _max_age(self, cache_control: str | None) -> float:
        value = self.default_max_age
        if cache_control:
            for directive in cache_control.lower().split(","):
                directive_name, _, argument = directive.strip().partition("=")
                if directive_name in ("no-cache", "no-store"):
                    value = 0.0
                    break
                if directive_name == "max-age" and argument.strip().strip('"').isdigit():
                    value = float(argument.strip().strip('"'))
        return min(max(value, self.min_max_age), self.max_max_age)

    def _parse_jwks(self, document: Any) -> dict[str, _Key]:
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise _BadDocument('the JWKS is not {"keys": [...]}')
        keys: dict[str, _Key] = {}
        skipped: list[str] = []
        for position, jwk in enumerate(entries):
            if not isinstance(jwk, dict):
                continue
            kid = jwk.get("kid")
            label = kid[:64] if isinstance(kid, str) else f"#{position}"
            if jwk.get("use", "sig") != "sig" or (
                isinstance(jwk.get("key_ops"), list) and "verify" not in jwk["key_ops"]
            ):
                continue  # an encryption key: not ours to look at
            try:
                key = self._key(jwk, kid if isinstance(kid, str) and kid else f"#{position}")
            except (ConfigurationError, ValueError, TypeError):
                skipped.append(label)
                continue
            if key is None:
                skipped.append(label)
            elif key.kid in keys:
                skipped.append(f"{label} (duplicate)")
            else:
                keys[key.kid] = key
        if skipped:
            logger.warning("identity.oidc_keys_skipped", provider=self.name, kids=skipped[:20])
        if not keys:
            raise _BadDocument("the JWKS holds no usable signing key")
        return keys

    def _key(self, jwk: Mapping[str, Any], kid: str) -> _Key | None:
        alg = jwk.get("alg")
        if alg is None:
            alg = self._infer_alg(jwk)
        if alg not in self.algorithms:
            return None
        if alg in ("EdDSA", "ES256", "RS256"):
            # Only public members: a private part in a published JWKS is never used.
            public = {name: jwk[name] for name in _PUBLIC_MEMBERS if name in jwk}
            return SigningKey.from_jwk({**public, "kid": kid, "alg": alg})
        return _extra_key(jwk, kid, alg)

    def _infer_alg(self, jwk: Mapping[str, Any]) -> str | None:
        kty, crv = jwk.get("kty"), jwk.get("crv")
        if kty == "OKP" and crv == "Ed25519":
            return "EdDSA"
        if kty == "EC":
            return {"P-256": "ES256", "P-384": "ES384"}.get(crv) if isinstance(crv, str) else None
        if kty == "RSA":
            rsa_algs = self.algorithms & _RSA_FAMILY
            return next(iter(rsa_algs)) if len(rsa_algs) == 1 else None
        return None


_FETCH_ERRORS: Final = (httpx.HTTPError, BastionError, _BadDocument, TimeoutError, OSError)
"""What a failed fetch raises: transport errors, the resilience pipeline's own
(circuit open, timed out, dependency failed), an unusable document, our timeout."""


def _extra_key(jwk: Mapping[str, Any], kid: str, alg: str) -> _Key | None:
    kty = jwk.get("kty")
    if alg == "ES384":
        if kty != "EC" or jwk.get("crv") != "P-384":
            return None
        numbers = ec.EllipticCurvePublicNumbers(
            _int_member(jwk, "x"), _int_member(jwk, "y"), ec.SECP384R1()
        )
        return _ExtraKey(kid, alg, numbers.public_key())
    if kty != "RSA":
        return None
    n, e = _int_member(jwk, "n"), _int_member(jwk, "e")
    if n.bit_length() < MIN_RSA_BITS:
        return None
    return _ExtraKey(kid, alg, rsa.RSAPublicNumbers(e, n).public_key())


def _check_url(url: str, what: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigurationError(f"the OIDC {what} is not a URL") from None
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ConfigurationError(
        f"the OIDC {what} must be an https URL (http only on a loopback address)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int_member(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not B64URL.fullmatch(value.encode()):
        raise ValueError(f"member {name!r} is not base64url")
    return int.from_bytes(b64decode(value.encode()), "big")


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
