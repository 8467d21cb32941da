"""The access-token deny list in Redis: revoked ``jti``s and "everything before T" markers.

Two kinds of keys (``{p}`` is ``redis.key_prefix``):

* ``{p}identity:deny:jti:<jti>`` — one revoked token, expiring when the token
  would (its ``exp`` plus the verifier's leeway), so the list never outgrows
  the tokens alive at once;
* ``{p}identity:deny:sub:<subject>`` — "every token of this user issued before
  T" (log out everywhere, password change), holding T in epoch seconds and
  expiring once every such token has (T plus the longest token life and the
  leeway). A later revocation never lowers T (an optimistic transaction keeps
  the larger).

A check is one ``MGET`` of both keys: one round trip, sent through a
:class:`~bastion.ratelimit._scripts.ScriptRunner` (short timeout, no retry,
fail-fast after a failure, pipelined with concurrent callers).

``iat`` has a resolution of one second, so a token issued in the same whole
second as T is kept: the flow that revokes (a password change) usually issues
the caller a fresh token in that second, and refusing it would log the user
out of the session they just secured.

When Redis is down or slower than ``timeout`` the list fails open by default:
the token's signature and expiry still hold, so a revoked token stays usable
for at most the rest of its life (``identity.tokens.access_ttl``, 15 minutes by
default) while Redis is out. The alternative, refusing every authenticated
request while Redis is out, turns a cache outage into a full outage of the API
for a guarantee that the short token life already bounds. The outage is logged
once through :class:`~bastion.resilience.Degradation` and every check that
failed open is counted (``bastion_identity_deny_list_checks_total``).
``fail_open=False`` answers 503 ``SERVICE_UNAVAILABLE`` instead. Revoking is
not on the request path and never fails open: it raises
:class:`~bastion.errors.DependencyFailure` so logout can say it did not work.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Self

import structlog

from bastion.errors import DependencyFailure, ServiceUnavailable
from bastion.observability._metrics import IDENTITY_DENY_LIST_CHECKS
from bastion.ratelimit._scripts import ScriptRunner, StoreUnavailable
from bastion.resilience import Degradation
from bastion.settings import IdentitySettings

__all__ = ["DEFAULT_DENY_LIST_TIMEOUT", "RedisDenyList"]

logger = structlog.get_logger("bastion.identity")

DEFAULT_DENY_LIST_TIMEOUT: Final = 0.05
"""Seconds one check may take before the failure policy applies."""

_CHECKS: Final = {
    result: IDENTITY_DENY_LIST_CHECKS.labels(result=result)
    for result in ("allowed", "revoked", "failed_open", "failed_closed")
}
_RETRY_AFTER: Final = {"retry-after": "1"}


class RedisDenyList:
    """A :class:`~bastion.identity._tokens.TokenDenyList` shared by every instance through Redis.

    Example:
        >>> deny = RedisDenyList(redis.asyncio.from_url(url), key_prefix="bastion:")
        >>> await deny.revoke(claims.token_id, claims.expires_at)  # logout
        >>> await deny.revoke_subject(user_id)  # log out everywhere
        >>> await deny.is_revoked(jti, subject=user_id, issued_at=iat)
        True

    Args:
        client: a ``redis.asyncio.Redis`` (``identity.store_url``); revocations are
            written with it, and checks go through ``runner``.
        key_prefix: prefix of every key (``redis.key_prefix``).
        timeout: seconds a check may take (queueing and round trip); a shared
            ``runner`` brings its own.
        write_timeout: seconds a revocation may take.
        fail_open: admit tokens while Redis cannot answer (see the module).
        leeway: the verifier's clock leeway on ``exp``, seconds: a revoked
            ``jti`` is kept that much past its ``exp``.
        max_token_life: the longest access-token life issued, seconds: how long a
            subject's marker must outlive its T.
        runner: a runner to share (one per Redis and event loop: concurrent checks
            of every feature then share connections and pipelined writes); else one
            is made and closed with this list.
        clock: epoch seconds (injected by tests).
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "bastion:",
        timeout: float = DEFAULT_DENY_LIST_TIMEOUT,
        write_timeout: float = 1.0,
        fail_open: bool = True,
        leeway: float = 30.0,
        max_token_life: float = 900.0,
        runner: ScriptRunner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if write_timeout <= 0:
            raise ValueError("write_timeout must be positive")
        self._client = client
        self._owns_runner = runner is None
        self._runner = runner if runner is not None else ScriptRunner(client, timeout=timeout)
        self._jti_prefix = f"{key_prefix}identity:deny:jti:"
        self._sub_prefix = f"{key_prefix}identity:deny:sub:"
        self._write_timeout = write_timeout
        self._fail_open = fail_open
        self._leeway = leeway
        self._max_token_life = max_token_life
        self._clock = clock
        self._degradation = Degradation("redis", feature="token deny list")

    @classmethod
    def from_settings(
        cls,
        identity: IdentitySettings,
        client: Any,
        *,
        key_prefix: str = "bastion:",
        timeout: float = DEFAULT_DENY_LIST_TIMEOUT,
        fail_open: bool = True,
        runner: ScriptRunner | None = None,
    ) -> Self:
        """Build from the ``identity`` section (token life and leeway) and its store's client."""
        return cls(
            client,
            key_prefix=key_prefix,
            timeout=timeout,
            fail_open=fail_open,
            leeway=identity.tokens.leeway,
            max_token_life=identity.tokens.access_ttl,
            runner=runner,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the runner if this list made it; the client stays open (the caller's)."""
        self._degradation.forget()
        if self._owns_runner:
            await self._runner.close()

    async def ping(self) -> bool:
        """Return whether Redis answers within the check timeout (readiness)."""
        try:
            await self._runner.execute("PING")
        except StoreUnavailable:
            return False
        return True

    # -- revoking --------------------------------------------------------------------

    async def revoke(self, jti: str, until: float) -> None:
        """Deny the token ``jti`` on every instance until ``until`` (its ``exp``) plus the leeway.

        A token already past that is not written: it can no longer verify.

        Raises:
            DependencyFailure: Redis did not take the write.
        """
        ttl = math.ceil(until + self._leeway - self._clock())
        if ttl <= 0:
            return
        await self._write(self._client.set(self._jti_prefix + jti, b"1", ex=ttl))

    async def revoke_subject(self, subject: str, before: float | None = None) -> None:
        """Deny every token of ``subject`` issued before ``before`` (default: now).

        Kept until the last such token has expired; a later call with an earlier
        ``before`` does not undo a later one.

        Raises:
            DependencyFailure: Redis did not take the write.
        """
        now = self._clock()
        # Whole seconds, as iat is: see the module on tokens issued in T's second.
        cutoff = math.floor(now if before is None else before)
        ttl = math.ceil(cutoff + self._max_token_life + self._leeway - now)
        if ttl <= 0:
            return
        key = self._sub_prefix + subject

        async def keep_larger(pipe: Any) -> None:
            current = _number(await pipe.get(key))
            pipe.multi()
            if current is None or current < cutoff:
                pipe.set(key, str(cutoff), ex=ttl)
            else:
                # The stored T is later: keep it, and long enough for it.
                pipe.expire(key, math.ceil(current + self._max_token_life + self._leeway - now))

        await self._write(self._client.transaction(keep_larger, key))

    async def _write(self, call: Any) -> None:
        try:
            async with asyncio.timeout(self._write_timeout):
                await call
        except Exception as exc:  # any failure means the revocation may not hold
            logger.warning("token revocation not stored", error=type(exc).__name__)
            raise DependencyFailure("The revocation could not be stored; try again.") from exc

    # -- checking --------------------------------------------------------------------

    async def is_revoked(
        self, jti: str, *, subject: str | None = None, issued_at: float | None = None
    ) -> bool:
        """Return whether the token is denied: its ``jti``, or its subject before its ``iat``.

        One round trip. Without ``subject`` and ``issued_at`` only the ``jti`` is looked at.

        Raises:
            ServiceUnavailable: Redis cannot answer and the list fails closed.
        """
        keys = [self._jti_prefix + jti]
        check_subject = subject is not None and issued_at is not None
        if subject is not None and issued_at is not None:
            keys.append(self._sub_prefix + subject)
        try:
            reply = await self._runner.execute("MGET", *keys)
        except StoreUnavailable as exc:
            self._degradation.failed(exc)
            if self._fail_open:
                _CHECKS["failed_open"].inc()
                return False
            _CHECKS["failed_closed"].inc()
            raise ServiceUnavailable(
                "Token revocations cannot be checked now.", headers=_RETRY_AFTER
            ) from exc
        self._degradation.recovered()
        revoked = reply[0] is not None
        if not revoked and check_subject and reply[1] is not None:
            cutoff = _number(reply[1])
            # A marker that is not a number was not written by us: deny rather than guess.
            revoked = cutoff is None or (issued_at is not None and issued_at < cutoff)
        _CHECKS["revoked" if revoked else "allowed"].inc()
        return revoked


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
