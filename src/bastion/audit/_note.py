r"""Signed notes: text signed with Ed25519 keys, in the C2SP signed-note format.

The format of ``golang.org/x/mod/sumdb/note`` (C2SP ``signed-note``), so Go's
tooling and other transparency-log clients read bastion's checkpoints. A note is
UTF-8 text ending in a newline, a blank line, then one line per signature::

    <text>\n
    \n
    — <key name> <base64(key hash (4 bytes, big-endian) || Ed25519 signature)>\n

Keys are text. A verifier key is ``<name>+<hash>+<base64(0x01 || public key)>``;
a signer key is ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 || 32-byte seed)>``;
``<hash>`` is eight hex digits, the first four bytes of
``SHA-256(name || "\n" || 0x01 || public key)`` (``0x01`` names Ed25519).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "generate_signing_key",
    "open_note",
]

_ALG_ED25519: Final = b"\x01"
_KEY_SIZE: Final = 32
_SIGNATURE_SIZE: Final = 64
_KEY_HASH_SIZE: Final = 4
_SIGNATURE_PREFIX: Final = "\u2014 "  # em dash, space
_PRIVATE_PREFIX: Final = "PRIVATE+KEY+"
# The Go package gives up on notes with more signatures than this, to bound the work.
MAX_SIGNATURES: Final = 100
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
# Control characters other than newline make a note malformed (the Go package's rule).
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


class NoteError(ValueError):
    """A signed note or a note key is malformed, or a note's signatures do not verify."""


def _valid_name(name: str) -> bool:
    # Go's rule: non-empty, no Unicode space, no plus.
    return bool(name) and "+" not in name and not any(char.isspace() for char in name)


def _key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ALG_ED25519 + public_key).digest()[
        :_KEY_HASH_SIZE
    ]


def _decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError("malformed base64 in a note key or signature") from exc


def _split_key(text: str, parts: int) -> list[str]:
    fields = text.split("+", parts - 1)
    if len(fields) != parts:
        raise NoteError("malformed note key: expected '+'-separated name, hash and key")
    return fields


def _parse_key(name: str, hash_hex: str, encoded: str) -> tuple[bytes, bytes]:
    """Return (key hash, key without its algorithm byte), checking name, hash and algorithm."""
    if not _valid_name(name):
        raise NoteError("malformed note key: the name is empty or has a space or '+'")
    if not _HEX8.fullmatch(hash_hex):
        raise NoteError("malformed note key: the key hash is not eight hex digits")
    key = _decode(encoded)
    if key[:1] != _ALG_ED25519:
        raise NoteError("unknown note key algorithm (only Ed25519, 0x01, is known)")
    if len(key) != 1 + _KEY_SIZE:
        raise NoteError(f"malformed note key: an Ed25519 key is {_KEY_SIZE} bytes")
    return bytes.fromhex(hash_hex), key[1:]


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """The public half of a note key: checks signatures by one named Ed25519 key.

    Attributes:
        name: the key's name (for checkpoints, the log's origin by convention).
        key_hash: the four bytes that identify the key in signature lines.
        public_key: the raw 32-byte Ed25519 public key.
    """

    name: str
    key_hash: bytes
    public_key: bytes = field(repr=False)

    @classmethod
    def from_text(cls, text: str) -> NoteVerifier:
        """Parse a verifier key ``<name>+<hash>+<base64(0x01 || public key)>``.

        Args:
            text: the verifier key, as :meth:`text` writes it.

        Returns:
            The verifier.

        Raises:
            NoteError: the text is malformed, names another algorithm, or its
                hash does not match its name and key.
        """
        name, hash_hex, encoded = _split_key(text, 3)
        key_hash, public_key = _parse_key(name, hash_hex, encoded)
        if key_hash != _key_hash(name, public_key):
            raise NoteError("the note key's hash does not match its name and key")
        return cls(name, key_hash, public_key)

    def text(self) -> str:
        """Return the verifier key text that :meth:`from_text` reads."""
        encoded = base64.b64encode(_ALG_ED25519 + self.public_key).decode()
        return f"{self.name}+{self.key_hash.hex()}+{encoded}"

    @property
    def key_id(self) -> str:
        """The key's name and hash, ``<name>+<hash>``: what identifies it in logs and reports."""
        return f"{self.name}+{self.key_hash.hex()}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class NoteSigner:
    """A note key that signs: a name and an Ed25519 private key.

    Attributes:
        name: the key's name; it is on every signature line.
        key_hash: the four bytes that identify the key in signature lines.
        seed: the 32-byte Ed25519 private key seed (never in ``repr``).
    """

    name: str
    key_hash: bytes
    seed: bytes = field(repr=False)

    @classmethod
    def from_private(cls, text: str) -> NoteSigner:
        """Parse a signer key ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>``.

        Args:
            text: the private key, as :meth:`private_text` writes it.

        Returns:
            The signer.

        Raises:
            NoteError: the text is malformed, names another algorithm, or its
                hash does not match its name and public key.
        """
        if not text.startswith(_PRIVATE_PREFIX):
            raise NoteError("malformed note signer key: it starts with PRIVATE+KEY+")
        name, hash_hex, encoded = _split_key(text.removeprefix(_PRIVATE_PREFIX), 3)
        key_hash, seed = _parse_key(name, hash_hex, encoded)
        signer = cls(name, key_hash, seed)
        if key_hash != _key_hash(name, signer.verifier().public_key):
            raise NoteError("the note signer key's hash does not match its name and key")
        return signer

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        """Return a new signer with a random Ed25519 key.

        Raises:
            NoteError: ``name`` is empty or has a space or ``+``.
        """
        if not _valid_name(name):
            raise NoteError("a note key name is non-empty, without spaces or '+'")
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        public_key = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        return cls(name, _key_hash(name, public_key), seed)

    def private_text(self) -> str:
        """Return the signer key text that :meth:`from_private` reads (a secret)."""
        encoded = base64.b64encode(_ALG_ED25519 + self.seed).decode()
        return f"{_PRIVATE_PREFIX}{self.name}+{self.key_hash.hex()}+{encoded}"

    def verifier(self) -> NoteVerifier:
        """Return the public half of this key."""
        public_key = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return NoteVerifier(self.name, self.key_hash, public_key.public_bytes_raw())

    def sign(self, body: str) -> str:
        """Sign ``body`` and return the whole signed note.

        Args:
            body: the note text: UTF-8, ending in a newline, no control characters
                but newlines, no blank line at its end.

        Returns:
            ``body``, a blank line and this key's signature line.

        Raises:
            NoteError: the body breaks the format's rules.
        """
        _check_text(body)
        if not body.endswith("\n") or body.endswith("\n\n"):
            raise NoteError("a note's text ends with one newline")
        raw = Ed25519PrivateKey.from_private_bytes(self.seed).sign(body.encode())
        signature = base64.b64encode(self.key_hash + raw).decode()
        return f"{body}\n{_SIGNATURE_PREFIX}{self.name} {signature}\n"


def _check_text(text: str) -> None:
    if _CONTROL.search(text):
        raise NoteError("malformed note: a control character other than newline")
    try:
        text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: not UTF-8
        raise NoteError("malformed note: not valid UTF-8") from exc


def generate_signing_key(name: str) -> tuple[str, str]:
    """Make a new checkpoint signing key (what ``bastion audit keygen`` prints).

    Args:
        name: the key's name; by convention the log origin (``audit.origin``).

    Returns:
        ``(private key text, verifier key text)``: the first goes in
        ``BASTION_AUDIT__SIGNING_KEYS`` (a secret), the second to whoever verifies.

    Raises:
        NoteError: ``name`` is empty or has a space or ``+``.

    Example:
        >>> private, public = generate_signing_key("audit.example.com")
        >>> private.startswith("PRIVATE+KEY+audit.example.com+")
        True
    """
    signer = NoteSigner.generate(name)
    return signer.private_text(), signer.verifier().text()


def _index(verifiers: Iterable[NoteVerifier]) -> dict[tuple[str, bytes], NoteVerifier]:
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        other = known.setdefault((verifier.name, verifier.key_hash), verifier)
        if other.public_key != verifier.public_key:
            # Two keys with one name and hash: whoever controls the list is hostile or
            # confused, and no signature by either can be attributed.
            raise NoteError(f"ambiguous note key {verifier.key_id}")
    return known


def open_note(note: str, verifiers: Sequence[NoteVerifier]) -> tuple[str, list[NoteVerifier]]:
    """Check a signed note's signatures and return its text.

    Signatures by keys not in ``verifiers`` are ignored (a note may carry a
    witness's cosignature); repeated signatures by one key count once.

    Args:
        note: the signed note.
        verifiers: the trusted keys.

    Returns:
        ``(text, keys)``: the text (ending in a newline, without the blank line)
        and the trusted keys whose signatures verified, in signature order.

    Raises:
        NoteError: the note is malformed, a trusted key's signature does not
            verify, or no trusted key signed it.
    """
    _check_text(note)
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise NoteError("malformed note: the signatures do not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    known = _index(verifiers)
    verified: list[NoteVerifier] = []
    message = text.encode()
    for line in lines:
        if not line.startswith(_SIGNATURE_PREFIX):
            raise NoteError("malformed note: a signature line starts with an em dash and a space")
        name, _, encoded = line.removeprefix(_SIGNATURE_PREFIX).partition(" ")
        if not _valid_name(name) or not encoded:
            raise NoteError("malformed note: a signature line names no valid key")
        signature = _decode(encoded)
        if len(signature) <= _KEY_HASH_SIZE:
            raise NoteError("malformed note: a signature is too short")
        verifier = known.get((name, signature[:_KEY_HASH_SIZE]))
        if verifier is None or verifier in verified:
            continue
        if len(signature) != _KEY_HASH_SIZE + _SIGNATURE_SIZE or not verifier.verify(
            message, signature[4:]
        ):
            raise NoteError(f"invalid signature for note key {verifier.key_id}")
        verified.append(verifier)
    if not verified:
        raise NoteError("the note has no signature by a trusted key")
    return text, verified
