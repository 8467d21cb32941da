"""Bastion's flag format refuses what would cost too much or corrupt logs: depth, sizes, keys."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from bastion.flags._model import (
    JSON_DEPTH_MAX,
    Constraint,
    Flag,
    FlagType,
    Operator,
    Prerequisite,
    Rule,
    Segment,
    TenantOverride,
    Variant,
    VariantOverride,
    VariantPayload,
)


def _nested(depth: int) -> object:
    """A JSON value ``depth`` containers deep (alternating objects and lists)."""
    value: object = 1
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


IN = Constraint(context="country", operator=Operator.IN, values=("NO",))


class TestJsonDepth:
    def test_default_at_the_limit_is_accepted(self):
        """A JSON default nested exactly JSON_DEPTH_MAX levels deep is a valid flag."""
        flag = Flag(
            key="f",
            type=FlagType.JSON,
            default=_nested(JSON_DEPTH_MAX),
            variants=(Variant(name="v", value={}),),
        )
        assert _nested(JSON_DEPTH_MAX) == flag.default

    def test_default_too_deep_is_refused(self):
        """A JSON default one level deeper than the limit is a validation error."""
        with pytest.raises(ValidationError, match="deeper than 32"):
            Flag(
                key="f",
                type=FlagType.JSON,
                default=_nested(JSON_DEPTH_MAX + 1),
                variants=(Variant(name="v", value={}),),
            )

    def test_variant_value_too_deep_is_refused(self):
        """A variant value nested past the limit is refused."""
        with pytest.raises(ValidationError, match="deeper than 32"):
            Variant(name="v", value=_nested(JSON_DEPTH_MAX + 1))

    def test_json_payload_too_deep_is_refused(self):
        """An Unleash json payload whose document nests past the limit is refused."""
        payload = VariantPayload(type="json", value=orjson.dumps(_nested(40)).decode())
        with pytest.raises(ValidationError, match="deeper than 32"):
            Variant(name="v", payload=payload)

    def test_very_deep_value_fails_cleanly(self):
        """A value thousands of levels deep is a validation error, not a RecursionError."""
        value: object = 1
        for _ in range(5000):
            value = [value]
        with pytest.raises(ValidationError, match="deeper than 32"):
            Flag(key="f", type=FlagType.JSON, default=value, variants=(Variant(name="v", value=1),))


class TestSizes:
    @pytest.mark.parametrize(
        ("build", "limit"),
        [
            (lambda n: Flag(key="f", rules=(Rule(),) * n), 1000),
            (lambda n: Rule(constraints=(IN,) * n), 100),
            (lambda n: Segment(name="s", constraints=(IN,) * n), 100),
            (
                lambda n: Constraint(
                    context="c", operator=Operator.IN, values=tuple(map(str, range(n)))
                ),
                1000,
            ),
            (
                lambda n: Flag(
                    key="f", variants=tuple(Variant(name=f"v{i}", weight=1) for i in range(n))
                ),
                100,
            ),
            (
                lambda n: Rule(variants=tuple(Variant(name=f"v{i}", weight=1) for i in range(n))),
                100,
            ),
            (
                lambda n: Flag(
                    key="f", tenants={f"t{i}": TenantOverride(enabled=True) for i in range(n)}
                ),
                1000,
            ),
            (lambda n: Flag(key="f", tags=tuple(f"t{i}" for i in range(n))), 50),
            (lambda n: VariantOverride(context="userId", values=tuple(map(str, range(n)))), 1000),
        ],
        ids=[
            "rules",
            "constraints",
            "segment-constraints",
            "values",
            "variants",
            "rule-variants",
            "tenants",
            "tags",
            "override-values",
        ],
    )
    def test_limit_is_accepted_and_one_more_refused(self, build, limit):
        """Each collection takes exactly its limit and refuses one item more."""
        build(limit)
        with pytest.raises(ValidationError):
            build(limit + 1)

    def test_tenant_id_length(self):
        """A tenant override's id is at most 200 characters."""
        Flag(key="f", tenants={"t" * 200: TenantOverride(enabled=True)})
        with pytest.raises(ValidationError):
            Flag(key="f", tenants={"t" * 201: TenantOverride(enabled=True)})

    def test_tag_length(self):
        """A tag is at most 100 characters and not empty."""
        Flag(key="f", tags=("t" * 100,))
        for tag in ("t" * 101, ""):
            with pytest.raises(ValidationError):
                Flag(key="f", tags=(tag,))


FORBIDDEN = {
    "slash": "a/b",
    "nul": "a\x00b",
    "newline": "a\nb",
    "delete": "a\x7fb",
    "c1 control": "a\x85b",
    "bidi override": "admin\u202e",
    "zero-width space": "be\u200bta",
    "zero-width joiner": "be\u200dta",
    "byte order mark": "\ufeffbeta",
    "line separator": "a\u2028b",
    "paragraph separator": "a\u2029b",
}


class TestKeys:
    @pytest.mark.parametrize("key", FORBIDDEN.values(), ids=FORBIDDEN.keys())
    def test_flag_key_refuses(self, key):
        """A flag key refuses '/', control and format characters and line separators."""
        with pytest.raises(ValidationError):
            Flag(key=key)

    @pytest.mark.parametrize("key", FORBIDDEN.values(), ids=FORBIDDEN.keys())
    def test_names_refuse(self, key):
        """Segment, variant and prerequisite names, tenant ids and rule ids refuse them too."""
        builders = [
            lambda: Segment(name=key),
            lambda: Variant(name=key),
            lambda: Prerequisite(flag=key),
            lambda: Flag(key="f", tenants={key: TenantOverride(enabled=True)}),
            lambda: Rule(id=key),
        ]
        for build in builders:
            with pytest.raises(ValidationError):
                build()

    @pytest.mark.parametrize(
        "key", ["checkout.v2", "blåbær-test", "機能フラグ", "with space", "emoji-🚀", "a:b_c-d"]
    )
    def test_printable_unicode_keys_are_accepted(self, key):
        """Printable Unicode (letters, spaces, symbols) is a valid key, as in Unleash."""
        assert key == Flag(key=key).key

    def test_context_names_refuse_format_characters(self):
        """A constraint's context name cannot hide a bidi override or zero-width character."""
        for name in ("user\u200bId", "country\u202e"):
            with pytest.raises(ValidationError):
                Constraint(context=name, operator=Operator.IN, values=("x",))

    def test_key_bounds(self):
        """Keys are 1 to 200 characters."""
        Flag(key="k" * 200)
        for key in ("", "k" * 201):
            with pytest.raises(ValidationError):
                Flag(key=key)
