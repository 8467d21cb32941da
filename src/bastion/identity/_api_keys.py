"""API keys: generating, parsing and verifying tenant keys stored as a keyed hash.

A key reads ``<prefix>_<public id>_<secret><checksum>``, for example
``bk_live_7Hq2xk9PzA1c_<43 characters><6 characters>``:

* ``prefix`` (``bk_live``) says what the string is, for people and for secret
  scanners; several may be accepted (``bk_live``, ``bk_test``);
* ``public id``, 12 base62 characters (71 random bits), names the key: it is
  the lookup column and, with the prefix, what a listing shows;
* ``secret``, 43 base62 characters, 256 random bits;
* ``checksum``, 6 base62 characters of the CRC-32 of everything before it, so a
  mistyped or truncated key is refused without a lookup (GitHub's tokens do the
  same); it is no secret and proves nothing.

Only ``HMAC-SHA256(server secret, key)`` is stored (:attr:`ApiKeyRecord.hash`):
a copy of the table is useless without the server secret, and the input's 256
bits make a slow hash pointless. Verification looks the record up by public id
and compares digests with :func:`hmac.compare_digest`; an unknown id is compared
against a dummy digest, so a wrong secret and an unknown key take the same path.
Any failure (malformed, unknown, wrong secret, revoked, expired) is one
:class:`InvalidApiKey` that tells the caller nothing more.

Rotating the server secret: list the old one in ``previous_secrets``. Every
configured secret is tried on every verification (a fixed cost per
configuration, not per key), and a match under an old one sets
:attr:`ApiKeyVerification.rehash` so the caller can store :attr:`~ApiKeyVerification.new_hash`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from pydantic import SecretStr

from bastion._ids import uuid7_text
from bastion.errors import ConfigurationError, Unauthenticated

__all__ = [
    "API_KEY_SECRET_BYTES",
    "DEFAULT_API_KEY_PREFIX",
    "DEFAULT_TOUCH_INTERVAL",
    "MAX_API_KEY_LENGTH",
    "ApiKeyRecord",
    "ApiKeyVerification",
    "ApiKeys",
    "CreatedApiKey",
    "InvalidApiKey",
    "LastUsedPolicy",
    "ParsedApiKey",
]

DEFAULT_API_KEY_PREFIX: Final = "bk_live"
API_KEY_SECRET_BYTES: Final = 32
"""Random bytes behind a key's secret part (256 bits)."""
MAX_API_KEY_LENGTH: Final = 128
"""Longest input looked at; longer input is refused before any parsing."""
DEFAULT_TOUCH_INTERVAL: Final = 60.0
"""Seconds between two writes of a key's ``last_used_at``."""
MIN_SERVER_SECRET_BYTES: Final = 32

_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_PUBLIC_ID_LENGTH: Final = 12
_SECRET_LENGTH: Final = 43  # 62**43 > 2**256
_CHECKSUM_LENGTH: Final = 6  # 62**6 > 2**32
_PREFIX: Final = re.compile(r"[a-z][a-z0-9]{0,15}(?:_[a-z0-9]{1,16}){0,3}")
_CHALLENGE: Final = {"www-authenticate": 'Bearer error="invalid_token"'}


class InvalidApiKey(Unauthenticated):
    """An API key was malformed, unknown, wrong, revoked or expired (one answer for all)."""

    def __init__(self) -> None:
        super().__init__("The API key is invalid.", headers=_CHALLENGE)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What is stored for one key: a row of ``bastion_api_keys``.

    Attributes:
        id: UUIDv7, the primary key (and the id in ``/v1/api-keys/{id}``).
        tenant: the tenant the key acts for.
        name: a label chosen by its creator.
        scopes: what the key may do, sorted.
        prefix: the visible start of the key, ``bk_live_<public id>``, for listings.
        public_id: the lookup id inside the key (unique).
        hash: ``HMAC-SHA256(server secret, key)``, 32 bytes.
        created_at: when it was made (UTC).
        expires_at: when it stops working (UTC), ``None`` for never.
        last_used_at: last recorded use (UTC), written at most once per interval.
        revoked_at: when it was revoked (UTC), ``None`` while live.
        created_by: the user who made it, if any.
    """

    id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    prefix: str
    public_id: str
    hash: bytes
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    created_by: str | None = None

    def is_active(self, now: datetime) -> bool:
        """Return whether the key is neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    """A new key: the full key, shown once, and the record to store.

    Attributes:
        key: the whole key; give it to the caller once and never store or log it.
        record: what to store.
    """

    key: str
    record: ApiKeyRecord

    def __repr__(self) -> str:
        return f"CreatedApiKey(key='{self.record.prefix}_…', record={self.record!r})"


@dataclass(frozen=True, slots=True)
class ParsedApiKey:
    """A well-formed key taken apart (nothing about it is verified yet).

    Attributes:
        prefix: the kind prefix (``bk_live``).
        public_id: the lookup id.
        key: the whole key, for hashing.
    """

    prefix: str
    public_id: str
    key: str = ""

    def __repr__(self) -> str:
        return f"ParsedApiKey(prefix={self.prefix!r}, public_id={self.public_id!r})"


@dataclass(frozen=True, slots=True)
class ApiKeyVerification:
    """A key that verified.

    Attributes:
        record: the key's record.
        rehash: the stored hash was made with a previous server secret.
        new_hash: the hash under the current secret, to store when ``rehash``.
        touch: ``last_used_at`` is due for a write (see :class:`LastUsedPolicy`).
    """

    record: ApiKeyRecord
    rehash: bool
    new_hash: bytes
    touch: bool


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECKSUM_LENGTH)


def _secret_bytes(secret: SecretStr | str | bytes) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode() if isinstance(secret, str) else bytes(secret)


class LastUsedPolicy:
    """Decides when to write a key's ``last_used_at``: at most once per ``interval``.

    Two bounds: the stored value (``record.last_used_at``, as loaded, which may
    come from a cache) and what this process itself decided lately, so a burst of
    requests on one key between two cache refreshes writes once, not once each.
    Across instances the write itself is conditional (see the docs draft: the
    ``UPDATE ... WHERE last_used_at < :now - interval``), so the database sees at
    most one effective write per key per interval.

    Args:
        interval: seconds between two writes for one key.
        max_keys: keys remembered in process; the oldest half is dropped past it.
    """

    __slots__ = ("_decided", "_interval", "_max_keys")

    def __init__(
        self, interval: float | timedelta = DEFAULT_TOUCH_INTERVAL, *, max_keys: int = 10_000
    ) -> None:
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
        if seconds < 0:
            raise ValueError("interval must not be negative")
        self._interval = seconds
        self._max_keys = max_keys
        self._decided: dict[str, float] = {}

    @property
    def interval(self) -> float:
        """Seconds between two writes for one key."""
        return self._interval

    def due(self, record: ApiKeyRecord, now: datetime) -> bool:
        """Return whether to write ``last_used_at = now`` for ``record`` (and note it if so)."""
        stamp = now.timestamp()
        last = record.last_used_at
        if last is not None and stamp - last.timestamp() < self._interval:
            return False
        if stamp - self._decided.get(record.id, float("-inf")) < self._interval:
            return False
        if len(self._decided) >= self._max_keys:
            # Dicts keep insertion order: drop the older half in one go.
            keep = list(self._decided.items())[self._max_keys // 2 :]
            self._decided = dict(keep)
        self._decided.pop(record.id, None)
        self._decided[record.id] = stamp
        return True


class ApiKeys:
    """Makes and verifies API keys under a server secret.

    Example:
        >>> keys = ApiKeys(secret=SecretStr(secrets.token_urlsafe(32)))
        >>> created = keys.create("tenant-1", "ci", ["documents:read"])
        >>> store[created.record.public_id] = created.record  # only the record is kept
        >>> verified = await keys.authenticate(created.key, store.get)
        >>> verified.record.tenant
        'tenant-1'

    Args:
        secret: the server secret keying the hash (``identity.api_keys.secret``),
            at least 32 bytes.
        previous_secrets: older secrets whose hashes still verify (rotation).
        prefix: the prefix of new keys.
        accepted_prefixes: prefixes accepted when parsing; default ``prefix`` alone.
        last_used: when to report ``touch``; default once a minute per key.
        clock: UTC now (injected by tests).

    Raises:
        ConfigurationError: a secret shorter than 32 bytes or a malformed prefix.
    """

    def __init__(
        self,
        secret: SecretStr | str | bytes,
        *,
        previous_secrets: Iterable[SecretStr | str | bytes] = (),
        prefix: str = DEFAULT_API_KEY_PREFIX,
        accepted_prefixes: Iterable[str] = (),
        last_used: LastUsedPolicy | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        keys = [_secret_bytes(secret), *(_secret_bytes(s) for s in previous_secrets)]
        if any(len(key) < MIN_SERVER_SECRET_BYTES for key in keys):
            raise ConfigurationError(
                f"identity.api_keys.secret: an API key secret needs at least "
                f"{MIN_SERVER_SECRET_BYTES} bytes"
            )
        prefixes = tuple(dict.fromkeys([prefix, *accepted_prefixes]))
        for each in prefixes:
            if not _PREFIX.fullmatch(each):
                raise ConfigurationError(
                    f"API key prefix {each!r}: use lowercase letters and digits, "
                    "parts joined by '_' (bk_live)"
                )
        self._keys = keys
        self._prefix = prefix
        self._prefixes = frozenset(prefixes)
        alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
        self._format = re.compile(
            rf"({alternatives})_([0-9A-Za-z]{{{_PUBLIC_ID_LENGTH}}})_"
            rf"[0-9A-Za-z]{{{_SECRET_LENGTH}}}([0-9A-Za-z]{{{_CHECKSUM_LENGTH}}})"
        )
        self._last_used = last_used if last_used is not None else LastUsedPolicy()
        self._clock = clock if clock is not None else (lambda: datetime.now(UTC))
        # Compared against when the id is unknown, so that path costs what a wrong secret does.
        self._dummy = hmac.new(keys[0], b"bastion:api-key:dummy", hashlib.sha256).digest()

    @property
    def prefix(self) -> str:
        """The prefix of new keys."""
        return self._prefix

    def create(
        self,
        tenant: str,
        name: str,
        scopes: Sequence[str] = (),
        *,
        expires_at: datetime | None = None,
        created_by: str | None = None,
    ) -> CreatedApiKey:
        """Make a new key for ``tenant``.

        Args:
            tenant: the tenant it acts for.
            name: a label.
            scopes: what it may do.
            expires_at: when it stops working (timezone-aware), ``None`` for never.
            created_by: the creating user's id.

        Raises:
            TypeError: ``scopes`` is a string.
            ValueError: ``expires_at`` is naive.
        """
        if isinstance(scopes, str):
            raise TypeError("scopes must be a sequence of scope names, not a string")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware (UTC)")
        public_id = "".join(secrets.choice(_ALPHABET) for _ in range(_PUBLIC_ID_LENGTH))
        body = (
            f"{self._prefix}_{public_id}_"
            f"{_base62(int.from_bytes(secrets.token_bytes(API_KEY_SECRET_BYTES)), _SECRET_LENGTH)}"
        )
        key = body + _checksum(body)
        now = self._clock()
        record = ApiKeyRecord(
            id=uuid7_text(now.timestamp()),
            tenant=tenant,
            name=name,
            scopes=tuple(sorted(set(scopes))),
            prefix=f"{self._prefix}_{public_id}",
            public_id=public_id,
            hash=self.hash(key),
            created_at=now,
            expires_at=expires_at,
            created_by=created_by,
        )
        return CreatedApiKey(key, record)

    def hash(self, key: str) -> bytes:
        """Return the stored form of ``key`` under the current secret."""
        return hmac.new(self._keys[0], key.encode("ascii"), hashlib.sha256).digest()

    def parse(self, presented: object) -> ParsedApiKey:
        """Take a presented key apart, checking its form and checksum.

        The form is public, so how fast a malformed key is refused tells nothing
        secret; the input is bounded to 128 characters before the one regex runs.

        Raises:
            InvalidApiKey: anything that is not a well-formed key with a good checksum.
        """
        if not isinstance(presented, str) or len(presented) > MAX_API_KEY_LENGTH:
            raise InvalidApiKey
        match = self._format.fullmatch(presented)
        if match is None:
            raise InvalidApiKey
        body = presented[:-_CHECKSUM_LENGTH]
        if not hmac.compare_digest(_checksum(body), match.group(3)):
            raise InvalidApiKey
        return ParsedApiKey(match.group(1), match.group(2), presented)

    def check(self, parsed: ParsedApiKey, record: ApiKeyRecord | None) -> ApiKeyVerification:
        """Verify a parsed key against its looked-up record (``None`` when unknown).

        Raises:
            InvalidApiKey: unknown, wrong secret, another key's record, revoked or expired.
        """
        stored = record.hash if record is not None else self._dummy
        data = parsed.key.encode("ascii")
        # Every configured secret, every time: the cost depends on the configuration only.
        matches = [
            hmac.compare_digest(hmac.new(key, data, hashlib.sha256).digest(), stored)
            for key in self._keys
        ]
        if record is None or not any(matches) or record.public_id != parsed.public_id:
            raise InvalidApiKey
        now = self._clock()
        if not record.is_active(now):
            raise InvalidApiKey
        rehash = not matches[0]
        return ApiKeyVerification(
            record=record,
            rehash=rehash,
            new_hash=self.hash(parsed.key) if rehash else record.hash,
            touch=self._last_used.due(record, now),
        )

    async def authenticate(
        self,
        presented: object,
        lookup: Callable[[str], Awaitable[ApiKeyRecord | None]],
    ) -> ApiKeyVerification:
        """Parse ``presented``, look its record up by public id, and verify it.

        Args:
            presented: the key as sent (``Authorization: Bearer`` or ``X-API-Key``).
            lookup: the record for a public id, or ``None`` (a query on the unique
                ``public_id`` column, or a cache in front of it).

        Raises:
            InvalidApiKey: on anything wrong (:meth:`parse`, :meth:`check`).
        """
        parsed = self.parse(presented)
        return self.check(parsed, await lookup(parsed.public_id))

    def revoke(self, record: ApiKeyRecord) -> ApiKeyRecord:
        """Return ``record`` revoked now (unchanged if it already was)."""
        if record.revoked_at is not None:
            return record
        return replace(record, revoked_at=self._clock())

    def touched(self, record: ApiKeyRecord) -> ApiKeyRecord:
        """Return ``record`` with ``last_used_at`` now (what a cache keeps after a touch)."""
        return replace(record, last_used_at=self._clock())
