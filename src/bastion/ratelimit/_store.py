"""What every limit store answers: the verdict on one request against a policy's limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from bastion.ratelimit._expression import Limit

Algorithm = Literal["token_bucket", "sliding_window", "sliding_log"]


@dataclass(frozen=True, slots=True)
class Rule:
    """A limit with the algorithm that enforces it, as a store receives it."""

    limit: Limit
    algorithm: Algorithm


class Verdict(NamedTuple):
    """The store's answer for one request against all of a policy's rules.

    Rules are all-or-nothing: a request is admitted only when every rule admits
    it, and a rejected request consumes nothing from any of them. A named tuple,
    not a frozen dataclass: building one is half of a memory decision's cost, and
    the tuple is 2.5x cheaper to build (~1.3 M decisions/s instead of ~0.95 M).

    Attributes:
        allowed: whether the request is admitted.
        retry_after: seconds until the same request would be admitted; 0 when allowed.
        remaining: per rule (in the order given), units still available after this decision.
        reset_after: per rule, seconds until it is fully available again.
    """

    allowed: bool
    retry_after: float
    remaining: tuple[int, ...]
    reset_after: tuple[float, ...]


class LimitStore(Protocol):
    """Decides requests against rules; implemented for memory and for Redis."""

    async def decide(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Verdict:
        """Check ``cost`` units against every rule under ``key`` and consume them if all admit.

        Raises:
            StoreUnavailable: the store could not be reached in time (Redis only).
        """
        ...

    async def reset(self, key: str, rules: Sequence[Rule]) -> None:
        """Forget what ``key`` has consumed under ``rules``."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


class StoreUnavailable(Exception):
    """The shared store did not answer in time; the policy's failure rule applies."""
