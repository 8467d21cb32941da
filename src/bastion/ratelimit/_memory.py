"""The memory limit store: one process, decisions that never await.

A decision is plain Python from start to end, with no ``await`` inside, so on one
event loop nothing can interleave with it: it is atomic without a lock. That is
also why it only limits one process; several workers or instances need
:class:`~bastion.ratelimit.RedisStore`.

State is kept per rule (under :func:`~bastion.ratelimit._rules.rule_id`) and per
key, in the smallest shape each algorithm needs: a float (the token bucket's
theoretical arrival time), a ``[window, current, previous]`` list (the window
counter) or a deque of timestamps (the log).

Memory stays bounded by amortised sweeps: each rule's table remembers its size
after the last sweep, and when a new key would take it to twice that (and at
least :data:`SWEEP_MINIMUM`), every expired entry of the table is dropped first.
A sweep of ``n`` entries is thus paid for by the ``n / 2`` insertions before it
(constant amortised cost), and a table holds at most twice the keys that were
live at once (plus the minimum). An entry that expired but was not swept yet is
harmless: every decision reads expired state as absent.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from bastion.ratelimit._rules import rule_id
from bastion.ratelimit._store import Rule, Verdict

EPS: Final = 1e-9
"""Tolerance wherever a comparison or a floor meets a float (as in the Redis scripts)."""

SWEEP_MINIMUM: Final = 10_000
"""Entries a rule's table may hold before its first sweep."""

_PLAN_CACHE_SIZE: Final = 4096

_INLINE_MIN_PER_TOKEN: Final = 2 * EPS

Decide = Callable[[str, float, int], Verdict]


def _bad_cost(cost: int, burst: int) -> ValueError:
    if cost < 1:
        return ValueError(f"a rate-limit cost must be at least 1, not {cost}")
    return ValueError(f"a cost of {cost} can never be admitted by a limit whose burst is {burst}")


class _TokenBucket:
    """GCRA: the theoretical arrival time (TAT) of the next unit, per key."""

    __slots__ = ("burst", "data", "per_token", "sweep_at", "tau")

    def __init__(self, rule: Rule) -> None:
        limit = rule.limit
        self.data: dict[str, float] = {}
        self.sweep_at = SWEEP_MINIMUM
        self.burst = limit.burst
        self.per_token = limit.period / limit.rate  # T: seconds one unit takes to refill
        self.tau = self.per_token * limit.burst  # how far ahead of now the TAT may run

    def sweep(self, now: float) -> int:
        data = self.data
        expired = [key for key, tat in data.items() if tat <= now]
        for key in expired:
            del data[key]
        self.sweep_at = max(SWEEP_MINIMUM, 2 * len(data))
        return len(expired)

    def _tat(self, key: str, now: float) -> float:
        tat = self.data.get(key)
        return now if tat is None or tat < now else tat

    def check(self, key: str, now: float, cost: int) -> float:
        wait = self._tat(key, now) + self.per_token * cost - now
        return 0.0 if wait <= self.tau + EPS else wait - self.tau

    def commit(self, key: str, now: float, cost: int) -> tuple[int, float]:
        data = self.data
        tat = data.get(key)
        if tat is None:
            if len(data) >= self.sweep_at:
                self.sweep(now)
            tat = now
        elif tat < now:
            tat = now
        new = tat + self.per_token * cost
        data[key] = new
        wait = new - now
        return max(0, math.floor((self.tau - wait) / self.per_token + EPS)), wait

    def state(self, key: str, now: float) -> tuple[int, float]:
        ahead = self._tat(key, now) - now
        return max(0, math.floor((self.tau - ahead) / self.per_token + EPS)), ahead

    def alone(self) -> Decide:
        """The decision for a policy of this one rule, inlined: the hot path."""
        data = self.data
        per_token = self.per_token
        tau = self.tau
        admit_within = tau + EPS
        burst = self.burst
        sweep = self.sweep
        verdict = Verdict
        bucket = self

        def decide(key: str, now: float, cost: int) -> Verdict:
            if not 0 < cost <= burst:
                raise _bad_cost(cost, burst)
            tat = data.get(key)
            if tat is None:
                if len(data) >= bucket.sweep_at:
                    sweep(now)
                tat = now
            elif tat < now:
                tat = now
            new = tat + per_token * cost
            wait = new - now
            if wait <= admit_within:
                data[key] = new
                # int() floors here: the value is above -1 (see _plan), and a value
                # in (-1, 0) is float slack that must read 0.
                return verdict(True, 0.0, (int((tau - wait) / per_token + EPS),), (wait,))
            ahead = tat - now
            return verdict(False, wait - tau, (int((tau - ahead) / per_token + EPS),), (ahead,))

        return decide


class _SlidingWindow:
    """Two-window counter: ``[window index, current count, previous count]`` per key."""

    __slots__ = ("burst", "data", "sweep_at", "width")

    def __init__(self, rule: Rule) -> None:
        self.data: dict[str, list[int]] = {}
        self.sweep_at = SWEEP_MINIMUM
        self.burst = rule.limit.burst
        self.width = rule.limit.window

    def sweep(self, now: float) -> int:
        data = self.data
        oldest_live = math.floor(now / self.width) - 1
        expired = [key for key, state in data.items() if state[0] < oldest_live]
        for key in expired:
            del data[key]
        self.sweep_at = max(SWEEP_MINIMUM, 2 * len(data))
        return len(expired)

    def _counts(self, key: str, now: float) -> tuple[int, float, int, int]:
        """The window index of ``now``, the elapsed fraction of it, current and previous counts."""
        width = self.width
        index = math.floor(now / width)
        # Clamped: ``now / width`` and ``index * width`` round separately, and a
        # fraction a hair outside [0, 1] would weigh the previous window wrongly.
        fraction = min(1.0, max(0.0, (now - index * width) / width))
        state = self.data.get(key)
        if state is None:
            return index, fraction, 0, 0
        if state[0] == index:
            return index, fraction, state[1], state[2]
        if state[0] == index - 1:
            return index, fraction, 0, state[1]
        return index, fraction, 0, 0

    def check(self, key: str, now: float, cost: int) -> float:
        index, fraction, current, previous = self._counts(key, now)
        excess = previous * (1 - fraction) + current + cost - self.burst
        if excess <= EPS:
            return 0.0
        width = self.width
        if current + cost <= self.burst:
            # The previous window's weight decays linearly to 0 by the end of this
            # window, removing ``previous / width`` per second; that is enough
            # (at the latest when the estimate is just ``current``).
            return excess * width / previous
        # Not within this window: in the next one the estimate is
        # ``current * (1 - f')``, which reaches ``burst - cost`` at
        # ``f' = (current + cost - burst) / current``.
        return (index + 1) * width - now + width * (current + cost - self.burst) / current

    def commit(self, key: str, now: float, cost: int) -> tuple[int, float]:
        index, fraction, current, previous = self._counts(key, now)
        estimate = previous * (1 - fraction) + current
        data = self.data
        state = data.get(key)
        if state is None:
            if len(data) >= self.sweep_at:
                self.sweep(now)
            data[key] = [index, current + cost, previous]
        else:
            state[0], state[1], state[2] = index, current + cost, previous
        remaining = max(0, math.floor(self.burst - estimate - cost + EPS))
        return remaining, (index + 2) * self.width - now

    def state(self, key: str, now: float) -> tuple[int, float]:
        index, fraction, current, previous = self._counts(key, now)
        estimate = previous * (1 - fraction) + current
        remaining = max(0, math.floor(self.burst - estimate + EPS))
        if current:
            return remaining, (index + 2) * self.width - now
        if previous:
            return remaining, (index + 1) * self.width - now
        return remaining, 0.0


class _SlidingLog:
    """The exact log: a deque of the admitted units' times (one entry per unit) per key."""

    __slots__ = ("burst", "data", "sweep_at", "width")

    def __init__(self, rule: Rule) -> None:
        self.data: dict[str, deque[float]] = {}
        self.sweep_at = SWEEP_MINIMUM
        self.burst = rule.limit.burst
        self.width = rule.limit.window

    def sweep(self, now: float) -> int:
        data = self.data
        cutoff = now - self.width + EPS
        expired = [key for key, times in data.items() if not times or times[-1] <= cutoff]
        for key in expired:
            del data[key]
        self.sweep_at = max(SWEEP_MINIMUM, 2 * len(data))
        return len(expired)

    def _live(self, key: str, now: float) -> deque[float] | None:
        """The key's log with the units older than one window dropped."""
        times = self.data.get(key)
        if times:
            # A unit admitted exactly one window ago is out: the window is (now - W, now].
            # EPS: ``retry_after`` is computed as ``t + W - now``, and asking at
            # ``now + retry_after`` must find ``t`` out despite the rounding.
            cutoff = now - self.width + EPS
            while times and times[0] <= cutoff:
                times.popleft()
        return times

    def check(self, key: str, now: float, cost: int) -> float:
        times = self._live(key, now)
        count = len(times) if times else 0
        if not times or count + cost <= self.burst:  # empty: cost <= burst always fits
            return 0.0
        # The (count + cost - burst)-th oldest must leave before cost more fit.
        return times[count + cost - self.burst - 1] + self.width - now

    def commit(self, key: str, now: float, cost: int) -> tuple[int, float]:
        times = self._live(key, now)
        if times is None:
            data = self.data
            if len(data) >= self.sweep_at:
                self.sweep(now)
            times = data[key] = deque()
        times.extend([now] * cost)
        return self.burst - len(times), self.width

    def state(self, key: str, now: float) -> tuple[int, float]:
        times = self._live(key, now)
        if not times:
            return self.burst, 0.0
        return self.burst - len(times), times[-1] + self.width - now


_Runner = _TokenBucket | _SlidingWindow | _SlidingLog

_RUNNERS: Final[dict[str, type[_Runner]]] = {
    "token_bucket": _TokenBucket,
    "sliding_window": _SlidingWindow,
    "sliding_log": _SlidingLog,
}


def _all_or_nothing(runners: tuple[_Runner, ...]) -> Decide:
    """The decision for several rules (or one that has no inlined path)."""
    smallest_burst = min(runner.burst for runner in runners)
    checks = tuple(runner.check for runner in runners)
    commits = tuple(runner.commit for runner in runners)
    states = tuple(runner.state for runner in runners)

    def decide(key: str, now: float, cost: int) -> Verdict:
        if not 0 < cost <= smallest_burst:
            raise _bad_cost(cost, smallest_burst)
        # Every rule is asked before any is charged; nothing awaits in between,
        # so no other decision can slip between the check and the charge.
        retry_after = 0.0
        for check in checks:
            retry_after = max(retry_after, check(key, now, cost))
        if retry_after > 0.0:
            remaining, reset_after = zip(*[state(key, now) for state in states], strict=True)
            return Verdict(False, retry_after, remaining, reset_after)
        remaining, reset_after = zip(*[commit(key, now, cost) for commit in commits], strict=True)
        return Verdict(True, 0.0, remaining, reset_after)

    return decide


class MemoryStore:
    """Limits in this process's memory; exact and fast, but not shared between processes.

    Implements the :class:`~bastion.ratelimit._store.LimitStore` protocol. Each
    decision is synchronous (:meth:`decide_now`); :meth:`decide` is the same as a
    coroutine for code written against any store.

    Args:
        clock: seconds on a clock that never goes back; ``time.monotonic`` unless
            a test drives time.

    Example:
        >>> from bastion.ratelimit._rules import build_rules
        >>> store = MemoryStore()
        >>> rules = build_rules("2/second", "token_bucket", max_log_limit=1000)
        >>> [store.decide_now("client:203.0.113.7", rules).allowed for _ in range(3)]
        [True, True, False]
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._runners: dict[str, _Runner] = {}
        # Compiled decisions by the identity of the rules tuple a caller passes
        # (policies pass the same tuple every time), kept with the tuple itself so
        # an id is never reused while cached.
        self._plans: dict[int, tuple[Sequence[Rule], Decide]] = {}

    def decide_now(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Verdict:
        """Check ``cost`` units against every rule under ``key``; consume them if all admit.

        Args:
            key: what the units are counted per, such as ``ip:203.0.113.7``.
            rules: the policy's rules; pass the same tuple every time (as a policy
                does) and its compiled form is reused.
            cost: units this request takes.

        Returns:
            The verdict: allowed or not, the wait, and per rule what remains.

        Raises:
            ValueError: ``cost`` is below 1 or above a rule's burst (it could never pass).
        """
        plan = self._plans.get(id(rules))
        if plan is None or plan[0] is not rules:
            plan = self._plan(rules)
        return plan[1](key, self._clock(), cost)

    async def decide(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Verdict:
        """:meth:`decide_now` for callers written against any store."""
        return self.decide_now(key, rules, cost)

    async def reset(self, key: str, rules: Sequence[Rule]) -> None:
        """Forget what ``key`` has consumed under ``rules``."""
        for rule in rules:
            runner = self._runners.get(rule_id(rule))
            if runner is not None:
                runner.data.pop(key, None)

    async def close(self) -> None:
        """Drop every count."""
        self._runners.clear()
        self._plans.clear()

    def sweep(self) -> int:
        """Drop every expired entry now (decisions also do it as tables grow); return how many."""
        now = self._clock()
        return sum(runner.sweep(now) for runner in self._runners.values())

    def __len__(self) -> int:
        """Entries held, one per key and rule, expired or not."""
        return sum(len(runner.data) for runner in self._runners.values())

    def _plan(self, rules: Sequence[Rule]) -> tuple[Sequence[Rule], Decide]:
        if not rules:
            raise ValueError("a decision needs at least one rule")
        runners = tuple(self._runner(rule) for rule in rules)
        only = runners[0]
        # The inlined bucket floors with int(), exact while the floored value stays
        # above -1: true when one unit takes more than 2 * EPS to refill (any rate
        # below 500 million per second).
        if (
            len(runners) == 1
            and isinstance(only, _TokenBucket)
            and only.per_token > _INLINE_MIN_PER_TOKEN
        ):
            decide = only.alone()
        else:
            decide = _all_or_nothing(runners)
        plan = (rules, decide)
        if type(rules) is tuple:  # a list could change under its cached plan
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[id(rules)] = plan
        return plan

    def _runner(self, rule: Rule) -> _Runner:
        name = rule_id(rule)
        runner = self._runners.get(name)
        if runner is None:
            runner = self._runners[name] = _RUNNERS[rule.algorithm](rule)
        return runner
