"""Constrained text fields: bounds answered as INPUT_TOO_LONG, cleaning, slugs, ids, e-mail."""

import unicodedata

import pytest
from fastapi import FastAPI
from guard_support import PROBLEM, install_bare
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from bastion.guard._fields import Email, Identifier, SingleLine, Slug, Text, TextRule
from bastion.testing import lifespan_client

SECRET = "Sup3rS3cretValue"

BIDI_AND_INVISIBLE = (
    "\u200b\u200e\u200f"  # zero-width space, LRM, RLM
    "\u202a\u202b\u202c\u202d\u202e"  # bidi embeddings and overrides
    "\u2060\u2066\u2067\u2068\u2069\ufeff"  # word joiner, bidi isolates, BOM
    "\u061c\u2061\u2064"  # Arabic letter mark, invisible operators
)


# Any code point (lone surrogates included), with the characters the rules are about
# drawn often, and combining marks to give NFC something to compose.
HOSTILE_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from(BIDI_AND_INVISIBLE + "\x00\x07\t\n\r\x1b\x7f\x85\u2028\u2029 "),
        st.sampled_from("e\u0301\u0308a\u030a\u1100\u1161\u11a8"),
    ),
    max_size=60,
)


class Profile(BaseModel):
    title: SingleLine(10) = "t"
    bio: Text(40, multiline=True) = ""
    code: Text(100, min_length=3) = "abc"
    raw: Text(10, normalize=False, strip=False) = ""
    short_bytes: Text(100, max_bytes=8) = ""
    slug: Slug(12) = "a"
    ident: Identifier(12) = "a"
    email: Email = "a@example.com"


def build_app() -> FastAPI:
    app = FastAPI()

    @app.post("/profiles")
    async def create(profile: Profile) -> dict:
        return profile.model_dump()

    return install_bare(app)


@pytest.fixture
async def client():
    async with lifespan_client(build_app()) as client:
        yield client


def problem(response, code: str) -> dict:
    """The response is a 422 problem with this code; return its body."""
    assert (422, PROBLEM) == (response.status_code, response.headers["content-type"])
    body = response.json()
    assert code == body["code"]
    return body


def adapter(annotation) -> TypeAdapter:
    return TypeAdapter(annotation)


class TestTextOverHttp:
    async def test_too_long_is_input_too_long_with_limit(self, client):
        """A title over its bound is 422 INPUT_TOO_LONG naming the field and the bound."""
        response = await client.post("/profiles", json={"title": "x" * 11})
        body = problem(response, "INPUT_TOO_LONG")
        [error] = body["errors"]
        assert {"field": "body.title", "code": "string_too_long", "limit": 10} == {
            key: error[key] for key in ("field", "code", "limit")
        }

    async def test_byte_bound_is_input_too_long_in_bytes(self, client):
        """A value within its characters but over its UTF-8 byte bound names the byte limit."""
        response = await client.post("/profiles", json={"short_bytes": "ééééé"})
        [error] = problem(response, "INPUT_TOO_LONG")["errors"]
        assert (8, "body.short_bytes") == (error["limit"], error["field"])
        assert "bytes" in error["message"]

    async def test_control_character_is_invalid_input_without_echo(self, client):
        """A control character is INVALID_INPUT (not too long), and the value is not echoed."""
        response = await client.post("/profiles", json={"title": SECRET[:5] + "\x07"})
        body = problem(response, "INVALID_INPUT")
        assert ["control_character"] == [error["code"] for error in body["errors"]]
        assert "limit" not in body["errors"][0]
        assert SECRET[:5] not in response.text

    async def test_too_long_and_invalid_together_is_invalid_input(self, client):
        """A body with a too-long field and an invalid field is INVALID_INPUT, listing both."""
        response = await client.post("/profiles", json={"title": "x" * 11, "slug": "No"})
        body = problem(response, "INVALID_INPUT")
        assert {"body.title": "string_too_long", "body.slug": "slug_invalid"} == {
            error["field"]: error["code"] for error in body["errors"]
        }

    async def test_too_short_is_invalid_input_without_limit(self, client):
        """Under ``min_length`` is INVALID_INPUT: a lower bound is not "too long"."""
        response = await client.post("/profiles", json={"code": "  a  "})
        [error] = problem(response, "INVALID_INPUT")["errors"]
        assert "string_too_short" == error["code"]
        assert "limit" not in error

    async def test_lone_surrogate_is_refused(self, client):
        """A JSON string with a lone surrogate escape is refused, not stored or a 500."""
        response = await client.post(
            "/profiles",
            content=b'{"title": "a\\ud800b"}',
            headers={"content-type": "application/json"},
        )
        # The request guard refuses the body before the model sees it; the type refuses
        # the same text from any other source (next test).
        [error] = problem(response, "INVALID_INPUT")["errors"]
        assert ("body", "json_invalid") == (error["field"], error["code"])

    def test_lone_surrogate_refused_by_the_type(self):
        """Text refuses a lone surrogate however it arrived (a form, a file, code)."""
        with pytest.raises(ValidationError) as caught:
            adapter(Text(20)).validate_python("a\ud800b")
        assert "string_unicode" == caught.value.errors()[0]["type"]

    async def test_cleaned_value_reaches_the_app(self, client):
        """The endpoint sees the cleaned text: bidi and zero-width removed, NFC, stripped."""
        response = await client.post(
            "/profiles",
            json={"title": "  Cafe\u0301\u202e\u200b ", "bio": "line one\n\tline two"},
        )
        assert 200 == response.status_code
        assert ("Café", "line one\n\tline two") == (
            response.json()["title"],
            response.json()["bio"],
        )

    async def test_openapi_documents_the_bounds(self, client):
        """The OpenAPI schema states each field's maxLength, pattern and format."""
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["Profile"]
        properties = schema["properties"]
        assert 10 == properties["title"]["maxLength"]
        assert 3 == properties["code"]["minLength"]
        assert 8 == properties["short_bytes"]["x-max-bytes"]
        assert "^[a-z0-9]+(?:-[a-z0-9]+)*$" == properties["slug"]["pattern"]
        assert 12 == properties["ident"]["maxLength"]
        assert ("email", 254) == (properties["email"]["format"], properties["email"]["maxLength"])


class TestTextRules:
    @pytest.mark.parametrize(
        "value",
        [
            "a\x00b",
            "a\x01",
            "a\x1b[31m",
            "a\x7f",
            "a\x85",
            "a\x9f",
            "a\nb",
            "a\rb",
            "a\tb",
            "a\u2028b",
        ],
    )
    def test_single_line_refuses_controls_and_breaks(self, value):
        """Single-line text refuses C0, DEL, C1 and every kind of line break or tab."""
        with pytest.raises(ValidationError) as caught:
            adapter(SingleLine(50)).validate_python(value)
        assert "control_character" == caught.value.errors()[0]["type"]

    @pytest.mark.parametrize("value", ["a\x00b", "a\x0bb", "a\x0cb", "a\x1b", "a\x7f", "a\x85"])
    def test_multiline_still_refuses_nul_and_controls(self, value):
        """Multiline text allows TAB, LF and CR, never NUL or other controls."""
        with pytest.raises(ValidationError):
            adapter(Text(50, multiline=True)).validate_python(value)

    def test_multiline_keeps_line_breaks(self):
        """Multiline text keeps TAB, LF, CR and the Unicode line separator."""
        value = "a\tb\nc\r\nd\u2028e"
        assert value == adapter(Text(50, multiline=True)).validate_python(value)

    def test_invisible_characters_are_removed(self):
        """Every bidi override/isolate and zero-width character is removed from the text."""
        value = "ab" + BIDI_AND_INVISIBLE + "cd"
        assert "abcd" == adapter(Text(50)).validate_python(value)

    def test_joiners_stay(self):
        """ZWJ emoji sequences and ZWNJ in Persian survive: those scripts need the joiners."""
        family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
        persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
        assert family + " " + persian == adapter(Text(50)).validate_python(family + " " + persian)

    def test_length_counts_characters_after_normalisation(self):
        """Ten decomposed é (20 code points) fit in 10 characters once NFC-composed."""
        assert "é" * 10 == adapter(Text(10)).validate_python("e\u0301" * 10)

    def test_length_counts_after_removal(self):
        """Invisible characters removed do not count against the bound."""
        assert "x" * 10 == adapter(Text(10)).validate_python("x\u200b" * 10)

    def test_normalize_false_and_strip_false_keep_the_text(self):
        """Without normalisation or stripping the text keeps its form and spaces."""
        assert " e\u0301 " == adapter(Text(10, normalize=False, strip=False)).validate_python(
            " e\u0301 "
        )

    def test_max_bytes_counts_utf8(self):
        """``max_bytes`` bounds the UTF-8 encoding: 4 characters of 2 bytes fit 8 bytes."""
        text = adapter(Text(100, max_bytes=8))
        assert "éééé" == text.validate_python("éééé")
        with pytest.raises(ValidationError) as caught:
            text.validate_python("ééééé")
        assert {"limit": 8} == caught.value.errors()[0]["ctx"]

    def test_non_string_is_refused(self):
        """A number is not text (no silent coercion)."""
        with pytest.raises(ValidationError):
            adapter(Text(10)).validate_python(12)

    def test_impossible_bounds_fail_at_definition(self):
        """A min_length above max_length is a programming error caught when the type is built."""
        with pytest.raises(ValueError, match="min_length"):
            TextRule(5, min_length=6)

    @given(HOSTILE_TEXT)
    def test_output_is_clean_normalised_and_stable(self, value):
        """Whatever the input, accepted text has no control or bidi character, is NFC, and
        validating it again changes nothing."""
        text = adapter(Text(200, multiline=True))
        try:
            cleaned = text.validate_python(value)
        except ValidationError:
            return
        assert not any(character in BIDI_AND_INVISIBLE for character in cleaned)
        assert not any(
            unicodedata.category(character) == "Cc" and character not in "\t\n\r"
            for character in cleaned
        )
        assert not any(0xD800 <= ord(character) <= 0xDFFF for character in cleaned)
        assert unicodedata.is_normalized("NFC", cleaned)
        assert cleaned == text.validate_python(cleaned)

    @given(HOSTILE_TEXT)
    def test_single_line_output_has_no_line_break(self, value):
        """Accepted single-line text never contains a line break, tab or control character."""
        try:
            cleaned = adapter(SingleLine(100)).validate_python(value)
        except ValidationError:
            return
        assert not any(
            unicodedata.category(character) in ("Cc", "Zl", "Zp") for character in cleaned
        )


class TestSlugAndIdentifier:
    @pytest.mark.parametrize("value", ["a", "abc-123", "x-y-z", "0"])
    def test_valid_slugs(self, value):
        """Lowercase letters, digits and single inner hyphens are a slug."""
        assert value == adapter(Slug()).validate_python(value)

    @pytest.mark.parametrize(
        "value", ["", "-a", "a-", "a--b", "A", "a_b", "a b", "é", "a\n", "a.b", "\uff41"]
    )
    def test_invalid_slugs(self, value):
        """Uppercase, edge or double hyphens, other characters and empty are refused."""
        with pytest.raises(ValidationError) as caught:
            adapter(Slug()).validate_python(value)
        assert "slug_invalid" == caught.value.errors()[0]["type"]

    def test_slug_bound_applies_after_pattern(self):
        """A valid-looking slug over its bound is string_too_long with the limit."""
        with pytest.raises(ValidationError) as caught:
            adapter(Slug(5)).validate_python("abcdef")
        assert ("string_too_long", {"limit": 5}) == (
            caught.value.errors()[0]["type"],
            caught.value.errors()[0]["ctx"],
        )

    @pytest.mark.parametrize("value", ["a", "_x", "Order.Created", "urn:x-1", "a_b.c:d-e"])
    def test_valid_identifiers(self, value):
        """A letter or underscore, then letters, digits and ``_ . : -``."""
        assert value == adapter(Identifier()).validate_python(value)

    @pytest.mark.parametrize("value", ["", "1a", "-a", "a b", "a/b", "é", "a\n", "a;drop"])
    def test_invalid_identifiers(self, value):
        """Leading digits or hyphens, spaces, slashes and non-ASCII are refused."""
        with pytest.raises(ValidationError) as caught:
            adapter(Identifier()).validate_python(value)
        assert "identifier_invalid" == caught.value.errors()[0]["type"]


class TestEmail:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("user@example.com", "user@example.com"),
            ("  User@EXAMPLE.Com ", "User@example.com"),
            ("a.b+tag@sub.example.org", "a.b+tag@sub.example.org"),
            ("x@bücher.example", "x@bücher.example"),
        ],
    )
    def test_valid_addresses_are_normalised(self, value, expected):
        """Addresses are stripped and their domain lowercased; no DNS lookup is made."""
        assert expected == adapter(Email).validate_python(value)

    @pytest.mark.parametrize(
        "value",
        [
            "plainaddress",
            "@example.com",
            "user@",
            "a@b@example.com",
            "user name@example.com",
            "user@exa mple.com",
            "user@localhost",
            "user@example..com",
            "user@-example.com",
            f"{SECRET}<script>@example.com",
        ],
    )
    def test_invalid_addresses_do_not_echo(self, value):
        """An invalid address is email_invalid with a reason that never repeats the input."""
        with pytest.raises(ValidationError) as caught:
            adapter(Email).validate_python(value)
        error = caught.value.errors()[0]
        assert "email_invalid" == error["type"]
        for part in (value, value.split("@")[0] or "@", SECRET, "script"):
            if len(part) > 3:
                assert part not in error["msg"]

    async def test_over_254_is_input_too_long(self, client):
        """An address longer than 254 characters is INPUT_TOO_LONG with limit 254."""
        response = await client.post("/profiles", json={"email": "a" * 250 + "@example.com"})
        [error] = problem(response, "INPUT_TOO_LONG")["errors"]
        assert (254, "body.email") == (error["limit"], error["field"])


class TestParameters:
    async def test_types_work_in_path_and_query(self):
        """The same types validate path and query parameters, with the same error codes."""
        app = FastAPI()

        @app.get("/spaces/{slug}")
        async def read(slug: Slug(), q: Text(5) = "") -> dict:
            return {"slug": slug, "q": q}

        install_bare(app)
        async with lifespan_client(app) as client:
            cleaned = await client.get("/spaces/team-a", params={"q": "\u202ehi"})
            bad_slug = await client.get("/spaces/Team")
            long_query = await client.get("/spaces/team-a", params={"q": "toolong"})
        assert {"slug": "team-a", "q": "hi"} == cleaned.json()
        assert "path.slug" == problem(bad_slug, "INVALID_INPUT")["errors"][0]["field"]
        [error] = problem(long_query, "INPUT_TOO_LONG")["errors"]
        assert ("query.q", 5) == (error["field"], error["limit"])
