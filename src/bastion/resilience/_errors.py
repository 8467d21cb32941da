"""What a failed call through a resilience pipeline raises; each renders as an RFC 9457 problem.

None of them carries the dependency's own error text to the client: it is on
``__cause__`` and in the log line, never in the problem's ``detail``.
"""

from __future__ import annotations

import math

from bastion.errors import BastionError, DependencyFailure, ErrorCode, ServiceUnavailable

__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
    "DependencyError",
    "DependencyTimeoutError",
    "RequestTimeout",
]


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class CircuitOpenError(ServiceUnavailable):
    """The dependency's circuit is open: the call was not made (503, ``Retry-After``).

    Attributes:
        circuit: the circuit's name.
        retry_after: seconds until the circuit admits its next probe.
    """

    def __init__(self, circuit: str, retry_after: float) -> None:
        super().__init__(
            "A dependency this request needs is unavailable; try again later.",
            headers=_retry_after(retry_after),
        )
        self.circuit = circuit
        self.retry_after = retry_after


class BulkheadFullError(ServiceUnavailable):
    """Too many calls to the dependency are in progress or waiting (503, ``Retry-After: 1``).

    Attributes:
        dependency: the pipeline's name.
    """

    def __init__(self, dependency: str) -> None:
        super().__init__(
            "The service is busy with a dependency this request needs; try again shortly.",
            headers=_retry_after(1),
        )
        self.dependency = dependency


class DependencyError(DependencyFailure):
    """The dependency failed on every attempt the policy allowed (502).

    Attributes:
        dependency: the pipeline's name; the last failure is ``__cause__``.
    """

    def __init__(self, dependency: str, *, status: int = 502) -> None:
        super().__init__("A dependency this request needs failed.", status=status)
        self.dependency = dependency


class DependencyTimeoutError(DependencyError):
    """The dependency did not answer within the time the policy or the request allowed (503).

    Attributes:
        dependency: the pipeline's name.
    """

    def __init__(self, dependency: str) -> None:
        super().__init__(dependency, status=503)
        self.detail = "A dependency this request needs did not answer in time."
        self.args = (self.detail,)


class RequestTimeout(BastionError):
    """The request's own deadline passed before it could be answered (504)."""

    code = ErrorCode.REQUEST_TIMEOUT
