"""Quota counters: long-period allowances (per UTC day or month) checked and consumed together.

A :class:`QuotaCounter` names what is counted (``name``), for whom (``subject``,
a tenant or a user id), how much is allowed (``limit``) and over which period
(``"day"``, ``"month"`` or a number of seconds). :meth:`Quotas.consume` takes
``cost`` units from several counters at once, all or nothing, in one Redis round
trip (``quota.lua``); a refused call consumes nothing.

Periods are calendar periods in UTC: a day quota renews at 00:00 UTC, a month
quota on the 1st at 00:00 UTC; a period of N seconds renews at every multiple of
N seconds since the Unix epoch (3600: on the hour). On Redis, the period is
computed from Redis ``TIME`` inside the script, so instances whose clocks
disagree still count into the same period.

Keys: ``{prefix}quota:{<subject>}:<name>:<period>``, one hash per counter (the
period's index and the units used), expiring a second after its period ends.
The subject is the hash tag, so all counters of a call, which must share their
subject, live in one Redis Cluster slot and one atomic script.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from bastion.ratelimit._errors import LimitsUnavailable, QuotaExceeded
from bastion.ratelimit._scripts import LuaScript, ScriptRunner
from bastion.ratelimit._store import StoreUnavailable
from bastion.resilience import Degradation

__all__ = ["QuotaCounter", "QuotaPeriod", "QuotaUsage", "QuotaVerdict", "Quotas"]

QuotaPeriod = Literal["day", "month"] | float
"""A UTC calendar ``"day"`` or ``"month"``, or a fixed number of seconds."""

Operation = Literal["consume", "usage", "refund", "reset"]

DEFAULT_KEY_PREFIX: Final = "bastion:"
DEFAULT_TIMEOUT: Final = 0.05
_DAY: Final = 86_400
_EPOCH_ORDINAL: Final = dt.date(1970, 1, 1).toordinal()
_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_SUBJECT: Final = 256
# Memory only: expired counters are dropped by a sweep every this many writes.
_SWEEP_EVERY: Final = 1024


@dataclass(frozen=True, slots=True)
class QuotaCounter:
    """One allowance: ``limit`` units of ``name`` per ``period`` for ``subject``.

    Args:
        name: what is counted, such as ``api_calls`` or ``documents.uploaded``
            (letters, digits, ``_``, ``.``, ``-``; at most 64). It names the quota
            in a ``QUOTA_EXCEEDED`` answer, so it must not hold personal data.
        subject: whom it is counted for, such as a tenant id (at most 256
            characters). Every counter of one call must have the same subject.
        limit: units allowed per period; 0 allows none. It is read at every call,
            so a changed plan applies at once to the current period's count.
        period: ``"day"`` or ``"month"`` (UTC calendar), or seconds (a number or a
            ``timedelta``) for fixed windows aligned on the Unix epoch.

    Raises:
        ValueError: a field is out of range.

    Example:
        >>> QuotaCounter("api_calls", tenant_id, limit=100_000, period="month")
    """

    name: str
    subject: str
    limit: int
    period: QuotaPeriod | dt.timedelta = "day"
    key: str = field(init=False, repr=False, compare=False)
    """The counter's identity within its subject (``name:period``), as stored."""
    window: QuotaPeriod = field(init=False, repr=False, compare=False)
    """``period`` as ``"day"``, ``"month"`` or float seconds."""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"quota name {self.name!r} must be 1 to 64 letters, digits, '_', '.' or '-'"
            )
        if not self.subject or len(self.subject) > _MAX_SUBJECT:
            raise ValueError(f"a quota subject must be 1 to {_MAX_SUBJECT} characters")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise ValueError(f"the limit of quota {self.name!r} must be an integer >= 0")
        period: Any = self.period
        if isinstance(period, dt.timedelta):
            period = period.total_seconds()
        if period in ("day", "month"):
            token = str(period)
        elif isinstance(period, int | float) and not isinstance(period, bool):
            period = float(period)
            if not math.isfinite(period) or period <= 0:
                raise ValueError(f"the period of quota {self.name!r} must be > 0 seconds")
            token = f"{period:.17g}s"
        else:
            raise ValueError(f"the period of quota {self.name!r} must be 'day', 'month' or seconds")
        object.__setattr__(self, "period", period)
        object.__setattr__(self, "window", period)
        object.__setattr__(self, "key", f"{self.name}:{token}")


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """One counter's state after a call.

    Attributes:
        counter: the counter.
        used: units used in the current period.
        remaining: units still available in it (``limit - used``, at least 0).
        resets_at: when the current period ends, in epoch seconds (UTC).
        resets_after: seconds from the store's now until then.
    """

    counter: QuotaCounter
    used: int
    remaining: int
    resets_at: float
    resets_after: float

    @property
    def resets(self) -> dt.datetime:
        """``resets_at`` as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.resets_at, dt.UTC)


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    """The answer to :meth:`Quotas.consume`.

    Attributes:
        allowed: whether ``cost`` was taken from every counter.
        usages: each counter's state after the call, in the order given (empty when
            the store was unreachable and the quotas fail open).
        exhausted: when refused, the name of the first counter without room.
        retry_after: when refused, seconds until every counter without room renews
            (a cost larger than a counter's limit never fits; it is refused the
            same way); 0 when allowed.
        cost: the units asked for.
        degraded: the store was unreachable and the call was allowed uncounted.
    """

    allowed: bool
    usages: tuple[QuotaUsage, ...]
    cost: int = 1
    exhausted: str | None = None
    retry_after: float = 0.0
    degraded: bool = False

    def __getitem__(self, name: str) -> QuotaUsage:
        """The usage of the counter called ``name`` (the first, if several share it)."""
        for usage in self.usages:
            if usage.counter.name == name:
                return usage
        raise KeyError(name)

    def raise_for_quota(self) -> None:
        """Raise :class:`QuotaExceeded` if the call was refused.

        Raises:
            QuotaExceeded: 429 ``QUOTA_EXCEEDED`` with ``Retry-After`` set to the
                seconds until the refusing period ends and the quota's name in the
                problem body's ``quota`` member.
        """
        if not self.allowed:
            raise QuotaExceeded(self.retry_after, quota=self.exhausted)


@dataclass(frozen=True, slots=True)
class _Reply:
    """What a backend answers: the store's now, the first refusing counter, used and ends."""

    allowed: bool
    now: float
    first: int  # 0-based; -1 for none
    used: tuple[int, ...]
    ends: tuple[float, ...]


class _QuotaBackend(Protocol):
    async def call(
        self,
        op: Operation,
        counters: Sequence[QuotaCounter],
        cost: int,
        consumed_in: Sequence[float | None] | None = None,
    ) -> _Reply: ...

    async def close(self) -> None: ...


def period_window(period: QuotaPeriod, now: float) -> tuple[int, float]:
    """Return the index of the period holding ``now`` (epoch seconds) and when it ends.

    ``quota.lua`` computes the same from Redis time; the two must agree to the second.
    """
    if period == "day":
        index = math.floor(now / _DAY)
        return index, float((index + 1) * _DAY)
    if period == "month":
        # From the day number, as the script does: exact, with no rounding of
        # microseconds that could carry an instant across midnight.
        day = dt.date.fromordinal(math.floor(now / _DAY) + _EPOCH_ORDINAL)
        index = day.year * 12 + day.month - 1
        year, month = divmod(index + 1, 12)
        end = dt.date(year, month + 1, 1).toordinal() - _EPOCH_ORDINAL
        return index, float(end * _DAY)
    seconds = float(period)
    index = math.floor(now / seconds)
    return index, (index + 1) * seconds


class _MemoryQuotas:
    """Counters in this process's memory; a call never awaits, so it is atomic on the loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # (subject, counter key) -> [period index, used, period end]
        self._counters: dict[tuple[str, str], list[Any]] = {}
        self._writes = 0

    async def call(
        self,
        op: Operation,
        counters: Sequence[QuotaCounter],
        cost: int,
        consumed_in: Sequence[float | None] | None = None,
    ) -> _Reply:
        return self.call_now(op, counters, cost, self._clock(), consumed_in)

    def call_now(
        self,
        op: Operation,
        counters: Sequence[QuotaCounter],
        cost: int,
        now: float,
        consumed_in: Sequence[float | None] | None = None,
    ) -> _Reply:
        windows = [period_window(counter.window, now) for counter in counters]
        keys = [(counter.subject, counter.key) for counter in counters]
        if op == "reset":
            for key in keys:
                self._counters.pop(key, None)
            return _Reply(True, now, -1, (0,) * len(keys), tuple(end for _, end in windows))
        used: list[int] = []
        first = -1
        for position, (key, (index, _)) in enumerate(zip(keys, windows, strict=True)):
            state = self._counters.get(key)
            units = state[1] if state is not None and state[0] == index else 0
            used.append(units)
            if op == "consume" and first < 0 and units + cost > counters[position].limit:
                first = position
        if op == "consume" and first < 0:
            for position, (key, (index, end)) in enumerate(zip(keys, windows, strict=True)):
                used[position] += cost
                self._counters[key] = [index, used[position], end]
            self._wrote(now)
        elif op == "refund":
            for position, key in enumerate(keys):
                taken_in = None if consumed_in is None else consumed_in[position]
                if used[position] > 0 and taken_in in (None, windows[position][1]):
                    used[position] = max(0, used[position] - cost)
                    self._counters[key][1] = used[position]
        return _Reply(first < 0, now, first, tuple(used), tuple(end for _, end in windows))

    def _wrote(self, now: float) -> None:
        # Amortised: one pass over the table every _SWEEP_EVERY consumptions drops
        # the counters whose period has ended, so memory follows the live subjects.
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            stale = [key for key, state in self._counters.items() if state[2] <= now]
            for key in stale:
                del self._counters[key]

    def __len__(self) -> int:
        return len(self._counters)

    async def close(self) -> None:
        self._counters.clear()


class _RedisQuotas:
    """Counters in Redis: one ``quota.lua`` call per operation."""

    _SCRIPT: Final = LuaScript("quota.lua")

    def __init__(
        self,
        runner: ScriptRunner,
        *,
        key_prefix: str,
        owns_runner: bool,
        clock: Callable[[], float] | None,
    ) -> None:
        self._runner = runner
        self._prefix = f"{key_prefix}quota:"
        self._owns_runner = owns_runner
        self._clock = clock

    def key(self, counter: QuotaCounter) -> str:
        return f"{self._prefix}{{{_tag(counter.subject)}}}:{counter.key}"

    async def call(
        self,
        op: Operation,
        counters: Sequence[QuotaCounter],
        cost: int,
        consumed_in: Sequence[float | None] | None = None,
    ) -> _Reply:
        # Redis TIME unless a test drives the clock.
        now = "" if self._clock is None else repr(float(self._clock()))
        args: list[str | int] = [op, now, cost]
        for position, counter in enumerate(counters):
            window = counter.window
            end = None if consumed_in is None else consumed_in[position]
            args.append(window if isinstance(window, str) else repr(window))
            args.append(counter.limit)
            args.append("" if end is None else repr(end))
        reply = await self._runner.run(
            self._SCRIPT, [self.key(counter) for counter in counters], args
        )
        values = reply[3:]
        return _Reply(
            allowed=int(reply[0]) == 1,
            now=float(reply[1]),
            first=int(reply[2]) - 1,
            used=tuple(int(value) for value in values[0::2]),
            ends=tuple(float(value) for value in values[1::2]),
        )

    async def close(self) -> None:
        if self._owns_runner:
            await self._runner.close()


def _tag(subject: str) -> str:
    # A brace would end (or start) the hash tag early and let two subjects share a
    # key; '%' is escaped first so the encoding stays one-to-one.
    return subject.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


class Quotas:
    """Checks and consumes quota counters, in this process or in Redis.

    Build one with :meth:`for_store` (or :meth:`memory`); the service's runtime
    holds one built on the rate limiter's store.

    Args:
        backend: where counts live (use :meth:`for_store`).
        fail_open: when Redis is unreachable, :meth:`consume` allows uncounted
            (``degraded=True``, logged once per outage) and :meth:`refund` does
            nothing; ``False`` raises :class:`LimitsUnavailable` (503) instead.
            :meth:`usage` and :meth:`reset` always raise it: they have no safe
            answer to make up.

    Example:
        >>> quotas = Quotas.for_store(redis_client, key_prefix="bastion:")
        >>> verdict = await quotas.consume(
        ...     [QuotaCounter("uploads", tenant, 100, "day"),
        ...      QuotaCounter("uploads", tenant, 2000, "month")])
        >>> verdict.raise_for_quota()
    """

    def __init__(self, backend: _QuotaBackend, *, fail_open: bool = True) -> None:
        self._backend = backend
        self._fail_open = fail_open
        self._degradation = Degradation("redis", feature="quotas")

    @classmethod
    def for_store(
        cls,
        redis: Any | None,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        fail_open: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> Quotas:
        """Build quotas on Redis, or in memory when ``redis`` is ``None``.

        Args:
            redis: a ``redis.asyncio.Redis`` client, a :class:`ScriptRunner` to share
                (its pipelining batches quota calls with limit decisions), or ``None``
                for this process's memory.
            key_prefix: prefix of every key (``redis.key_prefix``).
            timeout: seconds one round trip may take (``ratelimit.timeout``).
            fail_open: see :class:`Quotas`.
            clock: epoch seconds. In memory, ``None`` is ``time.time``. On Redis,
                ``None`` (production) uses Redis ``TIME``; a clock is sent as the
                scripts' explicit now, which only tests should do.
        """
        if redis is None:
            return cls.memory(clock=clock or time.time, fail_open=fail_open)
        if isinstance(redis, ScriptRunner):
            runner, owns = redis, False
        else:
            runner, owns = ScriptRunner(redis, timeout=timeout), True
        backend = _RedisQuotas(runner, key_prefix=key_prefix, owns_runner=owns, clock=clock)
        return cls(backend, fail_open=fail_open)

    @classmethod
    def memory(cls, *, clock: Callable[[], float] = time.time, fail_open: bool = True) -> Quotas:
        """Build quotas counted in this process's memory (one process only)."""
        return cls(_MemoryQuotas(clock), fail_open=fail_open)

    async def consume(
        self, counters: QuotaCounter | Sequence[QuotaCounter], cost: int = 1
    ) -> QuotaVerdict:
        """Take ``cost`` units from every counter if every one has room; else take none.

        Args:
            counters: one counter, or several of one subject.
            cost: units to take, at least 1.

        Returns:
            The verdict; :meth:`QuotaVerdict.raise_for_quota` turns a refusal into 429.

        Raises:
            ValueError: no counter, counters of different subjects, the same counter
                twice, or a cost below 1.
            LimitsUnavailable: the store is unreachable and the quotas fail closed.
        """
        group = _group(counters)
        _check_cost(cost)
        try:
            reply = await self._backend.call("consume", group, cost)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return QuotaVerdict(allowed=True, usages=(), cost=cost, degraded=True)
        self._degradation.recovered()
        usages = _usages(group, reply)
        if reply.allowed:
            return QuotaVerdict(allowed=True, usages=usages, cost=cost)
        refusing = [usage for usage in usages if usage.used + cost > usage.counter.limit]
        return QuotaVerdict(
            allowed=False,
            usages=usages,
            cost=cost,
            exhausted=group[reply.first].name,
            retry_after=max(usage.resets_after for usage in refusing),
        )

    async def usage(
        self, counters: QuotaCounter | Sequence[QuotaCounter]
    ) -> tuple[QuotaUsage, ...]:
        """Read the counters' current periods without consuming anything.

        Raises:
            LimitsUnavailable: the store is unreachable.
        """
        group = _group(counters)
        return _usages(group, await self._required("usage", group))

    async def refund(
        self,
        consumed: QuotaVerdict | QuotaCounter | Sequence[QuotaCounter],
        cost: int | None = None,
    ) -> tuple[QuotaUsage, ...]:
        """Give units back, never below 0: for work that failed after it was admitted.

        Pass the verdict :meth:`consume` returned: its units go back to the periods
        they were taken from, and a counter whose period has renewed since is left
        alone (yesterday's failed upload does not credit today). Counters instead
        refund their current periods.

        Args:
            consumed: the admitted verdict, or counters of one subject.
            cost: units to give back; for a verdict, at most (and by default) its
                cost; for counters, 1 by default.

        Returns:
            The counters' states after the refund; empty when there was nothing to
            refund (a refused or uncounted verdict) or the store was unreachable and
            the quotas fail open (the refund is lost).

        Raises:
            ValueError: a cost below 1, or above the verdict's.
            LimitsUnavailable: the store is unreachable and the quotas fail closed.
        """
        consumed_in: tuple[float | None, ...] | None = None
        if isinstance(consumed, QuotaVerdict):
            if not consumed.allowed or not consumed.usages:
                return ()
            cost = consumed.cost if cost is None else cost
            if cost > consumed.cost:
                raise ValueError(
                    f"cannot refund {cost} units of a verdict that took {consumed.cost}"
                )
            group = tuple(usage.counter for usage in consumed.usages)
            consumed_in = tuple(usage.resets_at for usage in consumed.usages)
        else:
            group = _group(consumed)
            cost = 1 if cost is None else cost
        _check_cost(cost)
        try:
            reply = await self._backend.call("refund", group, cost, consumed_in)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return ()
        self._degradation.recovered()
        return _usages(group, reply)

    async def reset(self, counters: QuotaCounter | Sequence[QuotaCounter]) -> None:
        """Forget what the counters have used in every period (an operator's correction).

        Raises:
            LimitsUnavailable: the store is unreachable.
        """
        await self._required("reset", _group(counters))

    async def close(self) -> None:
        """Release what the quotas hold: a runner they made, memory counts."""
        self._degradation.forget()
        await self._backend.close()

    async def _required(self, op: Operation, group: Sequence[QuotaCounter]) -> _Reply:
        try:
            reply = await self._backend.call(op, group, 1)
        except StoreUnavailable as exc:
            self._degradation.failed(exc)
            raise LimitsUnavailable from exc
        self._degradation.recovered()
        return reply

    def _unavailable(self, exc: StoreUnavailable) -> None:
        self._degradation.failed(exc)
        if not self._fail_open:
            raise LimitsUnavailable from exc


def _group(counters: QuotaCounter | Sequence[QuotaCounter]) -> tuple[QuotaCounter, ...]:
    group = (counters,) if isinstance(counters, QuotaCounter) else tuple(counters)
    if not group:
        raise ValueError("no quota counter given")
    subject = group[0].subject
    if any(counter.subject != subject for counter in group):
        # The subject is the hash tag: counters of one call must share a Redis
        # Cluster slot to be consumed atomically in one script. Refused on every
        # store, so code written against memory does not fail later on a cluster.
        raise ValueError("the counters of one call must share their subject")
    if len({counter.key for counter in group}) != len(group):
        raise ValueError("the same quota counter is given twice")
    return group


def _check_cost(cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ValueError(f"a quota cost must be an integer >= 1, not {cost!r}")


def _usages(group: Sequence[QuotaCounter], reply: _Reply) -> tuple[QuotaUsage, ...]:
    return tuple(
        QuotaUsage(
            counter=counter,
            used=used,
            remaining=max(0, counter.limit - used),
            resets_at=end,
            resets_after=max(0.0, end - reply.now),
        )
        for counter, used, end in zip(group, reply.used, reply.ends, strict=True)
    )
