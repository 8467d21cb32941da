"""Refresh-token families and the SQL single-use token store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select, update

from bastion.data import Database
from bastion.identity._accounts import (
    InvalidRefreshToken,
    NotATenantMember,
    RefreshTokens,
    RevocationReason,
    SqlOneTimeTokenStore,
    consume_one_time,
    issue_one_time,
    one_time_token_valid,
)
from bastion.identity._directory import add_membership, create_tenant, create_user
from bastion.identity._events import (
    SecurityEvent,
    SecurityEventKind,
    on_security_event,
    remove_security_listener,
)
from bastion.identity._one_time import (
    InvalidOneTimeToken,
    MemoryOneTimeTokenStore,
    OneTimeTokens,
    TokenPurpose,
)
from bastion.identity._tables import (
    memberships,
    one_time_tokens,
    refresh_families,
    refresh_tokens,
    users,
)


class Clock:
    """A settable UTC clock."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def events():
    """Security events emitted during the test."""
    seen: list[SecurityEvent] = []

    def listener(event: SecurityEvent) -> None:
        seen.append(event)

    on_security_event(listener)
    yield seen
    remove_security_listener(listener)


async def new_member(db: Database, *tenants: str):
    """A user who is a member of a new tenant per role given."""
    async with db.session() as session:
        user = await create_user(session, f"u-{secrets.token_hex(5)}@example.com")
        made = []
        for role in tenants:
            tenant = await create_tenant(session, "T", f"t-{secrets.token_hex(5)}")
            await add_membership(session, tenant.id, user.id, role)
            made.append(tenant)
    return user, made


class TestRefreshTokens:
    async def test_rotation_issues_the_next_token_and_spends_the_old(self, database):
        """A refresh answers a new token of the same family; the old one is then spent."""
        user, (tenant,) = await new_member(database, "member")
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            first = await refresh.start(session, user.id, tenant.id)
        rotation = await refresh.rotate(first.token)
        assert first.family_id == rotation.issued.family_id
        assert first.token != rotation.issued.token
        assert tenant.id == rotation.tenant.id
        assert "member" == rotation.role
        assert 43 == len(rotation.issued.token)

    async def test_only_the_hash_is_stored(self, database):
        """The database holds SHA-256 of the token, never the token."""
        user, _ = await new_member(database)
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            issued = await refresh.start(session, user.id, None)
        async with database.sessions() as session:
            hashes = (await session.execute(select(refresh_tokens.c.token_hash))).scalars().all()
        assert hashlib.sha256(issued.token.encode()).digest() in [bytes(h) for h in hashes]

    async def test_reuse_revokes_the_family_and_raises_an_alarm(self, database, events):
        """A spent token presented again revokes the family: its newest token stops working."""
        user, (tenant,) = await new_member(database, "owner")
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            first = await refresh.start(session, user.id, tenant.id)
        second = await refresh.rotate(first.token)
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(first.token)
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(second.issued.token)
        kinds = [event.kind for event in events]
        assert [
            SecurityEventKind.REFRESH_REUSE_DETECTED,
            SecurityEventKind.TOKEN_FAMILY_REVOKED,
        ] == kinds
        assert str(first.family_id) == events[0].subject
        assert str(user.id) == events[0].actor
        async with database.sessions() as session:
            reason = await session.scalar(
                select(refresh_families.c.revoked_reason).where(
                    refresh_families.c.id == first.family_id
                )
            )
        assert "reuse" == reason

    async def test_concurrent_refreshes_with_one_token_let_exactly_one_win(self, database):
        """Two refreshes racing with the same token: one answers, the other is reuse."""
        user, (tenant,) = await new_member(database, "member")
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            first = await refresh.start(session, user.id, tenant.id)
        outcomes = await asyncio.gather(
            refresh.rotate(first.token), refresh.rotate(first.token), return_exceptions=True
        )
        wins = [each for each in outcomes if not isinstance(each, BaseException)]
        losses = [each for each in outcomes if isinstance(each, BaseException)]
        assert 1 == len(wins)
        assert [InvalidRefreshToken] == [type(each) for each in losses]
        # The loser counted as reuse: the winner's token is dead with its family.
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(wins[0].issued.token)

    async def test_a_family_expires_after_ttl_without_use(self, database):
        """A family unused for refresh_ttl is refused; each use moves the expiry on."""
        user, _ = await new_member(database)
        clock = Clock()
        refresh = RefreshTokens(database, ttl=timedelta(hours=1), clock=clock)
        async with database.session() as session:
            first = await refresh.start(session, user.id, None)
        clock.now += timedelta(minutes=50)
        second = await refresh.rotate(first.token)
        clock.now += timedelta(minutes=50)  # 100 minutes after login, 50 after the last use
        third = await refresh.rotate(second.issued.token)
        clock.now += timedelta(hours=1, seconds=1)
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(third.issued.token)

    async def test_an_expired_token_presented_twice_is_not_reuse(self, database, events):
        """Retrying with the token of an expired family is refused quietly, with no alarm."""
        user, _ = await new_member(database)
        clock = Clock()
        refresh = RefreshTokens(database, ttl=60, clock=clock)
        async with database.session() as session:
            first = await refresh.start(session, user.id, None)
        clock.now += timedelta(minutes=2)
        for _ in range(2):
            with pytest.raises(InvalidRefreshToken):
                await refresh.rotate(first.token)
        assert [] == events

    @pytest.mark.parametrize("presented", ["", "short", "x" * 43 + "=", 42, None, "é" * 43])
    async def test_malformed_tokens_are_refused_before_the_database(self, database, presented):
        """Anything but 43 URL-safe characters is one 401."""
        with pytest.raises(InvalidRefreshToken):
            await RefreshTokens(database, ttl=60).rotate(presented)

    async def test_unknown_token_is_refused(self, database):
        """A well-formed token the server never issued is refused."""
        with pytest.raises(InvalidRefreshToken):
            await RefreshTokens(database, ttl=60).rotate(secrets.token_urlsafe(32))

    async def test_tenant_switch_needs_membership_and_keeps_the_token_on_refusal(self, database):
        """Switching to a tenant of the user's works; to another, 403 and the token stays good."""
        user, (first_tenant, second_tenant) = await new_member(database, "owner", "viewer")
        _, (foreign,) = await new_member(database, "owner")
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            issued = await refresh.start(session, user.id, first_tenant.id)
        for key in (foreign.slug, "no-such-tenant"):
            with pytest.raises(NotATenantMember):
                await refresh.rotate(issued.token, tenant=key)
        switched = await refresh.rotate(issued.token, tenant=second_tenant.slug)
        assert (second_tenant.id, "viewer") == (switched.tenant.id, switched.role)
        # The family now acts for the second tenant: a plain refresh stays there.
        after = await refresh.rotate(switched.issued.token)
        assert second_tenant.id == after.tenant.id

    async def test_removed_member_loses_the_family(self, database):
        """A family whose tenant membership is gone is revoked at its next refresh."""
        user, (tenant,) = await new_member(database, "member")
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            issued = await refresh.start(session, user.id, tenant.id)
        async with database.session() as session:
            await session.execute(delete(memberships).where(memberships.c.user_id == user.id))
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(issued.token)

    async def test_disabled_user_cannot_refresh(self, database):
        """A disabled account's refresh tokens are refused."""
        user, _ = await new_member(database)
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            issued = await refresh.start(session, user.id, None)
        async with database.session() as session:
            await session.execute(
                update(users).where(users.c.id == user.id).values(disabled_at=datetime.now(UTC))
            )
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(issued.token)

    async def test_revocations(self, database):
        """revoke_family, revoke_user and revoke_tenant_member each end what they name only."""
        user, (one, two) = await new_member(database, "owner", "member")
        other, _ = await new_member(database)
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            a = await refresh.start(session, user.id, one.id)
            b = await refresh.start(session, user.id, two.id)
            c = await refresh.start(session, user.id, two.id)
            d = await refresh.start(session, other.id, None)
        # A sid names a family, and the token's subject must own it.
        assert not await refresh.revoke_family(
            a.family_id, RevocationReason.LOGOUT, user_id=other.id
        )
        assert await refresh.revoke_family(a.family_id, RevocationReason.LOGOUT, user_id=user.id)
        assert not await refresh.revoke_family(a.family_id, RevocationReason.LOGOUT)
        assert [] == await refresh.revoke_tenant_member(user.id, one.id)
        assert {b.family_id, c.family_id} == set(
            await refresh.revoke_tenant_member(user.id, two.id)
        )
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(b.token)
        assert [d.family_id] == await refresh.revoke_user(other.id, RevocationReason.LOGOUT_ALL)
        assert [] == await refresh.revoke_user(other.id, RevocationReason.LOGOUT_ALL)

    async def test_family_of_finds_used_tokens_too(self, database):
        """Logout with an old token still finds (and can end) its family."""
        user, _ = await new_member(database)
        refresh = RefreshTokens(database, ttl=3600)
        async with database.session() as session:
            first = await refresh.start(session, user.id, None)
        await refresh.rotate(first.token)
        assert (first.family_id, user.id) == await refresh.family_of(first.token)
        assert await refresh.family_of("nope") is None
        assert await refresh.family_of(secrets.token_urlsafe(32)) is None

    def test_ttl_must_be_positive(self, database):
        """A zero life is a configuration mistake."""
        with pytest.raises(ValueError, match="positive"):
            RefreshTokens(database, ttl=0)


class TestSqlOneTimeTokenStore:
    async def test_issue_and_consume_once(self, database):
        """A token is consumed once; the record comes back with its tenant and data."""
        _, (tenant,) = await new_member(database, "owner")
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        issued = await tokens.issue(
            TokenPurpose.INVITATION,
            "invitee@example.com",
            tenant=str(tenant.id),
            data={"role": "viewer"},
        )
        record = await tokens.consume(TokenPurpose.INVITATION, issued.token)
        assert ("invitee@example.com", str(tenant.id)) == (record.subject, record.tenant)
        assert {"role": "viewer"} == dict(record.data)
        assert record.used_at is not None
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(TokenPurpose.INVITATION, issued.token)

    async def test_other_purpose_does_not_spend_the_token(self, database):
        """A reset token shown to verification finds nothing and still works for reset."""
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        issued = await tokens.issue(TokenPurpose.PASSWORD_RESET, "user-1")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(TokenPurpose.EMAIL_VERIFICATION, issued.token)
        assert "user-1" == (await tokens.consume(TokenPurpose.PASSWORD_RESET, issued.token)).subject

    async def test_expired_tokens_are_refused(self, database):
        """A token past its life is refused."""
        clock = Clock()
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database), clock=clock)
        issued = await tokens.issue(TokenPurpose.PASSWORD_RESET, "user-2", ttl=60)
        clock.now += timedelta(seconds=61)
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(TokenPurpose.PASSWORD_RESET, issued.token)

    async def test_issuing_supersedes_and_discard_voids(self, database):
        """Only the newest unused token of a purpose and subject works; discard voids it."""
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        old = await tokens.issue(TokenPurpose.PASSWORD_RESET, "user-3")
        new = await tokens.issue(TokenPurpose.PASSWORD_RESET, "user-3")
        other = await tokens.issue(TokenPurpose.EMAIL_VERIFICATION, "user-3")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(TokenPurpose.PASSWORD_RESET, old.token)
        assert 1 == await tokens.discard(TokenPurpose.PASSWORD_RESET, "user-3")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(TokenPurpose.PASSWORD_RESET, new.token)
        assert (
            "user-3" == (await tokens.consume(TokenPurpose.EMAIL_VERIFICATION, other.token)).subject
        )

    async def test_concurrent_consumers_get_one_record(self, database):
        """Of several racing consumers, exactly one gets the record."""
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        issued = await tokens.issue(TokenPurpose.EMAIL_VERIFICATION, "user-4")
        outcomes = await asyncio.gather(
            *(tokens.consume(TokenPurpose.EMAIL_VERIFICATION, issued.token) for _ in range(4)),
            return_exceptions=True,
        )
        assert 1 == sum(not isinstance(each, BaseException) for each in outcomes)
        assert all(
            isinstance(each, InvalidOneTimeToken)
            for each in outcomes
            if isinstance(each, BaseException)
        )

    async def test_in_a_transaction_a_rollback_keeps_the_token(self, database):
        """Consumed inside a transaction that rolls back, the token still works."""
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        issued: list = []

        async def issue_then_fail() -> None:
            async with database.session() as session:
                issued.append(
                    await issue_one_time(tokens, session, TokenPurpose.PASSWORD_RESET, "u-5")
                )
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await issue_then_fail()
        # Issued in the rolled-back transaction: it never existed.
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(TokenPurpose.PASSWORD_RESET, issued[0].token)
        kept = await tokens.issue(TokenPurpose.PASSWORD_RESET, "u-5")

        async def consume_then_fail() -> None:
            async with database.session() as session:
                await consume_one_time(tokens, session, TokenPurpose.PASSWORD_RESET, kept.token)
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await consume_then_fail()
        assert "u-5" == (await tokens.consume(TokenPurpose.PASSWORD_RESET, kept.token)).subject

    async def test_validity_check_spends_nothing(self, database):
        """one_time_token_valid answers for the right subject only and leaves the token usable."""
        tokens = OneTimeTokens(SqlOneTimeTokenStore(database))
        issued = await tokens.issue(TokenPurpose.INVITATION, "a@example.com")
        async with database.sessions() as session:
            assert await one_time_token_valid(
                tokens, session, TokenPurpose.INVITATION, issued.token, "a@example.com"
            )
            assert not await one_time_token_valid(
                tokens, session, TokenPurpose.INVITATION, issued.token, "b@example.com"
            )
            assert not await one_time_token_valid(
                tokens, session, TokenPurpose.INVITATION, "malformed", "a@example.com"
            )
        assert (
            "a@example.com" == (await tokens.consume(TokenPurpose.INVITATION, issued.token)).subject
        )
        async with database.sessions() as session:
            rows = (await session.execute(select(one_time_tokens.c.used_at))).scalars().all()
        assert any(used is not None for used in rows)


async def test_in_transaction_helpers_need_the_table_store(database):
    """A store that cannot join a transaction is refused, not used outside it."""
    tokens = OneTimeTokens(MemoryOneTimeTokenStore())
    async with database.sessions() as session:
        with pytest.raises(TypeError, match="SqlOneTimeTokenStore"):
            await issue_one_time(tokens, session, TokenPurpose.PASSWORD_RESET, "u-6")
