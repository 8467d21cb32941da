"""A reference limiter for the property tests: slow, plain, and obviously right.

Every algorithm keeps the full history of what it admitted (a list of
``(time, cost)``) and recomputes its state from that history at each question,
in the words of the specification rather than in the stores' incremental form:

- token bucket: a bucket of ``burst`` tokens refilled at ``rate`` per ``period``
  (the stores run the equivalent GCRA on a theoretical arrival time);
- sliding window: the admitted units of the current and previous aligned window,
  the previous one weighted by how much of it still overlaps the sliding window;
- sliding log: the admitted units of the last ``window`` seconds.

``retry_after`` is not taken from a formula: it is found by bisection on "would
this request be admitted at ``now + d``", which is monotone in ``d`` because
waiting never makes a limiter less willing. So the stores' closed forms are
checked against a definition, not against a copy of themselves.

Times are seconds as floats; ``EPS`` is the tolerance the specification puts
wherever a comparison or a floor meets a float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bastion.ratelimit._expression import Limit
from bastion.ratelimit._store import Rule, Verdict

EPS = 1e-9


class ManualClock:
    """Seconds that move only when the test says; starts well above 0, like ``monotonic``."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ModelRule:
    """One rule and everything it admitted, oldest first."""

    limit: Limit
    algorithm: str
    admitted: list[tuple[float, int]] = field(default_factory=list)

    # -- token bucket ---------------------------------------------------------

    def _tokens(self, now: float) -> float:
        """Tokens in the bucket at ``now``: full at first, refilled between admissions."""
        per_token = self.limit.period / self.limit.rate
        tokens = float(self.limit.burst)
        last = None
        for when, cost in self.admitted:
            if last is not None:
                tokens = min(float(self.limit.burst), tokens + (when - last) / per_token)
            tokens -= cost
            last = when
        if last is not None:
            tokens = min(float(self.limit.burst), tokens + (now - last) / per_token)
        return tokens

    # -- sliding window --------------------------------------------------------

    def _windows(self, now: float) -> tuple[int, float, int, int]:
        """The current aligned window's index, the elapsed fraction of it, and the
        units admitted in it and in the one before."""
        width = self.limit.window
        index = math.floor(now / width)
        fraction = min(1.0, max(0.0, (now - index * width) / width))
        current = sum(cost for when, cost in self.admitted if math.floor(when / width) == index)
        previous = sum(
            cost for when, cost in self.admitted if math.floor(when / width) == index - 1
        )
        return index, fraction, current, previous

    def _estimate(self, now: float) -> float:
        _, fraction, current, previous = self._windows(now)
        return previous * (1 - fraction) + current

    # -- sliding log -----------------------------------------------------------

    def _in_log(self, now: float) -> list[float]:
        """Times of the units admitted in the last window (one entry per unit)."""
        width = self.limit.window
        return [
            when
            for when, cost in self.admitted
            for _ in range(cost)
            if when > now - width + EPS  # the EPS keeps "exactly one window ago" out
        ]

    # -- the questions ---------------------------------------------------------

    def admits(self, now: float, cost: int) -> bool:
        """Would ``cost`` units be admitted at ``now``?"""
        if self.algorithm == "token_bucket":
            per_token = self.limit.period / self.limit.rate
            # In seconds: the deficit after taking cost tokens is at most EPS of refill.
            return (cost - self._tokens(now)) * per_token <= EPS
        if self.algorithm == "sliding_window":
            return self._estimate(now) + cost <= self.limit.burst + EPS
        return len(self._in_log(now)) + cost <= self.limit.burst

    def remaining(self, now: float) -> int:
        """Units still available at ``now`` (with nothing more consumed)."""
        if self.algorithm == "token_bucket":
            return max(0, math.floor(self._tokens(now) + EPS))
        if self.algorithm == "sliding_window":
            return max(0, math.floor(self.limit.burst - self._estimate(now) + EPS))
        return self.limit.burst - len(self._in_log(now))

    def reset_after(self, now: float) -> float:
        """Seconds until the rule is back to its untouched state."""
        if not self.admitted:
            return 0.0
        if self.algorithm == "token_bucket":
            per_token = self.limit.period / self.limit.rate
            return max(0.0, (self.limit.burst - self._tokens(now)) * per_token)
        newest = self.admitted[-1][0]
        width = self.limit.window
        if self.algorithm == "sliding_window":
            # The newest unit counts until its window has become the previous one
            # and then passed too.
            index = math.floor(now / width)
            newest_index = math.floor(newest / width)
            if newest_index >= index - 1:
                return (newest_index + 2) * width - now
            return 0.0
        return max(0.0, newest + width - now)

    def consume(self, now: float, cost: int) -> None:
        self.admitted.append((now, cost))


def earliest(predicate, now: float, horizon: float) -> float:
    """The smallest ``d`` in ``[0, horizon]`` with ``predicate(now + d)``, by bisection.

    ``predicate`` must be monotone (false, then true for good) and true at ``now + horizon``.
    """
    assert predicate(now + horizon), "the horizon must be far enough"
    if predicate(now):
        return 0.0
    low, high = 0.0, horizon
    while high - low > 1e-10:
        middle = (low + high) / 2
        if predicate(now + middle):
            high = middle
        else:
            low = middle
    return high


class ModelLimiter:
    """The reference for one key: all rules checked, all or none consumed."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = [ModelRule(rule.limit, rule.algorithm) for rule in rules]

    def decide(self, now: float, cost: int = 1) -> Verdict:
        if all(rule.admits(now, cost) for rule in self.rules):
            for rule in self.rules:
                rule.consume(now, cost)
            return Verdict(
                allowed=True,
                retry_after=0.0,
                remaining=tuple(rule.remaining(now) for rule in self.rules),
                reset_after=tuple(rule.reset_after(now) for rule in self.rules),
            )
        # Two full windows (or a full bucket) free any rule whatever its history.
        horizon = 2 * max(rule.limit.window for rule in self.rules) + 1.0
        retry = earliest(
            lambda when: all(rule.admits(when, cost) for rule in self.rules), now, horizon
        )
        return Verdict(
            allowed=False,
            retry_after=retry,
            remaining=tuple(rule.remaining(now) for rule in self.rules),
            reset_after=tuple(rule.reset_after(now) for rule in self.rules),
        )
