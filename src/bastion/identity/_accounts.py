"""Accounts in the database: refresh-token families and the single-use token table.

**Refresh tokens** are 32 random bytes (256 bits) in URL-safe base64, 43
characters the client cannot read anything from; only their SHA-256 is stored
(a keyed or slow hash adds nothing to a value no one can guess). Tokens belong
to a *family*, one per sign-in: login starts it, and each refresh exchanges the
presented token for the next one of the same family::

    login ──▶ family F, token t1
    refresh(t1) ──▶ t1 used, t2 issued          (F.last_used_at, F.expires_at move on)
    refresh(t2) ──▶ t2 used, t3 issued
    refresh(t1) ──▶ t1 was used: reuse ──▶ F revoked (t3 stops working too), 401

A used token presented again means two parties hold the family's tokens (one
of them stole it), and the server cannot tell which is the owner: the whole
family is revoked and a ``refresh_reuse_detected`` security event is emitted.

Marking a token used is one conditional statement (``UPDATE ... WHERE
token_hash = :h AND used_at IS NULL RETURNING family_id``), then the family row
is locked (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite serialises writers),
so of two refreshes racing with the same token exactly one succeeds; the other
finds the token used and is treated as reuse. A family expires
``refresh_ttl`` after its last use (sliding); a revoked or expired family is a
401 like an unknown token: the client cannot tell which.

**Single-use tokens** (:class:`SqlOneTimeTokenStore`) keep
:class:`~bastion.identity.OneTimeTokens`' records in ``bastion_one_time_tokens``;
consuming is the one atomic ``UPDATE ... RETURNING`` that docs/identity.md
shows, on SQLite (3.35 or later) and PostgreSQL alike.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog
from sqlalchemy import ColumnElement, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bastion._ids import uuid7
from bastion.data import run_transaction
from bastion.data.types import utc_now
from bastion.errors import Forbidden, Unauthenticated
from bastion.identity._directory import TenantRecord, find_tenant, get_user, membership_role
from bastion.identity._events import SecurityEventKind, emit_security_event
from bastion.identity._one_time import (
    InvalidOneTimeToken,
    IssuedOneTimeToken,
    OneTimeTokenRecord,
    OneTimeTokens,
    TokenPurpose,
)
from bastion.identity._tables import one_time_tokens, refresh_families, refresh_tokens

if TYPE_CHECKING:
    from bastion.data import Database

__all__ = [
    "REFRESH_TOKEN_BYTES",
    "InvalidRefreshToken",
    "IssuedRefreshToken",
    "NotATenantMember",
    "RefreshRotation",
    "RefreshTokens",
    "RevocationReason",
    "SqlOneTimeTokenStore",
    "consume_one_time",
    "discard_one_time",
    "forget_one_time_data",
    "issue_one_time",
    "one_time_token_superseded",
    "one_time_token_valid",
    "refresh_token_hash",
]

logger = structlog.get_logger("bastion.identity")

_T = TypeVar("_T")

REFRESH_TOKEN_BYTES: Final = 32
_REFRESH_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{43}")


class RevocationReason(enum.StrEnum):
    """Why a refresh-token family was revoked (``bastion_refresh_families.revoked_reason``)."""

    LOGOUT = "logout"
    LOGOUT_ALL = "logout_all"
    REUSE = "reuse"
    PASSWORD_CHANGE = "password_change"  # noqa: S105 - a reason's name, not a password
    PASSWORD_RESET = "password_reset"  # noqa: S105 - a reason's name, not a password
    MEMBERSHIP_REMOVED = "membership_removed"
    EMAIL_VERIFIED = "email_verified"


class InvalidRefreshToken(Unauthenticated):
    """A refresh token was malformed, unknown, used before, expired or revoked (one answer)."""

    def __init__(self) -> None:
        super().__init__("The refresh token is invalid, expired or revoked; sign in again.")


class NotATenantMember(Forbidden):
    """The user asked for a tenant it is not a member of (or that does not exist).

    One answer for both, so a user cannot probe which tenant slugs exist.
    """

    def __init__(self) -> None:
        super().__init__("You are not a member of that tenant.", extra={"reason": "not_a_member"})


@dataclass(frozen=True, slots=True)
class IssuedRefreshToken:
    """A new refresh token: the token for the client (never stored) and its family.

    Attributes:
        token: the opaque token, 43 URL-safe characters.
        family_id: the family it belongs to (an access token's ``sid``).
        expires_at: when the family expires unless used before (UTC).
    """

    token: str
    family_id: uuid.UUID
    expires_at: datetime

    def __repr__(self) -> str:
        return f"IssuedRefreshToken(token='…', family_id={self.family_id!s})"


@dataclass(frozen=True, slots=True)
class RefreshRotation:
    """The outcome of a successful :meth:`RefreshTokens.rotate`.

    Attributes:
        issued: the next token of the family.
        user_id: whose family it is.
        tenant: the tenant the next access token acts for, ``None`` when the user has none.
        role: the user's role in ``tenant``, ``None`` without a tenant.
    """

    issued: IssuedRefreshToken
    user_id: uuid.UUID
    tenant: TenantRecord | None
    role: str | None


@dataclass(frozen=True, slots=True)
class _Refused:
    """A rotation that failed after writing something that must be kept (a revocation)."""

    family_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    reused: bool = False


def refresh_token_hash(token: str) -> bytes:
    """Return the stored form of a refresh token: its SHA-256."""
    return hashlib.sha256(token.encode("ascii")).digest()


def _new_refresh_token() -> str:
    raw = base64.urlsafe_b64encode(secrets.token_bytes(REFRESH_TOKEN_BYTES))
    return raw.rstrip(b"=").decode("ascii")


class RefreshTokens:
    """Refresh-token families in the database: start, rotate with reuse detection, revoke.

    Example:
        >>> refresh = RefreshTokens(database, ttl=settings.identity.tokens.refresh_ttl)
        >>> async with database.session() as session:
        ...     issued = await refresh.start(session, user.id, tenant.id)
        >>> rotation = await refresh.rotate(issued.token)  # the old token is now spent
        >>> await refresh.revoke_family(rotation.issued.family_id, RevocationReason.LOGOUT)

    Args:
        database: where the families live.
        ttl: seconds a family lives after its last use (``identity.tokens.refresh_ttl``).
        clock: UTC now (injected by tests).

    Raises:
        ValueError: ``ttl`` is not positive.
    """

    def __init__(
        self,
        database: Database,
        *,
        ttl: float | timedelta,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        life = ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
        if life <= timedelta(0):
            raise ValueError("a refresh token family's life must be positive")
        self.database = database
        self.ttl = life
        self._clock = clock if clock is not None else utc_now

    async def start(
        self, session: AsyncSession, user_id: uuid.UUID, tenant_id: uuid.UUID | None
    ) -> IssuedRefreshToken:
        """Start a family for a new sign-in and return its first token.

        Runs in the caller's transaction (committing is the caller's).

        Args:
            session: the caller's session.
            user_id: who signed in.
            tenant_id: the tenant the sign-in acts for, or ``None``.
        """
        now = self._clock()
        family_id = uuid7(now.timestamp())
        await session.execute(
            insert(refresh_families).values(
                id=family_id,
                user_id=user_id,
                tenant_id=tenant_id,
                created_at=now,
                last_used_at=now,
                expires_at=now + self.ttl,
                revoked_at=None,
                revoked_reason=None,
            )
        )
        return await self._add_token(session, family_id, now)

    async def rotate(self, presented: object, *, tenant: str | None = None) -> RefreshRotation:
        """Spend ``presented`` and return the next token of its family.

        Args:
            presented: the refresh token the client sent.
            tenant: switch the family to this tenant (slug or id), of which the
                user must be a member; ``None`` keeps the family's tenant.

        Raises:
            InvalidRefreshToken: malformed, unknown, expired or revoked, or used
                before (then the whole family is revoked and a
                ``refresh_reuse_detected`` event emitted), or the user is
                disabled, gone, or no longer a member of the family's tenant.
            NotATenantMember: ``tenant`` is not one of the user's; the presented
                token is not spent.
        """
        if not isinstance(presented, str) or _REFRESH_TOKEN.fullmatch(presented) is None:
            raise InvalidRefreshToken
        digest = refresh_token_hash(presented)
        outcome = await run_transaction(self._rotate, digest, tenant, database=self.database)
        if isinstance(outcome, RefreshRotation):
            return outcome
        if outcome.reused and outcome.family_id is not None:
            logger.warning("refresh token reused", token_family_id=str(outcome.family_id))
            actor = None if outcome.user_id is None else str(outcome.user_id)
            await emit_security_event(
                SecurityEventKind.REFRESH_REUSE_DETECTED,
                actor=actor,
                subject=str(outcome.family_id),
                details={"token_family_id": str(outcome.family_id)},
            )
            await emit_security_event(
                SecurityEventKind.TOKEN_FAMILY_REVOKED,
                actor=actor,
                subject=str(outcome.family_id),
                details={"reason": RevocationReason.REUSE.value},
            )
        raise InvalidRefreshToken

    async def _rotate(
        self, session: AsyncSession, digest: bytes, tenant_key: str | None
    ) -> RefreshRotation | _Refused:
        now = self._clock()
        found = (
            await session.execute(
                select(refresh_tokens.c.family_id).where(refresh_tokens.c.token_hash == digest)
            )
        ).one_or_none()
        if found is None:
            return _Refused()
        # Locked first: rotations and revocations of one family take turns, so a
        # family revoked meanwhile cannot gain a token.
        family = (
            await session.execute(
                select(refresh_families)
                .where(refresh_families.c.id == found.family_id)
                .with_for_update()
            )
        ).one()
        if family.revoked_at is not None or family.expires_at <= now:
            # Nothing written: presenting the token again is not mistaken for reuse.
            return _Refused()
        user = await get_user(session, family.user_id)
        if user is None or user.disabled_at is not None:
            return _Refused()
        # The conditional update is the race's referee: of two requests with the
        # same token, PostgreSQL makes the second wait on the row lock and then
        # re-check ``used_at IS NULL``; SQLite runs one writer at a time.
        spent = await session.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.token_hash == digest, refresh_tokens.c.used_at.is_(None))
            .values(used_at=now)
            .returning(refresh_tokens.c.id)
        )
        if spent.one_or_none() is None:
            await self._revoke(
                session, refresh_families.c.id == family.id, RevocationReason.REUSE, now
            )
            return _Refused(family.id, family.user_id, reused=True)
        target: TenantRecord | None = None
        role: str | None = None
        if tenant_key is not None:
            target = await find_tenant(session, tenant_key)
            role = None if target is None else await membership_role(session, user.id, target.id)
            if target is None or role is None:
                # Raised, so the transaction rolls back and the token stays unspent.
                raise NotATenantMember
        elif family.tenant_id is not None:
            target = await find_tenant(session, family.tenant_id)
            role = None if target is None else await membership_role(session, user.id, target.id)
            if role is None:
                await self._revoke(
                    session,
                    refresh_families.c.id == family.id,
                    RevocationReason.MEMBERSHIP_REMOVED,
                    now,
                )
                return _Refused()
        await session.execute(
            update(refresh_families)
            .where(refresh_families.c.id == family.id)
            .values(
                last_used_at=now,
                expires_at=now + self.ttl,
                tenant_id=None if target is None else target.id,
            )
        )
        issued = await self._add_token(session, family.id, now)
        return RefreshRotation(issued, user.id, target, role)

    async def family_of(self, presented: object) -> tuple[uuid.UUID, uuid.UUID] | None:
        """Return ``(family_id, user_id)`` of a presented token, used or not, else ``None``."""
        if not isinstance(presented, str) or _REFRESH_TOKEN.fullmatch(presented) is None:
            return None
        async with self.database.sessions() as session:
            row = (
                await session.execute(
                    select(refresh_tokens.c.family_id, refresh_families.c.user_id)
                    .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
                    .where(refresh_tokens.c.token_hash == refresh_token_hash(presented))
                )
            ).one_or_none()
        return None if row is None else (row.family_id, row.user_id)

    async def revoke_family(
        self,
        family_id: uuid.UUID,
        reason: RevocationReason,
        *,
        user_id: uuid.UUID | None = None,
        session: AsyncSession | None = None,
    ) -> bool:
        """Revoke one family (logout); its unused token stops working.

        Args:
            family_id: the family (an access token's ``sid``).
            reason: stored with the revocation.
            user_id: revoke only if the family is this user's (a ``sid`` taken
                from a token is checked against its ``sub``).
            session: run in the caller's transaction instead of a new one.

        Returns:
            Whether a family was revoked now (``False``: unknown, someone else's,
            or already revoked).
        """
        condition = refresh_families.c.id == family_id
        if user_id is not None:
            condition = condition & (refresh_families.c.user_id == user_id)
        revoked = await self._in_session(session, self._revoke, condition, reason, self._clock())
        return bool(revoked)

    async def revoke_user(
        self, user_id: uuid.UUID, reason: RevocationReason, *, session: AsyncSession | None = None
    ) -> list[uuid.UUID]:
        """Revoke every live family of a user (log out everywhere, a password change).

        Returns:
            The ids of the families revoked now.
        """
        return await self._in_session(
            session, self._revoke, refresh_families.c.user_id == user_id, reason, self._clock()
        )

    async def revoke_tenant_member(
        self,
        user_id: uuid.UUID,
        tenant_id: uuid.UUID,
        reason: RevocationReason = RevocationReason.MEMBERSHIP_REMOVED,
        *,
        session: AsyncSession | None = None,
    ) -> list[uuid.UUID]:
        """Revoke a user's families that act for one tenant (the member was removed).

        Families of the user's other tenants keep working. Pass the session of
        the transaction that deletes the membership, so both happen or neither.

        Returns:
            The ids of the families revoked now.
        """
        condition = (refresh_families.c.user_id == user_id) & (
            refresh_families.c.tenant_id == tenant_id
        )
        return await self._in_session(session, self._revoke, condition, reason, self._clock())

    async def _revoke(
        self,
        session: AsyncSession,
        condition: ColumnElement[bool],
        reason: RevocationReason,
        now: datetime,
    ) -> list[uuid.UUID]:
        rows = await session.execute(
            update(refresh_families)
            .where(condition, refresh_families.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_reason=reason.value)
            .returning(refresh_families.c.id)
        )
        return [row.id for row in rows]

    async def _add_token(
        self, session: AsyncSession, family_id: uuid.UUID, now: datetime
    ) -> IssuedRefreshToken:
        token = _new_refresh_token()
        await session.execute(
            insert(refresh_tokens).values(
                id=uuid7(now.timestamp()),
                family_id=family_id,
                token_hash=refresh_token_hash(token),
                created_at=now,
                used_at=None,
            )
        )
        return IssuedRefreshToken(token, family_id, now + self.ttl)

    async def _in_session(
        self,
        session: AsyncSession | None,
        fn: Callable[..., Awaitable[_T]],
        *args: Any,
    ) -> _T:
        if session is not None:
            return await fn(session, *args)
        return await run_transaction(fn, *args, database=self.database)


class SqlOneTimeTokenStore:
    """:class:`~bastion.identity.OneTimeTokenStore` on ``bastion_one_time_tokens``.

    Each method runs in its own transaction, or in the caller's when given
    ``session`` (a sign-up issues its verification token in the transaction
    that creates the user, so both exist or neither does).

    Used and superseded rows stay in the table (who used which link, when);
    nothing here deletes expired rows yet.

    Args:
        database: the database holding the table.

    Example:
        >>> tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        >>> issued = await tokens.issue(TokenPurpose.PASSWORD_RESET, str(user.id))
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    async def add(self, record: OneTimeTokenRecord, *, session: AsyncSession | None = None) -> None:
        """Store ``record``; the unused tokens of its purpose and subject stop working."""
        if session is not None:
            await self._add(session, record)
        else:
            await run_transaction(self._add, record, database=self.database)

    async def consume(
        self,
        purpose: TokenPurpose,
        token_hash: bytes,
        now: datetime,
        *,
        session: AsyncSession | None = None,
    ) -> OneTimeTokenRecord | None:
        """Mark the unused, unexpired token of ``purpose`` used and return it, else ``None``."""
        if session is not None:
            return await self._consume(session, purpose, token_hash, now)
        return await run_transaction(
            self._consume, purpose, token_hash, now, database=self.database
        )

    async def discard(
        self, purpose: TokenPurpose, subject: str, *, session: AsyncSession | None = None
    ) -> int:
        """Void the unused tokens of ``purpose`` for ``subject``; return how many."""
        if session is not None:
            return await self._discard(session, purpose, subject)
        return await run_transaction(self._discard, purpose, subject, database=self.database)

    async def _add(self, session: AsyncSession, record: OneTimeTokenRecord) -> None:
        # Two concurrent issues for one subject may both survive this (each deletes
        # before the other inserts); both links then work until used or expired.
        await self._discard(session, record.purpose, record.subject)
        await session.execute(
            insert(one_time_tokens).values(
                id=uuid.UUID(record.id),
                purpose=record.purpose.value,
                subject=record.subject,
                token_hash=record.token_hash,
                tenant_id=None if record.tenant is None else uuid.UUID(record.tenant),
                data=dict(record.data),
                created_at=record.created_at,
                expires_at=record.expires_at,
                used_at=record.used_at,
            )
        )

    async def _consume(
        self, session: AsyncSession, purpose: TokenPurpose, token_hash: bytes, now: datetime
    ) -> OneTimeTokenRecord | None:
        table = one_time_tokens
        row = (
            await session.execute(
                update(table)
                .where(
                    table.c.token_hash == token_hash,
                    table.c.purpose == purpose.value,
                    table.c.used_at.is_(None),
                    table.c.expires_at > now,
                )
                .values(used_at=now)
                .returning(
                    table.c.id,
                    table.c.purpose,
                    table.c.subject,
                    table.c.token_hash,
                    table.c.tenant_id,
                    table.c.data,
                    table.c.created_at,
                    table.c.expires_at,
                    table.c.used_at,
                )
            )
        ).one_or_none()
        if row is None:
            return None
        return OneTimeTokenRecord(
            id=str(row.id),
            purpose=TokenPurpose(row.purpose),
            subject=row.subject,
            token_hash=bytes(row.token_hash),
            created_at=row.created_at,
            expires_at=row.expires_at,
            tenant=None if row.tenant_id is None else str(row.tenant_id),
            used_at=row.used_at,
            data=MappingProxyType(dict(row.data or {})),
        )

    async def _discard(self, session: AsyncSession, purpose: TokenPurpose, subject: str) -> int:
        table = one_time_tokens
        rows = await session.execute(
            delete(table)
            .where(
                table.c.purpose == purpose.value,
                table.c.subject == subject,
                table.c.used_at.is_(None),
            )
            .returning(table.c.id)
        )
        return len(rows.all())


def _sql_store(tokens: OneTimeTokens) -> SqlOneTimeTokenStore:
    """The table store of ``tokens``: only a table can join the caller's transaction."""
    if not isinstance(tokens.store, SqlOneTimeTokenStore):
        raise TypeError(
            f"this needs OneTimeTokens on a SqlOneTimeTokenStore, not {type(tokens.store).__name__}"
        )
    return tokens.store


async def issue_one_time(
    tokens: OneTimeTokens,
    session: AsyncSession,
    purpose: TokenPurpose,
    subject: str,
    *,
    tenant: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> IssuedOneTimeToken:
    """Issue a single-use token inside the caller's transaction (both exist, or neither).

    Raises:
        ValueError: as :meth:`OneTimeTokens.new`.
        TypeError: ``tokens`` is not on a :class:`SqlOneTimeTokenStore`.
    """
    store = _sql_store(tokens)
    issued = tokens.new(purpose, subject, tenant=tenant, data=data)
    await store.add(issued.record, session=session)
    return issued


async def consume_one_time(
    tokens: OneTimeTokens, session: AsyncSession, purpose: TokenPurpose, presented: object
) -> OneTimeTokenRecord:
    """Consume a single-use token inside the caller's transaction.

    If the transaction rolls back (the new password breaks the policy), the
    token is unspent and the link still works.

    Raises:
        InvalidOneTimeToken: malformed, unknown, for another purpose, used or expired.
        TypeError: ``tokens`` is not on a :class:`SqlOneTimeTokenStore`.
    """
    store = _sql_store(tokens)
    digest = tokens.lookup_hash(purpose, presented)
    record = await store.consume(purpose, digest, utc_now(), session=session)
    if record is None or not hmac.compare_digest(record.token_hash, digest):
        raise InvalidOneTimeToken
    return record


async def discard_one_time(
    tokens: OneTimeTokens, session: AsyncSession, purpose: TokenPurpose, subject: str
) -> int:
    """Void ``subject``'s unused tokens of ``purpose`` inside the caller's transaction.

    Returns:
        How many were voided.

    Raises:
        TypeError: ``tokens`` is not on a :class:`SqlOneTimeTokenStore`.
    """
    return await _sql_store(tokens).discard(purpose, subject, session=session)


async def forget_one_time_data(
    tokens: OneTimeTokens, session: AsyncSession, record: OneTimeTokenRecord
) -> None:
    """Empty a consumed token's ``data`` inside the caller's transaction.

    Used rows stay in the table (who used which link, when), but what their
    data carried has been applied by then: a verification token's password
    hash must not outlive the link in a second place.

    Raises:
        TypeError: ``tokens`` is not on a :class:`SqlOneTimeTokenStore`.
    """
    _sql_store(tokens)
    await session.execute(
        update(one_time_tokens).where(one_time_tokens.c.id == uuid.UUID(record.id)).values(data={})
    )


async def one_time_token_superseded(
    tokens: OneTimeTokens, session: AsyncSession, record: OneTimeTokenRecord
) -> bool:
    """Whether a newer token of ``record``'s purpose and subject exists, used or not.

    Issuing deletes the older unused tokens, but two issues racing may both
    survive (each deletes before the other inserts): a consumer for which only
    the newest link may count (a verification link carrying a password) asks
    this in its transaction and refuses an older one.

    Raises:
        TypeError: ``tokens`` is not on a :class:`SqlOneTimeTokenStore`.
    """
    _sql_store(tokens)
    table = one_time_tokens
    newer = await session.scalar(
        select(table.c.id)
        .where(
            table.c.purpose == record.purpose.value,
            table.c.subject == record.subject,
            table.c.created_at > record.created_at,
        )
        .limit(1)
    )
    return newer is not None


async def one_time_token_valid(
    tokens: OneTimeTokens,
    session: AsyncSession,
    purpose: TokenPurpose,
    presented: object,
    subject: str,
) -> bool:
    """Whether ``presented`` is an unused, unexpired token of ``purpose`` for ``subject``.

    Spends nothing: sign-up checks an invitation this way when the address has
    an account already, so the invitation stays usable by the accept route.

    Raises:
        TypeError: ``tokens`` is not on a :class:`SqlOneTimeTokenStore`.
    """
    _sql_store(tokens)
    try:
        digest = tokens.lookup_hash(purpose, presented)
    except InvalidOneTimeToken:
        return False
    table = one_time_tokens
    found = await session.scalar(
        select(table.c.subject).where(
            table.c.token_hash == digest,
            table.c.purpose == purpose.value,
            table.c.used_at.is_(None),
            table.c.expires_at > utc_now(),
        )
    )
    return found is not None and hmac.compare_digest(found.encode(), subject.encode())
