"""The Redis deny list: revoked jtis, per-user markers, one round trip, and Redis outages.

Behaviour runs on the shared test Redis under a per-test key prefix; outages use
a port nothing listens on, or a ``redis-server`` of the test's own that it kills
(the shared Redis is never touched). Real time is waited on only where a
timeout is what is under test, and bounded.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.errors import DependencyFailure, ErrorCode, ServiceUnavailable
from bastion.identity._deny_list import RedisDenyList
from bastion.identity._keys import KeySet, generate_jwks
from bastion.identity._tokens import AccessTokens, InvalidToken, TokenDenyList
from bastion.ratelimit._scripts import ScriptRunner
from bastion.settings import IdentitySettings

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def checks(result: str) -> float:
    value = REGISTRY.get_sample_value("bastion_identity_deny_list_checks_total", {"result": result})
    return value or 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(redis_url):
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
    yield client
    await client.aclose()


@pytest.fixture
async def deny(client, redis_prefix, clock):
    async with RedisDenyList(client, key_prefix=redis_prefix, clock=clock, timeout=0.5) as deny:
        yield deny
    keys = [key async for key in client.scan_iter(match=redis_prefix + "*")]
    if keys:
        await client.delete(*keys)


class TestRevokeJti:
    async def test_revoked_jti_is_denied_and_others_are_not(self, deny):
        """A revoked jti is denied; an unrelated one is allowed."""
        await deny.revoke("jti-1", NOW + 600)
        assert await deny.is_revoked("jti-1")
        assert not await deny.is_revoked("jti-2")

    async def test_key_lives_until_exp_plus_leeway(self, deny, client, redis_prefix):
        """The jti key's TTL is the token's remaining life plus the verifier's leeway."""
        await deny.revoke("jti-1", NOW + 600)
        ttl = await client.ttl(f"{redis_prefix}identity:deny:jti:jti-1")
        assert 629 <= ttl <= 630

    async def test_expired_token_is_not_written(self, deny, client, redis_prefix):
        """A token past exp plus leeway cannot verify: nothing is stored for it."""
        await deny.revoke("old", NOW - 31)
        assert 0 == await client.exists(f"{redis_prefix}identity:deny:jti:old")

    async def test_seen_by_another_instance(self, deny, redis_url, redis_prefix):
        """A revocation on one instance is seen by another at once."""
        other_client = aioredis.Redis.from_url(redis_url)
        try:
            async with RedisDenyList(other_client, key_prefix=redis_prefix, timeout=0.5) as other:
                await deny.revoke("jti-1", NOW + 600)
                assert await other.is_revoked("jti-1")
        finally:
            await other_client.aclose()

    async def test_counts_checks_by_result(self, deny):
        """Allowed and revoked checks are counted."""
        allowed, revoked = checks("allowed"), checks("revoked")
        await deny.revoke("jti-1", NOW + 600)
        await deny.is_revoked("jti-1")
        await deny.is_revoked("jti-2")
        assert (allowed + 1, revoked + 1) == (checks("allowed"), checks("revoked"))


class TestRevokeSubject:
    async def test_tokens_issued_before_are_denied(self, deny, clock):
        """After revoke_subject, the user's earlier tokens are denied, later ones and others not."""
        await deny.revoke_subject("user-1")
        assert await deny.is_revoked("a", subject="user-1", issued_at=NOW - 60)
        assert not await deny.is_revoked("b", subject="user-1", issued_at=NOW + 1)
        assert not await deny.is_revoked("c", subject="user-2", issued_at=NOW - 60)

    async def test_token_of_the_same_second_is_kept(self, deny, clock):
        """iat has one-second resolution: a token issued in T's second stays valid."""
        clock.now = NOW + 0.7
        await deny.revoke_subject("user-1")
        assert not await deny.is_revoked("a", subject="user-1", issued_at=NOW)
        assert await deny.is_revoked("a", subject="user-1", issued_at=NOW - 1)

    async def test_without_subject_only_the_jti_is_checked(self, deny):
        """is_revoked(jti) alone ignores markers (the TokenDenyList protocol call)."""
        await deny.revoke_subject("user-1")
        assert not await deny.is_revoked("a")
        assert not await deny.is_revoked("a", subject="user-1")

    async def test_earlier_cutoff_never_lowers_a_later_one(self, deny, client, redis_prefix):
        """A revocation with an earlier T keeps the stored later T (and its life)."""
        await deny.revoke_subject("user-1", before=NOW)
        await deny.revoke_subject("user-1", before=NOW - 300)
        assert b"1800000000" == await client.get(f"{redis_prefix}identity:deny:sub:user-1")
        assert await deny.is_revoked("a", subject="user-1", issued_at=NOW - 100)
        await deny.revoke_subject("user-1", before=NOW + 100)
        assert await deny.is_revoked("a", subject="user-1", issued_at=NOW + 50)

    async def test_marker_outlives_every_token_it_denies(self, deny, client, redis_prefix):
        """The marker expires after T plus the longest token life plus the leeway."""
        await deny.revoke_subject("user-1")
        ttl = await client.ttl(f"{redis_prefix}identity:deny:sub:user-1")
        assert 929 <= ttl <= 930

    async def test_marker_that_is_not_a_number_denies(self, deny, client, redis_prefix):
        """A marker not written by the list denies rather than guesses."""
        await client.set(f"{redis_prefix}identity:deny:sub:user-1", "garbage", ex=60)
        assert await deny.is_revoked("a", subject="user-1", issued_at=NOW)

    async def test_long_past_cutoff_is_not_written(self, deny, client, redis_prefix):
        """A T so old every token before it has expired stores nothing."""
        await deny.revoke_subject("user-1", before=NOW - 10_000)
        assert 0 == await client.exists(f"{redis_prefix}identity:deny:sub:user-1")

    async def test_from_settings_takes_token_life_and_leeway(self, client, redis_prefix):
        """from_settings bounds markers by access_ttl and leeway."""
        identity = IdentitySettings(tokens={"access_ttl": 300, "leeway": 5})
        async with RedisDenyList.from_settings(identity, client, key_prefix=redis_prefix) as deny:
            await deny.revoke_subject("user-9")
            ttl = await client.ttl(f"{redis_prefix}identity:deny:sub:user-9")
            await client.delete(f"{redis_prefix}identity:deny:sub:user-9")
        assert 304 <= ttl <= 305


class TestWithAccessTokens:
    async def test_is_a_token_deny_list(self, deny):
        """RedisDenyList satisfies H3's TokenDenyList protocol."""
        assert isinstance(deny, TokenDenyList)

    async def test_revoked_access_token_is_refused(self, client, redis_prefix):
        """AccessTokens.averify refuses a token whose jti was revoked in Redis."""
        async with RedisDenyList(client, key_prefix=redis_prefix, timeout=0.5) as deny:
            tokens = AccessTokens(KeySet.from_jwks(generate_jwks()), deny_list=deny)
            issued = tokens.issue("user-1", "t1", ["member"])
            await tokens.averify(issued.token)
            await deny.revoke(issued.token_id, issued.expires_at)
            with pytest.raises(InvalidToken):
                await tokens.averify(issued.token)
            await client.delete(f"{redis_prefix}identity:deny:jti:{issued.token_id}")


class TestOutage:
    async def test_unreachable_redis_fails_open_and_logs_once(self):
        """With nothing listening, checks admit tokens, are counted, and log one warning."""
        client = aioredis.Redis(host="127.0.0.1", port=free_port())
        failed_open = checks("failed_open")
        try:
            with capture_logs() as logs:
                async with RedisDenyList(client, timeout=0.2) as deny:
                    assert not await deny.is_revoked("a", subject="u", issued_at=NOW)
                    assert not await deny.is_revoked("b")
                    assert not await deny.ping()
        finally:
            await client.aclose()
        assert failed_open + 2 == checks("failed_open")
        warnings = [e for e in logs if e["event"] == "dependency unavailable: running degraded"]
        assert 1 == len(warnings)
        assert "token deny list" == warnings[0]["feature"]

    async def test_fail_closed_answers_503(self):
        """With fail_open off, an unreachable Redis is SERVICE_UNAVAILABLE with Retry-After."""
        client = aioredis.Redis(host="127.0.0.1", port=free_port())
        try:
            async with RedisDenyList(client, timeout=0.2, fail_open=False) as deny:
                with pytest.raises(ServiceUnavailable) as info:
                    await deny.is_revoked("a")
        finally:
            await client.aclose()
        assert ErrorCode.SERVICE_UNAVAILABLE == info.value.code
        assert "1" == info.value.headers["retry-after"]

    async def test_revoking_without_redis_raises(self):
        """A revocation that cannot be stored is a DependencyFailure, never silent."""
        client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
        try:
            async with RedisDenyList(client, write_timeout=1.0) as deny:
                with pytest.raises(DependencyFailure):
                    await deny.revoke("a", time.time() + 600)
                with pytest.raises(DependencyFailure):
                    await deny.revoke_subject("u")
        finally:
            await client.aclose()

    async def test_killed_redis_fails_open_then_recovers(self, tmp_path: Path):
        """A Redis killed mid-use fails open fast; restarted on its port, revocations hold again."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        port = free_port()

        def start() -> subprocess.Popen[bytes]:
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            process = subprocess.Popen(
                [*command, "--appendonly", "no", "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            deadline = time.monotonic() + 10  # bounded: a server start on a loaded machine
            try:
                while True:
                    try:
                        probe.ping()
                    except redis.ConnectionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.02)
                    else:
                        return process
            finally:
                probe.close()

        process = start()
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        runner = ScriptRunner(client, timeout=0.2, retry_interval=0.05, max_retry_interval=0.05)
        try:
            deny = RedisDenyList(client, runner=runner, key_prefix="test:")
            await deny.revoke("jti-1", time.time() + 600)
            assert await deny.is_revoked("jti-1")
            process.kill()
            process.wait(timeout=10)
            started = time.monotonic()
            assert not await deny.is_revoked("jti-1")  # fail open: the token's life bounds it
            assert time.monotonic() - started < 1.0
            process = start()  # empty: nothing persisted, as after a Redis wipe
            await deny.revoke("jti-2", time.time() + 600)
            deadline = time.monotonic() + 5  # bounded: the runner's fail-fast interval
            while not await deny.is_revoked("jti-2"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await deny.aclose()
        finally:
            await runner.close()
            await client.aclose()
            process.kill()
            process.wait(timeout=10)
