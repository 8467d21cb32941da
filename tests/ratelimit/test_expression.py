"""Limit expressions: what parses, into what, and what an operator reads when it does not."""

from __future__ import annotations

import re

import pytest

from bastion.errors import ConfigurationError
from bastion.ratelimit._expression import Limit, parse_limit, parse_limits
from bastion.settings import load_settings


class TestParseLimit:
    @pytest.mark.parametrize(
        ("text", "rate", "period", "burst"),
        [
            ("10/second", 10, 1.0, 10),
            ("10/s", 10, 1.0, 10),
            ("10/sec", 10, 1.0, 10),
            ("10/seconds", 10, 1.0, 10),
            ("10 / second", 10, 1.0, 10),
            ("10/SECOND", 10, 1.0, 10),
            ("100/5m", 100, 300.0, 100),
            ("100/5min", 100, 300.0, 100),
            ("30/minute", 30, 60.0, 30),
            ("1000/hour", 1000, 3600.0, 1000),
            ("1000/h", 1000, 3600.0, 1000),
            ("2/hrs", 2, 3600.0, 2),
            ("70000/day", 70_000, 86_400.0, 70_000),
            ("3/2d", 3, 172_800.0, 3),
            ("1/week", 1, 604_800.0, 1),
            ("5 per 15 minutes", 5, 900.0, 5),
            ("5 per minute", 5, 60.0, 5),
            ("5 per 15 minutes burst 10", 5, 900.0, 10),
            ("10/s burst 2", 10, 1.0, 2),
            ("  10/second  ", 10, 1.0, 10),
        ],
    )
    def test_good_expressions(self, text, rate, period, burst):
        """Each spelling of rate, period and burst parses to the same numbers."""
        limit = parse_limit(text)
        assert (rate, period, burst) == (limit.rate, limit.period, limit.burst)

    def test_text_is_kept_with_whitespace_collapsed(self):
        """The limit remembers its expression as headers and logs name it."""
        assert "5 per 15 minutes burst 10" == parse_limit("  5  per 15 minutes   burst 10 ").text

    def test_burst_defaults_to_rate(self):
        """Without ``burst``, the whole rate may arrive at once."""
        assert 20 == parse_limit("20/minute").burst

    @pytest.mark.parametrize(
        ("text", "window"),
        [("10/second", 1.0), ("10/second burst 20", 2.0), ("5 per 15 minutes burst 1", 180.0)],
    )
    def test_window_keeps_the_long_run_rate(self, text, window):
        """A window algorithm admits ``burst`` per ``period * burst / rate`` seconds."""
        assert window == pytest.approx(parse_limit(text).window)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("10", "is not a limit such as 10/second"),
            ("ten/second", "is not a limit such as 10/second"),
            ("1.5/second", "is not a limit such as 10/second"),
            ("-1/second", "is not a limit such as 10/second"),
            ("10/", "is not a limit such as 10/second"),
            ("10/second burst", "is not a limit such as 10/second"),
            ("10/second burst -1", "is not a limit such as 10/second"),
            ("10/second extra", "is not a limit such as 10/second"),
            ("10/fortnight", "unknown unit 'fortnight'"),
            ("0/second", "must admit at least 1 per a non-empty period"),
            ("10/0s", "must admit at least 1 per a non-empty period"),
            ("10/second burst 0", "burst of '10/second burst 0' must be at least 1"),
        ],
    )
    def test_bad_expressions_say_what_is_wrong(self, text, message):
        """A malformed limit is refused with a message naming it and showing a good one."""
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_limit(text)

    @pytest.mark.parametrize("text", ["10/ms", "10/millisecond", "10/us"])
    def test_sub_second_units_are_refused(self, text):
        """``ms`` is not read as minutes: a unit the parser does not know is an error."""
        with pytest.raises(ValueError, match="unknown unit"):
            parse_limit(text)


class TestParseLimits:
    def test_several_limits_all_apply(self):
        """``;`` (or ``,``) separates limits that a request must all pass."""
        limits = parse_limits("20/second;1000/hour, 5000/day")
        assert [(20, 1.0), (1000, 3600.0), (5000, 86_400.0)] == [
            (limit.rate, limit.period) for limit in limits
        ]

    def test_empty_parts_are_ignored(self):
        """A trailing separator is harmless."""
        assert (Limit(10, 1.0, 10, "10/second"),) == parse_limits("10/second;")

    @pytest.mark.parametrize("text", ["", "  ", ";", " ; , "])
    def test_no_limit_is_an_error(self, text):
        """An expression with no limit in it is refused, showing one that works."""
        with pytest.raises(ValueError, match="no limit given; write one such as 20/second"):
            parse_limits(text)

    def test_one_bad_part_fails_the_whole(self):
        """A bad limit among good ones is not silently dropped."""
        with pytest.raises(ValueError, match="'1000/fortnight'"):
            parse_limits("20/second;1000/fortnight")


class TestSettingsValidation:
    def test_bad_default_from_environment_fails_at_load(self, monkeypatch):
        """An invalid BASTION_RATELIMIT__DEFAULT stops start-up, naming the variable."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "20/fortnight")
        with pytest.raises(ConfigurationError) as caught:
            load_settings()
        message = str(caught.value)
        assert message.startswith("invalid setting BASTION_RATELIMIT__DEFAULT: ")
        assert "unknown unit 'fortnight'" in message

    def test_good_default_from_environment_loads(self, monkeypatch):
        """A valid expression is kept as written."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "20/second;1000/hour")
        assert "20/second;1000/hour" == load_settings().ratelimit.default

    def test_empty_default_is_refused(self, monkeypatch):
        """An empty expression is not "no limit": it is an error (``None`` means none)."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", ";")
        with pytest.raises(ConfigurationError, match=r"BASTION_RATELIMIT__DEFAULT: .*no limit"):
            load_settings()

    def test_bad_policy_limits_fail_at_load(self):
        """A policy's limits are parsed when settings load, not at the first request."""
        with pytest.raises(
            ConfigurationError, match=r"BASTION_RATELIMIT__POLICIES__UPLOADS__LIMITS: .*'10'"
        ):
            load_settings(ratelimit={"policies": {"uploads": {"limits": "10"}}})

    def test_bad_login_limit_fails_at_load(self):
        """The login throttle's limit is checked like any other."""
        with pytest.raises(ConfigurationError, match="BASTION_RATELIMIT__LOGIN__IP_LIMIT"):
            load_settings(ratelimit={"login": {"ip_limit": "5 per fortnight"}})
