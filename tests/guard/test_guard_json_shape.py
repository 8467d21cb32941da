"""The JSON shape check on its own: verdicts against a reference count, and the cheap bounds."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.guard._json_shape import inspect_json
from bastion.guard._request import check_percent_encoded

# Strings full of the bytes the cheap bounds count, so bounds overshoot and walks run.
TRICKY_TEXT = st.text(alphabet=st.sampled_from('[]{},:"\\ab\u00e9\u6f22'), max_size=12)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(TRICKY_TEXT, children, max_size=6)
    ),
    max_leaves=60,
)


def reference_shape(value: Any) -> tuple[int, int]:
    """Depth and value count by plain recursion: the definition in the module docstring."""
    if isinstance(value, dict):
        shapes = [reference_shape(v) for v in value.values()]
    elif isinstance(value, list):
        shapes = [reference_shape(v) for v in value]
    else:
        return 0, 1
    return 1 + max((d for d, _ in shapes), default=0), 1 + sum(n for _, n in shapes)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


class TestShape:
    @settings(max_examples=400, deadline=None)
    @given(
        value=JSON_VALUES,
        max_depth=st.integers(1, 8),
        max_elements=st.integers(1, 80),
        pretty=st.booleans(),
    )
    def test_verdict_matches_the_reference_count(self, value, max_depth, max_elements, pretty):
        """A document is refused iff its depth or value count passes a limit, and for that one."""
        body = json.dumps(value, indent=1 if pretty else None, ensure_ascii=False).encode()
        depth, elements = reference_shape(value)
        verdict = inspect_json(body, max_depth=max_depth, max_elements=max_elements)
        if depth <= max_depth and elements <= max_elements:
            assert verdict is None
        else:
            assert verdict is not None
            if verdict.code == "too_deep":
                assert (depth > max_depth, max_depth) == (True, verdict.limit)
            else:
                assert ("too_many_elements", True, max_elements) == (
                    verdict.code,
                    elements > max_elements,
                    verdict.limit,
                )

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=64))
    def test_any_bytes_get_a_verdict_never_an_error(self, data):
        """Arbitrary bytes are either accepted as JSON orjson parses, or refused with a code."""
        verdict = inspect_json(data, max_depth=4, max_elements=16)
        if verdict is None:
            if data:
                orjson.loads(data)
        else:
            assert verdict.code in {
                "invalid_utf8",
                "nul_character",
                "json_invalid",
                "too_deep",
                "too_many_elements",
            }
            assert data.decode("latin-1") not in verdict.message or len(data) < 2

    def test_exactly_at_the_limits_passes(self):
        """Depth and count equal to their limits are fine; one more of either is not."""
        assert inspect_json(nested(3), max_depth=3, max_elements=10) is None
        assert "too_deep" == inspect_json(nested(4), max_depth=3, max_elements=10).code
        assert inspect_json(b"[1,2,3]", max_depth=3, max_elements=4) is None
        assert "too_many_elements" == inspect_json(b"[1,2,3,4]", max_depth=3, max_elements=4).code

    def test_keys_are_not_values(self):
        """``{"a": 1}`` holds two values (the object and 1): keys are not counted."""
        assert inspect_json(b'{"a": 1, "b": 2}', max_depth=1, max_elements=3) is None
        assert inspect_json(b'{"a": 1, "b": 2}', max_depth=1, max_elements=2) is not None

    def test_empty_containers_count_for_depth(self):
        """``[[]]`` is two deep even though the inner array is empty."""
        assert "too_deep" == inspect_json(b"[[]]", max_depth=1, max_elements=10).code
        assert "too_deep" == inspect_json(b'{"a": {}}', max_depth=1, max_elements=10).code

    def test_deeper_than_orjson_parses_is_too_deep(self):
        """orjson refuses more than 1024 levels: that is too deep, not malformed."""
        verdict = inspect_json(nested(1025), max_depth=512, max_elements=10_000)
        assert ("json_depth", "too_deep", 512) == (verdict.reason, verdict.code, verdict.limit)

    def test_brackets_in_strings_do_not_count(self):
        """Brackets, commas and colons inside strings make the bounds loose, never the verdict."""
        body = json.dumps({"text": "[[[[{{{{,,,,::::" * 10}).encode()
        assert inspect_json(body, max_depth=1, max_elements=2) is None

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            (b'"\xff"', "invalid_utf8"),
            (b'["\xc3\x28"]', "invalid_utf8"),
            (b'"\x00"', "nul_character"),
            (b"[1]\x00", "nul_character"),
            (b'["\\u0000"]', "nul_character"),
            (b'{"\\u0000": 1}', "nul_character"),
            (b'"\\u0000"', "nul_character"),
            (b"[1,]", "json_invalid"),
            (b"NaN", "json_invalid"),
            (b"1e400", "json_invalid"),
            (b"   ", "json_invalid"),
            (b"\xef\xbb\xbf{}", "json_invalid"),
        ],
    )
    def test_refused_documents(self, body, code):
        """Encoding, NUL and syntax faults each get their own code."""
        assert code == inspect_json(body, max_depth=8, max_elements=100).code

    @pytest.mark.parametrize("body", [b'"\\\\u0000"', b'["a\\\\u0000b"]', b'"u0000"'])
    def test_lookalikes_of_nul_pass(self, body):
        """An escaped backslash before ``u0000`` is not a NUL character."""
        assert inspect_json(body, max_depth=8, max_elements=100) is None

    def test_invalid_json_message_gives_the_position(self):
        """The message names line and column and nothing of the content."""
        verdict = inspect_json(b'{\n "password": hunter2}', max_depth=8, max_elements=100)
        assert "line 2" in verdict.message
        assert "hunter2" not in verdict.message
        assert "password" not in verdict.message

    def test_an_empty_body_is_left_to_the_app(self):
        """No bytes at all: nothing to check."""
        assert inspect_json(b"", max_depth=1, max_elements=1) is None


class TestPercentEncoding:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (b"a=1&b=2", None),
            (b"q=bl%C3%A5", None),
            (b"q=a+b", None),
            (b"q=%", None),  # a lone percent sign decodes to itself
            (b"q=%zz", None),
            (b"q=%FF", "invalid_utf8"),
            (b"q=\xff", "invalid_utf8"),
            (b"q=\xc3\xa5", None),
            (b"q=%ED%A0%80", "invalid_utf8"),
            (b"q=%00", "nul_character"),
            (b"q=\x00", "nul_character"),
        ],
    )
    def test_verdicts(self, raw, expected):
        """Valid UTF-8 without NUL after percent-decoding passes; anything else is named."""
        assert expected == check_percent_encoded(raw)

    @given(text=st.text(max_size=40))
    def test_encoded_text_passes_unless_it_holds_nul(self, text):
        """Any Unicode text, percent-encoded, passes unless it contains NUL."""
        from urllib.parse import quote

        raw = quote(text.encode("utf-8", "surrogatepass"), safe="").encode()
        has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        expected = "nul_character" if "\x00" in text else "invalid_utf8" if has_surrogate else None
        assert expected == check_percent_encoded(raw)
