"""Properties of rollout and evaluation: stability, uniformity, determinism, no raising."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.flags._engine import FlagSet, normalized_hash
from bastion.flags._evaluation import Evaluation, EvaluationContext, Reason
from bastion.flags._model import Flag, Rollout, Rule, Variant

IDS = st.text(min_size=1, max_size=40)
NAMES = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp"), blacklist_characters="/"
    ),
    min_size=1,
    max_size=60,
)
"""Flag keys and group ids bastion (and Unleash) accepts."""
# 100 buckets, 99 degrees of freedom: a uniform hash exceeds 181.0 with probability below
# one in a million, so a handful of drawn groups per run never fails by chance, while a
# biased hash (a bucket 10% off) scores in the thousands.
CHI_SQUARE_99_P1E6 = 181.0
SAMPLE = 100_000
# Each example hashes SAMPLE ids: a few examples keep every test well under a second or two.
FEW = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rollout_set(percentage: float, group: str = "g") -> FlagSet:
    rule = Rule(rollout=Rollout(percentage=percentage, stickiness="userId", group_id=group))
    return FlagSet.from_flags([Flag(key="f", enabled=True, rules=(rule,))])


def _ids(prefix: str) -> list[str]:
    """SAMPLE distinct user ids of one shape, as a service numbers its users."""
    return [f"{prefix}{n}" for n in range(SAMPLE)]


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
    @FEW
    @given(group=NAMES, prefix=st.sampled_from(["", "user-", "u", "tenant:42:"]) | IDS)
    def test_buckets_are_uniform_over_100000_ids(self, group, prefix):
        """For any group, the buckets of 100,000 ids pass a chi-square test for uniformity."""
        counts = Counter(normalized_hash(group, user) for user in _ids(prefix))
        expected = SAMPLE / 100
        chi_square = sum((counts[b] - expected) ** 2 / expected for b in range(1, 101))
        assert set(range(1, 101)) == set(counts)
        assert chi_square < CHI_SQUARE_99_P1E6

    @FEW
    @given(group=NAMES, percentage=st.integers(1, 99), prefix=IDS)
    def test_rollout_admits_its_percentage(self, group, percentage, prefix):
        """A p% rollout admits p% of 100,000 ids, within 0.8 points (five standard deviations)."""
        flag_set = _rollout_set(percentage, group=group)
        admitted = sum(flag_set.is_enabled("f", {"userId": user}) for user in _ids(prefix))
        assert abs(admitted / SAMPLE - percentage / 100) < 0.008

    @FEW
    @given(key=NAMES, prefix=IDS)
    def test_variant_weights_are_honoured(self, key, prefix):
        """Variants weighted 20/30/50 are served in those shares, within a point, for any flag."""
        variants = tuple(
            Variant(name=name, weight=weight, stickiness="userId")
            for name, weight in (("a", 200), ("b", 300), ("c", 500))
        )
        flag_set = FlagSet.from_flags([Flag(key=key, enabled=True, variants=variants)])
        served = Counter(flag_set.evaluate(key, {"userId": user}).variant for user in _ids(prefix))
        shares = {name: served[name] / SAMPLE for name in "abc"}
        assert all(abs(shares[n] - w) < 0.01 for n, w in (("a", 0.2), ("b", 0.3), ("c", 0.5)))


_CHILD = """
import json, sys
from bastion.flags._engine import FlagSet
for line in sys.stdin:
    request = json.loads(line)
    flag_set = FlagSet.from_unleash(request["state"])
    name = request["name"]
    print(json.dumps([
        [flag_set.is_enabled(name, {"userId": i}), flag_set.variant(name, {"userId": i})["name"]]
        for i in request["ids"]
    ]), flush=True)
"""


@pytest.fixture(scope="module")
def other_process():
    """A second interpreter (another hash seed) that answers evaluation requests line by line.

    One process for every example: importing bastion takes about a second, too long to pay
    per hypothesis example.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )

    def ask(request: dict) -> list:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write(json.dumps(request) + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    yield ask
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.close()
    # A bounded wait on a real process: it ends as soon as its input does.
    child.wait(timeout=30)
    child.stdout.close()


def _state(name: str, rollout: int, group: str | None, weights: tuple[int, int]) -> dict:
    parameters = {"rollout": str(rollout), "stickiness": "userId"}
    if group is not None:
        parameters["groupId"] = group
    return {
        "features": [
            {
                "name": name,
                "enabled": True,
                "strategies": [{"name": "flexibleRollout", "parameters": parameters}],
                "variants": [
                    {"name": "a", "weight": weights[0], "stickiness": "userId"},
                    {"name": "b", "weight": weights[1], "stickiness": "userId"},
                ],
            }
        ]
    }


CASES = st.fixed_dictionaries(
    {
        "name": NAMES,
        "rollout": st.integers(0, 100),
        "group": st.none() | NAMES,
        "weights": st.tuples(st.integers(1, 1000), st.integers(1, 1000)),
    }
)


class TestDeterminismAcrossProcesses:
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=CASES, ids=st.lists(st.text(max_size=40), min_size=1, max_size=200))
    def test_another_process_gives_the_same_answers(self, other_process, case, ids):
        """A fresh interpreter (other hash seed) buckets and picks variants exactly alike."""
        name = case["name"]
        state = _state(name, case["rollout"], case["group"], case["weights"])
        flag_set = FlagSet.from_unleash(state)
        assert name in flag_set
        here = [
            [flag_set.is_enabled(name, context), flag_set.variant(name, context)["name"]]
            for context in ({"userId": i} for i in ids)
        ]
        assert here == other_process({"state": state, "name": name, "ids": ids})


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
