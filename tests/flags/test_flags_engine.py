"""The flag engine on bastion's own format: order, overrides, prerequisites, schedule, answers."""

from __future__ import annotations

import datetime as dt
import json
from typing import ClassVar

import mmh3
import pytest
import structlog

from bastion.flags import _engine as engine
from bastion.flags._engine import FlagSet
from bastion.flags._evaluation import EvaluationContext, Reason
from bastion.flags._flags import UNKNOWN_FLAG, Flags
from bastion.flags._model import (
    Constraint,
    Flag,
    FlagType,
    Operator,
    Prerequisite,
    Rollout,
    Rule,
    ScheduledChange,
    Segment,
    TenantOverride,
    Variant,
    VariantOverride,
)

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def _set(*flags: Flag, segments=(), **options) -> FlagSet:
    options.setdefault("now", NOW)
    return FlagSet.from_flags(flags, segments, **options)


def _bucket(group: str, value: str) -> int:
    return mmh3.hash(f"{group}:{value}", 0, signed=False) % 100 + 1


def _users_in_buckets(group: str, low: int, high: int, count: int = 5) -> list[str]:
    """User ids whose rollout bucket for ``group`` lies in [low, high]."""
    found = []
    for n in range(100_000):
        if low <= _bucket(group, f"u{n}") <= high:
            found.append(f"u{n}")
            if len(found) == count:
                return found
    raise AssertionError("no such users")


ADMINS = Constraint(context="roles", operator=Operator.IN, values=("admin",))
NORWAY = Constraint(context="country", operator=Operator.IN, values=("NO",))


class TestKillSwitch:
    def test_off_flag_serves_default_with_disabled(self):
        """A switched-off flag serves its default to everyone, with reason DISABLED."""
        flag_set = _set(
            Flag(
                key="f",
                type=FlagType.STRING,
                enabled=False,
                default="old",
                variants=(Variant(name="new", value="new"),),
            )
        )
        evaluation = flag_set.evaluate("f", EvaluationContext(user_id="1"))
        assert ("old", None, Reason.DISABLED, False) == (
            evaluation.value,
            evaluation.variant,
            evaluation.reason,
            evaluation.enabled,
        )

    def test_off_flag_ignores_tenant_override(self):
        """The kill switch wins over a tenant's override."""
        flag_set = _set(Flag(key="f", tenants={"t1": TenantOverride(enabled=True)}))
        assert Reason.DISABLED == flag_set.evaluate("f", EvaluationContext(tenant_id="t1")).reason

    def test_on_flag_without_rules_is_on_for_everyone(self):
        """A flag switched on with no rules is on for every context (Unleash's reading)."""
        flag_set = _set(Flag(key="f", enabled=True))
        evaluation = flag_set.evaluate("f")
        assert (True, True, Reason.TARGETING_MATCH) == (
            evaluation.value,
            evaluation.enabled,
            evaluation.reason,
        )

    def test_on_flag_whose_rules_are_all_disabled_matches_no_one(self):
        """Disabled rules are skipped; with none left the flag serves its default."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(disabled=True),)))
        assert (False, Reason.DEFAULT) == (
            flag_set.is_enabled("f"),
            flag_set.evaluate("f").reason,
        )


class TestRules:
    def test_first_admitting_rule_decides(self):
        """Rules are tried in order and the first that admits names itself in the answer."""
        flag_set = _set(
            Flag(
                key="f",
                type=FlagType.STRING,
                enabled=True,
                default="none",
                variants=(Variant(name="a", value="A"), Variant(name="b", value="B")),
                rules=(
                    Rule(id="admins", constraints=(ADMINS,), variant="a"),
                    Rule(constraints=(NORWAY,), variant="b"),
                ),
            )
        )
        both = EvaluationContext(roles=["admin"], properties={"country": "NO"})
        norway = EvaluationContext(roles=["dev"], properties={"country": "NO"})
        assert [("A", "admins"), ("B", "rules[1]"), ("none", None)] == [
            (e.value, e.rule)
            for e in (
                flag_set.evaluate("f", both),
                flag_set.evaluate("f", norway),
                flag_set.evaluate("f", EvaluationContext()),
            )
        ]

    def test_no_matching_rule_serves_default(self):
        """When no rule admits the context the default is served with reason DEFAULT."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(ADMINS,)),)))
        evaluation = flag_set.evaluate("f", EvaluationContext(roles=["dev"]))
        assert (False, Reason.DEFAULT, None) == (
            evaluation.value,
            evaluation.reason,
            evaluation.rule,
        )

    def test_list_context_matches_in_when_any_item_listed(self):
        """roles IN matches when any role is listed, NOT_IN when none is."""
        not_admin = Constraint(context="roles", operator=Operator.NOT_IN, values=("admin",))
        flag_set = _set(
            Flag(key="in", enabled=True, rules=(Rule(constraints=(ADMINS,)),)),
            Flag(key="not_in", enabled=True, rules=(Rule(constraints=(not_admin,)),)),
        )
        admin = EvaluationContext(roles=["dev", "admin"])
        dev = EvaluationContext(roles=["dev"])
        assert [True, False, False, True] == [
            flag_set.is_enabled("in", admin),
            flag_set.is_enabled("in", dev),
            flag_set.is_enabled("not_in", admin),
            flag_set.is_enabled("not_in", dev),
        ]

    def test_email_domain_is_derived_from_email(self):
        """An emailDomain constraint reads the domain of the context's e-mail."""
        domain = Constraint(context="email_domain", operator=Operator.IN, values=("example.com",))
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(domain,)),)))
        assert [True, False] == [
            flag_set.is_enabled("f", EvaluationContext(email="ann@Example.com")),
            flag_set.is_enabled("f", EvaluationContext(email="bob@other.org")),
        ]

    def test_email_domain_is_derived_for_dict_and_unleash_contexts(self):
        """A dict context, or an Unleash one with the e-mail among its properties, gets it too."""
        domain = Constraint(context="emailDomain", operator=Operator.IN, values=("example.com",))
        flags = Flags(_set(Flag(key="f", enabled=True, rules=(Rule(constraints=(domain,)),))))
        contexts = [
            {"email": "ann@Example.com"},
            {"userId": "u1", "properties": {"email": "ann@example.com"}},
            {"email": "bob@other.org"},
            {"email": "no-at-sign"},
            {"email": 42},
        ]
        assert [True, True, False, False, False] == [flags.is_enabled("f", c) for c in contexts]
        assert Reason.TARGETING_MATCH == flags.evaluate("f", contexts[1]).reason

    def test_explicit_email_domain_is_not_overridden(self):
        """An emailDomain the caller gives wins over the one its e-mail would give."""
        domain = Constraint(context="emailDomain", operator=Operator.IN, values=("example.com",))
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(domain,)),)))
        assert [False, False] == [
            flag_set.is_enabled("f", {"email": "ann@example.com", "emailDomain": "other.org"}),
            flag_set.is_enabled(
                "f",
                EvaluationContext(email="ann@example.com", properties={"emailDomain": "other.org"}),
            ),
        ]

    def test_app_version_semver_constraint(self):
        """A SEMVER_GTE constraint on appVersion admits newer versions only."""
        newer = Constraint(context="app_version", operator=Operator.SEMVER_GTE, value="2.1.0")
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(newer,)),)))
        assert [True, True, False, False] == [
            flag_set.is_enabled("f", EvaluationContext(app_version=v))
            for v in ("2.1.0", "3.0.0-rc.1", "2.1.0-beta.2", "banana")
        ]

    def test_environment_comes_from_the_set_when_context_has_none(self):
        """A context without environment is evaluated in the set's configured one."""
        production = Constraint(context="environment", operator=Operator.IN, values=("production",))
        flag = Flag(key="f", enabled=True, rules=(Rule(constraints=(production,)),))
        in_production = _set(flag, environment="production")
        assert [True, False, False] == [
            in_production.is_enabled("f", EvaluationContext()),
            in_production.is_enabled("f", EvaluationContext(environment="staging")),
            _set(flag, environment="staging").is_enabled("f", {}),
        ]


class TestSegments:
    def test_rule_needs_every_segment(self):
        """A rule citing segments admits only contexts every segment admits."""
        staff = Segment(name="staff", constraints=(ADMINS,))
        nordic = Segment(name="nordic", id=7, constraints=(NORWAY,))
        flag_set = _set(
            Flag(key="f", enabled=True, rules=(Rule(segments=("staff", 7)),)),
            segments=(staff, nordic),
        )
        assert [True, False] == [
            flag_set.is_enabled("f", {"roles": ["admin"], "country": "NO"}),
            flag_set.is_enabled("f", {"roles": ["admin"], "country": "SE"}),
        ]

    def test_missing_segment_never_matches(self):
        """A rule citing a segment the set does not hold admits no one (as Unleash)."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(segments=("ghost",)),)))
        assert not flag_set.is_enabled("f", {"userId": "1"})


class TestRollout:
    def test_bucket_is_unleash_normalisation(self):
        """Users whose bucket is within the percentage are in, the others out, with SPLIT."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(rollout=Rollout(percentage=30)),)))
        inside = _users_in_buckets("f", 1, 30)
        outside = _users_in_buckets("f", 31, 100)
        assert all(flag_set.is_enabled("f", {"userId": u}) for u in inside)
        assert not any(flag_set.is_enabled("f", {"userId": u}) for u in outside)
        assert Reason.SPLIT == flag_set.evaluate("f", {"userId": inside[0]}).reason

    def test_group_id_replaces_flag_key_in_hash(self):
        """Two flags with one group id bucket every user alike."""
        rule = Rule(rollout=Rollout(percentage=50, group_id="shared"))
        flag_set = _set(
            Flag(key="a", enabled=True, rules=(rule,)), Flag(key="b", enabled=True, rules=(rule,))
        )
        users = [f"user-{n}" for n in range(300)]
        assert [flag_set.is_enabled("a", {"userId": u}) for u in users] == [
            flag_set.is_enabled("b", {"userId": u}) for u in users
        ]

    def test_custom_stickiness_missing_field_is_outside(self):
        """A rollout sticky on a field the context lacks admits no one, even at 100%."""
        flag_set = _set(
            Flag(
                key="f",
                enabled=True,
                rules=(Rule(rollout=Rollout(percentage=100, stickiness="tenant_id")),),
            )
        )
        assert [True, False] == [
            flag_set.is_enabled("f", EvaluationContext(tenant_id="t1")),
            flag_set.is_enabled("f", EvaluationContext(user_id="u1")),
        ]

    def test_full_rollout_is_a_targeting_match(self):
        """A 100% rollout decides by targeting, not by split."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(rollout=Rollout(percentage=100)),)))
        assert Reason.TARGETING_MATCH == flag_set.evaluate("f", {"userId": "1"}).reason

    def test_zero_rollout_admits_no_one(self):
        """A 0% rollout admits no context, whatever its bucket."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(rollout=Rollout(percentage=0)),)))
        assert not any(flag_set.is_enabled("f", {"userId": str(n)}) for n in range(200))


class TestVariants:
    FLAG = Flag(
        key="exp",
        type=FlagType.STRING,
        enabled=True,
        default="control",
        variants=(
            Variant(name="blue", weight=500, value="blue"),
            Variant(
                name="green",
                weight=500,
                value="green",
                overrides=(VariantOverride(context="user_id", values=("vip",)),),
            ),
        ),
    )

    def test_weighted_pick_is_split_and_stable(self):
        """A weighted pick among two variants gives SPLIT and the same arm every time."""
        flag_set = _set(self.FLAG)
        answers = {flag_set.evaluate("exp", {"userId": "u42"}).variant for _ in range(20)}
        evaluation = flag_set.evaluate("exp", {"userId": "u42"})
        assert (1, Reason.SPLIT) == (len(answers), evaluation.reason)
        assert evaluation.variant == evaluation.value

    def test_both_arms_are_served(self):
        """Over many users both arms of a 50/50 split are served."""
        flag_set = _set(self.FLAG)
        served = {flag_set.evaluate("exp", {"userId": str(n)}).value for n in range(200)}
        assert {"blue", "green"} == served

    def test_override_wins_and_is_named(self):
        """A variant override serves its variant, TARGETING_MATCH, rule 'variant-override'."""
        evaluation = _set(self.FLAG).evaluate("exp", EvaluationContext(user_id="vip"))
        assert ("green", Reason.TARGETING_MATCH, "variant-override") == (
            evaluation.value,
            evaluation.reason,
            evaluation.rule,
        )

    def test_rule_variants_win_over_flag_variants(self):
        """A matched rule with variants of its own serves one of those."""
        flag = self.FLAG.model_copy(
            update={
                "rules": (
                    Rule(constraints=(ADMINS,), variants=(Variant(name="red", value="red"),)),
                    Rule(),
                )
            }
        )
        flag_set = _set(flag)
        assert ["red", "blue"] == [
            flag_set.evaluate("exp", {"roles": ["admin"], "userId": "x"}).value,
            flag_set.evaluate("exp", {"userId": "u1"}).value,
        ]

    def test_unleash_variant_shape(self):
        """variant() returns Unleash's name, payload, enabled and feature_enabled."""
        flag_set = _set(self.FLAG)
        assert {
            "name": "green",
            "payload": {"type": "string", "value": "green"},
            "enabled": True,
            "feature_enabled": True,
        } == flag_set.variant("exp", {"userId": "vip"})

    def test_boolean_flag_without_variants_gives_disabled_variant(self):
        """An enabled flag with no variants answers Unleash's 'disabled' variant, feature on."""
        flag_set = _set(Flag(key="f", enabled=True))
        assert {"name": "disabled", "enabled": False, "feature_enabled": True} == flag_set.variant(
            "f"
        )


class TestTenantOverride:
    FLAG = Flag(
        key="f",
        type=FlagType.NUMBER,
        enabled=True,
        default=1,
        variants=(Variant(name="low", value=10), Variant(name="high", value=100)),
        rules=(Rule(constraints=(ADMINS,), variant="low"),),
        tenants={
            "acme": TenantOverride(enabled=True, variant="high"),
            "globex": TenantOverride(enabled=False),
        },
    )

    def test_override_comes_before_rules(self):
        """A tenant's override decides before any rule, naming the tenant."""
        flag_set = _set(self.FLAG)
        evaluation = flag_set.evaluate("f", EvaluationContext(tenant_id="acme"))
        assert (100, "high", Reason.TARGETING_MATCH, "tenant:acme") == (
            evaluation.value,
            evaluation.variant,
            evaluation.reason,
            evaluation.rule,
        )

    def test_override_can_switch_off(self):
        """A tenant switched off gets the default even when a rule would admit it."""
        evaluation = _set(self.FLAG).evaluate(
            "f", EvaluationContext(tenant_id="globex", roles=["admin"])
        )
        assert (1, False, "tenant:globex") == (
            evaluation.value,
            evaluation.enabled,
            evaluation.rule,
        )

    def test_other_tenants_follow_rules(self):
        """A tenant without an override goes through the rules."""
        evaluation = _set(self.FLAG).evaluate(
            "f", EvaluationContext(tenant_id="x", roles=["admin"])
        )
        assert (10, "rules[0]") == (evaluation.value, evaluation.rule)


class TestPrerequisites:
    def _set(self, parent_enabled: bool, **prerequisite):
        return _set(
            Flag(key="parent", enabled=parent_enabled, variants=(Variant(name="v1"),)),
            Flag(
                key="child",
                enabled=True,
                prerequisites=(Prerequisite(flag="parent", **prerequisite),),
            ),
        )

    def test_child_on_only_when_parent_on(self):
        """The child is on when its parent is, and off (DEFAULT, prerequisite rule) when not."""
        off = self._set(False).evaluate("child")
        assert self._set(True).is_enabled("child")
        assert (False, Reason.DEFAULT, "prerequisite:parent") == (off.enabled, off.reason, off.rule)

    def test_expected_off_parent(self):
        """A prerequisite with enabled=False is met only while the parent is off."""
        assert [False, True] == [
            self._set(True, enabled=False).is_enabled("child"),
            self._set(False, enabled=False).is_enabled("child"),
        ]

    def test_parent_variant_must_be_listed(self):
        """With variants listed, the parent must serve one of them."""
        assert [True, False] == [
            self._set(True, variants=("v1",)).is_enabled("child"),
            self._set(True, variants=("v2",)).is_enabled("child"),
        ]

    def test_missing_parent_is_unmet(self):
        """A prerequisite on a flag the set does not hold is never met."""
        flag_set = _set(Flag(key="child", enabled=True, prerequisites=(Prerequisite(flag="gone"),)))
        assert not flag_set.is_enabled("child")

    def test_chained_prerequisites_are_unmet(self):
        """A parent that has prerequisites of its own never satisfies (Unleash: no chains)."""
        flag_set = _set(
            Flag(key="root", enabled=True),
            Flag(key="middle", enabled=True, prerequisites=(Prerequisite(flag="root"),)),
            Flag(key="leaf", enabled=True, prerequisites=(Prerequisite(flag="middle"),)),
        )
        assert [True, False] == [flag_set.is_enabled("middle"), flag_set.is_enabled("leaf")]

    def test_parent_evaluated_with_child_context(self):
        """The parent's rules see the context the child was asked with."""
        flag_set = _set(
            Flag(key="parent", enabled=True, rules=(Rule(constraints=(ADMINS,)),)),
            Flag(key="child", enabled=True, prerequisites=(Prerequisite(flag="parent"),)),
        )
        assert [True, False] == [
            flag_set.is_enabled("child", {"roles": ["admin"]}),
            flag_set.is_enabled("child", {"roles": ["dev"]}),
        ]


class TestSchedule:
    FLAG = Flag(
        key="launch",
        enabled=False,
        schedule=(
            ScheduledChange(at=NOW + dt.timedelta(hours=1), enabled=True),
            ScheduledChange(at=NOW - dt.timedelta(hours=1), enabled=False),
            ScheduledChange(at=NOW + dt.timedelta(days=1), enabled=False),
        ),
    )

    def test_switch_follows_schedule_at_compile_time(self):
        """The kill switch is read as the schedule sets it at the compile moment."""
        assert [False, True, False] == [
            _set(self.FLAG, now=NOW).is_enabled("launch"),
            _set(self.FLAG, now=NOW + dt.timedelta(hours=2)).is_enabled("launch"),
            _set(self.FLAG, now=NOW + dt.timedelta(days=2)).is_enabled("launch"),
        ]

    def test_next_change_at_is_earliest_future_change(self):
        """next_change_at names the next scheduled change after the compile moment."""
        assert [NOW + dt.timedelta(hours=1), NOW + dt.timedelta(days=1), None] == [
            _set(self.FLAG, now=NOW).next_change_at,
            _set(self.FLAG, now=NOW + dt.timedelta(hours=2)).next_change_at,
            _set(self.FLAG, now=NOW + dt.timedelta(days=2)).next_change_at,
        ]


class TestErrors:
    def test_missing_flag_gives_error_and_default(self):
        """A missing flag gives ERROR, FLAG_NOT_FOUND and the caller's default."""
        evaluation = _set().evaluate("nope", default="fallback")
        assert ("fallback", Reason.ERROR, "FLAG_NOT_FOUND") == (
            evaluation.value,
            evaluation.reason,
            evaluation.error_code,
        )

    def test_malformed_context_gives_error(self):
        """A context that is neither a mapping nor an EvaluationContext gives ERROR, not a raise."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(ADMINS,)),)))
        evaluation = flag_set.evaluate("f", 42)  # type: ignore[arg-type]
        assert (Reason.ERROR, "PARSE_ERROR", False) == (
            evaluation.reason,
            evaluation.error_code,
            evaluation.value,
        )
        assert not flag_set.is_enabled("f", 42)  # type: ignore[arg-type]

    def test_malformed_properties_give_error(self):
        """Unleash properties that are not an object give ERROR rather than raising."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(NORWAY,)),)))
        assert Reason.ERROR == flag_set.evaluate("f", {"properties": ["NO"]}).reason

    def test_malformed_flag_gives_error_and_spares_the_others(self):
        """A flag that cannot be compiled answers ERROR; the set's other flags still work."""
        broken = Flag.model_construct(key="broken", enabled=True, rules=("not a rule",))
        flag_set = _set(broken, Flag(key="fine", enabled=True))
        evaluation = flag_set.evaluate("broken", default=True)
        assert (Reason.ERROR, True) == (evaluation.reason, evaluation.value)
        assert (False, True) == (flag_set.is_enabled("broken"), flag_set.is_enabled("fine"))

    def test_odd_context_values_do_not_raise(self):
        """Numbers, lists, dicts and None in the context are compared, never raised on."""
        numeric = Constraint(context="age", operator=Operator.NUM_GTE, value="18")
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(constraints=(NORWAY, numeric)),)))
        contexts = [
            {"country": "NO", "age": 30},
            {"country": ["NO"], "age": "30"},
            {"country": {"x": 1}, "age": None},
            {"country": None, "userId": 5},
        ]
        assert [True, True, False, False] == [flag_set.is_enabled("f", c) for c in contexts]

    def test_regex_timeout_ends_the_evaluation_with_error(self):
        """A REGEX past its time bound ends the evaluation: ERROR, GENERAL, the default."""
        slow = Constraint(context="userId", operator=Operator.REGEX, value="(a|aa)+$")
        flag_set = _set(
            Flag(key="f", enabled=True, rules=(Rule(constraints=(slow,)),)), regex_timeout=0.001
        )
        evaluation = flag_set.evaluate("f", {"userId": "a" * 40 + "b"})
        assert (Reason.ERROR, "GENERAL", "a regular expression timed out", False) == (
            evaluation.reason,
            evaluation.error_code,
            evaluation.error_message,
            evaluation.value,
        )
        assert not flag_set.is_enabled("f", {"userId": "a" * 40 + "b"})
        assert 2 == flag_set.regex_timeouts

    def test_first_regex_timeout_spends_the_budget(self):
        """One timeout per evaluation: later REGEX rules are not tried after the first times out."""
        slow = Constraint(context="userId", operator=Operator.REGEX, value="(a|aa)+$")
        inverted = slow.model_copy(update={"inverted": True})
        rules = tuple(Rule(constraints=(c,)) for c in (slow, inverted, slow, slow))
        flag_set = _set(Flag(key="f", enabled=True, rules=rules), regex_timeout=0.001)
        assert Reason.ERROR == flag_set.evaluate("f", {"userId": "a" * 40 + "b"}).reason
        assert 1 == flag_set.regex_timeouts

    def test_regex_timeout_is_counted_as_error_by_is_enabled(self):
        """Flags.is_enabled counts a timed-out evaluation as ERROR, as evaluate does."""
        slow = Constraint(context="userId", operator=Operator.REGEX, value="(a|aa)+$")
        flags = Flags(
            _set(
                Flag(key="f", enabled=True, rules=(Rule(constraints=(slow,)),)),
                regex_timeout=0.001,
            )
        )
        flags.is_enabled("f", {"userId": "a" * 40 + "b"})
        flags.evaluate("f", {"userId": "a" * 40 + "b"})
        assert {("f", "ERROR"): 2} == flags.evaluation_counts()

    def test_log_and_evaluation_agree_on_error_codes(self, monkeypatch):
        """The logged error code is the Evaluation's: PARSE_ERROR for a bad context or flag."""
        monkeypatch.setattr(engine, "_last_logged", {})
        broken = Flag.model_construct(key="broken", enabled=True, rules=("not a rule",))
        with structlog.testing.capture_logs() as logs:
            flag_set = _set(
                broken, Flag(key="f", enabled=True, rules=(Rule(constraints=(ADMINS,)),))
            )
            bad_context = flag_set.evaluate("f", 42)  # type: ignore[arg-type]
            not_compiled = flag_set.evaluate("broken")
        logged = {
            e["flag"]: e["error_code"] for e in logs if e["event"] == "flags.evaluation_error"
        }
        assert ("PARSE_ERROR", "PARSE_ERROR") == (bad_context.error_code, not_compiled.error_code)
        assert {"f": "PARSE_ERROR", "broken": "PARSE_ERROR"} == logged
        assert "could not be compiled" in (not_compiled.error_message or "")

    def test_error_logs_stay_throttled_once_the_key_table_is_full(self, monkeypatch):
        """Past the table's bound, new flag keys share one slot: one line a minute, not one
        per evaluation."""
        monkeypatch.setattr(engine, "_last_logged", {})
        monkeypatch.setattr(engine, "_LOGGED_KEYS_MAX", 2)
        flag_set = _set(
            *(Flag(key=key, enabled=True, rules=(Rule(constraints=(ADMINS,)),)) for key in "abcde")
        )
        with structlog.testing.capture_logs() as logs:
            for key in ("a", "b", "c", "d", "e", "a"):
                flag_set.evaluate(key, 42)  # type: ignore[arg-type]  # a malformed context
        logged = [e["flag"] for e in logs if e["event"] == "flags.evaluation_error"]
        assert ["a", "b", "c"] == logged

    def test_made_up_keys_share_one_log_slot(self, monkeypatch):
        """Keys the set does not hold (the caller chose them) never fill the table of
        once-a-minute slots real flags need, and a long one is cut in the log."""
        monkeypatch.setattr(engine, "_last_logged", {})
        flags = Flags(_set(Flag(key="f", enabled=True)))
        with structlog.testing.capture_logs() as logs:
            for n in range(50):
                flags.is_enabled(f"made-up-{n}" + "x" * 500)
        assert [UNKNOWN_FLAG] == list(engine._last_logged)
        [line] = [e for e in logs if e["event"] == "flags.evaluation_error"]
        assert len(line["flag"]) <= 201
        assert "x" * 300 not in repr(line)

    def test_flags_log_and_count_missing_flags_and_type_mismatches(self, monkeypatch):
        """Flags logs the errors found outside the engine (no context values) and counts them."""
        monkeypatch.setattr(engine, "_last_logged", {})
        theme = Flag(
            key="f", type=FlagType.STRING, enabled=True, variants=(Variant(name="v", value="x"),)
        )
        flags = Flags(_set(theme))
        context = {"userId": "secret-user", "email": "ann@example.com"}
        with structlog.testing.capture_logs() as logs:
            flags.is_enabled("missing", context)
            flags.details("f", False, context, expected=FlagType.BOOLEAN)
        logged = [
            (e["flag"], e["error_code"]) for e in logs if e["event"] == "flags.evaluation_error"
        ]
        assert [("missing", "FLAG_NOT_FOUND"), ("f", "TYPE_MISMATCH")] == logged
        assert "secret-user" not in repr(logs)
        assert "example.com" not in repr(logs)
        assert {(UNKNOWN_FLAG, "ERROR"): 1, ("f", "ERROR"): 1} == flags.evaluation_counts()


class TestCountedReasons:
    """Flags.is_enabled counts the reason Flags.evaluate gives, for every kind of outcome."""

    @staticmethod
    def _both(flag: Flag, contexts) -> tuple[dict, dict]:
        by_is_enabled, by_evaluate = Flags(_set(flag)), Flags(_set(flag))
        for context in contexts:
            by_is_enabled.is_enabled(flag.key, context)
            by_evaluate.evaluate(flag.key, context)
        return by_is_enabled.evaluation_counts(), by_evaluate.evaluation_counts()

    USERS: ClassVar = [{"userId": f"u{n}", "country": "NO"} for n in range(200)]

    def test_weighted_pick_is_counted_as_split(self):
        """A full rollout serving a weighted pick among two variants counts SPLIT either way."""
        flag = Flag(
            key="f",
            enabled=True,
            variants=(Variant(name="a", weight=500), Variant(name="b", weight=500)),
        )
        counted, evaluated = self._both(flag, self.USERS)
        assert {("f", "SPLIT"): 200} == counted == evaluated

    def test_partial_rollout_is_counted_as_split(self):
        """A partial rollout counts SPLIT for those it admits and DEFAULT for the others."""
        flag = Flag(
            key="f",
            enabled=True,
            rules=(Rule(constraints=(NORWAY,), rollout=Rollout(percentage=30)),),
        )
        counted, evaluated = self._both(flag, self.USERS)
        assert counted == evaluated
        assert {"SPLIT", "DEFAULT"} == {reason for _, reason in counted}

    def test_variant_override_is_counted_as_targeting_match(self):
        """A variant override decides as a targeting match, in the counts of both."""
        flag = Flag(
            key="f",
            enabled=True,
            variants=(
                Variant(
                    name="a",
                    weight=500,
                    overrides=(VariantOverride(context="userId", values=("u1", "u2")),),
                ),
                Variant(name="b", weight=500),
            ),
        )
        counted, evaluated = self._both(flag, self.USERS)
        assert {("f", "TARGETING_MATCH"): 2, ("f", "SPLIT"): 198} == counted == evaluated

    def test_single_variant_and_fixed_variant_are_targeting_matches(self):
        """One variant, or a rule's fixed variant, is no split: TARGETING_MATCH in both."""
        flag = Flag(
            key="f",
            enabled=True,
            variants=(Variant(name="a", weight=500), Variant(name="b", weight=500)),
            rules=(Rule(constraints=(NORWAY,), variant="b"),),
        )
        single = Flag(key="g", enabled=True, variants=(Variant(name="a"),))
        assert self._both(flag, self.USERS)[0] == self._both(flag, self.USERS)[1]
        assert {("f", "TARGETING_MATCH"): 200} == self._both(flag, self.USERS)[0]
        assert {("g", "TARGETING_MATCH"): 200} == self._both(single, self.USERS)[0]


class TestExplain:
    def test_explains_each_rule(self):
        """explain names the rule that matched and what turned the earlier rules down."""
        flag_set = _set(
            Flag(
                key="f",
                enabled=True,
                rules=(
                    Rule(id="admins", constraints=(ADMINS,)),
                    Rule(id="nordic", constraints=(NORWAY,), rollout=Rollout(percentage=100)),
                ),
            )
        )
        explanation = flag_set.explain("f", {"roles": ["dev"], "country": "NO", "userId": "u1"})
        rules = [s for s in explanation["steps"] if s["step"] == "rule"]
        assert ("nordic", True) == (
            explanation["evaluation"]["rule"],
            explanation["evaluation"]["enabled"],
        )
        assert [("admins", False, [False]), ("nordic", True, [True])] == [
            (r["rule"], r["matched"], [c["matched"] for c in r["constraints"]]) for r in rules
        ]
        assert _bucket("f", "u1") == rules[1]["rollout"]["bucket"]
        json.dumps(explanation)

    def test_explains_unmet_prerequisite(self):
        """explain shows the unmet prerequisite and stops there."""
        flag_set = _set(
            Flag(key="parent"),
            Flag(key="child", enabled=True, prerequisites=(Prerequisite(flag="parent"),)),
        )
        steps = flag_set.explain("child")["steps"]
        assert ["kill_switch", "prerequisite"] == [s["step"] for s in steps]
        assert (False, False) == (steps[1]["met"], steps[1]["parent_enabled"])

    def test_explains_missing_flag(self):
        """explain of a missing flag reports the ERROR evaluation and no steps."""
        explanation = _set().explain("nope")
        assert ("ERROR", []) == (explanation["evaluation"]["reason"], explanation["steps"])


class TestFlagSetReading:
    def test_keys_contains_and_flag(self):
        """keys, `in` and flag() expose the compiled flags."""
        flag = Flag(key="a", enabled=True)
        flag_set = _set(flag, Flag(key="b"))
        assert (["a", "b"], True, False, flag, None) == (
            flag_set.keys(),
            "a" in flag_set,
            "c" in flag_set,
            flag_set.flag("a"),
            flag_set.flag("c"),
        )


class TestFlagsFacade:
    FLAGS = (
        Flag(key="bool", enabled=True, client_visible=True),
        Flag(
            key="text",
            type=FlagType.STRING,
            enabled=True,
            variants=(Variant(name="v", value="hello"),),
        ),
        Flag(
            key="num", type=FlagType.NUMBER, enabled=True, variants=(Variant(name="v", value=2.5),)
        ),
        Flag(
            key="obj",
            type=FlagType.JSON,
            enabled=True,
            variants=(Variant(name="v", value={"a": 1}),),
            client_visible=True,
        ),
        Flag(
            key="unleashy",
            enabled=True,
            variants=(Variant(name="v", value="from-payload"),),
        ),
    )

    def _flags(self) -> Flags:
        return Flags(_set(*self.FLAGS))

    def test_typed_getters_return_values(self):
        """Each typed getter returns the flag's value of its type."""
        flags = self._flags()
        assert (True, "hello", 2.5, {"a": 1}) == (
            flags.get_boolean("bool", False),
            flags.get_string("text", "x"),
            flags.get_number("num", 0.0),
            flags.get_json("obj", None),
        )

    def test_typed_getters_default_on_mismatch_and_missing(self):
        """A type mismatch or a missing flag gives the caller's default."""
        flags = self._flags()
        mismatch = flags.details("text", 0.0, expected=FlagType.NUMBER)
        assert ("TYPE_MISMATCH", 0.0) == (mismatch.error_code, mismatch.value)
        assert (False, "d", 7.0) == (
            flags.get_boolean("text", False),
            flags.get_string("missing", "d"),
            flags.get_number("missing", 7.0),
        )

    def test_boolean_flag_serves_variant_value_as_string(self):
        """A boolean flag asked for a string serves its variant's value (Unleash payloads)."""
        assert "from-payload" == self._flags().get_string("unleashy", "none")

    def test_counts_by_flag_and_reason(self):
        """Evaluations are counted by flag and reason; unknown keys under one bucket."""
        flags = self._flags()
        flags.is_enabled("bool")
        flags.evaluate("bool")
        flags.is_enabled("nope-1")
        flags.evaluate("nope-2")
        flags.get_string("text", "x", {"userId": "1"})
        assert {
            ("bool", "TARGETING_MATCH"): 2,
            (UNKNOWN_FLAG, "ERROR"): 2,
            ("text", "TARGETING_MATCH"): 1,
        } == flags.evaluation_counts()

    def test_client_flags_are_only_the_visible_ones(self):
        """client_flags evaluates only the flags marked client-visible."""
        assert {"bool": True, "obj": {"a": 1}} == {
            k: e.value for k, e in self._flags().client_flags(EvaluationContext()).items()
        }

    def test_replace_swaps_the_set(self):
        """replace() serves the new set from the next evaluation on."""
        flags = Flags(_set(Flag(key="f"), revision=1))
        flags.replace(_set(Flag(key="f", enabled=True), revision=2))
        assert (2, True) == (flags.revision, flags.is_enabled("f"))

    def test_empty_facade_serves_defaults(self):
        """A Flags built without a set answers every flag as missing."""
        assert (False, "d") == (Flags().is_enabled("x"), Flags().get_string("x", "d"))


@pytest.mark.parametrize("context", [None, {}, EvaluationContext()])
def test_empty_contexts_are_accepted(context):
    """None, an empty dict and an empty EvaluationContext all evaluate."""
    assert _set(Flag(key="f", enabled=True)).is_enabled("f", context)


class TestMore:
    def test_random_rollout_admits_about_its_share(self):
        """A random-stickiness rollout admits about its percentage, user or not."""
        flag_set = _set(
            Flag(
                key="f",
                enabled=True,
                rules=(Rule(rollout=Rollout(percentage=40, stickiness="random")),),
            )
        )
        admitted = sum(flag_set.is_enabled("f", {}) for _ in range(5000))
        assert 1600 < admitted < 2400

    def test_default_stickiness_falls_back_to_session_then_random(self):
        """Default stickiness hashes userId, else sessionId, else draws at random."""
        flag_set = _set(Flag(key="f", enabled=True, rules=(Rule(rollout=Rollout(percentage=50)),)))
        inside = _users_in_buckets("f", 1, 50, count=1)[0]
        outside = _users_in_buckets("f", 51, 100, count=1)[0]
        assert [True, False, True, False] == [
            flag_set.is_enabled("f", {"sessionId": inside}),
            flag_set.is_enabled("f", {"sessionId": outside}),
            flag_set.is_enabled("f", {"userId": inside, "sessionId": outside}),
            flag_set.is_enabled("f", {"userId": outside, "sessionId": inside}),
        ]
        assert 0 < sum(flag_set.is_enabled("f", {}) for _ in range(400)) < 400

    def test_app_name_default_and_options(self):
        """appName comes from the set's options when the context has none."""
        app = Constraint(context="app_name", operator=Operator.IN, values=("docs",))
        flag_set = _set(
            Flag(key="f", enabled=True, rules=(Rule(constraints=(app,)),)), app_name="docs"
        )
        assert (True, False) == (
            flag_set.is_enabled("f", {}),
            flag_set.is_enabled("f", {"appName": "other"}),
        )
        assert ("docs", None) == (flag_set.options["app_name"], flag_set.options["environment"])

    def test_caller_default_when_flag_has_none(self):
        """An off flag without a default of its own serves the caller's default."""
        flag = Flag(key="f", type=FlagType.STRING, variants=(Variant(name="a", value="A"),))
        flag_set = _set(flag)
        assert [None, "mine"] == [
            flag_set.evaluate("f").value,
            flag_set.evaluate("f", default="mine").value,
        ]

    def test_segment_cited_by_id_as_text(self):
        """A segment id given as text ("7") resolves like the number."""
        nordic = Segment(name="nordic", id=7, constraints=(NORWAY,))
        flag_set = _set(
            Flag(key="f", enabled=True, rules=(Rule(segments=("7",)),)), segments=(nordic,)
        )
        assert (True, [nordic]) == (
            flag_set.is_enabled("f", {"country": "NO"}),
            flag_set.segments(),
        )

    def test_reading_helpers(self):
        """len, flags() and the set's segments expose what was compiled."""
        flags = (Flag(key="a"), Flag(key="b"))
        flag_set = _set(*flags)
        assert (2, list(flags)) == (len(flag_set), flag_set.flags())

    def test_explain_tenant_override_and_disabled_rule(self):
        """explain shows an applied tenant override, and disabled rules as skipped."""
        flag_set = _set(
            Flag(key="t", enabled=True, tenants={"acme": TenantOverride(enabled=True)}),
            Flag(key="d", enabled=True, rules=(Rule(disabled=True), Rule())),
        )
        tenant_steps = flag_set.explain("t", EvaluationContext(tenant_id="acme"))["steps"]
        rule_steps = flag_set.explain("d")["steps"]
        assert ["kill_switch", "tenant_override", "variant"] == [s["step"] for s in tenant_steps]
        assert [("rules[0]", False, "disabled"), ("rules[1]", True, None)] == [
            (s["rule"], s["matched"], s.get("why")) for s in rule_steps if s["step"] == "rule"
        ]

    def test_explain_expected_off_and_chained_prerequisites(self):
        """explain reports an expected-off parent, and a parent with prerequisites of its own."""
        flag_set = _set(
            Flag(key="root", enabled=True),
            Flag(key="off", enabled=False),
            Flag(key="mid", enabled=True, prerequisites=(Prerequisite(flag="root"),)),
            Flag(
                key="leaf",
                enabled=True,
                prerequisites=(Prerequisite(flag="off", enabled=False), Prerequisite(flag="mid")),
            ),
        )
        steps = [s for s in flag_set.explain("leaf")["steps"] if s["step"] == "prerequisite"]
        assert [("off", True), ("mid", False)] == [(s["flag"], s["met"]) for s in steps]
        assert "prerequisites of its own" in steps[1]["why"]
