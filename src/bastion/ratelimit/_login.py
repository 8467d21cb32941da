"""Login throttling: failed attempts per client IP, and lockout of the submitted account identifier.

Two independent counts, both in the shared store so every instance agrees:

- **Per IP**, an exact sliding log of failed attempts (``ratelimit.login.ip_limit``,
  default 5 per 15 minutes). Once an IP has used them, :meth:`LoginThrottle.check`
  raises :class:`RateLimited` (429 ``RATE_LIMITED`` with the rate-limit headers)
  until the oldest failure of the window ages out. Successes do not forgive
  failures: a password sprayer who owns one account would reset its allowance.
  IPv6 clients are counted per /64, as by the limiter.
- **Per identifier**, consecutive failures. The ``lockout_threshold``-th locks the
  identifier for ``lockout_duration * lockout_growth ** repetition`` (at most
  ``lockout_max``); ``repetition`` counts the lockouts since the identifier was
  last clean for ``lockout_memory`` after a lockout ended. While it is locked,
  :meth:`LoginThrottle.check` raises :class:`AccountLocked` (429 ``ACCOUNT_LOCKED``
  with ``Retry-After``), and failures that still arrive are not counted, so
  failures racing past ``check`` on several instances lock exactly once. A
  success clears the consecutive failures.

The identifier is normalised (stripped, case-folded) and only its SHA-256 is
stored, logged or put in events, and the same counts apply whether or not an
account exists: answers reveal nothing about which accounts do.

On Redis every call is one script per subject (``login.lua``); the IP's key and
the identifier's key each carry their own hash tag, and a call that needs both
sends the two scripts together. Neither needs the other atomically.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import inspect
import ipaddress
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from bastion.errors import ConfigurationError
from bastion.observability.metrics import AUTH_LOCKOUTS, RATELIMIT_DECISIONS
from bastion.ratelimit._errors import AccountLocked, LimitsUnavailable, RateLimited
from bastion.ratelimit._expression import Limit, parse_limits
from bastion.ratelimit._headers import HeaderRenderer
from bastion.ratelimit._scripts import LuaScript, ScriptRunner
from bastion.ratelimit._store import StoreUnavailable, Verdict
from bastion.resilience import Degradation
from bastion.settings import LoginThrottleSettings

__all__ = [
    "LockoutEvent",
    "LockoutListener",
    "LoginState",
    "LoginThrottle",
    "identifier_hash",
    "normalise_identifier",
]

logger = structlog.get_logger("bastion.ratelimit")

DEFAULT_KEY_PREFIX: Final = "bastion:"
DEFAULT_TIMEOUT: Final = 0.05
DEFAULT_MAX_LOG_LIMIT: Final = 1000
POLICY: Final = "login"
"""The policy name of the IP throttle in the ``RateLimit`` headers and the decisions metric."""
# Memory only: expired entries are dropped by a sweep every this many writes.
_SWEEP_EVERY: Final = 1024


def normalise_identifier(identifier: str) -> str:
    """The form an identifier is counted under: surrounding space stripped, case-folded."""
    return identifier.strip().casefold()


def identifier_hash(identifier: str) -> str:
    """The SHA-256 (hex) of the normalised identifier: what keys, logs and events hold."""
    return hashlib.sha256(normalise_identifier(identifier).encode()).hexdigest()


def client_network(ip: str) -> str:
    """What an IP is counted under: the address, an IPv6 client's /64, or a digest.

    IPv4-mapped IPv6 addresses count as their IPv4 address. A value that is not an
    address (a test client's name, a Unix socket) is counted under its SHA-256, so
    no stray character reaches a key.
    """
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return "h" + hashlib.sha256(ip.encode()).hexdigest()[:32]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class LockoutEvent:
    """An identifier was locked after repeated failures.

    Delivered to every listener registered with :meth:`LoginThrottle.on_lockout`:
    the audit trail records it, the identity component notifies the account owner.

    Attributes:
        identifier_hash: SHA-256 (hex) of the normalised identifier; never the identifier.
        ip: the client address of the failure that locked it, as given.
        until: when the lockout ends (aware, UTC).
        duration: the lockout's length in seconds.
        repetition: 0 for a first lockout, 1 for the next one within ``lockout_memory``...
    """

    identifier_hash: str
    ip: str | None
    until: dt.datetime
    duration: float
    repetition: int


LockoutListener = Callable[[LockoutEvent], Awaitable[None] | None]
"""A function (or coroutine function) called with each :class:`LockoutEvent`."""


@dataclass(frozen=True, slots=True)
class LoginState:
    """What :meth:`LoginThrottle.record_failure` counted.

    Attributes:
        failures: the identifier's consecutive failures now (0 right after a lockout).
        failures_left: failures it may still have before it locks (0 when locked).
        locked: whether the identifier is locked now.
        retry_after: seconds until it unlocks; 0 when not locked.
        lockout: the event, when this failure locked the identifier.
        ip_remaining: failures the IP may still make before it is throttled
            (``None`` when no IP was given).
        degraded: the shared store was unreachable; the counts are this process's own.
    """

    failures: int
    failures_left: int
    locked: bool
    retry_after: float
    lockout: LockoutEvent | None = None
    ip_remaining: int | None = None
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class _IpCount:
    """One IP limit's state: failures in its window, wait before another, wait until empty."""

    count: int
    retry_after: float
    reset_after: float


@dataclass(frozen=True, slots=True)
class _Failure:
    """The identifier's answer to a failure (``login.lua``'s ``id_fail``)."""

    status: int  # 0 counted, 1 locked by this failure, 2 already locked
    now: float
    failures: int
    locked_for: float
    repetition: int
    until: float


@dataclass(frozen=True, slots=True)
class _Params:
    """The settings as the backends use them."""

    limits: tuple[Limit, ...]
    most: int  # the largest N of the IP limits: the log's length
    longest: float  # the longest window of the IP limits: the log's lifetime
    threshold: int
    duration: float
    growth: float
    longest_lockout: float
    memory: float

    @classmethod
    def of(cls, settings: LoginThrottleSettings) -> _Params:
        limits = parse_limits(settings.ip_limit)
        return cls(
            limits=limits,
            most=max(limit.burst for limit in limits),
            longest=max(limit.window for limit in limits),
            threshold=settings.lockout_threshold,
            duration=settings.lockout_duration,
            growth=settings.lockout_growth,
            longest_lockout=settings.lockout_max,
            memory=settings.lockout_memory,
        )

    def lockout_length(self, repetition: int) -> float:
        try:
            length = self.duration * self.growth**repetition
        except OverflowError:  # as the script's inf: the cap applies
            length = float("inf")
        return min(self.longest_lockout, length)


class _LoginBackend(Protocol):
    async def check(
        self, identifier: str | None, ip: str | None
    ) -> tuple[float, tuple[_IpCount, ...]]: ...

    async def fail(
        self, identifier: str | None, ip: str | None
    ) -> tuple[_Failure | None, tuple[_IpCount, ...]]: ...

    async def success(self, identifier: str) -> None: ...

    async def unlock(self, identifier: str) -> bool: ...

    async def close(self) -> None: ...


class _MemoryLogin:
    """Counts in this process's memory, with the same semantics as ``login.lua``.

    Nothing awaits inside a call, so each is atomic on the event loop. Entries carry
    the expiry the script gives their key (the times decide what is forgotten; the
    expiry only removes it); a sweep every ``_SWEEP_EVERY`` writes drops the expired
    ones, so memory follows the identifiers and IPs seen recently.
    """

    def __init__(self, params: _Params, clock: Callable[[], float]) -> None:
        self._params = params
        self._clock = clock
        # identifier hash -> [failures, locked until, repetition, expires at, last failure]
        self._ids: dict[str, list[float]] = {}
        # client network -> (failure times, newest first; expires at)
        self._ips: dict[str, tuple[deque[float], float]] = {}
        self._writes = 0

    def _identifier(self, key: str, now: float) -> list[float] | None:
        state = self._ids.get(key)
        if state is not None and state[3] <= now:
            del self._ids[key]
            return None
        return state

    def _times(self, key: str, now: float) -> deque[float]:
        entry = self._ips.get(key)
        if entry is None or entry[1] <= now:
            return deque()
        return entry[0]

    def _ip_counts(self, times: deque[float], now: float) -> tuple[_IpCount, ...]:
        newest = sorted(times, reverse=True)
        counts = []
        for limit in self._params.limits:
            window, most = limit.window, limit.burst
            count = sum(1 for t in newest if t > now - window)
            reset = newest[0] + window - now if count else 0.0
            retry = newest[most - 1] + window - now if count >= most else 0.0
            counts.append(_IpCount(count, retry, reset))
        return tuple(counts)

    async def check(
        self, identifier: str | None, ip: str | None
    ) -> tuple[float, tuple[_IpCount, ...]]:
        now = self._clock()
        locked_for = 0.0
        if identifier is not None:
            state = self._identifier(identifier, now)
            if state is not None:
                locked_for = max(0.0, state[1] - now)
        counts = () if ip is None else self._ip_counts(self._times(ip, now), now)
        return locked_for, counts

    async def fail(
        self, identifier: str | None, ip: str | None
    ) -> tuple[_Failure | None, tuple[_IpCount, ...]]:
        now = self._clock()
        self._sweep(now)
        counts: tuple[_IpCount, ...] = ()
        if ip is not None:
            times = self._times(ip, now)
            times.appendleft(now)
            while len(times) > self._params.most:
                times.pop()
            self._ips[ip] = (times, now + self._params.longest)
            counts = self._ip_counts(times, now)
        failure = None if identifier is None else self._fail_identifier(identifier, now)
        return failure, counts

    def _fail_identifier(self, key: str, now: float) -> _Failure:
        params = self._params
        state = self._identifier(key, now)
        failures, until, repetition, last = (
            (0, 0.0, -1, 0.0)
            if state is None
            else (int(state[0]), state[1], int(state[2]), state[4])
        )
        if until > now:
            return _Failure(2, now, failures, until - now, repetition, until)
        if repetition >= 0 and now - until > params.memory:
            repetition = -1
        if now - last > params.memory:
            failures = 0
        failures += 1
        if failures >= params.threshold:
            repetition += 1
            length = params.lockout_length(repetition)
            until = now + length
            self._ids[key] = [0, until, repetition, now + length + params.memory + 1, now]
            return _Failure(1, now, 0, length, repetition, until)
        keep = params.memory
        if repetition >= 0:
            keep = max(keep, until + params.memory - now)
        self._ids[key] = [failures, until, repetition, now + keep + 1, now]
        return _Failure(0, now, failures, 0.0, repetition, until)

    async def success(self, identifier: str) -> None:
        state = self._identifier(identifier, self._clock())
        if state is not None:
            state[0] = 0
            if state[2] < 0:  # nothing else to remember
                del self._ids[identifier]

    async def unlock(self, identifier: str) -> bool:
        now = self._clock()
        state = self._identifier(identifier, now)
        self._ids.pop(identifier, None)
        return state is not None and state[1] > now

    def _sweep(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY:
            return
        for key in [key for key, state in self._ids.items() if state[3] <= now]:
            del self._ids[key]
        for key in [key for key, (_, expires) in self._ips.items() if expires <= now]:
            del self._ips[key]

    def __len__(self) -> int:
        return len(self._ids) + len(self._ips)

    async def close(self) -> None:
        self._ids.clear()
        self._ips.clear()


class _RedisLogin:
    """Counts in Redis: one ``login.lua`` call per subject, sent together."""

    _SCRIPT: Final = LuaScript("login.lua")

    def __init__(
        self,
        params: _Params,
        runner: ScriptRunner,
        *,
        key_prefix: str,
        owns_runner: bool,
        clock: Callable[[], float] | None,
    ) -> None:
        self._params = params
        self._runner = runner
        self._owns_runner = owns_runner
        self._clock = clock
        self._id_prefix = f"{key_prefix}login:id:"
        self._ip_prefix = f"{key_prefix}login:ip:"
        self._ip_args: list[str | int] = [params.most, repr(params.longest)]
        for limit in params.limits:
            self._ip_args += [repr(limit.window), limit.burst]
        self._fail_args: list[str | int] = [
            params.threshold,
            repr(params.duration),
            repr(params.growth),
            repr(params.longest_lockout),
            repr(params.memory),
        ]

    def id_key(self, identifier: str) -> str:
        return f"{self._id_prefix}{{{identifier}}}"

    def ip_key(self, ip: str) -> str:
        return f"{self._ip_prefix}{{{ip}}}"

    def _now(self) -> str:
        # Redis TIME unless a test drives the clock.
        return "" if self._clock is None else repr(float(self._clock()))

    async def _run(self, key: str, args: Sequence[str | int]) -> Any:
        return await self._runner.run(self._SCRIPT, [key], args)

    async def _ip(self, op: str, ip: str | None) -> tuple[_IpCount, ...]:
        if ip is None:
            return ()
        reply = await self._run(self.ip_key(ip), [op, self._now(), *self._ip_args])
        values = reply[1:]
        return tuple(
            _IpCount(int(values[i]), float(values[i + 1]), float(values[i + 2]))
            for i in range(0, len(values), 3)
        )

    async def _locked_for(self, identifier: str | None) -> float:
        if identifier is None:
            return 0.0
        reply = await self._run(self.id_key(identifier), ["id_check", self._now()])
        return float(reply[1])

    async def _fail_identifier(self, identifier: str | None) -> _Failure | None:
        if identifier is None:
            return None
        reply = await self._run(self.id_key(identifier), ["id_fail", self._now(), *self._fail_args])
        return _Failure(
            status=int(reply[0]),
            now=float(reply[1]),
            failures=int(reply[2]),
            locked_for=float(reply[3]),
            repetition=int(reply[4]),
            until=float(reply[5]),
        )

    async def check(
        self, identifier: str | None, ip: str | None
    ) -> tuple[float, tuple[_IpCount, ...]]:
        # Sent together: the runner pipelines concurrent calls into one round trip.
        locked_for, counts = await asyncio.gather(
            self._locked_for(identifier), self._ip("ip_check", ip)
        )
        return locked_for, counts

    async def fail(
        self, identifier: str | None, ip: str | None
    ) -> tuple[_Failure | None, tuple[_IpCount, ...]]:
        failure, counts = await asyncio.gather(
            self._fail_identifier(identifier), self._ip("ip_fail", ip)
        )
        return failure, counts

    async def success(self, identifier: str) -> None:
        await self._run(self.id_key(identifier), ["id_success", self._now()])

    async def unlock(self, identifier: str) -> bool:
        return int(await self._run(self.id_key(identifier), ["unlock", self._now()])) == 1

    async def close(self) -> None:
        if self._owns_runner:
            await self._runner.close()


class LoginThrottle:
    """Throttles failed logins per IP and locks identifiers after consecutive failures.

    The login route calls :meth:`check` before verifying credentials, then
    :meth:`record_failure` or :meth:`record_success`. Build one with
    :meth:`for_store`; the service's runtime holds one on the limiter's store.

    Args:
        settings: ``ratelimit.login``; the defaults when ``None``.
        backend: where counts live (use :meth:`for_store`); this process's memory
            when ``None``.
        fail_open: when the shared store is unreachable, count in this process's
            memory meanwhile (each instance then throttles on its own; logged once
            per outage); ``False`` raises :class:`LimitsUnavailable` (503) instead.
        max_log_limit: largest N an IP limit may have (``ratelimit.max_log_limit``).
        clock: the memory counts' clock, epoch seconds (``time.time`` when ``None``).

    Raises:
        ConfigurationError: an IP limit is larger than ``max_log_limit``.

    Example:
        >>> throttle = LoginThrottle.for_store(redis_client, key_prefix="bastion:")
        >>> await throttle.check(email, client_ip)      # 429 when throttled or locked
        >>> if not verify(email, password):
        ...     await throttle.record_failure(email, client_ip)
        ... else:
        ...     await throttle.record_success(email, client_ip)
    """

    def __init__(
        self,
        settings: LoginThrottleSettings | None = None,
        *,
        backend: _LoginBackend | None = None,
        fail_open: bool = True,
        max_log_limit: int = DEFAULT_MAX_LOG_LIMIT,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings or LoginThrottleSettings()
        self._params = _Params.of(self.settings)
        too_large = [limit for limit in self._params.limits if limit.burst > max_log_limit]
        if too_large:
            raise ConfigurationError(
                f"ratelimit.login.ip_limit {too_large[0].text!r} counts more than "
                f"ratelimit.max_log_limit={max_log_limit} failures: the exact log's cost "
                "grows with its limit; lower the limit or raise max_log_limit"
            )
        clock = clock or time.time
        self._backend: _LoginBackend = backend or _MemoryLogin(self._params, clock)
        # Used only while a shared store is unreachable and the throttle fails open.
        self._fallback = _MemoryLogin(self._params, clock)
        self._fail_open = fail_open
        self._lockouts = self._params.duration > 0
        self._listeners: list[LockoutListener] = []
        self._degradation = Degradation("redis", feature="login throttling")
        self._headers = HeaderRenderer(POLICY, self._params.limits)
        self._allowed = RATELIMIT_DECISIONS.labels(POLICY, "allowed")
        self._rejected = RATELIMIT_DECISIONS.labels(POLICY, "rejected")
        self._failed_open = RATELIMIT_DECISIONS.labels(POLICY, "failed_open")

    @classmethod
    def for_store(
        cls,
        redis: Any | None,
        settings: LoginThrottleSettings | None = None,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        fail_open: bool = True,
        max_log_limit: int = DEFAULT_MAX_LOG_LIMIT,
        clock: Callable[[], float] | None = None,
    ) -> LoginThrottle:
        """Build a throttle on Redis, or in memory when ``redis`` is ``None``.

        Args:
            redis: a ``redis.asyncio.Redis`` client, a :class:`ScriptRunner` to
                share, or ``None`` for this process's memory.
            settings: ``ratelimit.login``.
            key_prefix: prefix of every key (``redis.key_prefix``).
            timeout: seconds one round trip may take (``ratelimit.timeout``).
            fail_open: see :class:`LoginThrottle`.
            max_log_limit: ``ratelimit.max_log_limit``.
            clock: epoch seconds. On Redis, ``None`` (production) uses Redis
                ``TIME``; a clock is sent as the script's explicit now, which only
                tests should do.
        """
        settings = settings or LoginThrottleSettings()
        backend: _LoginBackend | None = None
        if redis is not None:
            if isinstance(redis, ScriptRunner):
                runner, owns = redis, False
            else:
                runner, owns = ScriptRunner(redis, timeout=timeout), True
            backend = _RedisLogin(
                _Params.of(settings), runner, key_prefix=key_prefix, owns_runner=owns, clock=clock
            )
        return cls(
            settings, backend=backend, fail_open=fail_open, max_log_limit=max_log_limit, clock=clock
        )

    def on_lockout(self, listener: LockoutListener) -> LockoutListener:
        """Call ``listener`` with every :class:`LockoutEvent`; usable as a decorator.

        Listeners run in the order registered, awaited before :meth:`record_failure`
        returns (keep them short: enqueue an e-mail, do not send it). One that
        raises is logged, without the event's data, and the others still run.
        """
        self._listeners.append(listener)
        return listener

    async def check(self, identifier: str, ip: str | None) -> None:
        """Refuse an attempt from a throttled IP or for a locked identifier.

        The IP is checked first, so a throttled client learns nothing about the
        identifier it submits.

        Args:
            identifier: the submitted account identifier (an e-mail, a user name),
                whether or not such an account exists.
            ip: the client address (``RequestContext.client_ip``); ``None``: no IP
                throttling.

        Raises:
            RateLimited: the IP has used its failed attempts (429 ``RATE_LIMITED``
                with ``Retry-After`` and the rate-limit headers of policy ``login``).
            AccountLocked: the identifier is locked (429 ``ACCOUNT_LOCKED``).
            LimitsUnavailable: the store is unreachable and the throttle fails closed.
        """
        key, network = self._subjects(identifier, ip)
        degraded = False
        try:
            locked_for, counts = await self._backend.check(key, network)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            degraded = True
            locked_for, counts = await self._fallback.check(key, network)
        else:
            self._degradation.recovered()
        # The decisions metric counts the IP throttle's answers; lockouts have their own.
        if any(count.retry_after > 0 for count in counts):
            self._rejected.inc()
            raise RateLimited(
                max(count.retry_after for count in counts),
                headers=self._headers.mapping(self._verdict(counts)),
            )
        (self._failed_open if degraded else self._allowed).inc()
        if locked_for > 0:
            raise AccountLocked(locked_for)

    async def record_failure(self, identifier: str, ip: str | None) -> LoginState:
        """Count a failed attempt against the IP and the identifier; lock it at the threshold.

        A failure for an identifier that is already locked counts against the IP
        only. The failure that locks the identifier delivers a
        :class:`LockoutEvent` to the listeners and counts ``bastion_auth_lockouts_total``.

        Raises:
            LimitsUnavailable: the store is unreachable and the throttle fails closed.
        """
        key, network = self._subjects(identifier, ip)
        degraded = False
        try:
            failure, counts = await self._backend.fail(key, network)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            degraded = True
            failure, counts = await self._fallback.fail(key, network)
        else:
            self._degradation.recovered()
        ip_remaining = None
        if counts:
            ip_remaining = max(
                0,
                min(
                    limit.burst - count.count
                    for limit, count in zip(self._params.limits, counts, strict=True)
                ),
            )
        if failure is None or key is None:  # lockouts are off (lockout_duration = 0)
            return LoginState(
                failures=0,
                failures_left=self._params.threshold,
                locked=False,
                retry_after=0.0,
                ip_remaining=ip_remaining,
                degraded=degraded,
            )
        event = None
        if failure.status == 1:
            event = LockoutEvent(
                identifier_hash=key,
                ip=ip,
                until=dt.datetime.fromtimestamp(failure.until, dt.UTC),
                duration=failure.locked_for,
                repetition=failure.repetition,
            )
            AUTH_LOCKOUTS.inc()
            logger.warning(
                "account identifier locked",
                identifier_hash=event.identifier_hash,
                duration=event.duration,
                repetition=event.repetition,
            )
            await self._emit(event)
        locked = failure.status != 0
        return LoginState(
            failures=failure.failures,
            failures_left=0 if locked else self._params.threshold - failure.failures,
            locked=locked,
            retry_after=failure.locked_for,
            lockout=event,
            ip_remaining=ip_remaining,
            degraded=degraded,
        )

    async def record_success(self, identifier: str, ip: str | None = None) -> None:
        """Clear the identifier's consecutive failures; the IP's failures stand.

        Args:
            identifier: the identifier that logged in.
            ip: accepted for symmetry with :meth:`record_failure`; unused, because
                forgiving an IP on success would let one owned account reset an
                attacker's allowance.

        Raises:
            LimitsUnavailable: the store is unreachable and the throttle fails closed.
        """
        if not self._lockouts:
            return
        key = identifier_hash(identifier)
        try:
            await self._backend.success(key)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            await self._fallback.success(key)
        else:
            self._degradation.recovered()

    async def unlock(self, identifier: str) -> bool:
        """Lift an identifier's lockout and forget its failures and repetitions (admin).

        Returns:
            Whether it was locked.

        Raises:
            LimitsUnavailable: the store is unreachable (an admin must know the
                unlock did not happen).
        """
        key = identifier_hash(identifier)
        locally = await self._fallback.unlock(key)
        try:
            shared = await self._backend.unlock(key)
        except StoreUnavailable as exc:
            self._degradation.failed(exc)
            raise LimitsUnavailable from exc
        self._degradation.recovered()
        return shared or locally

    async def close(self) -> None:
        """Release what the throttle holds: a runner it made, memory counts."""
        self._degradation.forget()
        await self._backend.close()
        await self._fallback.close()

    def _subjects(self, identifier: str, ip: str | None) -> tuple[str | None, str | None]:
        key = identifier_hash(identifier) if self._lockouts else None
        return key, None if ip is None else client_network(ip)

    def _unavailable(self, exc: StoreUnavailable) -> None:
        self._degradation.failed(exc)
        if not self._fail_open:
            raise LimitsUnavailable from exc

    def _verdict(self, counts: Sequence[_IpCount]) -> Verdict:
        return Verdict(
            allowed=False,
            retry_after=max(count.retry_after for count in counts),
            remaining=tuple(
                max(0, limit.burst - count.count)
                for limit, count in zip(self._params.limits, counts, strict=True)
            ),
            reset_after=tuple(count.reset_after for count in counts),
        )

    async def _emit(self, event: LockoutEvent) -> None:
        for listener in self._listeners:
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # noqa: BLE001 -- a listener must never break a login
                # Only the class, no traceback: the message may carry the address
                # being notified, and logs hold no personal data.
                logger.error(  # noqa: TRY400 -- the traceback's text is what must not be logged
                    "lockout listener failed",
                    listener=getattr(listener, "__qualname__", type(listener).__name__),
                    error=type(exc).__name__,
                )
