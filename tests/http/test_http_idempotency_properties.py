"""Invariants of key parsing, fingerprints and record keys, checked with Hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.errors import InvalidInput
from bastion.http._idempotency import fingerprint, parse_idempotency_key, record_key

MAX = 255
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
BARE = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\')
KEYS = st.text(PRINTABLE, min_size=1, max_size=MAX)
BARE_KEYS = st.text(BARE, min_size=1, max_size=MAX)


def sf_string(key: str) -> bytes:
    """Serialize ``key`` as an RFC 8941 sf-string."""
    return ('"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


class TestKeyParsing:
    @given(KEYS)
    def test_any_printable_key_round_trips_as_an_sf_string(self, key):
        """Every key of 1..max printable characters, quoted as the draft says, parses back."""
        assert key == parse_idempotency_key(sf_string(key), MAX)

    @given(BARE_KEYS)
    def test_bare_and_quoted_forms_name_the_same_key(self, key):
        """The bare token form and its sf-string form are one key."""
        assert parse_idempotency_key(key.encode(), MAX) == parse_idempotency_key(
            sf_string(key), MAX
        )

    @given(st.text(PRINTABLE, min_size=MAX + 1, max_size=MAX + 40))
    def test_longer_keys_are_refused(self, key):
        """A key over max_key_length is refused, quoted or bare."""
        with pytest.raises(InvalidInput):
            parse_idempotency_key(sf_string(key), MAX)

    @given(st.binary(min_size=0, max_size=80))
    def test_any_bytes_parse_or_raise_invalid_input(self, raw):
        """Whatever a client sends, the parser returns a printable key or raises InvalidInput."""
        field = None
        try:
            key = parse_idempotency_key(raw, MAX)
        except InvalidInput as error:
            field = error.errors[0].field
        if field is not None:
            assert "header.Idempotency-Key" == field
        else:
            assert 1 <= len(key) <= MAX
            assert all(0x20 <= ord(char) <= 0x7E for char in key)

    @given(st.text(min_size=1, max_size=20).filter(lambda t: any(ord(c) > 0x7E for c in t)))
    def test_non_ascii_keys_are_refused(self, key):
        """Keys are ASCII: anything else is refused in both forms."""
        with pytest.raises(InvalidInput):
            parse_idempotency_key(key.encode(), MAX)
        with pytest.raises(InvalidInput):
            parse_idempotency_key(sf_string(key), MAX)


PARTS = st.tuples(
    st.sampled_from(["POST", "PATCH"]),
    st.binary(max_size=20),
    st.binary(max_size=20),
    st.binary(max_size=20),
    st.binary(max_size=200),
)


class TestFingerprint:
    @given(PARTS, st.lists(st.integers(min_value=0, max_value=200), max_size=5))
    def test_chunking_does_not_matter(self, parts, cuts):
        """A body fingerprints alike however the server chunked it."""
        method, path, query, content_type, body = parts
        points = sorted({0, len(body), *(cut % (len(body) + 1) for cut in cuts)})
        chunks = [body[a:b] for a, b in itertools.pairwise(points)]
        assert fingerprint(method, path, query, content_type, [body]) == fingerprint(
            method, path, query, content_type, chunks
        )

    @given(PARTS, PARTS)
    def test_different_requests_differ(self, one, other):
        """Two requests differing in method, path, query, content type or body differ."""
        a = fingerprint(one[0], one[1], one[2], one[3], [one[4]])
        b = fingerprint(other[0], other[1], other[2], other[3], [other[4]])
        assert (one == other) == (a == b)


SCOPES = st.tuples(
    st.one_of(st.none(), st.text(max_size=10)),
    st.text(max_size=10),
    st.sampled_from(["POST", "PATCH"]),
    st.text(max_size=10),
    st.text(min_size=1, max_size=10),
)


class TestRecordKey:
    @given(SCOPES, SCOPES)
    def test_scopes_never_collide(self, one, other):
        """Two (tenant, caller, method, route, key) differ exactly when their record keys do."""

        def key(scope):
            tenant, caller, method, template, raw = scope
            return record_key(
                tenant=tenant, caller=caller, method=method, template=template, key=raw
            )

        assert (one == other) == (key(one) == key(other))
