"""API keys: format, keyed hash, verification, rotation and the last-used policy."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.errors import ConfigurationError, ErrorCode, Unauthenticated
from bastion.identity._api_keys import (
    ApiKeyRecord,
    ApiKeys,
    InvalidApiKey,
    LastUsedPolicy,
)

SECRET = "k" * 16 + "0123456789abcdefghijklmnop"  # 42 bytes
OLD_SECRET = "o" * 40
T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(clock: Clock) -> ApiKeys:
    return ApiKeys(SECRET, accepted_prefixes=["bk_test"], clock=clock)


def lookup_from(*records: ApiKeyRecord):
    table = {record.public_id: record for record in records}

    async def lookup(public_id: str) -> ApiKeyRecord | None:
        return table.get(public_id)

    return lookup


class TestCreate:
    def test_key_has_prefix_public_id_secret_and_checksum(self, keys):
        """A key reads bk_live_<12 base62>_<43 base62 secret><6 base62 checksum>."""
        created = keys.create("t1", "ci", ["b", "a", "a"])
        assert re.fullmatch(r"bk_live_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}", created.key)
        assert created.key.startswith(created.record.prefix + "_")
        assert ("a", "b") == created.record.scopes

    def test_record_stores_only_the_keyed_hash(self, keys):
        """The record holds HMAC-SHA256(secret, key), never the key or its secret part."""
        created = keys.create("t1", "ci")
        expected = hmac.new(SECRET.encode(), created.key.encode(), hashlib.sha256).digest()
        assert expected == created.record.hash
        secret_part = created.key.rsplit("_", 1)[1]
        assert secret_part not in repr(created.record)
        assert secret_part not in repr(created)

    def test_keys_are_unique(self, keys):
        """Two keys never share a public id or a secret."""
        made = [keys.create("t1", "ci") for _ in range(200)]
        assert 200 == len({m.record.public_id for m in made})
        assert 200 == len({m.key for m in made})

    def test_record_ids_are_uuid7(self, keys):
        """Record ids are UUIDv7 strings, sortable by creation time."""
        record = keys.create("t1", "ci").record
        assert "7" == record.id[14]

    def test_scopes_as_a_string_is_a_type_error(self, keys):
        """A bare string for scopes is a programming error, not one scope per letter."""
        with pytest.raises(TypeError):
            keys.create("t1", "ci", "documents:read")

    def test_naive_expiry_is_refused(self, keys):
        """Expiry must be timezone-aware."""
        with pytest.raises(ValueError, match="timezone"):
            keys.create("t1", "ci", expires_at=datetime(2030, 1, 1))

    def test_short_server_secret_is_a_configuration_error(self):
        """A server secret under 32 bytes stops start-up."""
        with pytest.raises(ConfigurationError, match=r"identity\.api_keys\.secret"):
            ApiKeys("short")
        with pytest.raises(ConfigurationError):
            ApiKeys(SECRET, previous_secrets=["short"])

    def test_malformed_prefix_is_a_configuration_error(self):
        """Prefixes are lowercase words joined by underscores."""
        with pytest.raises(ConfigurationError, match="prefix"):
            ApiKeys(SECRET, prefix="Bk-Live")


class TestVerify:
    async def test_created_key_verifies(self, keys):
        """A created key authenticates to its record, with nothing to rehash."""
        created = keys.create("t1", "ci", ["documents:read"])
        result = await keys.authenticate(created.key, lookup_from(created.record))
        assert created.record == result.record
        assert not result.rehash

    async def test_unknown_key_is_refused(self, keys):
        """A well-formed key with no record is refused with the one error."""
        created = keys.create("t1", "ci")
        with pytest.raises(InvalidApiKey):
            await keys.authenticate(created.key, lookup_from())

    async def test_wrong_secret_is_refused(self, keys):
        """Another key's secret under a known public id is refused."""
        a, b = keys.create("t1", "a"), keys.create("t1", "b")
        forged_body = a.record.prefix + "_" + b.key.rsplit("_", 1)[1][:43]
        forged = forged_body + keys.parse(b.key).key[-6:]  # checksum of the wrong body
        with pytest.raises(InvalidApiKey):
            await keys.authenticate(forged, lookup_from(a.record))
        # And with a correct checksum, the HMAC refuses it.
        from bastion.identity._api_keys import _checksum

        with pytest.raises(InvalidApiKey):
            await keys.authenticate(forged_body + _checksum(forged_body), lookup_from(a.record))

    async def test_record_of_another_public_id_is_refused(self, keys):
        """A lookup that answers with another key's record does not verify."""
        a, b = keys.create("t1", "a"), keys.create("t1", "b")

        async def wrong(public_id: str) -> ApiKeyRecord:
            return b.record

        with pytest.raises(InvalidApiKey):
            await keys.authenticate(a.key, wrong)

    async def test_revoked_key_is_refused(self, keys):
        """A revoked key is refused like an unknown one."""
        created = keys.create("t1", "ci")
        revoked = keys.revoke(created.record)
        assert revoked.revoked_at is not None
        assert revoked is keys.revoke(revoked)
        with pytest.raises(InvalidApiKey):
            await keys.authenticate(created.key, lookup_from(revoked))

    async def test_expired_key_is_refused(self, keys, clock):
        """A key is refused from its expiry on."""
        created = keys.create("t1", "ci", expires_at=T0 + timedelta(days=1))
        lookup = lookup_from(created.record)
        await keys.authenticate(created.key, lookup)
        clock.now = T0 + timedelta(days=1)
        with pytest.raises(InvalidApiKey):
            await keys.authenticate(created.key, lookup)

    async def test_error_is_a_401_that_says_nothing_specific(self, keys):
        """Every refusal is UNAUTHENTICATED with the same detail and challenge."""
        created = keys.create("t1", "ci")
        errors = []
        for presented, lookup in [
            ("garbage", lookup_from()),
            (created.key, lookup_from()),
            (created.key, lookup_from(keys.revoke(created.record))),
        ]:
            with pytest.raises(Unauthenticated) as info:
                await keys.authenticate(presented, lookup)
            errors.append((info.value.code, info.value.status, info.value.detail))
        assert 1 == len(set(errors))
        assert ErrorCode.UNAUTHENTICATED == errors[0][0]

    async def test_test_prefix_is_accepted_when_configured(self, clock):
        """Keys of any accepted prefix verify; others are malformed."""
        test_keys = ApiKeys(SECRET, prefix="bk_test", clock=clock)
        live = ApiKeys(SECRET, accepted_prefixes=["bk_test"], clock=clock)
        only_live = ApiKeys(SECRET, clock=clock)
        created = test_keys.create("t1", "ci")
        await live.authenticate(created.key, lookup_from(created.record))
        with pytest.raises(InvalidApiKey):
            only_live.parse(created.key)


class TestRotation:
    async def test_hash_under_previous_secret_verifies_and_asks_for_rehash(self, clock):
        """After rotation an old hash verifies, and the new hash is offered for storage."""
        old = ApiKeys(OLD_SECRET, clock=clock)
        created = old.create("t1", "ci")
        rotated = ApiKeys(SECRET, previous_secrets=[OLD_SECRET], clock=clock)
        result = await rotated.authenticate(created.key, lookup_from(created.record))
        assert result.rehash
        assert rotated.hash(created.key) == result.new_hash
        assert created.record.hash != result.new_hash

    async def test_dropped_secret_no_longer_verifies(self, clock):
        """Once the old secret is removed, its hashes are refused."""
        created = ApiKeys(OLD_SECRET, clock=clock).create("t1", "ci")
        with pytest.raises(InvalidApiKey):
            await ApiKeys(SECRET, clock=clock).authenticate(
                created.key, lookup_from(created.record)
            )


class TestParse:
    def test_checksum_catches_a_typo_without_lookup(self, keys):
        """Changing one character of the secret part fails the checksum."""
        key = keys.create("t1", "ci").key
        i = len(key) - 10
        typo = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1 :]
        with pytest.raises(InvalidApiKey):
            keys.parse(typo)

    def test_parsed_repr_hides_the_key(self, keys):
        """A parsed key's repr shows prefix and public id only."""
        created = keys.create("t1", "ci")
        parsed = keys.parse(created.key)
        assert created.key not in repr(parsed)
        assert created.record.public_id == parsed.public_id

    @pytest.mark.parametrize(
        "presented",
        [None, b"bk_live_x", 12, "", "bk_live_", "x" * 10_000, "bk_live_abc_def"],
    )
    def test_non_keys_are_refused(self, keys, presented):
        """Wrong types, empty, oversized and short inputs are InvalidApiKey."""
        with pytest.raises(InvalidApiKey):
            keys.parse(presented)

    def test_trailing_newline_is_refused(self, keys):
        """A key with a trailing newline is not the key (fullmatch, not match)."""
        key = keys.create("t1", "ci").key
        with pytest.raises(InvalidApiKey):
            keys.parse(key + "\n")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_any_string_is_refused_with_the_documented_error(self, presented):
        """Arbitrary text never parses and never raises anything but InvalidApiKey."""
        keys = ApiKeys(SECRET)
        with pytest.raises(InvalidApiKey):
            keys.parse(presented)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_any_mutation_of_a_key_is_refused(self, data):
        """Replacing, inserting or deleting one character of a real key is refused."""
        keys = ApiKeys(SECRET)
        key = keys.create("t1", "ci").key
        i = data.draw(st.integers(0, len(key) - 1))
        char = data.draw(st.characters())
        how = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if how == "replace":
            mutated = key[:i] + char + key[i + 1 :]
        elif how == "insert":
            mutated = key[:i] + char + key[i:]
        else:
            mutated = key[:i] + key[i + 1 :]
        if mutated == key:
            return
        try:
            parsed = keys.parse(mutated)
        except InvalidApiKey:
            return
        # A CRC-32 collision is possible in principle; then the HMAC refuses it.
        created_hash = keys.hash(key)
        assert not hmac.compare_digest(keys.hash(parsed.key), created_hash)


class TestLastUsedPolicy:
    def record(self, keys, last_used_at=None) -> ApiKeyRecord:
        from dataclasses import replace

        return replace(keys.create("t1", "ci").record, last_used_at=last_used_at)

    def test_first_use_is_due(self, keys):
        """A key never used is due for a write."""
        assert LastUsedPolicy(60).due(self.record(keys), T0)

    def test_stored_recent_use_is_not_due(self, keys):
        """A stored use within the interval needs no write."""
        record = self.record(keys, last_used_at=T0 - timedelta(seconds=30))
        assert not LastUsedPolicy(60).due(record, T0)
        assert LastUsedPolicy(60).due(record, T0 + timedelta(seconds=30))

    def test_burst_writes_once_per_interval_per_key(self, keys):
        """Many uses of one stale record in a minute write once; the next minute again."""
        policy = LastUsedPolicy(timedelta(minutes=1))
        record = self.record(keys)
        due = [policy.due(record, T0 + timedelta(seconds=s)) for s in range(0, 120, 5)]
        assert 2 == sum(due)

    def test_keys_are_independent(self, keys):
        """One key's write does not hold back another's."""
        policy = LastUsedPolicy(60)
        assert policy.due(self.record(keys), T0)
        assert policy.due(self.record(keys), T0)

    def test_memory_is_bounded(self, keys):
        """Past max_keys the oldest decisions are forgotten."""
        policy = LastUsedPolicy(60, max_keys=10)
        for _ in range(25):
            policy.due(self.record(keys), T0)
        assert len(policy._decided) <= 10

    def test_negative_interval_is_refused(self):
        """The interval cannot be negative."""
        with pytest.raises(ValueError, match="negative"):
            LastUsedPolicy(-1)

    async def test_verification_reports_touch(self, keys, clock):
        """authenticate says when last_used_at is due, once per interval."""
        created = keys.create("t1", "ci")
        lookup = lookup_from(created.record)
        assert (await keys.authenticate(created.key, lookup)).touch
        assert not (await keys.authenticate(created.key, lookup)).touch
        clock.now = T0 + timedelta(minutes=1)
        touched = keys.touched(created.record)
        assert clock.now == touched.last_used_at
        assert (await keys.authenticate(created.key, lookup)).touch
