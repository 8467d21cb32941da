"""The rate-limit response headers: ``X-RateLimit-*`` and the IETF ``RateLimit`` fields.

Two families, both sent:

- ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset``, the
  de-facto convention most clients read. ``X-RateLimit-Reset`` is in **seconds
  until** the limit is fully available again (a delta, like ``Retry-After``), not
  an epoch timestamp: it needs no clock agreement with the client.
- ``RateLimit-Policy`` and ``RateLimit`` of draft-ietf-httpapi-ratelimit-headers
  (draft 11, May 2026), Structured Field lists: ``RateLimit-Policy:
  "default";q=20;w=1`` states each limit (quota ``q`` over window ``w`` seconds),
  ``RateLimit: "default";r=19;t=1`` what remains (``r``) and the seconds until it
  resets (``t``).

Both describe the policy's most restrictive limit for this request: the one with
the fewest units remaining (on a tie, the one furthest from resetting), which is
the one that rejects first. ``RateLimit-Policy`` lists every limit of the policy.

The policy part of every header is fixed per policy and rendered once, at
start-up; a request renders only its remaining count and reset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from bastion.ratelimit._expression import Limit
from bastion.ratelimit._store import Verdict

__all__ = ["HeaderRenderer", "limit_names"]

_LIMIT: Final = b"x-ratelimit-limit"
_REMAINING: Final = b"x-ratelimit-remaining"
_RESET: Final = b"x-ratelimit-reset"
_POLICY: Final = b"ratelimit-policy"
_RATELIMIT: Final = b"ratelimit"

RawHeaders = list[tuple[bytes, bytes]]

_CACHE_MAX: Final = 1024


def _sf_string(text: str) -> str:
    """Serialize ``text`` as a Structured Field String (RFC 9651 §4.1.6)."""
    if not text.isascii() or not text.isprintable():
        raise ValueError(f"a policy name must be printable ASCII, not {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _window(limit: Limit) -> int:
    # w is a non-zero integer of seconds; sub-second precision is not supported.
    return max(1, math.ceil(limit.window - 1e-9))


def limit_names(policy: str, limits: Sequence[Limit]) -> tuple[str, ...]:
    """Name each limit of a policy for the ``RateLimit`` fields.

    A policy with one limit is named as the policy; with several, each limit is
    the policy's name and its window (``default-1s``, ``default-3600s``), and the
    position when two windows are equal (``uploads-60s-2``): every limit needs a
    name of its own, since ``RateLimit`` refers to one by name.
    """
    if len(limits) == 1:
        return (policy,)
    names: list[str] = []
    for index, limit in enumerate(limits):
        name = f"{policy}-{_window(limit)}s"
        if name in names:
            name = f"{name}-{index + 1}"
        names.append(name)
    return tuple(names)


class HeaderRenderer:
    """Renders one policy's headers for a verdict.

    Args:
        policy: the policy's name, as the ``RateLimit`` fields name it.
        limits: the policy's limits, in the order the store reports them.
    """

    __slots__ = ("_cache", "_formats", "_limit_pairs", "_limits", "_policy_pair")

    def __init__(self, policy: str, limits: Sequence[Limit]) -> None:
        if not limits:
            raise ValueError("a policy needs at least one limit")
        self._limits = tuple(limits)
        names = tuple(_sf_string(name) for name in limit_names(policy, limits))
        # Everything but the two numbers is fixed per limit: rendered here, once.
        self._limit_pairs = tuple((_LIMIT, b"%d" % limit.burst) for limit in limits)
        self._formats = tuple(name.replace("%", "%%").encode() + b";r=%d;t=%d" for name in names)
        policy_header = ", ".join(
            f"{name};q={limit.burst};w={_window(limit)}"
            for name, limit in zip(names, limits, strict=True)
        )
        self._policy_pair = (_POLICY, policy_header.encode())
        # Rendered lists by (limit, remaining, reset): a client's requests repeat the
        # same few, and a hit costs one lookup instead of five tuples and three
        # formats (1.0 -> 0.4 µs, timeit). The lists are never mutated (the
        # middleware copies them into a new header list), so sharing them is safe.
        self._cache: dict[tuple[int, int, int], RawHeaders] = {}

    @property
    def policy_header(self) -> str:
        """The ``RateLimit-Policy`` value: every limit of the policy."""
        return self._policy_pair[1].decode()

    def raw(self, verdict: Verdict) -> RawHeaders:
        """Return the headers for ``verdict`` as ASGI ``(name, value)`` byte pairs.

        A verdict that carries no per-limit state (a decision admitted while the
        store was unreachable) gets only ``RateLimit-Policy``.
        """
        remaining = verdict.remaining
        if not remaining:
            return [self._policy_pair]
        index = 0 if len(remaining) == 1 else _most_restrictive(remaining, verdict.reset_after)
        left = max(remaining[index], 0)
        # Whole seconds, rounded up (a client never comes back early); float slack
        # just above a whole number is not a second more. On the hot path:
        # math.ceil and b"%d" cost a third of str().encode() and f-strings.
        reset = max(math.ceil(verdict.reset_after[index] - 1e-9), 0)
        key = (index, left, reset)
        cache = self._cache
        rendered = cache.get(key)
        if rendered is None:
            rendered = [
                self._limit_pairs[index],
                (_REMAINING, b"%d" % left),
                (_RESET, b"%d" % reset),
                self._policy_pair,
                (_RATELIMIT, self._formats[index] % (left, reset)),
            ]
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[key] = rendered
        return rendered

    def mapping(self, verdict: Verdict) -> dict[str, str]:
        """Return the same headers as a ``{name: value}`` dict (for a raised error)."""
        return {name.decode(): value.decode() for name, value in self.raw(verdict)}


def _most_restrictive(remaining: Sequence[int], reset_after: Sequence[float]) -> int:
    if len(remaining) == 1:
        return 0
    best = 0
    for index in range(1, len(remaining)):
        if remaining[index] < remaining[best] or (
            remaining[index] == remaining[best] and reset_after[index] > reset_after[best]
        ):
            best = index
    return best
