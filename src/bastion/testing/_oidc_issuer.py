"""A local OIDC issuer: a real HTTP server with a discovery document and a JWKS, minting tokens.

Tests point an :class:`~bastion.identity.OidcProvider` at :attr:`LocalOidcIssuer.url`
exactly as at Okta, Entra or Keycloak, mint tokens with :meth:`LocalOidcIssuer.mint`,
rotate keys, count what the provider fetched, and stop the server to make the
issuer unreachable.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

import orjson

from bastion.identity._keys import Algorithm, SigningKey, b64url_encode, generate_jwk
from bastion.testing._faults import BackgroundLoop, ServedInBackground, TcpListener
from bastion.testing._llm import (
    ProviderRequest,
    _Answer,
    _BadRequest,
    _read_request,
    _write,
)

__all__ = ["LocalOidcIssuer"]

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
JWKS_PATH: Final = "/jwks"
_MAX_HEAD: Final = 64 * 1024


class LocalOidcIssuer(ServedInBackground):
    """An OpenID Connect issuer on a local port, on its own thread and event loop.

    It answers ``GET /.well-known/openid-configuration`` and ``GET /jwks`` (with
    ``Cache-Control: public, max-age=<max_age>``), signs tokens with its newest
    key, and keeps older keys published after :meth:`rotate` until told not to.

    Example:
        >>> with LocalOidcIssuer() as issuer:
        ...     token = issuer.mint("user-1", audience="api://docs", roles=["admin"])
        ...     issuer.rotate()          # a new key signs; the old one stays published
        ...     issuer.stop()            # connections are refused from now on

    Args:
        alg: the algorithm of the first key (and of :meth:`rotate`'s by default).
        max_age: the ``max-age`` sent with both documents, seconds; ``None`` for no header.
        host: the address to listen on.
        port: the port to listen on; 0 picks a free one (kept across stop/start).
    """

    def __init__(
        self,
        *,
        alg: Algorithm = "EdDSA",
        max_age: int | None = 300,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.alg: Algorithm = alg
        self.max_age = max_age
        self.host = host
        self._port = port
        self._loop = BackgroundLoop("local-oidc-issuer")
        self._lock = threading.Lock()
        self._keys: list[SigningKey] = [SigningKey.from_jwk(generate_jwk(alg))]
        self._published_extra: list[Any] = []
        self._received: list[ProviderRequest] = []
        self._fail_status: int | None = None
        self.discovery_issuer: str | None = None
        """When set, the discovery document names this issuer instead of its own URL."""
        self.discovery_extra: dict[str, Any] = {}
        """Members to add to or change in the discovery document (``None`` removes one)."""
        self._listener = TcpListener(self._serve, limit=_MAX_HEAD)
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> LocalOidcIssuer:
        """Start serving; after a :meth:`stop` it comes back on the same port.

        Raises:
            RuntimeError: it is already running.
            OSError: the port cannot be bound.
        """
        self._loop.start()
        try:
            self._port = self._loop.run(self._listen())
        except BaseException:
            self._loop.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving and close every connection (the issuer is then unreachable)."""
        if not self._loop.running:
            return
        self._loop.run(self._close())
        self._loop.stop()

    @property
    def url(self) -> str:
        """The issuer URL, ``http://127.0.0.1:PORT`` (no trailing slash).

        Raises:
            RuntimeError: the port is not known yet (free port, never started).
        """
        if self._port == 0:
            raise RuntimeError("LocalOidcIssuer has no port yet: call start() first")
        return f"http://{self.host}:{self._port}"

    # -- keys and tokens -------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        """The key :meth:`mint` signs with (the newest)."""
        with self._lock:
            return self._keys[0]

    def rotate(self, alg: Algorithm | None = None, *, keep: int = 1) -> SigningKey:
        """Make a new key the signing key; keep publishing ``keep`` older ones.

        Returns:
            The new key.
        """
        key = SigningKey.from_jwk(generate_jwk(alg or self.alg))
        with self._lock:
            self._keys = [key, *self._keys[:keep]]
        return key

    def publish(self, jwk: Any) -> None:
        """Publish one more JWKS entry as given: an encryption key, a key without ``alg``, junk."""
        with self._lock:
            self._published_extra.append(dict(jwk) if isinstance(jwk, Mapping) else jwk)

    def jwks(self) -> dict[str, list[Any]]:
        """The JWKS served now."""
        with self._lock:
            keys: list[Any] = [dict(k.public_jwk or {}) for k in self._keys]
            return {"keys": [*keys, *self._published_extra]}

    def mint(
        self,
        subject: str = "user-1",
        *,
        audience: str | list[str] = "bastion",
        expires_in: float = 300.0,
        issuer: str | None = None,
        key: SigningKey | None = None,
        header: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """Return a signed token (compact JWS) for ``subject``.

        Args:
            subject: ``sub``.
            audience: ``aud``.
            expires_in: seconds from now to ``exp`` (negative: already expired).
            issuer: ``iss``; default: this issuer's URL.
            key: the key to sign with; default: the newest.
            header: header members to add or override (``{"alg": "none"}``...);
                a member set to ``None`` is removed.
            claims: more claims (``roles=[...]``, ``tenant="t-1"``); ``None`` removes one.
        """
        key = key or self.signing_key
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": issuer or self.url,
            "aud": audience,
            "sub": subject,
            "iat": now,
            "exp": now + int(expires_in),
            "jti": str(uuid.uuid4()),
        }
        body.update(claims)
        head: dict[str, Any] = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
        head.update(header or {})
        head = {k: v for k, v in head.items() if v is not None}
        body = {k: v for k, v in body.items() if v is not None}
        signing_input = f"{b64url_encode(orjson.dumps(head))}.{b64url_encode(orjson.dumps(body))}"
        signature = key.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url_encode(signature)}"

    # -- what it received and how it answers -----------------------------------------

    def fail_with(self, status: int | None) -> None:
        """Answer every request with ``status`` (``None``: answer normally again)."""
        with self._lock:
            self._fail_status = status

    def count(self, path: str | None = None) -> int:
        """How many requests arrived, on ``path`` or on any path."""
        with self._lock:
            return sum(1 for r in self._received if path is None or r.path == path)

    @property
    def jwks_fetches(self) -> int:
        """How many times the JWKS was asked for."""
        return self.count(JWKS_PATH)

    @property
    def discovery_fetches(self) -> int:
        """How many times the discovery document was asked for."""
        return self.count(DISCOVERY_PATH)

    # -- the server ----------------------------------------------------------------

    async def _listen(self) -> int:
        return self._listener.open(self.host, self._port)

    async def _close(self) -> None:
        self._listener.shutdown()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest:
                    return
                if request is None:
                    return
                with self._lock:
                    self._received.append(request)
                keep_alive = request.headers.get("connection", "").lower() != "close"
                await _write(writer, self._answer(request), keep_alive=keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(self, request: ProviderRequest) -> _Answer:
        with self._lock:
            status = self._fail_status
        if status is not None:
            return _Answer(status, b'{"error": "failing on purpose"}')
        if request.method != "GET":
            return _Answer(405, b'{"error": "GET only"}')
        cache = (
            () if self.max_age is None else (("Cache-Control", f"public, max-age={self.max_age}"),)
        )
        if request.path == DISCOVERY_PATH:
            document = {
                "issuer": self.discovery_issuer or self.url,
                "jwks_uri": self.url + JWKS_PATH,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["EdDSA", "ES256", "RS256"],
            }
            document.update(self.discovery_extra)
            document = {k: v for k, v in document.items() if v is not None}
            return _Answer(200, orjson.dumps(document), headers=cache)
        if request.path == JWKS_PATH:
            return _Answer(200, orjson.dumps(self.jwks()), headers=cache)
        return _Answer(404, b'{"error": "not found"}')
