"""Rules from configuration: limits paired with an algorithm, refused at start-up when unsafe."""

from __future__ import annotations

import pytest

from bastion.errors import ConfigurationError
from bastion.ratelimit._expression import parse_limit, parse_limits
from bastion.ratelimit._rules import build_rules, check_cost, rule_id
from bastion.ratelimit._store import Rule


class TestBuildRules:
    def test_each_limit_becomes_a_rule_in_order(self):
        """Limits keep their order and all take the policy's algorithm."""
        rules = build_rules(parse_limits("10/second;1000/hour"), "sliding_window", max_log_limit=10)
        assert [("10/second", "sliding_window"), ("1000/hour", "sliding_window")] == [
            (rule.limit.text, rule.algorithm) for rule in rules
        ]

    def test_an_expression_is_parsed(self):
        """A string is parsed as a limit expression."""
        assert (Rule(parse_limit("5/minute"), "token_bucket"),) == build_rules(
            "5/minute", "token_bucket", max_log_limit=1000
        )

    def test_rules_are_a_tuple(self):
        """A tuple, so a store may cache its compiled form by identity."""
        assert isinstance(build_rules("5/minute", "token_bucket", max_log_limit=1), tuple)

    def test_no_limit_is_refused(self):
        """A policy without a limit is a configuration error, not an unlimited route."""
        with pytest.raises(ConfigurationError, match="needs at least one limit"):
            build_rules([], "token_bucket", max_log_limit=1000)

    def test_bad_expression_is_a_configuration_error(self):
        """A malformed expression reports as configuration, with the parser's reason."""
        with pytest.raises(ConfigurationError, match="invalid rate limit: unknown unit 'parsec'"):
            build_rules("10/parsec", "token_bucket", max_log_limit=1000)

    def test_unknown_algorithm_is_refused(self):
        """An algorithm name from a decorator is checked and the valid ones listed."""
        with pytest.raises(ConfigurationError, match="token_bucket, sliding_window, sliding_log"):
            build_rules("10/second", "leaky", max_log_limit=1000)

    def test_sliding_log_above_the_maximum_is_refused(self):
        """A 70,000-per-day log would stall the store: refused, saying why and what to use."""
        with pytest.raises(ConfigurationError) as caught:
            build_rules("70000/day", "sliding_log", max_log_limit=1000)
        message = str(caught.value)
        assert "'70000/day' is too large for the exact sliding_log" in message
        assert "ratelimit.max_log_limit is 1000" in message
        assert "use sliding_window or token_bucket" in message

    def test_sliding_log_limit_is_its_burst(self):
        """The log keeps one entry per unit of burst, so the burst is what is bounded."""
        assert build_rules("70000/day burst 100", "sliding_log", max_log_limit=100)
        with pytest.raises(ConfigurationError):
            build_rules("10/second burst 101", "sliding_log", max_log_limit=100)

    @pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
    def test_other_algorithms_have_no_maximum(self, algorithm):
        """Token bucket and window counter cost the same whatever the limit."""
        assert build_rules("70000/day", algorithm, max_log_limit=1)

    def test_the_same_limit_twice_is_refused(self):
        """Two spellings of one limit would share one count; the operator is told."""
        with pytest.raises(ConfigurationError, match="'10/s' and '10 per second' are the same"):
            build_rules("10/s;10 per second", "token_bucket", max_log_limit=1000)


class TestRuleId:
    def test_names_algorithm_rate_period_and_burst(self):
        """The id a store keeps a rule's counts under."""
        assert "sw:5/900/10" == rule_id(
            Rule(parse_limit("5 per 15 minutes burst 10"), "sliding_window")
        )

    def test_spelling_does_not_matter(self):
        """``10/s`` and ``10 per second`` count in one place."""
        assert rule_id(Rule(parse_limit("10/s"), "sliding_log")) == rule_id(
            Rule(parse_limit("10 per second"), "sliding_log")
        )

    def test_algorithm_matters(self):
        """The same limit under two algorithms keeps two states."""
        limit = parse_limit("10/s")
        assert rule_id(Rule(limit, "token_bucket")) != rule_id(Rule(limit, "sliding_window"))

    def test_fractional_period_is_exact(self):
        """A period that is not whole seconds is named exactly."""
        limit = parse_limit("10/s")
        half = type(limit)(rate=1, period=0.5, burst=1, text="1 per 0.5s")
        assert "tb:1/0.5/1" == rule_id(Rule(half, "token_bucket"))
        assert limit.period == 1.0


class TestCheckCost:
    def test_cost_within_every_burst_passes(self):
        """A cost every rule can hold is fine."""
        check_cost(build_rules("10/s;100/h", "token_bucket", max_log_limit=1), 10)

    def test_cost_above_a_burst_is_refused(self):
        """A cost above the smallest burst could never pass; refused with the fix."""
        rules = build_rules("10/s burst 2;100/h", "token_bucket", max_log_limit=1)
        with pytest.raises(ConfigurationError) as caught:
            check_cost(rules, 3)
        assert "a cost of 3 can never pass the limit '10/s burst 2'" in str(caught.value)
        assert "raise that limit's burst to at least 3" in str(caught.value)

    @pytest.mark.parametrize("cost", [0, -1])
    def test_cost_below_one_is_refused(self, cost):
        """A request always costs something."""
        with pytest.raises(ConfigurationError, match="at least 1"):
            check_cost(build_rules("10/s", "token_bucket", max_log_limit=1), cost)
