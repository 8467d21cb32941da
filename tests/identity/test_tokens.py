"""Access tokens: issue, verify, rotation, revocation, and every forged token refused."""

from __future__ import annotations

import hashlib
import hmac

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from bastion.errors import ErrorCode, Unauthenticated
from bastion.identity._keys import (
    ALGORITHMS,
    KeySet,
    SigningKey,
    b64url_encode,
    generate_jwk,
    generate_jwks,
)
from bastion.identity._tokens import (
    MAX_TOKEN_LENGTH,
    AccessClaims,
    AccessTokens,
    InvalidToken,
    MemoryDenyList,
    TokenDenyList,
)
from bastion.settings import TokenSettings

NOW = 1_800_000_000.0
ASYMMETRIC = ("EdDSA", "ES256", "RS256")
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class Clock:
    """A settable clock for expiry tests."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def jwks_by_alg() -> dict[str, dict[str, str]]:
    """One private JWK per algorithm, generated once per module."""
    return {alg: generate_jwk(alg, kid=f"k-{alg}") for alg in ALGORITHMS}


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_tokens(jwks, *algs, clock=None, **kwargs) -> AccessTokens:
    keys = KeySet.from_jwks({"keys": [jwks[alg] for alg in algs]})
    return AccessTokens(keys, clock=clock or Clock(), **kwargs)


def good_claims(**changes) -> dict:
    claims = {
        "iss": "bastion",
        "aud": "bastion",
        "sub": "user-1",
        "tid": "tenant-1",
        "roles": ["member"],
        "jti": "0192f0c4-0000-7000-8000-000000000000",
        "iat": int(NOW),
        "exp": int(NOW) + 900,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def forge(header: dict, claims: dict | bytes, sign=None) -> str:
    """Build a compact JWS from raw parts; ``sign`` maps the signing input to a signature."""
    payload = claims if isinstance(claims, bytes) else orjson.dumps(claims)
    signing_input = f"{b64url_encode(orjson.dumps(header))}.{b64url_encode(payload)}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64url_encode(signature)}"


def claims_id(claims: dict) -> str:
    """Name a claims case by what differs from good_claims()."""
    base = good_claims()
    changed = [f"{k}={claims.get(k)!r}" for k in {*base, *claims} if claims.get(k) != base.get(k)]
    return ",".join(sorted(changed))


def header_for(key: SigningKey, **changes) -> dict:
    header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


def assert_invalid(tokens: AccessTokens, token) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        tokens.verify(token)
    assert not caught.value.expired
    assert "The access token is invalid." == caught.value.detail
    return caught.value


class TestRoundTrip:
    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_issued_token_verifies(self, jwks_by_alg, alg, clock):
        """A token issued with each algorithm verifies to the claims it was issued with."""
        tokens = make_tokens(jwks_by_alg, alg, clock=clock, ttl=600)
        issued = tokens.issue("user-1", "tenant-1", ["admin", "member"], extra={"scope": "docs"})
        claims = tokens.verify(issued.token)
        assert (
            AccessClaims(
                subject="user-1",
                tenant="tenant-1",
                roles=("admin", "member"),
                token_id=issued.token_id,
                issued_at=NOW,
                expires_at=NOW + 600,
                not_before=None,
                issuer="bastion",
                audience="bastion",
                extra={"scope": "docs"},
            )
            == claims
        )
        assert (int(NOW) + 600, 600) == (issued.expires_at, issued.expires_in)

    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_header_names_key_type_and_algorithm(self, jwks_by_alg, alg):
        """The header carries alg, typ at+jwt and the signing key's kid, nothing else."""
        token = make_tokens(jwks_by_alg, alg).issue("u", "t", []).token
        assert {"alg": alg, "typ": "at+jwt", "kid": f"k-{alg}"} == jwt.get_unverified_header(token)

    @pytest.mark.parametrize("alg", ASYMMETRIC)
    def test_pyjwt_verifies_our_tokens(self, jwks_by_alg, alg):
        """Another implementation (PyJWT) verifies our tokens with the published key."""
        tokens = make_tokens(jwks_by_alg, alg, clock=__import__("time").time)
        token = tokens.issue("user-1", "tenant-1", ["viewer"]).token
        public = jwt.PyJWK(dict(tokens.keys.signing_key.public_jwk))
        claims = jwt.decode(token, public, algorithms=[alg], audience="bastion", issuer="bastion")
        assert ("user-1", ["viewer"]) == (claims["sub"], claims["roles"])

    def test_token_id_is_a_uuid7_and_unique(self, jwks_by_alg):
        """Each token gets its own jti, a UUIDv7."""
        tokens = make_tokens(jwks_by_alg, "HS256")
        ids = {tokens.issue("u", "t", []).token_id for _ in range(100)}
        assert 100 == len(ids)
        assert all("7" == token_id[14] for token_id in ids)

    def test_not_before_and_audience_list(self, jwks_by_alg, clock):
        """nbf is written when asked; a token whose aud lists ours is accepted."""
        tokens = make_tokens(jwks_by_alg, "EdDSA", clock=clock)
        issued = tokens.issue("u", "t", [], not_before=NOW)
        assert NOW == tokens.verify(issued.token).not_before
        key = tokens.keys.signing_key
        listed = forge(header_for(key), good_claims(aud=["other", "bastion"]), key.sign)
        assert ("other", "bastion") == tokens.verify(listed).audience

    def test_extra_claims_cannot_override_registered_ones(self, jwks_by_alg):
        """extra may not set sub, tid, roles, exp or any registered claim."""
        tokens = make_tokens(jwks_by_alg, "EdDSA")
        with pytest.raises(ValueError, match="exp"):
            tokens.issue("u", "t", [], extra={"exp": 2**40})
        with pytest.raises(TypeError):
            tokens.issue("u", "t", "admin")

    def test_from_settings(self, jwks_by_alg, clock):
        """from_settings takes issuer, audience, ttl and leeway from identity.tokens."""
        settings = TokenSettings(issuer="https://id.example", audience="docs", access_ttl=60)
        keys = KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"]]})
        tokens = AccessTokens.from_settings(settings, keys=keys)
        issued = tokens.issue("u", "t", [])
        claims = tokens.verify(issued.token)
        assert ("https://id.example", "docs", 60) == (
            claims.issuer,
            claims.audience,
            issued.expires_in,
        )


class TestRotation:
    def test_old_key_verifies_during_overlap_and_not_after(self, jwks_by_alg, clock):
        """A token from the previous key verifies while that key is in the set, not after."""
        before = make_tokens(jwks_by_alg, "EdDSA", clock=clock)
        token = before.issue("u", "t", []).token
        overlap = make_tokens(jwks_by_alg, "ES256", "EdDSA", clock=clock)
        assert "u" == overlap.verify(token).subject
        assert "ES256" == jwt.get_unverified_header(overlap.issue("u", "t", []).token)["alg"]
        after = make_tokens(jwks_by_alg, "ES256", clock=clock)
        assert_invalid(after, token)

    def test_verify_only_previous_key(self, jwks_by_alg, clock):
        """The previous key may be kept as a public JWK only: it still verifies."""
        old = make_tokens(jwks_by_alg, "RS256", clock=clock)
        token = old.issue("u", "t", []).token
        public = dict(old.keys.signing_key.public_jwk)
        keys = KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"], public]})
        assert "u" == AccessTokens(keys, clock=clock).verify(token).subject


class TestTimeClaims:
    def test_expired_token_says_expired(self, jwks_by_alg, clock):
        """Past exp plus leeway, the token is refused as expired with a Bearer challenge."""
        tokens = make_tokens(jwks_by_alg, "EdDSA", clock=clock, ttl=60, leeway=30)
        token = tokens.issue("u", "t", []).token
        clock.now = NOW + 89
        assert "u" == tokens.verify(token).subject
        clock.now = NOW + 90
        with pytest.raises(InvalidToken) as caught:
            tokens.verify(token)
        assert caught.value.expired
        assert 401 == caught.value.status
        assert ErrorCode.UNAUTHENTICATED == caught.value.code
        assert caught.value.headers["www-authenticate"].startswith('Bearer error="invalid_token"')

    def test_not_yet_valid(self, jwks_by_alg, clock):
        """nbf or iat further ahead than the leeway is refused; within it, accepted."""
        tokens = make_tokens(jwks_by_alg, "EdDSA", clock=clock, leeway=30)
        key = tokens.keys.signing_key
        for name in ("nbf", "iat"):
            ahead = forge(header_for(key), good_claims(**{name: int(NOW) + 31}), key.sign)
            assert_invalid(tokens, ahead)
            near = forge(header_for(key), good_claims(**{name: int(NOW) + 30}), key.sign)
            assert "user-1" == tokens.verify(near).subject


class TestDenyList:
    async def test_revoked_jti_is_refused(self, jwks_by_alg, clock):
        """averify refuses a token whose jti is on the deny list; verify does not look."""
        deny = MemoryDenyList(clock)
        assert isinstance(deny, TokenDenyList)
        tokens = make_tokens(jwks_by_alg, "EdDSA", clock=clock, deny_list=deny)
        issued = tokens.issue("u", "t", [])
        assert "u" == (await tokens.averify(issued.token)).subject
        await deny.revoke(issued.token_id, until=issued.expires_at)
        with pytest.raises(InvalidToken):
            await tokens.averify(issued.token)
        assert "u" == tokens.verify(issued.token).subject
        clock.now = issued.expires_at + 1
        assert not await deny.is_revoked(issued.token_id)

    async def test_without_deny_list(self, jwks_by_alg):
        """Without a deny list averify is verify."""
        tokens = make_tokens(jwks_by_alg, "HS256")
        token = tokens.issue("u", "t", []).token
        assert "u" == (await tokens.averify(token)).subject


class TestForgedTokens:
    @pytest.fixture
    def tokens(self, jwks_by_alg, clock) -> AccessTokens:
        """A set of all four keys, so confusion between them can be tried."""
        return make_tokens(jwks_by_alg, *ALGORITHMS, clock=clock)

    def key(self, tokens: AccessTokens, alg: str) -> SigningKey:
        return tokens.keys.get(f"k-{alg}")

    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_alg_none(self, tokens, alg):
        """alg none (any case), with or without a signature, is refused."""
        key = self.key(tokens, alg)
        for name in ("none", "None", "NONE"):
            unsigned = forge(header_for(key, alg=name), good_claims())
            assert_invalid(tokens, unsigned)
            assert_invalid(tokens, unsigned.rstrip(".") + ".")
            assert_invalid(tokens, forge(header_for(key, alg=name), good_claims(), key.sign))

    @pytest.mark.parametrize("alg", ASYMMETRIC)
    def test_hs256_signed_with_the_public_key(self, tokens, alg):
        """HS256 keyed with the public key's bytes (PEM, DER, JWK, raw) is refused."""
        key = self.key(tokens, alg)
        public = key._public
        secrets = [
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            orjson.dumps(key.public_jwk),
            key.public_jwk.get("x", "").encode(),
        ]
        if alg == "RS256":
            secrets.append(
                public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
            )
        for secret in secrets:
            token = forge(
                header_for(key, alg="HS256"),
                good_claims(),
                lambda data, secret=secret: hmac.digest(secret, data, hashlib.sha256),
            )
            assert_invalid(tokens, token)

    @pytest.mark.parametrize(
        ("signer", "named"),
        [("RS256", "EdDSA"), ("EdDSA", "ES256"), ("ES256", "HS256"), ("HS256", "RS256")],
    )
    def test_kid_of_another_key(self, tokens, signer, named):
        """A token signed by one key but naming another's kid is refused, either alg."""
        signing, other = self.key(tokens, signer), self.key(tokens, named)
        for alg in (signer, named):
            token = forge(header_for(other, alg=alg), good_claims(), signing.sign)
            assert_invalid(tokens, token)

    def test_unknown_or_malformed_kid(self, tokens):
        """A kid not in the set, missing, or not a string is refused."""
        key = self.key(tokens, "EdDSA")
        for kid in ("nope", None, 1, ["k-EdDSA"], {"k": 1}):
            assert_invalid(tokens, forge(header_for(key, kid=kid), good_claims(), key.sign))

    @pytest.mark.parametrize("member", ["jku", "x5u", "jwk", "x5c", "crit"])
    def test_key_location_headers_refused(self, tokens, jwks_by_alg, member):
        """A header that points at or embeds a key, or demands extensions, is refused."""
        key = self.key(tokens, "EdDSA")
        value = {"jwk": dict(key.public_jwk), "x5c": ["MII"], "crit": ["exp"]}.get(
            member, "https://evil.example/jwks.json"
        )
        token = forge(header_for(key, **{member: value}), good_claims(), key.sign)
        assert_invalid(tokens, token)

    @pytest.mark.parametrize("typ", [None, "JWT", "at+JWT", "id+jwt", 1])
    def test_wrong_typ(self, tokens, typ):
        """Only typ at+jwt is an access token (RFC 9068): an ID token is not one."""
        key = self.key(tokens, "EdDSA")
        assert_invalid(tokens, forge(header_for(key, typ=typ), good_claims(), key.sign))

    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_tampered_payload_or_signature(self, tokens, alg):
        """A changed claim or a changed signature byte breaks the token."""
        key = self.key(tokens, alg)
        token = forge(header_for(key), good_claims(), key.sign)
        head, _, sig = token.split(".")
        escalated = b64url_encode(orjson.dumps(good_claims(roles=["owner"])))
        assert_invalid(tokens, f"{head}.{escalated}.{sig}")
        raw = bytearray(jwt.utils.base64url_decode(sig))
        raw[len(raw) // 2] ^= 1
        assert_invalid(tokens, f"{head}.{token.split('.')[1]}.{b64url_encode(bytes(raw))}")
        assert_invalid(tokens, f"{head}.{token.split('.')[1]}.")
        assert "user-1" == tokens.verify(token).subject

    def test_es256_signature_of_wrong_length(self, tokens):
        """An ES256 signature that is not 64 bytes (a DER one, say) is refused."""
        key = self.key(tokens, "ES256")
        good = forge(header_for(key), good_claims(), key.sign)
        head, body, sig = good.split(".")
        raw = jwt.utils.base64url_decode(sig)
        assert_invalid(tokens, f"{head}.{body}.{b64url_encode(raw + b'0')}")
        assert_invalid(tokens, f"{head}.{body}.{b64url_encode(raw[:-1])}")

    @pytest.mark.parametrize(
        "claims",
        [
            good_claims(iss="https://evil.example"),
            good_claims(aud="other"),
            good_claims(aud=["other"]),
            good_claims(aud=None),
            good_claims(iss=None),
            good_claims(sub=None),
            good_claims(tid=None),
            good_claims(roles=None),
            good_claims(jti=None),
            good_claims(iat=None),
            good_claims(exp=None),
            good_claims(sub=""),
            good_claims(sub=1),
            good_claims(tid=["t"]),
            good_claims(jti=7),
            good_claims(roles="admin"),
            good_claims(roles=["admin", 1]),
            good_claims(exp=str(int(NOW) + 900)),
            good_claims(exp=True),
            good_claims(iat="now"),
            good_claims(nbf="now"),
            good_claims(nbf=False),
        ],
        ids=claims_id,
    )
    def test_wrong_or_missing_claims(self, tokens, claims):
        """A wrong iss or aud, a missing claim or a claim of the wrong type is refused."""
        key = self.key(tokens, "EdDSA")
        assert_invalid(tokens, forge(header_for(key), claims, key.sign))

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "garbage",
            "a.b",
            "a.b.c.d",
            "a.b.c",
            "..",
            "eyJ.eyJ.",
            "e30.e30.e30",
            "!!!.@@@.###",
            "a b.c.d",
            "é.é.é",
            "a.b.c\n",
            None,
            12,
            b"\xff.\xff.\xff",
        ],
    )
    def test_malformed_input(self, tokens, token):
        """Garbage, wrong segment counts, bad alphabet or non-strings are refused."""
        assert_invalid(tokens, token)

    def test_non_json_and_non_object_parts(self, tokens):
        """A header or payload that is not a JSON object is refused."""
        key = self.key(tokens, "HS256")
        good_head = b64url_encode(orjson.dumps(header_for(key)))
        for payload in (b"not json", b"[1, 2]", b'"string"', b"\xff\xfe"):
            assert_invalid(tokens, forge(header_for(key), payload, key.sign))
        for header in (b"not json", b"[]", b"null"):
            head = b64url_encode(header)
            body = b64url_encode(orjson.dumps(good_claims()))
            sig = b64url_encode(key.sign(f"{head}.{body}".encode()))
            assert_invalid(tokens, f"{head}.{body}.{sig}")
        assert good_head

    def test_oversize_token_refused_before_parsing(self, tokens):
        """A token over the length bound is refused, even a genuine one."""
        key = self.key(tokens, "EdDSA")
        big = forge(header_for(key), good_claims(pad="x" * MAX_TOKEN_LENGTH), key.sign)
        assert_invalid(tokens, big)
        assert_invalid(tokens, "a" * (MAX_TOKEN_LENGTH * 100))

    def test_invalid_token_is_unauthenticated(self):
        """InvalidToken renders as 401 UNAUTHENTICATED with a Bearer invalid_token challenge."""
        error = InvalidToken()
        assert isinstance(error, Unauthenticated)
        assert {"www-authenticate": 'Bearer error="invalid_token"'} == error.headers
        assert 401 == error.problem("cid")["status"]


class TestLogOutEverywhere:
    async def test_tokens_issued_before_the_mark_are_refused_later_ones_pass(self):
        """revoke_subject denies the user's earlier tokens through averify; newer ones verify."""
        now = [1_800_000_000.0]
        deny = MemoryDenyList(clock=lambda: now[0])
        tokens = AccessTokens(
            KeySet.from_jwks(generate_jwks("HS256")),
            issuer="bastion",
            audience="bastion",
            ttl=900,
            leeway=30,
            deny_list=deny,
            clock=lambda: now[0],
        )
        earlier = tokens.issue("user-1", "tenant-1", ["member"]).token
        other_user = tokens.issue("user-2", "tenant-1", ["member"]).token
        now[0] += 5
        await deny.revoke_subject("user-1")
        with pytest.raises(InvalidToken):
            await tokens.averify(earlier)
        assert "user-2" == (await tokens.averify(other_user)).subject
        now[0] += 1
        later = tokens.issue("user-1", "tenant-1", ["member"]).token
        assert "user-1" == (await tokens.averify(later)).subject
