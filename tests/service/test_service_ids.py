"""UUIDv7 ids: RFC 9562 layout, time-ordered, monotonic within a millisecond."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from bastion_docs import ids


@pytest.fixture(autouse=True)
def _fresh_generator(monkeypatch):
    """Each test starts the generator as a new process would."""
    monkeypatch.setattr(ids, "_last_ms", -1)


class TestUuid7:
    def test_layout_is_rfc_9562_version_7(self):
        """Version nibble 7 and the RFC variant bits 10."""
        value = ids.uuid7()
        assert (7, uuid.RFC_4122) == (value.version, value.variant)

    def test_timestamp_is_now_in_milliseconds(self):
        """The leading 48 bits are the Unix time in milliseconds."""
        before = datetime.now(UTC).replace(microsecond=0)
        created = ids.uuid7_time(ids.uuid7())
        assert before <= created <= datetime.now(UTC)

    def test_many_in_one_millisecond_stay_ordered(self, monkeypatch):
        """With the clock frozen, successive ids still strictly increase."""
        monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_123_456_789)
        made = [ids.uuid7() for _ in range(1000)]
        assert (made, 1000) == (sorted(made), len(set(made)))
        assert {datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)} == {
            ids.uuid7_time(v) for v in made
        }

    def test_clock_stepping_back_keeps_order(self, monkeypatch):
        """A clock that moves backwards does not make an id smaller than the last."""
        clock = iter([1_800_000_000_000_000_000, 1_799_999_999_000_000_000])
        monkeypatch.setattr(time, "time_ns", lambda: next(clock))
        first, second = ids.uuid7(), ids.uuid7()
        assert first < second

    def test_counter_overflow_borrows_the_next_millisecond(self, monkeypatch):
        """When the counter runs out, the next id moves to the next millisecond."""
        monkeypatch.setattr(time, "time_ns", lambda: 1_900_000_000_000_000_000)
        first = ids.uuid7()
        monkeypatch.setattr(ids, "_counter", ids._COUNTER_MAX)
        second = ids.uuid7()
        assert first < second
        assert 1 == (second.int >> 80) - (first.int >> 80)

    def test_uuid7_time_rejects_other_versions(self):
        """Only version 7 UUIDs carry a timestamp."""
        with pytest.raises(ValueError, match="UUIDv7"):
            ids.uuid7_time(uuid.uuid4())
