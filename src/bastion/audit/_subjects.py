"""Data-subject keys: personal fields encrypted per subject, erasable by deleting one key.

Each data subject (``user:<id>``, ``login:<hash>``, ``anonymous:<YYYY-MM>``) has
its own random AES-256-GCM key, stored in ``bastion_audit_subject_keys`` wrapped
under a master key derived from ``audit.encryption_key``. An entry's e-mail, IP
address and user agent are sealed with its subject's key; the leaf hash covers
the ciphertext. Deleting the key row (:meth:`SubjectKeys.erase`) makes those
fields unreadable for good while every entry, and so every proof, stays intact:
crypto-shredding, the right to erasure without a hole in the log.

Formats (version byte first, so a later layout can be told apart):

- wrapped key: ``nonce (12) || AES-GCM(master, key, aad=subject)``;
- sealed field: ``0x01 || nonce (12) || AES-GCM(key, value, aad=subject 0x00 field)``;
  the associated data binds a ciphertext to its subject and field, so one copied
  into another entry's column, or another column, does not open.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, event, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bastion.audit._tables import subject_keys
from bastion.backends import BackendKind
from bastion.data import Database
from bastion.observability.metrics import AUDIT_SUBJECT_DECRYPT_FAILURES

__all__ = [
    "ANONYMOUS_SUBJECT_PREFIX",
    "MASTER_KEY_MIN_BYTES",
    "NONCE_SIZE",
    "SubjectKeys",
    "anonymous_subject",
    "seal_with",
    "subject_for_login",
    "subject_for_user",
]

MASTER_KEY_MIN_BYTES: Final = 32
ANONYMOUS_SUBJECT_PREFIX: Final = "anonymous:"

_FIELD_VERSION: Final = b"\x01"
NONCE_SIZE: Final = 12
_KEY_SIZE: Final = 32
_HKDF_INFO: Final = b"bastion-audit-subject-keys"
# Keys this session created but whose transaction has not committed: they are cached
# only once it commits, or a rolled-back key would seal entries no row can open.
_PENDING: Final = "bastion_audit_pending_subject_keys"

logger = structlog.get_logger("bastion.audit")


def subject_for_user(user_id: object) -> str:
    """The subject of a user's personal data: ``user:<id>``."""
    return f"user:{user_id}"


def subject_for_login(identifier_hash: str) -> str:
    """The subject of a login identifier that names no known user: ``login:<hash>``.

    Args:
        identifier_hash: a keyed hash of the identifier (never the identifier itself).
    """
    return f"login:{identifier_hash}"


def anonymous_subject(occurred_at: dt.datetime) -> str:
    """The subject of an event that names nobody: one key per month, ``anonymous:<YYYY-MM>``.

    Erasing a month's key shreds that month's anonymous addresses and user agents at once.
    """
    moment = occurred_at.astimezone(dt.UTC)
    return f"{ANONYMOUS_SUBJECT_PREFIX}{moment.year:04d}-{moment.month:02d}"


def derive_master_key(secret: bytes) -> bytes:
    """Return the 256-bit key-wrapping key: HKDF-SHA256 of ``audit.encryption_key``.

    Raises:
        ValueError: ``secret`` is shorter than 256 bits.
    """
    if len(secret) < MASTER_KEY_MIN_BYTES:
        raise ValueError(f"audit.encryption_key must be at least {MASTER_KEY_MIN_BYTES} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=None, info=_HKDF_INFO)
    return hkdf.derive(secret)


@dataclass(frozen=True, slots=True)
class _SubjectKey:
    key: bytes
    cipher: AESGCM

    @classmethod
    def of(cls, key: bytes) -> _SubjectKey:
        return cls(key, AESGCM(key))


class SubjectKeys:
    """Each data subject's key: created on first use, cached, and erasable.

    Args:
        database: the database of ``bastion_audit_subject_keys``; :meth:`open`,
            :meth:`open_many` and :meth:`erase` run their own short transactions on it.
        master_key: ``audit.encryption_key`` as bytes (at least 32); the wrapping
            key is derived from it with HKDF-SHA256.
        cache_ttl: seconds a key stays in this instance's memory. After an erasure
            elsewhere, this instance may still seal (and open) with the destroyed key
            for at most this long.
        clock: monotonic seconds, for the cache.

    Raises:
        ValueError: ``master_key`` is shorter than 32 bytes.

    Example:
        >>> keys = SubjectKeys(database=db, master_key=secret, cache_ttl=60)
        >>> await keys.erase("user:42")
    """

    def __init__(
        self,
        *,
        database: Database,
        master_key: bytes,
        cache_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._wrapper = AESGCM(derive_master_key(master_key))
        self._ttl = cache_ttl
        self._clock = clock
        self._cache: dict[str, tuple[_SubjectKey, float]] = {}
        self._upsert: Any = (
            postgresql_insert if database.kind is BackendKind.POSTGRES else sqlite_insert
        )

    async def keys_for(self, session: AsyncSession, subjects: Collection[str]) -> dict[str, bytes]:
        """Return the key of every subject, creating the missing ones in ``session``.

        One ``SELECT`` for the keys not cached, one ``INSERT .. ON CONFLICT DO
        NOTHING`` for those without a row, and a ``SELECT`` of the few another
        writer created first. A created key is cached only when ``session``
        commits.

        Args:
            session: the transaction the entries are appended in.
            subjects: the subjects the entries name.

        Returns:
            ``{subject: 32-byte key}`` for every subject given.
        """
        found = await self._resolve(session, subjects)
        return {subject: held.key for subject, held in found.items()}

    async def ciphers_for(
        self, session: AsyncSession, subjects: Collection[str]
    ) -> dict[str, AESGCM]:
        """:meth:`keys_for`, as ready ciphers for :func:`seal_with` (the appender's form).

        Building an ``AESGCM`` costs about as much as sealing three fields, so the
        cache keeps each subject's cipher beside its key.
        """
        found = await self._resolve(session, subjects)
        return {subject: held.cipher for subject, held in found.items()}

    def cached_ciphers(self, subjects: Collection[str]) -> dict[str, AESGCM] | None:
        """The ciphers of ``subjects`` when every one is cached and fresh, else ``None``.

        No I/O: the appender uses it to seal a batch before its transaction starts.
        """
        now = self._clock()
        found: dict[str, AESGCM] = {}
        for subject in subjects:
            cached = self._cache.get(subject)
            if cached is None or cached[1] <= now:
                return None
            found[subject] = cached[0].cipher
        return found

    async def _resolve(
        self, session: AsyncSession, subjects: Collection[str]
    ) -> dict[str, _SubjectKey]:
        now = self._clock()
        found: dict[str, _SubjectKey] = {}
        pending: dict[str, _SubjectKey] = session.info.get(_PENDING, {})
        missing: list[str] = []
        for subject in subjects:
            cached = self._cache.get(subject)
            if cached is not None and cached[1] > now:
                found[subject] = cached[0]
            elif subject in pending:
                found[subject] = pending[subject]
            else:
                missing.append(subject)
        if not missing:
            return found
        stored = await self._select(session, missing)
        for subject, held in stored.items():
            self._remember(subject, held, now)
        found.update(stored)
        absent = sorted(subject for subject in missing if subject not in stored)
        if absent:
            found.update(await self._create(session, absent))
        return found

    def seal(self, key: bytes, subject: str, field: str, value: str | None) -> bytes | None:
        """Encrypt ``value`` of ``field`` with the subject's ``key`` (``None`` stays ``None``)."""
        return seal_with(AESGCM(key), os.urandom(NONCE_SIZE), subject, field, value)

    async def open(self, subject: str | None, field: str, ciphertext: bytes | None) -> str | None:
        """Decrypt one sealed field.

        Returns:
            The plaintext; ``None`` when ``ciphertext`` is ``None``, the subject's
            key was erased, or the ciphertext does not open (tampered, or copied from
            another subject or field: counted in
            ``bastion_audit_subject_decrypt_failures_total``).
        """
        return (await self.open_many([(subject, field, ciphertext)]))[0]

    async def open_many(
        self, items: Sequence[tuple[str | None, str, bytes | None]]
    ) -> list[str | None]:
        """Decrypt many sealed fields, reading the keys not cached in one query.

        Args:
            items: ``(subject, field, ciphertext)`` triples.

        Returns:
            The plaintexts in the same order, each as :meth:`open` returns it.
        """
        now = self._clock()
        keys: dict[str, _SubjectKey] = {}
        missing: set[str] = set()
        for subject, _, ciphertext in items:
            if subject is None or ciphertext is None or subject in keys:
                continue
            cached = self._cache.get(subject)
            if cached is not None and cached[1] > now:
                keys[subject] = cached[0]
            else:
                missing.add(subject)
        if missing:
            async with self._database.session() as session:
                stored = await self._select(session, sorted(missing), lenient=True)
            for subject, held in stored.items():
                self._remember(subject, held, now)
            keys.update(stored)
        return [
            _open(keys.get(subject), subject, field, ciphertext)
            if subject is not None and ciphertext is not None
            else None
            for subject, field, ciphertext in items
        ]

    async def erase(self, subject: str) -> bool:
        """Destroy the subject's key: its sealed fields become unreadable for good.

        The entries themselves are untouched (their leaf hashes cover the
        ciphertext), so every proof still verifies. A later event of the same
        subject gets a new key.

        Returns:
            Whether the subject had a key.
        """
        self._cache.pop(subject, None)
        async with self._database.session() as session:
            result = await session.execute(
                delete(subject_keys).where(subject_keys.c.subject == subject)
            )
        # Again: a keys_for() that ran during the delete may have cached the key.
        self._cache.pop(subject, None)
        return bool(getattr(result, "rowcount", 0))

    async def _select(
        self, session: AsyncSession, subjects: Sequence[str], *, lenient: bool = False
    ) -> dict[str, _SubjectKey]:
        """The stored keys of ``subjects``, unwrapped.

        ``lenient`` is the readers' form: a key that does not unwrap (a changed
        ``audit.encryption_key``, a tampered row) is left out, so its fields read as
        unreadable, like an erased subject's, and the page around them is still served.
        """
        rows = await session.execute(
            select(subject_keys.c.subject, subject_keys.c.wrapped_key).where(
                subject_keys.c.subject.in_(subjects)
            )
        )
        found: dict[str, _SubjectKey] = {}
        for subject, wrapped in rows:
            try:
                found[subject] = _SubjectKey.of(self._unwrap(subject, wrapped))
            except (InvalidTag, ValueError):
                if not lenient:
                    raise
                AUDIT_SUBJECT_DECRYPT_FAILURES.inc()
                # The subject names a person: not logged.
                logger.warning("audit subject key does not unwrap")
        return found

    async def _create(
        self, session: AsyncSession, subjects: Sequence[str]
    ) -> dict[str, _SubjectKey]:
        created = {subject: _SubjectKey.of(os.urandom(_KEY_SIZE)) for subject in subjects}
        now = dt.datetime.now(dt.UTC)
        # Sorted rows: two writers creating overlapping subjects take the unique
        # index's locks in one order, so they queue instead of deadlocking.
        statement = (
            self._upsert(subject_keys)
            .values(
                [
                    {
                        "subject": subject,
                        "wrapped_key": self._wrap(subject, held.key),
                        "created_at": now,
                    }
                    for subject, held in created.items()
                ]
            )
            .on_conflict_do_nothing()
            .returning(subject_keys.c.subject)
        )
        inserted = set((await session.execute(statement)).scalars())
        keys = {subject: created[subject] for subject in inserted}
        lost = [subject for subject in subjects if subject not in inserted]
        if lost:
            # Another writer created these first (and committed: the insert waited on it).
            keys.update(await self._select(session, lost))
        self._hold_until_commit(session, {subject: created[subject] for subject in inserted})
        return keys

    def _hold_until_commit(self, session: AsyncSession, keys: dict[str, _SubjectKey]) -> None:
        if not keys:
            return
        pending: dict[str, _SubjectKey] | None = session.info.get(_PENDING)
        if pending is None:
            pending = session.info[_PENDING] = {}
            sync_session = session.sync_session

            def committed(committing: Any) -> None:
                if committing.get_nested_transaction() is not None:
                    # A savepoint released: the keys commit only with the outer transaction.
                    return
                now = self._clock()
                for subject, held in pending.items():
                    self._remember(subject, held, now)
                pending.clear()

            def rolled_back(_session: Any) -> None:
                pending.clear()

            event.listen(sync_session, "after_commit", committed)
            event.listen(sync_session, "after_rollback", rolled_back)
        pending.update(keys)

    def _remember(self, subject: str, held: _SubjectKey, now: float) -> None:
        self._cache[subject] = (held, now + self._ttl)

    def _wrap(self, subject: str, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._wrapper.encrypt(nonce, key, subject.encode())

    def _unwrap(self, subject: str, wrapped: bytes) -> bytes:
        # A key that does not unwrap is a wrong encryption_key or a tampered row: the
        # appender must not go on sealing with something else, so this raises.
        return self._wrapper.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], subject.encode())


def seal_with(
    cipher: AESGCM, nonce: bytes, subject: str, field: str, value: str | None
) -> bytes | None:
    """:meth:`SubjectKeys.seal` with the key's cipher and a fresh 12-byte nonce supplied.

    The appender's form: one cipher per subject and one ``os.urandom`` call per
    batch cost a third of sealing each field from scratch.
    """
    if value is None:
        return None
    return (
        _FIELD_VERSION + nonce + cipher.encrypt(nonce, value.encode(), _field_aad(subject, field))
    )


def _field_aad(subject: str, field: str) -> bytes:
    return f"{subject}\x00{field}".encode()


def _open(held: _SubjectKey | None, subject: str, field: str, ciphertext: bytes) -> str | None:
    if held is None:
        return None
    if ciphertext[:1] != _FIELD_VERSION or len(ciphertext) <= 1 + NONCE_SIZE:
        AUDIT_SUBJECT_DECRYPT_FAILURES.inc()
        return None
    nonce = ciphertext[1 : 1 + NONCE_SIZE]
    try:
        plain = held.cipher.decrypt(nonce, ciphertext[1 + NONCE_SIZE :], _field_aad(subject, field))
    except InvalidTag:
        AUDIT_SUBJECT_DECRYPT_FAILURES.inc()
        logger.warning("audit field does not decrypt", field=field)
        return None
    return plain.decode()
