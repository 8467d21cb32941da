"""Single-use tokens: e-mail verification, password reset and invitations.

A token is 32 random bytes (256 bits) in URL-safe base64 (43 characters), put
in a link. Only its SHA-256 is stored: the input is high-entropy, so a slow or
keyed hash adds nothing. The hash is bound to the token's purpose
(``SHA-256("bastion:<purpose>:" + token)``) and the purpose is a column too,
so a reset token presented to e-mail verification finds no row.

Consuming is one atomic step of the store: the row is marked used only if it
is unused and unexpired, and returned; a second consumer finds nothing. With a
database this is a single statement (the next session's store)::

    UPDATE bastion_one_time_tokens
       SET used_at = :now
     WHERE token_hash = :hash AND purpose = :purpose
       AND used_at IS NULL AND expires_at > :now
    RETURNING id, purpose, subject, tenant_id, data, created_at, expires_at

Issuing a token supersedes the unused tokens of the same purpose and subject
(only the newest reset link works); :meth:`OneTimeTokens.discard` voids them
outright (reset links after a password change). Any failure (malformed, unknown, other
purpose, used, expired) is one :class:`InvalidOneTimeToken`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable

from bastion._ids import uuid7_text
from bastion.errors import Unauthenticated

__all__ = [
    "DEFAULT_ONE_TIME_TTLS",
    "ONE_TIME_TOKEN_BYTES",
    "InvalidOneTimeToken",
    "IssuedOneTimeToken",
    "MemoryOneTimeTokenStore",
    "OneTimeTokenRecord",
    "OneTimeTokenStore",
    "OneTimeTokens",
    "TokenPurpose",
]

ONE_TIME_TOKEN_BYTES: Final = 32
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{43}")


class TokenPurpose(enum.StrEnum):
    """What a single-use token may be used for; a token serves its purpose only."""

    EMAIL_VERIFICATION = "email_verification"
    PASSWORD_RESET = "password_reset"  # noqa: S105 - a purpose's name, not a password
    INVITATION = "invitation"


DEFAULT_ONE_TIME_TTLS: Final[Mapping[TokenPurpose, timedelta]] = MappingProxyType(
    {
        # OWASP's forgot-password sheet: short-lived reset tokens.
        TokenPurpose.PASSWORD_RESET: timedelta(minutes=30),
        TokenPurpose.EMAIL_VERIFICATION: timedelta(days=1),
        TokenPurpose.INVITATION: timedelta(days=7),
    }
)
"""Life of a token by purpose, unless the caller names another."""


class InvalidOneTimeToken(Unauthenticated):
    """A single-use token was malformed, unknown, for another purpose, used or expired."""

    def __init__(self) -> None:
        super().__init__("The link is invalid or has expired.")


@dataclass(frozen=True, slots=True)
class OneTimeTokenRecord:
    """What is stored for one token: a row of ``bastion_one_time_tokens``.

    Attributes:
        id: UUIDv7.
        purpose: what it is for.
        subject: whom it is for: a user id, or for an invitation the invitee's
            address (personal data: never logged).
        token_hash: ``SHA-256`` of the purpose-bound token, 32 bytes (unique).
        created_at: when it was issued (UTC).
        expires_at: when it stops working (UTC).
        tenant: the tenant of an invitation, else ``None``.
        used_at: when it was consumed (UTC), ``None`` while unused.
        data: what the action needs besides the subject (an invitation's role).
    """

    id: str
    purpose: TokenPurpose
    subject: str
    token_hash: bytes
    created_at: datetime
    expires_at: datetime
    tenant: str | None = None
    used_at: datetime | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # The subject may be an e-mail address: kept out of reprs that end up in logs.
        return (
            f"OneTimeTokenRecord(id={self.id!r}, purpose={self.purpose.value!r}, "
            f"expires_at={self.expires_at.isoformat()!r}, used={self.used_at is not None})"
        )


@dataclass(frozen=True, slots=True)
class IssuedOneTimeToken:
    """A new token: the token for the link (sent once, never stored) and the record to store."""

    token: str
    record: OneTimeTokenRecord

    def __repr__(self) -> str:
        return f"IssuedOneTimeToken(token='…', record={self.record!r})"


@runtime_checkable
class OneTimeTokenStore(Protocol):
    """Where single-use tokens are kept: memory here, a table in the next increment."""

    async def add(self, record: OneTimeTokenRecord) -> None:
        """Store ``record``, superseding the unused tokens of its purpose and subject."""
        ...

    async def consume(
        self, purpose: TokenPurpose, token_hash: bytes, now: datetime
    ) -> OneTimeTokenRecord | None:
        """Atomically mark the unused, unexpired token used and return it, else ``None``."""
        ...

    async def discard(self, purpose: TokenPurpose, subject: str) -> int:
        """Void the unused tokens of ``purpose`` for ``subject``; return how many."""
        ...


class MemoryOneTimeTokenStore:
    """Single-use tokens in process memory: one process only (tests, development).

    Atomic because :meth:`consume` never awaits between its check and its write.
    """

    def __init__(self) -> None:
        self._by_hash: dict[bytes, OneTimeTokenRecord] = {}

    async def add(self, record: OneTimeTokenRecord) -> None:
        """Store ``record``; earlier unused tokens of its purpose and subject are dropped."""
        self._by_hash = {
            digest: each
            for digest, each in self._by_hash.items()
            if not (
                each.used_at is None
                and each.purpose is record.purpose
                and each.subject == record.subject
            )
            # Used and expired rows are kept in a table for audit; here they would only grow.
            and each.used_at is None
            and each.expires_at > record.created_at
        }
        self._by_hash[record.token_hash] = record

    async def consume(
        self, purpose: TokenPurpose, token_hash: bytes, now: datetime
    ) -> OneTimeTokenRecord | None:
        """Mark the token used and return it, if it is unused, unexpired and for ``purpose``."""
        record = self._by_hash.get(token_hash)
        if (
            record is None
            or record.purpose is not purpose
            or record.used_at is not None
            or not now < record.expires_at
        ):
            return None
        used = replace(record, used_at=now)
        self._by_hash[token_hash] = used
        return used

    async def discard(self, purpose: TokenPurpose, subject: str) -> int:
        """Drop the unused tokens of ``purpose`` for ``subject``; return how many."""
        before = len(self._by_hash)
        self._by_hash = {
            digest: each
            for digest, each in self._by_hash.items()
            if not (each.used_at is None and each.purpose is purpose and each.subject == subject)
        }
        return before - len(self._by_hash)


def _hash(purpose: TokenPurpose, token: str) -> bytes:
    return hashlib.sha256(f"bastion:{purpose.value}:{token}".encode("ascii")).digest()


class OneTimeTokens:
    """Issues and consumes single-use, expiring, purpose-bound tokens.

    Example:
        >>> tokens = OneTimeTokens(MemoryOneTimeTokenStore())
        >>> issued = await tokens.issue(TokenPurpose.PASSWORD_RESET, user_id)
        >>> send_reset_link(issued.token)
        >>> record = await tokens.consume(TokenPurpose.PASSWORD_RESET, token_from_link)
        >>> record.subject == user_id
        True

    Args:
        store: where records live.
        ttls: life by purpose, over :data:`DEFAULT_ONE_TIME_TTLS`.
        clock: UTC now (injected by tests).
    """

    def __init__(
        self,
        store: OneTimeTokenStore,
        *,
        ttls: Mapping[TokenPurpose, float | timedelta] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        merged: dict[TokenPurpose, timedelta] = dict(DEFAULT_ONE_TIME_TTLS)
        for purpose, ttl in (ttls or {}).items():
            merged[TokenPurpose(purpose)] = (
                ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
            )
        if any(ttl <= timedelta(0) for ttl in merged.values()):
            raise ValueError("a single-use token's life must be positive")
        self._ttls = merged
        self._clock = clock if clock is not None else (lambda: datetime.now(UTC))

    def ttl(self, purpose: TokenPurpose) -> timedelta:
        """Return the life of a token for ``purpose``."""
        return self._ttls[purpose]

    def new(
        self,
        purpose: TokenPurpose,
        subject: str,
        *,
        tenant: str | None = None,
        ttl: float | timedelta | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> IssuedOneTimeToken:
        """Make a token and its record without storing it (for a store inside a transaction).

        Raises:
            ValueError: ``ttl`` is not positive, or ``subject`` is empty.
        """
        purpose = TokenPurpose(purpose)
        if not subject:
            raise ValueError("a single-use token needs a subject")
        life = self._ttls[purpose] if ttl is None else ttl
        if not isinstance(life, timedelta):
            life = timedelta(seconds=life)
        if life <= timedelta(0):
            raise ValueError("a single-use token's life must be positive")
        token = base64.urlsafe_b64encode(secrets.token_bytes(ONE_TIME_TOKEN_BYTES))
        text = token.rstrip(b"=").decode("ascii")
        now = self._clock()
        record = OneTimeTokenRecord(
            id=uuid7_text(now.timestamp()),
            purpose=purpose,
            subject=subject,
            token_hash=_hash(purpose, text),
            created_at=now,
            expires_at=now + life,
            tenant=tenant,
            data=MappingProxyType(dict(data or {})),
        )
        return IssuedOneTimeToken(text, record)

    async def issue(
        self,
        purpose: TokenPurpose,
        subject: str,
        *,
        tenant: str | None = None,
        ttl: float | timedelta | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> IssuedOneTimeToken:
        """Make a token for ``purpose`` and ``subject`` and store its record.

        Args:
            purpose: what the token is for.
            subject: the user id (or an invitee's address).
            tenant: the tenant of an invitation.
            ttl: life in seconds instead of the purpose's default.
            data: what the action needs later (an invitation's role).

        Raises:
            ValueError: as :meth:`new`.
        """
        issued = self.new(purpose, subject, tenant=tenant, ttl=ttl, data=data)
        await self.store.add(issued.record)
        return issued

    async def discard(self, purpose: TokenPurpose, subject: str) -> int:
        """Void ``subject``'s unused tokens of ``purpose`` (reset links after a password change).

        Returns:
            How many were voided.
        """
        return await self.store.discard(TokenPurpose(purpose), subject)

    def lookup_hash(self, purpose: TokenPurpose, presented: object) -> bytes:
        """Return the stored hash a presented token would have for ``purpose``.

        Raises:
            InvalidOneTimeToken: the token is not 43 URL-safe base64 characters.
        """
        if not isinstance(presented, str) or _TOKEN.fullmatch(presented) is None:
            raise InvalidOneTimeToken
        return _hash(TokenPurpose(purpose), presented)

    async def consume(self, purpose: TokenPurpose, presented: object) -> OneTimeTokenRecord:
        """Use a token once: return its record, or refuse it.

        Raises:
            InvalidOneTimeToken: malformed, unknown, for another purpose, already
                used, or expired (one answer for all).
        """
        purpose = TokenPurpose(purpose)
        digest = self.lookup_hash(purpose, presented)
        record = await self.store.consume(purpose, digest, self._clock())
        # The store found the row by this hash; comparing again in constant time
        # keeps a store with a sloppy lookup (a prefix index, a collation) honest.
        if record is None or not hmac.compare_digest(record.token_hash, digest):
            raise InvalidOneTimeToken
        return record
