"""Signing keys: parsing JWKs, the key set, the development key and the public JWKS."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr
from starlette.applications import Starlette
from structlog.testing import capture_logs
from typer.testing import CliRunner

import bastion.cli.keys  # noqa: F401 - registers `bastion keys` on the app
from bastion.cli import app
from bastion.errors import ConfigurationError
from bastion.identity._keys import (
    ALGORITHMS,
    DEV_KEY_FILENAME,
    KeySet,
    SigningKey,
    _create_dev_key_file,
    b64url_encode,
    generate_jwk,
    generate_jwks,
    jwks_route,
    load_or_create_dev_keys,
    rotate_jwks,
)
from bastion.settings import TokenSettings

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
ASYMMETRIC = ("EdDSA", "ES256", "RS256")


@pytest.fixture(scope="module")
def jwks_by_alg() -> dict[str, dict[str, str]]:
    """One generated private JWK per algorithm (RSA generation is slow: once per module)."""
    return {alg: generate_jwk(alg, kid=f"k-{alg}") for alg in ALGORITHMS}


class TestSigningKey:
    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_signs_and_verifies(self, jwks_by_alg, alg):
        """A private JWK signs, and its signature verifies only for the same input."""
        key = SigningKey.from_jwk(jwks_by_alg[alg])
        signature = key.sign(b"payload")
        assert alg == key.alg
        assert key.can_sign
        assert key.verify(signature, b"payload")
        assert not key.verify(signature, b"payloaD")
        assert not key.verify(signature[:-1] + bytes([signature[-1] ^ 1]), b"payload")

    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_private_jwk_round_trips(self, jwks_by_alg, alg):
        """private_jwk() rebuilds a key whose signatures the original verifies."""
        key = SigningKey.from_jwk(jwks_by_alg[alg])
        again = SigningKey.from_jwk(key.private_jwk())
        assert key.verify(again.sign(b"x"), b"x")

    @pytest.mark.parametrize("alg", ASYMMETRIC)
    def test_public_jwk_verifies_but_cannot_sign(self, jwks_by_alg, alg):
        """A public JWK is a verify-only key, kept during a rotation overlap."""
        private = SigningKey.from_jwk(jwks_by_alg[alg])
        public = SigningKey.from_jwk(dict(private.public_jwk))
        assert not public.can_sign
        assert public.verify(private.sign(b"x"), b"x")
        with pytest.raises(ConfigurationError, match="verify-only"):
            public.sign(b"x")
        assert set() == PRIVATE_MEMBERS & set(public.private_jwk())

    def test_rsa_without_crt_members(self, jwks_by_alg):
        """An RSA JWK with only n, e and d still loads (the primes are recovered)."""
        jwk = {
            k: v for k, v in jwks_by_alg["RS256"].items() if k not in {"p", "q", "dp", "dq", "qi"}
        }
        key = SigningKey.from_jwk(jwk)
        assert SigningKey.from_jwk(jwks_by_alg["RS256"]).verify(key.sign(b"x"), b"x")

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"kid": None}, "no 'kid'"),
            ({"kid": ""}, "no 'kid'"),
            ({"alg": None}, "'alg' must be one of"),
            ({"alg": "none"}, "'alg' must be one of"),
            ({"alg": "HS512"}, "'alg' must be one of"),
            ({"alg": "RS256"}, "needs kty 'RSA'"),
            ({"alg": "HS256"}, "needs kty 'oct'"),
            ({"crv": "Ed448"}, "needs crv 'Ed25519'"),
            ({"x": None}, "'x' is missing"),
            ({"x": "!!"}, "not base64url"),
            ({"x": "AAAA"}, "malformed"),
        ],
    )
    def test_refuses_a_bad_ed25519_jwk(self, jwks_by_alg, change, message):
        """A JWK without kid or alg, or whose alg does not fit its type, is refused."""
        jwk = {**jwks_by_alg["EdDSA"], **change}
        jwk = {k: v for k, v in jwk.items() if v is not None}
        with pytest.raises(ConfigurationError, match=message):
            SigningKey.from_jwk(jwk)

    def test_refuses_mismatched_ed25519_parts(self, jwks_by_alg):
        """An Ed25519 JWK whose x is not d's public key is refused."""
        other = generate_jwk("EdDSA")
        with pytest.raises(ConfigurationError, match="does not match"):
            SigningKey.from_jwk({**jwks_by_alg["EdDSA"], "x": other["x"]})

    def test_refuses_mismatched_ec_parts(self, jwks_by_alg):
        """A P-256 JWK whose point is not d's is refused."""
        other = generate_jwk("ES256")
        with pytest.raises(ConfigurationError, match="malformed or inconsistent"):
            SigningKey.from_jwk({**jwks_by_alg["ES256"], "x": other["x"], "y": other["y"]})

    def test_refuses_an_ec_key_on_another_curve(self, jwks_by_alg):
        """ES256 is P-256 only."""
        with pytest.raises(ConfigurationError, match="needs crv 'P-256'"):
            SigningKey.from_jwk({**jwks_by_alg["ES256"], "crv": "P-384"})

    def test_refuses_a_short_hmac_key(self):
        """An HS256 key under 256 bits is refused (RFC 7518 §3.2)."""
        jwk = {"kty": "oct", "kid": "h", "alg": "HS256", "k": b64url_encode(b"x" * 31)}
        with pytest.raises(ConfigurationError, match="at least 256 bits"):
            SigningKey.from_jwk(jwk)

    def test_refuses_a_short_rsa_key(self):
        """An RSA key under 2048 bits is refused."""
        # A weak key on purpose: the point is that it is refused.
        weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the key under test
        numbers = weak.public_key().public_numbers()
        jwk = {
            "kty": "RSA",
            "kid": "r",
            "alg": "RS256",
            "n": b64url_encode(numbers.n.to_bytes(128, "big")),
            "e": "AQAB",
        }
        with pytest.raises(ConfigurationError, match="2048 bits"):
            SigningKey.from_jwk(jwk)

    def test_repr_shows_no_key_material(self, jwks_by_alg):
        """A key's repr names kid and alg, never the private value."""
        jwk = jwks_by_alg["HS256"]
        assert jwk["k"] not in repr(SigningKey.from_jwk(jwk))


class TestKeySet:
    def test_first_key_signs_and_all_verify(self, jwks_by_alg):
        """The first key of the set signs; every key is found by kid."""
        keys = KeySet.from_jwks({"keys": [jwks_by_alg["ES256"], jwks_by_alg["EdDSA"]]})
        assert "k-ES256" == keys.signing_key.kid
        assert "k-EdDSA" == keys.get("k-EdDSA").kid
        assert keys.get("k-RS256") is None

    def test_refuses_empty_duplicate_or_verify_only_first(self, jwks_by_alg):
        """An empty set, a kid used twice, or a public first key is a configuration error."""
        with pytest.raises(ConfigurationError, match="empty"):
            KeySet.from_jwks('{"keys": []}')
        with pytest.raises(ConfigurationError, match="share the kid"):
            KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"], jwks_by_alg["EdDSA"]]})
        public = SigningKey.from_jwk(jwks_by_alg["EdDSA"]).public_jwk
        with pytest.raises(ConfigurationError, match="no private part"):
            KeySet.from_jwks({"keys": [dict(public)]})

    @pytest.mark.parametrize("text", ["not json", "[]", '{"keys": {}}', '{"keys": [1]}'])
    def test_refuses_what_is_not_a_jwks(self, text):
        """Text that is not a JWKS is a configuration error."""
        with pytest.raises(ConfigurationError, match=r"not valid JSON|must be a JWKS"):
            KeySet.from_jwks(text)

    def test_public_jwks_has_no_private_member(self, jwks_by_alg):
        """The public JWKS carries public members only, and no HMAC key at all."""
        keys = KeySet.from_jwks({"keys": [jwks_by_alg[alg] for alg in ALGORITHMS]})
        published = keys.public_jwks()["keys"]
        assert ["k-EdDSA", "k-ES256", "k-RS256"] == [jwk["kid"] for jwk in published]
        for jwk in published:
            assert set() == PRIVATE_MEMBERS & set(jwk)
            assert "sig" == jwk["use"]
        assert orjson.loads(keys.jwks_body) == keys.public_jwks()

    def test_etag_follows_the_public_keys(self, jwks_by_alg):
        """The ETag is stable for the same keys and changes when the set changes."""
        one = KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"]]})
        same = KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"]]})
        two = KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"], jwks_by_alg["ES256"]]})
        assert one.etag == same.etag
        assert one.etag != two.etag

    def test_verify_only_set(self, jwks_by_alg):
        """A set of public keys loads with signing=False, verifies, and has no signing key."""
        public = dict(SigningKey.from_jwk(jwks_by_alg["ES256"]).public_jwk)
        keys = KeySet.from_jwks({"keys": [public]}, signing=False)
        signature = SigningKey.from_jwk(jwks_by_alg["ES256"]).sign(b"x")
        assert keys.get("k-ES256").verify(signature, b"x")
        with pytest.raises(ConfigurationError, match="only verifies"):
            keys.signing_key  # noqa: B018 - the property raises

    def test_rotate_puts_a_new_key_first(self):
        """rotate_jwks adds a signing key and keeps the previous one to verify."""
        old = generate_jwks("EdDSA", kid="old")
        rotated = KeySet.from_jwks(rotate_jwks(old, "ES256"))
        assert ["ES256", "EdDSA"] == [key.alg for key in rotated.keys]
        assert "old" == rotated.keys[1].kid


class TestFromSettings:
    def test_configured_keys_are_used(self, jwks_by_alg, tmp_path):
        """signing_keys set: those keys, and nothing is written to the key directory."""
        settings = TokenSettings(
            signing_keys=SecretStr(orjson.dumps({"keys": [jwks_by_alg["ES256"]]}).decode()),
            key_directory=str(tmp_path / "keys"),
        )
        keys = KeySet.from_settings(settings, environment="production")
        assert "k-ES256" == keys.signing_key.kid
        assert not (tmp_path / "keys").exists()

    def test_production_without_keys_stops_startup(self, tmp_path):
        """No signing keys in production is a configuration error naming the setting."""
        settings = TokenSettings(key_directory=str(tmp_path / "keys"))
        with pytest.raises(ConfigurationError, match=r"identity\.tokens\.signing_keys"):
            KeySet.from_settings(settings, environment="production")
        assert not (tmp_path / "keys").exists()

    def test_invalid_configured_keys_name_no_secret(self, jwks_by_alg):
        """A broken configured key fails with a message that holds no key material."""
        jwk = {**jwks_by_alg["HS256"], "alg": "RS256"}
        settings = TokenSettings(signing_keys=SecretStr(orjson.dumps({"keys": [jwk]}).decode()))
        with pytest.raises(ConfigurationError) as caught:
            KeySet.from_settings(settings)
        assert jwk["k"] not in str(caught.value)

    def test_development_key_is_generated_once_with_safe_modes(self, tmp_path):
        """In development the key is made once (0600 in a 0700 directory) and kept."""
        directory = tmp_path / "var" / "keys"
        settings = TokenSettings(key_directory=str(directory), algorithm="ES256")
        with capture_logs() as logs:
            first = KeySet.from_settings(settings)
        again = KeySet.from_settings(settings)
        assert first.signing_key.kid == again.signing_key.kid
        assert "ES256" == first.signing_key.alg
        assert 0o700 == stat.S_IMODE(directory.stat().st_mode)
        assert 0o600 == stat.S_IMODE((directory / DEV_KEY_FILENAME).stat().st_mode)
        assert ["identity.dev_signing_key"] == [entry["event"] for entry in logs]
        assert [DEV_KEY_FILENAME] == os.listdir(directory)

    def test_development_key_readable_by_others_is_tightened(self, tmp_path):
        """A key file with group or world bits is set back to 0600 with a warning."""
        load_or_create_dev_keys(tmp_path, "EdDSA")
        path = tmp_path / DEV_KEY_FILENAME
        path.chmod(0o644)
        with capture_logs() as logs:
            load_or_create_dev_keys(tmp_path, "EdDSA")
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)
        assert "identity.dev_key_mode_tightened" == logs[0]["event"]

    def test_development_key_directory_open_to_others_is_reported(self, tmp_path):
        """An existing key directory with group or world bits is warned about, not changed."""
        tmp_path.chmod(0o755)
        with capture_logs() as logs:
            load_or_create_dev_keys(tmp_path, "EdDSA")
        assert "identity.dev_key_directory_open" == logs[0]["event"]
        assert 0o755 == stat.S_IMODE(tmp_path.stat().st_mode)

    def test_concurrent_creation_keeps_the_first_key(self, tmp_path):
        """A worker that loses the creation race keeps the winner's key and leaves no debris."""
        first = load_or_create_dev_keys(tmp_path, "EdDSA")
        _create_dev_key_file(tmp_path / DEV_KEY_FILENAME, "ES256")
        again = load_or_create_dev_keys(tmp_path, "EdDSA")
        assert first.signing_key.kid == again.signing_key.kid
        assert [DEV_KEY_FILENAME] == os.listdir(tmp_path)

    def test_development_key_file_broken(self, tmp_path):
        """A corrupt development key file is a configuration error, not a new key."""
        (tmp_path / DEV_KEY_FILENAME).write_text("{", encoding="utf-8")
        (tmp_path / DEV_KEY_FILENAME).chmod(0o600)
        with pytest.raises(ConfigurationError, match="not valid JSON"):
            load_or_create_dev_keys(tmp_path, "EdDSA")

    def test_development_key_directory_unusable(self, tmp_path):
        """A key directory that cannot be made is a configuration error naming it."""
        blocker = tmp_path / "file"
        blocker.write_text("", encoding="utf-8")
        with pytest.raises(ConfigurationError, match="development signing key"):
            load_or_create_dev_keys(Path(blocker) / "keys", "EdDSA")


class TestJwksRoute:
    @pytest.fixture
    async def client(self, jwks_by_alg):
        keys = KeySet.from_jwks({"keys": [jwks_by_alg["EdDSA"], jwks_by_alg["HS256"]]})
        transport = httpx.ASGITransport(app=Starlette(routes=[jwks_route(keys)]))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, keys

    async def test_serves_the_public_jwks_cacheably(self, client):
        """GET answers the public keys with Cache-Control max-age and an ETag."""
        http, keys = client
        response = await http.get("/.well-known/jwks.json")
        assert 200 == response.status_code
        assert keys.public_jwks() == response.json()
        assert "public, max-age=300" == response.headers["cache-control"]
        assert keys.etag == response.headers["etag"]
        assert "application/json" == response.headers["content-type"]
        assert set() == PRIVATE_MEMBERS & set(response.text.replace('"', " ").split())

    async def test_matching_etag_answers_304(self, client):
        """If-None-Match with the current ETag (or a weak form of it) answers 304."""
        http, keys = client
        for header in (keys.etag, f'"other", W/{keys.etag}', "*"):
            response = await http.get("/.well-known/jwks.json", headers={"if-none-match": header})
            assert 304 == response.status_code
            assert b"" == response.content
        stale = await http.get("/.well-known/jwks.json", headers={"if-none-match": '"stale"'})
        assert 200 == stale.status_code


class TestGenerate:
    @pytest.mark.parametrize("alg", ALGORITHMS)
    def test_generated_jwks_loads(self, alg):
        """generate_jwks gives a one-key JWKS that loads and signs with that algorithm."""
        keys = KeySet.from_jwks(generate_jwks(alg, kid="fresh"))
        assert ("fresh", alg) == (keys.signing_key.kid, keys.signing_key.alg)

    def test_unknown_algorithm(self):
        """Asking for an algorithm outside the four is a configuration error."""
        with pytest.raises(ConfigurationError, match="unsupported"):
            generate_jwk("none")

    def test_default_kid_sorts_by_date(self):
        """A generated kid starts with the UTC date and is unique."""
        first, second = generate_jwk()["kid"], generate_jwk()["kid"]
        assert first != second
        assert first[:8].isdigit()


class TestKeysCommand:
    def test_generate_prints_a_usable_jwks(self):
        """`bastion keys generate` prints a JWKS on stdout and a storage note on stderr."""
        result = CliRunner().invoke(app, ["keys", "generate", "--alg", "ES256", "--kid", "k1"])
        assert 0 == result.exit_code
        assert ("k1", "ES256") == (
            KeySet.from_jwks(result.stdout).signing_key.kid,
            KeySet.from_jwks(result.stdout).signing_key.alg,
        )
        assert "secret" in result.stderr

    def test_rotate_puts_the_new_key_first(self):
        """`bastion keys rotate` reads the JWKS on stdin and prints it with a new key first."""
        current = generate_jwks("EdDSA", kid="old")
        result = CliRunner().invoke(app, ["keys", "rotate"], input=current)
        assert 0 == result.exit_code
        assert "old" == KeySet.from_jwks(result.stdout).keys[1].kid

    @pytest.mark.parametrize(
        ("args", "stdin", "message"),
        [
            (["keys", "generate", "--alg", "none"], "", "unsupported algorithm"),
            (["keys", "rotate"], "not a jwks", "not usable"),
        ],
    )
    def test_bad_input_exits_2(self, args, stdin, message):
        """An unknown algorithm or an unusable JWKS exits 2 with one line on stderr."""
        result = CliRunner().invoke(app, args, input=stdin)
        assert 2 == result.exit_code
        assert message in result.stderr
