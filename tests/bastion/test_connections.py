"""Tests for reading the client address behind a trusted proxy, without sockets."""

from __future__ import annotations

import pytest

from ephemwork.bastion.connections import forwarded_client, is_trusted, parse_trusted_proxy

ALB_SUBNET = (parse_trusted_proxy("10.0.0.0/16"),)


def head(*forwarded_for: str) -> bytes:
    lines = [b"GET / HTTP/1.1", b"Host: staging.example.com"]
    lines += [b"X-Forwarded-For: " + value.encode() for value in forwarded_for]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class TestForwardedClient:
    def test_right_most_entry(self) -> None:
        """The entry the proxy appended wins over entries the client sent."""
        assert forwarded_client(head("198.51.100.7, 203.0.113.1"), ALB_SUBNET) == "203.0.113.1"

    def test_trusted_hops_skipped(self) -> None:
        """Entries of trusted proxies are skipped, across repeated headers."""
        value = forwarded_client(head("203.0.113.1", "10.0.3.4"), ALB_SUBNET)
        assert value == "203.0.113.1"

    def test_missing(self) -> None:
        """A head without X-Forwarded-For names no client."""
        assert forwarded_client(head(), ALB_SUBNET) is None

    def test_not_an_address(self) -> None:
        """A right-most entry that is not an IP address names no client."""
        assert forwarded_client(head("203.0.113.1, unknown"), ALB_SUBNET) is None

    def test_body_ignored(self) -> None:
        """A header-like line in the body after the head is not read."""
        data = head("203.0.113.1") + b"X-Forwarded-For: 192.0.2.99\r\n\r\n"
        assert forwarded_client(data, ALB_SUBNET) == "203.0.113.1"

    def test_ipv6_normalized(self) -> None:
        """IPv6 entries are keyed in their compressed form."""
        assert forwarded_client(head("2001:DB8:0::1"), ALB_SUBNET) == "2001:db8::1"


class TestTrustedProxies:
    @pytest.mark.parametrize(
        ("address", "trusted"),
        [("10.0.200.1", True), ("10.1.0.1", False), ("unknown", False)],
    )
    def test_is_trusted(self, address: str, trusted: bool) -> None:
        """An address counts as trusted only inside a configured network."""
        assert is_trusted(address, ALB_SUBNET) is trusted

    def test_invalid_value(self) -> None:
        """An invalid --trusted-proxy value raises ValueError naming it."""
        with pytest.raises(ValueError) as caught:
            parse_trusted_proxy("10.0.0.0/33")
        assert "'10.0.0.0/33' is not an IP address or CIDR block" in str(caught.value)
