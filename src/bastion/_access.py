"""Who may call an operational endpoint: an allow-list of networks and a bearer token."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from enum import Enum

from starlette.requests import Request

from bastion.context import current_context
from bastion.errors import Forbidden, Unauthenticated

__all__ = ["AccessDecision", "AccessPolicy"]


class AccessDecision(Enum):
    """The outcome of :meth:`AccessPolicy.decide`."""

    ALLOWED = "allowed"
    NETWORK_DENIED = "network_denied"
    TOKEN_MISSING = "token_missing"  # noqa: S105 -- an outcome's name, not a secret
    TOKEN_INVALID = "token_invalid"  # noqa: S105 -- an outcome's name, not a secret


class AccessPolicy:
    """Admits callers from allowed networks that present the token, when one is set.

    Args:
        allowed_networks: CIDRs the client address must fall in; empty admits every client.
            The client address is the one resolved through ``http.trusted_proxies``
            (the request context's ``client_ip``); outside a request context, the peer.
        token: the bearer token callers must present; ``None`` asks for none.

    Example:
        >>> policy = AccessPolicy(["127.0.0.1/32"], token=None)
        >>> policy.allows(request)
        True
    """

    def __init__(self, allowed_networks: Sequence[str] = (), token: str | None = None) -> None:
        self._networks = [ipaddress.ip_network(net, strict=False) for net in allowed_networks]
        self._token = token.encode() if token else None

    def decide(self, request: Request) -> AccessDecision:
        """Return whether ``request`` is admitted and, if not, why."""
        if self._networks:
            # Behind a trusted proxy the socket peer is the proxy, often on loopback:
            # checking it would admit every caller the proxy forwards. The request
            # middleware resolved the client once (the proxy's header, believed only
            # from a trusted peer; the peer itself otherwise).
            context = current_context()
            if context is not None:
                host = context.client_ip
            else:
                host = request.client.host if request.client else None
            try:
                address = ipaddress.ip_address(host or "")
            except ValueError:
                return AccessDecision.NETWORK_DENIED
            if not any(address in network for network in self._networks):
                return AccessDecision.NETWORK_DENIED
        if self._token is None:
            return AccessDecision.ALLOWED
        # The scheme is case-insensitive (RFC 9110); the token is compared in
        # constant time so its prefix cannot be found by timing probes.
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not supplied.strip():
            return AccessDecision.TOKEN_MISSING
        if hmac.compare_digest(supplied.strip().encode(), self._token):
            return AccessDecision.ALLOWED
        return AccessDecision.TOKEN_INVALID

    def allows(self, request: Request) -> bool:
        """Return whether ``request`` is admitted."""
        return self.decide(request) is AccessDecision.ALLOWED

    def require(self, request: Request, *, subject: str, realm: str) -> None:
        """Raise unless ``request`` is admitted.

        Args:
            request: the incoming request.
            subject: what is guarded, for the problem's detail (``/admin``).
            realm: the ``WWW-Authenticate`` realm asked of a caller without the token.

        Raises:
            Forbidden: the caller is outside the allowed networks.
            Unauthenticated: the token is set and the caller's is missing or wrong.
        """
        decision = self.decide(request)
        if decision is AccessDecision.ALLOWED:
            return
        if decision is AccessDecision.NETWORK_DENIED:
            raise Forbidden(f"Access to {subject} is restricted to allowed networks.")
        raise Unauthenticated(
            f"Access to {subject} needs a valid bearer token.",
            headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
        )
