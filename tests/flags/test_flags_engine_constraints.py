"""Constraint operators compiled into predicates, with Unleash's semantics."""

from __future__ import annotations

import datetime as dt

import pytest

from bastion.flags._constraints import RegexTimeout, compile_constraint
from bastion.flags._model import LENIENT_OPERANDS, Constraint, Operator


def _holds(operator: Operator, context: dict, *, values=(), value=None, **options) -> bool:
    # Read as an Unleash state or a stored row is (lenient): these tests are about how the
    # engine reads any operand, including those bastion's own documents refuse.
    constraint = Constraint.model_validate(
        {
            "context": "field",
            "operator": operator,
            "values": tuple(values),
            "value": value,
            "inverted": options.pop("inverted", False),
            "case_insensitive": options.pop("case_insensitive", False),
        },
        context=LENIENT_OPERANDS,
    )
    return compile_constraint(constraint, **options)(context)


class TestMembership:
    def test_in_and_not_in_with_missing_field(self):
        """IN needs the field listed; NOT_IN holds when the field is missing."""
        assert [True, False, False, True, False] == [
            _holds(Operator.IN, {"field": "a"}, values=["a", "b"]),
            _holds(Operator.IN, {"field": "c"}, values=["a", "b"]),
            _holds(Operator.IN, {}, values=["a"]),
            _holds(Operator.NOT_IN, {}, values=["a"]),
            _holds(Operator.NOT_IN, {"field": "a"}, values=["a"]),
        ]

    def test_empty_values_list_nothing(self):
        """An empty list: IN matches no one, NOT_IN everyone (Unleash's edge cases)."""
        assert [False, True] == [
            _holds(Operator.IN, {"field": "a"}, values=[]),
            _holds(Operator.NOT_IN, {"field": "a"}, values=[]),
        ]

    def test_case_insensitive_in(self):
        """caseInsensitive folds both sides of IN and NOT_IN, special characters kept."""
        values = ["app", "app2-ios-[v1]"]
        assert [True, True, False, True] == [
            _holds(Operator.IN, {"field": "APP"}, values=values, case_insensitive=True),
            _holds(Operator.IN, {"field": "App2-iOS-[V1]"}, values=values, case_insensitive=True),
            _holds(Operator.IN, {"field": "APP"}, values=values),
            _holds(
                Operator.NOT_IN,
                {"field": "APP"},
                values=values,
                inverted=True,
                case_insensitive=True,
            ),
        ]

    def test_inverted_negates(self):
        """inverted negates IN's answer, missing field included."""
        assert [False, True] == [
            _holds(Operator.IN, {"field": "a"}, values=["a"], inverted=True),
            _holds(Operator.IN, {}, values=["a"], inverted=True),
        ]

    def test_numbers_and_booleans_compare_as_text(self):
        """Non-string scalars compare as the strings Unleash would send."""
        assert [True, True, True] == [
            _holds(Operator.IN, {"field": 42}, values=["42"]),
            _holds(Operator.IN, {"field": 2.0}, values=["2"]),
            _holds(Operator.IN, {"field": True}, values=["true"]),
        ]


class TestStrings:
    @pytest.mark.parametrize(
        ("operator", "value", "expected"),
        [
            (Operator.STR_CONTAINS, "my-email@x", True),
            (Operator.STR_STARTS_WITH, "email-first", True),
            (Operator.STR_STARTS_WITH, "first-email", False),
            (Operator.STR_ENDS_WITH, "first-email", True),
            (Operator.STR_ENDS_WITH, "first-EMAIL", False),
        ],
    )
    def test_operators(self, operator, value, expected):
        """STR_CONTAINS, STR_STARTS_WITH and STR_ENDS_WITH are case-sensitive by default."""
        assert expected == _holds(operator, {"field": value}, values=["email"])

    def test_case_insensitive_and_inverted(self):
        """caseInsensitive folds case; inverted negates, a missing field included."""
        assert [True, True, False] == [
            _holds(
                Operator.STR_ENDS_WITH,
                {"field": "X@EXAMPLE.COM"},
                values=["example.com"],
                case_insensitive=True,
            ),
            _holds(Operator.STR_CONTAINS, {}, values=["a"], inverted=True),
            _holds(Operator.STR_CONTAINS, {}, values=["a"]),
        ]


class TestNumbers:
    @pytest.mark.parametrize(
        ("operator", "context", "expected"),
        [
            (Operator.NUM_EQ, "12.0", True),
            (Operator.NUM_EQ, 12, True),
            (Operator.NUM_GT, "13", True),
            (Operator.NUM_GT, "12", False),
            (Operator.NUM_GTE, "12", True),
            (Operator.NUM_LT, "-1", True),
            (Operator.NUM_LTE, "12.5", False),
            (Operator.NUM_EQ, "twelve", False),
            (Operator.NUM_EQ, "1_2", False),
            (Operator.NUM_EQ, True, False),
            (Operator.NUM_EQ, None, False),
        ],
    )
    def test_operators(self, operator, context, expected):
        """NUM_* parse both sides as numbers; what does not parse is false."""
        assert expected == _holds(operator, {"field": context}, value="12")

    def test_invalid_bound_never_holds(self):
        """A constraint whose own value is not a number holds for no one."""
        assert not _holds(Operator.NUM_EQ, {"field": "1"}, value="one")


class TestDates:
    def test_after_and_before_with_time_zones(self):
        """DATE_AFTER and DATE_BEFORE compare instants, whatever the time zones."""
        limit = "2022-01-22T13:00:00.000+02:00"
        assert [True, False, True] == [
            _holds(Operator.DATE_AFTER, {"field": "2022-01-22T11:30:00Z"}, value=limit),
            _holds(Operator.DATE_BEFORE, {"field": "2022-01-22T11:30:00Z"}, value=limit),
            _holds(
                Operator.DATE_BEFORE, {"field": dt.datetime(2022, 1, 1, tzinfo=dt.UTC)}, value=limit
            ),
        ]

    def test_current_time_defaults_to_clock(self):
        """A constraint on currentTime reads the clock when the context brings no time."""
        clock = lambda: dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # noqa: E731
        constraint = Constraint(
            context="currentTime", operator=Operator.DATE_AFTER, value="2029-12-31T00:00:00Z"
        )
        predicate = compile_constraint(constraint, now=clock)
        assert (True, False) == (predicate({}), predicate({"currentTime": "2020-01-01T00:00:00Z"}))

    def test_unparsable_dates_are_false(self):
        """A context date that does not parse is false (true only when inverted)."""
        assert (False, True) == (
            _holds(Operator.DATE_AFTER, {"field": "yesterday"}, value="2020-01-01T00:00:00Z"),
            _holds(
                Operator.DATE_AFTER,
                {"field": "yesterday"},
                value="2020-01-01T00:00:00Z",
                inverted=True,
            ),
        )


class TestSemver:
    @pytest.mark.parametrize(
        ("operator", "version", "expected"),
        [
            (Operator.SEMVER_EQ, "1.2.2+build.7", True),
            (Operator.SEMVER_GT, "1.2.2+build.7", False),
            (Operator.SEMVER_GT, "1.10.0", True),
            (Operator.SEMVER_GTE, "1.2.2", True),
            (Operator.SEMVER_LT, "1.2.2-rc.1", True),
            (Operator.SEMVER_LTE, "1.2.3", False),
            (Operator.SEMVER_EQ, "v1.2.2", False),
            (Operator.SEMVER_EQ, "1.2", False),
        ],
    )
    def test_precedence(self, operator, version, expected):
        """SEMVER_* follow SemVer 2 precedence: prereleases first, build metadata ignored."""
        assert expected == _holds(operator, {"field": version}, value="1.2.2")

    def test_prerelease_ordering(self):
        """alpha < alpha.1 < beta < rc < release."""
        assert [True, True, True, True] == [
            _holds(Operator.SEMVER_GT, {"field": "2.0.0-alpha.1"}, value="2.0.0-alpha"),
            _holds(Operator.SEMVER_GT, {"field": "2.0.0-beta"}, value="2.0.0-alpha.1"),
            _holds(Operator.SEMVER_LT, {"field": "2.0.0-beta.9"}, value="2.0.0-rc"),
            _holds(Operator.SEMVER_GT, {"field": "2.0.0"}, value="2.0.0-rc"),
        ]


class TestRegex:
    def test_search_flags_and_inversion(self):
        """REGEX searches; caseInsensitive adds the flag, inverted negates."""
        assert [True, False, True, True] == [
            _holds(Operator.REGEX, {"field": "a cat b"}, value=r"\bcat\b"),
            _holds(Operator.REGEX, {"field": "Cat"}, value="^cat$"),
            _holds(Operator.REGEX, {"field": "Cat"}, value="^cat$", case_insensitive=True),
            _holds(Operator.REGEX, {"field": "dog"}, value="^cat$", inverted=True),
        ]

    @pytest.mark.parametrize("pattern", ["(regex", "^(?=a)b$", r"^(a)\1$", "(?>a)", "a++"])
    def test_patterns_unleash_rejects_never_match(self, pattern):
        """Invalid patterns, and those Unleash's engine rejects, never match, inverted or not."""
        assert (False, False) == (
            _holds(Operator.REGEX, {"field": "aa"}, value=pattern),
            _holds(Operator.REGEX, {"field": "aa"}, value=pattern, inverted=True),
        )

    def test_timeout_ends_the_evaluation_and_is_reported(self):
        """A search past the time bound raises RegexTimeout, even inverted, and is reported."""
        errors = []
        constraint = Constraint(
            context="field", operator=Operator.REGEX, value="(a|aa)+$", inverted=True
        )
        predicate = compile_constraint(constraint, regex_timeout=0.001, on_error=errors.append)
        with pytest.raises(RegexTimeout):
            predicate({"field": "a" * 40 + "b"})
        assert 1 == len(errors)
        assert "a" * 40 not in errors[0]


class TestCidr:
    @pytest.mark.parametrize(
        ("address", "expected"),
        [
            ("10.1.2.3", True),
            ("192.168.1.1", True),
            ("192.168.1.2", False),
            ("2001:db8::42", True),
            ("::ffff:10.0.0.1", True),
            ("not-an-ip", False),
        ],
    )
    def test_networks_and_exact_addresses(self, address, expected):
        """IN_CIDR matches networks and exact addresses; invalid entries are ignored."""
        values = ["10.0.0.0/8", "192.168.1.1", "2001:db8::/32", "bad/99"]
        assert expected == _holds(Operator.IN_CIDR, {"field": address}, values=values)


class TestDefaults:
    def test_defaults_fill_missing_fields(self):
        """A field the context lacks takes the set's default (environment, appName)."""
        constraint = Constraint(context="environment", operator=Operator.IN, values=("prod",))
        predicate = compile_constraint(constraint, defaults={"environment": "prod"})
        assert (True, False) == (predicate({}), predicate({"environment": "dev"}))
