"""Signing keys for access tokens: a key set with rotation overlap, and its public JWKS.

A key set is a JWKS of private JSON Web Keys, newest first: the first key signs,
every key verifies until it is removed from the set (the rotation overlap).
Each key carries its ``kid`` and its ``alg``, and the algorithm is pinned to the
key: a token is only ever checked with the algorithm its key was configured
with, so ``alg: none``, RS256-to-HS256 confusion (an HMAC keyed with a public
key's bytes) and a ``kid`` pointing at a key of another type are all refused
before any cryptography runs.

Supported: ``EdDSA`` (Ed25519, the default), ``ES256`` (P-256), ``RS256``
(2048 bits or more) and ``HS256`` (32 bytes or more; a symmetric key is never
published in the JWKS).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

import orjson
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.errors import ConfigurationError
from bastion.settings import TokenSettings

__all__ = [
    "ALGORITHMS",
    "DEV_KEY_FILENAME",
    "JWKS_MAX_AGE",
    "Algorithm",
    "KeySet",
    "SigningKey",
    "generate_jwk",
    "generate_jwks",
    "jwks_route",
    "load_or_create_dev_keys",
    "rotate_jwks",
]

logger = structlog.get_logger("bastion.identity")

Algorithm = Literal["EdDSA", "ES256", "RS256", "HS256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("EdDSA", "ES256", "RS256", "HS256")
DEV_KEY_FILENAME: Final = "signing-keys.jwks.json"
JWKS_MAX_AGE: Final = 300
"""Seconds a verifier may cache the JWKS. A new key is added to the set (as a
verify-only second key) at least this long before it starts signing."""

MIN_HMAC_BYTES: Final = 32  # RFC 7518 §3.2: a key at least as long as the hash
MIN_RSA_BITS: Final = 2048
_ES256_COORD: Final = 32

_KTY: Final[Mapping[Algorithm, str]] = {
    "EdDSA": "OKP",
    "ES256": "EC",
    "RS256": "RSA",
    "HS256": "oct",
}
_PUBLIC_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = {
    "OKP": ("crv", "x"),
    "EC": ("crv", "x", "y"),
    "RSA": ("n", "e"),
}

_SHA256: Final = hashes.SHA256()
_ECDSA_SHA256: Final = ec.ECDSA(_SHA256)
_PKCS1: Final = padding.PKCS1v15()

_PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def b64url_encode(data: bytes) -> str:
    """Encode without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode_member(jwk: Mapping[str, Any], name: str, kid: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"signing key {kid!r}: member {name!r} is missing")
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:
        raise ConfigurationError(f"signing key {kid!r}: member {name!r} is not base64url") from exc


def _int_member(jwk: Mapping[str, Any], name: str, kid: str) -> int:
    return int.from_bytes(_b64url_decode_member(jwk, name, kid), "big")


def _int_bytes(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


@dataclass(frozen=True, slots=True, eq=False)
class SigningKey:
    """One key of a :class:`KeySet`, with its algorithm pinned.

    Build one with :meth:`from_jwk`. ``can_sign`` is false for a verify-only key
    (a public JWK kept during a rotation overlap).

    Attributes:
        kid: the key id put in a token's header and looked up on verification.
        alg: the one algorithm this key signs and verifies with.
        public_jwk: the public JWK (``None`` for an HMAC key, which has no public part).
    """

    kid: str
    alg: Algorithm
    public_jwk: Mapping[str, str] | None
    _private: _PrivateKey | None = field(repr=False)
    _public: _PublicKey | None = field(repr=False)
    _secret: bytes | None = field(repr=False)

    @property
    def can_sign(self) -> bool:
        """Whether the key holds its private part (or is an HMAC secret)."""
        return self._private is not None or self._secret is not None

    def sign(self, signing_input: bytes) -> bytes:
        """Return the JWS signature of ``signing_input`` (raw ``r || s`` for ES256).

        Raises:
            ConfigurationError: the key is verify-only.
        """
        private = self._private
        if self._secret is not None:
            return hmac.digest(self._secret, signing_input, "sha256")
        if isinstance(private, Ed25519PrivateKey):
            return private.sign(signing_input)
        if isinstance(private, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(private.sign(signing_input, _ECDSA_SHA256))
            return _int_bytes(r, _ES256_COORD) + _int_bytes(s, _ES256_COORD)
        if isinstance(private, rsa.RSAPrivateKey):
            return private.sign(signing_input, _PKCS1, _SHA256)
        raise ConfigurationError(f"signing key {self.kid!r} is verify-only")

    def verify(self, signature: bytes, signing_input: bytes) -> bool:
        """Return whether ``signature`` is this key's signature of ``signing_input``."""
        public = self._public
        try:
            if self._secret is not None:
                expected = hmac.digest(self._secret, signing_input, "sha256")
                return hmac.compare_digest(expected, signature)
            if isinstance(public, Ed25519PublicKey):
                public.verify(signature, signing_input)
            elif isinstance(public, ec.EllipticCurvePublicKey):
                # JWS carries r || s, 32 bytes each (RFC 7518 §3.4), not DER.
                if len(signature) != 2 * _ES256_COORD:
                    return False
                der = encode_dss_signature(
                    int.from_bytes(signature[:_ES256_COORD], "big"),
                    int.from_bytes(signature[_ES256_COORD:], "big"),
                )
                public.verify(der, signing_input, _ECDSA_SHA256)
            elif isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, signing_input, _PKCS1, _SHA256)
            else:  # pragma: no cover - every key has a public part or a secret
                return False
        except (InvalidSignature, ValueError):
            return False
        return True

    def private_jwk(self) -> dict[str, str]:
        """Return the private JWK (to write a key file or print a generated key)."""
        jwk = dict(self.public_jwk or {"kty": "oct"})
        jwk.update({"kid": self.kid, "alg": self.alg})
        private = self._private
        if self._secret is not None:
            jwk["k"] = b64url_encode(self._secret)
        elif isinstance(private, Ed25519PrivateKey):
            jwk["d"] = b64url_encode(private.private_bytes_raw())
        elif isinstance(private, ec.EllipticCurvePrivateKey):
            jwk["d"] = b64url_encode(_int_bytes(private.private_numbers().private_value, 32))
        elif isinstance(private, rsa.RSAPrivateKey):
            numbers = private.private_numbers()
            for name, value in (
                ("d", numbers.d),
                ("p", numbers.p),
                ("q", numbers.q),
                ("dp", numbers.dmp1),
                ("dq", numbers.dmq1),
                ("qi", numbers.iqmp),
            ):
                jwk[name] = b64url_encode(_int_bytes(value))
        return jwk

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> SigningKey:
        """Build a key from a JWK, private (signs and verifies) or public (verifies).

        Raises:
            ConfigurationError: ``kid`` or ``alg`` missing, ``alg`` unsupported or not
                matching ``kty``/``crv``, a member malformed, the key too weak, or the
                private and public parts inconsistent.
        """
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ConfigurationError("a signing key has no 'kid'")
        alg = jwk.get("alg")
        if alg not in ALGORITHMS:
            raise ConfigurationError(
                f"signing key {kid!r}: 'alg' must be one of {', '.join(ALGORITHMS)}"
            )
        alg = cast("Algorithm", alg)
        kty = jwk.get("kty")
        if kty != _KTY[alg]:
            raise ConfigurationError(f"signing key {kid!r}: alg {alg} needs kty {_KTY[alg]!r}")
        try:
            return _BUILDERS[alg](jwk, kid)
        except ConfigurationError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"signing key {kid!r} is malformed or inconsistent") from exc


def _from_okp(jwk: Mapping[str, Any], kid: str) -> SigningKey:
    if jwk.get("crv") != "Ed25519":
        raise ConfigurationError(f"signing key {kid!r}: EdDSA needs crv 'Ed25519'")
    x = _b64url_decode_member(jwk, "x", kid)
    public = Ed25519PublicKey.from_public_bytes(x)
    private = None
    if "d" in jwk:
        private = Ed25519PrivateKey.from_private_bytes(_b64url_decode_member(jwk, "d", kid))
        if private.public_key().public_bytes_raw() != x:
            raise ConfigurationError(f"signing key {kid!r}: 'x' does not match 'd'")
    return SigningKey(kid, "EdDSA", _public_jwk(jwk, kid, "EdDSA"), private, public, None)


def _from_ec(jwk: Mapping[str, Any], kid: str) -> SigningKey:
    if jwk.get("crv") != "P-256":
        raise ConfigurationError(f"signing key {kid!r}: ES256 needs crv 'P-256'")
    numbers = ec.EllipticCurvePublicNumbers(
        _int_member(jwk, "x", kid), _int_member(jwk, "y", kid), ec.SECP256R1()
    )
    private = None
    if "d" in jwk:
        # cryptography checks that the point is on the curve and matches ``d``.
        private = ec.EllipticCurvePrivateNumbers(_int_member(jwk, "d", kid), numbers).private_key()
        public = private.public_key()
    else:
        public = numbers.public_key()
    return SigningKey(kid, "ES256", _public_jwk(jwk, kid, "ES256"), private, public, None)


def _from_rsa(jwk: Mapping[str, Any], kid: str) -> SigningKey:
    n, e = _int_member(jwk, "n", kid), _int_member(jwk, "e", kid)
    if n.bit_length() < MIN_RSA_BITS:
        raise ConfigurationError(f"signing key {kid!r}: RSA keys need {MIN_RSA_BITS} bits")
    public_numbers = rsa.RSAPublicNumbers(e, n)
    private = None
    if "d" in jwk:
        d = _int_member(jwk, "d", kid)
        if all(name in jwk for name in ("p", "q", "dp", "dq", "qi")):
            p, q = _int_member(jwk, "p", kid), _int_member(jwk, "q", kid)
            dmp1, dmq1 = _int_member(jwk, "dp", kid), _int_member(jwk, "dq", kid)
            iqmp = _int_member(jwk, "qi", kid)
        else:
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
            dmp1, dmq1, iqmp = (
                rsa.rsa_crt_dmp1(d, p),
                rsa.rsa_crt_dmq1(d, q),
                rsa.rsa_crt_iqmp(p, q),
            )
        private = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, public_numbers).private_key()
        public = private.public_key()
    else:
        public = public_numbers.public_key()
    return SigningKey(kid, "RS256", _public_jwk(jwk, kid, "RS256"), private, public, None)


def _from_oct(jwk: Mapping[str, Any], kid: str) -> SigningKey:
    secret = _b64url_decode_member(jwk, "k", kid)
    if len(secret) < MIN_HMAC_BYTES:
        raise ConfigurationError(
            f"signing key {kid!r}: HS256 keys need at least {MIN_HMAC_BYTES * 8} bits"
        )
    return SigningKey(kid, "HS256", None, None, None, secret)


def _public_jwk(jwk: Mapping[str, Any], kid: str, alg: Algorithm) -> dict[str, str]:
    kty = _KTY[alg]
    public = {"kty": kty, "kid": kid, "alg": alg, "use": "sig"}
    public.update({name: str(jwk[name]) for name in _PUBLIC_MEMBERS[kty]})
    return public


_BUILDERS: Final = {"EdDSA": _from_okp, "ES256": _from_ec, "RS256": _from_rsa, "HS256": _from_oct}


@dataclass(frozen=True, slots=True)
class KeySet:
    """Signing keys, newest first: the first signs, all verify.

    Example:
        >>> keys = KeySet.from_jwks(generate_jwks("EdDSA"))
        >>> keys.signing_key.alg
        'EdDSA'

    Attributes:
        keys: the keys in configuration order; the first can sign.
        signing: whether the set signs (its first key must be private); a
            verify-only set (``signing=False``) holds another issuer's public keys.
    """

    keys: tuple[SigningKey, ...]
    signing: bool = True
    _by_kid: Mapping[str, SigningKey] = field(init=False, repr=False)
    _jwks_body: bytes = field(init=False, repr=False)
    _etag: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigurationError("the signing key set is empty")
        if self.signing and not self.keys[0].can_sign:
            raise ConfigurationError(
                f"the first signing key ({self.keys[0].kid!r}) has no private part: "
                "the first key of the set signs"
            )
        by_kid: dict[str, SigningKey] = {}
        for key in self.keys:
            if key.kid in by_kid:
                raise ConfigurationError(f"two signing keys share the kid {key.kid!r}")
            by_kid[key.kid] = key
        body = orjson.dumps(self.public_jwks())
        object.__setattr__(self, "_by_kid", by_kid)
        object.__setattr__(self, "_jwks_body", body)
        object.__setattr__(self, "_etag", f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    @property
    def signing_key(self) -> SigningKey:
        """The key new tokens are signed with.

        Raises:
            ConfigurationError: the set is verify-only.
        """
        if not self.signing:
            raise ConfigurationError("this key set only verifies: it has no signing key")
        return self.keys[0]

    def get(self, kid: str) -> SigningKey | None:
        """Return the key with this ``kid``, or ``None``."""
        return self._by_kid.get(kid)

    def public_jwks(self) -> dict[str, list[dict[str, str]]]:
        """Return the public JWKS: public members only, HMAC keys left out."""
        return {"keys": [dict(key.public_jwk) for key in self.keys if key.public_jwk]}

    @property
    def jwks_body(self) -> bytes:
        """The public JWKS serialized once (what the JWKS endpoint answers)."""
        return self._jwks_body

    @property
    def etag(self) -> str:
        """A strong ETag of :attr:`jwks_body`."""
        return self._etag

    @classmethod
    def from_jwks(cls, jwks: str | bytes | Mapping[str, Any], *, signing: bool = True) -> KeySet:
        """Build a key set from a JWKS (JSON text or a parsed mapping).

        Args:
            jwks: the JWKS; with ``signing`` its first key must be a private one.
            signing: ``False`` for a verify-only set of public keys.

        Raises:
            ConfigurationError: the text is not a JWKS, or a key is invalid (the
                message names the key's ``kid``, never a key's value).
        """
        if isinstance(jwks, str | bytes):
            try:
                jwks = orjson.loads(jwks)
            except orjson.JSONDecodeError:
                raise ConfigurationError("the signing keys are not valid JSON") from None
        keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys, list) or not all(isinstance(k, Mapping) for k in keys):
            raise ConfigurationError('the signing keys must be a JWKS: {"keys": [ ... ]}')
        return cls(tuple(SigningKey.from_jwk(jwk) for jwk in keys), signing=signing)

    @classmethod
    def from_settings(
        cls,
        tokens: TokenSettings,
        *,
        environment: str = "development",
    ) -> KeySet:
        """Build the key set from ``identity.tokens`` (a ``TokenSettings``).

        With ``signing_keys`` set, those keys. Without: in production a
        :class:`ConfigurationError`; in development the key under
        ``key_directory``, generated on first use, with a warning.

        Raises:
            ConfigurationError: keys missing in production, or invalid.
        """
        secret = tokens.signing_keys
        if secret is not None:
            return cls.from_jwks(secret.get_secret_value())
        if environment == "production":
            raise ConfigurationError(
                "identity.tokens.signing_keys is not set (BASTION_IDENTITY__TOKENS__SIGNING_KEYS):"
                " production needs configured signing keys; generate one with"
                " `bastion keys generate`"
            )
        return load_or_create_dev_keys(tokens.key_directory, tokens.algorithm)


def generate_jwk(alg: Algorithm = "EdDSA", *, kid: str | None = None) -> dict[str, str]:
    """Generate a new private JWK for ``alg``.

    Args:
        alg: ``EdDSA`` (default), ``ES256``, ``RS256`` (3072 bits) or ``HS256`` (256 bits).
        kid: the key id; default: the UTC date and 8 random hex digits, so ids sort by age.

    Returns:
        The private JWK, with ``kid`` and ``alg``. It holds a secret: store it as one.
    """
    kid = kid or f"{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(4)}"
    if alg == "HS256":
        return {"kty": "oct", "kid": kid, "alg": alg, "k": b64url_encode(secrets.token_bytes(32))}
    private: _PrivateKey
    if alg == "EdDSA":
        private = Ed25519PrivateKey.generate()
        public: dict[str, str] = {
            "crv": "Ed25519",
            "x": b64url_encode(private.public_key().public_bytes_raw()),
        }
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        point = private.public_key().public_numbers()
        public = {
            "crv": "P-256",
            "x": b64url_encode(_int_bytes(point.x, 32)),
            "y": b64url_encode(_int_bytes(point.y, 32)),
        }
    elif alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        numbers = private.public_key().public_numbers()
        public = {
            "n": b64url_encode(_int_bytes(numbers.n)),
            "e": b64url_encode(_int_bytes(numbers.e)),
        }
    else:
        raise ConfigurationError(f"unsupported algorithm {alg!r}")
    key = SigningKey(kid, alg, {"kty": _KTY[alg], **public}, private, private.public_key(), None)
    return key.private_jwk()


def generate_jwks(alg: Algorithm = "EdDSA", *, kid: str | None = None) -> str:
    """Generate a one-key JWKS as JSON text, ready for ``identity.tokens.signing_keys``."""
    return orjson.dumps({"keys": [generate_jwk(alg, kid=kid)]}).decode()


def rotate_jwks(jwks: str, alg: Algorithm = "EdDSA", *, keep: int = 1) -> str:
    """Return ``jwks`` with a new key first and at most ``keep`` older keys after it."""
    current = orjson.loads(jwks)["keys"]
    return orjson.dumps({"keys": [generate_jwk(alg), *current[:keep]]}).decode()


def load_or_create_dev_keys(directory: str | os.PathLike[str], alg: Algorithm) -> KeySet:
    """Return the development key set kept under ``directory``, creating it once.

    The directory is made with mode 0700 and the file with 0600. Creation is
    atomic (written aside, then hard-linked into place), so several workers
    starting together end up with the same key. A file readable by others is
    tightened to 0600 with a warning; an existing directory open to others is
    only warned about.

    Raises:
        ConfigurationError: the directory cannot be made or the file is unreadable or invalid.
    """
    path = Path(directory)
    target = path / DEV_KEY_FILENAME
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not target.exists():
            _create_dev_key_file(target, alg)
        directory_mode = stat.S_IMODE(path.stat().st_mode)
        if directory_mode & 0o077:
            # Not tightened: the directory may be one the operator shares on purpose.
            logger.warning(
                "identity.dev_key_directory_open", path=str(path), mode=oct(directory_mode)
            )
        mode = stat.S_IMODE(target.stat().st_mode)
        if mode & 0o077:
            logger.warning("identity.dev_key_mode_tightened", path=str(target), mode=oct(mode))
            target.chmod(0o600)
        text = target.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot use the development signing key under {str(path)!r}: {exc.strerror}"
        ) from exc
    keys = KeySet.from_jwks(text)
    logger.warning(
        "identity.dev_signing_key",
        path=str(target),
        kid=keys.signing_key.kid,
        alg=keys.signing_key.alg,
        hint="set identity.tokens.signing_keys before production",
    )
    return keys


def _create_dev_key_file(target: Path, alg: Algorithm) -> None:
    staging = target.with_name(f".{target.name}.{secrets.token_hex(6)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(generate_jwks(alg).encode())
            file.flush()
            os.fsync(file.fileno())
        # link() fails if another worker won the race: keep its key, drop ours.
        with contextlib.suppress(FileExistsError):
            os.link(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def jwks_route(keys: KeySet, path: str = "/.well-known/jwks.json") -> Route:
    """Return a Starlette route answering the public JWKS.

    Answers ``Cache-Control: public, max-age=300`` and a strong ``ETag``; a
    matching ``If-None-Match`` gets ``304``.
    """
    headers = {"cache-control": f"public, max-age={JWKS_MAX_AGE}", "etag": keys.etag}

    async def jwks(request: Request) -> Response:
        if _etag_matches(request.headers.get("if-none-match"), keys.etag):
            return Response(status_code=304, headers=headers)
        return Response(keys.jwks_body, media_type="application/json", headers=headers)

    return Route(path, jwks, methods=["GET", "HEAD"], name="jwks", include_in_schema=False)


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates: Iterable[str] = (part.strip().removeprefix("W/") for part in header.split(","))
    return any(candidate in (etag, "*") for candidate in candidates)
