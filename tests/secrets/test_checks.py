"""Secret checks: placeholders, entropy, missing in production, generated in development."""

from __future__ import annotations

import base64
import json
import secrets
import typing
from typing import Annotated

import pytest
from pydantic import BaseModel, SecretStr

from bastion._secrets import (
    NOT_CHECKED,
    SECRET_RULES,
    check_secrets,
    enforce_secrets,
    estimate_entropy,
    resolve_development_secrets,
)
from bastion.errors import ConfigurationError
from bastion.settings import Settings

PEPPER = "BASTION_IDENTITY__PASSWORDS__PEPPER"
KEYS = "BASTION_IDENTITY__TOKENS__SIGNING_KEYS"
API_KEY_SECRET = "BASTION_IDENTITY__API_KEYS__SECRET"
AUDIT_KEY = "BASTION_AUDIT__ENCRYPTION_KEY"
PREVIOUS_API_KEY_SECRETS = "BASTION_IDENTITY__API_KEYS__PREVIOUS_SECRETS"
STRONG = secrets.token_urlsafe(48)


def oct_jwks(material: bytes) -> str:
    k = base64.urlsafe_b64encode(material).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": k}]})


def problems(**overrides):
    return {(p.variable, p.problem) for p in check_secrets(Settings(**overrides))}


def secret_paths(model: type[BaseModel], prefix=()):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        while typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        arguments = typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from secret_paths(annotation, (*prefix, name))
        elif annotation is SecretStr or SecretStr in arguments:
            yield (*prefix, name)


class TestRegistry:
    def test_every_secret_setting_is_decided(self):
        """Each SecretStr of the tree is either checked or deliberately left unchecked."""
        found = set(secret_paths(Settings))
        assert found == set(SECRET_RULES) | set(NOT_CHECKED)


class TestEntropy:
    @pytest.mark.parametrize(
        "value",
        ["a" * 64, "password", "abcdefghijklmnopqrstuvwxyz" * 2, "0123456789" * 6, "Ab1!" * 16],
    )
    def test_patterned_or_short_values_are_far_below_a_key(self, value):
        """Runs, sequences, repeated blocks and short words count for little."""
        assert estimate_entropy(value) < 128

    def test_random_values_count_at_their_strength(self):
        """token_urlsafe(48) and a 32-byte hex key reach 256 bits."""
        assert estimate_entropy(secrets.token_urlsafe(48)) >= 256
        # A fixed draw: a 64-character hex key sits exactly at 256, so a random draw
        # with a chance five-character pattern (about 0.5%) would flake.
        assert (
            estimate_entropy("a2144606a1bbaaf88d8ca56b28be63717d1fc2edb3c312ebd419ba9a26d0b649")
            >= 256
        )


class TestChecks:
    @pytest.mark.parametrize("value", ["changeme", "secret", "password", "example", "CHANGEME"])
    def test_known_placeholders_fail(self, value):
        """A placeholder is named as such, whatever its length or case."""
        assert {(PEPPER, "placeholder")} == problems(identity={"passwords": {"pepper": value}})

    def test_long_value_containing_a_placeholder_word_fails(self):
        """A template left in place (changeme-...) is a placeholder too."""
        value = "changeme-" + STRONG
        assert {(PEPPER, "placeholder")} == problems(identity={"passwords": {"pepper": value}})

    def test_low_entropy_pepper_fails(self):
        """A pepper under 256 bits is weak; a 24-byte random one is too short."""
        value = secrets.token_urlsafe(24)
        assert {(PEPPER, "weak")} == problems(identity={"passwords": {"pepper": value}})

    def test_strong_values_pass(self):
        """Random values of the right size raise nothing."""
        assert set() == problems(
            identity={
                "passwords": {"pepper": STRONG},
                "tokens": {"signing_keys": oct_jwks(secrets.token_bytes(32))},
            },
            metrics={"token": secrets.token_urlsafe(24)},
        )

    def test_bearer_tokens_need_128_bits(self):
        """An admin token of a few characters is weak."""
        assert {("BASTION_HTTP__ADMIN_TOKEN", "weak")} == problems(http={"admin_token": "x7Kp2"})

    def test_short_hmac_key_in_jwks_is_weak(self):
        """An oct key of 16 bytes is under the 256 bits an HS256 key needs."""
        jwks = oct_jwks(secrets.token_bytes(16))
        assert {(KEYS, "weak")} == problems(identity={"tokens": {"signing_keys": jwks}})

    def test_repeated_byte_hmac_key_is_weak(self):
        """An oct key of 32 equal bytes has no strength whatever its length."""
        jwks = oct_jwks(b"\x00" * 32)
        assert {(KEYS, "weak")} == problems(identity={"tokens": {"signing_keys": jwks}})

    @pytest.mark.parametrize(
        "value", ["not json", "{}", '{"keys": []}', '{"keys": [{"kty": "OKP"}]}']
    )
    def test_malformed_jwks_is_invalid(self, value):
        """A JWKS that is not one, or an asymmetric key without its private part, is invalid."""
        assert {(KEYS, "invalid")} == problems(identity={"tokens": {"signing_keys": value}})

    def test_missing_required_secrets_fail_in_production_only(self):
        """Pepper, signing keys, API-key secret and audit key are required in production only."""
        assert {
            (PEPPER, "missing"),
            (KEYS, "missing"),
            (API_KEY_SECRET, "missing"),
            (AUDIT_KEY, "missing"),
        } == problems(environment="production")
        assert set() == problems()

    def test_previous_api_key_secrets_are_checked_one_by_one(self):
        """Each older API-key secret kept for rotation is checked, named by its index."""
        found = problems(identity={"api_keys": {"previous_secrets": [STRONG, "changeme"]}})
        assert {(f"{PREVIOUS_API_KEY_SECRETS}[1]", "placeholder")} == found

    def test_identity_disabled_requires_no_identity_secrets(self):
        """A switched-off identity component needs no pepper nor keys."""
        assert {(AUDIT_KEY, "missing")} == problems(
            environment="production", identity={"enabled": False}
        )

    def test_audit_disabled_requires_no_audit_key(self):
        """A switched-off audit trail needs no encryption key."""
        assert {(PEPPER, "missing"), (KEYS, "missing"), (API_KEY_SECRET, "missing")} == problems(
            environment="production", audit={"enabled": False}
        )

    def test_messages_never_carry_the_value(self):
        """Problem messages name the variable, never the value."""
        value = "Password-for-prod"
        found = check_secrets(Settings(identity={"passwords": {"pepper": value}}))
        assert [PEPPER] == [p.variable for p in found]
        assert value not in found[0].message
        assert PEPPER in found[0].message


class TestEnforce:
    def test_production_stops_with_one_line_per_problem(self):
        """In production every problem is one line of one ConfigurationError, values absent."""
        settings = Settings(
            environment="production",
            identity={"passwords": {"pepper": "changeme"}},
            health={"token": "tok"},
        )
        with pytest.raises(ConfigurationError) as caught:
            enforce_secrets(settings)
        lines = str(caught.value).splitlines()[1:]
        # The placeholder pepper, the missing keys, API-key secret and audit key, the weak
        # health token.
        assert 5 == len(lines)
        assert all(line.startswith("- BASTION_") for line in lines)
        assert "changeme" not in str(caught.value).replace("placeholder", "")

    def test_development_warns_on_weak_value_and_keeps_it(self, caplog_structlog):
        """A weak value given explicitly is a warning in development, not a failure."""
        settings = Settings(
            identity={"passwords": {"pepper": "short"}, "api_keys": {"secret": STRONG}},
            audit={"encryption_key": STRONG},
        )
        assert "short" == enforce_secrets(settings).identity.passwords.pepper.get_secret_value()
        assert [("secret_unfit", PEPPER)] == [(e["event"], e["variable"]) for e in caplog_structlog]
        assert "short" not in repr(caplog_structlog)

    def test_development_generates_a_missing_pepper_once(self, tmp_path, caplog_structlog):
        """A missing pepper is generated (≥256 bits), kept 0600, reused, and warned about."""
        settings = Settings(secrets={"development_directory": str(tmp_path / "dev")})
        first = resolve_development_secrets(settings).identity.passwords.pepper
        second = resolve_development_secrets(settings).identity.passwords.pepper
        assert first is not None
        assert first == second
        assert estimate_entropy(first.get_secret_value()) >= 256
        path = tmp_path / "dev" / PEPPER.lower()
        assert 0o600 == path.stat().st_mode & 0o777
        events = [e for e in caplog_structlog if e["event"] == "secret_generated_for_development"]
        assert [PEPPER, API_KEY_SECRET, AUDIT_KEY] * 2 == [event["variable"] for event in events]
        assert first.get_secret_value() not in repr(caplog_structlog)

    def test_production_never_generates(self, tmp_path):
        """Nothing is generated in production."""
        settings = Settings(
            environment="production", secrets={"development_directory": str(tmp_path)}
        )
        assert resolve_development_secrets(settings).identity.passwords.pepper is None
        assert [] == list(tmp_path.iterdir())


class TestJwksKeys:
    @pytest.mark.parametrize(
        ("key", "problem"),
        [
            ({"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB", "d": "AQ"}, "weak"),
            ({"kty": "RSA", "kid": "r", "n": "!", "e": "AQAB", "d": "AQ"}, "invalid"),
            ({"kty": "oct", "kid": "o", "k": "Y2hhbmdlbWU"}, "placeholder"),
            ({"kty": "oct", "kid": "o", "k": "a"}, "invalid"),
            ("not-a-key", "invalid"),
        ],
    )
    def test_bad_keys(self, key, problem):
        """Short RSA, placeholder or undecodable oct keys and non-keys are named."""
        jwks = json.dumps({"keys": [key]})
        assert {(KEYS, problem)} == problems(identity={"tokens": {"signing_keys": jwks}})

    def test_private_asymmetric_key_passes(self):
        """An Ed25519 private JWK needs no entropy estimate."""
        jwks = json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA"}]})
        assert set() == problems(identity={"tokens": {"signing_keys": jwks}})

    def test_a_public_previous_key_is_a_rotation_overlap_not_a_problem(self):
        """The first key signs and needs its private part; the ones after it may be public."""
        private = {"kty": "OKP", "crv": "Ed25519", "kid": "new", "x": "AA", "d": "AA"}
        public = {"kty": "OKP", "crv": "Ed25519", "kid": "old", "x": "AA"}
        rotating = json.dumps({"keys": [private, public]})
        assert set() == problems(identity={"tokens": {"signing_keys": rotating}})
        only_public = json.dumps({"keys": [public, private]})
        assert {(KEYS, "invalid")} == problems(identity={"tokens": {"signing_keys": only_public}})


class TestEdgeValues:
    def test_empty_value_is_missing(self):
        """An empty (or blank) secret counts as missing, in any environment."""
        assert {(PEPPER, "missing")} == problems(identity={"passwords": {"pepper": "  "}})

    def test_non_ascii_value_is_estimated_generously(self):
        """Non-ASCII characters count a large alphabet (an upper bound), still not a pass alone."""
        assert 0 < estimate_entropy("пароль") < 128

    def test_disabled_identity_generates_nothing(self, tmp_path):
        """No identity, no pepper generated."""
        settings = Settings(
            identity={"enabled": False}, secrets={"development_directory": str(tmp_path)}
        )
        assert resolve_development_secrets(settings).identity.passwords.pepper is None


class TestTemplates:
    @pytest.mark.parametrize("value", ["<your pepper>", "${PEPPER}", "{{ pepper }}", "%PEPPER%"])
    def test_unrendered_templates_are_placeholders(self, value):
        """A value that is a whole template left unrendered is a placeholder."""
        assert {(PEPPER, "placeholder")} == problems(identity={"passwords": {"pepper": value}})

    def test_random_printable_value_with_symbols_is_not_a_placeholder(self):
        """Symbols such as < or ${ inside a random value do not make it a placeholder."""
        value = "q<W9$" + "{" + secrets.token_urlsafe(48) + "}>"
        assert set() == problems(identity={"passwords": {"pepper": value}})
