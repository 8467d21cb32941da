"""Login pseudonyms: keyed hashes that name login identifiers in the audit trail, not reveal them.

A failed login or a lockout concerns an identifier (an e-mail address, often)
that may name nobody known. The throttle and the security events carry its
unsalted SHA-256, which anyone holding a list of addresses can recompute: stored
in an entry it would let a reader of the database confirm who failed to log in.
The audit trail stores instead ``HMAC-SHA256(k, sha256(identifier))``, with
``k`` derived (HKDF-SHA256, its own info string) from ``audit.encryption_key``:
the same identifier always gets the same pseudonym, so its entries can be found
and its key erased, but only a holder of the key can tell which identifier it is.

Rotating ``audit.encryption_key`` changes every pseudonym: entries recorded
before keep the old ones, which ``bastion audit erase --email`` no longer finds.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bastion.audit._subjects import MASTER_KEY_MIN_BYTES
from bastion.ratelimit._login import identifier_hash

__all__ = ["LoginPseudonyms"]

_HKDF_INFO: Final = b"bastion-audit-login-pseudonyms"
_KEY_SIZE: Final = 32


class LoginPseudonyms:
    """The keyed pseudonyms of login identifiers.

    Args:
        secret: ``audit.encryption_key`` as bytes (at least 32).

    Raises:
        ValueError: ``secret`` is shorter than 32 bytes.

    Example:
        >>> pseudonyms = LoginPseudonyms(secret)
        >>> pseudonyms.of_identifier("Ada@Example.com") == pseudonyms.of_hash(
        ...     identifier_hash("ada@example.com")
        ... )
        True
    """

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MASTER_KEY_MIN_BYTES:
            raise ValueError(f"audit.encryption_key must be at least {MASTER_KEY_MIN_BYTES} bytes")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=None, info=_HKDF_INFO)
        self._key = hkdf.derive(secret)

    def of_hash(self, hashed: str) -> str:
        """The pseudonym (64 hex digits) of an identifier given as its SHA-256 (hex).

        Args:
            hashed: :func:`bastion.ratelimit.identifier_hash` of the identifier, as
                security events and lockouts carry it.
        """
        return hmac.new(self._key, hashed.encode(), hashlib.sha256).hexdigest()

    def of_identifier(self, identifier: str) -> str:
        """The pseudonym of an identifier in clear (normalised as the login throttle does)."""
        return self.of_hash(identifier_hash(identifier))
