"""Unleash client state to bastion's models and back, and the Unleash-shaped entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from bastion.flags._engine import FlagSet
from bastion.flags._model import Constraint, Flag, Operator, Rule, Segment
from bastion.flags._unleash import (
    UNLEASH_FIELDS,
    flags_from_unleash,
    is_unleash_state,
    to_unleash,
)

VECTORS = Path(__file__).parent / "vectors" / "unleash"


def _state(*features, segments=()) -> dict:
    return {"version": 2, "features": list(features), "segments": list(segments)}


def _feature(name="f", strategies=(), **extra) -> dict:
    return {"name": name, "enabled": True, "strategies": list(strategies), **extra}


class TestStrategies:
    def test_user_with_id_becomes_in_constraint(self):
        """userWithId's comma-separated ids become userId IN, spaces trimmed."""
        flags, _ = flags_from_unleash(
            _state(
                _feature(strategies=[{"name": "userWithId", "parameters": {"userIds": "1, 2 ,3"}}])
            )
        )
        constraint = flags[0].rules[0].constraints[0]
        assert ("userId", Operator.IN, ("1", "2", "3")) == (
            constraint.context,
            constraint.operator,
            constraint.values,
        )

    def test_gradual_rollouts_keep_stickiness_and_group(self):
        """gradualRollout* and flexibleRollout become rollouts with their stickiness and group."""
        flags, _ = flags_from_unleash(
            _state(
                _feature(
                    strategies=[
                        {
                            "name": "gradualRolloutUserId",
                            "parameters": {"percentage": "25", "groupId": "g"},
                        },
                        {"name": "gradualRolloutSessionId", "parameters": {"percentage": 10}},
                        {"name": "gradualRolloutRandom", "parameters": {"percentage": "5"}},
                        {
                            "name": "flexibleRollout",
                            "parameters": {"rollout": "33", "stickiness": "tenantId"},
                        },
                    ]
                )
            )
        )
        assert [
            (25, "userId", "g"),
            (10, "sessionId", "f"),
            (5, "random", "f"),
            (33, "tenantId", "f"),
        ] == [
            (r.rollout.percentage, r.rollout.stickiness, r.rollout.group_id) for r in flags[0].rules
        ]

    def test_application_hostname_compares_the_machine_name(self):
        """applicationHostname is on only on a listed host, compared case-insensitively."""
        state = _state(
            _feature(
                strategies=[
                    {"name": "applicationHostname", "parameters": {"hostNames": "Web-1, web-2"}}
                ]
            )
        )
        assert [True, True, False] == [
            FlagSet.from_unleash(state, hostname="web-1").is_enabled("f"),
            FlagSet.from_unleash(state, hostname="WEB-2").is_enabled("f"),
            FlagSet.from_unleash(state, hostname="worker-1").is_enabled("f"),
        ]

    def test_remote_address_accepts_networks(self):
        """remoteAddress matches exact addresses and networks, skipping invalid entries."""
        flag_set = FlagSet.from_unleash(
            _state(
                _feature(
                    strategies=[
                        {
                            "name": "remoteAddress",
                            "parameters": {"IPs": "10.0.0.0/8, junk, 1.2.3.4"},
                        }
                    ]
                )
            )
        )
        assert [True, True, False, False] == [
            flag_set.is_enabled("f", {"remoteAddress": a})
            for a in ("10.9.8.7", "1.2.3.4", "1.2.3.5", "")
        ]

    def test_unknown_strategy_is_kept_and_never_matches(self):
        """A custom strategy is kept with its parameters for export and never matches."""
        state = _state(_feature(strategies=[{"name": "myCustom", "parameters": {"k": "v"}}]))
        flags, _ = flags_from_unleash(state)
        rule = flags[0].rules[0]
        assert ("myCustom", {"k": "v"}) == (rule.strategy, rule.parameters)
        assert not FlagSet.from_unleash(state).is_enabled("f", {"userId": "1"})

    def test_unknown_strategy_does_not_hide_later_strategies(self):
        """A later built-in strategy still decides after an unknown one."""
        state = _state(_feature(strategies=[{"name": "myCustom"}, {"name": "default"}]))
        assert FlagSet.from_unleash(state).is_enabled("f")

    def test_strategy_groups(self):
        """Strategy groups: OR is any member, AND needs every member."""
        group = "__internal-strategy-group"
        state = _state(
            _feature(
                "or",
                strategies=[
                    {
                        "name": group,
                        "operator": "OR",
                        "group": [
                            {"name": "userWithId", "parameters": {"userIds": "1"}},
                            {"name": "userWithId", "parameters": {"userIds": "2"}},
                        ],
                    }
                ],
            ),
            _feature(
                "and",
                strategies=[
                    {
                        "name": group,
                        "operator": "AND",
                        "group": [
                            {"name": "userWithId", "parameters": {"userIds": "1,2"}},
                            {"name": "gradualRolloutRandom", "parameters": {"percentage": "0"}},
                        ],
                    }
                ],
            ),
        )
        flag_set = FlagSet.from_unleash(state)
        assert [True, True, False, False] == [
            flag_set.is_enabled("or", {"userId": "1"}),
            flag_set.is_enabled("or", {"userId": "2"}),
            flag_set.is_enabled("or", {"userId": "3"}),
            flag_set.is_enabled("and", {"userId": "1"}),
        ]


class TestLeniency:
    def test_parameters_no_json_can_carry_do_not_raise(self):
        """A parameter holding an integer beyond 64 bits reads as text that matches nothing."""
        feature = _feature(
            strategies=[{"name": "default", "parameters": {"groupId": [2**70], "x": 2**70}}]
        )
        assert FlagSet.from_unleash(_state(feature)).is_enabled("f", {"userId": "1"})

    @pytest.mark.parametrize(
        "feature",
        [
            _feature(
                strategies=[
                    {
                        "name": "default",
                        "constraints": [{"contextName": "x", "operator": "BOGUS", "values": ["1"]}],
                    }
                ]
            ),
            _feature(
                strategies=[
                    {"name": "default", "constraints": [{"operator": "IN", "values": ["1"]}]}
                ]
            ),
            _feature(
                strategies=[
                    {"name": "default", "constraints": [{"contextName": "x", "operator": "REGEX"}]}
                ]
            ),
            _feature(strategies=[{"name": "flexibleRollout", "parameters": {"rollout": "lots"}}]),
            _feature(strategies=[{"name": "default", "segments": [999]}]),
            _feature(dependencies=[{"feature": "f"}], strategies=[{"name": "default"}]),
            _feature(variants=[{"name": "a/b", "weight": 1}], strategies=[{"name": "default"}]),
        ],
        ids=[
            "operator",
            "no-context",
            "no-pattern",
            "rollout",
            "segment",
            "self-dependency",
            "variant-name",
        ],
    )
    def test_what_cannot_be_represented_matches_no_one(self, feature):
        """Unrepresentable constraints, rollouts, segments, dependencies and variants turn the
        flag (or its rule) off for everyone instead of raising."""
        flag_set = FlagSet.from_unleash(_state(feature))
        assert "f" in flag_set
        assert not flag_set.is_enabled("f", {"userId": "1", "x": "1"})

    @pytest.mark.parametrize(
        "state",
        [
            {},
            {"features": None},
            {"features": ["junk", 3, None, {"enabled": True}, {"name": ""}, {"name": "x" * 300}]},
            {
                "features": [
                    {"name": "ok", "enabled": True, "strategies": "nope", "variants": {"a": 1}}
                ]
            },
        ],
    )
    def test_garbage_state_never_raises(self, state):
        """Any JSON-ish state compiles; unreadable features are simply absent."""
        flag_set = FlagSet.from_unleash(state)
        assert all(isinstance(flag_set.is_enabled(key, {}), bool) for key in flag_set.keys())  # noqa: SIM118 -- FlagSet is not a dict

    def test_percentages_parse_leniently(self):
        """Percentages given as numbers, padded strings or out of range are read sensibly."""
        flags, _ = flags_from_unleash(
            _state(
                _feature(
                    strategies=[
                        {"name": "flexibleRollout", "parameters": {"rollout": 40}},
                        {"name": "flexibleRollout", "parameters": {"rollout": " 60 "}},
                        {"name": "flexibleRollout", "parameters": {"rollout": "250"}},
                    ]
                )
            )
        )
        assert [40, 60, 100] == [r.rollout.percentage for r in flags[0].rules]

    def test_segments_without_names_get_one(self):
        """A segment without a name is named after its id; rules cite it by id."""
        _, segments = flags_from_unleash(_state(segments=[{"id": 4, "constraints": []}]))
        assert [("segment-4", 4)] == [(s.name, s.id) for s in segments]


class TestDetection:
    def test_is_unleash_state(self):
        """A mapping with a features list is Unleash's state; bastion's own export is not."""
        assert (True, False, False) == (
            is_unleash_state({"features": []}),
            is_unleash_state({"flags": []}),
            is_unleash_state([]),
        )


class TestRoundTrip:
    @pytest.mark.parametrize("path", sorted(VECTORS.glob("*.json")), ids=lambda p: p.stem)
    def test_export_evaluates_like_the_original(self, path):
        """Exporting to Unleash's shape and reading back answers every case the same."""
        spec = json.loads(path.read_text(encoding="utf-8"))
        flags, segments = flags_from_unleash(spec["state"])
        exported = json.loads(json.dumps(to_unleash(flags, segments)))
        again = FlagSet.from_unleash(exported, hostname="h")
        original = FlagSet.from_unleash(spec["state"], hostname="h")
        # The specification's cases are deterministic (no partial random rollout).
        for case in spec.get("tests", []):
            assert original.is_enabled(case["toggleName"], case["context"]) == again.is_enabled(
                case["toggleName"], case["context"]
            ), case["description"]
        for case in spec.get("variantTests", []):
            assert original.variant(case["toggleName"], case["context"]) == again.variant(
                case["toggleName"], case["context"]
            ), case["description"]

    def test_models_survive_round_trip(self):
        """Flags read from Unleash export back to models equal to themselves."""
        spec = json.loads((VECTORS / "17-dependent-features.json").read_text(encoding="utf-8"))
        flags, segments = flags_from_unleash(spec["state"])
        again, again_segments = flags_from_unleash(to_unleash(flags, segments))
        assert (flags, segments) == (again, again_segments)

    def test_segment_names_become_ids(self):
        """Segments cited by name get Unleash ids in the export, and rules cite those."""
        segment = Segment(
            name="staff",
            constraints=(Constraint(context="roles", operator=Operator.IN, values=("admin",)),),
        )
        exported = to_unleash(
            [Flag(key="f", enabled=True, rules=(Rule(segments=("staff",)),))], [segment]
        )
        assert (
            exported["segments"][0]["id"] == exported["features"][0]["strategies"][0]["segments"][0]
        )
        flag_set = FlagSet.from_unleash(exported)
        assert (True, False) == (
            flag_set.is_enabled("f", {"properties": {"roles": "admin"}}),
            flag_set.is_enabled("f", {"properties": {"roles": "dev"}}),
        )


class TestStrict:
    """flags_from_unleash(strict=True) refuses, with a location, what lenient reading tolerates."""

    @pytest.mark.parametrize(
        ("state", "location"),
        [
            (
                _state(_feature() | {"strategies": "default"}),
                "features[0].strategies",
            ),
            (
                _state(_feature(strategies=[{"name": "default", "constraints": {"a": 1}}])),
                "features[0].strategies[0].constraints",
            ),
            (
                _state(_feature(strategies=[{"name": "default", "segments": "1"}])),
                "features[0].strategies[0].segments",
            ),
            (_state(_feature(variants={"name": "v"})), "features[0].variants"),
            (
                _state(_feature(strategies=[{"name": "default", "variants": "v"}])),
                "features[0].strategies[0].variants",
            ),
            (_state(_feature(), {"enabled": True, "strategies": []}), "features[1].name"),
            (_state(_feature(), "not a feature"), "features[1]"),
            (_state(_feature(strategies=["default"])), "features[0].strategies[0]"),
            ({"features": [], "segments": {"id": 1}}, "segments"),
            (
                _state(segments=[{"id": 1, "name": "s", "constraints": "x"}]),
                "segments[0].constraints",
            ),
            (_state(_feature(dependencies={"feature": "a"})), "features[0].dependencies"),
            (
                _state(_feature(strategies=[{"name": "flexibleRollout", "parameters": "x"}])),
                "features[0].strategies[0].parameters",
            ),
            (
                _state(
                    _feature(
                        strategies=[{"name": "flexibleRollout", "parameters": {"rollout": "lots"}}]
                    )
                ),
                "features[0].strategies[0].parameters.rollout",
            ),
            (_state(_feature(name="a\u202eb")), "features[0]"),
            (
                _state(
                    _feature(
                        strategies=[
                            {
                                "name": "default",
                                "constraints": [
                                    {"contextName": "c", "operator": "IN", "values": ["x"]}
                                ]
                                * 101,
                            }
                        ]
                    )
                ),
                "features[0].strategies[0]",
            ),
        ],
        ids=[
            "strategies",
            "constraints",
            "segments",
            "variants",
            "rule-variants",
            "no-name",
            "feature-not-object",
            "strategy-not-object",
            "segments-list",
            "segment-constraints",
            "dependencies",
            "parameters",
            "rollout",
            "bidi-name",
            "too-many-constraints",
        ],
    )
    def test_shape_problem_is_refused_with_its_location(self, state, location):
        """Strictly, a shape problem raises ValueError naming where; leniently it is tolerated."""
        with pytest.raises(ValueError, match=rf"^{re.escape(location)}[.:\[]"):
            flags_from_unleash(state, strict=True)
        flags_from_unleash(state)

    def test_message_names_the_problem(self):
        """The message reads as the brief's example: location, then what is wrong."""
        with pytest.raises(ValueError, match="features") as caught:
            flags_from_unleash(
                _state(_feature("a"), _feature("b"), _feature("c"), {"name": "d", "strategies": 1}),
                strict=True,
            )
        assert "features[3].strategies: must be a list" == str(caught.value)
        assert not isinstance(caught.value, ValidationError)

    def test_unknown_operators_and_custom_strategies_are_kept(self):
        """Unknown operators and custom strategies are Unleash data: strict keeps them."""
        state = _state(
            _feature(
                strategies=[
                    {"name": "myCustomStrategy", "parameters": {"x": "1"}},
                    {
                        "name": "default",
                        "constraints": [
                            {"contextName": "userId", "operator": "FUTURE_OP", "values": ["1"]}
                        ],
                    },
                ]
            )
        )
        flags, _ = flags_from_unleash(state, strict=True)
        assert "myCustomStrategy" == flags[0].rules[0].strategy
        assert not FlagSet.from_flags(flags).is_enabled("f", {"userId": "1"})

    def test_strict_reads_the_vectors(self):
        """Every conformance state is valid Unleash data: strict reads each without complaint."""
        for path in sorted(VECTORS.glob("*.json")):
            state = json.loads(path.read_text()).get("state")
            if isinstance(state, dict):
                flags_from_unleash(state, strict=True)

    def test_from_unleash_stays_lenient(self):
        """FlagSet.from_unleash tolerates a malformed feature and serves the good ones."""
        flag_set = FlagSet.from_unleash(
            _state(_feature("good", [{"name": "default"}]), {"name": "bad", "strategies": 1})
        )
        assert flag_set.is_enabled("good")

    def test_unleash_fields_are_flag_fields(self):
        """UNLEASH_FIELDS names the Flag fields an Unleash state carries, and only those."""
        assert UNLEASH_FIELDS <= set(Flag.model_fields)
        flag = flags_from_unleash(_state(_feature(description="d", impressionData=True)))[0][0]
        carried = {
            name
            for name in Flag.model_fields
            if getattr(flag, name) != Flag.model_fields[name].get_default(call_default_factory=True)
        }
        # ``default`` is derived (False for a boolean flag), not carried.
        assert carried - {"key", "default"} <= UNLEASH_FIELDS
        assert {"description", "enabled", "impression_data"} <= carried
