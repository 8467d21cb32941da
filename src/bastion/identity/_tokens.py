"""Access tokens: issuing and verifying short-lived JWTs signed by a key set.

An access token is a compact JWS (RFC 7515) with ``typ: at+jwt`` (RFC 9068)
whose claims are ``iss, aud, sub, tid, roles, jti, iat, exp`` (and ``nbf`` when
asked). Verification is a lean, strict parser rather than a general JOSE
library, chosen by measurement (``bench/auth.py``): it checks, in order, the
length bound, the three segments and their alphabet, the header (``typ``,
``kid`` of a configured key, ``alg`` equal to that key's pinned algorithm, no
``crit``/``jku``/``x5u``/``jwk``/``x5c``), the signature, then every claim with
its type. Any failure is one :class:`~bastion.errors.Unauthenticated` that says
only "expired" or "invalid".

Nothing is cached between calls, so a key removed from the set or a ``jti``
on the deny list takes effect on the next verification.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import orjson

from bastion._ids import uuid7_text
from bastion.errors import Unauthenticated
from bastion.identity._jose import json_segment, number, split_compact
from bastion.identity._keys import KeySet, b64url_encode
from bastion.settings import TokenSettings

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "MAX_TOKEN_LENGTH",
    "AccessClaims",
    "AccessTokens",
    "InvalidToken",
    "IssuedToken",
    "MemoryDenyList",
    "TokenDenyList",
]

ACCESS_TOKEN_TYPE: Final = "at+jwt"  # noqa: S105 - a media type (RFC 9068), not a secret
MAX_TOKEN_LENGTH: Final = 8192
"""Longest token looked at; longer input is refused before any decoding.
Ours are ~400 bytes (EdDSA) to ~800 (RS256 3072) with a handful of roles."""

# Header members we never honour: a token may not tell us where to find its key
# (jku, x5u), bring its own (jwk, x5c), or demand extensions we do not implement (crit).
_FORBIDDEN_HEADER: Final = frozenset({"jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256", "crit"})
_REQUIRED: Final = ("iss", "aud", "sub", "tid", "roles", "jti", "iat", "exp")
_RESERVED: Final = frozenset({*_REQUIRED, "nbf"})
_CHALLENGE_INVALID: Final = {"www-authenticate": 'Bearer error="invalid_token"'}
_CHALLENGE_EXPIRED: Final = {
    "www-authenticate": 'Bearer error="invalid_token", error_description="The token expired"'
}


class InvalidToken(Unauthenticated):
    """An access token failed verification (401 with a Bearer ``invalid_token`` challenge).

    Attributes:
        expired: the token was genuine but its ``exp`` has passed; the only
            reason ever told apart, so a client knows to refresh.
    """

    def __init__(self, *, expired: bool = False) -> None:
        super().__init__(
            "The access token expired." if expired else "The access token is invalid.",
            headers=_CHALLENGE_EXPIRED if expired else _CHALLENGE_INVALID,
        )
        self.expired = expired


@runtime_checkable
class TokenDenyList(Protocol):
    """Revoked access-token ids, checked after a token verifies.

    The next increment backs it with Redis (a key per ``jti`` expiring with the
    token), so a revocation holds on every instance at once.
    """

    async def is_revoked(
        self, jti: str, *, subject: str | None = None, issued_at: float | None = None
    ) -> bool:
        """Return whether the token was revoked.

        By its ``jti``, or as one of ``subject``'s tokens issued before a "log out
        everywhere" (``issued_at`` is its ``iat``).
        """
        ...


class MemoryDenyList:
    """A deny list in process memory: one process only (tests, development)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._until: dict[str, float] = {}
        self._subjects: dict[str, float] = {}
        self._clock = clock

    async def revoke(self, jti: str, until: float) -> None:
        """Deny ``jti`` until ``until`` (epoch seconds; the token's ``exp`` suffices)."""
        now = self._clock()
        self._until = {k: v for k, v in self._until.items() if v > now}
        self._until[jti] = until

    async def revoke_subject(self, subject: str, before: float | None = None) -> None:
        """Deny every token of ``subject`` issued before ``before`` (default now).

        Whole seconds, as ``iat`` is: a token issued in that second stays valid (the
        flow that revokes usually hands its caller a fresh one then). A later mark
        never moves back.
        """
        mark = math.floor(self._clock() if before is None else before)
        self._subjects[subject] = max(self._subjects.get(subject, -math.inf), mark)

    async def is_revoked(
        self, jti: str, *, subject: str | None = None, issued_at: float | None = None
    ) -> bool:
        """Return whether ``jti`` is denied now, or ``subject``'s tokens issued before its mark."""
        if self._until.get(jti, 0.0) > self._clock():
            return True
        if subject is None or issued_at is None:
            return False
        return issued_at < self._subjects.get(subject, -math.inf)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token.

    Attributes:
        subject: ``sub``, the user (or service) id.
        tenant: ``tid``, the tenant the token acts for; empty when it acts for none.
        roles: ``roles`` in that tenant.
        token_id: ``jti``, the handle for revocation.
        issued_at: ``iat``, epoch seconds.
        expires_at: ``exp``, epoch seconds.
        not_before: ``nbf``, epoch seconds, if the token had one.
        issuer: ``iss``.
        audience: ``aud`` as sent (a string or a list).
        extra: any other claims, unvalidated (what an application added at issue).
    """

    subject: str
    tenant: str
    roles: tuple[str, ...]
    token_id: str
    issued_at: float
    expires_at: float
    not_before: float | None
    issuer: str
    audience: str | tuple[str, ...]
    extra: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly signed access token and what a token response needs.

    Attributes:
        token: the compact JWT.
        token_id: its ``jti``.
        expires_at: its ``exp``, epoch seconds.
        expires_in: whole seconds of life, for the OAuth ``expires_in`` member.
    """

    token: str
    token_id: str
    expires_at: int
    expires_in: int


class AccessTokens:
    """Issues and verifies access tokens with one key set and one issuer/audience.

    Example:
        >>> tokens = AccessTokens(KeySet.from_jwks(generate_jwks()))
        >>> issued = tokens.issue("user-1", "tenant-1", ["member"])
        >>> tokens.verify(issued.token).subject
        'user-1'

    Args:
        keys: the signing key set (the first signs, all verify).
        issuer: ``iss`` put in and required.
        audience: ``aud`` put in and required (a token may list several).
        ttl: life of an issued token, seconds.
        leeway: clock skew tolerated on ``exp``, ``nbf`` and ``iat``, seconds.
        deny_list: revoked ``jti``s, consulted by :meth:`averify`.
        clock: epoch seconds (injected by tests).
    """

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str = "bastion",
        audience: str = "bastion",
        ttl: float = 900.0,
        leeway: float = 30.0,
        deny_list: TokenDenyList | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.leeway = leeway
        self.deny_list = deny_list
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        tokens: TokenSettings,
        *,
        keys: KeySet | None = None,
        environment: str = "development",
        deny_list: TokenDenyList | None = None,
    ) -> AccessTokens:
        """Build from ``identity.tokens``; ``keys`` default to :meth:`KeySet.from_settings`.

        Raises:
            ConfigurationError: no usable keys (see :meth:`KeySet.from_settings`).
        """
        return cls(
            keys if keys is not None else KeySet.from_settings(tokens, environment=environment),
            issuer=tokens.issuer,
            audience=tokens.audience,
            ttl=tokens.access_ttl,
            leeway=tokens.leeway,
            deny_list=deny_list,
        )

    def issue(
        self,
        subject: str,
        tenant: str,
        roles: Sequence[str],
        *,
        ttl: float | None = None,
        not_before: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> IssuedToken:
        """Sign a new access token with the newest key.

        Args:
            subject: ``sub``.
            tenant: ``tid``.
            roles: ``roles``.
            ttl: life in seconds instead of the configured one.
            not_before: ``nbf`` (epoch seconds), omitted when ``None``.
            extra: more claims (``scope``, ``sid``…); may not override the registered ones.

        Raises:
            ValueError: ``extra`` names a reserved claim.
            TypeError: ``roles`` is a string.
        """
        if isinstance(roles, str):
            raise TypeError("roles must be a sequence of role names, not a string")
        now = self._clock()
        iat = int(now)
        life = int(self.ttl if ttl is None else ttl)
        jti = uuid7_text(now)
        claims: dict[str, Any] = {}
        if extra:
            clash = _RESERVED.intersection(extra)
            if clash:
                raise ValueError(f"extra claims may not set {sorted(clash)}")
            claims.update(extra)
        claims.update(
            iss=self.issuer,
            aud=self.audience,
            sub=subject,
            tid=tenant,
            roles=list(roles),
            jti=jti,
            iat=iat,
            exp=iat + life,
        )
        if not_before is not None:
            claims["nbf"] = int(not_before)
        key = self.keys.signing_key
        header = {"alg": key.alg, "typ": ACCESS_TOKEN_TYPE, "kid": key.kid}
        signing_input = (
            b64url_encode(orjson.dumps(header)) + "." + b64url_encode(orjson.dumps(claims))
        )
        signature = key.sign(signing_input.encode("ascii"))
        token = f"{signing_input}.{b64url_encode(signature)}"
        return IssuedToken(token, jti, iat + life, life)

    def verify(self, token: str | bytes) -> AccessClaims:
        """Verify a token's signature and claims, without the deny list.

        Raises:
            InvalidToken: on anything wrong; ``expired`` tells an expired genuine token.
        """
        try:
            header, signing_input, body, signature = split_compact(token, MAX_TOKEN_LENGTH)
        except ValueError:
            raise InvalidToken from None
        if header.get("typ") != ACCESS_TOKEN_TYPE or not _FORBIDDEN_HEADER.isdisjoint(header):
            raise InvalidToken
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        # The algorithm comes from the key, never from the token: a header naming
        # any other (none, HS256 against an asymmetric key) is refused here.
        if key is None or header.get("alg") != key.alg:
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

    async def averify(self, token: str | bytes) -> AccessClaims:
        """Verify like :meth:`verify`, then refuse a ``jti`` on the deny list.

        Raises:
            InvalidToken: as :meth:`verify`, or the token was revoked.
        """
        claims = self.verify(token)
        if self.deny_list is not None and await self.deny_list.is_revoked(
            claims.token_id, subject=claims.subject, issued_at=claims.issued_at
        ):
            raise InvalidToken
        return claims

    def _check_claims(self, claims: dict[str, Any]) -> AccessClaims:
        iss, aud = claims.get("iss"), claims.get("aud")
        sub, tid, jti = claims.get("sub"), claims.get("tid"), claims.get("jti")
        roles = claims.get("roles")
        iat, exp = number(claims.get("iat")), number(claims.get("exp"))
        if (
            iss != self.issuer
            or not (aud == self.audience or (isinstance(aud, list) and self.audience in aud))
            or not (isinstance(sub, str) and sub)
            # An empty tid is a token acting for no tenant (a user who has none yet).
            or not isinstance(tid, str)
            or not (isinstance(jti, str) and jti)
            or not isinstance(roles, list)
            or not all(isinstance(role, str) for role in roles)
            or iat is None
            or exp is None
        ):
            raise InvalidToken
        nbf: float | None = None
        if "nbf" in claims:
            nbf = number(claims["nbf"])
            if nbf is None:
                raise InvalidToken
        now = self._clock()
        if iat > now + self.leeway or (nbf is not None and nbf > now + self.leeway):
            raise InvalidToken
        if exp <= now - self.leeway:
            raise InvalidToken(expired=True)
        extra = {k: v for k, v in claims.items() if k not in _RESERVED}
        return AccessClaims(
            subject=sub,
            tenant=tid,
            roles=tuple(roles),
            token_id=jti,
            issued_at=iat,
            expires_at=exp,
            not_before=nbf,
            issuer=iss,
            audience=tuple(aud) if isinstance(aud, list) else aud,
            extra=extra,
        )
