"""Properties of rollout and evaluation: stability, uniformity, determinism, no raising."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.flags._engine import FlagSet, normalized_hash
from bastion.flags._evaluation import Evaluation, EvaluationContext, Reason
from bastion.flags._model import Flag, Rollout, Rule, Variant

IDS = st.text(min_size=1, max_size=40)
# 100 buckets, 99 degrees of freedom: the chi-square statistic exceeds 148.2 with
# probability 0.001 for a uniform hash. The ids are fixed, so the test is deterministic.
CHI_SQUARE_99_P001 = 148.2
SAMPLE = 100_000


def _rollout_set(percentage: float, group: str = "g") -> FlagSet:
    rule = Rule(rollout=Rollout(percentage=percentage, stickiness="userId", group_id=group))
    return FlagSet.from_flags([Flag(key="f", enabled=True, rules=(rule,))])


class TestStability:
    @settings(max_examples=200, deadline=None)
    @given(user=IDS, low=st.integers(0, 100), high=st.integers(0, 100), group=IDS)
    def test_users_in_at_a_percentage_stay_in_when_it_rises(self, user, low, high, group):
        """A user admitted at p% is admitted at every q% >= p% (same flag, same group)."""
        low, high = sorted((low, high))
        context = {"userId": user}
        if _rollout_set(low, group).is_enabled("f", context):
            assert _rollout_set(high, group).is_enabled("f", context)

    @settings(max_examples=100, deadline=None)
    @given(user=IDS)
    def test_same_user_same_answer(self, user):
        """Evaluating one user twice, or in two compiled sets, gives the same answer."""
        first, second = _rollout_set(37), _rollout_set(37)
        assert first.evaluate("f", {"userId": user}) == second.evaluate("f", {"userId": user})


class TestUniformity:
    def test_buckets_are_uniform_over_100000_ids(self):
        """Rollout buckets of 100,000 ids pass a chi-square test for uniformity (p=0.001)."""
        counts = Counter(normalized_hash("rollout", f"user-{n}") for n in range(SAMPLE))
        expected = SAMPLE / 100
        chi_square = sum((counts[b] - expected) ** 2 / expected for b in range(1, 101))
        assert set(counts) == set(range(1, 101))
        assert chi_square < CHI_SQUARE_99_P001

    def test_rollout_admits_its_percentage(self):
        """A 30% rollout admits 30% of 100,000 ids, within half a point."""
        flag_set = _rollout_set(30, group="checkout")
        admitted = sum(flag_set.is_enabled("f", {"userId": f"id-{n}"}) for n in range(SAMPLE))
        assert abs(admitted / SAMPLE - 0.30) < 0.005

    def test_variant_weights_are_honoured(self):
        """Variants weighted 20/30/50 are served in those shares, within a point."""
        variants = tuple(
            Variant(name=name, weight=weight, stickiness="userId")
            for name, weight in (("a", 200), ("b", 300), ("c", 500))
        )
        flag_set = FlagSet.from_flags([Flag(key="exp", enabled=True, variants=variants)])
        served = Counter(
            flag_set.evaluate("exp", {"userId": str(n)}).variant for n in range(SAMPLE)
        )
        shares = {name: served[name] / SAMPLE for name in "abc"}
        assert all(abs(shares[n] - w) < 0.01 for n, w in (("a", 0.2), ("b", 0.3), ("c", 0.5)))


_CHILD = """
import json, sys
from bastion.flags._engine import FlagSet
flag_set = FlagSet.from_unleash(json.loads(sys.argv[1]))
ids = json.loads(sys.argv[2])
print(json.dumps([
    [flag_set.is_enabled("f", {"userId": i}), flag_set.variant("f", {"userId": i})["name"]]
    for i in ids
]))
"""


class TestDeterminismAcrossProcesses:
    def test_another_process_gives_the_same_answers(self):
        """A fresh interpreter (other hash seed) buckets and picks variants exactly alike."""
        state = {
            "features": [
                {
                    "name": "f",
                    "enabled": True,
                    "strategies": [
                        {
                            "name": "flexibleRollout",
                            "parameters": {"rollout": "50", "stickiness": "userId"},
                        }
                    ],
                    "variants": [
                        {"name": "a", "weight": 300, "stickiness": "userId"},
                        {"name": "b", "weight": 700, "stickiness": "userId"},
                    ],
                }
            ]
        }
        ids = [f"user-{n}" for n in range(2000)] + ["Ünïcødé", "😀", ""]
        flag_set = FlagSet.from_unleash(state)
        here = [
            [flag_set.is_enabled("f", {"userId": i}), flag_set.variant("f", {"userId": i})["name"]]
            for i in ids
        ]
        # A bounded wait on a real process: importing bastion takes about a second.
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(state), json.dumps(ids)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": "12345"},
            check=True,
        )
        assert here == json.loads(child.stdout)


# Arbitrary JSON values, for states and contexts that may be anything.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
OPERATORS = st.sampled_from(
    [
        "IN",
        "NOT_IN",
        "STR_CONTAINS",
        "STR_STARTS_WITH",
        "STR_ENDS_WITH",
        "NUM_EQ",
        "NUM_GT",
        "NUM_LTE",
        "DATE_AFTER",
        "DATE_BEFORE",
        "SEMVER_EQ",
        "SEMVER_GT",
        "REGEX",
        "IN_CIDR",
        "BOGUS",
    ]
)
FIELDS = st.sampled_from(
    ["userId", "sessionId", "remoteAddress", "environment", "currentTime", "tenantId", "roles", "x"]
)
CONSTRAINT = st.fixed_dictionaries(
    {"contextName": FIELDS | JSON, "operator": OPERATORS | JSON},
    optional={
        "values": st.lists(st.text(max_size=10), max_size=3) | JSON,
        "value": st.text(max_size=10) | JSON,
        "inverted": st.booleans() | JSON,
        "caseInsensitive": st.booleans(),
    },
)
STRATEGY = st.fixed_dictionaries(
    {
        "name": st.sampled_from(
            [
                "default",
                "userWithId",
                "flexibleRollout",
                "gradualRolloutRandom",
                "remoteAddress",
                "applicationHostname",
                "custom",
            ]
        )
        | JSON
    },
    optional={
        "parameters": st.dictionaries(
            st.sampled_from(["rollout", "stickiness", "groupId", "userIds", "IPs", "percentage"]),
            st.text(max_size=8) | JSON,
            max_size=4,
        )
        | JSON,
        "constraints": st.lists(CONSTRAINT, max_size=3) | JSON,
        "segments": st.lists(st.integers(0, 3), max_size=2) | JSON,
        "variants": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=6) | JSON, "weight": st.integers(-5, 1200) | JSON},
                optional={"stickiness": FIELDS | JSON, "payload": JSON},
            ),
            max_size=3,
        )
        | JSON,
    },
)
FEATURE = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c"]), "enabled": st.booleans() | JSON},
    optional={
        "strategies": st.lists(STRATEGY, max_size=3) | JSON,
        "variants": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=6), "weight": st.integers(0, 1000)},
                optional={"overrides": JSON},
            ),
            max_size=3,
        )
        | JSON,
        "dependencies": st.lists(
            st.fixed_dictionaries(
                {"feature": st.sampled_from(["a", "b", "c", "z"])},
                optional={"enabled": JSON, "variants": JSON},
            ),
            max_size=2,
        )
        | JSON,
    },
)
STATE = st.fixed_dictionaries(
    {"features": st.lists(FEATURE, max_size=4)},
    optional={
        "segments": st.lists(
            st.fixed_dictionaries(
                {"id": st.integers(0, 3) | JSON},
                optional={"constraints": st.lists(CONSTRAINT, max_size=2) | JSON},
            ),
            max_size=3,
        )
        | JSON
    },
)
CONTEXT = st.dictionaries(FIELDS | st.just("properties"), JSON, max_size=6)


class TestNeverRaises:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(state=STATE, context=CONTEXT | JSON)
    def test_any_state_and_context_evaluate(self, state, context):
        """Arbitrary Unleash states and contexts get an answer (ERROR at worst), never raise."""
        flag_set = FlagSet.from_unleash(state, hostname="h")
        for key in ("a", "b", "c", "missing"):
            assert isinstance(flag_set.is_enabled(key, context), bool)
            evaluation = flag_set.evaluate(key, context)
            assert isinstance(evaluation, Evaluation)
            variant = flag_set.variant(key, context)
            assert {"name", "enabled", "feature_enabled"} <= set(variant)
            json.dumps(flag_set.explain(key, context), default=str)
            if key == "missing":
                assert Reason.ERROR == evaluation.reason

    @settings(max_examples=200, deadline=None)
    @given(
        user=st.none() | st.text(max_size=20),
        roles=st.lists(st.text(max_size=8), max_size=3),
        properties=st.dictionaries(st.text(max_size=8), JSON, max_size=4),
    )
    def test_any_evaluation_context_evaluates(self, user, roles, properties):
        """Any EvaluationContext, however odd its properties, gets an answer."""
        flag_set = FlagSet.from_unleash(
            {
                "features": [
                    {
                        "name": "f",
                        "enabled": True,
                        "strategies": [
                            {
                                "name": "flexibleRollout",
                                "parameters": {"rollout": "50"},
                                "constraints": [
                                    {
                                        "contextName": "roles",
                                        "operator": "IN",
                                        "values": ["admin"],
                                        "inverted": True,
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
        )
        context = EvaluationContext(user_id=user, roles=roles, properties=properties)
        assert flag_set.evaluate("f", context).reason in set(Reason)
