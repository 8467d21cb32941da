"""Single-use tokens: random, hashed, purpose-bound, expiring, consumed once."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.errors import ErrorCode
from bastion.identity._one_time import (
    DEFAULT_ONE_TIME_TTLS,
    InvalidOneTimeToken,
    MemoryOneTimeTokenStore,
    OneTimeTokens,
    OneTimeTokenStore,
    TokenPurpose,
)

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
RESET = TokenPurpose.PASSWORD_RESET
VERIFY = TokenPurpose.EMAIL_VERIFICATION
INVITE = TokenPurpose.INVITATION


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryOneTimeTokenStore:
    return MemoryOneTimeTokenStore()


@pytest.fixture
def tokens(store, clock) -> OneTimeTokens:
    return OneTimeTokens(store, clock=clock)


class TestIssue:
    async def test_token_is_256_bits_url_safe(self, tokens):
        """A token is 43 URL-safe base64 characters (32 random bytes)."""
        issued = await tokens.issue(RESET, "user-1")
        assert 43 == len(issued.token)
        assert set(issued.token) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )

    async def test_only_a_purpose_bound_hash_is_stored(self, tokens):
        """The record holds SHA-256 of purpose and token, never the token."""
        issued = await tokens.issue(VERIFY, "user-1")
        expected = hashlib.sha256(f"bastion:email_verification:{issued.token}".encode()).digest()
        assert expected == issued.record.token_hash
        assert issued.token not in repr(issued)
        assert issued.token not in repr(issued.record)

    async def test_subject_stays_out_of_repr(self, tokens):
        """An invitee's address is not in the record's repr (logs)."""
        issued = await tokens.issue(INVITE, "someone@example.com", tenant="t1")
        assert "someone@example.com" not in repr(issued.record)

    async def test_default_lives_by_purpose(self, tokens):
        """Each purpose has its own default life."""
        for purpose in TokenPurpose:
            issued = await tokens.issue(purpose, "user-1")
            assert DEFAULT_ONE_TIME_TTLS[purpose] == issued.record.expires_at - T0

    async def test_ttl_overrides(self, store, clock):
        """Lives can be set per purpose and per token."""
        tokens = OneTimeTokens(store, ttls={RESET: 600}, clock=clock)
        assert timedelta(minutes=10) == tokens.ttl(RESET)
        issued = await tokens.issue(RESET, "user-1", ttl=timedelta(minutes=1))
        assert T0 + timedelta(minutes=1) == issued.record.expires_at

    @pytest.mark.parametrize("ttl", [0, -5, timedelta(0)])
    async def test_non_positive_life_is_refused(self, tokens, store, ttl):
        """A token cannot be born expired."""
        with pytest.raises(ValueError, match="positive"):
            await tokens.issue(RESET, "user-1", ttl=ttl)
        with pytest.raises(ValueError, match="positive"):
            OneTimeTokens(store, ttls={RESET: ttl})

    async def test_empty_subject_is_refused(self, tokens):
        """A token must be for someone."""
        with pytest.raises(ValueError, match="subject"):
            await tokens.issue(RESET, "")

    async def test_invitation_carries_tenant_and_data(self, tokens):
        """An invitation keeps its tenant and role for the accept step."""
        issued = await tokens.issue(INVITE, "a@example.com", tenant="t1", data={"role": "admin"})
        record = await tokens.consume(INVITE, issued.token)
        assert ("t1", "admin") == (record.tenant, record.data["role"])


class TestConsume:
    async def test_consumes_once(self, tokens, clock):
        """The first use returns the record, marked used; the second is refused."""
        issued = await tokens.issue(RESET, "user-1")
        record = await tokens.consume(RESET, issued.token)
        assert ("user-1", T0) == (record.subject, record.used_at)
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(RESET, issued.token)

    async def test_concurrent_consumers_get_one_success(self, tokens):
        """Of many simultaneous uses of one token exactly one succeeds."""
        issued = await tokens.issue(RESET, "user-1")
        results = await asyncio.gather(
            *(tokens.consume(RESET, issued.token) for _ in range(20)), return_exceptions=True
        )
        assert 1 == sum(not isinstance(r, BaseException) for r in results)
        assert all(isinstance(r, InvalidOneTimeToken) for r in results if isinstance(r, Exception))

    async def test_reset_token_does_not_verify_email(self, tokens):
        """A token serves only its purpose, and trying another does not use it up."""
        issued = await tokens.issue(RESET, "user-1")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(VERIFY, issued.token)
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(INVITE, issued.token)
        await tokens.consume(RESET, issued.token)

    async def test_store_checks_purpose_too(self, tokens, store):
        """A store asked for the right hash under another purpose finds nothing."""
        issued = await tokens.issue(RESET, "user-1")
        assert None is await store.consume(VERIFY, issued.record.token_hash, T0)

    async def test_expired_token_is_refused(self, tokens, clock):
        """A token is refused from its expiry on."""
        issued = await tokens.issue(RESET, "user-1")
        clock.now = issued.record.expires_at
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(RESET, issued.token)

    async def test_new_token_supersedes_the_unused_one(self, tokens):
        """Issuing a second reset token for a user voids the first; other purposes stay."""
        first = await tokens.issue(RESET, "user-1")
        other_user = await tokens.issue(RESET, "user-2")
        verify = await tokens.issue(VERIFY, "user-1")
        second = await tokens.issue(RESET, "user-1")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(RESET, first.token)
        await tokens.consume(RESET, second.token)
        await tokens.consume(RESET, other_user.token)
        await tokens.consume(VERIFY, verify.token)

    async def test_discard_voids_unused_tokens_of_a_purpose(self, tokens):
        """discard voids a subject's pending tokens of one purpose, and nothing else."""
        reset = await tokens.issue(RESET, "user-1")
        verify = await tokens.issue(VERIFY, "user-1")
        other = await tokens.issue(RESET, "user-2")
        assert 1 == await tokens.discard(RESET, "user-1")
        assert 0 == await tokens.discard(RESET, "user-1")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(RESET, reset.token)
        await tokens.consume(VERIFY, verify.token)
        await tokens.consume(RESET, other.token)

    async def test_new_built_token_is_not_stored(self, tokens):
        """new() makes a token without storing it (a transaction stores it)."""
        issued = tokens.new(RESET, "user-1")
        with pytest.raises(InvalidOneTimeToken):
            await tokens.consume(RESET, issued.token)

    async def test_error_is_unauthenticated_and_vague(self, tokens):
        """Every refusal is the same UNAUTHENTICATED answer."""
        with pytest.raises(InvalidOneTimeToken) as info:
            await tokens.consume(RESET, "x")
        assert ErrorCode.UNAUTHENTICATED == info.value.code
        assert "The link is invalid or has expired." == info.value.detail

    def test_memory_store_is_a_store(self, store):
        """The memory store satisfies the store protocol."""
        assert isinstance(store, OneTimeTokenStore)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.text(max_size=100), st.none(), st.integers(), st.binary(max_size=50)))
    def test_any_input_is_refused_with_the_documented_error(self, presented):
        """Arbitrary input never raises anything but InvalidOneTimeToken."""
        tokens = OneTimeTokens(MemoryOneTimeTokenStore())
        with pytest.raises(InvalidOneTimeToken):
            asyncio.run(tokens.consume(RESET, presented))
