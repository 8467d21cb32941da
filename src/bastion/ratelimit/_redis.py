"""The Redis limit store: every decision one EVALSHA of ``decide.lua``, pipelined across callers.

Keys. The state of one rule for one caller's key lives at::

    {key_prefix}rl:{<key>}:<rule id>        e.g. bastion:rl:{ip:203.0.113.9}:tb:10/1/10

The braces are a Redis Cluster hash tag: all keys of one decision hash to one
slot, as a script's keys must. A key that is empty, holds a brace or starts
with ``#`` is tagged ``#`` + its SHA-256 instead, so that no key can split the
tag and no two keys share one. The rule id names the algorithm, rate, period
and burst, so reordering or adding limits in configuration never mixes counts.
Every key carries a TTL: it expires once it no longer matters.

Time. Redis ``TIME`` is the clock, so instances with skewed clocks agree; a
store built with a ``clock`` sends its readings instead (property tests only).

Replies. The script returns counts as integers and durations as strings of
the exact double (``%.17g``), since Redis truncates a Lua number to an integer.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self

from bastion.ratelimit._rules import rule_id
from bastion.ratelimit._scripts import LuaScript, ScriptRunner
from bastion.ratelimit._store import Rule, Verdict

__all__ = ["RedisStore", "hash_tag"]

DECIDE: Final = LuaScript("decide.lua")
NAMESPACE: Final = "rl:"
_KIND: Final = {"token_bucket": "t", "sliding_window": "w", "sliding_log": "l"}
# Plans are per distinct rules tuple, which come from configuration: a bound
# only guards against a caller that builds rules per request.
_MAX_PLANS: Final = 1024


def hash_tag(key: str) -> str:
    """Return ``key`` as a Redis Cluster hash tag, ``{key}``, safe whatever it holds.

    Redis hashes only what lies between the first ``{`` and the next ``}``, and
    the whole name when that is empty; a key that is empty, holds a brace or
    starts with ``#`` is therefore replaced by ``#`` and its SHA-256.
    """
    if key and "{" not in key and "}" not in key and not key.startswith("#"):
        return "{" + key + "}"
    return "{#" + hashlib.sha256(key.encode()).hexdigest() + "}"


class _Plan:
    """What every decision against one rules tuple sends, computed once."""

    __slots__ = ("args", "has_log", "max_cost", "single", "suffixes")

    def __init__(self, rules: Sequence[Rule]) -> None:
        args: list[str] = []
        for rule in rules:
            limit = rule.limit
            if rule.algorithm == "token_bucket":
                # The same expressions as the memory store, so both round alike.
                emission = limit.period / limit.rate
                args += ["t", repr(emission), repr(emission * limit.burst)]
            else:
                args += [_KIND[rule.algorithm], repr(limit.window), str(limit.burst)]
        self.args = tuple(args)
        self.single = len(rules) == 1
        self.suffixes = tuple(":" + rule_id(rule) for rule in rules)
        self.has_log = any(rule.algorithm == "sliding_log" for rule in rules)
        self.max_cost = min((rule.limit.burst for rule in rules), default=0)


class RedisStore:
    """Decides requests against rules in Redis: one round trip per decision, atomic.

    Implements :class:`~bastion.ratelimit._store.LimitStore`. Concurrent decisions
    share pipelined round trips (:class:`ScriptRunner`); each is one EVALSHA that
    checks every rule and consumes all or none.

    Args:
        client: a ``redis.asyncio.Redis`` (bytes or decoded replies); the store
            opens connections of its own with its settings.
        key_prefix: prefix of every key (``redis.key_prefix``, e.g. ``bastion:``).
        timeout: seconds a decision may take; past it :class:`StoreUnavailable`.
        clock: ``None`` (production) uses Redis ``TIME``; a callable's readings are
            sent instead, for tests that drive time.
        runner: a runner to share (e.g. with quota counters); by default the store
            makes its own and closes it with :meth:`close`.

    Example:
        >>> store = RedisStore(redis.asyncio.Redis(), key_prefix="bastion:", timeout=0.05)
        >>> verdict = await store.decide("ip:203.0.113.9", rules)
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str,
        timeout: float,
        clock: Callable[[], float] | None = None,
        runner: ScriptRunner | None = None,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.runner = runner if runner is not None else ScriptRunner(client, timeout=timeout)
        self._owns_runner = runner is None
        self._owns_client = False
        self._clock = clock
        self._namespace = key_prefix + NAMESPACE
        self._plans: dict[int, tuple[Sequence[Rule], _Plan]] = {}
        # Sliding-log members must be distinct across processes and calls.
        self._instance = secrets.token_hex(6) + ":"
        self._sequence = itertools.count()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "bastion:",
        timeout: float = 0.05,
        clock: Callable[[], float] | None = None,
    ) -> RedisStore:
        """Return a store on a Redis of its own (``redis://host:port/db``), closed with it.

        Raises:
            ImportError: redis-py is not installed.
        """
        import redis.asyncio  # noqa: PLC0415 -- only a Redis store needs redis-py

        client = redis.asyncio.Redis.from_url(url)
        store = cls(client, key_prefix=key_prefix, timeout=timeout, clock=clock)
        store._owns_client = True
        return store

    def key(self, key: str, rule: Rule) -> str:
        """Return the Redis key holding ``rule``'s state for ``key``."""
        return self._namespace + hash_tag(key) + ":" + rule_id(rule)

    async def decide(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Verdict:
        """Check ``cost`` units against every rule under ``key`` and consume them if all admit.

        Raises:
            ValueError: no rules, or ``cost`` below 1 or above a rule's burst (never admissible).
            StoreUnavailable: Redis could not decide in time.
        """
        cached = self._plans.get(id(rules))
        plan = cached[1] if cached is not None and cached[0] is rules else self._plan(rules)
        if cost < 1 or cost > plan.max_cost:
            raise ValueError(
                f"cost {cost} can never be admitted: it must be from 1 to the smallest"
                f" burst, {plan.max_cost}"
            )
        base = self._namespace + hash_tag(key)
        reply = await self.runner.run(
            DECIDE,
            [base + suffix for suffix in plan.suffixes],
            (
                "" if self._clock is None else repr(self._clock()),
                cost,
                f"{self._instance}{next(self._sequence)}" if plan.has_log else "",
                *plan.args,
            ),
        )
        if plan.single:
            return Verdict(reply[0] == 1, float(reply[1]), (int(reply[2]),), (float(reply[3]),))
        return Verdict(
            reply[0] == 1,
            float(reply[1]),
            tuple(map(int, reply[2::2])),
            tuple(map(float, reply[3::2])),
        )

    async def reset(self, key: str, rules: Sequence[Rule]) -> None:
        """Forget what ``key`` has consumed under ``rules`` (one DEL).

        Raises:
            StoreUnavailable: Redis could not be reached in time.
        """
        base = self._namespace + hash_tag(key)
        await self.runner.execute("DEL", *(base + suffix for suffix in self._plan(rules).suffixes))

    async def start(self) -> None:
        """Connect now (optional): the first decision then pays no connection set-up.

        Raises:
            StoreUnavailable: Redis could not be reached within the connect timeout.
        """
        await self.runner.connect()

    async def ping(self) -> bool:
        """Return whether Redis answers within the timeout (for readiness checks)."""
        try:
            await self.runner.execute("PING")
        except Exception:  # noqa: BLE001 -- any failure means not ready
            return False
        return True

    async def close(self) -> None:
        """Close the runner's connections (and the client when :meth:`from_url` made it)."""
        if self._owns_runner:
            await self.runner.close()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _plan(self, rules: Sequence[Rule]) -> _Plan:
        if not rules:
            raise ValueError("a decision needs at least one rule")
        plan = _Plan(rules)
        # Cached by the identity of the tuple a policy passes every time (hashing
        # the rules per decision cost more than the cache saved); the tuple is kept
        # with its plan so that its id cannot be reused while cached. A list could
        # change under its plan: not cached.
        if type(rules) is tuple:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[id(rules)] = (rules, plan)
        return plan
