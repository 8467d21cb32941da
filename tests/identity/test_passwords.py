"""Password hashing (Argon2id, pepper, rehash, bcrypt import, bounded pool) and the policy."""

from __future__ import annotations

import asyncio
import statistics
import time

import argon2
import bcrypt
import pytest
from argon2 import extract_parameters, low_level
from prometheus_client import REGISTRY
from pydantic import SecretStr
from structlog.testing import capture_logs

from bastion.errors import ConfigurationError, ErrorCode, InvalidInput
from bastion.identity._passwords import (
    PasswordHasher,
    PasswordHashingBusy,
    PasswordPolicy,
    PasswordVerification,
    common_passwords,
    normalise_password,
    usable_cpus,
)
from bastion.settings import PasswordSettings, Settings

PEPPER = "p" * 16 + "e" * 16 + "pper-for-tests"
OTHER_PEPPER = "another-pepper-of-at-least-32-bytes!"
# Cheap parameters keep the suite fast; the pool tests use the defaults on purpose.
FAST = {"time_cost": 1, "memory_cost": 64, "parallelism": 1}


@pytest.fixture
async def hasher():
    """A hasher with cheap parameters, closed after the test."""
    async with PasswordHasher(PEPPER, **FAST) as made:
        yield made


def rejected(reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "bastion_identity_password_hash_rejected_total", {"reason": reason}
        )
        or 0.0
    )


class TestHashing:
    async def test_round_trip(self, hasher):
        """A hash verifies its password and no other."""
        stored = await hasher.hash("correct horse battery staple")
        assert stored.startswith("$argon2id$v=19$m=64,t=1,p=1$")
        assert PasswordVerification(valid=True) == await hasher.verify(
            stored, "correct horse battery staple"
        )
        assert not (await hasher.verify(stored, "correct horse battery stapler")).valid

    async def test_salted(self, hasher):
        """The same password hashes differently each time."""
        assert await hasher.hash("same password") != await hasher.hash("same password")

    async def test_pepper_matters(self, hasher):
        """A hash made under another pepper does not verify, nor does plain Argon2id of it."""
        stored = await hasher.hash("correct horse battery staple")
        async with PasswordHasher(OTHER_PEPPER, **FAST) as other:
            assert not (await other.verify(stored, "correct horse battery staple")).valid
        plain = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
        with pytest.raises(argon2.exceptions.VerifyMismatchError):
            plain.verify(stored, "correct horse battery staple")

    async def test_nfkc(self, hasher):
        """Compatibility forms of a password verify (NFKC): full-width digits, a decomposed é."""
        stored = await hasher.hash("caf\u00e9\uff11\uff12\uff13password")  # full-width 123
        assert (await hasher.verify(stored, "cafe\u0301123password")).valid

    def test_settings(self):
        """from_settings takes the parameters and the pepper from identity.passwords."""
        settings = PasswordSettings(pepper=SecretStr(PEPPER), time_cost=1, memory_cost=64)
        made = PasswordHasher.from_settings(settings)
        stored = made.hash_sync("x" * 12)
        assert "m=64,t=1,p=1" in stored
        assert made.verify_sync(stored, "x" * 12).valid

    def test_defaults_are_owasp(self):
        """The default parameters are OWASP's: 19 MiB, two passes, one lane."""
        made = PasswordHasher.from_settings(Settings().identity.passwords, pepper=PEPPER)
        params = extract_parameters(made.hash_sync("x" * 12))
        assert (19_456, 2, 1) == (params.memory_cost, params.time_cost, params.parallelism)

    @pytest.mark.parametrize(
        ("pepper", "needle"), [(None, "not set"), ("", "not set"), ("short", "5 bytes")]
    )
    def test_pepper_required(self, pepper, needle):
        """A missing or short pepper stops start-up with a line naming the setting."""
        with pytest.raises(ConfigurationError, match=needle):
            PasswordHasher(pepper)

    async def test_unknown_format(self, hasher):
        """A stored value that is no known hash fails like a wrong password and is logged."""
        with capture_logs() as logs:
            result = await hasher.verify("$pbkdf2-sha256$29000$abc$def", "whatever password")
        assert not result.valid
        assert [("password hash format not recognised", "$pbkdf2-sha256$")] == [
            (line["event"], line["prefix"]) for line in logs
        ]

    @pytest.mark.parametrize("stored", ["$2b$04$short", "$argon2id$v=19$m=64,t=1,p=1$x", "plain"])
    async def test_corrupt(self, hasher, stored):
        """Corrupt bcrypt, Argon2id or bare values are not verified and do not raise."""
        with capture_logs() as logs:
            assert not await hasher.verify(stored, "whatever password")
        assert hasher.needs_rehash(stored)
        assert "whatever" not in repr(logs)

    async def test_dummy_warms_itself(self, hasher):
        """verify_dummy without warm_up computes the dummy hash first."""
        assert not await hasher.verify_dummy("any password")
        assert hasher._dummy is not None

    async def test_corrupt_argon2(self, hasher):
        """A truncated Argon2id hash does not verify and does not raise."""
        stored = await hasher.hash("correct horse battery staple")
        with capture_logs():
            assert not (await hasher.verify(stored[:40], "correct horse battery staple")).valid

    async def test_constant_time_verify_used(self, hasher, monkeypatch):
        """Verification goes through argon2's verify (constant-time compare in C), never ==."""
        calls = []
        original = low_level.verify_secret

        def spy(*args, **kwargs):
            calls.append(args[2])
            return original(*args, **kwargs)

        monkeypatch.setattr(low_level, "verify_secret", spy)
        stored = await hasher.hash("correct horse battery staple")
        await hasher.verify(stored, "wrong password entirely")
        await hasher.verify(stored, "correct horse battery staple")
        assert [low_level.Type.ID, low_level.Type.ID] == calls


class TestRehash:
    async def test_parameter_rise(self, hasher):
        """A hash made at lower parameters verifies and comes back at the new ones."""
        old = await hasher.hash("correct horse battery staple")
        async with PasswordHasher(PEPPER, time_cost=2, memory_cost=128, parallelism=1) as risen:
            assert risen.needs_rehash(old)
            result = await risen.verify(old, "correct horse battery staple")
            assert result.valid
            assert result.new_hash is not None
            assert "m=128,t=2,p=1" in result.new_hash
            assert not risen.needs_rehash(result.new_hash)
            assert PasswordVerification(valid=True) == await risen.verify(
                result.new_hash, "correct horse battery staple"
            )

    async def test_wrong_password_no_rehash(self, hasher):
        """An outdated hash with a wrong password yields no new hash."""
        old = await hasher.hash("correct horse battery staple")
        async with PasswordHasher(PEPPER, time_cost=2, memory_cost=64) as risen:
            assert PasswordVerification(valid=False) == await risen.verify(old, "wrong one here")

    async def test_current_no_rehash(self, hasher):
        """A hash at the current parameters needs no rehash."""
        assert not hasher.needs_rehash(await hasher.hash("correct horse battery staple"))
        assert hasher.needs_rehash("not a hash")


class TestBcryptImport:
    @pytest.mark.parametrize("prefix", [b"2b", b"2a"])
    async def test_verifies_and_rehashes(self, hasher, prefix):
        """An imported bcrypt hash (made without our pepper) verifies and yields an Argon2id one."""
        imported = bcrypt.hashpw(b"old system password", bcrypt.gensalt(4, prefix)).decode()
        assert hasher.needs_rehash(imported)
        result = await hasher.verify(imported, "old system password")
        assert result.valid
        assert result.new_hash is not None
        assert result.new_hash.startswith("$argon2id$")
        assert (await hasher.verify(result.new_hash, "old system password")).valid
        assert not (await hasher.verify(imported, "old system passwort")).valid

    async def test_long_password(self, hasher):
        """Passwords over bcrypt's 72 bytes verify as the old system cut them."""
        password = "z" * 100
        imported = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(4)).decode()
        assert (await hasher.verify(imported, password)).valid


class TestDummy:
    async def test_always_invalid(self, hasher):
        """The unknown-account path never succeeds, whatever the password."""
        await hasher.warm_up()
        assert PasswordVerification(valid=False) == await hasher.verify_dummy("anything at all")

    async def test_same_parameters(self, hasher):
        """The dummy hash is made at the configured parameters, so it costs what a real one does."""
        await hasher.warm_up()
        assert not hasher.needs_rehash(hasher._dummy.decode())

    async def test_same_cost(self):
        """An unknown account takes what a known one with a wrong password does (within 50%)."""
        async with PasswordHasher(PEPPER, hash_concurrency=1) as made:
            stored = await made.hash("correct horse battery staple")
            await made.warm_up()
            known, unknown = [], []
            # Interleaved, so the drift of a shared machine falls on both alike.
            for _ in range(9):
                for samples, call in (
                    (known, lambda: made.verify(stored, "wrong password here")),
                    (unknown, lambda: made.verify_dummy("wrong password here")),
                ):
                    started = time.perf_counter()
                    await call()
                    samples.append(time.perf_counter() - started)
        assert 0.5 < statistics.median(unknown) / statistics.median(known) < 1.5


class TestPool:
    async def test_loop_stays_responsive(self):
        """N+1 concurrent hashes at the default cost leave the event loop answering within 20 ms."""
        async with PasswordHasher(PEPPER, hash_concurrency=2) as made:
            burst = asyncio.gather(*(made.hash(f"password number {i}") for i in range(3)))
            lags = []
            while not burst.done():
                # Probe each millisecond; a spin would itself take the GIL and a CPU.
                await asyncio.sleep(0.001)
                started = time.perf_counter()
                await asyncio.sleep(0)
                lags.append(time.perf_counter() - started)
            await burst
        assert lags
        assert max(lags) < 0.02

    async def test_bound_holds(self, monkeypatch):
        """No more than hash_concurrency hashes run at once; the rest wait their turn."""
        running = 0
        peak = 0
        original = low_level.hash_secret

        def counting(*args, **kwargs):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                time.sleep(0.01)  # widen the window in which an excess would overlap
                return original(*args, **kwargs)
            finally:
                running -= 1

        monkeypatch.setattr(low_level, "hash_secret", counting)
        async with PasswordHasher(PEPPER, hash_concurrency=2, **FAST) as made:
            await asyncio.gather(*(made.hash(f"p{i}" * 6) for i in range(7)))
        assert 2 == peak

    async def test_queue_full(self):
        """A caller beyond hash_queue is refused 503 with Retry-After, at once."""
        before = rejected("queue_full")
        async with PasswordHasher(PEPPER, hash_concurrency=1, hash_queue=1, hash_wait=5) as made:
            first = asyncio.ensure_future(made.hash("first password"))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(made.hash("second password"))
            await asyncio.sleep(0)
            assert 1 == made.waiting
            with pytest.raises(PasswordHashingBusy) as caught:
                await made.hash("third password")
            await asyncio.gather(first, second)
        assert ErrorCode.SERVICE_UNAVAILABLE == caught.value.code
        assert 503 == caught.value.status
        assert {"Retry-After": "5"} == caught.value.headers
        assert before + 1 == rejected("queue_full")

    async def test_wait_bounded(self):
        """A caller that waits longer than hash_wait is refused rather than queued forever."""
        before = rejected("timeout")
        async with PasswordHasher(PEPPER, hash_concurrency=1, hash_wait=0.001) as made:
            first = asyncio.ensure_future(made.hash("first password"))
            await asyncio.sleep(0)
            with pytest.raises(PasswordHashingBusy):
                await made.hash("second password")
            await first
            assert 0 == made.waiting
        assert before + 1 == rejected("timeout")

    async def test_cancelled_caller_keeps_slot_until_done(self):
        """A cancelled caller's hash still holds its thread's slot until the hash ends."""
        async with PasswordHasher(PEPPER, hash_concurrency=1) as made:
            first = asyncio.ensure_future(made.hash("first password"))
            await asyncio.sleep(0)
            first.cancel()
            await asyncio.sleep(0)
            assert made._slots is not None
            assert made._slots.locked()
            assert (await made.verify(await made.hash("after cancel"), "after cancel")).valid

    async def test_default_concurrency(self):
        """Without hash_concurrency the pool has one thread per usable CPU."""
        async with PasswordHasher.from_settings(PasswordSettings(), pepper=PEPPER) as made:
            assert usable_cpus() == made._concurrency

    async def test_closed(self):
        """A closed hasher refuses new work."""
        made = PasswordHasher(PEPPER, **FAST)
        await made.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await made.hash("a password here")


class TestPolicy:
    def test_accepts(self):
        """A long uncommon password passes."""
        PasswordPolicy().check("violet tractor meadow 42")

    @pytest.mark.parametrize(
        ("password", "codes"),
        [
            ("Zq9!wv", ["too_short"]),
            ("x" * 257, ["too_long"]),
            ("password1234", ["common"]),
            ("PassWord1234", ["common"]),
            ("123456", ["too_short", "common"]),
        ],
    )
    def test_refuses(self, password, codes):
        """Each broken rule is one FieldError on the password field."""
        with pytest.raises(InvalidInput) as caught:
            PasswordPolicy().check(password)
        assert codes == [error.code for error in caught.value.errors]
        assert {"password"} == {error.field for error in caught.value.errors}
        assert password not in str(caught.value.problem("r1"))

    def test_length_after_nfkc(self):
        """Length is counted in code points after NFKC: a decomposed é counts once."""
        policy = PasswordPolicy(min_length=12)
        assert ["too_short"] == [e.code for e in policy.problems("cafe\u0301" + "x" * 7)]
        assert "ﬁ" != normalise_password("ﬁ")

    def test_context(self):
        """The account's e-mail or its local part is refused as a password."""
        policy = PasswordPolicy(min_length=8)
        codes = [
            e.code for e in policy.problems("Alice.Smith", context=["alice.smith@example.org"])
        ]
        assert ["matches_context"] == codes
        assert [] == policy.problems("something else", context=["alice.smith@example.org", ""])

    def test_common_off(self):
        """check_common=False skips the list."""
        assert [] == PasswordPolicy(check_common=False).problems("password1234")

    def test_max_floor(self):
        """A maximum below 64 or below the minimum is a configuration error."""
        with pytest.raises(ConfigurationError, match="at least 64"):
            PasswordPolicy(max_length=32)
        with pytest.raises(ConfigurationError, match="below min_length"):
            PasswordPolicy(min_length=100, max_length=80)

    def test_from_settings(self):
        """from_settings takes the lengths and the switch."""
        policy = PasswordPolicy.from_settings(PasswordSettings(min_length=20, max_length=64))
        assert (20, 64, True) == (policy.min_length, policy.max_length, policy.check_common)

    def test_bundled_list(self):
        """The bundled list holds Django's ~20,000 common passwords, read once."""
        words = common_passwords()
        assert 19_000 < len(words) <= 20_000
        assert "qwerty" in words
        assert words is common_passwords()
