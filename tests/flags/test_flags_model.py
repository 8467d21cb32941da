"""Bastion's flag format refuses what would cost too much, corrupt logs or never match."""

from __future__ import annotations

import secrets

import orjson
import pytest
from pydantic import ValidationError

import bastion
from bastion.flags._engine import FlagSet
from bastion.flags._model import (
    JSON_DEPTH_MAX,
    LENIENT_OPERANDS,
    Constraint,
    Flag,
    FlagType,
    Operator,
    Prerequisite,
    Rollout,
    Rule,
    Segment,
    TenantOverride,
    Variant,
    VariantOverride,
    VariantPayload,
)
from bastion.flags._unleash import flags_from_unleash
from bastion.testing import lifespan_client


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


BAD_OPERANDS = {
    "regex": ({"operator": "REGEX", "value": "("}, "value", "invalid_regex"),
    "regex-look-ahead": ({"operator": "REGEX", "value": "a(?=b)"}, "value", "invalid_regex"),
    "regex-empty": ({"operator": "REGEX", "value": ""}, "value", "invalid_regex"),
    "number": ({"operator": "NUM_GT", "value": "ten"}, "value", "invalid_number"),
    "number-underscore": ({"operator": "NUM_EQ", "value": "1_000"}, "value", "invalid_number"),
    "date": ({"operator": "DATE_AFTER", "value": "next tuesday"}, "value", "invalid_date"),
    "semver": ({"operator": "SEMVER_GTE", "value": "1.2"}, "value", "invalid_semver"),
    "cidr": (
        {"operator": "IN_CIDR", "values": ["10.0.0.0/8", "10.0.0.0/33"]},
        "values.1",
        "invalid_cidr",
    ),
}
GOOD_OPERANDS = [
    {"operator": "REGEX", "value": "^[a-z]+@example\\.com$"},
    {"operator": "NUM_LTE", "value": "-1.5"},
    {"operator": "DATE_BEFORE", "value": "2026-01-31T12:00:00Z"},
    {"operator": "SEMVER_LT", "value": "2.0.0-beta.1"},
    {"operator": "IN_CIDR", "values": ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"]},
    # Only the field the operator reads is checked: IN lists any text.
    {"operator": "IN", "values": ["(", "ten"]},
]


def _with_constraint(constraint: dict) -> dict:
    """A flag whose second rule's second constraint is ``constraint``."""
    ok = {"context": "country", "operator": "IN", "values": ["NO"]}
    return {
        "key": "f",
        "enabled": True,
        "rules": [
            {"constraints": [ok]},
            {"constraints": [ok, {"context": "field", **constraint}]},
        ],
    }


class TestOperands:
    @pytest.mark.parametrize(("operand", "where", "code"), BAD_OPERANDS.values(), ids=BAD_OPERANDS)
    def test_bastion_format_refuses_operands_that_never_match(self, operand, where, code):
        """A document in bastion's format with an unparseable operand is refused, located."""
        with pytest.raises(ValidationError) as caught:
            Flag.model_validate(_with_constraint(operand))
        assert [(f"rules.1.constraints.1.{where}", code)] == [
            (".".join(map(str, e["loc"])), e["type"]) for e in caught.value.errors()
        ]

    @pytest.mark.parametrize(("operand", "where", "code"), BAD_OPERANDS.values(), ids=BAD_OPERANDS)
    def test_segments_refuse_them_too(self, operand, where, code):
        """A segment's constraints are checked like a rule's."""
        with pytest.raises(ValidationError) as caught:
            Segment.model_validate({"name": "s", "constraints": [{"context": "x", **operand}]})
        assert [code] == [e["type"] for e in caught.value.errors()]

    @pytest.mark.parametrize("operand", GOOD_OPERANDS, ids=[o["operator"] for o in GOOD_OPERANDS])
    def test_valid_operands_are_accepted(self, operand):
        """Operands the engine can read pass."""
        Flag.model_validate(_with_constraint(operand))

    @pytest.mark.parametrize(("operand", "where", "code"), BAD_OPERANDS.values(), ids=BAD_OPERANDS)
    def test_lenient_context_keeps_them_and_code_is_refused(self, operand, where, code):
        """Stored rows (and the Unleash reader) still load such a constraint, which never
        matches; a constraint built in code is refused like a document's."""
        flag = Flag.model_validate(_with_constraint(operand), context=LENIENT_OPERANDS)
        with pytest.raises(ValidationError) as caught:
            Constraint(context="field", **operand)
        assert [code] == [e["type"] for e in caught.value.errors()]
        only = flag.model_copy(update={"rules": flag.rules[1:]})
        assert not FlagSet.from_flags([only]).is_enabled("f", {"country": "NO", "field": "x"})

    @pytest.mark.parametrize(("operand", "where", "code"), BAD_OPERANDS.values(), ids=BAD_OPERANDS)
    def test_unleash_reader_stays_lenient(self, operand, where, code):
        """An Unleash state with such an operand loads (the client spec requires it): no match."""
        unleash_operand = {"contextName": "field", "operator": operand["operator"]}
        unleash_operand.update({k: v for k, v in operand.items() if k in ("value", "values")})
        state = {
            "features": [
                {
                    "name": "f",
                    "enabled": True,
                    "strategies": [{"name": "default", "constraints": [unleash_operand]}],
                }
            ]
        }
        flags, _ = flags_from_unleash(state, strict=True)
        assert 1 == len(flags[0].rules[0].constraints)
        flag_set = FlagSet.from_unleash(state)
        assert not flag_set.is_enabled("f", {"field": "192.168.0.1"})


class TestStrictTypes:
    @pytest.mark.parametrize(
        "flag",
        [
            {"key": "f", "enabled": "yes"},
            {"key": "f", "enabled": 1},
            {"key": "f", "client_visible": "true"},
            {"key": "f", "rules": [{"disabled": "no"}]},
            {"key": "f", "tenants": {"acme": {"enabled": "on"}}},
            {"key": "f", "prerequisites": [{"flag": "g", "enabled": 0}]},
            {
                "key": "f",
                "rules": [{"constraints": [{"context": "c", "operator": "IN", "inverted": "y"}]}],
            },
        ],
        ids=[
            "enabled",
            "enabled-int",
            "client-visible",
            "disabled",
            "tenant",
            "prereq",
            "inverted",
        ],
    )
    def test_booleans_are_json_booleans(self, flag):
        """A boolean field takes true or false, not "yes", "true", 1 or 0."""
        with pytest.raises(ValidationError) as caught:
            Flag.model_validate(flag)
        assert {"bool_type"} == {e["type"] for e in caught.value.errors()}

    def test_long_group_ids_load(self):
        """A group id has no length bound of its own: rows stored with a long one (Unleash
        allows any) must keep loading; the document's size bounds it."""
        assert "g" * 300 == Rollout.model_validate({"group_id": "g" * 300}).group_id


TOKEN = secrets.token_urlsafe(32)


@pytest.fixture
async def admin(sqlite_url):
    """An operator's client of an app on its own SQLite file."""
    app = bastion.create_app(
        database={"url": sqlite_url},
        migrations={"mode": "auto"},
        logging={"level": "WARNING", "format": "json"},
        http={"admin_token": TOKEN},
        identity={"passwords": {"time_cost": 1, "memory_cost": 8}},
        audit={"mode": "sync", "checkpoint_interval": 0},
        flags={"store_url": "memory://"},
    )
    async with lifespan_client(app, headers={"authorization": f"Bearer {TOKEN}"}) as client:
        yield client


class TestAdminRoutes:
    async def test_bad_operands_are_422_naming_the_value(self, admin):
        """Each unparseable operand is INVALID_INPUT on create, its field and code named."""
        answers = {}
        for name, (operand, _where, _code) in BAD_OPERANDS.items():
            response = await admin.post("/admin/features", json=_with_constraint(operand))
            body = response.json()
            answers[name] = (
                response.status_code,
                body["code"],
                [(e["field"], e["code"]) for e in body["errors"]],
            )
        assert {
            name: (422, "INVALID_INPUT", [(f"body.rules.1.constraints.1.{where}", code)])
            for name, (_operand, where, code) in BAD_OPERANDS.items()
        } == answers
        assert [] == (await admin.get("/admin/features")).json()["flags"]

    async def test_update_refuses_them_and_an_import_reads_them_as_stored(self, admin):
        """PUT refuses a bad regex and a string for a boolean; an import (an export must
        import back whatever it holds) reads the regex as a stored row: never matching."""
        created = await admin.post("/admin/features", json=_with_constraint(GOOD_OPERANDS[0]))
        assert 201 == created.status_code, created.text
        headers = {"if-match": created.headers["etag"]}
        bad_regex = _with_constraint({"operator": "REGEX", "value": "("})
        put = await admin.put("/admin/features/f", json=bad_regex, headers=headers)
        yes = await admin.put(
            "/admin/features/f", json={"key": "f", "enabled": "yes"}, headers=headers
        )
        assert [422, 422] == [put.status_code, yes.status_code]
        assert ("invalid_regex", "bool_type") == (
            put.json()["errors"][0]["code"],
            yes.json()["errors"][0]["code"],
        )
        stored = (await admin.get("/admin/features/f")).json()
        assert (1, True) == (stored["version"], stored["flag"]["enabled"])
        imported = await admin.post("/admin/features/import", json={"flags": [bad_regex]})
        assert 200 == imported.status_code, imported.text
        read_back = await admin.get("/admin/features/f")
        assert 200 == read_back.status_code, read_back.text
        assert "(" == read_back.json()["flag"]["rules"][1]["constraints"][1]["value"]

    async def test_unleash_import_stays_lenient(self, admin):
        """An Unleash state with a bad regex imports, and the stored flag reads back."""
        state = {
            "features": [
                {
                    "name": "u",
                    "enabled": True,
                    "strategies": [
                        {
                            "name": "default",
                            "constraints": [
                                {"contextName": "userId", "operator": "REGEX", "value": "("}
                            ],
                        }
                    ],
                }
            ]
        }
        response = await admin.post("/admin/features/import", json=state)
        assert response.status_code in (200, 201), response.text
        stored = (await admin.get("/admin/features/u")).json()
        assert "(" == stored["flag"]["rules"][0]["constraints"][0]["value"], stored
