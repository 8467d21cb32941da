"""Fixtures of the rate-limit tests: a clock the test moves, stores, rules, a Redis client.

tests/ has no ``__init__.py`` (pytest's "prepend" import mode), so the reference
model beside this file is imported as ``model`` by the tests of this directory.
"""

from __future__ import annotations

import secrets

import pytest
import redis.asyncio as aioredis
from model import ManualClock

from bastion.ratelimit._memory import MemoryStore
from bastion.ratelimit._rules import build_rules


@pytest.fixture
def clock() -> ManualClock:
    """A clock at 10,000 s that only the test moves."""
    return ManualClock()


@pytest.fixture
def memory_store(clock) -> MemoryStore:
    """A memory store on the test's clock."""
    return MemoryStore(clock=clock)


@pytest.fixture
def make_rules():
    """Build rules from an expression: ``make_rules("10/second", "sliding_log")``."""

    def make(expression: str, algorithm: str = "token_bucket", *, max_log_limit: int = 1000):
        return build_rules(expression, algorithm, max_log_limit=max_log_limit)

    return make


@pytest.fixture
def unique_key() -> str:
    """A key no other test (or helper sharing this Redis) uses."""
    return f"test:{secrets.token_hex(6)}"


@pytest.fixture
async def redis_client(redis_url):
    """An asyncio Redis client on the test Redis (fails in CI when Redis is unreachable)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()
