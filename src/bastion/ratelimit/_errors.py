"""The errors rate limiting raises; each renders as an RFC 9457 problem with ``Retry-After``.

None names the key it was counted under: a key may hold an IP address or an
account identifier, which are personal data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from bastion.errors import BastionError, ErrorCode, ServiceUnavailable


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, rounded up and at least 1 (RFC 9110 delta-seconds)."""
    return str(max(1, math.ceil(seconds)))


class RateLimited(BastionError):
    """A limit admits no more requests now (429 ``RATE_LIMITED``).

    Args:
        retry_after: seconds until the request would be admitted.
        headers: the rate-limit headers of the decision; ``Retry-After`` is added.

    Attributes:
        retry_after: as given.
    """

    code = ErrorCode.RATE_LIMITED

    def __init__(self, retry_after: float, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(
            "Too many requests; try again after the time in Retry-After.",
            headers={**(headers or {}), "Retry-After": retry_after_header(retry_after)},
        )
        self.retry_after = retry_after


class AccountLocked(BastionError):
    """The submitted account identifier is locked after repeated failures (429 ``ACCOUNT_LOCKED``).

    Raised whether or not an account with that identifier exists, so the answer
    reveals nothing about which accounts do.
    """

    code = ErrorCode.ACCOUNT_LOCKED

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            "Too many failed attempts for this account; try again after the time in Retry-After.",
            headers={"Retry-After": retry_after_header(retry_after)},
        )
        self.retry_after = retry_after


class QuotaExceeded(BastionError):
    """A long-period quota is spent (429 ``QUOTA_EXCEEDED``) until its period ends."""

    code = ErrorCode.QUOTA_EXCEEDED

    def __init__(self, retry_after: float, *, quota: str | None = None) -> None:
        super().__init__(
            "The quota for this period is used up; it renews at the time in Retry-After.",
            headers={"Retry-After": retry_after_header(retry_after)},
            extra={"quota": quota} if quota else None,
        )
        self.retry_after = retry_after


class LimitsUnavailable(ServiceUnavailable):
    """The limit store is unreachable and the policy fails closed (503, ``Retry-After: 1``)."""

    def __init__(self) -> None:
        super().__init__(
            "Rate limits cannot be checked right now; try again shortly.",
            headers={"Retry-After": "1"},
        )
