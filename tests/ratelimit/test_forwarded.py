"""The client address: the peer, or the first untrusted hop a trusted proxy forwarded."""

from __future__ import annotations

import pytest

from bastion._forwarded import ClientAddress, normalize_address

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


def xff(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"example.com"), (b"x-forwarded-for", value.encode())]


class TestUntrustedPeer:
    def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(self):
        """A client that sends X-Forwarded-For itself is still its socket address."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "198.51.100.7" == resolve("198.51.100.7", xff("1.2.3.4"))

    def test_other_headers_are_ignored_even_through_a_trusted_proxy(self):
        """Only the configured header is read: Forwarded is ignored when X-Forwarded-For is set."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        headers = [(b"forwarded", b"for=1.2.3.4"), (b"x-real-ip", b"5.6.7.8")]
        assert "10.0.0.1" == resolve("10.0.0.1", headers)

    def test_no_peer_stays_unknown(self):
        """A request over a Unix socket has no address to find."""
        assert ClientAddress(PROXIES, "x-forwarded-for")(None, xff("1.2.3.4")) is None

    def test_the_peer_is_normalised(self):
        """An IPv4-mapped IPv6 peer is its IPv4 address."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "198.51.100.7" == resolve("::ffff:198.51.100.7", [])


class TestXForwardedFor:
    def test_the_rightmost_untrusted_hop_is_the_client(self):
        """Through one trusted proxy, the address it appended is the client."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        # The client wrote "6.6.6.6" itself; the proxy appended the real address.
        assert "203.0.113.9" == resolve("10.0.0.1", xff("6.6.6.6, 203.0.113.9"))

    def test_chains_of_trusted_proxies_are_skipped(self):
        """Trusted hops on the right are proxies; the first untrusted one is the client."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        chain = "6.6.6.6, 203.0.113.9, 10.1.1.1, 10.2.2.2"
        assert "203.0.113.9" == resolve("10.0.0.1", xff(chain))

    def test_several_header_lines_are_one_list(self):
        """Two X-Forwarded-For lines are read as one comma-separated list, in order."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"203.0.113.9")]
        assert "203.0.113.9" == resolve("10.0.0.1", headers)

    def test_every_hop_trusted_gives_the_leftmost(self):
        """An internal caller behind our own proxies is the leftmost address."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "10.9.9.9" == resolve("10.0.0.1", xff("10.9.9.9, 10.1.1.1"))

    def test_ports_and_brackets_are_stripped(self):
        """Some proxies append ``ip:port`` or ``[v6]:port``."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "203.0.113.9" == resolve("10.0.0.1", xff("203.0.113.9:5555"))
        assert "2001:db8::1" == resolve("10.0.0.1", xff("[2001:DB8::1]:443"))

    def test_ipv4_mapped_hops_are_ipv4(self):
        """A hop written as IPv4-mapped IPv6 is the IPv4 client."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "203.0.113.9" == resolve("10.0.0.1", xff("::ffff:203.0.113.9"))

    def test_an_ipv6_proxy_is_trusted_by_network(self):
        """A peer inside an IPv6 proxy network is believed."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "203.0.113.9" == resolve("2001:db8:ffff::5", xff("203.0.113.9"))

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "garbage",
            "203.0.113.9, nonsense",
            "1.2.3.4,,5.6.7.8",
            "unknown",
            "[::1",
            "1.2.3.4:x",
        ],
    )
    def test_garbage_falls_back_to_the_peer(self, value):
        """A header that cannot be read is never a guess: the proxy is the client."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "10.0.0.1" == resolve("10.0.0.1", xff(value))

    def test_garbage_left_of_the_client_does_not_matter(self):
        """What the client wrote left of the proxy's hop is never read."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert "203.0.113.9" == resolve("10.0.0.1", xff("<script>, 203.0.113.9"))

    def test_an_absent_header_gives_the_peer(self):
        """Through a trusted proxy that set nothing, the proxy is the client."""
        assert "10.0.0.1" == ClientAddress(PROXIES, "x-forwarded-for")("10.0.0.1", [])


class TestForwarded:
    def test_for_nodes_are_read_from_the_right(self):
        """RFC 7239: the last for= appended by our proxy is the client."""
        resolve = ClientAddress(PROXIES, "forwarded")
        headers = [(b"forwarded", b'for=6.6.6.6, for=203.0.113.9;proto=https;by="10.0.0.1"')]
        assert "203.0.113.9" == resolve("10.0.0.1", headers)

    def test_quoted_ipv6_with_a_port(self):
        """IPv6 nodes are quoted and bracketed, and may carry a port."""
        resolve = ClientAddress(PROXIES, "forwarded")
        headers = [(b"forwarded", b'for="[2001:db8:cafe::17]:4711"')]
        assert "2001:db8:cafe::17" == resolve("10.0.0.1", headers)

    def test_parameters_are_case_insensitive(self):
        """``For=`` is ``for=``."""
        resolve = ClientAddress(PROXIES, "forwarded")
        assert "203.0.113.9" == resolve("10.0.0.1", [(b"forwarded", b"For=203.0.113.9")])

    def test_empty_elements_and_escapes(self):
        """HTTP list syntax allows empty elements; quoted strings may escape characters."""
        resolve = ClientAddress(PROXIES, "forwarded")
        headers = [(b"forwarded", b'for=6.6.6.6, , for="203.0.113.9";by="a\\"b"')]
        assert "203.0.113.9" == resolve("10.0.0.1", headers)

    def test_a_quoted_node_may_escape_characters(self):
        """A quoted-pair in a for= node stands for the character it escapes."""
        resolve = ClientAddress(PROXIES, "forwarded")
        headers = [(b"forwarded", b'for="\\203.0.113.9"')]
        assert "203.0.113.9" == resolve("10.0.0.1", headers)

    def test_trusted_hops_are_skipped(self):
        """A chain of our proxies is walked past."""
        resolve = ClientAddress(PROXIES, "forwarded")
        headers = [(b"forwarded", b"for=203.0.113.9, for=10.3.3.3")]
        assert "203.0.113.9" == resolve("10.0.0.1", headers)

    @pytest.mark.parametrize(
        "value",
        [
            b"for=unknown",
            b"for=_hidden",
            b'for="unterminated',
            b"proto=https",
            b"for=1.2.3.4;for=5.6.7.8",
            b"nonsense",
        ],
    )
    def test_unknown_obfuscated_or_malformed_falls_back_to_the_peer(self, value):
        """An element that names no address means the client cannot be told."""
        resolve = ClientAddress(PROXIES, "forwarded")
        assert "10.0.0.1" == resolve("10.0.0.1", [(b"forwarded", value)])


class TestXRealIp:
    def test_one_value_from_a_trusted_proxy(self):
        """X-Real-IP is one address, believed from a trusted peer."""
        resolve = ClientAddress(PROXIES, "x-real-ip")
        assert "203.0.113.9" == resolve("10.0.0.1", [(b"x-real-ip", b"203.0.113.9")])

    def test_two_values_are_refused(self):
        """Two X-Real-IP values mean someone else wrote one: the peer is used."""
        resolve = ClientAddress(PROXIES, "x-real-ip")
        headers = [(b"x-real-ip", b"6.6.6.6"), (b"x-real-ip", b"203.0.113.9")]
        assert "10.0.0.1" == resolve("10.0.0.1", headers)


class TestConstruction:
    def test_needs_a_proxy(self):
        """Without trusted proxies there is nothing to resolve: the stack builds none."""
        with pytest.raises(ValueError, match="trusted proxy"):
            ClientAddress([], "x-forwarded-for")

    def test_refuses_an_unknown_header(self):
        """Only the three headers proxies set are understood."""
        with pytest.raises(ValueError, match="unknown"):
            ClientAddress(PROXIES, "x-client-ip")

    def test_is_trusted(self):
        """Membership is by network."""
        resolve = ClientAddress(PROXIES, "x-forwarded-for")
        assert resolve.is_trusted("10.200.0.1")
        assert not resolve.is_trusted("11.0.0.1")
        assert not resolve.is_trusted("not an address")

    def test_normalize_address(self):
        """Canonical text for an address; None for anything else."""
        assert "2001:db8::1" == normalize_address("2001:DB8:0::1")
        assert "192.0.2.1" == normalize_address("::ffff:192.0.2.1")
        assert normalize_address("example.com") is None
