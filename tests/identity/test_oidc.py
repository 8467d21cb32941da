"""External OIDC issuers: a local issuer's tokens verified over real HTTP; keys cached, rotated."""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
import time
from datetime import timedelta

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import REGISTRY

from bastion.context import RequestContext, bind, unbind
from bastion.errors import ConfigurationError, ErrorCode
from bastion.identity._keys import SigningKey, b64url_encode, generate_jwk
from bastion.identity._oidc import ClaimMapping, OidcProvider, OidcUnavailable
from bastion.identity._principal import Principal
from bastion.identity._tokens import InvalidToken
from bastion.resilience import Resilience, use_resilience
from bastion.settings import ResilienceSettings
from bastion.testing._oidc_issuer import LocalOidcIssuer

AUDIENCE = "api://docs"


class _FromNow:
    """A claim time relative to when the test runs, not to when pytest collected it."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def epoch(self) -> int:
        return int(time.time()) + self.seconds

    def __repr__(self) -> str:
        return f"now+{self.seconds}s"


# One attempt, short timeouts, a circuit that never opens: each fetch is one request.
FAST = {
    "timeout": 2.0,
    "total_timeout": 3.0,
    "retries": 0,
    "consecutive_failures": 0,
    "minimum_calls": 1000,
}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def issuer():
    with LocalOidcIssuer() as server:
        yield server


@pytest.fixture
def dependency() -> str:
    """A dependency name of this test's own, so its pipeline and metrics are its own."""
    name = f"oidc-{secrets.token_hex(3)}"
    use_resilience(Resilience(ResilienceSettings(dependencies={name: FAST})))
    yield name
    use_resilience(None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make(issuer, dependency, clock):
    """Build providers against the local issuer; all closed at the end."""
    made: list[OidcProvider] = []

    def build(**kwargs) -> OidcProvider:
        kwargs.setdefault("audience", AUDIENCE)
        provider = OidcProvider(
            kwargs.pop("issuer_url", issuer.url),
            dependency=dependency,
            name=dependency,
            clock=clock,
            **kwargs,
        )
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.aclose()


def fetches(name: str, document: str, outcome: str) -> float:
    labels = {"provider": name, "document": document, "outcome": outcome}
    return REGISTRY.get_sample_value("bastion_identity_oidc_fetches_total", labels) or 0.0


def forge(header: dict, claims: dict, signature: bytes = b"sig") -> str:
    head = b64url_encode(orjson.dumps(header))
    body = b64url_encode(orjson.dumps(claims))
    return f"{head}.{body}.{b64url_encode(signature)}"


def claims_for(issuer: LocalOidcIssuer, **extra) -> dict:
    now = int(time.time())
    return {"iss": issuer.url, "aud": AUDIENCE, "sub": "u-1", "iat": now, "exp": now + 300, **extra}


class TestVerification:
    async def test_valid_token_maps_to_principal(self, issuer, make):
        """A token of the issuer maps to the principal, its tenant claim and its mapped roles."""
        provider = make(
            mapping=ClaimMapping(
                tenant_claim="org",
                roles_claim="groups",
                role_map={"docs-admins": ["admin"], "staff": ["member", "viewer"]},
            )
        )
        token = issuer.mint(
            "user-42", audience=AUDIENCE, org="tenant-a", groups=["docs-admins", "staff", "x"]
        )
        principal = await provider.authenticate(token)
        expected = Principal(
            "user-42",
            kind="user",
            tenant_id="tenant-a",
            roles=frozenset({"admin", "member", "viewer"}),
            issuer=issuer.url,
        )
        assert expected == principal

    async def test_verify_returns_claims(self, issuer, make):
        """verify() returns the issuer, raw subject, audience and every claim as sent."""
        provider = make()
        token = issuer.mint("user-1", audience=["other", AUDIENCE], roles=["admin"], email="a@b")
        verified = await provider.verify(token)
        assert issuer.url == verified.issuer
        assert "user-1" == verified.subject
        assert ("other", AUDIENCE) == verified.audience
        assert "a@b" == verified.claims["email"]
        assert frozenset({"admin"}) == verified.principal.roles

    @pytest.mark.parametrize(
        ("change", "expired"),
        [
            ({"issuer": "http://127.0.0.1:1/other"}, False),
            ({"audience": "api://someone-else"}, False),
            ({"audience": ["a", "b"]}, False),
            ({"expires_in": -120}, True),
            ({"nbf": _FromNow(600)}, False),
            ({"iat": _FromNow(600)}, False),
            ({"exp": None}, False),
            ({"exp": True}, False),
            ({"sub": None}, False),
        ],
        ids=[
            "wrong-issuer",
            "wrong-audience",
            "audience-list-without-ours",
            "expired",
            "not-yet-valid",
            "issued-in-future",
            "no-exp",
            "boolean-exp",
            "no-sub",
        ],
    )
    async def test_bad_claims_refused_401(self, issuer, make, change, expired):
        """Wrong issuer or audience, expired, not yet valid or malformed claims answer 401."""
        provider = make()
        resolved = {k: v.epoch() if isinstance(v, _FromNow) else v for k, v in change.items()}
        kwargs = {"audience": AUDIENCE, **resolved}
        subject = "user-1"
        if "sub" in kwargs:
            subject = kwargs.pop("sub")
        token = issuer.mint(subject, **kwargs)
        with pytest.raises(InvalidToken) as caught:
            await provider.verify(token)
        assert 401 == caught.value.status
        assert ErrorCode.UNAUTHENTICATED == caught.value.code
        assert expired == caught.value.expired
        assert "invalid_token" in caught.value.headers["www-authenticate"]

    async def test_expiry_within_leeway_accepted(self, issuer, make):
        """A token expired less than the leeway ago still verifies (clock skew)."""
        provider = make(leeway=30)
        token = issuer.mint(audience=AUDIENCE, expires_in=-10)
        assert "user-1" == (await provider.authenticate(token)).subject

    @pytest.mark.parametrize("typ", ["JWT", "at+jwt", "application/at+jwt", None])
    async def test_typ_optional(self, issuer, make, typ):
        """``typ`` may be missing or name a JWT or an access token."""
        provider = make()
        token = issuer.mint(audience=AUDIENCE, header={"typ": typ})
        assert "user-1" == (await provider.authenticate(token)).subject

    @pytest.mark.parametrize("typ", ["logout+jwt", "secevent+jwt", 1])
    async def test_other_typ_refused(self, issuer, make, typ):
        """A logout or event token of the same issuer is not an access token."""
        provider = make()
        with pytest.raises(InvalidToken):
            await provider.verify(issuer.mint(audience=AUDIENCE, header={"typ": typ}))

    async def test_x5t_header_allowed(self, issuer, make):
        """``x5t`` beside ``kid`` (Entra's tokens) is ignored, not refused."""
        provider = make()
        token = issuer.mint(audience=AUDIENCE, header={"x5t": "abc"})
        assert "user-1" == (await provider.authenticate(token)).subject

    @pytest.mark.parametrize(
        "garbage",
        [
            "",
            "a.b",
            "a.b.c.d",
            "a.b.",
            "###.###.###",
            "x" * 20000,
            b"\xff.\xfe.\xfd",
            "e30.e30.e30",
        ],
    )
    async def test_garbage_refused_without_fetching(self, issuer, make, garbage):
        """Malformed input is refused 401 before the issuer is contacted."""
        provider = make()
        with pytest.raises(InvalidToken):
            await provider.verify(garbage)
        assert 0 == issuer.count()

    async def test_tampered_signature_refused(self, issuer, make):
        """A token whose claims were changed after signing is refused."""
        provider = make()
        head, _, sig = issuer.mint(audience=AUDIENCE).split(".")
        body = b64url_encode(orjson.dumps(claims_for(issuer, sub="admin")))
        with pytest.raises(InvalidToken):
            await provider.verify(f"{head}.{body}.{sig}")


class TestClaimMapping:
    async def test_fixed_tenant(self, issuer, make):
        """With a fixed tenant, every principal of the issuer acts for it."""
        provider = make(mapping=ClaimMapping(tenant="tenant-fixed"))
        principal = await provider.authenticate(issuer.mint(audience=AUDIENCE))
        assert "tenant-fixed" == principal.tenant_id

    async def test_tenant_claim_missing_refused(self, issuer, make):
        """A configured tenant claim missing from the token, with no default, is refused."""
        provider = make(mapping=ClaimMapping(tenant_claim="org"))
        with pytest.raises(InvalidToken):
            await provider.verify(issuer.mint(audience=AUDIENCE))

    async def test_tenant_claim_default(self, issuer, make):
        """A missing tenant claim falls back to ``tenant`` when one is given."""
        provider = make(mapping=ClaimMapping(tenant_claim="org", tenant="t-default"))
        principal = await provider.authenticate(issuer.mint(audience=AUDIENCE))
        assert "t-default" == principal.tenant_id

    async def test_no_tenant_mapping(self, issuer, make):
        """Without tenant mapping the principal names no tenant."""
        principal = await make().authenticate(issuer.mint(audience=AUDIENCE))
        assert principal.tenant_id is None

    def test_nested_roles_path(self):
        """``realm_access.roles`` reads Keycloak's nested claim."""
        mapping = ClaimMapping(roles_claim="realm_access.roles")
        claims = {"realm_access": {"roles": ["admin", 3, "member"]}}
        assert frozenset({"admin", "member"}) == mapping.roles(claims)

    def test_exact_key_with_dots_wins(self):
        """A claim whose key has dots (Auth0 namespaced claims) is read as that key."""
        mapping = ClaimMapping(roles_claim="https://example.com/roles")
        claims = {"https://example.com/roles": ["owner"]}
        assert frozenset({"owner"}) == mapping.roles(claims)

    def test_space_separated_scope(self):
        """A string value is split on spaces (``scope``, ``scp``)."""
        assert frozenset({"read", "write"}) == ClaimMapping(roles_claim="scp").roles(
            {"scp": "read write"}
        )

    def test_odd_roles_ignored(self):
        """A roles claim of another type, or missing, gives no roles."""
        mapping = ClaimMapping()
        assert frozenset() == mapping.roles({"roles": {"admin": True}})
        assert frozenset() == mapping.roles({})
        assert frozenset() == ClaimMapping(roles_claim=None).roles({"roles": ["a"]})

    def test_subject_prefix_and_numeric_tenant(self):
        """The subject gets the prefix; a numeric tenant id becomes a string."""
        mapping = ClaimMapping(subject_prefix="okta:", tenant_claim="org")
        assert "okta:u" == mapping.subject({"sub": "u"})
        assert "42" == mapping.tenant_of({"org": 42})


class TestAlgorithms:
    async def test_alg_none_refused(self, issuer, make):
        """``alg: none`` with an empty or any signature is refused before any fetch."""
        provider = make()
        kid = issuer.signing_key.kid
        token = forge({"alg": "none", "kid": kid}, claims_for(issuer))
        with pytest.raises(InvalidToken):
            await provider.verify(token)
        assert 0 == issuer.count()

    async def test_hmac_with_public_key_refused(self, dependency, make, clock):
        """RS256-to-HS256 confusion: an HMAC keyed with the RSA public key is refused."""
        with LocalOidcIssuer(alg="RS256") as rs_issuer:
            provider = make(issuer_url=rs_issuer.url)
            key = rs_issuer.signing_key
            await provider.authenticate(rs_issuer.mint(audience=AUDIENCE))  # keys are cached
            public = SigningKey.from_jwk(key.public_jwk)
            pem = public._public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            header = {"alg": "HS256", "kid": key.kid, "typ": "JWT"}
            head = b64url_encode(orjson.dumps(header))
            body = b64url_encode(orjson.dumps(claims_for(rs_issuer)))
            mac = hmac.digest(pem, f"{head}.{body}".encode(), "sha256")
            with pytest.raises(InvalidToken):
                await provider.verify(f"{head}.{body}.{b64url_encode(mac)}")

    async def test_alg_other_than_key_refused(self, issuer, make):
        """A header naming ES256 for an EdDSA key is refused even when ES256 is accepted."""
        provider = make(algorithms=["EdDSA", "ES256"])
        key = issuer.signing_key
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        _, body, sig = issuer.mint(audience=AUDIENCE).split(".")
        header = {"alg": "ES256", "kid": key.kid}
        with pytest.raises(InvalidToken):
            await provider.verify(f"{b64url_encode(orjson.dumps(header))}.{body}.{sig}")

    @pytest.mark.parametrize(
        "member",
        [
            {"jku": "https://evil.example/jwks"},
            {"jwk": {"kty": "OKP"}},
            {"x5u": "https://evil.example/cert"},
            {"x5c": ["MIIB"]},
            {"crit": ["exp"]},
        ],
        ids=["jku", "jwk", "x5u", "x5c", "crit"],
    )
    async def test_header_pointing_at_own_key_refused(self, issuer, make, member):
        """A header that brings or points at its own key, or demands extensions, is refused."""
        provider = make()
        with pytest.raises(InvalidToken):
            await provider.verify(issuer.mint(audience=AUDIENCE, header=member))

    def test_hmac_and_none_not_configurable(self, issuer):
        """HS256 and ``none`` cannot be accepted from an external issuer."""
        for algorithms in (["HS256"], ["none"], []):
            with pytest.raises(ConfigurationError):
                OidcProvider(issuer.url, audience=AUDIENCE, algorithms=algorithms)

    async def test_key_without_alg_inferred_from_curve(self, issuer, make):
        """An EC P-256 key published without ``alg`` verifies ES256 tokens."""
        jwk = generate_jwk("ES256", kid="no-alg")
        key = SigningKey.from_jwk(jwk)
        public = {k: v for k, v in key.public_jwk.items() if k != "alg"}
        issuer.publish(public)
        provider = make()
        token = issuer.mint(audience=AUDIENCE, key=key)
        assert "user-1" == (await provider.authenticate(token)).subject

    async def test_rsa_without_alg_ambiguous_skipped(self, issuer, make, clock):
        """An RSA key without ``alg`` is skipped when two RSA algorithms are accepted."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer.publish(_rsa_jwk(private, "rsa-no-alg"))
        provider = make(algorithms=["EdDSA", "RS256", "PS256"])
        await provider.authenticate(issuer.mint(audience=AUDIENCE))  # the EdDSA key works
        token = _sign_rsa(private, "rsa-no-alg", "PS256", claims_for(issuer))
        clock.advance(120)
        with pytest.raises(InvalidToken):
            await provider.verify(token)

    @pytest.mark.parametrize("alg", ["PS256", "RS384", "PS512"])
    async def test_other_rsa_algorithms(self, issuer, make, alg):
        """PS256, RS384 and PS512 keys published with their ``alg`` verify when accepted."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer.publish({**_rsa_jwk(private, f"k-{alg}"), "alg": alg})
        provider = make(algorithms=[alg])
        token = _sign_rsa(private, f"k-{alg}", alg, claims_for(issuer))
        assert "u-1" == (await provider.authenticate(token)).subject
        # The same key refuses another padding or hash than its pinned one.
        other = "RS256" if alg.startswith("PS") else "PS256"
        forged = _sign_rsa(private, f"k-{alg}", other, claims_for(issuer), header_alg=alg)
        with pytest.raises(InvalidToken):
            await provider.verify(forged)

    async def test_rsa_without_alg_takes_the_one_rsa_algorithm(self, issuer, make):
        """With RS256 the only RSA algorithm accepted, an RSA key without ``alg`` (Entra) works."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer.publish(_rsa_jwk(private, "entra-like"))
        provider = make()
        token = _sign_rsa(private, "entra-like", "RS256", claims_for(issuer))
        assert "u-1" == (await provider.authenticate(token)).subject

    async def test_small_rsa_key_skipped(self, issuer, make, clock):
        """An RSA key under 2048 bits is not used."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - weak on purpose
        issuer.publish({**_rsa_jwk(private, "weak"), "alg": "PS256"})
        provider = make(algorithms=["EdDSA", "PS256"])
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        with pytest.raises(InvalidToken):
            await provider.verify(_sign_rsa(private, "weak", "PS256", claims_for(issuer)))

    async def test_es384(self, issuer, make):
        """A P-384 key verifies ES384 tokens (alg inferred from the curve)."""
        private = ec.generate_private_key(ec.SECP384R1())
        point = private.public_key().public_numbers()
        issuer.publish(
            {
                "kty": "EC",
                "crv": "P-384",
                "kid": "p384",
                "x": b64url_encode(point.x.to_bytes(48, "big")),
                "y": b64url_encode(point.y.to_bytes(48, "big")),
            }
        )
        provider = make(algorithms=["EdDSA", "ES384"])
        head = b64url_encode(orjson.dumps({"alg": "ES384", "kid": "p384"}))
        body = b64url_encode(orjson.dumps(claims_for(issuer)))
        r, s = decode_dss_signature(
            private.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA384()))
        )
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        token = f"{head}.{body}.{b64url_encode(signature)}"
        assert "u-1" == (await provider.authenticate(token)).subject
        with pytest.raises(InvalidToken):
            await provider.verify(f"{head}.{body}.{b64url_encode(signature[:-1])}")

    async def test_encryption_and_odd_keys_ignored(self, issuer, make):
        """Encryption keys, HMAC keys and malformed entries in the JWKS are skipped, not fatal."""
        issuer.publish({"kty": "RSA", "use": "enc", "kid": "enc-1", "alg": "RSA-OAEP", "n": "x"})
        issuer.publish({"kty": "oct", "kid": "hmac", "alg": "HS256", "k": "c2VjcmV0"})
        issuer.publish({"kty": "OKP", "crv": "Ed25519", "kid": "bad", "alg": "EdDSA", "x": "!!"})
        issuer.publish("not an object")
        provider = make()
        assert "user-1" == (await provider.authenticate(issuer.mint(audience=AUDIENCE))).subject

    async def test_token_without_kid_uses_only_key(self, issuer, make):
        """A token without ``kid`` verifies when the issuer publishes exactly one key."""
        provider = make()
        token = issuer.mint(audience=AUDIENCE, header={"kid": None})
        assert "user-1" == (await provider.authenticate(token)).subject
        issuer.rotate()
        provider2 = make()
        with pytest.raises(InvalidToken):
            await provider2.verify(issuer.mint(audience=AUDIENCE, header={"kid": None}))


def _rsa_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict:
    numbers = private.public_key().public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "n": b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64url_encode(numbers.e.to_bytes(3, "big")),
    }


def _sign_rsa(private, kid, alg, claims, *, header_alg=None) -> str:
    head = b64url_encode(orjson.dumps({"alg": header_alg or alg, "kid": kid}))
    body = b64url_encode(orjson.dumps(claims))
    digest = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}[alg[2:]]()
    if alg.startswith("PS"):
        pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    else:
        pad = padding.PKCS1v15()
    signature = private.sign(f"{head}.{body}".encode(), pad, digest)
    return f"{head}.{body}.{b64url_encode(signature)}"


class TestKeyRefresh:
    async def test_rotation_picked_up_on_unknown_kid(self, issuer, make, clock):
        """After the issuer rotates, a token with the new ``kid`` makes one JWKS refetch."""
        provider = make(refresh_interval=30)
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        assert 1 == issuer.jwks_fetches
        issuer.rotate(keep=0)
        clock.advance(31)
        assert "user-1" == (await provider.authenticate(issuer.mint(audience=AUDIENCE))).subject
        assert 2 == issuer.jwks_fetches
        assert 1 == issuer.discovery_fetches  # discovery is still fresh

    async def test_unknown_kid_flood_one_refetch_per_interval(self, issuer, make, clock):
        """Many tokens with made-up ``kid``s cause at most one refetch per interval."""
        provider = make(refresh_interval=60)
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        clock.advance(61)
        tokens = [
            issuer.mint(audience=AUDIENCE, header={"kid": secrets.token_hex(8)}) for _ in range(50)
        ]
        results = await asyncio.gather(
            *(provider.verify(t) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(r, InvalidToken) for r in results)
        for token in tokens[:20]:
            with pytest.raises(InvalidToken):
                await provider.verify(token)
        assert 2 == issuer.jwks_fetches
        clock.advance(30)
        with pytest.raises(InvalidToken):
            await provider.verify(tokens[0])
        assert 2 == issuer.jwks_fetches
        clock.advance(31)
        with pytest.raises(InvalidToken):
            await provider.verify(tokens[0])
        assert 3 == issuer.jwks_fetches

    async def test_unknown_kid_soon_after_fetch_not_refetched(self, issuer, make, clock):
        """Right after a fetch, an unknown ``kid`` is refused without asking again."""
        provider = make(refresh_interval=60)
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        with pytest.raises(InvalidToken):
            await provider.verify(issuer.mint(audience=AUDIENCE, header={"kid": "nope"}))
        assert 1 == issuer.jwks_fetches

    async def test_cache_control_max_age_respected(self, issuer, make, clock):
        """Documents are fresh for the issuer's max-age, then refreshed in the background."""
        issuer.max_age = 120
        provider = make()
        token = issuer.mint(audience=AUDIENCE)
        await provider.authenticate(token)
        clock.advance(119)
        await provider.authenticate(token)
        assert 1 == issuer.jwks_fetches
        clock.advance(2)
        await provider.authenticate(token)  # answered from the stale keys at once
        await _settle(provider)
        assert 2 == issuer.jwks_fetches
        assert 2 == issuer.discovery_fetches

    @pytest.mark.parametrize(("max_age", "expected"), [(1, 60.0), (None, 300.0), (10**9, 86400.0)])
    async def test_max_age_bounded(self, issuer, make, clock, max_age, expected):
        """Freshness is clamped to [min_max_age, max_max_age]; no header means the default."""
        issuer.max_age = max_age
        provider = make()
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        assert expected == provider._jwks.fresh_until - clock.now

    def test_cache_control_parsing(self, issuer):
        """no-cache counts as 0 (then the lower bound); a malformed max-age is ignored."""
        provider = OidcProvider(issuer.url, audience=AUDIENCE, client=object())
        assert 60.0 == provider._max_age("no-cache")
        assert 60.0 == provider._max_age("private, no-store")
        assert 300.0 == provider._max_age("max-age=abc")
        assert 600.0 == provider._max_age('public, max-age="600"')


async def _settle(provider: OidcProvider) -> None:
    """Wait for the provider's background refresh, if any (bounded by its fetch timeout)."""
    task = provider._inflight
    if task is not None:
        await asyncio.wait({task}, timeout=5)


class TestIssuerDown:
    async def test_down_after_first_fetch_still_verifies(self, issuer, make, clock):
        """With the issuer gone, cached keys keep verifying past their freshness."""
        provider = make(max_stale=3600)
        token = issuer.mint(audience=AUDIENCE, expires_in=7200)
        await provider.authenticate(token)
        issuer.stop()
        clock.advance(600)  # stale: a background refresh fails
        assert "user-1" == (await provider.authenticate(token)).subject
        await _settle(provider)
        clock.advance(10)
        assert "user-1" == (await provider.authenticate(token)).subject
        await _settle(provider)

    async def test_keys_dropped_after_max_stale(self, issuer, make, clock):
        """Past ``max_stale`` without a successful refresh the keys are dropped: 503."""
        provider = make(max_stale=600)
        token = issuer.mint(audience=AUDIENCE, expires_in=7200)
        await provider.authenticate(token)
        issuer.stop()
        clock.advance(300 + 601)
        with pytest.raises(OidcUnavailable):
            await provider.verify(token)

    async def test_down_from_start_503(self, issuer, make):
        """Never having reached the issuer, a token is answered 503, not 500 nor 401."""
        token = issuer.mint(audience=AUDIENCE)
        issuer.stop()
        provider = make()
        with pytest.raises(OidcUnavailable) as caught:
            await provider.verify(token)
        assert 503 == caught.value.status
        assert ErrorCode.SERVICE_UNAVAILABLE == caught.value.code
        assert int(caught.value.headers["Retry-After"]) >= 1
        assert "127.0.0.1" not in caught.value.detail
        assert not await provider.ping()

    async def test_failing_issuer_not_hammered(self, issuer, make, clock):
        """After a failed fetch, requests within ``retry_interval`` get 503 without a new fetch."""
        issuer.fail_with(500)
        provider = make(retry_interval=5)
        token = issuer.mint(audience=AUDIENCE)
        with pytest.raises(OidcUnavailable):
            await provider.verify(token)
        assert 1 == issuer.count()
        for _ in range(10):
            with pytest.raises(OidcUnavailable):
                await provider.verify(token)
        assert 1 == issuer.count()
        assert 1 <= fetches(provider.name, "discovery", "error")
        issuer.fail_with(None)
        clock.advance(6)
        assert "user-1" == (await provider.authenticate(token)).subject
        assert await provider.ping()

    async def test_concurrent_first_requests_share_one_fetch(self, issuer, make):
        """Twenty requests arriving before any key is known cause one discovery and one JWKS."""
        provider = make()
        token = issuer.mint(audience=AUDIENCE)
        principals = await asyncio.gather(*(provider.authenticate(token) for _ in range(20)))
        assert {"user-1"} == {p.subject for p in principals}
        assert 1 == issuer.discovery_fetches
        assert 1 == issuer.jwks_fetches

    async def test_fetch_not_bound_by_starting_request_deadline(self, issuer, make):
        """The shared fetch ignores the deadline of the request that started it."""
        provider = make()
        token = issuer.mint(audience=AUDIENCE)
        context = RequestContext(request_id="r-1", deadline=asyncio.get_running_loop().time())
        bound = bind(context)
        try:
            assert "user-1" == (await provider.authenticate(token)).subject
        finally:
            unbind(bound)

    async def test_discovery_naming_another_issuer_unusable(self, issuer, make):
        """A discovery document whose issuer differs from the configured one is not used."""
        issuer.discovery_issuer = "https://evil.example"
        provider = make()
        with pytest.raises(OidcUnavailable):
            await provider.verify(issuer.mint(audience=AUDIENCE))
        assert 0 == issuer.jwks_fetches

    @pytest.mark.parametrize(
        "extra",
        [{"jwks_uri": None}, {"jwks_uri": "http://idp.example.com/jwks"}, {"jwks_uri": 3}],
        ids=["no-jwks-uri", "insecure-jwks-uri", "jwks-uri-not-a-string"],
    )
    async def test_unusable_discovery_503(self, issuer, make, extra):
        """A discovery document without a usable ``jwks_uri`` leaves the provider without keys."""
        issuer.discovery_extra = extra
        provider = make()
        with pytest.raises(OidcUnavailable):
            await provider.verify(issuer.mint(audience=AUDIENCE))
        assert 0 == issuer.jwks_fetches

    async def test_oversized_jwks_refused(self, issuer, make):
        """A JWKS larger than the bound is a failed fetch, not a memory sink."""
        issuer.publish({"kty": "oct", "kid": "huge", "k": "A" * 600_000})
        provider = make()
        with pytest.raises(OidcUnavailable):
            await provider.verify(issuer.mint(audience=AUDIENCE))

    async def test_background_refresh_replaces_keys(self, issuer, make, clock):
        """Stale keys answer at once while a background refresh replaces them."""
        provider = make(retry_interval=1)
        token = issuer.mint(audience=AUDIENCE)
        await provider.authenticate(token)
        issuer.rotate("ES256", keep=0)
        clock.advance(400)
        assert "user-1" == (await provider.authenticate(token)).subject  # stale, refreshing
        await _settle(provider)
        # The refresh succeeded (ES256 is accepted): the old key is gone now.
        with pytest.raises(InvalidToken):
            await provider.verify(token)

    async def test_context_manager_closes(self, issuer, dependency, clock):
        """``async with`` closes the provider's own HTTP client."""
        async with OidcProvider(issuer.url, audience=AUDIENCE, dependency=dependency) as provider:
            await provider.authenticate(issuer.mint(audience=AUDIENCE))
        assert provider._client.is_closed

    async def test_jwks_uri_skips_discovery(self, issuer, make):
        """With ``jwks_uri`` given, discovery is not fetched."""
        provider = make(jwks_uri=issuer.url + "/jwks")
        await provider.authenticate(issuer.mint(audience=AUDIENCE))
        assert 0 == issuer.discovery_fetches


class TestConfiguration:
    @pytest.mark.parametrize(
        "url", ["http://idp.example.com", "ftp://127.0.0.1", "https://", "not a url"]
    )
    def test_issuer_must_be_https(self, url):
        """Only https issuers, or http on loopback, are accepted."""
        with pytest.raises(ConfigurationError):
            OidcProvider(url, audience=AUDIENCE)

    def test_audience_required(self, issuer):
        """An empty audience is a configuration error."""
        with pytest.raises(ConfigurationError):
            OidcProvider(issuer.url, audience="")

    def test_durations_accept_timedelta(self, issuer):
        """Durations are seconds or a timedelta."""
        provider = OidcProvider(
            issuer.url, audience=AUDIENCE, max_stale=timedelta(hours=2), leeway=10
        )
        assert 7200.0 == provider.max_stale
        assert 10.0 == provider.leeway

    def test_bounds_checked(self, issuer):
        """Freshness bounds must be ordered."""
        with pytest.raises(ConfigurationError):
            OidcProvider(issuer.url, audience=AUDIENCE, min_max_age=600, default_max_age=300)


def test_b64_helpers_roundtrip():
    """The test helper's encoding is the verifier's (sanity for forged tokens)."""
    assert b"x" == base64.urlsafe_b64decode(b64url_encode(b"x") + "==")
