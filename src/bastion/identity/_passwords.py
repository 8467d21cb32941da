"""Passwords: Argon2id hashing with a server-side pepper, off the event loop, and the policy.

How a password becomes a stored hash::

    NFKC(password) ──HMAC-SHA256(pepper)──▶ 32 bytes ──Argon2id(t, m, p, salt)──▶ $argon2id$...

- **Normalisation.** NFKC before anything else (NIST SP 800-63B 5.1.1.2), so the
  same password typed on two keyboards (a full-width digit, a composed accent)
  verifies. Length is counted in code points after it.
- **Pepper.** An HMAC-SHA256 of the normalised password under the pepper, given to
  Argon2id as its password. argon2-cffi's API does not take Argon2's own secret
  input (only its raw ``argon2_context`` through cffi would), and the pre-hash
  keeps the stored string a standard PHC ``$argon2id$`` string, fixes the input
  at 32 bytes (so a long password costs what a short one does), and leaves a
  hash useless without the pepper, which never sits in the database.
- **Imported bcrypt hashes** (``$2a$``, ``$2b$``, ``$2y$``) were made without our
  pepper and without normalisation: they are checked against the password's
  UTF-8 bytes as submitted (first 72, as bcrypt always did), and a match returns
  a new Argon2id hash for the caller to store.
- **Rehash.** A stored Argon2id hash whose parameters differ from the configured
  ones verifies and returns a new hash: raising ``time_cost`` or ``memory_cost``
  upgrades every account at its next login.
- **Off the loop, bounded.** Every hash and verification runs in this hasher's
  own pool of ``hash_concurrency`` threads (argon2-cffi and bcrypt release the
  GIL). Callers beyond that wait in line, at most ``hash_queue`` of them and at
  most ``hash_wait`` seconds; past either, :class:`PasswordHashingBusy` (503
  ``SERVICE_UNAVAILABLE`` with ``Retry-After``) answers at once, so a login burst
  costs its own requests, not everyone's.
- **Unknown accounts.** :meth:`PasswordHasher.verify_dummy` verifies against a
  hash made at the configured parameters, through the same pool, so a login for
  an e-mail that has no account costs what a wrong password does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gzip
import hashlib
import hmac
import importlib.resources
import os
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, TypeVar

import bcrypt
import structlog
from argon2 import Type, extract_parameters, low_level
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import SecretStr

from bastion.errors import ConfigurationError, FieldError, InvalidInput, ServiceUnavailable
from bastion.observability.metrics import (
    IDENTITY_PASSWORD_HASH_DURATION,
    IDENTITY_PASSWORD_HASH_REJECTED,
    IDENTITY_PASSWORD_REHASHES,
)
from bastion.settings import PasswordSettings

__all__ = [
    "PasswordHasher",
    "PasswordHashingBusy",
    "PasswordPolicy",
    "PasswordVerification",
    "common_passwords",
    "normalise_password",
    "usable_cpus",
]

logger = structlog.get_logger("bastion.identity")

_T = TypeVar("_T")

MIN_PEPPER_BYTES: Final = 32
"""256 bits; ``bastion secrets check`` judges its entropy, this only its length."""
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
BCRYPT_MAX_BYTES: Final = 72
_BCRYPT_PREFIXES: Final = (b"$2a$", b"$2b$", b"$2y$")
_ARGON2ID_PREFIX: Final = b"$argon2id$"
_COMMON_RESOURCE: Final = "common-passwords.txt.gz"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, as a container limits it."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def normalise_password(password: str) -> str:
    """The form a password is hashed and measured in: Unicode NFKC (NIST SP 800-63B)."""
    return unicodedata.normalize("NFKC", password)


@functools.cache
def common_passwords() -> frozenset[str]:
    """The bundled list of common passwords, case-folded; read once, on first use.

    The list is Django's ``common-passwords.txt.gz`` (BSD licence), 20,000 passwords
    from Royce Williams' list of passwords seen in breaches.
    """
    resource = importlib.resources.files(__package__ or "bastion.identity") / _COMMON_RESOURCE
    text = gzip.decompress(resource.read_bytes()).decode()
    return frozenset(line.strip().casefold() for line in text.splitlines() if line.strip())


class PasswordHashingBusy(ServiceUnavailable):
    """Too many password hashes are waiting; answered 503 with ``Retry-After``.

    Attributes:
        retry_after: seconds the client should wait before trying again.
    """

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        seconds = max(1, round(retry_after))
        super().__init__(
            "Too many sign-ins are in progress; try again shortly.",
            headers={"Retry-After": str(seconds)},
        )


@dataclass(frozen=True, slots=True)
class PasswordVerification:
    """The outcome of :meth:`PasswordHasher.verify`.

    Attributes:
        valid: the password matches the stored hash.
        new_hash: set only when ``valid`` and the stored hash is outdated (other
            Argon2id parameters, or an imported bcrypt hash): store it in place of
            the old one.
    """

    valid: bool
    new_hash: str | None = None

    def __bool__(self) -> bool:
        return self.valid


class PasswordHasher:
    """Hashes and verifies passwords with Argon2id and a pepper, in a bounded thread pool.

    Example:
        >>> hasher = PasswordHasher.from_settings(settings.identity.passwords)
        >>> stored = await hasher.hash("correct horse battery staple")
        >>> result = await hasher.verify(stored, attempt)
        >>> if result.valid and result.new_hash:
        ...     await users.set_password_hash(user_id, result.new_hash)

    Args:
        pepper: the server-side secret (``identity.passwords.pepper``), at least 32 bytes.
        time_cost: Argon2id iterations.
        memory_cost: Argon2id memory in KiB.
        parallelism: Argon2id lanes.
        hash_concurrency: hashes computed at once, each in a worker thread;
            ``None``: the CPUs this process may use (more threads than cores only
            share them, and raise every caller's latency).
        hash_queue: callers that may wait for a worker; one more is refused at once.
        hash_wait: seconds a caller may wait for a worker before it is refused.

    Raises:
        ConfigurationError: the pepper is missing or shorter than 32 bytes.
    """

    def __init__(
        self,
        pepper: SecretStr | str | bytes | None,
        *,
        time_cost: int = 2,
        memory_cost: int = 19_456,
        parallelism: int = 1,
        hash_concurrency: int | None = None,
        hash_queue: int = 64,
        hash_wait: float = 1.0,
    ) -> None:
        self._pepper = _pepper_bytes(pepper)
        self._time_cost = time_cost
        self._memory_cost = memory_cost
        self._parallelism = parallelism
        self._concurrency = hash_concurrency or usable_cpus()
        self._queue_limit = hash_queue
        self._wait = hash_wait
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._concurrency, thread_name_prefix="bastion-passwords"
        )
        # Created on first use, so the hasher can be built outside the loop that uses it.
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._dummy: bytes | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: PasswordSettings, *, pepper: SecretStr | str | bytes | None = None
    ) -> PasswordHasher:
        """Build a hasher from ``identity.passwords``; ``pepper`` overrides the setting's."""
        return cls(
            pepper if pepper is not None else settings.pepper,
            time_cost=settings.time_cost,
            memory_cost=settings.memory_cost,
            parallelism=settings.parallelism,
            hash_concurrency=settings.hash_concurrency,
            hash_queue=settings.hash_queue,
            hash_wait=settings.hash_wait,
        )

    # --- async API: every call goes through the bounded pool -----------------------

    async def hash(self, password: str) -> str:
        """Return the Argon2id hash (a PHC string) of ``password``.

        Raises:
            PasswordHashingBusy: the pool's queue is full or the wait ran out.
        """
        return await self._run("hash", self.hash_sync, password)

    async def verify(self, stored_hash: str, password: str) -> PasswordVerification:
        """Check ``password`` against ``stored_hash`` in constant time.

        A stored hash that is not one this hasher knows is logged (without its
        content) and does not verify. When the password matches an outdated hash,
        the result carries the new hash to store.

        Raises:
            PasswordHashingBusy: the pool's queue is full or the wait ran out.
        """
        return await self._run("verify", self.verify_sync, stored_hash, password)

    async def verify_dummy(self, password: str) -> PasswordVerification:
        """Spend what a verification costs, for an account that does not exist.

        Always invalid. Call :meth:`warm_up` at start-up, else the first call also
        computes the dummy hash.

        Raises:
            PasswordHashingBusy: the pool's queue is full or the wait ran out.
        """
        if self._dummy is None:
            await self.warm_up()
        return await self._run("dummy", self._verify_dummy_sync, password)

    async def warm_up(self) -> None:
        """Compute the dummy hash now (about one hash's cost), so no login pays it."""
        if self._dummy is None:
            dummy = await self._run("hash", self.hash_sync, os.urandom(24).hex())
            self._dummy = dummy.encode("ascii")

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` is not an Argon2id hash at the configured parameters."""
        raw = stored_hash.encode("ascii", "replace")
        if not raw.startswith(_ARGON2ID_PREFIX):
            return True
        try:
            params = extract_parameters(stored_hash)
        except InvalidHashError:
            return True
        return (
            params.time_cost != self._time_cost
            or params.memory_cost != self._memory_cost
            or params.parallelism != self._parallelism
            or params.hash_len != HASH_BYTES
            or params.version != low_level.ARGON2_VERSION
        )

    async def aclose(self) -> None:
        """Stop the worker threads after the hashes in progress finish."""
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def __aenter__(self) -> PasswordHasher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def waiting(self) -> int:
        """Callers waiting for a worker now."""
        return self._waiting

    # --- sync API: for a CLI or a thread of your own, never on the event loop -------

    def hash_sync(self, password: str) -> str:
        """:meth:`hash` in the calling thread (``bastion users create`` uses it)."""
        encoded = low_level.hash_secret(
            self._peppered(password),
            os.urandom(SALT_BYTES),
            time_cost=self._time_cost,
            memory_cost=self._memory_cost,
            parallelism=self._parallelism,
            hash_len=HASH_BYTES,
            type=Type.ID,
        )
        return encoded.decode("ascii")

    def verify_sync(self, stored_hash: str, password: str) -> PasswordVerification:
        """:meth:`verify` in the calling thread."""
        raw = stored_hash.encode("ascii", "replace")
        if raw.startswith(_ARGON2ID_PREFIX):
            valid = self._verify_argon2(raw, password)
            source = "argon2id"
        elif raw.startswith(_BCRYPT_PREFIXES):
            valid = self._verify_bcrypt(raw, password)
            source = "bcrypt"
        else:
            # A corrupt or foreign column must not tell an attacker anything: it
            # fails like a wrong password, and the operator hears of it.
            logger.error("password hash format not recognised", prefix=_scheme(raw))
            return PasswordVerification(valid=False)
        if valid and self.needs_rehash(stored_hash):
            IDENTITY_PASSWORD_REHASHES.labels(source).inc()
            return PasswordVerification(valid=True, new_hash=self.hash_sync(password))
        return PasswordVerification(valid=valid)

    # --- internals ----------------------------------------------------------------

    def _peppered(self, password: str) -> bytes:
        normalised = normalise_password(password).encode("utf-8", "surrogatepass")
        return hmac.digest(self._pepper, normalised, hashlib.sha256)

    def _verify_argon2(self, raw: bytes, password: str) -> bool:
        # argon2_verify recomputes the hash and compares in constant time in C.
        try:
            return low_level.verify_secret(raw, self._peppered(password), Type.ID)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError) as exc:
            # The class only: the message may quote the stored hash.
            logger.error(  # noqa: TRY400 -- no traceback: it would quote the hash
                "password hash could not be verified", error=type(exc).__name__
            )
            return False

    def _verify_bcrypt(self, raw: bytes, password: str) -> bool:
        # Imported as made: no pepper, no normalisation, bcrypt's 72-byte cut.
        secret = password.encode("utf-8", "surrogatepass")[:BCRYPT_MAX_BYTES]
        try:
            return bcrypt.checkpw(secret, raw)  # constant-time comparison inside bcrypt
        except ValueError as exc:
            # The class only: the message may quote the stored hash.
            logger.error(  # noqa: TRY400 -- no traceback: it would quote the hash
                "password hash could not be verified", error=type(exc).__name__
            )
            return False

    def _verify_dummy_sync(self, password: str) -> PasswordVerification:
        assert self._dummy is not None  # noqa: S101 -- set by warm_up() before this runs
        self._verify_argon2(self._dummy, password)
        return PasswordVerification(valid=False)

    async def _run(self, operation: str, func: Callable[..., _T], *args: str) -> _T:
        if self._closed:
            raise RuntimeError("the password hasher is closed")
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._concurrency)
        if slots.locked():
            await self._queue(slots)
        else:
            await slots.acquire()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            future = self._executor.submit(func, *args)
        except BaseException:
            slots.release()
            raise

        # The slot is given back when the thread finishes, not when the caller stops
        # waiting: a cancelled login must not let a fifth hash start beside four.
        def _release(_: concurrent.futures.Future[_T]) -> None:
            IDENTITY_PASSWORD_HASH_DURATION.labels(operation).observe(time.perf_counter() - started)
            # The loop may have closed while the hash ran; then nothing waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(slots.release)

        future.add_done_callback(_release)
        return await asyncio.wrap_future(future)

    async def _queue(self, slots: asyncio.Semaphore) -> None:
        if self._waiting >= self._queue_limit:
            IDENTITY_PASSWORD_HASH_REJECTED.labels("queue_full").inc()
            raise PasswordHashingBusy(self._wait)
        self._waiting += 1
        try:
            async with asyncio.timeout(self._wait):
                await slots.acquire()
        except TimeoutError:
            IDENTITY_PASSWORD_HASH_REJECTED.labels("timeout").inc()
            raise PasswordHashingBusy(self._wait) from None
        finally:
            self._waiting -= 1


class PasswordPolicy:
    """What a new password must satisfy: length, and not a common or contextual one.

    No composition rules and no expiry (NIST SP 800-63B): length and a list of
    known-bad passwords are what resist guessing.

    Example:
        >>> policy = PasswordPolicy.from_settings(settings.identity.passwords)
        >>> policy.check(body.password, context=[body.email])  # raises InvalidInput

    Args:
        min_length: fewest code points, after NFKC.
        max_length: most code points, after NFKC; never below 64.
        check_common: refuse passwords from the bundled common-password list.
        field: the field named in the errors.

    Raises:
        ConfigurationError: ``max_length`` is below 64 or below ``min_length``.
    """

    def __init__(
        self,
        *,
        min_length: int = 12,
        max_length: int = 256,
        check_common: bool = True,
        field: str = "password",
    ) -> None:
        if max_length < 64:  # noqa: PLR2004 -- NIST SP 800-63B's floor, named in the message
            raise ConfigurationError(
                f"identity.passwords.max_length={max_length}: must be at least 64"
            )
        if max_length < min_length:
            raise ConfigurationError(
                f"identity.passwords.max_length={max_length} is below min_length={min_length}"
            )
        self.min_length = min_length
        self.max_length = max_length
        self.check_common = check_common
        self.field = field

    @classmethod
    def from_settings(cls, settings: PasswordSettings) -> PasswordPolicy:
        """Build the policy from ``identity.passwords``."""
        return cls(
            min_length=settings.min_length,
            max_length=settings.max_length,
            check_common=settings.check_common,
        )

    def problems(self, password: str, *, context: Iterable[str] = ()) -> list[FieldError]:
        """Return every rule ``password`` breaks (empty when it is acceptable).

        Args:
            password: the new password as submitted.
            context: values the password must not be, such as the account's e-mail
                and its local part, or the service's name (compared case-folded).
        """
        normalised = normalise_password(password)
        length = len(normalised)
        errors: list[FieldError] = []
        if length < self.min_length:
            errors.append(
                FieldError(
                    self.field,
                    "too_short",
                    f"Use at least {self.min_length} characters.",
                )
            )
        elif length > self.max_length:
            errors.append(
                FieldError(self.field, "too_long", f"Use at most {self.max_length} characters.")
            )
        folded = normalised.casefold()
        if self.check_common and folded in common_passwords():
            errors.append(
                FieldError(self.field, "common", "This password is too common; choose another.")
            )
        if _matches_context(folded, context):
            errors.append(
                FieldError(
                    self.field,
                    "matches_context",
                    "The password must not be your e-mail address or user name.",
                )
            )
        return errors

    def check(self, password: str, *, context: Iterable[str] = ()) -> None:
        """Raise unless ``password`` is acceptable; see :meth:`problems`.

        Raises:
            InvalidInput: with one :class:`FieldError` per broken rule.
        """
        errors = self.problems(password, context=context)
        if errors:
            raise InvalidInput("The password does not meet the password policy.", errors=errors)


def _matches_context(folded: str, context: Iterable[str]) -> bool:
    for value in context:
        word = normalise_password(value).strip().casefold()
        if not word:
            continue
        if folded == word:
            return True
        local, at, _ = word.partition("@")
        if at and folded == local:
            return True
    return False


def _pepper_bytes(pepper: SecretStr | str | bytes | None) -> bytes:
    if isinstance(pepper, SecretStr):
        pepper = pepper.get_secret_value()
    if isinstance(pepper, str):
        pepper = pepper.encode()
    if not pepper:
        raise ConfigurationError(
            "identity.passwords.pepper is not set: set BASTION_IDENTITY__PASSWORDS__PEPPER"
            " (at least 32 random bytes; 48 leaves a margin: `openssl rand -base64 48`)"
        )
    if len(pepper) < MIN_PEPPER_BYTES:
        raise ConfigurationError(
            f"identity.passwords.pepper is {len(pepper)} bytes: it must be at least"
            f" {MIN_PEPPER_BYTES} (256 bits)"
        )
    return pepper


def _scheme(raw: bytes) -> str:
    """The scheme of a hash (``$pbkdf2-sha256$``), never more of it, for a log line."""
    if raw.startswith(b"$"):
        end = raw.find(b"$", 1)
        if 0 < end <= 24:  # noqa: PLR2004 -- scheme names are short; anything else is data
            return raw[: end + 1].decode("ascii", "replace")
    return "unknown"
