"""The rate-limit headers: X-RateLimit-* and the IETF RateLimit / RateLimit-Policy fields."""

from __future__ import annotations

import pytest

from bastion.ratelimit._expression import parse_limits
from bastion.ratelimit._headers import HeaderRenderer, limit_names
from bastion.ratelimit._store import Verdict


def verdict(remaining, reset_after, allowed=True, retry_after=0.0) -> Verdict:
    return Verdict(allowed, retry_after, tuple(remaining), tuple(reset_after))


class TestOneLimit:
    def test_admitted(self):
        """One limit: its quota, what remains and the seconds to reset, in both families."""
        renderer = HeaderRenderer("default", parse_limits("20/second"))
        assert {
            "x-ratelimit-limit": "20",
            "x-ratelimit-remaining": "19",
            "x-ratelimit-reset": "1",
            "ratelimit-policy": '"default";q=20;w=1',
            "ratelimit": '"default";r=19;t=1',
        } == renderer.mapping(verdict([19], [0.05]))

    def test_reset_is_rounded_up_to_whole_seconds(self):
        """The reset is delta-seconds, rounded up so a client never comes back early."""
        renderer = HeaderRenderer("default", parse_limits("100/hour"))
        headers = renderer.mapping(verdict([0], [35.2]))
        assert "36" == headers["x-ratelimit-reset"]
        assert '"default";r=0;t=36' == headers["ratelimit"]

    def test_window_of_a_burst_limit(self):
        """The window is the time the whole burst takes to come back (period*burst/rate)."""
        renderer = HeaderRenderer("login", parse_limits("5 per 15 minutes burst 10"))
        assert '"login";q=10;w=1800' == renderer.policy_header

    def test_raw_headers_are_bytes_for_asgi(self):
        """The middleware appends raw (name, value) byte pairs to the response start."""
        raw = HeaderRenderer("default", parse_limits("2/second")).raw(verdict([1], [0.5]))
        assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in raw)
        assert (b"ratelimit", b'"default";r=1;t=1') in raw

    def test_failed_open_verdict_carries_only_the_policy(self):
        """A decision admitted while the store was down knows no remaining count."""
        renderer = HeaderRenderer("default", parse_limits("20/second"))
        assert {"ratelimit-policy": '"default";q=20;w=1'} == renderer.mapping(verdict([], []))


class TestSeveralLimits:
    def test_policy_lists_every_limit_and_ratelimit_the_most_restrictive(self):
        """RateLimit-Policy names each limit; the rest describe the one closest to rejecting."""
        renderer = HeaderRenderer("default", parse_limits("20/second;1000/hour"))
        headers = renderer.mapping(verdict([19, 3], [0.05, 3599.0]))
        assert '"default-1s";q=20;w=1, "default-3600s";q=1000;w=3600' == headers["ratelimit-policy"]
        assert '"default-3600s";r=3;t=3599' == headers["ratelimit"]
        assert "1000" == headers["x-ratelimit-limit"]
        assert "3" == headers["x-ratelimit-remaining"]

    def test_a_tie_picks_the_limit_furthest_from_resetting(self):
        """Two limits both at 0: the one that lasts longer is the one to wait for."""
        renderer = HeaderRenderer("p", parse_limits("2/second;10/minute"))
        headers = renderer.mapping(verdict([0, 0], [0.5, 42.0], allowed=False))
        assert '"p-60s";r=0;t=42' == headers["ratelimit"]

    def test_equal_windows_get_distinct_names(self):
        """Every limit needs its own name: RateLimit refers to one by name."""
        assert ("u-60s", "u-60s-2") == limit_names("u", parse_limits("10/minute;20/minute"))


class TestNames:
    def test_names_are_structured_field_strings(self):
        """Quotes and backslashes in a name are escaped (RFC 9651 sf-string)."""
        renderer = HeaderRenderer('a"b\\c', parse_limits("1/second"))
        assert r'"a\"b\\c";q=1;w=1' == renderer.policy_header

    def test_non_ascii_names_are_refused(self):
        """A structured-field string is printable ASCII."""
        with pytest.raises(ValueError, match="printable ASCII"):
            HeaderRenderer("café", parse_limits("1/second"))

    def test_a_policy_needs_a_limit(self):
        """There is nothing to describe without a limit."""
        with pytest.raises(ValueError, match="at least one"):
            HeaderRenderer("p", [])
